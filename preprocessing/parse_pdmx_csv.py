#!/usr/bin/env python3
"""PDMX.csv -> data/processed/pdmx_metadata.jsonl (text fields and paths of each piece)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fileio import repo_path
from preprocess import pdmx

DESCRIPTION = f"""\
Read PDMX.csv and write one metadata JSONL for the pieces of a subset.

Output (in --output_dir):
  {pdmx.METADATA_NAME}  one JSON object per kept piece:
      {{"id": "<file stem>", "row": <CSV data row, 0-based>,
        "paths": {{"mxl": "mxl/0/00/<id>.mxl", "mid": "mid/...", "pdf": ..., "metadata": ..., "path": ...}},
        "text": {{"title": str, "song_name": str, "subtitle": str, "artists": [composer, artist],
                 "genres": [...], "tags": [...], "publisher": str}},
        "license": str}}
      paths are relative to --base_dir (the CSV's "./" removed); empty text fields are left out.
  {pdmx.DROPPED_NAME}   one object per row left out: {{"row", "id", "reason", "detail"}}
  {pdmx.SUMMARY_NAME}   counts, subset, and the absolute base_dir and CSV path
All three are written atomically. Rows outside the subset are only counted.

genres/tags may be list strings ("['classical', 'piano']") or PDMX's "classical-piano" form.
A row is dropped when it has no mxl and no mid path, no usable text (NaN, "nan", "NA", "[]", "None"
and empty strings do not count), a path outside the data root, or the same id as an earlier row.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--csv_path", help="PDMX.csv (default: data/PDMX.csv in the repository)")
    parser.add_argument("--output_dir", help="where the metadata goes (default: data/processed)")
    parser.add_argument("--base_dir", help="folder the CSV's ./ paths are relative to "
                        "(default: the CSV's folder)")
    parser.add_argument("--subset", default=pdmx.DEFAULT_SUBSET, choices=pdmx.SUBSETS,
                        help=f"PDMX subset column to keep (default: {pdmx.DEFAULT_SUBSET}, as the PDMX "
                        "authors recommend)")
    parser.add_argument("--check_files", action="store_true",
                        help="also require the mxl/mid files to exist under --base_dir")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    csv_path = Path(args.csv_path) if args.csv_path else repo_path("data/PDMX.csv")
    output_dir = Path(args.output_dir) if args.output_dir else repo_path("data/processed")
    base_dir = Path(args.base_dir) if args.base_dir else csv_path.parent
    try:
        summary = pdmx.run(csv_path, output_dir, base_dir, args.subset, progress=not args.quiet,
                           check_files=args.check_files)
    except (pdmx.PdmxError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    counts, drops = pdmx.report(summary, args.subset, output_dir)
    print(counts)
    if drops:
        print(drops, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
