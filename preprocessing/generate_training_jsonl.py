#!/usr/bin/env python3
"""PDMX metadata + converted files -> data/training/clamp3_{train,valid}_{abc,mtf}.jsonl."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from fileio import repo_path
from preprocess import training_jsonl

DESCRIPTION = f"""\
Write the CLaMP 3 training files from the PDMX metadata (preprocessing/parse_pdmx_csv.py) and the
converted files under --data_dir:

  piece paths.mxl "mxl/<rel>.mxl"  ->  <data_dir>/abc_interleaved/<rel>.abc  -> clamp3_{{train,valid}}_abc.jsonl
  piece paths.mid "mid/<rel>.mid"  ->  <data_dir>/mtf/<rel>.mtf              -> clamp3_{{train,valid}}_mtf.jsonl

Each line is an official-format record:
  {{"id": "<piece id>", "filepaths": ["../abc_interleaved/0/00/<id>.abc"], "title": "...",
   "artists": [...], "genres": [...], "tags": [...], ...}}
filepaths are relative to the JSONL's own folder; every other key is a text field, except
pair_id: a piece written in both formats has "pair_id": "<piece id>" in its ABC and MTF records
(sheet music and MIDI of one piece, for the trainer's ALIGN_WEIGHT objective). The official loader
would read pair_id as text: --no_pair_ids writes records for the official trainer.

The train/valid split is by piece, from a hash of (--seed, id): a piece is in the same split in
the ABC and MTF files and on every run. A referenced file that does not exist is dropped (unless
--allow_missing); --verify_files also drops empty, non-UTF-8 and unpatchilizable files. Drops are
counted by reason and listed in {training_jsonl.DROPPED_NAME}; counts also go to {training_jsonl.SUMMARY_NAME}.
All outputs are written atomically.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--metadata_dir", help=f"folder with {training_jsonl.METADATA_NAME}, or that file "
                        "(default: data/processed)")
    parser.add_argument("--data_dir", help="data root holding abc_interleaved/ and mtf/ (default: data)")
    parser.add_argument("--output_dir", help="where the JSONL files go (default: data/training)")
    parser.add_argument("--verify_files", action="store_true",
                        help="read every file: non-empty, UTF-8, and encodable by the M3 patchilizer")
    parser.add_argument("--allow_missing", action="store_true",
                        help="keep records whose file does not exist (yet); ignored with --verify_files")
    parser.add_argument("--valid_fraction", type=float, default=0.02,
                        help="share of pieces in the validation files (default: 0.02)")
    parser.add_argument("--exclude_titles", metavar="FILE",
                        help="leave out pieces whose normalised title is listed in FILE: one title a "
                        "line, or a JSONL with a 'title' key (e.g. WikiMT-X)")
    parser.add_argument("--seed", type=int, default=42, help="seed of the split hash (default: 42)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="processes for checking files (default: all cores)")
    parser.add_argument("--no_pair_ids", action="store_true",
                        help="write no pair_id (records for the official trainer, which reads it as text)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    metadata = Path(args.metadata_dir) if args.metadata_dir else repo_path("data/processed")
    data_dir = Path(args.data_dir) if args.data_dir else repo_path("data")
    output_dir = Path(args.output_dir) if args.output_dir else repo_path("data/training")
    if not data_dir.is_dir():
        print(f"error: data directory not found: {data_dir}", file=sys.stderr)
        return 2
    try:
        summary = training_jsonl.generate(
            metadata, data_dir, output_dir, verify_files=args.verify_files,
            valid_fraction=args.valid_fraction, exclude_titles=args.exclude_titles, seed=args.seed,
            allow_missing=args.allow_missing, workers=args.workers, progress=not args.quiet,
            pair_ids=not args.no_pair_ids,
        )
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for line in summary.lines():
        print(line)
    print(f"written to {output_dir}" + (f" (drops listed in {output_dir / training_jsonl.DROPPED_NAME})"
                                        if summary.drops else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
