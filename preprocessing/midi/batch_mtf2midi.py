"""Convert every MTF file (.mtf, any case) under INPUT_DIR back to a type-0 MIDI file under OUTPUT_DIR.

Each <stem>.mid mirrors its input's relative path. Converting the MIDI to MTF again (with the same
--m3_compatible setting) reproduces the MTF exactly. Finished outputs are skipped on a re-run;
failures are logged as JSONL and never stop the batch.
"""

from __future__ import annotations

import argparse
import sys

from fileio import with_extension
from preprocess.batch import add_batch_arguments, run_from_args
from preprocess.midi_mtf import mtf_file_to_midi


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_batch_arguments(parser, tool="mtf2midi")
    args = parser.parse_args(argv)
    return run_from_args(args, mtf_file_to_midi, extensions=(".mtf",),
                         output_name=lambda relative: with_extension(relative, ".mid"), name="mtf2midi")


if __name__ == "__main__":
    sys.exit(main())
