#!/usr/bin/env python3
"""Standard ABC -> interleaved ABC, byte-identical to the official batch_interleaved_abc.py."""

from __future__ import annotations

import argparse
import functools
import sys

from preprocess import abc_normalise, interleave
from preprocess.batch import add_batch_arguments, run_from_args

DESCRIPTION = """\
Convert every .abc file under INPUT_DIR (recursively, extension in any case; one tune per file) to
interleaved ABC at OUTPUT_DIR/<same relative path and name>. Output is byte-identical to the
official script wherever that converts a file. Files it skips are converted too when possible:
tunes without a `V:1` line (plain folk ABC, lead sheets), inline [V:n] voice bodies, and chords with
durations inside brackets such as [B2g2]. Tunes that cannot be interleaved (voices with different
bar counts, no notes, several tunes in one file) are listed with a reason in the failure log.
Files that are not valid UTF-8 are read as Latin-1 unless --strict_utf8 is given.

--normalise (for plain folk ABC collections) first rewrites each tune by the round trip ABC ->
MusicXML (abc2xml) -> ABC (xml2abc -d 8 -x), so it reaches the interleaving in the layout of the
training data (L:1/8, V:1, xml2abc's decorations). Without it the output is unchanged.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_batch_arguments(parser, tool="interleave")
    parser.add_argument("--strict_utf8", action="store_true",
                        help="report files that are not valid UTF-8 instead of reading them as Latin-1")
    parser.add_argument("--normalise", action="store_true",
                        help="normalise each tune through ABC -> MusicXML -> ABC (xml2abc -d 8 -x) before "
                             "interleaving (for plain folk ABC; see above)")
    args = parser.parse_args(argv)
    # A partial over a module-level function: the batch runner sends it to worker processes.
    module = abc_normalise if args.normalise else interleave
    convert = functools.partial(module.convert_file, latin1_fallback=not args.strict_utf8)
    # Same name as the input, extension spelling included (x.ABC -> x.ABC), as the official script.
    return run_from_args(args, convert, extensions=interleave.ABC_EXTENSIONS,
                         output_name=lambda relative: relative, name="interleave")


if __name__ == "__main__":
    sys.exit(main())
