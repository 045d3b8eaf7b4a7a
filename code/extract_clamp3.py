"""Extract CLaMP 3 features from a folder of .abc / .mtf / .txt / .npy (MERT) files.

    python code/extract_clamp3.py INPUT_DIR OUTPUT_DIR [--get_global] [--weights PATH] [--model_config FILE]

Mirrors the official CLI: one .npy per input at the mirrored relative path, (1, D) with
--get_global, (1, N, hidden) otherwise; existing outputs are skipped.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import runconfig
from extraction import extract_folder
from features import FeatureExtractor, load_text_tokenizer
from modeling import ModelConfig, load_clamp3, resolve_device


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input_dir", help="folder searched recursively for .abc/.mtf/.txt/.npy files")
    parser.add_argument("output_dir", help="where the .npy features go (mirrored folder structure)")
    parser.add_argument("--get_global", action="store_true", help="one pooled, projected vector per file")
    parser.add_argument("--weights", help="CLaMP 3 checkpoint (default: CLAMP3_WEIGHTS_PATH)")
    parser.add_argument("--model_config", help="JSON model sizes (default: MODEL_CONFIG or official sizes)")
    parser.add_argument("--error_log", default="logs/extract_clamp3_errors.jsonl",
                        help="JSONL log of files that failed (default: %(default)s)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar and no config print-out")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, cfg = runconfig.parse_args(parser, argv)
    if not Path(args.input_dir).is_dir():
        parser.error(f"input directory not found: {args.input_dir}")
    if cfg["EXTRACT_DTYPE"] not in ("float32", "bfloat16", "float16"):
        parser.error(f"EXTRACT_DTYPE must be float32, bfloat16 or float16, not {cfg['EXTRACT_DTYPE']!r}")
    tokenizer = None  # loaded first: a missing tokenizer should not wait for a 1.8 GB checkpoint
    if any(p.suffix.lower() == ".txt" for p in Path(args.input_dir).rglob("*")):
        try:
            tokenizer = load_text_tokenizer(cfg["TEXT_MODEL_NAME"])
        except RuntimeError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    weights = runconfig.resolve_path(args.weights or cfg["CLAMP3_WEIGHTS_PATH"])
    try:
        model_config = ModelConfig.resolve(cfg, args.model_config)
        device = resolve_device(cfg["EXTRACT_DEVICE"])
        model = load_clamp3(model_config, weights, device=device,
                            attn_implementation=cfg["ATTN_IMPLEMENTATION"])
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not args.quiet:
        print(runconfig.format_config(cfg))
        print(f"weights = {weights}\ndevice = {device}")
    runconfig.save_config(cfg, Path(args.output_dir) / "extract_config.json",
                          extra={"weights": str(weights), "model_config": model_config.to_dict(),
                                 "get_global": args.get_global})

    extractor = FeatureExtractor(model, device=device, dtype=cfg["EXTRACT_DTYPE"],
                                 tokens_per_batch=cfg["EXTRACT_TOKENS_PER_BATCH"], tokenizer=tokenizer,
                                 max_padding=cfg["EXTRACT_MAX_PADDING"],
                                 segment_lengths={"symbolic": cfg["PATCH_LENGTH"], "text": cfg["MAX_TEXT_LENGTH"],
                                                  "audio": cfg["MAX_AUDIO_LENGTH"]})
    summary = extract_folder(extractor, args.input_dir, args.output_dir, get_global=args.get_global,
                             files_per_chunk=cfg["EXTRACT_FILES_PER_CHUNK"], error_log=args.error_log,
                             progress=not args.quiet)
    print(summary.line() + (f" (errors logged to {args.error_log})" if summary.failed else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
