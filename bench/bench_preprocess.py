"""Preprocessing benchmark: files per second per converter against the official kind of approach,
on music21-corpus data, with identical bytes checked on every file.

    python bench/bench_preprocess.py [--max_files N] [--repeats R] [--json FILE]

Runs ``bench_midi2mtf.py`` (MIDI -> MTF against a straightforward mido conversion) and
``bench_abc.py`` (MusicXML -> ABC against one xml2abc subprocess per file; interleaving against
the official abctoolkit steps), one core each; see those files for the details.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

# Run as a script, Python puts bench/ first on sys.path, so the sibling benchmarks import by name.
import bench_abc
import bench_midi2mtf


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max_files", type=int, default=0, help="limit files per converter (0 = defaults)")
    parser.add_argument("--repeats", type=int, default=3, help="best of R passes for the fast converters")
    parser.add_argument("--json", help="also write all rows to this JSON file")
    args = parser.parse_args(argv)

    limit = args.max_files or None
    midi_rows = bench_midi2mtf.run(limit, args.repeats)
    abc_rows = bench_abc.run(limit or bench_abc.DEFAULT_FILES, args.repeats)
    print(f"machine: {platform.machine()} {platform.processor()}, one core per converter")
    print("| task | approach | files | files/s | speedup | identical bytes |")
    print("|---|---|---|---|---|---|")
    for r in midi_rows:
        if not r["m3_compatible"]:
            continue
        print(f"| MIDI->MTF (--m3_compatible) | {r['converter']} | {r['files']} | {r['files_per_s']:.1f} | "
              f"{r['speedup']:.1f}x | {r['identical']}/{r['files']} |")
    for r in abc_rows:
        print(f"| {r['task']} | {r['converter']} | {r['files']} | {r['files_per_s']:.1f} | {r['speedup']:.1f}x | "
              f"{r['identical']}/{r['compared']} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"midi2mtf": midi_rows, "abc": abc_rows}, indent=2, default=str))
    mismatched = [r for r in midi_rows if r["identical"] != r["files"]] + \
        [r for r in abc_rows if r["identical"] != r["compared"]]
    return 1 if mismatched else 0


if __name__ == "__main__":
    sys.exit(main())
