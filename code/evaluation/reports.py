"""Evaluate one system (the base checkpoint, or the base with a pair of LoRA adapters) on the held-out test sets.

A system is ``baseline`` (no adapter), or any other name (``lora`` by default, ``joint`` for the
adapters of a joint run: ``evaluate_lora.py --name joint``) for the base with the adapters of
``LORA_{ABC,MTF}_ADAPTER_DIR``.

For every test set (one per format, written by ``prepare_test_data.py``) and every text field, the
system's text and music features are ranked both ways with ``metrics.retrieval_report`` (both tie
rules, bootstrap intervals, the random baseline, caption-level metrics where pieces share a text).
Pieces present in both formats (the same ``pair_id``) are also ranked sheet→MIDI and MIDI→sheet.
With an audio test set (``--audio_test``), recordings of the pieces are ranked against their sheet
music and MIDI and against their texts (``audio_retrieval``: the report's ``audio`` block).

One run writes, under the output folder (``RESULTS_DIR`` by default):

- ``evaluation_<system>_report.json``: every number, with the weights, adapters and settings behind it;
- ``evaluation_<system>_ranks.jsonl``: one row per query and direction, the rank ingredients of
  ``metrics.Ranks`` (so ``compare_results.py`` pairs two systems query by query) plus both ranks;
- ``evaluation_<system>_similarities.npz``: cosines of matched pairs and a sample of unmatched ones;
- ``evaluation_<system>_config.json``: the effective configuration.

The names of these files and the format of the ranks file are ``results``'; the command line is
``cli``'s.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import metrics
import numpy as np
import runconfig
from fileio import atomic_write, atomic_write_text, file_sha256, repo_path, write_jsonl
from formats import BASELINE, FORMATS, check_system_name
from modeling import CLaMP3Model, ModelConfig, load_clamp3, resolve_device
from records import same_text_key

from evaluation import audio_retrieval, testsets
from evaluation.results import (
    AUDIO_CROSS_DIRECTIONS,
    AUDIO_SET,
    AUDIO_TEXT_DIRECTIONS,
    CROSS_DIRECTIONS,
    CROSS_FORMAT_FIELD,
    CROSS_FORMAT_SET,
    HEADLINE_TIE_RULE,
    TEXT_DIRECTIONS,
    companion_names,
    ranks_file_rows,
    similarity_key,
    system_report_path,
)

CAPTION_KEY_RULE = "caption-level: texts equal after collapsing whitespace and case-folding count as one caption"
TRAINER_COMMAND = "python code/train_clamp3_lora.py --format {fmt}"
# From the CLaMP 3 paper (arXiv 2502.10362) as summarised in ../shared/reference (not checked against
# the PDF): CLaMP 3 (C2), WikiMT-X. Quoted for orientation only; their pool and tie rule may differ.
PAPER_CROSS_FORMAT_MRR = {"sheet_to_midi": 0.4547, "midi_to_sheet": 0.5293}
PAPER_TEXT_TO_MUSIC_MRR = {"wikimt": 0.4498, "midicaps": 0.2826}


class EvaluationError(RuntimeError):
    """An evaluation that cannot run as configured (missing test set, adapter, weights...)."""


# ---------------------------------------------------------------------------- test sets
@dataclass
class TestPiece:
    id: str
    path: Path
    texts: dict[str, str]
    pair_id: str | None = None


@dataclass
class TestSet:
    """One ``test_<fmt>.jsonl`` with its pieces, in file order."""

    name: str
    fmt: str
    jsonl: Path
    source: str
    pieces: list[TestPiece] = field(default_factory=list)

    @property
    def ids(self) -> list[str]:
        return [piece.id for piece in self.pieces]

    def fields(self) -> list[str]:
        """Text fields in order of first appearance."""
        return list(dict.fromkeys(name for piece in self.pieces for name in piece.texts))

    def ids_sha256(self) -> str:
        return hashlib.sha256("\n".join(self.ids).encode("utf-8")).hexdigest()


def load_test_set(test_dir: Path, fmt: str) -> TestSet:
    """The records of the ``fmt`` test set (``testsets.read_test_set``): each piece's first file of the
    format and its non-empty texts. Duplicate ids and missing files are errors, not drops: an
    evaluation that silently loses pieces is not the evaluation it says it is."""
    jsonl = test_dir / testsets.TEST_FILES[fmt]
    try:
        records = testsets.read_test_set(test_dir, fmt)
    except testsets.TestSetError as exc:
        raise EvaluationError(str(exc)) from exc
    if not records:
        raise EvaluationError(f"{jsonl} holds no records")
    sources = sorted({str(record.get("source", "")) for record in records} - {""})
    test_set = TestSet(name=fmt, fmt=fmt, jsonl=jsonl, source="+".join(sources) or "unknown")
    seen: set[str] = set()
    for number, record in enumerate(records, 1):
        piece_id = str(record.get("id", ""))
        if not piece_id or piece_id in seen:
            raise EvaluationError(f"{jsonl}:{number}: missing or duplicate id {piece_id!r}")
        seen.add(piece_id)
        files = [p for p in record.get("filepaths", []) if str(p).lower().endswith("." + fmt)]
        if not files:
            raise EvaluationError(f"{jsonl}:{number}: piece {piece_id!r} has no .{fmt} file in filepaths")
        path = test_dir / files[0]
        if not path.is_file():
            raise EvaluationError(f"{jsonl}:{number}: file not found: {path}")
        texts = {name: value.strip() for name, value in (record.get("texts") or {}).items()
                 if isinstance(value, str) and value.strip()}
        pair_id = record.get("pair_id")
        test_set.pieces.append(TestPiece(piece_id, path, texts, None if pair_id is None else str(pair_id)))
    return test_set


def discover_test_sets(test_dir: Path, formats: Iterable[str]) -> list[TestSet]:
    """The test set of each requested format that exists; none at all is an error."""
    present = [fmt for fmt in formats if (test_dir / testsets.TEST_FILES[fmt]).is_file()]
    if not present:
        names = " and/or ".join(testsets.TEST_FILES[fmt] for fmt in formats)
        raise EvaluationError(f"no test set in {test_dir} (expected {names}; write them with "
                              "python prepare_test_data.py, or point --TEST_DATA_DIR at a prepared test set)")
    return [load_test_set(test_dir, fmt) for fmt in present]


# ---------------------------------------------------------------------------- features
@dataclass
class SetFeatures:
    test_set: TestSet
    music: np.ndarray  # (pieces, D)
    texts: dict[str, tuple[np.ndarray, np.ndarray]]  # field -> (piece indices, text features)


def extract_set(extractor: Any, test_set: TestSet, log: Callable[[str], None]) -> SetFeatures:
    """Global features of every piece and of every field's texts (each distinct text embedded once)."""
    log(f"[{test_set.name}] music features of {len(test_set.pieces)} pieces")
    inputs = [extractor.symbolic_input(piece.path.read_text(encoding="utf-8")) for piece in test_set.pieces]
    music = np.concatenate(extractor.extract("symbolic", inputs, get_global=True)).astype(np.float32)
    texts: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name in test_set.fields():
        indices = np.array([i for i, piece in enumerate(test_set.pieces) if name in piece.texts], dtype=np.int64)
        strings = [test_set.pieces[i].texts[name] for i in indices]
        distinct = list(dict.fromkeys(strings))
        log(f"[{test_set.name}] text features of {name!r}: {len(strings)} texts, {len(distinct)} distinct")
        features = extractor.extract("text", [extractor.text_input(s) for s in distinct], get_global=True)
        row_of = {text: row for row, text in enumerate(distinct)}
        matrix = np.concatenate(features).astype(np.float32)
        texts[name] = (indices, matrix[[row_of[s] for s in strings]])
    return SetFeatures(test_set, music, texts)


# ---------------------------------------------------------------------------- ranking
def similarity_sample(a: np.ndarray, b: np.ndarray, max_unmatched: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Cosines of the matched rows (a_i, b_i) and of unmatched pairs (a_i, b_j≠i): all of them when
    there are at most ``max_unmatched``, a seeded uniform sample otherwise."""
    a_unit = a / np.linalg.norm(a, axis=1, keepdims=True)
    b_unit = b / np.linalg.norm(b, axis=1, keepdims=True)
    matched = np.einsum("ij,ij->i", a_unit, b_unit)
    n = len(a_unit)
    if n < 2:
        return matched.astype(np.float32), np.zeros(0, dtype=np.float32)
    if n * (n - 1) <= max_unmatched:
        full = a_unit @ b_unit.T
        unmatched = full[~np.eye(n, dtype=bool)]
    else:
        rng = np.random.default_rng(seed)
        rows = rng.integers(0, n, size=max_unmatched)
        cols = (rows + rng.integers(1, n, size=max_unmatched)) % n  # never the matched column
        unmatched = np.einsum("ij,ij->i", a_unit[rows], b_unit[cols])
    return matched.astype(np.float32), unmatched.astype(np.float32)


@dataclass
class EvaluationOutput:
    report: dict[str, Any]
    ranks_file_rows: list[dict]
    similarities: dict[str, np.ndarray]


def evaluate_features(features: list[SetFeatures], n_resamples: int, seed: int,
                      max_unmatched: int) -> EvaluationOutput:
    """Every retrieval number of one system from its features (no model needed from here on)."""
    rows: list[dict] = []
    similarities: dict[str, np.ndarray] = {}
    sets: dict[str, Any] = {}
    for set_features in features:
        test_set = set_features.test_set
        fields: dict[str, Any] = {}
        for name, (indices, text_matrix) in set_features.texts.items():
            music = set_features.music[indices]
            ids = [test_set.pieces[i].id for i in indices]
            groups = [same_text_key(test_set.pieces[i].texts[name]) for i in indices]
            report = metrics.retrieval_report(text_matrix, music, text_groups=groups, n_resamples=n_resamples,
                                              seed=seed)
            report.pop("settings")  # identical for every field: kept once at the top of the report
            fields[name] = {"n_pairs": len(ids), **report}
            for level, correct in (("pair", {"targets": np.arange(len(ids))}),
                                   ("caption", {"query_groups": groups, "reference_groups": groups})):
                for direction, queries, references in (("text_to_music", text_matrix, music),
                                                       ("music_to_text", music, text_matrix)):
                    ranks = metrics.rank_queries(queries, references, **correct)
                    rows.extend(ranks_file_rows((test_set.name, name, level, direction), ids, ranks))
            matched, unmatched = similarity_sample(text_matrix, music, max_unmatched, seed)
            similarities[similarity_key(test_set.name, name, "matched")] = matched
            similarities[similarity_key(test_set.name, name, "unmatched")] = unmatched
        sets[test_set.name] = {"format": test_set.fmt, "source": test_set.source, "jsonl": str(test_set.jsonl),
                               "jsonl_sha256": file_sha256(test_set.jsonl), "n_pieces": len(test_set.pieces),
                               "ids_sha256": test_set.ids_sha256(), "fields": fields}
    cross = _cross_format(features, n_resamples, seed, max_unmatched, rows, similarities)
    report = {"sets": sets, "cross_format": cross}
    return EvaluationOutput(report, rows, similarities)


def _cross_format(features: list[SetFeatures], n_resamples: int, seed: int, max_unmatched: int,
                  rows: list[dict], similarities: dict[str, np.ndarray]) -> dict[str, Any] | None:
    """Sheet→MIDI and MIDI→sheet over the pieces whose ``pair_id`` is in both sets (the first piece
    of each ``pair_id`` per set), the pool being those paired pieces."""
    by_format = {f.test_set.fmt: f for f in features}
    if not set(FORMATS) <= set(by_format):
        return None
    first_of: dict[str, dict[str, int]] = {}
    for fmt in FORMATS:
        first_of[fmt] = {}
        for i, piece in enumerate(by_format[fmt].test_set.pieces):
            if piece.pair_id is not None:
                first_of[fmt].setdefault(piece.pair_id, i)
    shared = [pair_id for pair_id in first_of["abc"] if pair_id in first_of["mtf"]]
    if not shared:
        return None
    sheet = by_format["abc"].music[[first_of["abc"][p] for p in shared]]
    midi = by_format["mtf"].music[[first_of["mtf"][p] for p in shared]]
    result: dict[str, Any] = {"n_pairs": len(shared), "queries": "pieces with the same pair_id in both sets"}
    for direction, queries, references in (("sheet_to_midi", sheet, midi), ("midi_to_sheet", midi, sheet)):
        ranks = metrics.rank_queries(queries, references, np.arange(len(shared)))
        result[direction] = metrics.summarise(ranks, n_resamples=n_resamples, seed=seed)
        rows.extend(ranks_file_rows((CROSS_FORMAT_SET, CROSS_FORMAT_FIELD, "pair", direction), shared, ranks))
    result["pair_cosines"] = metrics.pair_cosines(sheet, midi)
    result["paper_reference"] = {
        "mrr": PAPER_CROSS_FORMAT_MRR, "model": "CLaMP 3 (C2)", "benchmark": "WikiMT-X",
        "note": "the CLaMP 3 paper's numbers (arXiv 2502.10362, via a secondary summary), not ours; "
                "their pool and tie rule may differ from this test set's"}
    matched, unmatched = similarity_sample(sheet, midi, max_unmatched, seed)
    similarities[similarity_key(CROSS_FORMAT_SET, CROSS_FORMAT_FIELD, "matched")] = matched
    similarities[similarity_key(CROSS_FORMAT_SET, CROSS_FORMAT_FIELD, "unmatched")] = unmatched
    return result


# ---------------------------------------------------------------------------- the run
def adapter_info(cfg: dict[str, Any], fmt: str) -> dict[str, Any]:
    """The adapter folder of ``fmt`` and what selected it; a missing adapter is an EvaluationError."""
    import lora

    folder = lora.adapter_dir(cfg, fmt)
    key = f"LORA_{fmt.upper()}_ADAPTER_DIR"
    if not (folder / "adapter_config.json").is_file():
        raise EvaluationError(
            f"no {fmt.upper()} adapter at {folder} ({key}={cfg[key]!r}): train one with "
            f"`{TRAINER_COMMAND.format(fmt=fmt)}`, or point --{key}=FOLDER at a saved adapter")
    selection_file = folder / "selection.json"
    selection = json.loads(selection_file.read_text(encoding="utf-8")) if selection_file.is_file() else None
    return {"dir": str(folder.resolve()), "config_key": key, "selection": selection,
            "adapter_config": json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))}


def run(system: str, args: argparse.Namespace, cfg: dict[str, Any]) -> int:
    """``evaluate_<system>.py`` once ``cli.run_evaluation`` has parsed its arguments: 0 on success, 2 on a
    setup error (printed). Every system but ``baseline`` reads the adapters."""
    check_system_name(system)

    def log(message: str) -> None:
        if not args.quiet:
            print(message, flush=True)

    try:
        return _run(system, args, cfg, log)
    except EvaluationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _run(system: str, args: argparse.Namespace, cfg: dict[str, Any], log: Callable[[str], None]) -> int:
    from features import FeatureExtractor, check_dtype, load_text_tokenizer

    output_dir = Path(args.output_dir) if args.output_dir else repo_path(cfg["RESULTS_DIR"])
    formats = FORMATS if args.format == "both" else (args.format,)
    # Everything cheap is checked before the checkpoint is read: none of it should wait for 1.8 GB.
    test_sets = discover_test_sets(repo_path(cfg["TEST_DATA_DIR"]), formats)
    for fmt in sorted(set(formats) - {s.fmt for s in test_sets}):
        log(f"no {testsets.TEST_FILES[fmt]} in {repo_path(cfg['TEST_DATA_DIR'])}: the {fmt} set is skipped")
    adapters = {s.fmt: adapter_info(cfg, s.fmt) for s in test_sets} if system != BASELINE else {}
    audio_set = None
    if args.audio_test or cfg["AUDIO_TEST_JSONL"]:
        audio_jsonl = Path(args.audio_test) if args.audio_test else repo_path(cfg["AUDIO_TEST_JSONL"])
        try:
            audio_set = audio_retrieval.load_audio_test_set(audio_jsonl)
        except audio_retrieval.AudioTestSetError as exc:
            raise EvaluationError(str(exc)) from exc
    try:
        check_dtype(cfg["EXTRACT_DTYPE"])
        tokenizer = load_text_tokenizer(cfg["TEXT_MODEL_NAME"])
        model_config = ModelConfig.resolve(cfg, runconfig.model_config_path(args.model_config, cfg))
        device = resolve_device(cfg["EXTRACT_DEVICE"])
        mert = None
        if audio_set is not None:
            from audio.mert_features import MertExtractor

            mert = MertExtractor.load(cfg["MERT_MODEL_PATH"], device=device, dtype=cfg["MERT_DTYPE"],
                                      windows_per_batch=cfg["MERT_WINDOWS_PER_BATCH"])
    except (ValueError, RuntimeError, FileNotFoundError) as exc:
        raise EvaluationError(str(exc)) from exc
    # Absolute, so the report names the checkpoint wherever it is read from.
    weights = Path(args.weights).absolute() if args.weights else repo_path(cfg["CLAMP3_WEIGHTS_PATH"])
    if not weights.is_file():
        raise EvaluationError(f"weights not found: {weights} (download the C2 checkpoint, see README, "
                              "or pass --weights)")

    try:
        base = load_clamp3(model_config, weights, device=device, attn_implementation=cfg["ATTN_IMPLEMENTATION"])
    except (ValueError, RuntimeError) as exc:
        raise EvaluationError(str(exc)) from exc

    def model_for(fmt: str) -> CLaMP3Model:
        if system == BASELINE:
            return base
        import lora

        return lora.with_adapter(base, adapters[fmt]["dir"])

    features = []
    for test_set in test_sets:
        model = model_for(test_set.fmt)
        extractor = FeatureExtractor.from_config(model, cfg, tokenizer=tokenizer, device=device)
        try:
            features.append(extract_set(extractor, test_set, log))
        except (ValueError, RuntimeError) as exc:
            raise EvaluationError(f"[{test_set.name}] feature extraction failed: {exc}") from exc
        del model, extractor
    audio_features = None
    if audio_set is not None:  # the base's audio and text towers: the same for every system
        extractor = FeatureExtractor.from_config(base, cfg, tokenizer=tokenizer, device=device)
        try:
            audio_features = audio_retrieval.extract_audio_set(audio_set, extractor, mert, log)
        except (ValueError, RuntimeError) as exc:
            raise EvaluationError(f"[audio] {exc}") from exc
    log("ranking and bootstrapping")
    output = evaluate_features(features, int(cfg["EVAL_BOOTSTRAP"]), int(cfg["SEED"]),
                               int(cfg["EVAL_SIMILARITY_SAMPLE"]))
    if audio_features is not None:
        symbolic = {f.test_set.fmt: ([piece.pair_id for piece in f.test_set.pieces], f.music) for f in features}
        output.report["audio"] = audio_retrieval.evaluate_audio(
            audio_features, symbolic, int(cfg["EVAL_BOOTSTRAP"]), int(cfg["SEED"]), int(cfg["EVAL_SIMILARITY_SAMPLE"]),
            output.ranks_file_rows, output.similarities, similarity_sample)

    names = companion_names(system)
    weights_info = {"path": str(weights), "sha256": file_sha256(weights)}
    report = {
        "system": system,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "weights": weights_info, "model_config": model_config.to_dict(), "adapters": adapters,
        "test_data_dir": str(repo_path(cfg["TEST_DATA_DIR"])),
        "settings": {"similarity": "cosine, float32", "ks": list(metrics.DEFAULT_KS), "level": 0.95,
                     "n_resamples": int(cfg["EVAL_BOOTSTRAP"]), "seed": int(cfg["SEED"]),
                     "interval": "percentile bootstrap over queries", "tie_rules": metrics.TIE_RULES,
                     "headline_tie_rule": HEADLINE_TIE_RULE, "caption_level": CAPTION_KEY_RULE,
                     "extract_dtype": cfg["EXTRACT_DTYPE"], "device": str(device)},
        **output.report,
        "notes": report_notes(system, output.report),
        "files": names,
    }
    output_dir.mkdir(parents=True, exist_ok=True)
    runconfig.save_config(cfg, output_dir / names["config"],
                          extra={"system": system, "weights": weights_info, "adapters": adapters,
                                 "model_config": model_config.to_dict()})
    write_jsonl(output_dir / names["ranks"], output.ranks_file_rows)
    atomic_write(output_dir / names["similarities"], lambda f: np.savez_compressed(f, **output.similarities),
                 binary=True)
    path = atomic_write_text(system_report_path(output_dir, system), json.dumps(report, indent=2) + "\n")
    for line in headline_lines(report):
        log(line)
    print(f"report: {path}")
    return 0


def report_notes(system: str, report: dict[str, Any]) -> list[str]:
    notes = [
        "Every pool is the test set itself: each query is ranked against all pieces (or texts) of its set "
        "and field; 'random' is the exact metric of a uniformly random ranking of the same pool.",
        f"Metrics are given under two tie rules (settings.tie_rules); the summary leads with "
        f"'{HEADLINE_TIE_RULE}'. Intervals are 95% percentile bootstrap intervals over queries.",
        "caption_level counts every piece sharing the query's text as correct (" + CAPTION_KEY_RULE + ").",
        "Paper numbers (CLaMP 3 C2, text-to-music MRR: WikiMT {wikimt}, MidiCaps {midicaps}) are the paper's, via "
        "a secondary summary, not ours; their pools and text fields may differ.".format(**PAPER_TEXT_TO_MUSIC_MRR),
    ]
    if report.get("cross_format"):
        notes.append("cross_format: the paper reports sheet→MIDI MRR {sheet_to_midi} and MIDI→sheet {midi_to_sheet} "
                     "for CLaMP 3 (C2) on WikiMT-X; those are the paper's numbers, not ours.".format(
                         **PAPER_CROSS_FORMAT_MRR))
    if system != BASELINE:
        notes.append("Each set's music (and text) features come from the base with that format's adapter; the "
                     "adapters touch only the symbolic encoder, so text features equal the baseline's.")
    if report.get("audio"):
        notes.append("audio: recordings through MERT (mert_model) and the base's audio tower, texts through the base's "
                     "text tower, in every system; so text_to_audio/audio_to_text equal the baseline's by "
                     "construction, and only the sheet/MIDI side of the sheet_to_audio, audio_to_sheet, "
                     "midi_to_audio and audio_to_midi rows (pieces with the same pair_id) can move with an adapter.")
    return notes


def headline_lines(report: dict[str, Any]) -> list[str]:
    """One line per set, field and direction: MRR with its interval and the random baseline."""
    rule = HEADLINE_TIE_RULE
    lines = []

    def line(label: str, summary: dict) -> str:
        low, high = summary["ci"][rule]["mrr"] if "ci" in summary else (float("nan"), float("nan"))
        return (f"{label}: MRR {summary[rule]['mrr']:.4f} [{low:.4f}, {high:.4f}] "
                f"(N={summary['n_queries']}, random {summary['random']['mrr']:.4f})")

    for set_name, entry in report["sets"].items():
        for name, field_report in entry["fields"].items():
            for direction in TEXT_DIRECTIONS:
                lines.append(line(f"{set_name}/{name} {direction}", field_report[direction]))
    if report.get("cross_format"):
        for direction in CROSS_DIRECTIONS:
            lines.append(line(f"{CROSS_FORMAT_SET} {direction}", report["cross_format"][direction]))
    audio = report.get("audio") or {}
    for name, field_report in audio.get("fields", {}).items():
        for direction in AUDIO_TEXT_DIRECTIONS:
            lines.append(line(f"{AUDIO_SET}/{name} {direction}", field_report[direction]))
    for fmt, block in audio.get("cross", {}).items():
        for direction in AUDIO_CROSS_DIRECTIONS[fmt]:
            lines.append(line(f"{AUDIO_SET} {direction}", block[direction]))
    return lines
