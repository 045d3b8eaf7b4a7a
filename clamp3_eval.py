"""Retrieval metrics between two folders of raw files (the official raw-file clamp3_eval.py).

    python clamp3_eval.py QUERY_DIR REFERENCE_DIR [--output_dir DIR] [--json FILE] [--n_resamples B]
                          [--seed S] [--no_adapter] [--weights PATH] [--model_config FILE]
                          [--abc_mode MODE] [--cache_dir DIR] [--error_log FILE] [--quiet]
                          [--config FILE] [--KEY=value ...]

Both folders are embedded as ``clamp3_embd.py --get_global`` does (any mix of .txt, .abc,
.xml/.mxl/.musicxml, .mid/.midi, .mtf, MERT .npy and .wav/.mp3/.flac/.ogg audio files; sheet
music through the ABC adapter, MIDI through the MTF adapter, the base with --no_adapter), into
feature folders in the cache, and
``inference/clamp3_eval.py`` ranks them: a query's correct reference is the file with the same key
(folder + name up to the first dot), e.g. ``tune1.txt`` -> ``tune1.abc``. It prints MRR, Hit@1,
Hit@10 and Hit@100 and writes retrieval_ranks.jsonl (unmatched_files.jsonl and exit status 1 when
a key has no match, which a file that failed to convert causes: it is named above the metrics).
"""

from __future__ import annotations

import argparse
import sys

import rawfile_tools
import runconfig


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("query_dir", help="folder of query files (e.g. captions .txt), searched recursively")
    parser.add_argument("reference_dir", help="folder of reference files (e.g. scores or MIDI)")
    parser.add_argument("--output_dir", default=".", help="where retrieval_ranks.jsonl goes (default: here)")
    parser.add_argument("--json", metavar="FILE", help="also write a JSON report (both directions, intervals)")
    parser.add_argument("--n_resamples", type=int, default=1000, help="bootstrap resamples for --json")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed for --json")
    rawfile_tools.add_model_arguments(parser, "clamp3_eval")
    return parser


def main(argv: list[str] | None = None) -> int:
    args, cfg = runconfig.parse_args(build_parser(), argv)
    extra = ["--output_dir", args.output_dir, "--n_resamples", str(args.n_resamples), "--seed", str(args.seed)]
    extra += ["--json", args.json] if args.json else []
    return rawfile_tools.run_on_two_folders("clamp3_eval", args, cfg, extra)

if __name__ == "__main__":
    sys.exit(main())
