"""Zero-shot and linear-probe classification of held-out pieces, the base model against the base with its adapters.

    python classification/evaluate_cls.py --train TRAIN.jsonl --test TEST.jsonl [--label_field label]
        [--labels a,b,c] [--min_count 10] [--template "a {label}"] [--systems baseline,lora]
        [--output REPORT.json] [--weights PATH] [--model_config FILE] [--cache_dir DIR] [--quiet]
        [--config FILE] [--KEY=value ...]

Records are ``{"id", "filepaths": [file relative to the JSONL], "label": ...}``; the files may be any
type the raw-file tools read (sheet music through the ABC adapter, MIDI through the MTF adapter).
Writes the report (accuracy and macro F1 with bootstrap intervals, confusion matrices, per-piece
predictions, the paired adapters − base difference) and a summary ``.txt`` beside it.
``python -m demo`` runs it on the demo corpus's tune types (README, "Classification").
"""

from __future__ import annotations

import sys

from evaluation.cli import run_classification

if __name__ == "__main__":
    sys.exit(run_classification())
