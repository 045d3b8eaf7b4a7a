"""Files in and out: atomic writes (a reader never sees a half-written output, even after a
crash), JSONL records, input discovery and output naming for batches, and ``DropLog``, the one
record of what a job left out and why. Paths of the project's own outputs are described in
docs/ARCHITECTURE.md (output roots)."""

from __future__ import annotations

import io
import json
import os
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any

# The repository root (the install is editable: code/ stays where it is). Default output
# locations and configuration paths are relative to it; see docs/ARCHITECTURE.md.
REPO_ROOT = Path(__file__).resolve().parent.parent


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def repo_path(path: str | os.PathLike) -> Path:
    """A configuration path or default location: absolute as given, else under the repository root."""
    path = Path(os.path.expanduser(str(path)))
    return path if path.is_absolute() else REPO_ROOT / path


def failure_log_path(tool: str) -> Path:
    """The default failure log of a batch tool: ``logs/<tool>_failures.jsonl`` in the repository."""
    return REPO_ROOT / "logs" / f"{tool}_failures.jsonl"


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


def plan_outputs(input_dir: Path, output_dir: Path, files: Iterable[Path], output_of: Callable[[Path], Path],
                 overwrite: bool = False) -> tuple[list[Path], list[int], int, list[tuple[Path, Path, Path]]]:
    """For a batch tool: the input files (relative to ``input_dir``) whose output (``output_of(rel)``,
    relative to ``output_dir``) still needs making, with their sizes (0 if unreadable: reading fails
    later and is logged then); how many outputs exist already (kept unless ``overwrite``); and the
    inputs whose output another input already claims, as (input, its output, the input claiming it)."""
    pending: list[Path] = []
    sizes: list[int] = []
    skipped = 0
    claimed: dict[Path, Path] = {}
    clashes: list[tuple[Path, Path, Path]] = []
    for rel in files:
        out_rel = output_of(rel)
        if out_rel in claimed:
            clashes.append((rel, out_rel, claimed[out_rel]))
            continue
        claimed[out_rel] = rel
        if not overwrite and (output_dir / out_rel).exists():
            skipped += 1
            continue
        pending.append(rel)
        try:
            sizes.append((input_dir / rel).stat().st_size)
        except OSError:
            sizes.append(0)
    return pending, sizes, skipped, clashes


def with_extension(relative: Path, extension: str) -> Path:
    """``dir/name.x.ext`` -> ``dir/name.x<extension>``: the stem ends at the last dot, as in the
    official CLaMP 3 scripts. The one output-naming rule of the project: it differs from
    ``Path.with_suffix`` for names that end in a dot or start with one (``a.`` -> ``a<ext>``)."""
    return relative.with_name(relative.name.rsplit(".", 1)[0] + extension)


def atomic_write(path: str | os.PathLike, write: Callable[[IO[Any]], None], binary: bool = False) -> Path:
    """Call ``write(f)`` on a temporary file beside ``path``, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name[:80]}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates the file owner-only (0600); an output gets the mode any new file would.
        os.fchmod(fd, 0o666 & ~_UMASK)
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


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 24) -> str:
    """SHA-256 of a file's bytes, read in chunks (checkpoints of several GB included)."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def swap_in_folder(staging: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Put a completely written ``staging`` folder in the place of ``target`` (which may exist):
    the old folder is moved aside, the new one renamed in, the old one deleted, so ``target``
    always holds one whole version."""
    import shutil

    staging, target = Path(staging), Path(target)
    previous = target.with_name(f".{target.name}.previous")
    shutil.rmtree(previous, ignore_errors=True)
    if target.exists():
        target.rename(previous)
    staging.rename(target)
    shutil.rmtree(previous, ignore_errors=True)
    return target


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data), binary=True)


def atomic_save_npy(path: str | os.PathLike, array: Any) -> Path:
    import numpy as np

    buffer = io.BytesIO()
    np.save(buffer, array)
    return atomic_write_bytes(path, buffer.getvalue())


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> Path:
    """All rows as one JSONL file, written atomically (UTF-8, non-ASCII kept readable)."""
    return atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def scan_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict | None, str | None]]:
    """``(line number, object, None)`` for every non-blank line of a JSON object, and
    ``(line number, None, reason)`` for every other non-blank line (not UTF-8, not valid JSON, or
    JSON that is not an object): the lenient reading, for jobs that log bad lines and go on."""
    # surrogateescape: a line with bytes that are not UTF-8 is one bad line, not the end of the file.
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                line.encode("utf-8")
            except UnicodeEncodeError:
                yield number, None, "not UTF-8"
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                yield number, None, f"not valid JSON ({exc.msg})"
                continue
            if not isinstance(obj, dict):
                yield number, None, f"expected a JSON object, not {type(obj).__name__}"
                continue
            yield number, obj, None


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """``(line number, object)`` for every non-blank line of a JSONL file; a line that is not a JSON
    object raises ValueError naming the file and the line (``scan_jsonl`` reports it instead)."""
    for number, obj, problem in scan_jsonl(path):
        if obj is None:
            raise ValueError(f"{path}:{number}: {problem}")
        yield number, obj


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Every JSON object of a JSONL file (see ``iter_jsonl``)."""
    return [obj for _, obj in iter_jsonl(path)]


class DropLog:
    """What a job left out and why: the one record of dropped rows, failed files and bad records.

    Each ``add`` counts its reason, keeps the row (``{..fields, "reason": ...}``) in memory, echoes
    a line if ``echo`` is given, and appends the row to the JSONL file ``path`` if one is given (opened
    on the first row, so a clean run leaves no empty log behind). ``write`` saves every row at once,
    atomically, for jobs that publish their drops beside their outputs; ``summary_line`` is the one
    line a job prints at the end.
    """

    def __init__(self, name: str, path: str | os.PathLike | None = None,
                 echo: Callable[[str], None] | None = None):
        self.name = name
        self.path = Path(path) if path else None
        self.rows: list[dict] = []
        self.counts: Counter[str] = Counter()
        self._echo = echo
        self._file: IO[str] | None = None

    def add(self, reason: str, **fields: Any) -> dict:
        row = {**{k: v for k, v in fields.items() if v is not None}, "reason": reason}
        self.rows.append(row)
        self.counts[reason] += 1
        if self._echo is not None:
            where = fields.get("file", fields.get("id"))
            self._echo(f"[{self.name}] {where}: {reason}" if where is not None else f"[{self.name}] {reason}")
        if self.path is not None:
            if self._file is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                # backslashreplace: a file name that is not valid UTF-8 (a lone surrogate from
                # os.fsdecode) is written as a JSON \udcXX escape instead of crashing the batch.
                self._file = open(self.path, "a", encoding="utf-8", errors="backslashreplace")  # noqa: SIM115
            self._file.write(json.dumps(row, ensure_ascii=False) + "\n")
            self._file.flush()
        return row

    def fail(self, file: str | os.PathLike, stage: str, reason: str) -> dict:
        """A file a batch could not process: the file, the stage that failed, the reason, the time."""
        return self.add(reason, file=str(file), stage=stage, time=time.strftime("%Y-%m-%dT%H:%M:%S%z"))

    def __len__(self) -> int:
        return len(self.rows)

    def summary_line(self) -> str:
        """``name: left out N (reason a, reason b ...)`` with the most frequent reasons first."""
        if not self.rows:
            return f"{self.name}: nothing left out"
        reasons = ", ".join(f"{reason} {count}" for reason, count in
                            sorted(self.counts.items(), key=lambda item: (-item[1], item[0])))
        return f"{self.name}: left out {len(self.rows)} ({reasons})"

    def write(self, path: str | os.PathLike) -> Path:
        return write_jsonl(path, self.rows)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> DropLog:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
