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
from pathlib import Path

import runconfig
from fileio import with_extension
from preprocess.batch import add_batch_arguments, run_from_args
from preprocess.midi_mtf import midi_to_mtf

MIDI_EXTENSIONS = (".mid", ".midi")


def mtf_name(relative_input: Path) -> Path:
    """``dir/name.ext`` -> ``dir/name.mtf`` (the stem ends at the last dot, as in the official script)."""
    return with_extension(relative_input, ".mtf")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_batch_arguments(parser, default_log="logs/midi2mtf_error_log.jsonl")
    parser.add_argument("--m3_compatible", action="store_true",
                        help="drop text-like meta messages (text, copyright, track_name, instrument_name, "
                             "lyrics, marker, cue_marker, device_name), as CLaMP 3 expects")
    args, _config = runconfig.parse_args(parser, argv)  # accepts --config/--KEY=value like every script
    convert = functools.partial(midi_to_mtf, m3_compatible=args.m3_compatible)
    return run_from_args(args, convert, extensions=MIDI_EXTENSIONS, output_name=mtf_name, name="midi2mtf")


if __name__ == "__main__":
    sys.exit(main())
