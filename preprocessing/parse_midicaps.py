#!/usr/bin/env python3
"""MidiCaps captions -> CLaMP 3 JSONL records for the MTF files of the Lakh MIDI pieces."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from fileio import repo_path
from preprocess import midicaps

DESCRIPTION = f"""\
Turn the MidiCaps table (CSV, or the JSONL train.json) into CLaMP 3 records.

Mapping of one row:
  location "lmd_full/1/1a07.mid"  ->  filepaths ["<path of MTF_ROOT/[location minus --strip_prefix]
                                      with .mid replaced by .mtf, relative to --output_dir>"]
  id                              =   location without its suffix
  caption                         ->  "caption" (the main text field, first in the record)
  genre, mood, instrument_summary,
  chord_summary                   ->  lists of strings ("['pop', 'rock']" strings are parsed)
  key, time_signature, tempo_word,
  duration_word                   ->  strings
  tempo, duration, *_prob, all_chords*, instrument_numbers_sorted: not text, left out
  test_set true                   ->  {midicaps.TEST_NAME} (the official test split, for evaluation)
  test_set false or missing       ->  {midicaps.TRAIN_NAME}

MTF_ROOT is the output folder of `batch_midi2mtf.py <lmd folder> MTF_ROOT --m3_compatible`. If you
converted the lmd_full folder itself, pass --strip_prefix lmd_full. Rows without a caption or whose
MTF file is missing (see --allow_missing / --verify_files) are dropped and listed with a reason in
{midicaps.DROPPED_NAME}. All outputs are written atomically.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="MidiCaps .csv or .jsonl/.json file")
    parser.add_argument("--midi_root", "--mtf_root", dest="mtf_root", required=True, metavar="MTF_ROOT",
                        help="root that 'location' is relative to, holding the .mtf conversions")
    parser.add_argument("--output_dir", help="where the JSONL files go (default: data/training)")
    parser.add_argument("--strip_prefix", default="",
                        help="leading folder of 'location' that is not under MTF_ROOT (e.g. lmd_full)")
    parser.add_argument("--verify_files", action="store_true",
                        help="read every MTF file: non-empty, UTF-8, and encodable by the M3 patchilizer")
    parser.add_argument("--allow_missing", action="store_true",
                        help="keep rows whose MTF file does not exist (yet); ignored with --verify_files")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="processes for checking files (default: all cores)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    output_dir = Path(args.output_dir) if args.output_dir else repo_path("data/training")
    try:
        summary = midicaps.convert(
            args.input, args.mtf_root, output_dir, strip_prefix=args.strip_prefix,
            verify_files=args.verify_files, allow_missing=args.allow_missing, workers=args.workers,
            progress=not args.quiet,
        )
    except (midicaps.MidiCapsError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for line in summary.lines():
        print(line)
    print(f"written to {output_dir}" + (f" (drops listed in {output_dir / midicaps.DROPPED_NAME})"
                                        if summary.drops else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
