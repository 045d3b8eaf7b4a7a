"""Held-out test sets for retrieval evaluation: selection, the leakage guard, and the folder format.

A test set folder (``TEST_DATA_DIR``)::

    abc/<id>.abc  mtf/<id>.mtf      the music, copied from its source
    test_abc.jsonl  test_mtf.jsonl  {"id", "filepaths": ["abc/<id>.abc"], "source", "texts": {...},
                                     "title"?, "pair_id"?}   (filepaths relative to the folder)
    test_data_summary.json          sources, seed, counts, refusals by reason, effective configuration

A piece present in both formats with the same musical content carries the same ``pair_id`` in both
files. The folder is built beside its target and swapped in whole, so a reader never sees a mix of
two runs and a smaller second run leaves no file of a larger first one behind.

The leakage guard refuses a piece whose id, music bytes (SHA-256) or normalised title also occurs in
a training JSONL, and a piece whose other format is there (its ``pair_id`` is a training record's
``pair_id`` or id, or its id a training record's ``pair_id``): retrieval on pieces the adapter was
trained on would measure memory, not skill.
"""

from __future__ import annotations

import os
import shutil
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fileio import DropLog, file_sha256, iter_jsonl, read_jsonl, swap_in_folder, write_jsonl
from formats import FORMATS
from preprocess.training_jsonl import check_file, normalise_title
from preprocess.wikimt import RECORDS_NAME as WIKIMT_RECORDS_NAME
from preprocess.wikimt import TEXT_TYPES as WIKIMT_TEXT_TYPES
from records import piece_hash

TEST_FILES = {fmt: f"test_{fmt}.jsonl" for fmt in FORMATS}
SUMMARY_NAME = "test_data_summary.json"
MIDICAPS_TEXT_FIELDS = ("caption",)

REFUSED_ID = "id in training data"
REFUSED_CONTENT = "content in training data"
REFUSED_TITLE = "title in training data"
REFUSED_PAIR = "other format in training data"
LEAKAGE_REASONS = (REFUSED_ID, REFUSED_CONTENT, REFUSED_TITLE, REFUSED_PAIR)

HOW_TO_MAKE = {
    "wikimt": "python preprocessing/prepare_wikimt.py --input wikimt-x.jsonl",
    "midicaps": "python preprocessing/parse_midicaps.py (it writes data/training/midicaps_test_mtf.jsonl)",
    "demo": "python -m demo (it builds the demo corpus under data/demo/)",
}


class SourceUnavailable(Exception):
    """A source whose files are not there; the message says what to run."""


class TestSetError(Exception):
    """A test set that cannot be written or read; the message says why and what to do."""


@dataclass
class Candidate:
    """One piece a source offers: its music file (absolute) and its texts."""

    id: str
    format: str
    source: str
    file: Path
    texts: dict[str, str]
    title: str | None = None
    pair_id: str | None = None


@dataclass(frozen=True)
class Source:
    """Where candidates of one format come from. ``load(path, drops)`` returns the candidates, adds
    the records it cannot use to ``drops``, and raises SourceUnavailable when ``path`` is missing.

    A corpus holding the same pieces in both formats (the demo corpus, a later issue) is two
    Sources, one per format, whose loaders give a piece the same ``pair_id`` in both.
    """

    name: str
    format: str
    path: Path
    load: Callable[[Path, DropLog], list[Candidate]]


# ----------------------------------------------------------------------------- sources


def _first_string(value: Any) -> str | None:
    if isinstance(value, list):
        value = next((v for v in value if isinstance(v, str) and v.strip()), None)
    return value.strip() if isinstance(value, str) and value.strip() else None


def _texts(record: dict, keys: Iterable[str]) -> dict[str, str]:
    return {key: record[key].strip() for key in keys if isinstance(record.get(key), str) and record[key].strip()}


def _record_file(record: dict, folder: Path) -> Path | None:
    files = record.get("filepaths")
    if isinstance(files, list) and files and isinstance(files[0], str) and files[0]:
        return folder / files[0]
    return None


def _load_jsonl_source(path: Path, name: str, fmt: str, text_keys: Sequence[str],
                       drops: DropLog) -> list[Candidate]:
    candidates = []
    for number, record in iter_jsonl(path):
        pid = record.get("id")
        if not isinstance(pid, str) or not pid.strip():
            drops.add("record without an id", format=fmt, source=name, line=number)
            continue
        file = _record_file(record, path.parent)
        if file is None:
            drops.add("record without filepaths", format=fmt, source=name, id=pid)
            continue
        candidates.append(Candidate(id=pid, format=fmt, source=name, file=file,
                                    texts=_texts(record, text_keys), title=_first_string(record.get("title"))))
    return candidates


def load_wikimt(wikimt_dir: Path, drops: DropLog) -> list[Candidate]:
    """ABC pieces and their four texts from the output folder of ``preprocessing/prepare_wikimt.py``."""
    path = Path(wikimt_dir) / WIKIMT_RECORDS_NAME
    if not path.is_file():
        raise SourceUnavailable(f"WikiMT-X (ABC): {path} not found; run: {HOW_TO_MAKE['wikimt']}")
    return _load_jsonl_source(path, "wikimt", "abc", WIKIMT_TEXT_TYPES, drops)


def load_midicaps_test(test_jsonl: Path, drops: DropLog) -> list[Candidate]:
    """MTF pieces and captions of MidiCaps' official test split (``filepaths`` relative to its folder)."""
    path = Path(test_jsonl)
    if not path.is_file():
        raise SourceUnavailable(f"MidiCaps test split (MTF): {path} not found; run: {HOW_TO_MAKE['midicaps']}")
    return _load_jsonl_source(path, "midicaps", "mtf", MIDICAPS_TEXT_FIELDS, drops)


def _demo_loader(fmt: str) -> Callable[[Path, DropLog], list[Candidate]]:
    def load(folder: Path, drops: DropLog) -> list[Candidate]:
        path = Path(folder) / TEST_FILES[fmt]
        if not path.is_file():
            raise SourceUnavailable(f"demo corpus ({fmt}): {path} not found; run: {HOW_TO_MAKE['demo']}")
        candidates = []
        for number, record in iter_jsonl(path):
            pid, file = record.get("id"), _record_file(record, path.parent)
            texts = record.get("texts") if isinstance(record.get("texts"), dict) else {}
            if not isinstance(pid, str) or not pid or file is None:
                drops.add("record without an id or filepaths", format=fmt, source="demo", line=number)
                continue
            candidates.append(Candidate(id=pid, format=fmt, source="demo", file=file,
                                        texts=_texts(texts, list(texts)), title=_first_string(record.get("title")),
                                        pair_id=record.get("pair_id") if isinstance(record.get("pair_id"), str) else None))
        return candidates

    return load


def demo_sources(demo_dir: Path) -> list[Source]:
    """The demo corpus's held-out pieces (written in this test-set format by ``demo.corpus``): one
    Source per format, the same tune sharing a ``pair_id`` across them."""
    return [Source("demo", fmt, Path(demo_dir), _demo_loader(fmt)) for fmt in FORMATS]


def default_sources(wikimt_dir: Path, midicaps_test: Path) -> list[Source]:
    return [Source("wikimt", "abc", Path(wikimt_dir), load_wikimt),
            Source("midicaps", "mtf", Path(midicaps_test), load_midicaps_test)]


# ----------------------------------------------------------------------------- training data


@dataclass
class TrainingIndex:
    """What the training data holds: ids, pair ids (one piece in both formats), normalised titles and
    the SHA-256 of its music files."""

    ids: set[str] = field(default_factory=set)
    pair_ids: set[str] = field(default_factory=set)
    titles: set[str] = field(default_factory=set)
    digests: set[str] = field(default_factory=set)
    read: list[str] = field(default_factory=list)  # JSONL files indexed
    missing: list[str] = field(default_factory=list)  # JSONL files that do not exist
    records: int = 0
    files_not_found: int = 0  # music files a training record names that are not there


def index_training_data(jsonls: Iterable[str | os.PathLike], sizes: set[int] | None = None) -> TrainingIndex:
    """Index the training JSONLs (``filepaths`` relative to each file's folder). With ``sizes``
    only music files of one of those byte sizes are hashed: a file of another size cannot hold the
    same bytes, and reading a whole training corpus for a few hundred test pieces is wasted time."""
    index = TrainingIndex()
    for jsonl in dict.fromkeys(Path(p) for p in jsonls):
        if not jsonl.is_file():
            index.missing.append(str(jsonl))
            continue
        index.read.append(str(jsonl))
        for _, record in iter_jsonl(jsonl):
            index.records += 1
            if isinstance(record.get("id"), str) and record["id"]:
                index.ids.add(record["id"])
            if isinstance(record.get("pair_id"), str) and record["pair_id"]:
                index.pair_ids.add(record["pair_id"])
            for key in ("title", "song_name"):
                values = record.get(key)
                for value in values if isinstance(values, list) else [values]:
                    if isinstance(value, str) and (norm := normalise_title(value)):
                        index.titles.add(norm)
            for rel in record.get("filepaths") or []:
                if not isinstance(rel, str):
                    continue
                file = jsonl.parent / rel
                try:
                    size = file.stat().st_size
                except OSError:
                    index.files_not_found += 1
                    continue
                if sizes is None or size in sizes:
                    index.digests.add(file_sha256(file))
    return index


def leakage(candidate: Candidate, digest: str, index: TrainingIndex) -> list[str]:
    """Every leakage reason of one candidate, in the order id, content, title, other format. The
    other format of a piece is in training when the candidate's ``pair_id`` is a training record's
    ``pair_id`` or id (a record of the other format that lost its partner keeps its id), or the
    candidate's id is a training record's ``pair_id``."""
    reasons = []
    if candidate.id in index.ids:
        reasons.append(REFUSED_ID)
    if digest in index.digests:
        reasons.append(REFUSED_CONTENT)
    if candidate.title and normalise_title(candidate.title) in index.titles:
        reasons.append(REFUSED_TITLE)
    if (candidate.pair_id and (candidate.pair_id in index.pair_ids or candidate.pair_id in index.ids)) \
            or candidate.id in index.pair_ids:
        reasons.append(REFUSED_PAIR)
    return reasons


# ----------------------------------------------------------------------------- selection


def _unsafe_id(piece_id: str) -> bool:
    """An id that cannot be a path below the test folder (``<format>/<id>.<format>``)."""
    parts = piece_id.split("/")
    return any(not part or part in (".", "..") or "\\" in part or "\x00" in part for part in parts)


@dataclass
class TestSetPlan:
    """What a run selected and refused, before anything is written."""

    selected: dict[str, list[Candidate]] = field(default_factory=lambda: {f: [] for f in FORMATS})
    requested: dict[str, int] = field(default_factory=dict)
    offered: Counter = field(default_factory=Counter)  # format -> candidates the sources offered
    refused: DropLog = field(default_factory=lambda: DropLog("test_data"))
    sources: dict[str, dict[str, Any]] = field(default_factory=dict)
    training: TrainingIndex = field(default_factory=TrainingIndex)
    warnings: list[str] = field(default_factory=list)

    def refused_by_reason(self) -> dict[str, dict[str, int]]:
        """format -> reason -> pieces refused."""
        counts: dict[str, Counter] = {f: Counter() for f in FORMATS}
        for row in self.refused.rows:
            counts[row["format"]][row["reason"]] += 1
        return {f: dict(sorted(c.items())) for f, c in counts.items()}

    def lines(self) -> list[str]:
        out = []
        for fmt in FORMATS:
            refused = self.refused_by_reason()[fmt]
            out.append(f"{fmt}: selected {len(self.selected[fmt])} of {self.requested.get(fmt, 0)} requested "
                       f"({self.offered[fmt]} offered, {sum(refused.values())} refused)")
            out += [f"  refused, {reason}: {n}" for reason, n in refused.items()]
        return out


def plan_test_set(sources: Sequence[Source], requested: dict[str, int], training_jsonls: Sequence[Path],
                  seed: int) -> TestSetPlan:
    """Load the sources, apply the leakage guard to every piece, and take up to ``requested[format]``
    usable pieces per format in seeded hash order. Raises TestSetError when no source is available."""
    plan = TestSetPlan(requested=dict(requested))
    candidates: list[Candidate] = []
    for source in sources:
        info: dict[str, Any] = {"format": source.format, "path": str(Path(source.path).absolute())}
        try:
            found = source.load(Path(source.path), plan.refused)
        except SourceUnavailable as exc:
            info.update(available=False, reason=str(exc))
            plan.warnings.append(f"source unavailable: {exc}")
        else:
            info.update(available=True, pieces=len(found))
            candidates += found
            plan.offered[source.format] += len(found)
        plan.sources[source.name] = info
    if not any(info["available"] for info in plan.sources.values()):
        raise TestSetError("no test data source is available:\n  " + "\n  ".join(
            info["reason"] for info in plan.sources.values()))

    # Hash every piece first: the sizes tell the index which training files are worth reading.
    digests: dict[int, str] = {}
    for number, candidate in enumerate(candidates):
        if candidate.file.is_file():
            digests[number] = file_sha256(candidate.file)
    sizes = {candidates[n].file.stat().st_size for n in digests}
    plan.training = index_training_data(training_jsonls, sizes)
    if plan.training.missing:
        plan.warnings.append("training JSONL not found, nothing to check against in it: "
                             + ", ".join(plan.training.missing))
    if not plan.training.read:
        plan.warnings.append("no training JSONL was found: the leakage guard checked nothing")
    if plan.training.files_not_found:
        plan.warnings.append(f"{plan.training.files_not_found} music files named by the training JSONLs are "
                             "missing: their content could not be compared")

    kept: dict[str, list[Candidate]] = {f: [] for f in FORMATS}
    seen: set[tuple[str, str]] = set()
    for number, candidate in enumerate(candidates):
        where = {"format": candidate.format, "source": candidate.source, "id": candidate.id}
        if (candidate.format, candidate.id) in seen:
            plan.refused.add("duplicate id", **where)
            continue
        seen.add((candidate.format, candidate.id))
        if _unsafe_id(candidate.id):
            plan.refused.add("id not usable as a file name", **where)
            continue
        if number not in digests:
            plan.refused.add("music file not found", **where, file=str(candidate.file))
            continue
        if not candidate.texts:
            plan.refused.add("no text", **where)
            continue
        reasons = leakage(candidate, digests[number], plan.training)
        if reasons:
            # One reason per piece, so the counts add up to the pieces refused; the others are kept.
            plan.refused.add(reasons[0], **where, also=reasons[1:] or None)
            continue
        kept[candidate.format].append(candidate)

    for fmt in FORMATS:
        wanted = requested.get(fmt, 0)
        # Files are verified in selection order, only until enough are taken: the patchilizer on a
        # whole source would cost minutes for pieces that are never used.
        for candidate in sorted(kept[fmt], key=lambda c: piece_hash(seed, c.id)):
            if len(plan.selected[fmt]) >= wanted:
                break
            problem = check_file(candidate.file, verify=True)
            if problem is not None:
                plan.refused.add(f"unusable music file: {problem}", format=fmt, source=candidate.source,
                                 id=candidate.id)
                continue
            plan.selected[fmt].append(candidate)
        if plan.offered[fmt] and len(plan.selected[fmt]) < wanted:
            plan.warnings.append(f"{fmt}: only {len(plan.selected[fmt])} usable pieces, fewer than the "
                                 f"{wanted} requested")
    return plan


# ----------------------------------------------------------------------------- writing and reading


def music_relpath(fmt: str, piece_id: str) -> str:
    return f"{fmt}/{piece_id}.{fmt}"


def test_record(candidate: Candidate) -> dict[str, Any]:
    record: dict[str, Any] = {"id": candidate.id, "filepaths": [music_relpath(candidate.format, candidate.id)],
                              "source": candidate.source, "texts": dict(candidate.texts)}
    if candidate.title:
        record["title"] = candidate.title
    if candidate.pair_id is not None:
        record["pair_id"] = candidate.pair_id
    return record


def is_test_set_folder(folder: Path) -> bool:
    """True for an empty folder or one a test-set run wrote: the only folders a run may replace."""
    names = {p.name for p in folder.iterdir()}
    return not names or bool(names & {SUMMARY_NAME, *TEST_FILES.values()})


def write_test_set(plan: TestSetPlan, output_dir: str | os.PathLike,
                   write_summary: Callable[[Path], None]) -> Path:
    """Build the folder beside ``output_dir`` and swap it in whole. ``write_summary(path)`` writes
    the summary (the caller adds its configuration to it)."""
    target = Path(output_dir).absolute()
    if target.exists() and not (target.is_dir() and is_test_set_folder(target)):
        raise TestSetError(f"{target} exists and is not a test set (no {SUMMARY_NAME}): refusing to replace it; "
                           "choose another --output_dir or TEST_DATA_DIR")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.staging")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        for fmt in FORMATS:
            if not plan.selected[fmt]:
                continue
            for candidate in plan.selected[fmt]:
                destination = staging / music_relpath(fmt, candidate.id)
                destination.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(candidate.file, destination)
            write_jsonl(staging / TEST_FILES[fmt], [test_record(c) for c in plan.selected[fmt]])
        write_summary(staging / SUMMARY_NAME)
        swap_in_folder(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def summary_fields(plan: TestSetPlan, seed: int) -> dict[str, Any]:
    """The summary's content besides the configuration."""
    refused = plan.refused_by_reason()
    return {
        "seed": seed,
        "sources": plan.sources,
        "counts": {fmt: {"requested": plan.requested.get(fmt, 0), "offered": plan.offered[fmt],
                         "refused": sum(refused[fmt].values()), "selected": len(plan.selected[fmt])}
                   for fmt in FORMATS},
        "refused_by_reason": refused,
        "refused": plan.refused.rows,
        "training_jsonls": {"read": plan.training.read, "missing": plan.training.missing,
                            "records": plan.training.records,
                            "music_files_not_found": plan.training.files_not_found},
        "warnings": plan.warnings,
        "files": {fmt: TEST_FILES[fmt] for fmt in FORMATS if plan.selected[fmt]},
    }


def read_test_set(test_dir: str | os.PathLike, fmt: str) -> list[dict]:
    """The records of one format's test JSONL; TestSetError saying what to run when it is missing."""
    path = Path(test_dir) / TEST_FILES[fmt]
    if not path.is_file():
        raise TestSetError(f"{path} not found; run: python prepare_test_data.py (it writes TEST_DATA_DIR)")
    return read_jsonl(path)


def record_problem(record: dict, test_dir: str | os.PathLike) -> str | None:
    """What is wrong with one test record's structure and files (None when it is usable): an id,
    filepaths inside the folder that exist and patchify, and at least one non-empty text."""
    pid = record.get("id")
    if not isinstance(pid, str) or not pid:
        return "no id"
    texts = record.get("texts")
    if not isinstance(texts, dict) or not any(isinstance(v, str) and v.strip() for v in texts.values()):
        return f"{pid}: no text"
    files = record.get("filepaths")
    if not isinstance(files, list) or not files or not all(isinstance(f, str) and f for f in files):
        return f"{pid}: no filepaths"
    root = Path(test_dir).resolve()
    for rel in files:
        path = (root / rel).resolve()
        if root not in path.parents:
            return f"{pid}: {rel} lies outside the test folder"
        problem = check_file(path, verify=True)
        if problem is not None:
            return f"{pid}: {rel}: {problem}"
    return None


def music_path(record: dict, test_dir: str | os.PathLike) -> Path:
    return Path(test_dir) / record["filepaths"][0]


def first_text(record: dict) -> str:
    return next(v for v in record["texts"].values() if isinstance(v, str) and v.strip())
