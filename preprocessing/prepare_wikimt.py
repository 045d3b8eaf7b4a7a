#!/usr/bin/env python3
"""WikiMT-X JSONL -> interleaved-ABC lead sheets and per-type text files for evaluation."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fileio import repo_path
from preprocess import wikimt

DESCRIPTION = f"""\
Prepare WikiMT-X for retrieval evaluation. Each lead sheet goes through the same normalisation as
the training data: the round trip ABC -> MusicXML (abc2xml) -> ABC (xml2abc -d 8 -x), then the
training interleaving (preprocess.interleave.interleave_abc). A lead sheet the round trip cannot
convert is interleaved as written ("normalisation": "direct" in its record);
--no_musicxml_roundtrip interleaves every lead sheet as written (the earlier behaviour).

Output (in --output_dir):
  abc/<id>.abc                  interleaved ABC of the lead sheet
  text/<text_type>/<id>.txt     text types: {", ".join(wikimt.TEXT_TYPES)}
  {wikimt.RECORDS_NAME}                  {{"id", "filepaths": ["abc/<id>.abc"],
                                 "normalisation": "{wikimt.ROUNDTRIP}" | "{wikimt.DIRECT}", "title", "artists", "genre",
                                 {", ".join(f'"{t}"' for t in wikimt.TEXT_TYPES)}}}
  {wikimt.FAILURES_NAME}         pieces left out: {{"line", "id", "title", "reason"}}
<id> is the record's "id" if it has one, else its 0-based position in the file ("0000", ...).
Files are written atomically; a failed piece does not stop the others.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="WikiMT-X JSONL file")
    parser.add_argument("--output_dir", help="output folder (default: data/eval/wikimt)")
    parser.add_argument("--strict", action="store_true", help="exit with status 1 if any piece failed")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--no_musicxml_roundtrip", action="store_true",
                        help="interleave the lead sheets as written, without the ABC -> MusicXML -> ABC "
                             "normalisation")
    args = parser.parse_args(argv)

    output_dir = Path(args.output_dir) if args.output_dir else repo_path("data/eval/wikimt")
    try:
        summary = wikimt.prepare(args.input, output_dir, progress=not args.quiet,
                                 roundtrip=not args.no_musicxml_roundtrip)
    except (wikimt.WikiMTError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for line in summary.lines():
        print(line)
    print(f"written to {output_dir}" + (f" (failures listed in {output_dir / wikimt.FAILURES_NAME})"
                                        if summary.failed else ""))
    return 1 if args.strict and summary.failed else 0


if __name__ == "__main__":
    sys.exit(main())
