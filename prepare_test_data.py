"""Build the held-out test sets: ABC + texts from WikiMT-X, MTF + captions from MidiCaps' test split.

    python prepare_test_data.py [--num_abc 100] [--num_mtf 100] [--wikimt_dir DIR] [--midicaps_test FILE]
                                [--training_jsonl FILE ...] [--output_dir DIR] [--config FILE] [--KEY=value ...]

Pieces are taken in a seeded hash order of their ids (SEED). A piece whose id, music bytes or
normalised title also appears in a training JSONL (LORA_{ABC,MTF}_{TRAIN,VALID}_JSONL and every
--training_jsonl) is refused, and the refusals are counted by reason. The folder (TEST_DATA_DIR,
format in code/evaluation/testsets.py) is replaced whole on every run; test_data_summary.json in it
holds the counts, the refusals and the effective configuration.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import runconfig
from evaluation import testsets
from fileio import repo_path

DEFAULT_WIKIMT_DIR = "data/eval/wikimt"
DEFAULT_MIDICAPS_TEST = "data/training/midicaps_test_mtf.jsonl"
DEFAULT_DEMO_DIR = "data/demo/corpus/test"  # written by python -m demo
TRAINING_KEYS = ("LORA_ABC_TRAIN_JSONL", "LORA_ABC_VALID_JSONL", "LORA_MTF_TRAIN_JSONL", "LORA_MTF_VALID_JSONL")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_abc", type=int, default=100, help="ABC pieces to select (default: %(default)s)")
    parser.add_argument("--num_mtf", type=int, default=100, help="MTF pieces to select (default: %(default)s)")
    parser.add_argument("--wikimt_dir", help=f"output of preprocessing/prepare_wikimt.py (default: {DEFAULT_WIKIMT_DIR})")
    parser.add_argument("--midicaps_test", help=f"MidiCaps test JSONL (default: {DEFAULT_MIDICAPS_TEST})")
    parser.add_argument("--demo_dir", help="take both formats from the demo corpus's held-out pieces instead "
                                           "(a folder in the test-set format, written by python -m demo; used by "
                                           f"default, from {DEFAULT_DEMO_DIR}, when no other source exists)")
    parser.add_argument("--training_jsonl", action="append", default=[], metavar="FILE",
                        help="another training JSONL to guard against (repeatable), besides " + ", ".join(TRAINING_KEYS))
    parser.add_argument("--output_dir", help="where the test set goes (default: TEST_DATA_DIR)")
    return parser


def typed_or_default(typed: str | None, default: str) -> Path:
    """The path rule: typed paths against the working directory, defaults against the repository."""
    return Path(typed).absolute() if typed else repo_path(default)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, cfg = runconfig.parse_args(parser, argv)
    if args.num_abc < 0 or args.num_mtf < 0:
        parser.error("--num_abc and --num_mtf must be >= 0")
    wikimt_dir = typed_or_default(args.wikimt_dir, DEFAULT_WIKIMT_DIR)
    midicaps_test = typed_or_default(args.midicaps_test, DEFAULT_MIDICAPS_TEST)
    output_dir = Path(args.output_dir).absolute() if args.output_dir else repo_path(cfg["TEST_DATA_DIR"])
    training = [repo_path(cfg[key]) for key in TRAINING_KEYS if cfg[key]]
    training += [Path(p).absolute() for p in args.training_jsonl]
    demo_dir = Path(args.demo_dir).absolute() if args.demo_dir else None
    given = args.wikimt_dir or args.midicaps_test
    if demo_dir is None and not given and not wikimt_dir.exists() and not midicaps_test.exists() \
            and repo_path(DEFAULT_DEMO_DIR).is_dir():
        demo_dir = repo_path(DEFAULT_DEMO_DIR)  # no real source here: the demo corpus's held-out pieces
        print(f"no WikiMT-X or MidiCaps output found; using the demo corpus's held-out pieces ({demo_dir})")
    sources = testsets.demo_sources(demo_dir) if demo_dir else testsets.default_sources(wikimt_dir, midicaps_test)
    seed = cfg["SEED"]

    try:
        plan = testsets.plan_test_set(sources, {"abc": args.num_abc, "mtf": args.num_mtf}, training, seed)
    except (testsets.TestSetError, ValueError) as exc:  # ValueError: a JSONL line that is not a record
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for warning in plan.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    extra = {**testsets.summary_fields(plan, seed), "output_dir": str(output_dir),
             "arguments": {**vars(args), "wikimt_dir": str(wikimt_dir), "midicaps_test": str(midicaps_test),
                           "training_jsonls": [str(p) for p in training]}}
    try:
        testsets.write_test_set(plan, output_dir, lambda path: runconfig.save_config(cfg, path, extra=extra))
    except testsets.TestSetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print("\n".join(plan.lines()))
    print(f"test set written to {output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
