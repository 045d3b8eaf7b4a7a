"""Compare the baseline and LoRA evaluation reports query by query.

    python compare_results.py [--baseline REPORT] [--lora REPORT] [--output_dir DIR] [--no_plots]
                              [--config FILE] [--KEY=value ...]

Writes evaluation_comparison_report.json, evaluation_summary.txt and plots/*.png under RESULTS_DIR:
deltas (LoRA − baseline) with paired bootstrap intervals and sign-flip permutation p-values. Reports
made on different test sets are refused.
"""

from __future__ import annotations

import sys

from evaluation.cli import run_comparison

if __name__ == "__main__":
    sys.exit(run_comparison())
