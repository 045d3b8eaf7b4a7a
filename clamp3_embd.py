"""CLaMP 3 features of a folder of raw files: sheet music, MIDI, text, MERT features.

    python clamp3_embd.py INPUT_DIR OUTPUT_DIR [--get_global] [--no_adapter] [--weights PATH]
                          [--model_config FILE] [--abc_mode MODE] [--cache_dir DIR] [--error_log FILE]
                          [--quiet] [--config FILE] [--KEY=value ...]

The official raw-file wrapper's job, in one process: every file under INPUT_DIR is read by its
extension (.txt text; .abc; .xml/.mxl/.musicxml -> ABC -> interleaved ABC; .mid/.midi -> MTF;
.mtf; .npy MERT features), converted with this project's converters and embedded, and OUTPUT_DIR
gets one .npy per file at the mirrored path (name.ext -> name.npy): (1, D) with --get_global,
(1, N, hidden) otherwise. Sheet music goes through the ABC adapter and MIDI through the MTF adapter
when they exist (--no_adapter for the base). Without the C2 checkpoint, the embedded default's
models (make demo) are used, and the output says so.

Re-running is cheap: conversions and features are cached by content (RAWFILE_CACHE_DIR), an
output is rewritten only when its input or the model changed, and outputs whose input is gone are
deleted. What each output was made from is in OUTPUT_DIR.embd_manifest.json, beside the folder.
A file that fails is named with the reason (and logged to --error_log); the rest go on.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import rawfiles
import runconfig
from fileio import DropLog
from tqdm import tqdm


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="See the module docstring (README: 'Raw-file tools') for what each file type becomes.")
    parser.add_argument("input_dir", help="folder of raw files, searched recursively")
    parser.add_argument("output_dir", help="where the .npy features go (mirrored folder structure)")
    parser.add_argument("--get_global", action="store_true", help="one pooled, projected vector per file")
    rawfiles.add_model_arguments(parser, "clamp3_embd")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, cfg = runconfig.parse_args(parser, argv)
    if not Path(args.input_dir).is_dir():
        parser.error(f"input directory not found: {args.input_dir}")
    embedder = rawfiles.open_embedder(args, cfg)
    if embedder is None:
        return 2
    files = rawfiles.discover(args.input_dir)
    drops = DropLog("clamp3_embd", args.error_log, echo=lambda message: tqdm.write(message, file=sys.stderr))
    with drops, tqdm(total=len(files), desc="embed", unit="file", disable=args.quiet, dynamic_ncols=True) as bar:
        try:
            summary = rawfiles.embed_folder(embedder, args.input_dir, args.output_dir, args.get_global,
                                            drops=drops, progress=bar.update)
        except (FileNotFoundError, RuntimeError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    print(f"clamp3_embd: {len(files)} files in {args.input_dir}: {summary.line()}; features: "
          f"{embedder.summary.line()}" + (f" (failures logged to {args.error_log})" if summary.failed else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
