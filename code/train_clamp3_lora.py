"""Train CLaMP 3 LoRA adapters (one per format) or the official symbolic stage, on 1..N processes.

    torchrun --nproc_per_node=N code/train_clamp3_lora.py [--format abc|mtf|both] [--KEY=value ...]
    python code/train_clamp3_lora.py --format abc          # one process (CPU or one GPU)

``TRAIN_MODE = "lora"`` (default) freezes the base checkpoint and trains a PEFT LoRA adapter on the
symbolic encoder; ``"full"`` trains the symbolic encoder and projection as the official
``train_clamp3_symbolic.py`` does. ``--format both --ALIGN_WEIGHT=1`` trains the two LoRA adapters in
one run with a sheet <-> MIDI term over records sharing a ``pair_id`` (``training/joint.py``).
Everything that changes results is a config key (``code/config.py``),
saved in the run folder (``LORA_LOG_DIR``) and checked on ``--resume``.
"""

from __future__ import annotations

import argparse
import sys

import runconfig
from formats import FORMATS


def user_errors() -> tuple[type[Exception], ...]:
    """Errors a user can act on: one line, not a traceback. (In a multi-process job a failing rank
    prints its traceback with its rank and ends the job; see training/distributed.py.) Imported
    here, after the arguments are parsed: their modules load torch, which --help need not wait for."""
    import lora
    from modeling import CheckpointMismatchError
    from training.checkpoint import ResumeError
    from training.loop import TrainingSetupError
    from training.run_folder import RunFolderError

    return (ResumeError, RunFolderError, lora.AdapterConfigError, CheckpointMismatchError, FileNotFoundError,
            runconfig.ConfigError, TrainingSetupError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Train CLaMP 3 LoRA adapters for interleaved ABC and/or MTF (or the full symbolic stage).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Multi-node: torchrun --nnodes=2 --node_rank=R --nproc_per_node=8 --rdzv_backend=c10d "
               "--rdzv_endpoint=HOST:29500 code/train_clamp3_lora.py --format abc")
    parser.add_argument("--format", choices=[*FORMATS, "both"], default="both",
                        help="which adapter to train; 'both' trains ABC, then MTF, each from the base (default), "
                             "or, with ALIGN_WEIGHT > 0, the two together with a sheet<->MIDI term over pairs")
    parser.add_argument("--weights", metavar="PATH",
                        help="base CLaMP 3 checkpoint (default: CLAMP3_WEIGHTS_PATH from config)")
    parser.add_argument("--model_config", metavar="FILE",
                        help="JSON model config for non-official sizes (default: MODEL_CONFIG, else official)")
    parser.add_argument("--resume", metavar="PATH|latest",
                        help="continue from a checkpoint of the run folder ('latest': its newest)")
    parser.add_argument("--overwrite", action="store_true",
                        help="start afresh in a run folder that already holds a run (deletes it)")
    parser.add_argument("--export_merged", metavar="PATH",
                        help="after training, also write the base with the adapter merged in as an official "
                             "checkpoint (one format only)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    # torch.distributed.launch without --use_env passes the local rank as an argument; the
    # environment (LOCAL_RANK) carries it either way, so the value is not needed.
    parser.add_argument("--local-rank", "--local_rank", type=int, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, cfg = runconfig.parse_args(parser, argv)
    if args.export_merged and args.format == "both":
        parser.error("--export_merged needs one format (--format abc or --format mtf)")
    if args.export_merged and cfg["TRAIN_MODE"] != "lora":
        parser.error("--export_merged applies to TRAIN_MODE='lora' (full mode already saves a checkpoint)")
    errors = user_errors()
    from training.loop import train

    try:
        return train(cfg, args)
    except errors as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
