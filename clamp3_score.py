"""Similarity between two folders of raw files (the official raw-file clamp3_score.py).

    python clamp3_score.py QUERY_DIR REFERENCE_DIR [--group] [--skip_unmatched] [--output_dir DIR]
                           [--json FILE] [--no_adapter] [--weights PATH] [--model_config FILE]
                           [--abc_mode MODE] [--cache_dir DIR] [--error_log FILE] [--quiet]
                           [--config FILE] [--KEY=value ...]

Both folders are embedded as ``clamp3_embd.py --get_global`` does (any mix of .txt, .abc,
.xml/.mxl/.musicxml, .mid/.midi, .mtf, MERT .npy and .wav/.mp3/.flac/.ogg audio files; sheet
music through the ABC adapter, MIDI through the MTF adapter, the base with --no_adapter), into
feature folders in the cache, and
``inference/clamp3_score.py`` scores them. Pairwise (default): each query file with the reference
of the same key (folder + name up to the first dot); the mean cosine, and
pairwise_similarities.jsonl. ``--group``: the cosine between the mean query and the mean reference
vector (e.g. how close a folder of generated pieces is to a reference collection).
"""

from __future__ import annotations

import argparse
import sys

import rawfile_tools
import runconfig


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("query_dir", help="folder of query files, searched recursively")
    parser.add_argument("reference_dir", help="folder of reference files")
    parser.add_argument("--group", action="store_true", help="cosine of the mean vectors of the two folders")
    parser.add_argument("--skip_unmatched", action="store_true",
                        help="pairwise: list unmatched keys and leave them out instead of stopping")
    parser.add_argument("--output_dir", default=".", help="where the JSONL outputs go (default: here)")
    parser.add_argument("--json", metavar="FILE", help="also write the numbers as JSON")
    rawfile_tools.add_model_arguments(parser, "clamp3_score")
    return parser


def main(argv: list[str] | None = None) -> int:
    args, cfg = runconfig.parse_args(build_parser(), argv)
    extra = ["--output_dir", args.output_dir]
    extra += ["--group"] if args.group else []
    extra += ["--skip_unmatched"] if args.skip_unmatched else []
    extra += ["--json", args.json] if args.json else []
    return rawfile_tools.run_on_two_folders("clamp3_score", args, cfg, extra)

if __name__ == "__main__":
    sys.exit(main())
