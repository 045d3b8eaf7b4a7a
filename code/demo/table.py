"""The README's demo table, regenerated from the comparison report(s), so the README cannot drift.

    python -m demo.table [--joint] [RESULTS_DIR ...]      (default: data/demo/results/)

Each row is one test field and direction from ``evaluation_comparison_report.json`` (the expected
tie rule, MRR): the in-family captions, the held-out family, the held-out language and the content
descriptions (``demo.caption_plan``), for text → sheet music (ABC adapter) and text → MIDI (MTF
adapter), then sheet ↔ MIDI. With several results folders (one per seed, the first is the one whose
numbers are shown), a last column gives the range of Δ over all of them.

``--joint`` (a demo run with ``python -m demo --joint``) gives the table base / separate / joint
instead: sheet → MIDI and MIDI → sheet first, then the same text → sheet music and text → MIDI
rows, with Δ = joint − separate (``evaluation_comparison_lora_vs_joint_report.json``), its interval
and p, text → music non-inferiority (the lower bound of Δ's interval ≥ −margin) and the range of Δ
over the seeds.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from fileio import REPO_ROOT

from demo.caption_plan import field_kind

RULE = "expected"
LANGUAGE_NAMES = {"en": "English", "de": "German", "fr": "French", "es": "Spanish", "it": "Italian", "nl": "Dutch"}
KIND_ORDER = ("in-family", "held-out family", "held-out language", "content", "held-out content")
TARGETS = {("abc", "text_to_music"): "sheet music (ABC adapter)", ("mtf", "text_to_music"): "MIDI (MTF adapter)"}
# compare_results.py --systems lora joint's report (evaluation.results.comparison_names; tested equal)
JOINT_COMPARISON = "evaluation_comparison_lora_vs_joint_report.json"
SEPARATE_COMPARISON = "evaluation_comparison_report.json"


def _language(field_name: str) -> str:
    return LANGUAGE_NAMES.get(field_name.rsplit("_", 1)[-1], field_name)


def rows(comparison: dict[str, Any]) -> list[tuple[tuple[str, ...], str, dict[str, Any], int]]:
    """(key, label, MRR row, N) per reported row, in the table's order."""
    found = []
    results = comparison["results"]
    for (set_name, direction), target in TARGETS.items():
        for field_name, by_level in results.get(set_name, {}).items():
            kind = field_kind(field_name)
            entry = by_level.get("pair", {}).get(direction)
            if entry is None or kind == "other":
                continue
            order = (KIND_ORDER.index(kind) if kind in KIND_ORDER else len(KIND_ORDER), set_name)
            what = "description" if "content" in kind else "caption"
            label = f"{kind}: {_language(field_name)} {what} → {target}"
            found.append((order, (set_name, field_name, direction), label, entry[RULE]["mrr"], entry["n_queries"]))
    for direction, label in (("sheet_to_midi", "sheet → MIDI (ABC adapter → MTF adapter)"),
                             ("midi_to_sheet", "MIDI → sheet")):
        for field_name, by_level in results.get("cross_format", {}).items():
            entry = by_level.get("pair", {}).get(direction)
            if entry is not None:
                found.append(((len(KIND_ORDER) + 1, ""), ("cross_format", field_name, direction), label,
                              entry[RULE]["mrr"], entry["n_queries"]))
    found.sort(key=lambda item: item[0])
    return [(key, label, row, n) for _, key, label, row, n in found]


def _interval(ci: list[float] | None) -> str:
    return f"[{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else ""


def markdown(comparisons: list[dict[str, Any]]) -> str:
    """The table: base, adapter, Δ with its interval and p of the first report, Δ's range over all."""
    first = comparisons[0]
    others = [{key: row for key, _, row, _ in rows(c)} for c in comparisons]
    header = "| query → reference | N | base | adapter | Δ [95% CI] | p |"
    rule = "|---|---|---|---|---|---|"
    if len(comparisons) > 1:
        header += f" Δ over {len(comparisons)} seeds |"
        rule += "---|"
    lines = [header, rule]
    for key, label, row, n in rows(first):
        significant = row["delta_ci"] and (row["delta_ci"][0] > 0 or row["delta_ci"][1] < 0)
        delta = f"{row['delta']:+.3f}"
        line = (f"| {label} | {n} | {row['baseline']:.3f} | {row['lora']:.3f} | "
                f"{f'**{delta}**' if significant else delta} {_interval(row['delta_ci'])} | {row['p_value']:.3f} |")
        if len(comparisons) > 1:
            deltas = [other[key]["delta"] for other in others if key in other]
            line += f" {min(deltas):+.3f} to {max(deltas):+.3f} |" if len(deltas) == len(comparisons) else " – |"
        lines.append(line)
    return "\n".join(lines) + "\n"


def joint_rows(separate: dict[str, Any], joint: dict[str, Any]) -> list[tuple[tuple[str, ...], str, dict[str, Any], int]]:
    """(key, label, row, N) per row of the joint table: sheet ↔ MIDI first, then the text rows, each
    row the base's MRR (``separate``: baseline against LoRA), the separate adapters', the joint
    ones' and Δ = joint − separate with its interval and p (``joint``: LoRA against joint)."""
    base = {key: row for key, _, row, _ in rows(separate)}
    found = []
    for key, label, row, n in rows(joint):
        if key not in base:
            continue
        found.append((0 if key[0] == "cross_format" else 1, key, label,
                      {"base": base[key]["baseline"], "separate": row["baseline"], "joint": row["lora"],
                       "delta": row["delta"], "delta_ci": row["delta_ci"], "p_value": row["p_value"]}, n))
    found.sort(key=lambda item: item[0])  # stable: each group keeps rows()' order
    return [(key, label, row, n) for _, key, label, row, n in found]


def _non_inferior(key: tuple[str, ...], row: dict[str, Any], margin: float) -> bool | None:
    """Text → music rows: whether the lower bound of Δ's interval is ≥ −margin; None for sheet ↔ MIDI."""
    if key[0] == "cross_format" or not row["delta_ci"]:
        return None
    return bool(row["delta_ci"][0] >= -margin)


def joint_markdown(seeds: list[tuple[dict[str, Any], dict[str, Any]]]) -> str:
    """The base / separate / joint table from (baseline-against-LoRA, LoRA-against-joint) comparisons,
    one pair per seed, the first seed's numbers shown."""
    margin = float((seeds[0][1].get("non_inferiority") or {}).get("margin", 0.02))
    per_seed = [{key: row for key, _, row, _ in joint_rows(*pair)} for pair in seeds]
    header = f"| query → reference | N | base | separate | joint | Δ joint − separate [95% CI] | p | non-inferior (Δ ≥ −{margin:g}) |"
    rule = "|---|---|---|---|---|---|---|---|"
    if len(seeds) > 1:
        header += f" Δ over {len(seeds)} seeds |"
        rule += "---|"
    lines = [header, rule]
    for key, label, row, n in joint_rows(*seeds[0]):
        significant = row["delta_ci"] and (row["delta_ci"][0] > 0 or row["delta_ci"][1] < 0)
        delta = f"{row['delta']:+.3f}"
        verdict = _non_inferior(key, row, margin)
        cell = "–" if verdict is None else ("yes" if verdict else "no")
        if verdict is not None and len(seeds) > 1:
            held = sum(bool(_non_inferior(key, other[key], margin)) for other in per_seed if key in other)
            cell += f" ({held} of {len(seeds)} seeds)"
        line = (f"| {label} | {n} | {row['base']:.3f} | {row['separate']:.3f} | {row['joint']:.3f} | "
                f"{f'**{delta}**' if significant else delta} {_interval(row['delta_ci'])} | {row['p_value']:.3f} | "
                f"{cell} |")
        if len(seeds) > 1:
            deltas = [other[key]["delta"] for other in per_seed if key in other]
            line += f" {min(deltas):+.3f} to {max(deltas):+.3f} |" if len(deltas) == len(seeds) else " – |"
        lines.append(line)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo.table", description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="*", default=[str(REPO_ROOT / "data" / "demo" / "results")],
                        help="results folders (one per seed; default: data/demo/results/)")
    parser.add_argument("--joint", action="store_true",
                        help="the base / separate / joint table of demos run with --joint (sheet <-> MIDI, "
                             "text -> sheet music, text -> MIDI; non-inferiority of the joint adapters)")
    args = parser.parse_args(argv)
    names = (SEPARATE_COMPARISON, JOINT_COMPARISON) if args.joint else (SEPARATE_COMPARISON,)
    loaded = []
    for folder in args.results:
        reports = []
        for name in names:
            path = Path(folder) / name
            if not path.is_file():
                hint = "python -m demo --joint" if name == JOINT_COMPARISON else "make demo"
                print(f"error: {path} not found (run {hint} first)", file=sys.stderr)
                return 2
            reports.append(json.loads(path.read_text(encoding="utf-8")))
        loaded.append(reports)
    if args.joint:
        print(joint_markdown([(separate, joint) for separate, joint in loaded]), end="")
    else:
        print(markdown([separate for separate, in loaded]), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
