"""Extract CLaMP 3 features from a folder of .abc / .mtf / .txt / .npy (MERT) files.

    python code/extract_clamp3.py INPUT_DIR OUTPUT_DIR [--get_global] [--weights PATH] [--model_config FILE]
                                  [--error_log FILE] [--quiet] [--config FILE] [--KEY=value ...]
    torchrun --nproc_per_node=N code/extract_clamp3.py INPUT_DIR OUTPUT_DIR [options]

Mirrors the official CLI: one .npy per input at the mirrored relative path, (1, D) with
--get_global, (1, N, hidden) otherwise; existing outputs are skipped. The effective configuration
goes beside the output folder, as OUTPUT_DIR.extract_config.json.

Under torchrun (or python -m torch.distributed.launch --use_env, or several nodes sharing the
filesystem) the pending files are split across the processes, whole chunks of
EXTRACT_FILES_PER_CHUNK files balanced by bytes, each file written by exactly one process; every
output is bitwise the one a single process with the same settings writes. Each process logs its
failures to its own log (FILE.rankR.jsonl beside --error_log), which rank 0 appends to --error_log
at the end, and rank 0 prints one summary of all processes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import runconfig
from fileio import failure_log_path, find_files, repo_path
from formats import AUDIO_EXTENSIONS

if TYPE_CHECKING:
    import torch
    from modeling import ModelConfig


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Several processes: torchrun --nproc_per_node=N code/extract_clamp3.py INPUT_DIR OUTPUT_DIR ... "
        "splits the files across them (see the module docstring and the README's extraction step).")
    parser.add_argument("input_dir", help="folder searched recursively for .abc/.mtf/.txt/.npy files")
    parser.add_argument("output_dir", help="where the .npy features go (mirrored folder structure)")
    parser.add_argument("--get_global", action="store_true", help="one pooled, projected vector per file")
    parser.add_argument("--weights", help="CLaMP 3 checkpoint (default: CLAMP3_WEIGHTS_PATH)")
    parser.add_argument("--model_config", help="JSON model sizes (default: MODEL_CONFIG or official sizes)")
    parser.add_argument("--error_log", default=str(failure_log_path("extract_clamp3")),
                        help="JSONL log of files that failed (default: %(default)s); with several processes, "
                        "rank R>0 writes FILE.rankR.jsonl beside it and rank 0 merges them into it at the end")
    parser.add_argument("--quiet", action="store_true", help="no progress bar and no config print-out")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, cfg = runconfig.parse_args(parser, argv)
    if not Path(args.input_dir).is_dir():
        parser.error(f"input directory not found: {args.input_dir}")
    # After parsing: these load torch and transformers, which --help and a usage error need not wait for.
    from features import check_dtype
    from modeling import ModelConfig, resolve_device
    from training.distributed import distributed_session, launch_environment

    # The settings and the weights come first: none of them should wait for a folder walk, the
    # tokenizer or a 1.8 GB checkpoint to fail.
    try:
        check_dtype(cfg["EXTRACT_DTYPE"])
        _, world_size, _ = launch_environment()
    except ValueError as exc:
        parser.error(str(exc))
    # Absolute, so the saved configuration names the checkpoint wherever it is read from.
    weights = Path(args.weights).absolute() if args.weights else repo_path(cfg["CLAMP3_WEIGHTS_PATH"])
    try:
        if not weights.is_file():
            raise FileNotFoundError(
                f"checkpoint not found: {weights}. Download the official CLaMP 3 C2 weights (Hugging Face repo "
                "sander-wood/clamp3) to code/, or pass --weights PATH.")
        model_config = ModelConfig.resolve(cfg, runconfig.model_config_path(args.model_config, cfg))
        device = resolve_device(cfg["EXTRACT_DEVICE"])
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if world_size == 1:  # plain python (or a launcher with one process): no process group
        return run(args, cfg, weights, model_config, device, world_size)
    with distributed_session(cfg["EXTRACT_DEVICE"], cfg["DIST_TIMEOUT_MINUTES"]) as context:
        return run(args, cfg, weights, model_config, context.device, world_size, rank=context.rank)


def run(args: argparse.Namespace, cfg: dict, weights: Path, model_config: ModelConfig, device: torch.device,
        world_size: int, rank: int = 0) -> int:
    """Plan, load, extract, report: every process runs it; rank 0 prints, saves and merges."""
    from extraction import extract_config_path, extract_folder, plan_folder
    from features import FeatureExtractor, load_text_tokenizer
    from modeling import load_clamp3
    from training.distributed import all_gather_object

    plan = plan_folder(args.input_dir, args.output_dir, cfg["EXTRACT_FILES_PER_CHUNK"])
    error = None
    try:
        tokenizer = load_text_tokenizer(cfg["TEXT_MODEL_NAME"]) if plan.needs(".txt") else None
        model = load_clamp3(model_config, weights, device=device, attn_implementation=cfg["ATTN_IMPLEMENTATION"])
        extractor = FeatureExtractor.from_config(model, cfg, tokenizer=tokenizer, device=device)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        error = str(exc)
    # Every process goes on, or none does (one that stopped alone would leave the others waiting).
    errors = all_gather_object(error)
    if any(errors):
        if error:
            print(f"error: {error}", file=sys.stderr)
        elif rank == 0:
            failed = [r for r, e in enumerate(errors) if e]
            print(f"error: process(es) {failed} could not start (see their errors above)", file=sys.stderr)
        return 2
    if rank == 0:
        audio = find_files(args.input_dir, AUDIO_EXTENSIONS)
        if audio:  # read as MERT features only: say so rather than leave them out in silence
            print(f"note: {len(audio)} audio file(s) in {args.input_dir} are not read here; extract their MERT "
                  "features first (python preprocessing/audio/extract_mert.py IN OUT --mean_features) and pass the "
                  ".npy files, or embed the audio directly with clamp3_embd.py", file=sys.stderr)
        if not args.quiet:
            print(runconfig.format_config(cfg))
            print(f"weights = {weights}\ndevice = {device}"
                  + (f" ({world_size} processes)" if world_size > 1 else ""))
        runconfig.save_config(cfg, extract_config_path(args.output_dir),
                              extra={"weights": str(weights), "model_config": model_config.to_dict(),
                                     "get_global": args.get_global})
    summary = extract_folder(extractor, args.input_dir, args.output_dir, get_global=args.get_global,
                             files_per_chunk=cfg["EXTRACT_FILES_PER_CHUNK"], error_log=args.error_log,
                             progress=not args.quiet, plan=plan)
    if rank == 0:
        print(summary.line() + (f" (errors logged to {args.error_log})" if summary.failed else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
