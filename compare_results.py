"""Compare two evaluation reports query by query (by default the baseline and LoRA ones).

    python compare_results.py [--systems REFERENCE CANDIDATE] [--baseline REPORT] [--lora REPORT]
                              [--margin M] [--output_dir DIR] [--no_plots] [--config FILE] [--KEY=value ...]

Writes evaluation_comparison_report.json, evaluation_summary.txt and plots/*.png under RESULTS_DIR:
deltas (LoRA − baseline) with paired bootstrap intervals and sign-flip permutation p-values. Reports
made on different test sets are refused. ``--systems lora joint`` pairs the separately and the
jointly trained adapters (evaluate_lora.py --name joint) instead, into
evaluation_comparison_lora_vs_joint_report.json and evaluation_summary_lora_vs_joint.txt, with
text -> sheet music and text -> MIDI non-inferiority (the lower bound of Δ MRR's 95% interval
>= -M, default 0.02).
"""

from __future__ import annotations

import sys

from evaluation.cli import run_comparison

if __name__ == "__main__":
    sys.exit(run_comparison())
