"""CLaMP 3 features of a folder of raw files: sheet music, MIDI, text, audio, MERT features.

    python clamp3_embd.py INPUT_DIR OUTPUT_DIR [--get_global] [--no_adapter] [--weights PATH]
                          [--model_config FILE] [--abc_mode MODE] [--cache_dir DIR] [--error_log FILE]
                          [--quiet] [--config FILE] [--KEY=value ...]

The official raw-file wrapper's job, in one process: every file under INPUT_DIR is read by its
extension (.txt text; .abc; .xml/.mxl/.musicxml -> ABC -> interleaved ABC; .mid/.midi -> MTF;
.mtf; .npy MERT features; .wav/.mp3/.flac/.ogg audio -> MERT features with MERT_MODEL_PATH, as
the official extract_mert.py --mean_features makes them), converted with this project's converters
and embedded, and OUTPUT_DIR gets one .npy per file at the mirrored path (name.ext -> name.npy):
(1, D) with --get_global, (1, N, hidden) otherwise. Sheet music goes through the ABC adapter and
MIDI through the MTF adapter when they exist (--no_adapter for the base); text and audio through
the base. Audio under 1 s has no MERT window and fails with that reason. Without the C2 checkpoint, the embedded default's
models (make demo) are used, and the output says so.

Re-running is cheap: conversions and features are cached by content (RAWFILE_CACHE_DIR), an
output is rewritten only when its input or the model changed, and outputs whose input is gone are
deleted. What each output was made from is in OUTPUT_DIR.embd_manifest.json, beside the folder.
A file that fails is named with the reason (and logged to --error_log); the rest go on. Exit
status (the rule of every raw-file tool): 2 when INPUT_DIR is missing, holds no file the tools read,
or none of its files could be embedded; 1 with --strict when any file failed; else 0.

Several processes: torchrun --nproc_per_node=N clamp3_embd.py INPUT_DIR OUTPUT_DIR [options] (or
python -m torch.distributed.launch --use_env, or several nodes sharing the filesystem) splits the
files across the processes, whole chunks of EXTRACT_FILES_PER_CHUNK files balanced by bytes, each
output written by exactly one process; rank 0 writes the manifest once every process is done and
prints one summary of all. Each process logs its failures to its own log (FILE.rankR.jsonl beside
--error_log), which rank 0 appends to --error_log at the end.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import rawfile_tools
import runconfig
from fileio import DropLog
from tqdm import tqdm


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="See the module docstring (README: 'Raw-file tools') for what each file type becomes, and for "
        "several processes (torchrun --nproc_per_node=N clamp3_embd.py ...).")
    parser.add_argument("input_dir", help="folder of raw files, searched recursively")
    parser.add_argument("output_dir", help="where the .npy features go (mirrored folder structure)")
    parser.add_argument("--get_global", action="store_true", help="one pooled, projected vector per file")
    rawfile_tools.add_model_arguments(parser, "clamp3_embd")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, cfg = runconfig.parse_args(parser, argv)
    try:
        files = rawfile_tools.folder_inputs(args.input_dir, "input")
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return rawfile_tools.EXIT_UNUSABLE
    # torch after the arguments: --help and a usage error need not wait for it.
    from modeling import resolve_device
    from training.distributed import distributed_session, launch_environment

    try:
        _, world_size, _ = launch_environment()
    except ValueError as exc:
        parser.error(str(exc))
    if world_size == 1:  # plain python (or a launcher with one process): no process group
        return run(args, cfg, files)
    try:
        resolve_device(cfg["EXTRACT_DEVICE"])
    except (RuntimeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    with distributed_session(cfg["EXTRACT_DEVICE"], cfg["DIST_TIMEOUT_MINUTES"]) as context:
        return run(args, cfg, files, context.rank, world_size, str(context.device))


def run(args: argparse.Namespace, cfg: dict, files: list[Path], rank: int = 0, world_size: int = 1,
        device: str | None = None) -> int:
    """Every process runs it on ``files`` (``rawfiles.discover`` of the input folder); rank 0 prints
    the models and the summary and merges the failure logs."""
    from embedder import EmbedSummary
    from extraction import merge_rank_logs, rank_log_path
    from training.distributed import all_gather_object, barrier

    main_rank = rank == 0
    embedder = rawfile_tools.open_embedder(args, cfg, show=not args.quiet and main_rank, device=device)
    error = None if embedder is not None else "no models"  # open_embedder printed why
    if embedder is not None and any(rel.suffix.lower() == ".txt" for rel in files):
        try:
            embedder.tokenizer()  # before any file is converted or embedded
        except (OSError, RuntimeError, ValueError) as exc:
            error = str(exc)
            print(f"error: {exc}", file=sys.stderr)
    # Every process goes on, or none does (one that stopped alone would leave the others waiting).
    if any(all_gather_object(error)):
        return 2
    prefix = f"[rank {rank}] " if world_size > 1 else ""
    drops = DropLog("clamp3_embd", rank_log_path(args.error_log, rank, world_size),
                    echo=lambda message: tqdm.write(prefix + message, file=sys.stderr))
    with drops, tqdm(total=len(files), desc="embed" if world_size == 1 else f"embed (rank 0 of {world_size})",
                     unit="file", disable=args.quiet or not main_rank, dynamic_ncols=True) as bar:

        def planned(count: int) -> None:
            bar.total = count
            bar.refresh()

        try:
            summary = rawfile_tools.embed_folder(embedder, args.input_dir, args.output_dir, args.get_global,
                                                 drops=drops, progress=bar.update, planned=planned)
        except (FileNotFoundError, RuntimeError) as exc:
            if world_size > 1:
                raise  # the session ends this process and torchrun the others; a return would leave them waiting
            print(f"error: {exc}", file=sys.stderr)
            return 2
    features = EmbedSummary()
    for part in all_gather_object(embedder.summary):
        features.embedded += part.embedded
        features.cached += part.cached
        features.failed += part.failed
    barrier()  # every rank's log is closed before rank 0 merges them
    if main_rank:
        merge_rank_logs(args.error_log, world_size)
        processes = f" ({world_size} processes)" if world_size > 1 else ""
        print(f"clamp3_embd: {len(files)} files in {args.input_dir}{processes}: {summary.line()}; features: "
              f"{features.line()}" + (f" (failures logged to {args.error_log})" if summary.failed else ""))
        return rawfile_tools.exit_status("input", args.input_dir, len(files), summary.failed, args.strict,
                                         args.error_log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
