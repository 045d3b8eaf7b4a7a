"""One system's evaluation results as files: their names, the keys inside them, and reading them back.

``evaluate_<system>.py`` (``reports``) writes, under its output folder:

- ``evaluation_<system>_report.json`` (``system_report_path``), whose ``files`` names its companions
  relative to its folder (``companion_names``), so the folder can move;
- the ranks file, ``evaluation_<system>_ranks.jsonl``: one row per query of each set, field, level
  and direction (``ranks_file_rows``), holding that key (a ``RankKey``: ``set``, ``field``,
  ``level``, ``direction``), the ``query`` id, the ``metrics.Ranks`` ingredients (``greater``,
  ``tied_others``, ``tied_correct``, ``n_correct``, ``pool_size``) and the ranks derived from them
  (``official_rank``, ``expected_rank``, ``reciprocal_expected_rank``);
- ``evaluation_<system>_similarities.npz``: matched and unmatched cosines under ``similarity_key``.

``compare_results.py`` reads a report back with its ranks and similarities (``load_system``: a
``SystemResults``) and the trainer's per-epoch histories from the run folder (``read_histories``).
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import metrics
import numpy as np
from fileio import read_jsonl
from formats import BASELINE, FORMATS, LORA
from training.run_folder import run_file

# What the keys of a report, its ranks file and its similarity samples are made of.
CROSS_FORMAT_SET = "cross_format"
CROSS_FORMAT_FIELD = "pair_id"
LEVELS = ("pair", "caption")
TEXT_DIRECTIONS = ("text_to_music", "music_to_text")
CROSS_DIRECTIONS = ("sheet_to_midi", "midi_to_sheet")
# The optional audio block (an audio test set given): its set name in the ranks file, the field of its
# score <-> recording rows, and the directions, per symbolic format for the cross-modal ones.
AUDIO_SET = "audio"
AUDIO_PAIR_FIELD = "pair_id"
AUDIO_TEXT_DIRECTIONS = ("text_to_audio", "audio_to_text")
AUDIO_CROSS_DIRECTIONS = {"abc": ("sheet_to_audio", "audio_to_sheet"), "mtf": ("midi_to_audio", "audio_to_midi")}
# The tie rule the summary leads with: the official rule counts every tie in the correct item's
# favour, which flatters a model that maps many pieces to one point; both are in every report.
HEADLINE_TIE_RULE = "expected"

RankKey = tuple[str, str, str, str]  # (set, field, level, direction)
RANK_KEY_FIELDS = ("set", "field", "level", "direction")
RANK_COLUMNS = ("greater", "tied_others", "tied_correct", "n_correct")  # per query; pool_size per key


class ComparisonError(ValueError):
    """Two reports that cannot be paired (different test sets, missing companions)."""


DISPLAY_NAMES = {BASELINE: "baseline", LORA: "LoRA"}


def display_name(system: str) -> str:
    """How summaries and plots name a system: ``LoRA`` for ``lora``, any other name as it is."""
    return DISPLAY_NAMES.get(system, system)


def system_report_path(output_dir: Path, system: str) -> Path:
    return output_dir / f"evaluation_{system}_report.json"


def comparison_names(reference: str, candidate: str) -> dict[str, str]:
    """The files ``compare_results.py`` writes for Δ = candidate − reference, relative to its output
    folder: the baseline against the LoRA adapters keep the names they always had
    (``evaluation_comparison_report.json``, ``evaluation_summary.txt``, ``plots/``); any other pair
    has its names in them (``evaluation_comparison_lora_vs_joint_report.json``...)."""
    if (reference, candidate) == (BASELINE, LORA):
        return {"report": "evaluation_comparison_report.json", "summary": "evaluation_summary.txt",
                "config": "evaluation_comparison_config.json", "plots": "plots"}
    pair = f"{reference}_vs_{candidate}"
    return {"report": f"evaluation_comparison_{pair}_report.json", "summary": f"evaluation_summary_{pair}.txt",
            "config": f"evaluation_comparison_{pair}_config.json", "plots": f"plots_{pair}"}


def companion_names(system: str) -> dict[str, str]:
    """File names written beside a report, relative to its folder (so the folder can move)."""
    return {"ranks": f"evaluation_{system}_ranks.jsonl", "similarities": f"evaluation_{system}_similarities.npz",
            "config": f"evaluation_{system}_config.json"}


def similarity_key(set_name: str, field_name: str, kind: str) -> str:
    """The key of one set's and field's ``matched`` or ``unmatched`` cosines in the similarities file."""
    return f"{set_name}__{field_name}__{kind}"


# ---------------------------------------------------------------------------- the ranks file
def ranks_file_rows(key: RankKey, query_ids: Sequence[str], ranks: metrics.Ranks) -> list[dict]:
    """The rows of the ranks file for one key: per query, the ``metrics.Ranks`` ingredients and the
    ranks derived from them."""
    key_fields = dict(zip(RANK_KEY_FIELDS, key, strict=True))
    official, expected, reciprocal = ranks.official, ranks.expected, ranks.reciprocal_expected
    return [{**key_fields, "query": query_id,
             **{name: int(getattr(ranks, name)[i]) for name in RANK_COLUMNS},
             "pool_size": ranks.pool_size, "official_rank": int(official[i]),
             "expected_rank": float(expected[i]), "reciprocal_expected_rank": float(reciprocal[i])}
            for i, query_id in enumerate(query_ids)]


def read_ranks_file(ranks_file: Path) -> dict[RankKey, tuple[list[str], metrics.Ranks]]:
    """The ranks file back as query ids and ``metrics.Ranks`` per key, keys in the order they first appear."""
    grouped: dict[RankKey, list[dict]] = defaultdict(list)
    for row in read_jsonl(ranks_file):
        grouped[tuple(row[name] for name in RANK_KEY_FIELDS)].append(row)
    ranks = {}
    for key, rows in grouped.items():
        pool_sizes = {row["pool_size"] for row in rows}
        if len(pool_sizes) != 1:
            raise ComparisonError(f"{ranks_file}: {key} mixes pool sizes {sorted(pool_sizes)}")
        columns = {name: np.array([row[name] for row in rows], dtype=np.int64) for name in RANK_COLUMNS}
        ranks[key] = ([str(row["query"]) for row in rows], metrics.Ranks(**columns, pool_size=pool_sizes.pop()))
    return ranks


# ---------------------------------------------------------------------------- one system, read back
@dataclass
class SystemResults:
    """A report with its per-query ranks (by key: query ids and Ranks) and similarity samples."""

    path: Path
    report: dict[str, Any]
    ranks: dict[RankKey, tuple[list[str], metrics.Ranks]]
    similarities: dict[str, np.ndarray]

    @property
    def name(self) -> str:
        return str(self.report.get("system", self.path.stem))


def load_system(report_file: Path) -> SystemResults:
    if not report_file.is_file():
        raise ComparisonError(f"report not found: {report_file} (run evaluate_baseline.py / evaluate_lora.py)")
    report = json.loads(report_file.read_text(encoding="utf-8"))
    files = report.get("files") or {}
    ranks_file = report_file.parent / files.get("ranks", "")
    if not files.get("ranks") or not ranks_file.is_file():
        raise ComparisonError(f"the per-query ranks of {report_file} are missing (expected {ranks_file})")
    ranks = read_ranks_file(ranks_file)
    similarities: dict[str, np.ndarray] = {}
    similarity_file = report_file.parent / files.get("similarities", "")
    if files.get("similarities") and similarity_file.is_file():
        with np.load(similarity_file, allow_pickle=False) as data:
            similarities = {key: data[key] for key in data.files}
    return SystemResults(report_file, report, ranks, similarities)


def read_histories(log_dir: Path) -> dict[str, list[dict[str, Any]]]:
    """The trainer's per-format history files (``training.run_folder.run_file``) in ``log_dir``,
    where present and readable."""
    histories = {}
    for fmt in FORMATS:
        path = run_file(log_dir, fmt, "history")
        if path.is_file():
            try:
                entries = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError:
                continue  # a history caught mid-write by a running trainer: no curve rather than no report
            if isinstance(entries, list):
                histories[fmt] = entries
    return histories
