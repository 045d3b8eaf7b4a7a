#!/usr/bin/env python3
"""ABC (standard or interleaved) -> MusicXML, as the official batch_abc2xml.py writes it."""

from __future__ import annotations

import argparse
import sys

from fileio import with_extension
from preprocess.batch import add_batch_arguments, run_from_args

DESCRIPTION = """\
Convert every .abc file under INPUT_DIR (recursively, extension in any case) to MusicXML at
OUTPUT_DIR/<relative folder>/<name up to the last dot>.xml, as the official script writes it
(`abc2xml.py "<file>"` with its default options): standard and interleaved ABC alike, the first
tune of a file only (as abc2xml's default -m 0 1), blank lines as abc2xml reads them (a blank line
ends a tune), UTF-8 or else Latin-1 text. <encoding-date> holds the day of the conversion, and
<encoder> names abctoolkit's abc2xml (VERSION 238; the official repository vendors VERSION 245,
which writes the same MusicXML on every official fixture). Conversion runs in-process (no
interpreter per file) and works from any working directory; %%abc-include lines are ignored.
Files abc2xml writes nothing for (empty files, syntax errors it cannot recover from) are listed
with a reason in the failure log, and get no output; the batch goes on.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_batch_arguments(parser, tool="abc2xml")
    args = parser.parse_args(argv)

    # abc2xml builds its grammar on import: not needed for --help or a bad command line.
    from preprocess import abc2xml

    return run_from_args(args, abc2xml.convert_file, extensions=abc2xml.ABC_EXTENSIONS,
                         output_name=lambda relative: with_extension(relative, ".xml"), name="abc2xml")


if __name__ == "__main__":
    sys.exit(main())
