"""Convert every MIDI file (.mid/.midi, any case) under INPUT_DIR to MTF under OUTPUT_DIR.

Output is byte-identical to the official CLaMP 3 preprocessing/midi/batch_midi2mtf.py (use
--m3_compatible for CLaMP 3 / M3 input); each <stem>.mtf mirrors its input's relative path. Type-2
MIDI files, which the official script cannot convert, have their tracks played one after another.
Finished outputs are skipped on a re-run; failures are logged as JSONL and never stop the batch.
"""

from __future__ import annotations

import argparse
import functools
import sys

from fileio import with_extension
from preprocess.batch import add_batch_arguments, run_from_args
from preprocess.midi_mtf import midi_to_mtf

MIDI_EXTENSIONS = (".mid", ".midi")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_batch_arguments(parser, tool="midi2mtf")
    parser.add_argument("--m3_compatible", action="store_true",
                        help="drop text-like meta messages (text, copyright, track_name, instrument_name, "
                             "lyrics, marker, cue_marker, device_name), as CLaMP 3 expects")
    args = parser.parse_args(argv)
    convert = functools.partial(midi_to_mtf, m3_compatible=args.m3_compatible)
    return run_from_args(args, convert, extensions=MIDI_EXTENSIONS,
                         output_name=lambda relative: with_extension(relative, ".mtf"), name="midi2mtf")


if __name__ == "__main__":
    sys.exit(main())
