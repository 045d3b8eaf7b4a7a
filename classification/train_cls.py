"""Train a linear classifier on global CLaMP 3 features, compatible with the official train_cls.py.

    python classification/train_cls.py --train_folder FEATURES [--eval_folder FEATURES] [--eval_split 0.2]
        [--num_epochs N] [--learning_rate LR] [--balanced_training] [--labels FILE]
        [--label_from name|folder] [--output DIR_OR_FILE] [--seed S] [--weight_decay WD]
        [--batch_size B] [--patience P] [--quiet]

Features are the ``(1, D)`` ``.npy`` files under the folder (recursively), as ``extract_clamp3.py
--get_global`` writes them. A file's label is, as in the official script, its basename up to the
first underscore (``pop_12.npy`` -> ``pop``); ``--label_from folder`` takes the first sub-folder
instead, and ``--labels FILE`` reads them from a CSV (``key,label``) or JSONL (``{"key"|"path",
"label"}``) file whose keys are relative to the feature folder (name up to the first dot), for the
eval folder too. Without ``--eval_folder``, a seeded, stratified ``--eval_split`` of the training files
is held out. The epoch with the best validation accuracy is kept (ties: lower validation loss); training
stops after ``--patience`` epochs without improvement.

Writes (atomically) the checkpoint in the official layout, ``weights-<train folder name>.pth`` in the
working directory unless ``--output`` names a file or a folder; beside it ``logs-<name>.txt`` (one
line per epoch), ``<stem>.summary.json`` (settings, split, history) and ``<stem>.report.json``
(validation report: accuracy, macro F1, per label, confusion matrix, baselines, bootstrap intervals).
Exit status 2 on unusable input (no features, an unreadable file, mismatched dimensions, one label).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from pathlib import Path

import feature_labels
from feature_labels import LabelError, UnusableDataError
from fileio import atomic_write_text
from retrieval import FeatureFileError

MAX_LISTED_LABELS = 30


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train_folder", required=True, help="folder of training features (.npy, (1, D))")
    parser.add_argument("--eval_folder", help="folder of validation features (default: hold out --eval_split)")
    parser.add_argument("--eval_split", type=float, default=0.2,
                        help="fraction of each label held out for validation without --eval_folder "
                             "(0: none, the last epoch is kept; default: %(default)s)")
    parser.add_argument("--num_epochs", type=int, default=200, help="most epochs (default: %(default)s)")
    parser.add_argument("--learning_rate", type=float, default=1e-3, help="AdamW learning rate (default: %(default)s)")
    parser.add_argument("--balanced_training", action="store_true",
                        help="weight the loss by inverse label frequency")
    parser.add_argument("--labels", metavar="FILE",
                        help="labels from a CSV (key,label) or JSONL file, instead of --label_from")
    parser.add_argument("--label_from", choices=feature_labels.LABEL_RULES, default="name",
                        help="name: basename up to the first underscore (official); folder: first sub-folder "
                             "(default: %(default)s)")
    parser.add_argument("--output", metavar="DIR_OR_FILE",
                        help="checkpoint file, or folder for weights-<train folder name>.pth "
                             "(default: that name in the working directory)")
    parser.add_argument("--seed", type=int, default=0, help="split, batch order and bootstrap seed (default: 0)")
    parser.add_argument("--weight_decay", type=float, default=0.01, help="AdamW weight decay (default: %(default)s)")
    parser.add_argument("--batch_size", type=int, default=64, help="mini-batch size, 0 = full batch (default: %(default)s)")
    parser.add_argument("--patience", type=int, default=30,
                        help="stop after this many epochs without a better validation result, 0 = never "
                             "(default: %(default)s)")
    parser.add_argument("--n_resamples", type=int, default=1000,
                        help="bootstrap resamples of the report's intervals (default: %(default)s)")
    parser.add_argument("--quiet", action="store_true", help="no per-epoch lines")
    return parser


def folder_name(folder: str) -> str:
    return os.path.basename(os.path.normpath(os.path.abspath(folder)))


def weights_path(output: str | None, train_folder: str) -> Path:
    """The official name in the working directory, or ``--output``: a folder when it exists as one,
    ends with a separator or has no extension, else the checkpoint file itself."""
    name = f"weights-{folder_name(train_folder)}.pth"
    if output is None:
        return Path(name)
    path = Path(output)
    if path.is_dir() or output.endswith(("/", os.sep)) or not path.suffix:
        return path / name
    return path


def log_path(weights: Path) -> Path:
    """``weights-x.pth`` -> ``logs-x.txt`` beside it (the official pair of names)."""
    return weights.with_name(f"logs-{weights.stem.removeprefix('weights-')}.txt")


def count_line(labels: list[str]) -> str:
    counts = Counter(labels)
    listed = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    text = ", ".join(f"{label} {count}" for label, count in listed[:MAX_LISTED_LABELS])
    return text + (f", ... ({len(listed) - MAX_LISTED_LABELS} more)" if len(listed) > MAX_LISTED_LABELS else "")


def epoch_line(row: dict, num_epochs: int) -> str:
    line = f"epoch {row['epoch']:>4}/{num_epochs}: train loss {row['train_loss']:.4f} acc {row['train_acc']:.4f}"
    if "eval_acc" in row:
        line += (f" | eval loss {row['eval_loss']:.4f} acc {row['eval_acc']:.4f} "
                 f"macro F1 {row['eval_macro_f1']:.4f}")
    return line


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    import classify  # torch, after the arguments
    from classify import LinearProbe, ProbeConfig

    if not 0.0 <= args.eval_split < 1.0:
        parser.error(f"--eval_split must be in [0, 1), got {args.eval_split}")
    config = ProbeConfig(num_epochs=args.num_epochs, learning_rate=args.learning_rate,
                         weight_decay=args.weight_decay, batch_size=args.batch_size, patience=args.patience,
                         balanced=args.balanced_training, seed=args.seed)
    try:
        config.check()
    except ValueError as exc:
        parser.error(str(exc))
    try:
        data = feature_labels.load_training_data(args.train_folder, args.eval_folder, args.eval_split, args.seed,
                                                 args.label_from, args.labels)
    except (FileNotFoundError, FeatureFileError, LabelError, UnusableDataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    (train_x, train_labels, _), (val_x, val_labels, val_paths) = data.train, data.validation
    label_order = data.label_order

    where = f"from {args.eval_folder}" if args.eval_folder else (
        f"{args.eval_split:.0%} of each label held out, seed {args.seed}" if args.eval_split else "none")
    print(f"Features: dimension {train_x.shape[1]}, {len(label_order)} labels")
    print(f"Training files: {len(train_labels)} ({count_line(train_labels)})")
    print(f"Validation files: {len(val_labels)} ({where})")
    if not val_labels:
        print("note: no validation set; every epoch runs and the last is kept; the report below is on the "
              "training files (optimistic)", file=sys.stderr)

    log_lines: list[str] = []
    every = max(1, args.num_epochs // 20)

    def on_epoch(row: dict) -> None:
        line = epoch_line(row, args.num_epochs)
        log_lines.append(line)
        if not args.quiet and (row["epoch"] == 1 or row["epoch"] % every == 0):
            print(line, flush=True)

    probe = LinearProbe.fit(train_x, train_labels, config,
                            validation=(val_x, val_labels) if val_labels else None,
                            label_order=label_order, log=on_epoch)
    summary = probe.summary
    stop = "early stop" if summary.stopped_early else "all epochs"
    print(f"Best epoch: {summary.best_epoch} of {summary.epochs_run} run ({stop})")

    report_x, report_truth = (val_x, val_labels) if val_labels else (train_x, train_labels)
    majority = Counter(train_labels).most_common(1)[0][0]
    report = classify.classification_report(report_truth, probe.predict(report_x), label_order,
                                            n_resamples=args.n_resamples, seed=args.seed, majority_label=majority)
    report["set"] = "validation" if val_labels else "training"
    if val_labels:
        report["files"] = val_paths
    print(("Validation: " if val_labels else "Training set: ") + classify.format_report(report))

    weights = weights_path(args.output, args.train_folder)
    extra = {"train_folder": args.train_folder, "eval_folder": args.eval_folder,
             "label_source": args.labels or args.label_from, "eval_split": None if args.eval_folder else args.eval_split,
             "argv": sys.argv[1:] if argv is None else list(argv)}
    probe.save(weights, extra)
    log_lines += [f"best epoch {summary.best_epoch}", classify.format_report(report)]
    atomic_write_text(log_path(weights), "\n".join(log_lines) + "\n")
    atomic_write_text(classify.report_path(weights), json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    print(f"Saved {weights} (log {log_path(weights)}, report {classify.report_path(weights)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
