"""Label every feature of a folder with a trained linear classifier, as the official inference_cls.py.

    python classification/inference_cls.py WEIGHTS FEATURE_FOLDER OUTPUT_FILE [--probabilities]
        [--labels FILE | --label_from name|folder] [--report FILE]

WEIGHTS is a checkpoint of ``train_cls.py`` (ours or the official one: ``model`` with ``fc.weight`` and
``fc.bias``, ``labels``, ``input_size``), loaded with ``weights_only=True``. OUTPUT_FILE gets JSON
``{feature file path: predicted label}`` for every ``.npy`` under FEATURE_FOLDER (recursively), the
path as the folder was given joined with the file's relative path. ``--probabilities`` also writes
``<output stem>.probabilities.json`` (``{path: {label: probability}}``).

When the true labels are known (``--labels FILE``: CSV key,label or JSONL; or ``--label_from
name|folder``, the rules of ``train_cls.py``), a report (accuracy, macro F1, per label, confusion
matrix, baselines, bootstrap intervals) is printed and saved to ``--report`` (default
``<output stem>.report.json``).

A file that cannot be read or has the wrong dimension is reported on stderr and in
``<output stem>.skipped.jsonl``, the others are still predicted, and the exit status is 1. Exit
status 2: the checkpoint or the folder cannot be used at all.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import feature_labels
from feature_labels import LabelError
from fileio import atomic_write_text, write_jsonl


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("weights", help="classifier checkpoint (.pth) from train_cls.py")
    parser.add_argument("feature_folder", help="folder of features (.npy, (1, D)), searched recursively")
    parser.add_argument("output_file", help="JSON file of {feature path: predicted label}")
    parser.add_argument("--probabilities", action="store_true",
                        help="also write <output stem>.probabilities.json with every label's probability")
    truth = parser.add_mutually_exclusive_group()
    truth.add_argument("--labels", metavar="FILE", help="true labels (CSV key,label or JSONL) for a report")
    truth.add_argument("--label_from", choices=feature_labels.LABEL_RULES,
                       help="true labels by rule (name: basename up to the first underscore; folder: first "
                            "sub-folder) for a report")
    parser.add_argument("--report", metavar="FILE", help="where the report goes (default: <output stem>.report.json)")
    parser.add_argument("--n_resamples", type=int, default=1000, help="bootstrap resamples (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (default: 0)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import classify  # torch, after the arguments
    from classify import CheckpointError, LinearProbe

    output = Path(args.output_file)
    try:
        probe = LinearProbe.load(args.weights)
        label_map = feature_labels.read_label_file(args.labels) if args.labels else None
        features, skipped = feature_labels.load_features_tolerant(args.feature_folder, probe.input_size)
    except (FileNotFoundError, CheckpointError, LabelError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for path, reason in skipped:
        print(f"skipped {path}: {reason}", file=sys.stderr)
    if not len(features):
        print(f"error: none of the {len(skipped)} .npy files under {args.feature_folder} could be used",
              file=sys.stderr)
        return 2
    print(f"Classifier: {len(probe.labels)} labels, input size {probe.input_size} ({args.weights})")

    # The label is the argmax of the logits (what the official script takes), not of the rounded
    # probabilities, which can tie where the logits do not.
    predicted = probe.predict(features.vectors)
    paths = [features.path(i) for i in range(len(features))]
    atomic_write_text(output, json.dumps(dict(zip(paths, predicted, strict=True)), indent=2, ensure_ascii=False)
                      + "\n")
    print(f"Predicted {len(paths)} files; saved to {output}")
    if args.probabilities:
        probabilities = probe.predict_proba(features.vectors)
        table = {path: {label: float(p) for label, p in zip(probe.labels, row, strict=True)}
                 for path, row in zip(paths, probabilities, strict=True)}
        probability_path = output.with_suffix(".probabilities.json")
        atomic_write_text(probability_path, json.dumps(table, indent=2, ensure_ascii=False) + "\n")
        print(f"Probabilities saved to {probability_path}")
    if skipped:
        skipped_path = write_jsonl(output.with_suffix(".skipped.jsonl"),
                                   [{"file": path, "reason": reason} for path, reason in skipped])
        print(f"{len(skipped)} files skipped, listed in {skipped_path}", file=sys.stderr)

    if label_map is not None or args.label_from:
        truth = feature_labels.labels_for(features.files, args.label_from or "name", label_map)
        known = [i for i, label in enumerate(truth) if label is not None]
        if not known:
            print("note: no file has a true label; no report", file=sys.stderr)
        else:
            if len(known) < len(truth):
                print(f"note: {len(truth) - len(known)} files have no true label and are left out of the report",
                      file=sys.stderr)
            true_labels = [truth[i] for i in known]
            # A true label the classifier never learnt is still counted (always wrong), so it joins the list.
            unseen = sorted(set(true_labels) - set(probe.labels))
            report = classify.classification_report(true_labels, [predicted[i] for i in known],
                                                    probe.labels + unseen, n_resamples=args.n_resamples,
                                                    seed=args.seed)
            report.update(unseen_labels=unseen, skipped_files=[path for path, _ in skipped],
                          n_unlabelled=len(truth) - len(known),
                          files_wrong=[paths[i] for i in known if truth[i] != predicted[i]])
            print(classify.format_report(report))
            report_file = Path(args.report) if args.report else output.with_suffix(".report.json")
            atomic_write_text(report_file, json.dumps(report, indent=2, ensure_ascii=False) + "\n")
            print(f"Report saved to {report_file}")
    return 1 if skipped else 0


if __name__ == "__main__":
    sys.exit(main())

