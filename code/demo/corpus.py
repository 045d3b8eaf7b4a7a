"""The embedded demo's corpus: folk tunes from music21's bundled corpus, converted, captioned and split.

music21's wheel ships ABC collections with header metadata. Each file holds many tunes; a tune is
the text from one ``X:`` line to the next. The collections play fixed roles:

* **base** (the base's training data): the Essen folksongs and O'Neill's Music of Ireland;
* **adapt** (a sub-corpus the base never saw): Ryan's Mammoth Collection and Aird's Airs, as
  interleaved ABC for the ABC adapter and as MIDI rendered by music21 (then MTF) for the MTF adapter;
* **test**: held-out adapt tunes in both formats (one ``pair_id`` per tune), seen by no training step.

Every tune goes through the project's converters: caption sources stripped
(``captions.strip_caption_sources``), then ``normalise_abc`` + ``interleave_abc`` for ABC, or
abc2xml's MusicXML rendered to MIDI by music21 and ``midi_to_mtf``'s byte converter
(``m3_compatible``) for MTF; the results are checked for any caption source left. Conversions run
in the crash-proof batch runner, so one bad tune costs only itself, and outputs are kept under
``work/``: a second build converts nothing it already has.

Layout under ``root``::

    abc/<id>.abc  mtf/<id>.mtf                 training music (interleaved ABC, MTF)
    base_{train,valid}_abc.jsonl               training records: {"id", "filepaths": ["abc/<id>.abc"],
    adapt_{train,valid}_{abc,mtf}.jsonl         "pair_id" where the tune is in both formats' files
                                               of the split, "caption_<lang>" per training language,
                                               and "content_<lang>" where the tune has MIDI}
    test/abc/<id>.abc  test/mtf/<id>.mtf       the test set, in prepare_test_data.py's format
    test/test_abc.jsonl  test/test_mtf.jsonl
    corpus_summary.json  corpus_drops.jsonl    counts, failures with reasons, seconds
    work/                                      the converters' inputs and outputs (the cache)

Splits are by piece, from a seeded hash of the tune id. No two selected pieces share their music
(the notes of the source tune, and the converted file's bytes), and no training tune shares a title
with a test tune, so the test set holds no piece a training step saw under another name.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import math
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fileio import DropLog, atomic_write_bytes, atomic_write_text, file_sha256, with_extension
from formats import FORMATS
from preprocess.abc_normalise import abc_to_musicxml, normalise_abc
from preprocess.batch import run_batch
from preprocess.errors import ConversionError, describe_exception
from preprocess.interleave import interleave_abc, read_abc_text
from preprocess.midi_mtf import M3_SKIPPED_META_TYPES, midi_bytes_to_mtf
from preprocess.training_jsonl import normalise_title
from records import piece_hash

from demo.caption_plan import CaptionPlan
from demo.captions import (
    all_titles,
    caption_source_lines,
    captions_for,
    content_captions_for,
    strip_caption_sources,
    tune_metadata,
)
from demo.content import mtf_facts

# collection -> (folder inside music21/corpus, role)
COLLECTIONS: dict[str, tuple[str, str]] = {
    "essen": ("essenFolksong", "base"),
    "oneills": ("oneills1850", "base"),
    "ryans": ("ryansMammoth", "adapt"),
    "airds": ("airdsAirs", "adapt"),
}
TRAINING_SPLITS = ("base_train", "base_valid", "adapt_train_abc", "adapt_valid_abc",
                   "adapt_train_mtf", "adapt_valid_mtf")
SPLITS = (*TRAINING_SPLITS, "test")
# A hang guard, not a speed limit: a tune takes well under a second, music21 hangs forever on a few
# repeat layouts. A tune that runs into it is retried by the next build (never remembered as bad),
# and the corpus summary lists it, so a slow machine cannot silently change the corpus.
CONVERSION_TIMEOUT_S = 180.0
MAX_UNFOLDED_REPEATS = 8  # the most repeat ends in one adapt tune but one is 6 (that one has 10)


@dataclass(frozen=True)
class CorpusSize:
    """Pieces per split (the test count is per format; every test piece is in both)."""

    base_train: int
    base_valid: int
    adapt_train_abc: int
    adapt_valid_abc: int
    adapt_train_mtf: int
    adapt_valid_mtf: int
    test: int

    @classmethod
    def uniform(cls, pieces: int) -> CorpusSize:
        return cls(*([pieces] * len(SPLITS)))


SIZES = {
    "quick": CorpusSize(base_train=32, base_valid=8, adapt_train_abc=32, adapt_valid_abc=8,
                        adapt_train_mtf=24, adapt_valid_mtf=6, test=24),
    # MIDI rendering is the slow step (music21): the MTF splits are capped below the ABC ones.
    "full": CorpusSize(base_train=1500, base_valid=150, adapt_train_abc=1200, adapt_valid_abc=120,
                       adapt_train_mtf=600, adapt_valid_mtf=60, test=200),
}


@dataclass(frozen=True)
class Tune:
    id: str
    collection: str
    source: str  # "<folder>/<file>#<n>": where in music21's corpus the tune is
    text: str  # the tune as the corpus has it, headers included
    music_key: str  # digest of its notes, to find the same music under another number
    titles: frozenset[str]  # normalised titles, for the title guard


@dataclass
class CorpusSummary:
    root: str
    size: str
    seed: int
    requested: dict[str, int]
    selected: dict[str, int]
    by_collection: dict[str, dict[str, int]]
    collections: dict[str, dict[str, int]]
    conversions: dict[str, dict[str, int]]
    drops_by_reason: dict[str, int]
    seconds: dict[str, float]
    caption_plan: str = ""  # CaptionPlan.fingerprint of the captions written
    drops: DropLog = field(repr=False, default_factory=lambda: DropLog("demo_corpus"))

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("drops")
        data["conversion_failures"] = [row for row in self.drops.rows if "format" in row]
        return data


# ----------------------------------------------------------------------------- reading the corpus


def music21_corpus_dir() -> Path:
    """music21's bundled corpus, found without importing music21 (a slow import)."""
    spec = importlib.util.find_spec("music21")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("music21 is not installed: pip install music21 (its wheel ships the corpus)")
    return Path(next(iter(spec.submodule_search_locations))) / "corpus"


def split_tunes(text: str) -> list[str]:
    """The tunes of a collection file, each from its ``X:`` line to the next one (a preamble before
    the first ``X:`` belongs to no tune)."""
    chunks = re.split(r"(?m)^(?=[ \t]*X:)", text.replace("\r\n", "\n").replace("\r", "\n"))
    return [chunk.strip("\n") + "\n" for chunk in chunks if chunk.lstrip().startswith("X:")]


def music_key(tune_text: str) -> str:
    """Digest of a tune's notes: body lines after ``K:`` without fields, comments, annotations and
    spaces, so a tune printed twice with other headers has one key. Empty for a tune without notes."""
    body, in_body = [], False
    for line in tune_text.splitlines():
        if not in_body:
            in_body = line.startswith("K:")
            continue
        if re.match(r"^\s*([A-Za-z+]:|%)", line):
            continue
        body.append(re.sub(r'"[^"]*"|![^!]*!|%.*$|\s+', "", line))
    notes = "".join(body)
    return hashlib.sha256(notes.encode("utf-8")).hexdigest() if re.search(r"[A-Ga-g]", notes) else ""


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9-]+", "", text) or "tune"


def read_collections(corpus_dir: Path, drops: DropLog) -> tuple[list[Tune], dict[str, dict[str, int]]]:
    """Every tune of the four collections, sorted by id, each piece of music once (a repeat of
    earlier music is dropped, naming the tune it repeats); also the counts per collection."""
    tunes: list[Tune] = []
    counts: dict[str, dict[str, int]] = {}
    for collection, (folder, _) in COLLECTIONS.items():
        count = counts.setdefault(collection, {"tunes": 0, "no_music": 0, "duplicates": 0, "kept": 0})
        for path in sorted((corpus_dir / folder).glob("*.abc")):
            for number, text in enumerate(split_tunes(read_abc_text(path)), 1):
                count["tunes"] += 1
                tune_id = f"{collection}-{_slug(path.stem)}-{number:04d}"
                source = f"{folder}/{path.name}#{number}"
                key = music_key(text)
                if not key:
                    count["no_music"] += 1
                    drops.add("no K: line or no notes", id=tune_id, source=source)
                    continue
                titles = frozenset(t for t in (normalise_title(v) for v in all_titles(text)) if t)
                tunes.append(Tune(tune_id, collection, source, text, key, titles))
    tunes.sort(key=lambda t: t.id)
    first_of: dict[str, str] = {}
    unique = []
    for tune in tunes:
        if tune.music_key in first_of:
            counts[tune.collection]["duplicates"] += 1
            drops.add("same music as an earlier tune", id=tune.id, source=tune.source,
                      duplicate_of=first_of[tune.music_key])
            continue
        first_of[tune.music_key] = tune.id
        counts[tune.collection]["kept"] += 1
        unique.append(tune)
    return unique, counts


# ----------------------------------------------------------------------------- splits


def _margin(requested: int, share: float, extra: int) -> int:
    """Candidates to convert for ``requested`` pieces: a few more, since some tunes fail."""
    return requested + extra + math.ceil(requested * share) if requested else 0


def plan_candidates(tunes: list[Tune], size: CorpusSize, seed: int) -> dict[str, list[Tune]]:
    """Candidates of every split in preference order (more than requested: some fail to convert).

    Test candidates are drawn first from the adapt collections; then every tune sharing a title
    with one is kept out of training, and the training splits are drawn from the rest. A tune is a
    candidate of at most one split, except that the MTF splits take the same tunes as the ABC
    splits of their role (the same tune as sheet music and as a performance, both in training).
    """
    order = sorted(tunes, key=lambda t: piece_hash(seed, t.id))
    adapt = [t for t in order if COLLECTIONS[t.collection][1] == "adapt"]
    base = [t for t in order if COLLECTIONS[t.collection][1] == "base"]
    test = adapt[:_margin(size.test, 0.1, 3)]
    test_ids = {t.id for t in test}
    test_titles = frozenset().union(*(t.titles for t in test))
    adapt_pool = [t for t in adapt if t.id not in test_ids and not t.titles & test_titles]
    base_pool = [t for t in base if not t.titles & test_titles]

    def take(pool: list[Tune], count: int) -> list[Tune]:
        taken, pool[:] = pool[:count], pool[count:]
        return taken

    train_abc, train_mtf = _margin(size.adapt_train_abc, 0.05, 2), _margin(size.adapt_train_mtf, 0.05, 2)
    valid_abc, valid_mtf = _margin(size.adapt_valid_abc, 0.05, 2), _margin(size.adapt_valid_mtf, 0.05, 2)
    adapt_train = take(adapt_pool, max(train_abc, train_mtf))
    adapt_valid = take(adapt_pool, max(valid_abc, valid_mtf))
    return {
        "base_train": take(base_pool, _margin(size.base_train, 0.05, 2)),
        "base_valid": take(base_pool, _margin(size.base_valid, 0.05, 2)),
        "adapt_train_abc": adapt_train[:train_abc], "adapt_valid_abc": adapt_valid[:valid_abc],
        "adapt_train_mtf": adapt_train[:train_mtf], "adapt_valid_mtf": adapt_valid[:valid_mtf],
        "test": test,
    }


# ----------------------------------------------------------------------------- converters


def _leftover_sources(abc_text: str) -> None:
    leftover = caption_source_lines(abc_text)
    if leftover:
        raise ConversionError(f"caption source left in the converted music: {leftover[0][:60]!r}", stage="check")


def tune_to_interleaved_abc(path: Path) -> str:
    """Interleaved ABC of one plain folk tune (caption sources stripped before and after the
    MusicXML round trip, which may bring a title back)."""
    text = strip_caption_sources(read_abc_text(path))
    result = strip_caption_sources(interleave_abc(normalise_abc(text)))
    _leftover_sources(result)
    return result


def _without_repeats(score):
    """``score`` with its repeat barlines, brackets and repeat expressions removed: played once."""
    import music21

    for measure in score.recurse().getElementsByClass(music21.stream.Measure):
        for side in ("leftBarline", "rightBarline"):
            if isinstance(getattr(measure, side), music21.bar.Repeat):
                setattr(measure, side, None)
    for element in list(score.recurse().getElementsByClass(
            (music21.spanner.RepeatBracket, music21.repeat.RepeatExpression))):
        score.remove(element, recurse=True)
    return score


def _midi_of_score(xml: bytes) -> bytes:
    """music21's MIDI rendering of a MusicXML score. Repeats music21 cannot unfold (its expander
    refuses some folk-tune repeat layouts), and scores with more than ``MAX_UNFOLDED_REPEATS``
    repeat ends (where its expander's work explodes: one 713-byte tune of Aird's took 170 s and
    gave 2.2 MB of MIDI text), are played once instead: a bound in work, not in seconds."""
    import music21

    score = music21.converter.parseData(xml.decode("utf-8"), format="musicxml")
    repeat_ends = sum(1 for barline in score.recurse().getElementsByClass(music21.bar.Repeat)
                      if barline.direction == "end")
    if repeat_ends > MAX_UNFOLDED_REPEATS:
        return music21.midi.translate.streamToMidiFile(_without_repeats(score)).writestr()
    try:
        return music21.midi.translate.streamToMidiFile(score).writestr()
    except music21.repeat.ExpanderException:
        score = music21.converter.parseData(xml.decode("utf-8"), format="musicxml")
        return music21.midi.translate.streamToMidiFile(_without_repeats(score)).writestr()


def tune_to_mtf(path: Path) -> str:
    """MTF (``m3_compatible``) of one plain folk tune rendered to MIDI by music21 from abc2xml's
    MusicXML; any text meta event (titles, track names) left in it fails the tune."""
    xml = abc_to_musicxml(strip_caption_sources(read_abc_text(path)))
    try:
        midi = _midi_of_score(xml)
    except (TimeoutError, MemoryError):
        raise  # the batch runner's limits, reported as such
    except Exception as exc:  # noqa: BLE001 - music21 raises anything on odd scores
        raise ConversionError(f"music21 cannot render MIDI: {describe_exception(exc)}", stage="render") from exc
    mtf = midi_bytes_to_mtf(midi, m3_compatible=True)
    if not any(line.startswith("note_on ") for line in mtf.splitlines()):
        raise ConversionError("the MIDI rendering has no notes", stage="render")
    if any(line.split(" ", 1)[0] in M3_SKIPPED_META_TYPES for line in mtf.splitlines()):
        raise ConversionError("a text meta event is left in the MTF", stage="check")
    return mtf


# ----------------------------------------------------------------------------- files


def _write_if_changed(path: Path, data: bytes) -> bool:
    if path.is_file() and path.read_bytes() == data:
        return False
    atomic_write_bytes(path, data)
    return True


def _stage_inputs(folder: Path, tunes: dict[str, Tune], output_dir: Path, suffix: str) -> None:
    """The converter's input folder holds exactly ``tunes`` (stripped); a changed input loses its
    old output, an unchanged one keeps it (the batch runner skips it)."""
    folder.mkdir(parents=True, exist_ok=True)
    for stale in sorted(folder.glob("*.abc")):
        if stale.stem not in tunes:
            stale.unlink()
    for tune_id, tune in sorted(tunes.items()):
        if _write_if_changed(folder / f"{tune_id}.abc", strip_caption_sources(tune.text).encode("utf-8")):
            (output_dir / f"{tune_id}{suffix}").unlink(missing_ok=True)


def _publish(files: dict[str, Path], folder: Path, suffix: str) -> None:
    """``folder`` holds exactly ``files`` (id -> converted file), copied; unchanged files are left."""
    folder.mkdir(parents=True, exist_ok=True)
    for stale in sorted(folder.glob(f"*{suffix}")):
        if stale.stem not in files:
            stale.unlink()
    for tune_id, source in sorted(files.items()):
        _write_if_changed(folder / f"{tune_id}{suffix}", source.read_bytes())


def _jsonl_bytes(rows: list[dict]) -> bytes:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8")


# ----------------------------------------------------------------------------- the build


def _convert(name: str, tunes: dict[str, Tune], work: Path, fmt: str, convert, workers: int,
             progress: bool, drops: DropLog) -> dict[str, int]:
    """Convert what has no output yet. A tune that failed before is not retried while its input is
    unchanged (``work/<fmt>_failures.json`` remembers it; delete that file to retry), except one
    stopped by the hang guard, which the next build tries again."""
    inputs, outputs = work / "tunes" / fmt, work / fmt
    failures_path = work / f"{fmt}_failures.json"
    known = json.loads(failures_path.read_text(encoding="utf-8")) if failures_path.is_file() else {}
    input_digest = {tune_id: hashlib.sha256(strip_caption_sources(t.text).encode("utf-8")).hexdigest()
                    for tune_id, t in tunes.items()}
    remembered = {tune_id for tune_id in tunes
                  if known.get(tune_id, {}).get("input_sha256") == input_digest[tune_id]}
    _stage_inputs(inputs, {i: t for i, t in tunes.items() if i not in remembered}, outputs, f".{fmt}")
    summary = run_batch(inputs, outputs, convert, extensions=(".abc",),
                        output_name=functools.partial(with_extension, extension=f".{fmt}"), name=name,
                        workers=workers, timeout=CONVERSION_TIMEOUT_S, progress=progress)
    failed_now = {}
    for row in summary.failures.rows:
        tune_id = Path(row["file"]).stem
        failed_now[tune_id] = {"input_sha256": input_digest[tune_id], "stage": row.get("stage"), "reason": row["reason"]}
        if not row["reason"].startswith("TimeoutError"):  # a hang guard's verdict depends on the machine
            known[tune_id] = failed_now[tune_id]
    for tune_id in sorted(remembered | set(failed_now)):
        tune, failure = tunes[tune_id], failed_now.get(tune_id) or known[tune_id]
        drops.add(failure["reason"], id=tune_id, format=fmt, stage=failure["stage"],
                  collection=tune.collection, source=tune.source)
    _write_if_changed(failures_path, (json.dumps(dict(sorted(known.items())), indent=1) + "\n").encode("utf-8"))
    return {"converted": summary.converted, "reused": summary.skipped,
            "failed": summary.failed + len(remembered), "failed_before": len(remembered)}


def _select(candidates: dict[str, list[Tune]], size: CorpusSize, work: Path) -> dict[str, list[Tune]]:
    """The first converted candidates of each split, no two sharing converted music; training
    splits choose first, so a test piece never repeats a training file."""
    seen: dict[str, set[str]] = {"abc": set(), "mtf": set()}
    chosen: dict[str, list[Tune]] = {}
    for split in SPLITS:
        formats = FORMATS if split == "test" else ("mtf",) if split.endswith("_mtf") else ("abc",)
        picked: list[Tune] = []
        for tune in candidates[split]:
            if len(picked) == getattr(size, split):
                break
            files = {fmt: work / fmt / f"{tune.id}.{fmt}" for fmt in formats}
            if not all(f.is_file() for f in files.values()):
                continue
            digests = {fmt: file_sha256(f) for fmt, f in files.items()}
            if any(d in seen[fmt] for fmt, d in digests.items()):
                continue
            for fmt, d in digests.items():
                seen[fmt].add(d)
            picked.append(tune)
        chosen[split] = picked
    return chosen


def _content_facts(tune: Tune, work: Path) -> dict[str, Any] | None:
    """What the tune's MIDI rendering sounds like (``demo.content``), None without a rendering."""
    path = work / "mtf" / f"{tune.id}.mtf"
    return mtf_facts(path.read_text(encoding="utf-8")) if path.is_file() else None


def _training_record(tune: Tune, fmt: str, seed: int, plan: CaptionPlan, work: Path,
                     paired: bool = False) -> dict[str, Any]:
    """A training record; ``paired``: the tune is in both formats' files of its split, as sheet
    music and as MIDI, and gets its id as ``pair_id`` (the trainer's ``ALIGN_WEIGHT`` objective)."""
    record = {"id": tune.id, "filepaths": [f"{fmt}/{tune.id}.{fmt}"], **({"pair_id": tune.id} if paired else {}),
              **captions_for(tune_metadata(tune.text, tune.collection), f"{seed}:{tune.id}", plan.training_fields())}
    facts = _content_facts(tune, work) if fmt == "mtf" else None
    if facts:
        record.update(content_captions_for(facts, f"{seed}:{tune.id}", plan.content_training_fields()))
    return record


def _test_records(tune: Tune, seed: int, plan: CaptionPlan, work: Path) -> dict[str, dict[str, Any]]:
    """A test tune's record per format, with the same texts: the in-family fields and every held-out
    one; the content descriptions come from the tune's MIDI rendering, for its sheet music too."""
    meta = tune_metadata(tune.text, tune.collection)
    texts = captions_for(meta, f"{seed}:{tune.id}", plan.test_fields())
    facts = _content_facts(tune, work)
    if facts:
        texts.update(content_captions_for(facts, f"{seed}:{tune.id}", plan.content_test_fields()))
    records = {}
    for fmt in FORMATS:
        record: dict[str, Any] = {"id": tune.id, "filepaths": [f"{fmt}/{tune.id}.{fmt}"], "source": "demo",
                                  "texts": texts}
        if "title" in meta:
            record["title"] = meta["title"]
        record["pair_id"] = tune.id
        records[fmt] = record
    return records


def corpus_is_current(root: str | Path, plan: CaptionPlan | None = None) -> bool:
    """Whether the corpus under ``root`` was built and its captions written with ``plan`` (default:
    ``configs/demo_captions.json``) by this caption generator."""
    path = Path(root) / "corpus_summary.json"
    if not path.is_file():
        return False
    try:
        built = json.loads(path.read_text(encoding="utf-8")).get("caption_plan")
    except (OSError, ValueError):
        return False
    return built == (plan or CaptionPlan.load()).fingerprint()


def build_corpus(root: str | Path, size: str | CorpusSize = "quick", seed: int = 42, workers: int = 2,
                 progress: bool = True, corpus_dir: str | Path | None = None,
                 plan: CaptionPlan | None = None) -> CorpusSummary:
    """Build (or bring up to date) the demo corpus under ``root``; see the module docstring.

    ``size`` is ``"quick"`` (a few dozen pieces per split, for CI), ``"full"`` (the demo) or a
    ``CorpusSize``. Only what is missing is converted; files and JSONLs whose content would not
    change are left untouched. ``plan``: which caption fields training and test records get
    (default: ``configs/demo_captions.json``).
    """
    plan = plan or CaptionPlan.load()
    started = time.perf_counter()
    root = Path(root)
    size_name = size if isinstance(size, str) else "custom"
    sizes = SIZES[size] if isinstance(size, str) else size
    work = root / "work"
    drops = DropLog("demo_corpus")
    say = (lambda message: print(f"[demo corpus] {message}", file=sys.stderr)) if progress else (lambda _: None)

    tunes, collection_counts = read_collections(Path(corpus_dir) if corpus_dir else music21_corpus_dir(), drops)
    candidates = plan_candidates(tunes, sizes, seed)
    read_s = time.perf_counter() - started
    say(f"{len(tunes)} distinct tunes read in {read_s:.1f} s")

    abc_tunes = {t.id: t for split in SPLITS if not split.endswith("_mtf") for t in candidates[split]}
    mtf_tunes = {t.id: t for split in ("adapt_train_mtf", "adapt_valid_mtf", "test") for t in candidates[split]}
    mark = time.perf_counter()
    conversions = {"abc": _convert("demo_abc", abc_tunes, work, "abc", tune_to_interleaved_abc, workers,
                                   progress, drops)}
    abc_s = time.perf_counter() - mark
    mark = time.perf_counter()
    conversions["mtf"] = _convert("demo_mtf", mtf_tunes, work, "mtf", tune_to_mtf, workers, progress, drops)
    mtf_s = time.perf_counter() - mark

    chosen = _select(candidates, sizes, work)
    training_abc = {t.id: work / "abc" / f"{t.id}.abc" for s in TRAINING_SPLITS if not s.endswith("_mtf")
                    for t in chosen[s]}
    training_mtf = {t.id: work / "mtf" / f"{t.id}.mtf" for s in ("adapt_train_mtf", "adapt_valid_mtf")
                    for t in chosen[s]}
    _publish(training_abc, root / "abc", ".abc")
    _publish(training_mtf, root / "mtf", ".mtf")
    test_records = [_test_records(t, seed, plan, work) for t in chosen["test"]]
    for fmt in FORMATS:
        _publish({t.id: work / fmt / f"{t.id}.{fmt}" for t in chosen["test"]}, root / "test" / fmt, f".{fmt}")
        _write_if_changed(root / "test" / f"test_{fmt}.jsonl", _jsonl_bytes([records[fmt] for records in test_records]))
    # A tune in both formats' files of one split (adapt train, adapt valid) is one pair.
    paired: set[str] = set()
    for stage in ("train", "valid"):
        paired |= {t.id for t in chosen[f"adapt_{stage}_abc"]} & {t.id for t in chosen[f"adapt_{stage}_mtf"]}
    for split in TRAINING_SPLITS:
        fmt = "mtf" if split.endswith("_mtf") else "abc"
        name = f"{split}_abc" if split.startswith("base") else split
        _write_if_changed(root / f"{name}.jsonl", _jsonl_bytes(
            [_training_record(t, fmt, seed, plan, work, t.id in paired) for t in chosen[split]]))

    for split in SPLITS:
        if len(chosen[split]) < getattr(sizes, split):
            say(f"{split}: only {len(chosen[split])} of {getattr(sizes, split)} pieces converted")
    summary = CorpusSummary(
        root=str(root), size=size_name, seed=seed, requested=asdict(sizes),
        selected={split: len(chosen[split]) for split in SPLITS},
        by_collection={split: {c: sum(t.collection == c for t in chosen[split]) for c in COLLECTIONS}
                       for split in SPLITS},
        collections=collection_counts, conversions=conversions, drops_by_reason=dict(sorted(drops.counts.items())),
        seconds={"read": round(read_s, 2), "abc": round(abc_s, 2), "mtf": round(mtf_s, 2),
                 "total": round(time.perf_counter() - started, 2)},
        caption_plan=plan.fingerprint(), drops=drops)
    drops.write(root / "corpus_drops.jsonl")
    atomic_write_text(root / "corpus_summary.json", json.dumps(summary.as_dict(), indent=2, ensure_ascii=False) + "\n")
    say(f"{summary.selected} in {summary.seconds['total']:.1f} s; {drops.summary_line()}")
    return summary
