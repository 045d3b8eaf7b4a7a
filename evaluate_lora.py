"""Evaluate the base CLaMP 3 checkpoint with the LoRA adapters (ABC adapter for ABC, MTF for MTF).

    python evaluate_lora.py [--weights PATH] [--model_config FILE] [--output_dir DIR]
                            [--format abc|mtf|both] [--name NAME] [--quiet] [--config FILE] [--KEY=value ...]

The adapters come from LORA_ABC_ADAPTER_DIR and LORA_MTF_ADAPTER_DIR (written by
code/train_clamp3_lora.py); a missing one is an error. Writes evaluation_lora_report.json, its
per-query ranks, similarity samples and effective configuration under RESULTS_DIR
(evaluation_<NAME>_* with --name: e.g. --name joint for the adapters of a joint run, then
compare_results.py --systems lora joint).
"""

from __future__ import annotations

import sys

from evaluation.cli import run_evaluation
from formats import LORA

if __name__ == "__main__":
    sys.exit(run_evaluation(LORA, None, __doc__))
