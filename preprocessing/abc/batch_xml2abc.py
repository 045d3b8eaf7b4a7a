#!/usr/bin/env python3
"""MusicXML (.mxl, .xml, .musicxml) -> standard ABC, byte-identical to the official batch_xml2abc.py."""

from __future__ import annotations

import argparse
import sys

from fileio import with_extension
from preprocess import xml2abc
from preprocess.batch import add_batch_arguments, run_from_args

DESCRIPTION = """\
Convert every .mxl, .xml and .musicxml file under INPUT_DIR (recursively, extensions in any case)
to standard ABC at OUTPUT_DIR/<relative folder>/<name up to the last dot>.abc, with the same bytes
as the official `xml2abc.py -d 8 -x` (VERSION 143). Conversion runs in-process (no interpreter per
file) and works from any working directory. Unlike the official script, it also converts .mxl
archives whose score is a .musicxml member. Files that cannot be converted (invalid XML, not
MusicXML, no notes, broken archives) are listed with a reason in the failure log; the batch goes on.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_batch_arguments(parser, tool="xml2abc")
    args = parser.parse_args(argv)
    return run_from_args(args, xml2abc.convert_file, extensions=xml2abc.XML_EXTENSIONS,
                         output_name=lambda relative: with_extension(relative, ".abc"), name="xml2abc")


if __name__ == "__main__":
    sys.exit(main())
