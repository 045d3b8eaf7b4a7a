"""Atomic file writes: a reader never sees a half-written output, even after a crash."""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any


def find_files(root: str | os.PathLike, extensions: Iterable[str]) -> list[Path]:
    """Files under ``root`` whose extension matches (case-insensitive), as sorted relative paths.
    Hidden files and the temporary files of ``atomic_write`` are left out."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"input directory not found: {root}")
    wanted = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in filenames:
            if name.lower().endswith(wanted) and not name.startswith(".") and not name.endswith(".tmp"):
                found.append(Path(dirpath, name).relative_to(root))
    return sorted(found, key=lambda p: p.as_posix())


def with_extension(relative: Path, extension: str) -> Path:
    """``dir/name.x.ext`` -> ``dir/name.x<extension>``: the stem ends at the last dot, as in the
    official CLaMP 3 scripts (``Path.with_suffix`` agrees, but not for names without a dot)."""
    return relative.with_name(relative.name.rsplit(".", 1)[0] + extension)


def atomic_write(path: str | os.PathLike, write: Callable[[IO[Any]], None], binary: bool = False) -> Path:
    """Call ``write(f)`` on a temporary file beside ``path``, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name[:80]}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8", "newline": ""})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data), binary=True)


def atomic_save_npy(path: str | os.PathLike, array: Any) -> Path:
    import numpy as np

    buffer = io.BytesIO()
    np.save(buffer, array)
    return atomic_write_bytes(path, buffer.getvalue())


class FailureLog:
    """The failures of a batch: kept in memory, echoed to stderr, appended to a JSONL file.

    The file is opened on the first failure, so a clean run leaves no empty log behind.
    """

    def __init__(self, path: str | os.PathLike | None, name: str, echo: Callable[[str], None] | None = None):
        self.path = Path(path) if path else None
        self.name = name
        self.records: list[dict] = []
        self._echo = echo
        self._file: IO[str] | None = None

    def add(self, file: str | os.PathLike, stage: str, reason: str) -> dict:
        import json
        import sys
        import time

        record = {"file": str(file), "stage": stage, "reason": reason,
                  "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        self.records.append(record)
        message = f"[{self.name}] failed: {file}: {reason}"
        if self._echo is not None:
            self._echo(message)
        else:
            print(message, file=sys.stderr)
        if self.path is not None:
            if self._file is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                # backslashreplace: a file name that is not valid UTF-8 (a lone surrogate from
                # os.fsdecode) is written as a JSON \udcXX escape instead of crashing the batch.
                self._file = open(self.path, "a", encoding="utf-8", errors="backslashreplace")  # noqa: SIM115
            self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
            self._file.flush()
        return record

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> FailureLog:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
