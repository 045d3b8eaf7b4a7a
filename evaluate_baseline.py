"""Evaluate the base CLaMP 3 checkpoint on the held-out test sets (the reference for the LoRA adapters).

    python evaluate_baseline.py [--weights PATH] [--model_config FILE] [--output_dir DIR]
                                [--format abc|mtf|both] [--quiet] [--config FILE] [--KEY=value ...]

Reads TEST_DATA_DIR (written by prepare_test_data.py); writes evaluation_baseline_report.json, its
per-query ranks, similarity samples and effective configuration under RESULTS_DIR.
"""

from __future__ import annotations

import sys

from evaluation.cli import run_evaluation
from formats import BASELINE

if __name__ == "__main__":
    sys.exit(run_evaluation(BASELINE, None, __doc__))
