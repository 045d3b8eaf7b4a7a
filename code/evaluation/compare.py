"""Pair two evaluation reports query by query: deltas, paired intervals, p-values.

The reference and the candidate are the baseline and the LoRA adapters by default, or any two
systems (``--systems lora joint``: the separately against the jointly trained adapters); the JSON
keeps the reference in the ``baseline`` slot and the candidate in the ``lora`` slot whatever they
are, and names them under ``systems`` when they are not those two. Both reports must come from
the same test sets (same ids, same fields, same query counts); the per-query rank ingredients
saved beside each report are read back into ``metrics.Ranks`` (``results.load_system``) and
compared with ``metrics.compare_ranks`` (Δ = candidate − reference). A difference is claimed only
when its paired interval excludes zero and its p-value is below 1 − level; otherwise the verdict
is "no significant difference". When neither system is the baseline, text → music (text → sheet
music, text → MIDI) is also tested for non-inferiority: the candidate is non-inferior on a row
when the lower bound of Δ MRR's interval is at least −margin (``non_inferiority``). The command
line is ``cli``'s.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import metrics
import runconfig
from fileio import atomic_write_text, repo_path
from formats import BASELINE, FORMATS, LORA

from evaluation.audio_retrieval import audio_summary
from evaluation.plots import write_plots
from evaluation.results import (
    AUDIO_CROSS_DIRECTIONS,
    AUDIO_PAIR_FIELD,
    AUDIO_SET,
    AUDIO_TEXT_DIRECTIONS,
    CROSS_DIRECTIONS,
    CROSS_FORMAT_SET,
    HEADLINE_TIE_RULE,
    LEVELS,
    TEXT_DIRECTIONS,
    ComparisonError,
    RankKey,
    SystemResults,
    comparison_names,
    display_name,
    load_system,
    read_histories,
    system_report_path,
)

LOWER_IS_BETTER = {"mean_rank"}
NO_DIFFERENCE = "no significant difference"
SUMMARY_METRICS = ("mrr", "hit@1", "hit@5", "hit@10", "hit@100", "mean_rank")


def check_same_test_sets(baseline: SystemResults, lora: SystemResults) -> list[str]:
    """Raise ComparisonError unless both reports rank the same queries against the same pools;
    return warnings about differences that do not break the pairing."""
    problems = []
    sets_a, sets_b = baseline.report.get("sets", {}), lora.report.get("sets", {})
    if set(sets_a) != set(sets_b):
        problems.append(f"test sets differ: {sorted(sets_a)} against {sorted(sets_b)}")
    for name in sorted(set(sets_a) & set(sets_b)):
        a, b = sets_a[name], sets_b[name]
        if a["n_pieces"] != b["n_pieces"] or a["ids_sha256"] != b["ids_sha256"]:
            problems.append(f"set {name!r}: {a['n_pieces']} pieces (ids {a['ids_sha256'][:12]}) against "
                            f"{b['n_pieces']} pieces (ids {b['ids_sha256'][:12]})")
        fields_a = {f: v["n_pairs"] for f, v in a["fields"].items()}
        fields_b = {f: v["n_pairs"] for f, v in b["fields"].items()}
        if fields_a != fields_b:
            problems.append(f"set {name!r}: fields and their N differ: {fields_a} against {fields_b}")
    audio_a, audio_b = baseline.report.get("audio"), lora.report.get("audio")
    if bool(audio_a) != bool(audio_b):
        problems.append(f"only the {'baseline' if audio_a else 'LoRA'} report has the audio block: run both "
                        "evaluate_baseline.py and evaluate_lora.py with the same --audio_test")
    elif audio_a and (audio_a["ids_sha256"] != audio_b["ids_sha256"] or audio_a["n_pieces"] != audio_b["n_pieces"]):
        problems.append(f"the audio test sets differ: {audio_a['n_pieces']} recordings against {audio_b['n_pieces']}")
    if set(baseline.ranks) != set(lora.ranks):
        problems.append("the per-query rank files hold different set/field/level/direction entries")
    else:
        for key in sorted(baseline.ranks):
            (ids_a, ranks_a), (ids_b, ranks_b) = baseline.ranks[key], lora.ranks[key]
            if ids_a != ids_b or ranks_a.pool_size != ranks_b.pool_size:
                problems.append(f"{'/'.join(key)}: different queries or pool ({len(ids_a)}×{ranks_a.pool_size} "
                                f"against {len(ids_b)}×{ranks_b.pool_size})")
    if problems:
        raise ComparisonError(f"{baseline.path} and {lora.path} were not made on the same test sets, so they "
                              "cannot be paired:\n  " + "\n  ".join(problems[:10]))
    warnings = []
    for name in sorted(sets_a):
        if sets_a[name].get("jsonl_sha256") != sets_b[name].get("jsonl_sha256"):
            warnings.append(f"set {name!r}: same ids, but the test JSONL files differ in content (texts?)")
    weights_a, weights_b = baseline.report.get("weights", {}), lora.report.get("weights", {})
    if weights_a.get("sha256") != weights_b.get("sha256"):
        warnings.append(f"the base weights differ: {weights_a.get('path')} ({str(weights_a.get('sha256'))[:12]}) "
                        f"against {weights_b.get('path')} ({str(weights_b.get('sha256'))[:12]})")
    return warnings


def verdict(metric: str, delta: dict[str, Any], candidate: str = "LoRA") -> str:
    low, high = delta["ci"]
    if low <= 0.0 <= high or delta["p_value"] >= 1 - delta["level"]:
        return NO_DIFFERENCE
    better = delta["mean_diff"] < 0 if metric in LOWER_IS_BETTER else delta["mean_diff"] > 0
    return f"{candidate} better" if better else f"{candidate} worse"


def summary_of(report: dict[str, Any], key: RankKey) -> dict[str, Any]:
    """The ``metrics.summarise`` block of one set/field/level/direction inside a report."""
    set_name, field_name, level, direction = key
    if set_name == CROSS_FORMAT_SET:
        return report["cross_format"][direction]
    if set_name == AUDIO_SET:
        return audio_summary(report, field_name, direction)
    entry = report["sets"][set_name]["fields"][field_name]
    return entry[direction] if level == "pair" else entry["caption_level"][direction]


def compare_entry(baseline: SystemResults, lora: SystemResults, key: RankKey, n_resamples: int,
                  seed: int) -> dict[str, Any]:
    (_, ranks_a), (_, ranks_b) = baseline.ranks[key], lora.ranks[key]
    deltas = metrics.compare_ranks(ranks_b, ranks_a, n_resamples=n_resamples, seed=seed)
    summary_a, summary_b = summary_of(baseline.report, key), summary_of(lora.report, key)
    candidate = display_name(lora.name)
    by_rule: dict[str, Any] = {}
    for rule, by_metric in deltas.items():
        by_rule[rule] = {}
        for metric, delta in by_metric.items():
            by_rule[rule][metric] = {
                "baseline": delta["mean_b"], "baseline_ci": summary_a.get("ci", {}).get(rule, {}).get(metric),
                "lora": delta["mean_a"], "lora_ci": summary_b.get("ci", {}).get(rule, {}).get(metric),
                "delta": delta["mean_diff"], "delta_ci": delta["ci"], "p_value": delta["p_value"],
                "bootstrap_p_value": delta["bootstrap_p_value"], "verdict": verdict(metric, delta, candidate)}
        by_rule[rule]["median_rank"] = {"baseline": summary_a[rule]["median_rank"],
                                        "lora": summary_b[rule]["median_rank"]}
    return {"n_queries": ranks_a.n_queries, "pool_size": ranks_a.pool_size,
            "queries_with_ties": {"baseline": summary_a["queries_with_ties"], "lora": summary_b["queries_with_ties"]},
            "random": summary_a["random"], **by_rule}


def compare_retrieval(baseline: SystemResults, lora: SystemResults, n_resamples: int, seed: int,
                      level: float = 0.95, margin: float | None = None) -> dict[str, Any]:
    """The comparison report (without plots): every entry of both reports, paired (``baseline`` is the
    reference, ``lora`` the candidate, whatever systems they are); with the non-inferiority of text →
    music at ``margin`` (``compare_results.py --margin``) when one is given and neither system is the
    baseline."""
    warnings = check_same_test_sets(baseline, lora)
    results: dict[str, Any] = {}
    for key in ordered_keys(baseline.ranks):
        set_name, field_name, level_name, direction = key
        slot = results.setdefault(set_name, {}).setdefault(field_name, {}).setdefault(level_name, {})
        slot[direction] = compare_entry(baseline, lora, key, n_resamples, seed)
    pair_cosines = {}
    for set_name, entry in baseline.report["sets"].items():
        for field_name, field_report in entry["fields"].items():
            pair_cosines[f"{set_name}/{field_name}"] = {
                "baseline": field_report["pair_cosines"],
                "lora": lora.report["sets"][set_name]["fields"][field_name]["pair_cosines"]}
    sets = {name: {"format": entry["format"], "source": entry["source"], "n_pieces": entry["n_pieces"],
                   "ids_sha256": entry["ids_sha256"],
                   "fields": {f: v["n_pairs"] for f, v in entry["fields"].items()}}
            for name, entry in baseline.report["sets"].items()}
    cross = baseline.report.get("cross_format")
    audio = baseline.report.get("audio")
    reference, candidate = baseline.name, lora.name
    named = {} if (reference, candidate) == (BASELINE, LORA) else {
        "systems": {"reference": reference, "candidate": candidate,
                    "slots": "the reference's numbers are under 'baseline', the candidate's under 'lora'"}}
    comparison = {
        "baseline_report": str(baseline.path), "lora_report": str(lora.path), **named,
        "difference": f"{display_name(candidate)} − {display_name(reference)}, per query, over the same queries and pool",
        "test": {"p_value": metrics.P_VALUE_METHOD, "interval": f"{level:.0%} paired percentile bootstrap over queries",
                 "n_resamples": n_resamples, "seed": seed, "level": level,
                 "claim_rule": "a difference is claimed only when the paired interval excludes 0 and p < 1 − level; "
                               f"otherwise '{NO_DIFFERENCE}'",
                 "multiple_comparisons": "p-values are per comparison, not corrected for the number of comparisons"},
        "tie_rules": metrics.TIE_RULES, "headline_tie_rule": HEADLINE_TIE_RULE,
        "sets": sets, "cross_format_pairs": cross["n_pairs"] if cross else 0,
        "audio": {"jsonl": audio["jsonl"], "n_recordings": audio["n_pieces"], "mert_model": audio["mert_model"],
                  "pairs": {fmt: block["n_pairs"] for fmt, block in audio["cross"].items()}} if audio else None,
        "weights": {"baseline": baseline.report.get("weights"), "lora": lora.report.get("weights")},
        "adapters": lora.report.get("adapters", {}),
        "results": results, "pair_cosines": pair_cosines,
        "paper_reference": cross.get("paper_reference") if cross else None,
        "warnings": warnings,
    }
    if margin is not None and BASELINE not in (reference, candidate):
        comparison["non_inferiority"] = non_inferiority(results, margin, level)
    return comparison


def non_inferiority(results: dict[str, Any], margin: float, level: float = 0.95) -> dict[str, Any]:
    """Text → music (each format's set, every field, pair level) of the candidate against the reference:
    non-inferior where the lower bound of Δ MRR's paired interval (headline tie rule) is ≥ −margin.
    ``all`` holds when every row is; the official tie rule's verdicts are given beside."""
    rows = []
    for set_name in FORMATS:
        for field_name, by_level in results.get(set_name, {}).items():
            entry = by_level.get("pair", {}).get("text_to_music")
            if entry is None:
                continue
            row = {"set": set_name, "field": field_name, "n_queries": entry["n_queries"]}
            for rule in metrics.TIE_RULES:
                mrr = entry[rule]["mrr"]
                row[rule] = {"reference": mrr["baseline"], "candidate": mrr["lora"], "delta": mrr["delta"],
                             "delta_ci": mrr["delta_ci"], "non_inferior": bool(mrr["delta_ci"][0] >= -margin)}
            row["non_inferior"] = row[HEADLINE_TIE_RULE]["non_inferior"]
            rows.append(row)
    return {"margin": margin, "metric": "mrr", "tie_rule": HEADLINE_TIE_RULE, "direction": "text_to_music",
            "rule": f"non-inferior when the lower bound of Δ's {level:.0%} paired interval is ≥ −{margin:g}",
            "rows": rows, "all": bool(rows) and all(row["non_inferior"] for row in rows),
            "n_non_inferior": sum(row["non_inferior"] for row in rows)}


def ordered_keys(ranks: dict[RankKey, Any]) -> list[RankKey]:
    """Sets in report order, levels pair before caption, directions in their natural order."""
    audio_directions = AUDIO_TEXT_DIRECTIONS + tuple(d for pair in AUDIO_CROSS_DIRECTIONS.values() for d in pair)
    direction_order = {d: i for i, d in enumerate(TEXT_DIRECTIONS + CROSS_DIRECTIONS + audio_directions)}
    level_order = {name: i for i, name in enumerate(LEVELS)}
    first_seen = {key: i for i, key in enumerate(ranks)}

    def sort_key(key: RankKey) -> tuple:
        set_name, field_name, level, direction = key
        first_of_field = min(i for k, i in first_seen.items() if k[:2] == key[:2])
        return (set_name == CROSS_FORMAT_SET or set_name == AUDIO_SET, set_name == AUDIO_SET, first_of_field,
                level_order.get(level, 9), direction_order.get(direction, 9))

    return sorted(ranks, key=sort_key)


# ---------------------------------------------------------------------------- the summary
def _interval(ci: list[float] | None, digits: int) -> str:
    return f"[{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]" if ci else ""


def _value(metric: str) -> tuple[str, int]:
    return ("mean rank", 2) if metric == "mean_rank" else (metric.replace("mrr", "MRR").replace("hit", "Hit"), 4)


def _names(comparison: dict[str, Any]) -> tuple[str, str]:
    """How the summary names the reference and the candidate."""
    systems = comparison.get("systems") or {"reference": BASELINE, "candidate": LORA}
    return display_name(systems["reference"]), display_name(systems["candidate"])


def entry_table(title: str, entry: dict[str, Any], rule: str,
                names: tuple[str, str] = (display_name(BASELINE), display_name(LORA))) -> list[str]:
    random_mrr = entry["random"]["mrr"]
    reference, candidate = names
    lines = [f"{title}  (N = {entry['n_queries']} queries, pool {entry['pool_size']}, random MRR {random_mrr:.4f})",
             f"  {'metric':<10} {reference:<26} {candidate:<26} {f'Δ = {candidate} − {reference}':<30} {'p':>6}  verdict"]
    for metric in SUMMARY_METRICS:
        if metric not in entry[rule]:
            continue
        row = entry[rule][metric]
        label, digits = _value(metric)
        baseline_cell = f"{row['baseline']:.{digits}f} {_interval(row['baseline_ci'], digits)}"
        lora_cell = f"{row['lora']:.{digits}f} {_interval(row['lora_ci'], digits)}"
        delta_cell = f"{row['delta']:+.{digits}f} {_interval(row['delta_ci'], digits)}"
        lines.append(f"  {label:<10} {baseline_cell:<26} {lora_cell:<26} {delta_cell:<30} "
                     f"{row['p_value']:>6.3f}  {row['verdict']}")
    other = "official" if rule == "expected" else "expected"
    if "mrr" in entry.get(other, {}):
        row = entry[other]["mrr"]
        lines.append(f"  ({other} tie rule: MRR {row['baseline']:.4f} → {row['lora']:.4f}, Δ {row['delta']:+.4f} "
                     f"{_interval(row['delta_ci'], 4)}, p {row['p_value']:.3f}: {row['verdict']})")
    return lines


def format_summary(comparison: dict[str, Any]) -> str:
    rule = comparison["headline_tie_rule"]
    test = comparison["test"]
    names = _names(comparison)
    reference, candidate = names
    if "systems" in comparison:
        width = max(len(reference), len(candidate)) + len(" report:")
        lines = [f"CLaMP 3 symbolic retrieval on held-out test sets: {candidate} against {reference}", "",
                 f"{reference + ' report:':<{width}} {comparison['baseline_report']}",
                 f"{candidate + ' report:':<{width}} {comparison['lora_report']}"]
    else:
        lines = ["CLaMP 3 symbolic retrieval on held-out test sets: LoRA adapters against the base checkpoint", "",
                 f"baseline report: {comparison['baseline_report']}", f"LoRA report:     {comparison['lora_report']}"]
    for fmt, info in comparison.get("adapters", {}).items():
        selection = info.get("selection") or {}
        chosen = f", selected at epoch {selection['epoch']}" if "epoch" in selection else ""
        owner = f"{candidate} " if "systems" in comparison else ""
        lines.append(f"{owner}{fmt.upper()} adapter:     {info['dir']}{chosen}")
    lines.append("")
    lines.append("Held-out pieces:")
    for name, info in comparison["sets"].items():
        fields = ", ".join(f"{f} N={n}" for f, n in info["fields"].items())
        lines.append(f"  {name} ({info['source']}): {info['n_pieces']} pieces; {fields}")
    if comparison["cross_format_pairs"]:
        lines.append(f"  pieces in both formats (same pair_id): {comparison['cross_format_pairs']}")
    audio = comparison.get("audio")
    if audio:
        pairs = ", ".join(f"{fmt} {n}" for fmt, n in audio["pairs"].items()) or "none"
        lines.append(f"  recordings ({audio['jsonl']}): {audio['n_recordings']}, with a test piece of the same "
                     f"pair_id: {pairs}; MERT model {audio['mert_model']} (text and audio towers are the base's in "
                     "both systems: only the sheet/MIDI side of the audio rows can move)")
    lines += [f"warning: {warning}" for warning in comparison.get("warnings", [])]
    lines += ["", f"Tie rule shown: '{rule}' ({comparison['tie_rules'][rule]}); both rules are in the JSON report.",
              f"Intervals: {test['interval']} ({test['n_resamples']} resamples, seed {test['seed']}).",
              f"p-values: {test['p_value']}; {test['multiple_comparisons']}.",
              f"Claims: {test['claim_rule']}.", ""]
    results = comparison["results"]
    lines.append(f"At a glance ({rule} tie rule, MRR, Δ = {candidate} − {reference} with its paired interval):")
    for set_name, by_field in results.items():
        for field_name, by_level in by_field.items():
            for direction, entry in by_level.get("pair", {}).items():
                row = entry[rule]["mrr"]
                where = _where(set_name, field_name)
                lines.append(f"  {set_name}/{where} {direction.replace('_', ' ')}: {row['baseline']:.4f} → "
                             f"{row['lora']:.4f}, Δ {row['delta']:+.4f} {_interval(row['delta_ci'], 4)}, "
                             f"p {row['p_value']:.3f}, N={entry['n_queries']}: {row['verdict']}")
    lines.append("")
    for set_name, by_field in results.items():
        for field_name, by_level in by_field.items():
            for level, by_direction in by_level.items():
                if level == "caption" and not _caption_level_differs(by_direction, by_level.get("pair", {})):
                    continue
                for direction, entry in by_direction.items():
                    where = _where(set_name, field_name)
                    label = f"[{set_name} / {where}] {direction.replace('_', ' ')}"
                    if level == "caption":
                        label += " (caption level)"
                    lines += entry_table(label, entry, rule, names) + [""]
    lines += non_inferiority_lines(comparison.get("non_inferiority"), names)
    paper = comparison.get("paper_reference")
    if paper:
        lines.append(f"For orientation only: {paper['model']} on {paper['benchmark']} reports sheet→MIDI MRR "
                     f"{paper['mrr']['sheet_to_midi']} and MIDI→sheet {paper['mrr']['midi_to_sheet']} "
                     f"({paper['note']}).")
    if comparison.get("plots"):
        lines += ["", "Plots:"] + [f"  {path}" for path in comparison["plots"]]
    return "\n".join(lines).rstrip() + "\n"


def non_inferiority_lines(block: dict[str, Any] | None, names: tuple[str, str]) -> list[str]:
    """The summary's non-inferiority section: one line per text → music row, then the verdict over all."""
    if not block:
        return []
    reference, candidate = names
    target = {"abc": "sheet music", "mtf": "MIDI"}
    lines = [f"Non-inferiority of {candidate} against {reference}, text → sheet music and text → MIDI "
             f"({block['tie_rule']} tie rule, MRR; {block['rule']}):"]
    for row in block["rows"]:
        headline = row[block["tie_rule"]]
        lines.append(f"  {row['set']}/{row['field']} text → {target.get(row['set'], row['set'])}: "
                     f"{headline['reference']:.4f} → {headline['candidate']:.4f}, Δ {headline['delta']:+.4f} "
                     f"{_interval(headline['delta_ci'], 4)}, N={row['n_queries']}: "
                     f"non-inferior: {'yes' if row['non_inferior'] else 'no'}")
    lines.append(f"  all {len(block['rows'])} rows: non-inferior: {'yes' if block['all'] else 'no'} "
                 f"({block['n_non_inferior']} of {len(block['rows'])} rows are)")
    return [*lines, ""]


def _where(set_name: str, field_name: str) -> str:
    """How a row names what it pairs: a text field, or pieces (sheet/MIDI) and recordings by pair_id."""
    if set_name == CROSS_FORMAT_SET:
        return "pieces"
    if set_name == AUDIO_SET and field_name == AUDIO_PAIR_FIELD:
        return "recordings"
    return field_name


def _caption_level_differs(caption: dict[str, Any], pair: dict[str, Any]) -> bool:
    """Caption-level tables add something only where some pieces share a text (more correct items)."""
    return any(caption[d]["pool_size"] != pair.get(d, {}).get("pool_size") or
               caption[d]["random"]["mrr"] != pair.get(d, {}).get("random", {}).get("mrr") for d in caption)


# ---------------------------------------------------------------------------- the run
def _shown(path: Path) -> str:
    """``path`` relative to the working directory when inside it, so the printed commands can be pasted."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path.resolve())


def run(args: argparse.Namespace, cfg: dict[str, Any]) -> int:
    """``compare_results.py`` once ``cli.run_comparison`` has parsed its arguments: 0 on success, 2 when
    the reports cannot be paired."""
    results_dir = repo_path(cfg["RESULTS_DIR"])
    output_dir = Path(args.output_dir) if args.output_dir else results_dir
    reference, candidate = args.systems or (BASELINE, LORA)
    baseline_file = Path(args.baseline) if args.baseline else system_report_path(results_dir, reference)
    lora_file = Path(args.lora) if args.lora else system_report_path(results_dir, candidate)
    n_resamples, seed = int(cfg["EVAL_BOOTSTRAP"]), int(cfg["SEED"])
    try:
        baseline, lora = load_system(baseline_file), load_system(lora_file)
        comparison = compare_retrieval(baseline, lora, n_resamples, seed, margin=args.margin)
    except ComparisonError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    names = comparison_names(reference, candidate)  # without --systems, the names they always had
    comparison["plots"] = []
    if not args.no_plots:
        histories = read_histories(repo_path(cfg["LORA_LOG_DIR"]))
        comparison["training_histories"] = sorted(histories)
        labels = {BASELINE: display_name(baseline.name), LORA: display_name(lora.name)}
        comparison["plots"] = [str(p) for p in write_plots(comparison, baseline, lora, histories,
                                                           output_dir / names["plots"], labels)]
    runconfig.save_config(cfg, output_dir / names["config"],
                          extra={"baseline_report": str(baseline_file.resolve()), "lora_report": str(lora_file.resolve())})
    report_file = atomic_write_text(output_dir / names["report"], json.dumps(comparison, indent=2) + "\n")
    summary = format_summary(comparison)
    summary_file = atomic_write_text(output_dir / names["summary"], summary)
    for warning in comparison["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"summary: {_shown(summary_file)}\nreport:  {_shown(report_file)}")
    print(f"  cat {_shown(summary_file)}\n  python -m json.tool < {_shown(report_file)}")
    return 0
