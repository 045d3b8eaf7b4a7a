"""Pre-flight of an evaluation: base weights, adapters, tokenizer and test data, one forward pass each.

    python test_pipeline.py [--weights PATH] [--model_config FILE] [--format abc|mtf|both] [--skip_adapters]
                            [--report FILE] [--config FILE] [--KEY=value ...]

Prints a PASS or FAIL line per check (a FAIL says what to run or which config key to set) and exits
1 when any check fails. The results and the effective configuration go to --report
(default: RESULTS_DIR/test_pipeline.json).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from pathlib import Path

import runconfig
from fileio import repo_path
from formats import FORMATS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", help="CLaMP 3 base checkpoint (default: CLAMP3_WEIGHTS_PATH)")
    parser.add_argument("--model_config", help="JSON model sizes (default: MODEL_CONFIG or official sizes)")
    parser.add_argument("--format", choices=[*FORMATS, "both"], default="both",
                        help="which formats' test data and adapters to check (default: %(default)s)")
    parser.add_argument("--skip_adapters", action="store_true", help="check the base alone (no adapters)")
    parser.add_argument("--test_data_dir", help="the prepared test set (default: TEST_DATA_DIR)")
    parser.add_argument("--report", help="where the results go (default: RESULTS_DIR/test_pipeline.json)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, cfg = runconfig.parse_args(parser, argv)
    # After parsing: the checks load torch, transformers and peft, which --help need not wait for.
    from evaluation.preflight import Preflight, PreflightSettings, run_checks

    settings = PreflightSettings(
        cfg=cfg,
        weights=Path(args.weights).absolute() if args.weights else repo_path(cfg["CLAMP3_WEIGHTS_PATH"]),
        model_config_path=runconfig.model_config_path(args.model_config, cfg),
        test_data_dir=Path(args.test_data_dir).absolute() if args.test_data_dir else repo_path(cfg["TEST_DATA_DIR"]),
        formats=FORMATS if args.format == "both" else (args.format,),
        skip_adapters=args.skip_adapters,
    )
    results = run_checks(Preflight(settings).checks())
    failed = [r for r in results if not r.ok]
    print(f"{len(results) - len(failed)} passed, {len(failed)} failed"
          + ("" if failed else ": ready to evaluate"))
    report = Path(args.report).absolute() if args.report else repo_path(cfg["RESULTS_DIR"]) / "test_pipeline.json"
    runconfig.save_config(cfg, report, extra={
        "weights": str(settings.weights), "test_data_dir": str(settings.test_data_dir),
        "formats": list(settings.formats), "skip_adapters": settings.skip_adapters,
        "adapter_dirs": {} if settings.skip_adapters else {f: str(settings.adapter_dir(f)) for f in settings.formats},
        "passed": not failed, "checks": [asdict(r) for r in results]})
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
