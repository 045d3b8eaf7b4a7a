"""Convert every MTF file (.mtf, any case) under INPUT_DIR back to a type-0 MIDI file under OUTPUT_DIR.

Each <stem>.mid mirrors its input's relative path. Converting the MIDI to MTF again (with the same
--m3_compatible setting) reproduces the MTF exactly. Finished outputs are skipped on a re-run;
failures are logged as JSONL and never stop the batch.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import runconfig
from fileio import with_extension
from preprocess.batch import add_batch_arguments, run_from_args
from preprocess.midi_mtf import mtf_file_to_midi


def midi_name(relative_input: Path) -> Path:
    """``dir/name.mtf`` -> ``dir/name.mid`` (the stem ends at the last dot)."""
    return with_extension(relative_input, ".mid")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_batch_arguments(parser, default_log="logs/mtf2midi_error_log.jsonl")
    args, _config = runconfig.parse_args(parser, argv)  # accepts --config/--KEY=value like every script
    return run_from_args(args, mtf_file_to_midi, extensions=(".mtf",), output_name=midi_name, name="mtf2midi")


if __name__ == "__main__":
    sys.exit(main())
