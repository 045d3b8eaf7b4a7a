"""Zero-shot labels for a folder of raw files: each file gets the label whose text prompt is nearest.

    python classification/zero_shot_cls.py INPUT_DIR OUTPUT_FILE --labels "jig,reel,hornpipe"
        [--template "a {label}"] [--label_from name|folder] [--report FILE] [--no_adapter]
        [--weights PATH] [--model_config FILE] [--cache_dir DIR] [--quiet] [--config FILE] [--KEY=value ...]

Every file under INPUT_DIR (.abc, .xml/.mxl/.musicxml, .mid/.midi, .mtf, MERT .npy, .wav/.mp3/.flac/.ogg; see
``clamp3_embd.py``) is embedded as ``clamp3_embd.py --get_global`` does, each label becomes a text
(``--template``, e.g. "a {label}" -> "a reel") embedded by the text tower, and the file's label is the
most cosine-similar one. OUTPUT_FILE is JSON ``{file: label}`` as ``inference_cls.py`` writes, plus
``<stem>.scores.json`` with every cosine. With ``--label_from`` (true labels from the official
name rule ``<label>_<anything>`` or from the first sub-folder) accuracy, macro F1 and the confusion
matrix are printed and saved (``--report``, default ``<stem>.report.json``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import feature_labels
import rawfile_tools
import rawfiles
import runconfig
from fileio import DropLog, atomic_write_text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input_dir", help="folder of music files, searched recursively")
    parser.add_argument("output_file", help="JSON {file: label}")
    parser.add_argument("--labels", required=True, help="comma-separated label names")
    parser.add_argument("--template", default="a {label}", help="the prompt of a label (default: %(default)r)")
    parser.add_argument("--label_from", choices=feature_labels.LABEL_RULES,
                        help="true labels from file names (<label>_...) or first sub-folders, for a report")
    parser.add_argument("--report", help="report JSON when true labels are known (default: <stem>.report.json)")
    rawfile_tools.add_model_arguments(parser, "zero_shot_cls")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, cfg = runconfig.parse_args(parser, argv)
    labels = list(dict.fromkeys(label.strip() for label in args.labels.split(",") if label.strip()))
    if len(labels) < 2:
        parser.error("--labels needs at least two labels")
    import classify  # torch, after the arguments

    try:
        prompts = classify.prompt_texts(labels, args.template)
        files = [Path(args.input_dir) / rel for rel in rawfile_tools.folder_inputs(args.input_dir, "input")]
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    embedder = rawfile_tools.open_embedder(args, cfg)
    if embedder is None:
        return 2
    try:  # the label prompts first: the weights and the tokenizer are checked before any file is embedded
        prompt_features = embedder.embed_texts(prompts)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    with DropLog("zero_shot_cls", args.error_log, echo=lambda m: print(m, file=sys.stderr)) as drops:
        results = embedder.embed_files(files, drops=drops)
    embedded = [(path, result) for path, result in zip(files, results, strict=True)
                if not isinstance(result, rawfiles.RawFileError) and result.modality != "text"]
    if not embedded:
        print(f"error: no music file of {args.input_dir} could be embedded", file=sys.stderr)
        return 2
    import numpy as np

    music = np.concatenate([result.feature for _, result in embedded])
    zero = classify.zero_shot(music, prompt_features, labels)
    names = [str(path) for path, _ in embedded]
    output = Path(args.output_file)
    atomic_write_text(output, json.dumps(dict(zip(names, zero.predicted, strict=True)), indent=1) + "\n")
    scores = {name: dict(zip(labels, map(float, row), strict=True)) for name, row in zip(names, zero.scores, strict=True)}
    atomic_write_text(output.with_name(output.stem + ".scores.json"),
                      json.dumps({"prompts": prompts, "scores": scores}, indent=1) + "\n")
    failed = sum(isinstance(result, rawfiles.RawFileError) for result in results)
    status = rawfile_tools.exit_status("input", args.input_dir, len(files), failed, args.strict, args.error_log)
    print(f"zero_shot_cls: {len(names)} files labelled ({drops.summary_line()}); predictions: {output}")
    if args.label_from:
        relative = [path.relative_to(args.input_dir) for path, _ in embedded]
        truth = feature_labels.labels_for(relative, args.label_from)
        known = [i for i, label in enumerate(truth) if label in labels]
        if not known:
            print(f"note: no file has a true label among {labels} by the {args.label_from!r} rule; no report")
            return status
        report = classify.classification_report([truth[i] for i in known], [zero.predicted[i] for i in known],
                                                labels, seed=int(cfg["SEED"]))
        report["prompts"] = prompts
        path = Path(args.report) if args.report else output.with_name(output.stem + ".report.json")
        atomic_write_text(path, json.dumps(report, indent=2) + "\n")
        print(classify.format_report(report))
        print(f"report: {path}")
    return status


if __name__ == "__main__":
    sys.exit(main())
