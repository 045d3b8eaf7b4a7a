"""PDMX metadata + converted files -> the four CLaMP 3 training JSONL files (ABC and MTF, train/valid).

A record follows the official ``TextMusicDataset`` format::

    {"id": "QmAbc", "filepaths": ["../abc_interleaved/0/00/QmAbc.abc"],
     "title": "...", "artists": [...], "genres": [...], "tags": [...], ...}

``filepaths`` are relative to the folder of the JSONL file, as the official loader expects. Every
key other than ``id``, ``filepaths`` and ``pair_id`` is a text field (a string or a list of
strings), which the official ``text_dropout`` samples from.

A piece written in both formats carries ``"pair_id": <its id>`` in its ABC and its MTF record (the
same piece as sheet music and as MIDI, for the trainer's sheet <-> MIDI objective,
``ALIGN_WEIGHT``); a piece of which only one format survived the file checks has none. The
official loader reads every key but ``id``, ``filepaths``, ``language`` and ``translations`` as
text, so ``pair_ids=False`` (``--no_pair_ids``) writes records for the official trainer.

The split is decided per piece from a hash of (seed, id), never from the order of the rows, so a
piece lands in the same split in the ABC and the MTF files (both members of a pair on the same
side), on every run, whatever else is in the metadata.
"""

from __future__ import annotations

import json
import os
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from fileio import DropLog, atomic_write_text, iter_jsonl, read_jsonl, with_extension, write_jsonl
from formats import FORMATS
from pools import process_context
from records import piece_hash
from tqdm import tqdm

from preprocess.errors import describe_exception
from preprocess.pdmx import METADATA_NAME


class ConvertedFiles(NamedTuple):
    """Where a format's training files come from: PDMX's original and the batch converter's output."""

    source_key: str  # the key of the original file in a metadata record's "paths"
    folder: str  # the converter's output folder under the data root
    suffix: str  # the converted file's extension


CONVERTED_FILES: dict[str, ConvertedFiles] = {
    "abc": ConvertedFiles(source_key="mxl", folder="abc_interleaved", suffix=".abc"),
    "mtf": ConvertedFiles(source_key="mid", folder="mtf", suffix=".mtf"),
}
SPLITS = ("train", "valid")
DROPPED_NAME = "training_jsonl_dropped.jsonl"
SUMMARY_NAME = "training_jsonl_summary.json"
RESERVED_KEYS = {"id", "filepaths", "pair_id"}


def output_name(format: str, split: str) -> str:
    return f"clamp3_{split}_{format}.jsonl"


# ----------------------------------------------------------------------------- titles


def normalise_title(text: str) -> str:
    """Casefolded ASCII transliteration with punctuation and whitespace collapsed to single spaces,
    so "Für Elise!" and "fur  elise" compare equal."""
    from unidecode import unidecode

    text = unicodedata.normalize("NFKC", str(text))
    text = unidecode(text).casefold()
    return " ".join(re.sub(r"[\W_]+", " ", text).split())


def load_titles(path: str | os.PathLike) -> set[str]:
    """Normalised titles from a text file (one per line) or a JSONL whose objects have ``title``
    (a string or a list of strings; e.g. a WikiMT-X file). Blank titles are ignored.

    The file is JSONL when its first non-blank line starts with ``{``; then every line must be a
    JSON object (ValueError naming the line otherwise), so a broken record is not read as a title.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"title list not found: {path}")
    with open(path, encoding="utf-8") as f:
        lines = [line.strip() for line in f if line.strip()]
    if lines and lines[0].startswith("{"):
        values = []
        for _, obj in iter_jsonl(path):
            title = obj.get("title")
            values += title if isinstance(title, list) else [title]
    else:
        values = lines
    return {norm for value in values if isinstance(value, str) and (norm := normalise_title(value))}


# ----------------------------------------------------------------------------- split


def split_of(piece_id: str, valid_fraction: float, seed: int = 42) -> str:
    """"valid" for a stable pseudo-random ``valid_fraction`` of ids, "train" for the rest."""
    position = int.from_bytes(piece_hash(seed, piece_id)[:8], "big") / 2**64
    return "valid" if position < valid_fraction else "train"


# ----------------------------------------------------------------------------- files


def converted_path(source_rel: str, data_dir: str | os.PathLike, folder: str, suffix: str) -> Path:
    """Where the batch converters put the output for a PDMX file: the path below its top folder
    ("mxl/0/00/x.mxl" -> "0/00/x") under ``data_dir/folder``, named as the converters name it
    (``fileio.with_extension``)."""
    parts = Path(source_rel).parts
    below = Path(*parts[1:]) if len(parts) > 1 else Path(parts[0])
    return Path(data_dir) / folder / with_extension(below, suffix)


_PATCHILIZER = None


def check_file(path: str | os.PathLike, verify: bool) -> str | None:
    """None when the file is usable, otherwise the reason. Without ``verify`` only existence is
    checked; with it the file must be non-empty UTF-8 that the M3 patchilizer encodes."""
    global _PATCHILIZER
    path = Path(path)
    if not path.exists():
        return "missing file"
    if not path.is_file():
        return "not a regular file"
    if not verify:
        return None
    try:
        data = path.read_bytes()
    except OSError as exc:
        return f"unreadable: {exc.strerror or exc}"
    if not data:
        return "empty file"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        return f"not UTF-8 (byte {exc.start})"
    if not text.strip():
        return "blank file (whitespace only)"
    try:
        if _PATCHILIZER is None:
            from patchilizer import M3Patchilizer

            _PATCHILIZER = M3Patchilizer()
        patches = _PATCHILIZER.encode(text, add_special_patches=True)
    except Exception as exc:  # noqa: BLE001 - any failure of a file is a reason to drop it
        return f"patchilizer failed: {describe_exception(exc)}"
    if len(patches) <= 2:  # only the BOS and EOS patches: nothing for the model to read
        return "patchilizer produced no content patches"
    return None


def _check_task(task: tuple[str, bool]) -> str | None:
    return check_file(task[0], task[1])


def check_files(paths: list[Path], verify: bool, workers: int = 1, progress: bool = True) -> list[str | None]:
    """``check_file`` for every path, in order, on ``workers`` processes."""
    tasks = [(str(p), verify) for p in paths]
    desc = "verifying files" if verify else "checking files"
    bar = tqdm(total=len(tasks), desc=desc, unit="file", disable=not progress, dynamic_ncols=True)
    try:
        if workers <= 1 or len(tasks) < 64:
            results = []
            for task in tasks:
                results.append(_check_task(task))
                bar.update(1)
            return results
        with process_context().Pool(workers) as pool:
            results = []
            for result in pool.imap(_check_task, tasks, chunksize=32):
                results.append(result)
                bar.update(1)
            return results
    finally:
        bar.close()


# ----------------------------------------------------------------------------- records


def text_fields(meta: dict) -> dict:
    """The text of a metadata record as str / list-of-str fields (anything else is left out)."""
    out = {}
    for key, value in (meta.get("text") or {}).items():
        if key in RESERVED_KEYS:
            continue
        if isinstance(value, str) and value.strip():
            out[key] = value
        elif isinstance(value, list):
            items = [v for v in value if isinstance(v, str) and v.strip()]
            if items:
                out[key] = items
    return out


def relative_to(path: str | os.PathLike, folder: str | os.PathLike) -> str:
    """``path`` relative to ``folder`` in POSIX form (what the official loader joins back)."""
    return Path(os.path.relpath(os.path.abspath(path), os.path.abspath(folder))).as_posix()


@dataclass
class TrainingJsonlSummary:
    pieces: int = 0
    written: Counter = field(default_factory=Counter)  # (format, split) -> records
    pairs: Counter = field(default_factory=Counter)  # split -> pieces written in both formats (pair_id)
    # One row per piece or file left out; "format" is "abc", "mtf", or "piece" for both at once.
    drops: DropLog = field(default_factory=lambda: DropLog("training_jsonl"))

    def dropped_by_format(self) -> Counter[tuple[str, str]]:
        """(format, reason) -> how many were left out."""
        return Counter((row["format"], row["reason"]) for row in self.drops.rows)

    def lines(self) -> list[str]:
        out = [f"pieces in metadata: {self.pieces}"]
        for format in FORMATS:
            counts = ", ".join(f"{split} {self.written[(format, split)]}" for split in SPLITS)
            out.append(f"{format}: {counts}")
        out.append("pairs (both formats, pair_id): " + ", ".join(f"{split} {self.pairs[split]}" for split in SPLITS))
        if self.drops:
            out.append(f"dropped: {len(self.drops)}")
            out += [f"  [{f}] {reason}: {n}" for (f, reason), n in sorted(self.dropped_by_format().items())]
        return out


def load_metadata(metadata: str | os.PathLike) -> list[dict]:
    """The records of a metadata JSONL, given as the file or the folder holding pdmx_metadata.jsonl."""
    path = Path(metadata)
    if path.is_dir():
        path = path / METADATA_NAME
    if not path.is_file():
        raise FileNotFoundError(f"metadata file not found: {path} (run preprocessing/parse_pdmx_csv.py)")
    return read_jsonl(path)


def generate(
    metadata: str | os.PathLike,
    data_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    verify_files: bool = False,
    valid_fraction: float = 0.02,
    exclude_titles: str | os.PathLike | None = None,
    seed: int = 42,
    allow_missing: bool = False,
    workers: int = 1,
    progress: bool = True,
    pair_ids: bool = True,
) -> TrainingJsonlSummary:
    """Write the four JSONL files, the dropped-row log and a summary into ``output_dir``; with
    ``pair_ids`` a piece written in both formats gets its id as ``pair_id`` in both records."""
    if not 0.0 <= valid_fraction < 1.0:
        raise ValueError(f"--valid_fraction must be in [0, 1), got {valid_fraction}")
    records = load_metadata(metadata)
    excluded = load_titles(exclude_titles) if exclude_titles else set()
    output_dir = Path(output_dir)
    summary = TrainingJsonlSummary(pieces=len(records))
    drops = summary.drops

    # Piece-level filters first, so both formats see the same set of pieces.
    candidates: list[tuple[str, dict, dict, str]] = []  # (id, paths, text, split)
    seen: set[str] = set()
    for meta in records:
        pid = meta.get("id")
        if not isinstance(pid, str) or not pid:
            drops.add("no id", id=pid, format="piece")
            continue
        if pid in seen:
            drops.add("duplicate id", id=pid, format="piece")
            continue
        seen.add(pid)
        text = text_fields(meta)
        if not text:
            drops.add("no usable text", id=pid, format="piece")
            continue
        titles = [text.get("title"), text.get("song_name")]
        if excluded and any(isinstance(t, str) and normalise_title(t) in excluded for t in titles):
            drops.add("title in --exclude_titles", id=pid, format="piece")
            continue
        candidates.append((pid, meta.get("paths") or {}, text, split_of(pid, valid_fraction, seed)))

    # Collect every file to check, then check them in one (optionally parallel) pass.
    jobs: list[tuple[str, str, dict, str, Path]] = []  # (format, id, text, split, file)
    for pid, paths, text, split in candidates:
        for format, (source_key, folder, suffix) in CONVERTED_FILES.items():
            source = paths.get(source_key)
            if not source:
                drops.add(f"no {source_key} path in metadata", id=pid, format=format)
                continue
            jobs.append((format, pid, text, split, converted_path(source, data_dir, folder, suffix)))
    if allow_missing and not verify_files:
        reasons: list[str | None] = [None] * len(jobs)
    else:
        reasons = check_files([j[4] for j in jobs], verify_files, workers, progress)

    outputs: dict[tuple[str, str], list[dict]] = {(f, s): [] for f in FORMATS for s in SPLITS}
    usable = list(zip(jobs, reasons, strict=True))
    formats_of: dict[str, set[str]] = {}
    for (format, pid, *_), reason in usable:
        if reason is None:
            formats_of.setdefault(pid, set()).add(format)
    paired = {pid for pid, found in formats_of.items() if pair_ids and found == set(FORMATS)}
    for (format, pid, text, split, file), reason in usable:
        if reason is not None:
            drops.add(reason, id=pid, format=format, file=str(file))
            continue
        record = {"id": pid, "filepaths": [relative_to(file, output_dir)],
                  **({"pair_id": pid} if pid in paired else {}), **text}
        outputs[(format, split)].append(record)
        summary.written[(format, split)] += 1
        if pid in paired and format == FORMATS[0]:
            summary.pairs[split] += 1

    for (format, split), rows in outputs.items():
        write_jsonl(output_dir / output_name(format, split), rows)
    drops.write(output_dir / DROPPED_NAME)
    info = {
        "metadata": str(Path(metadata).resolve()), "data_dir": str(Path(data_dir).resolve()),
        "valid_fraction": valid_fraction, "seed": seed, "verify_files": verify_files,
        "exclude_titles": str(exclude_titles) if exclude_titles else None, "pieces": summary.pieces,
        "written": {output_name(f, s): n for (f, s), n in sorted(summary.written.items())},
        "pair_ids": pair_ids, "pairs": {split: summary.pairs[split] for split in SPLITS},
        "dropped": {f"{f}: {r}": n for (f, r), n in sorted(summary.dropped_by_format().items())},
    }
    atomic_write_text(output_dir / SUMMARY_NAME, json.dumps(info, indent=2, ensure_ascii=False) + "\n")
    return summary
