"""MERT features of every audio file under INPUT_DIR, as the official preprocessing/audio/extract_mert.py writes them.

    python preprocessing/audio/extract_mert.py INPUT_DIR OUTPUT_DIR [--mean_features] [--model_path DIR]
        [--workers N] [--num_shards K --shard_index i] [--files_per_chunk N] [--overwrite] [--max_mb MB]
        [--error_log FILE] [--quiet] [--config FILE] [--KEY=value ...]
    torchrun --nproc_per_node=N preprocessing/audio/extract_mert.py INPUT_DIR OUTPUT_DIR [options]

Each .wav/.mp3/.flac/.ogg file (recursively, extension in any case) becomes OUTPUT_DIR/<relative
folder>/<name>.npy: float32 (hidden states, windows, width), one vector per 5 s window and hidden
state; with --mean_features (what CLaMP 3 reads, and what code/extract_clamp3.py takes as .npy
input) averaged over the hidden states, (1, windows, width). The steps and their checks against the
official outputs: README, "Audio". The model is MERT_MODEL_PATH (a folder or a Hugging Face id in
the local cache; --model_path DIR for a folder), float32 unless --MERT_DTYPE=bfloat16, on
EXTRACT_DEVICE.

Finished outputs are skipped on a re-run (--overwrite redoes them). A file that gets no output is
named with the reason and logged as JSONL (--error_log): unreadable or undecodable files, and files
under 1 s, which have no window (the official script leaves those out silently and exits 0). Exit
status: 0 when every audio file has its output, 1 when some got none, 2 when INPUT_DIR is missing,
holds no audio file, or the model cannot be loaded. Under torchrun the files are split across the
processes, each file written by one process, failures logged per process and merged by rank 0.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import runconfig
from audio.decode import AUDIO_EXTENSIONS  # numpy only: PyAV is imported when a file is decoded
from fileio import failure_log_path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="See the module docstring for exit status, resume and several processes.")
    parser.add_argument("input_dir", help="folder searched recursively for .wav/.mp3/.flac/.ogg files")
    parser.add_argument("output_dir", help="where the .npy features go (mirrored folder structure)")
    parser.add_argument("--mean_features", action="store_true",
                        help="average over the hidden states: (1, windows, width), the form CLaMP 3 reads")
    parser.add_argument("--model_path", help="MERT model folder (default: MERT_MODEL_PATH)")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                        help="threads decoding and resampling ahead of the model (default: %(default)s)")
    parser.add_argument("--num_shards", type=int, default=1, help="split the file list into K shards")
    parser.add_argument("--shard_index", type=int, default=0, help="which shard this process handles")
    parser.add_argument("--files_per_chunk", type=int, default=16,
                        help="files decoded and batched together (default: %(default)s)")
    default_log = failure_log_path("extract_mert")
    parser.add_argument("--error_log", default=str(default_log),
                        help=f"JSONL log of files without output: file, stage, reason (default: {default_log})")
    parser.add_argument("--overwrite", action="store_true", help="redo files whose output already exists")
    parser.add_argument("--max_mb", type=float, default=2048.0,
                        help="inputs larger than this many MiB are reported and skipped (0 = no limit)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, cfg = runconfig.parse_args(parser, argv)
    if not Path(args.input_dir).is_dir():
        print(f"error: input directory not found: {args.input_dir}", file=sys.stderr)
        return 2
    if args.num_shards < 1 or not 0 <= args.shard_index < args.num_shards:
        parser.error(f"--shard_index must be in [0, {args.num_shards}) and --num_shards >= 1")
    # torch and the model after the arguments: --help and a usage error need not wait for them.
    from training.distributed import distributed_session, launch_environment

    try:
        _, world_size, _ = launch_environment()
    except ValueError as exc:
        parser.error(str(exc))
    if world_size == 1:
        return run(args, cfg)
    with distributed_session(cfg["EXTRACT_DEVICE"], cfg["DIST_TIMEOUT_MINUTES"]) as context:
        return run(args, cfg, str(context.device), context.rank)


def run(args: argparse.Namespace, cfg: dict, device: str | None = None, rank: int = 0) -> int:
    from audio.folder import extract_mert_folder
    from audio.mert_features import MertExtractor
    from audio.mert_model import MertModelError
    from modeling import resolve_device
    from training.distributed import all_gather_object

    error = None
    try:
        extractor = MertExtractor.load(args.model_path or cfg["MERT_MODEL_PATH"],
                                       device=device or resolve_device(cfg["EXTRACT_DEVICE"]), dtype=cfg["MERT_DTYPE"],
                                       windows_per_batch=cfg["MERT_WINDOWS_PER_BATCH"],
                                       setting="model_path" if args.model_path else "MERT_MODEL_PATH")
    except (MertModelError, ValueError, RuntimeError) as exc:
        error = str(exc)
        print(f"error: {exc}", file=sys.stderr)
    if any(all_gather_object(error)):  # every process goes on, or none does
        return 2
    if rank == 0 and not args.quiet:
        print(f"MERT model: {extractor.folder} ({extractor.hidden_states} hidden states x {extractor.width}, "
              f"{cfg['MERT_DTYPE']}, {extractor.device})", flush=True)
    summary = extract_mert_folder(extractor, args.input_dir, args.output_dir, mean=args.mean_features,
                                  num_shards=args.num_shards, shard_index=args.shard_index, overwrite=args.overwrite,
                                  workers=args.workers, files_per_chunk=args.files_per_chunk,
                                  max_bytes=int(args.max_mb * 2**20), error_log=args.error_log,
                                  progress=not args.quiet)
    if rank != 0:
        return 0
    print(summary.line() + (f" (logged to {args.error_log})" if summary.without_output else ""))
    if not summary.found:
        print(f"error: no audio file ({' '.join(AUDIO_EXTENSIONS)}) under {args.input_dir}", file=sys.stderr)
        return 2
    return 1 if summary.without_output else 0


if __name__ == "__main__":
    sys.exit(main())
