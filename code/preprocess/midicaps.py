"""MidiCaps (CSV or JSONL) -> CLaMP 3 records pointing at the MTF conversions of its MIDI files.

Each row becomes::

    {"id": "lmd_full/1/1a07...", "filepaths": ["../mtf/1/1a07....mtf"],
     "caption": "...", "genre": [...], "mood": [...], "key": "...", "time_signature": "4/4",
     "tempo_word": "...", "duration_word": "...", "instrument_summary": [...], "chord_summary": [...]}

``location`` ("lmd_full/1/1a07....mid") is mapped to ``<mtf_root>/<location minus strip_prefix>``
named as ``batch_midi2mtf.py`` names it (``fileio.with_extension``: the stem ends at the last dot). Rows whose ``test_set``
is true go to the evaluation file, all others to the training file. Numeric columns (``tempo``,
``duration``, probabilities) and per-chord timings are not text and are left out.
"""

from __future__ import annotations

import json
import os
import posixpath
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from fileio import DropLog, read_jsonl, with_extension, write_jsonl
from records import clean_text, parse_bool, parse_list

from preprocess.training_jsonl import check_files, relative_to

# Text columns in the order they appear in a record; caption first, as the main description.
STRING_FIELDS = ("caption", "key", "time_signature", "tempo_word", "duration_word")
LIST_FIELDS = ("genre", "mood", "instrument_summary", "chord_summary")
FIELD_ORDER = ("caption", "genre", "mood", "key", "time_signature", "tempo_word", "duration_word",
               "instrument_summary", "chord_summary")
TRAIN_NAME = "midicaps_train_mtf.jsonl"
TEST_NAME = "midicaps_test_mtf.jsonl"
DROPPED_NAME = "midicaps_dropped.jsonl"


class MidiCapsError(Exception):
    """An input file that cannot be read as MidiCaps; names the file."""


def read_rows(path: str | os.PathLike) -> list[dict]:
    """Rows of a MidiCaps CSV, JSONL (the Hugging Face ``train.json``) or JSON array file."""
    path = Path(path)
    if not path.is_file():
        raise MidiCapsError(f"MidiCaps file not found: {path}")
    if path.suffix.lower() == ".csv":
        import pandas as pd

        try:
            frame = pd.read_csv(path, dtype=str, keep_default_na=False, na_filter=False)
        except (ValueError, OSError, UnicodeDecodeError, pd.errors.ParserError) as exc:
            raise MidiCapsError(f"cannot read MidiCaps CSV {path}: {exc}") from exc
        rows = frame.to_dict("records")
    elif _first_character(path) == "[":
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise MidiCapsError(f"{path}: not valid JSON ({exc.msg})") from exc
        if not all(isinstance(r, dict) for r in rows):
            raise MidiCapsError(f"{path}: every row must be a JSON object")
    else:
        try:
            rows = read_jsonl(path)
        except ValueError as exc:  # names the file and the line
            raise MidiCapsError(str(exc)) from exc
    if rows and "location" not in rows[0]:
        raise MidiCapsError(f"{path}: no 'location' column; is this MidiCaps?")
    return rows


def _first_character(path: Path) -> str:
    """The first non-blank character of a text file ("" for a blank one), without reading it all."""
    with open(path, encoding="utf-8") as f:
        while chunk := f.read(4096):
            if chunk.strip():
                return chunk.lstrip()[0]
    return ""


def mtf_path(location: str, mtf_root: str | os.PathLike, strip_prefix: str = "") -> Path:
    """The MTF file for a MidiCaps ``location`` (see the module docstring)."""
    rel = posixpath.normpath(location.replace("\\", "/"))
    if rel.startswith("../") or rel == ".." or rel.startswith("/"):
        raise ValueError(f"location {location!r} leaves the MIDI root")
    prefix = strip_prefix.strip("/")
    if prefix and rel.startswith(prefix + "/"):
        rel = rel[len(prefix) + 1:]
    return Path(mtf_root) / with_extension(Path(rel), ".mtf")


def text_fields(row: dict) -> dict:
    out: dict = {}
    for name in FIELD_ORDER:
        if name in LIST_FIELDS:
            value = parse_list(row.get(name))
            if value:
                out[name] = value
        else:
            value = clean_text(row.get(name))
            if value is not None:
                out[name] = value
    return out


@dataclass
class MidiCapsSummary:
    rows: int = 0
    written: Counter = field(default_factory=Counter)  # "train"/"test" -> records
    drops: DropLog = field(default_factory=lambda: DropLog("midicaps"))

    def lines(self) -> list[str]:
        out = [f"rows read: {self.rows}", f"train: {self.written['train']}, test: {self.written['test']}",
               f"dropped: {len(self.drops)}"]
        out += [f"  {reason}: {n}" for reason, n in sorted(self.drops.counts.items())]
        return out


def convert(
    input_path: str | os.PathLike,
    mtf_root: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    strip_prefix: str = "",
    verify_files: bool = False,
    allow_missing: bool = False,
    workers: int = 1,
    progress: bool = True,
) -> MidiCapsSummary:
    """Write the train and test JSONL files plus the dropped-row log into ``output_dir``."""
    rows = read_rows(input_path)
    output_dir = Path(output_dir)
    summary = MidiCapsSummary(rows=len(rows))
    drops = summary.drops

    pending: list[tuple[int, str, dict, str, Path]] = []  # (row, location, record, split, file)
    seen: set[str] = set()
    for index, row in enumerate(rows):
        location = clean_text(row.get("location"))
        if location is None:
            drops.add("no location", row=index)
            continue
        try:
            file = mtf_path(location, mtf_root, strip_prefix)
        except ValueError as exc:
            drops.add("bad location", row=index, location=location, detail=str(exc))
            continue
        pid = posixpath.splitext(posixpath.normpath(location.replace("\\", "/")))[0]
        if pid in seen:
            drops.add("duplicate location", row=index, location=location)
            continue
        seen.add(pid)
        text = text_fields(row)
        if "caption" not in text:
            drops.add("no caption", row=index, location=location)
            continue
        try:
            split = "test" if parse_bool(row.get("test_set")) else "train"
        except ValueError as exc:
            drops.add("bad test_set value", row=index, location=location, detail=str(exc))
            continue
        pending.append((index, location, {"id": pid, **text}, split, file))

    files = [p[4] for p in pending]
    reasons = [None] * len(files) if allow_missing and not verify_files else check_files(
        files, verify_files, workers, progress)
    outputs: dict[str, list[dict]] = {"train": [], "test": []}
    for (index, location, record, split, file), reason in zip(pending, reasons, strict=True):
        if reason is not None:
            drops.add(reason, row=index, location=location, detail=str(file))
            continue
        record = {"id": record["id"], "filepaths": [relative_to(file, output_dir)],
                  **{k: v for k, v in record.items() if k != "id"}}
        outputs[split].append(record)
        summary.written[split] += 1
    write_jsonl(output_dir / TRAIN_NAME, outputs["train"])
    write_jsonl(output_dir / TEST_NAME, outputs["test"])
    drops.write(output_dir / DROPPED_NAME)
    return summary
