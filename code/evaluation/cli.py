"""The command lines of ``evaluate_baseline.py``, ``evaluate_lora.py``, ``compare_results.py`` and
``classification/evaluate_cls.py``.

Each parses its arguments here, then imports the module that does the work (``reports``,
``compare``, ``classification``): those load torch and transformers, which ``--help`` and a usage
error need not wait for, so this module imports neither.
"""

from __future__ import annotations

import argparse

import rawfile_tools
import runconfig
from formats import BASELINE, FORMATS, JOINT, LORA, SYSTEMS, check_system_name

DEFAULT_TEMPLATE = "a {label}"
DEFAULT_MARGIN = 0.02  # issue 20: joint adapters may lose at most this much text -> music MRR


def add_evaluation_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weights", help="CLaMP 3 checkpoint (default: CLAMP3_WEIGHTS_PATH)")
    parser.add_argument("--model_config", help="JSON model sizes (default: MODEL_CONFIG or official sizes)")
    parser.add_argument("--output_dir", help="where the report and its companions go (default: RESULTS_DIR)")
    parser.add_argument("--format", choices=[*FORMATS, "both"], default="both",
                        help="which test sets to evaluate (default: %(default)s, i.e. those present)")
    parser.add_argument("--audio_test", help="audio test set JSONL (default: AUDIO_TEST_JSONL; none when empty): "
                        "adds sheet/MIDI <-> audio and text <-> audio rows, through MERT_MODEL_PATH")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")


def evaluation_parser(system: str, description: str) -> argparse.ArgumentParser:
    """The parser of ``evaluate_<system>.py``."""
    if system not in SYSTEMS:
        raise ValueError(f"unknown system {system!r}")
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_evaluation_arguments(parser)
    name = system
    if system == LORA:
        parser.add_argument("--name", default=LORA, type=_system_name,
                            help="the system's name in its files and reports (default: %(default)s), e.g. "
                                 f"{JOINT} for the adapters of a joint run: point --LORA_ABC_ADAPTER_DIR and "
                                 "--LORA_MTF_ADAPTER_DIR at them")
        name = "<name>"
    parser.epilog = (f"Writes evaluation_{name}_report.json, evaluation_{name}_ranks.jsonl, "
                     f"evaluation_{name}_similarities.npz and evaluation_{name}_config.json.")
    return parser


def _system_name(text: str) -> str:
    try:
        if text == BASELINE:
            raise ValueError(f"{BASELINE!r} is the base without adapters (evaluate_baseline.py)")
        return check_system_name(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def comparison_parser() -> argparse.ArgumentParser:
    """The parser of ``compare_results.py``."""
    parser = argparse.ArgumentParser(
        description="Pair two evaluation reports (by default the baseline and LoRA ones): deltas with paired "
                    "intervals and p-values, a text summary and plots.")
    parser.add_argument("--systems", nargs=2, metavar=("REFERENCE", "CANDIDATE"), type=_any_system_name,
                        help="the two systems whose reports under RESULTS_DIR are paired, Δ = CANDIDATE − REFERENCE "
                             f"(default: {BASELINE} {LORA}), e.g. {LORA} {JOINT}: separately against jointly trained "
                             "adapters, with text -> music non-inferiority")
    parser.add_argument("--baseline", help="the reference report (default: RESULTS_DIR/evaluation_REFERENCE_report.json)")
    parser.add_argument("--lora", help="the candidate report (default: RESULTS_DIR/evaluation_CANDIDATE_report.json)")
    parser.add_argument("--margin", type=float, default=DEFAULT_MARGIN,
                        help="non-inferiority margin of text -> music MRR when neither system is the baseline: "
                             "the candidate is non-inferior where the lower bound of Δ's interval is >= -MARGIN "
                             "(default: %(default)s)")
    parser.add_argument("--output_dir", help="where the comparison, summary and plots/ go (default: RESULTS_DIR)")
    parser.add_argument("--no_plots", action="store_true", help="skip the PNG plots")
    parser.epilog = ("Writes evaluation_comparison_report.json, evaluation_summary.txt, "
                     "evaluation_comparison_config.json and plots/*.png for the baseline against LoRA; "
                     "evaluation_comparison_<reference>_vs_<candidate>_report.json, "
                     "evaluation_summary_<reference>_vs_<candidate>.txt, its config and plots_<reference>_vs_<candidate>/ "
                     "for any other pair given with --systems.")
    return parser


def _any_system_name(text: str) -> str:
    try:
        return check_system_name(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def classification_parser() -> argparse.ArgumentParser:
    """The parser of ``classification/evaluate_cls.py``."""
    parser = argparse.ArgumentParser(
        description="Zero-shot and linear-probe classification of held-out pieces, the base model "
        f"({BASELINE}) against the base with its adapters ({LORA}), paired piece by piece.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="A labelled set is a JSONL file of records {\"id\", \"filepaths\": [one file, relative to the "
        "JSONL's folder], \"<label field>\": label}; any file the raw-file tools read will do. Writes the "
        "report JSON and a .txt summary beside it.")
    parser.add_argument("--train", required=True, help="labelled JSONL the linear probe is trained on")
    parser.add_argument("--test", required=True, help="labelled JSONL of the held-out pieces")
    parser.add_argument("--label_field", default="label", help="the record key holding the label (default: label)")
    parser.add_argument("--labels", help="comma-separated labels to keep (default: every label of the test set "
                        "with at least --min_count pieces)")
    parser.add_argument("--min_count", type=int, default=10, help="fewest test pieces a label needs (default: 10)")
    parser.add_argument("--template", default=DEFAULT_TEMPLATE, help="zero-shot prompt (default: %(default)r)")
    parser.add_argument("--systems", default=",".join(SYSTEMS),
                        help=f"{' or '.join(SYSTEMS)} or both, comma-separated (default: both)")
    parser.add_argument("--output", help="report JSON (default: RESULTS_DIR/classification_<test stem>.json)")
    rawfile_tools.add_model_arguments(parser, "classification")
    return parser


def run_evaluation(system: str, argv: list[str] | None, description: str) -> int:
    """The whole of ``evaluate_<system>.py``: 0 on success, 2 on a setup error (printed)."""
    args, cfg = runconfig.parse_args(evaluation_parser(system, description), argv)
    from evaluation import reports  # after parsing: it loads torch and transformers

    return reports.run(getattr(args, "name", system), args, cfg)


def run_comparison(argv: list[str] | None = None) -> int:
    """The whole of ``compare_results.py``: 0 on success, 2 when the reports cannot be paired."""
    args, cfg = runconfig.parse_args(comparison_parser(), argv)
    from evaluation import compare  # after parsing: it loads torch and matplotlib

    return compare.run(args, cfg)


def run_classification(argv: list[str] | None = None) -> int:
    """The whole of ``classification/evaluate_cls.py``: 0 on success, 2 on a setup error (printed)."""
    parser = classification_parser()
    args, cfg = runconfig.parse_args(parser, argv)
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    if not systems or set(systems) - set(SYSTEMS):
        parser.error(f"--systems takes {BASELINE} and/or {LORA}, not {args.systems!r}")
    if args.no_adapter and LORA in systems:
        parser.error(f"--no_adapter and --systems {LORA} contradict each other")
    from evaluation import classification  # after parsing: it loads torch and transformers

    return classification.run(args, cfg, systems)
