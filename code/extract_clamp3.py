"""Extract CLaMP 3 features from a folder of .abc / .mtf / .txt / .npy (MERT) files.

    python code/extract_clamp3.py INPUT_DIR OUTPUT_DIR [--get_global] [--weights PATH] [--model_config FILE]
                                  [--error_log FILE] [--quiet] [--config FILE] [--KEY=value ...]

Mirrors the official CLI: one .npy per input at the mirrored relative path, (1, D) with
--get_global, (1, N, hidden) otherwise; existing outputs are skipped. The effective configuration
goes beside the output folder, as OUTPUT_DIR.extract_config.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import runconfig
from extraction import extract_config_path, extract_folder
from features import FeatureExtractor, check_dtype, load_text_tokenizer
from fileio import failure_log_path, repo_path
from modeling import ModelConfig, load_clamp3, resolve_device


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input_dir", help="folder searched recursively for .abc/.mtf/.txt/.npy files")
    parser.add_argument("output_dir", help="where the .npy features go (mirrored folder structure)")
    parser.add_argument("--get_global", action="store_true", help="one pooled, projected vector per file")
    parser.add_argument("--weights", help="CLaMP 3 checkpoint (default: CLAMP3_WEIGHTS_PATH)")
    parser.add_argument("--model_config", help="JSON model sizes (default: MODEL_CONFIG or official sizes)")
    parser.add_argument("--error_log", default=str(failure_log_path("extract_clamp3")),
                        help="JSONL log of files that failed (default: %(default)s)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar and no config print-out")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, cfg = runconfig.parse_args(parser, argv)
    if not Path(args.input_dir).is_dir():
        parser.error(f"input directory not found: {args.input_dir}")
    # The settings and the tokenizer come first: neither should wait for a 1.8 GB checkpoint to fail.
    try:
        check_dtype(cfg["EXTRACT_DTYPE"])
    except ValueError as exc:
        parser.error(str(exc))
    tokenizer = None
    if any(p.suffix.lower() == ".txt" for p in Path(args.input_dir).rglob("*")):
        try:
            tokenizer = load_text_tokenizer(cfg["TEXT_MODEL_NAME"])
        except RuntimeError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    # Absolute, so the saved configuration names the checkpoint wherever it is read from.
    weights = Path(args.weights).absolute() if args.weights else repo_path(cfg["CLAMP3_WEIGHTS_PATH"])
    try:
        model_config = ModelConfig.resolve(cfg, runconfig.model_config_path(args.model_config, cfg))
        device = resolve_device(cfg["EXTRACT_DEVICE"])
        model = load_clamp3(model_config, weights, device=device,
                            attn_implementation=cfg["ATTN_IMPLEMENTATION"])
        extractor = FeatureExtractor.from_config(model, cfg, tokenizer=tokenizer, device=device)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not args.quiet:
        print(runconfig.format_config(cfg))
        print(f"weights = {weights}\ndevice = {device}")
    runconfig.save_config(cfg, extract_config_path(args.output_dir),
                          extra={"weights": str(weights), "model_config": model_config.to_dict(),
                                 "get_global": args.get_global})
    summary = extract_folder(extractor, args.input_dir, args.output_dir, get_global=args.get_global,
                             files_per_chunk=cfg["EXTRACT_FILES_PER_CHUNK"], error_log=args.error_log,
                             progress=not args.quiet)
    print(summary.line() + (f" (errors logged to {args.error_log})" if summary.failed else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
