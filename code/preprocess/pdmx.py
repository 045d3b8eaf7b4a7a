"""PDMX.csv -> one metadata JSONL (``pdmx_metadata.jsonl``): text fields and resolved file paths.

One line per kept piece::

    {"id": "QmAbc", "row": 17,
     "paths": {"mxl": "mxl/0/00/QmAbc.mxl", "mid": "mid/0/00/QmAbc.mid", ...},
     "text": {"title": "...", "subtitle": "...", "artists": [...], "genres": [...],
              "tags": [...], "publisher": "..."},
     "license": "..."}

``paths`` are relative to the data root (``--base_dir``; the CSV's ``./`` prefix removed), so the
metadata stays valid when the data folder moves; ``base_dir`` is recorded once in
``pdmx_metadata_summary.json``. Rows that are left out are written with a reason to
``pdmx_dropped.jsonl``; nothing is dropped silently.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fileio import DropLog, atomic_write_text, write_jsonl
from records import clean_text, dedupe, parse_bool, parse_list
from tqdm import tqdm

# The PDMX.csv column set, in the order the dataset documentation lists it (DATA_AND_ASSETS.md).
PDMX_COLUMNS: tuple[str, ...] = (
    # paths
    "path", "metadata", "mxl", "pdf", "mid",
    # descriptive
    "title", "subtitle", "song_name", "artist_name", "composer_name", "publisher", "genres", "groups",
    "tags", "complexity",
    # engagement
    "n_comments", "n_favorites", "n_views", "n_ratings", "rating",
    # licence
    "license", "license_url", "license_conflict",
    # music statistics
    "n_tracks", "tracks", "song_length", "song_length.seconds", "song_length.bars", "song_length.beats",
    "n_notes", "notes_per_bar", "n_annotations", "has_annotations", "n_lyrics", "has_lyrics", "n_tokens",
    "pitch_class_entropy", "scale_consistency", "groove_consistency",
    # flags
    "version", "is_user_pro", "is_user_publisher", "is_user_staff", "has_paywall", "is_rated",
    "is_official", "is_original", "is_draft", "has_custom_audio", "has_custom_video",
    # deduplication
    "best_path", "best_arrangement", "best_unique_arrangement", "is_best_path", "is_best_arrangement",
    "is_best_unique_arrangement",
    # subsets
    "subset:all", "subset:rated", "subset:deduplicated", "subset:rated_deduplicated",
    "subset:no_license_conflict", "subset:all_valid",
)

SUBSETS: tuple[str, ...] = ("all", "rated", "deduplicated", "rated_deduplicated", "no_license_conflict",
                            "all_valid")
DEFAULT_SUBSET = "no_license_conflict"
PATH_COLUMNS: tuple[str, ...] = ("mxl", "mid", "pdf", "metadata", "path")
# Columns whose text goes into the record; everything else in the CSV is statistics or flags.
TEXT_COLUMNS: tuple[str, ...] = ("title", "song_name", "subtitle", "composer_name", "artist_name",
                                 "genres", "tags", "publisher")
REQUIRED_COLUMNS: tuple[str, ...] = ("mxl", "mid", "title")

METADATA_NAME = "pdmx_metadata.jsonl"
DROPPED_NAME = "pdmx_dropped.jsonl"
SUMMARY_NAME = "pdmx_metadata_summary.json"


class PdmxError(Exception):
    """A CSV that cannot be used at all (missing file or columns); names the file."""


def normalise_relative_path(value: Any) -> str | None:
    """A CSV path such as "./mxl/0/00/x.mxl" as "mxl/0/00/x.mxl"; None when missing.

    Raises ValueError for absolute paths or paths that climb out of the data root, which would make
    the metadata point outside ``--base_dir``.
    """
    text = clean_text(value)
    if text is None:
        return None
    text = text.replace("\\", "/")
    if text.startswith("/") or re.match(r"^[A-Za-z]:/", text):
        raise ValueError(f"absolute path {text!r} (expected ./...)")
    norm = posixpath.normpath(text)
    if norm == "." or norm == ".." or norm.startswith("../"):
        raise ValueError(f"path {text!r} leaves the data root")
    return norm


def build_text_fields(row: dict[str, Any]) -> dict[str, Any]:
    """The text fields of one CSV row, with empty fields left out (never NaN, "nan", "[]", "None")."""
    text: dict[str, Any] = {}
    title = clean_text(row.get("title"))
    song_name = clean_text(row.get("song_name"))
    if title is None:
        title, song_name = song_name, None
    if title is not None:
        text["title"] = title
    # MuseScore's song name usually repeats the title; keep it only when it says something new.
    if song_name is not None and song_name.casefold() != title.casefold():
        text["song_name"] = song_name
    subtitle = clean_text(row.get("subtitle"))
    if subtitle is not None and subtitle.casefold() not in {t.casefold() for t in text.values()}:
        text["subtitle"] = subtitle
    # Composer and artist are often the same person; the official records call the list "artists".
    artists = dedupe(name for col in ("composer_name", "artist_name") for name in parse_list(row.get(col)))
    if artists:
        text["artists"] = artists
    for column in ("genres", "tags"):
        values = parse_list(row.get(column), dash_joined=True)
        if values:
            text[column] = values
    publisher = clean_text(row.get("publisher"))
    if publisher is not None:
        text["publisher"] = publisher
    return text


def piece_id(paths: dict[str, str]) -> str | None:
    """The file stem shared by a piece's files (the MuseScore id in PDMX)."""
    for column in ("path", "mxl", "mid", "metadata", "pdf"):
        if paths.get(column):
            return posixpath.splitext(posixpath.basename(paths[column]))[0]
    return None


@dataclass
class PdmxSummary:
    rows: int = 0
    not_in_subset: int = 0
    kept: int = 0
    kept_without_mxl: int = 0
    kept_without_mid: int = 0
    files_not_found: Counter = field(default_factory=Counter)  # "mxl"/"mid" -> paths removed
    drops: DropLog = field(default_factory=lambda: DropLog("pdmx"))

    def lines(self, subset: str) -> list[str]:
        out = [
            f"rows read: {self.rows}",
            f"not in subset {subset!r}: {self.not_in_subset}",
            f"kept: {self.kept} (without mxl path: {self.kept_without_mxl}, without mid path: "
            f"{self.kept_without_mid})",
            f"dropped: {len(self.drops)}",
        ]
        if self.files_not_found:
            out.insert(3, "files not found under base_dir (path removed): "
                       + ", ".join(f"{k} {v}" for k, v in sorted(self.files_not_found.items())))
        out += [f"  {reason}: {count}" for reason, count in sorted(self.drops.counts.items())]
        return out


def read_pdmx_csv(csv_path: str | os.PathLike) -> Any:
    """The CSV as a DataFrame of raw strings (no NaN guessing: every cell is cleaned here instead)."""
    import pandas as pd

    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise PdmxError(f"PDMX CSV not found: {csv_path}")
    try:
        frame = pd.read_csv(csv_path, dtype=str, keep_default_na=False, na_filter=False)
    except (ValueError, OSError, UnicodeDecodeError, pd.errors.ParserError) as exc:
        raise PdmxError(f"cannot read PDMX CSV {csv_path}: {exc}") from exc
    return frame


def parse_pdmx(
    csv_path: str | os.PathLike,
    base_dir: str | os.PathLike,
    subset: str = DEFAULT_SUBSET,
    progress: bool = True,
    check_files: bool = False,
) -> tuple[list[dict], list[dict], PdmxSummary]:
    """Read PDMX.csv and return (records, dropped rows with reasons, summary).

    With ``check_files``, an mxl/mid path whose file is not under ``base_dir`` is removed from the
    record (counted), and a row left with neither is dropped.
    """
    if subset not in SUBSETS:
        raise ValueError(f"unknown subset {subset!r}; choose one of {', '.join(SUBSETS)}")
    frame = read_pdmx_csv(csv_path)
    subset_column = f"subset:{subset}"
    missing = [c for c in (*REQUIRED_COLUMNS, subset_column) if c not in frame.columns]
    if missing:
        raise PdmxError(f"{csv_path}: missing column(s) {', '.join(missing)}; is this PDMX.csv?")
    wanted = [c for c in (*PATH_COLUMNS, *TEXT_COLUMNS, "license", subset_column) if c in frame.columns]
    columns = {c: frame[c].tolist() for c in wanted}
    base = Path(base_dir)

    records: list[dict] = []
    summary = PdmxSummary(rows=len(frame))
    drops = summary.drops
    seen_ids: dict[str, int] = {}

    for index in tqdm(range(len(frame)), desc="PDMX rows", unit="row", disable=not progress,
                      dynamic_ncols=True):
        row = {c: values[index] for c, values in columns.items()}
        try:
            in_subset = parse_bool(row[subset_column])
        except ValueError as exc:
            drops.add(f"bad {subset_column} value", row=index, detail=str(exc))
            continue
        if not in_subset:
            summary.not_in_subset += 1
            continue
        paths: dict[str, str] = {}
        bad_path = None
        for column in PATH_COLUMNS:
            try:
                rel = normalise_relative_path(row.get(column))
            except ValueError as exc:
                bad_path = bad_path or f"{column}: {exc}"
                continue
            if rel is not None:
                paths[column] = rel
        pid = piece_id(paths)
        if bad_path is not None:
            drops.add("bad path", row=index, id=pid, detail=bad_path)
            continue
        if "mxl" not in paths and "mid" not in paths:
            drops.add("no mxl or mid path", row=index, id=pid)
            continue
        if check_files:
            absent = [c for c in ("mxl", "mid") if c in paths and not (base / paths[c]).is_file()]
            for column in absent:
                summary.files_not_found[column] += 1
                del paths[column]
            if "mxl" not in paths and "mid" not in paths:
                drops.add("mxl/mid files not found under base_dir", row=index, id=pid,
                          detail=", ".join(str(base / p) for p in absent))
                continue
        text = build_text_fields(row)
        if not text:
            drops.add("no usable text", row=index, id=pid)
            continue
        if pid in seen_ids:
            drops.add("duplicate id", row=index, id=pid, detail=f"same file stem as row {seen_ids[pid]}")
            continue
        seen_ids[pid] = index
        summary.kept += 1
        summary.kept_without_mxl += "mxl" not in paths
        summary.kept_without_mid += "mid" not in paths
        record = {"id": pid, "row": index, "paths": paths, "text": text}
        license_text = clean_text(row.get("license"))
        if license_text is not None:
            record["license"] = license_text
        records.append(record)
    return records, drops.rows, summary


def run(csv_path: str | os.PathLike, output_dir: str | os.PathLike, base_dir: str | os.PathLike,
        subset: str = DEFAULT_SUBSET, progress: bool = True, check_files: bool = False) -> PdmxSummary:
    """Parse the CSV and write metadata, the dropped-row log and a summary under ``output_dir``."""
    records, _, summary = parse_pdmx(csv_path, base_dir, subset, progress, check_files)
    output_dir = Path(output_dir)
    write_jsonl(output_dir / METADATA_NAME, records)
    summary.drops.write(output_dir / DROPPED_NAME)
    info = {"csv_path": str(Path(csv_path).resolve()), "base_dir": str(Path(base_dir).resolve()),
            "subset": subset, "rows": summary.rows, "not_in_subset": summary.not_in_subset,
            "kept": summary.kept, "kept_without_mxl": summary.kept_without_mxl,
            "kept_without_mid": summary.kept_without_mid, "dropped": dict(summary.drops.counts),
            "files_not_found": dict(summary.files_not_found), "check_files": check_files}
    atomic_write_text(output_dir / SUMMARY_NAME, json.dumps(info, indent=2, ensure_ascii=False) + "\n")
    return summary


def report(summary: PdmxSummary, subset: str, output_dir: str | os.PathLike) -> tuple[str, str]:
    """What ``parse_pdmx_csv.py`` tells after a run: the counts and where the metadata went (for
    stdout), and where the dropped rows are listed (for stderr; empty when nothing was dropped)."""
    out = Path(output_dir)
    counts = "\n".join([*summary.lines(subset), f"metadata: {out / METADATA_NAME}"])
    drops = f"dropped rows and reasons: {out / DROPPED_NAME}" if summary.drops else ""
    return counts, drops
