"""Classification of held-out pieces by the base model and by the base with its adapters: zero-shot
(each piece gets the label whose prompt, e.g. "a reel", is nearest) and a linear probe (trained on the
features of a labelled training set, applied to the test set). Both systems see the same pieces, so
their accuracies are compared piece by piece (paired bootstrap interval and sign-flip p-value).

A labelled set is a JSONL file of records ``{"id", "filepaths": [one file, relative to the JSONL's
folder], "<label field>": label}``; any file type the raw-file tools read will do (``rawfiles``), so
the features come from the same path as ``clamp3_embd.py``, cache included.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import classify
import feature_labels
import metrics
import numpy as np
from embedder import Embedded, Embedder, choose_models
from fileio import DropLog, atomic_write_text, file_sha256, iter_jsonl, repo_path
from formats import BASELINE, LORA, SYSTEMS

TASKS = ("zero_shot", "probe")


class ClassificationSetupError(RuntimeError):
    """A classification run that cannot start as asked (missing set, too few labels...)."""


@dataclass
class LabelledSet:
    jsonl: Path
    ids: list[str]
    paths: list[Path]
    labels: list[str]

    def subset(self, keep: list[int]) -> LabelledSet:
        return LabelledSet(self.jsonl, [self.ids[i] for i in keep], [self.paths[i] for i in keep],
                           [self.labels[i] for i in keep])


def read_labelled_set(jsonl: str | Path, label_field: str = "label", labels: list[str] | None = None) -> LabelledSet:
    """The records of ``jsonl`` that have a label (in ``labels``, when given) and one file."""
    jsonl = Path(jsonl)
    if not jsonl.is_file():
        raise ClassificationSetupError(f"labelled set not found: {jsonl}")
    result = LabelledSet(jsonl, [], [], [])
    for number, record in iter_jsonl(jsonl):
        label = record.get(label_field)
        files = record.get("filepaths") or []
        if not isinstance(label, str) or not label or (labels is not None and label not in labels):
            continue
        if not files:
            raise ClassificationSetupError(f"{jsonl}:{number}: record has no filepaths")
        result.ids.append(str(record.get("id", files[0])))
        result.paths.append(jsonl.parent / files[0])
        result.labels.append(label)
    if not result.ids:
        raise ClassificationSetupError(f"{jsonl} has no records with a {label_field!r} label"
                                       + (f" among {labels}" if labels else ""))
    return result


def features_of(embedder: Embedder, items: LabelledSet, drops: DropLog) -> tuple[LabelledSet, np.ndarray]:
    """Global features of the set's files (a file that fails is named in ``drops`` and left out)."""
    results = embedder.embed_files(items.paths, drops=drops)
    keep = [i for i, result in enumerate(results) if isinstance(result, Embedded)]
    if not keep:
        raise ClassificationSetupError(f"no file of {items.jsonl} could be embedded (see {drops.path})")
    matrix = np.concatenate([results[i].feature for i in keep]).astype(np.float32)
    return items.subset(keep), matrix


def evaluate_system(embedder: Embedder, train: LabelledSet, test: LabelledSet, labels: list[str],
                    template: str, probe_config: classify.ProbeConfig, n_resamples: int, seed: int,
                    drops: DropLog, log: Callable[[str], None]) -> dict[str, Any]:
    """Zero-shot and linear-probe predictions of one system on ``test`` (with per-piece correctness)."""
    prompts = classify.prompt_texts(labels, template)
    try:  # the prompts first: the weights and the tokenizer are checked before any file is embedded
        prompt_features = embedder.embed_texts(prompts)
    except RuntimeError as exc:
        raise ClassificationSetupError(str(exc)) from exc
    train, train_features = features_of(embedder, train, drops)
    test, test_features = features_of(embedder, test, drops)
    log(f"  features: {len(train.ids)} training and {len(test.ids)} test pieces")
    zero = classify.zero_shot(test_features, prompt_features, labels)
    train_rows, valid_rows = feature_labels.split_train_validation(train.labels, 0.1, seed)
    probe = classify.LinearProbe.fit(
        train_features[train_rows], [train.labels[i] for i in train_rows], probe_config,
        validation=(train_features[valid_rows], [train.labels[i] for i in valid_rows]), label_order=labels)
    probe_predictions = probe.predict(test_features)
    majority = max(labels, key=lambda label: (train.labels.count(label), -labels.index(label)))
    result: dict[str, Any] = {"test_ids": test.ids, "n_train": len(train.ids), "prompts": prompts}
    for task, predicted in (("zero_shot", zero.predicted), ("probe", probe_predictions)):
        report = classify.classification_report(test.labels, predicted, labels, n_resamples=n_resamples, seed=seed,
                                                majority_label=majority)
        report["correct"] = [int(p == t) for p, t in zip(predicted, test.labels, strict=True)]
        report["predictions"] = dict(zip(test.ids, predicted, strict=True))
        result[task] = report
        log(f"  {task}: accuracy {report['accuracy']:.4f}, macro F1 {report['macro_f1']:.4f}")
    return result


def compare_systems(results: dict[str, dict[str, Any]], n_resamples: int, seed: int) -> dict[str, Any]:
    """Adapters − base, per task: accuracy difference on the pieces both systems classified."""
    if set(SYSTEMS) - set(results):
        return {}
    base, adapted = results[BASELINE], results[LORA]
    shared = sorted(set(base["test_ids"]) & set(adapted["test_ids"]))
    comparison = {}
    for task in TASKS:
        def correct(system: dict[str, Any], task: str = task) -> np.ndarray:
            by_id = dict(zip(system["test_ids"], system[task]["correct"], strict=True))
            return np.array([by_id[i] for i in shared], dtype=np.float64)

        comparison[task] = metrics.paired_difference(correct(adapted), correct(base), n_resamples, seed)
    return comparison


def summary_lines(report: dict[str, Any]) -> list[str]:
    lines = [f"classification of {report['test']['jsonl']} (labels: {', '.join(report['labels'])}; "
             f"zero-shot prompt {report['template']!r}; probe trained on {report['train']['jsonl']})"]
    for system, result in report["systems"].items():
        for task in TASKS:
            numbers = result[task]
            low, high = numbers["interval"].get("accuracy", [float("nan")] * 2)
            lines.append(f"  {system:>8} {task:>9}: accuracy {numbers['accuracy']:.3f} [{low:.3f}, {high:.3f}], "
                         f"macro F1 {numbers['macro_f1']:.3f} (n = {numbers['n']}; majority "
                         f"{numbers['baselines']['majority'].get('accuracy', 0):.3f}, chance "
                         f"{numbers['baselines']['uniform']['accuracy']:.3f})")
    for task, diff in report.get("comparison", {}).items():
        verdict = "the interval excludes 0" if diff["ci"][0] > 0 or diff["ci"][1] < 0 else "not distinguishable"
        lines.append(f"  {LORA} - {BASELINE}, {task}: {diff['mean_diff']:+.3f} [{diff['ci'][0]:+.3f}, {diff['ci'][1]:+.3f}]"
                     f", p = {diff['p_value']:.3g} ({verdict}; n = {diff['n']})")
    return lines


def run(args: argparse.Namespace, cfg: dict[str, Any], systems: list[str]) -> int:
    """The whole of ``classification/evaluate_cls.py`` once its arguments are parsed and ``systems``
    checked (``evaluation.cli``): 0 on success, 2 on a setup error (printed)."""

    def log(message: str) -> None:
        if not args.quiet:
            print(message, flush=True)

    try:
        return _run(args, cfg, systems, log)
    except (ClassificationSetupError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace, cfg: dict[str, Any], systems: list[str], log: Callable[[str], None]) -> int:
    wanted = [s.strip() for s in args.labels.split(",")] if args.labels else None
    test = read_labelled_set(args.test, args.label_field, wanted)
    if wanted is None:
        wanted = sorted({label for label in test.labels if test.labels.count(label) >= args.min_count},
                        key=lambda label: (-test.labels.count(label), label))
        test = read_labelled_set(args.test, args.label_field, wanted)
    if len(wanted) < 2:
        raise ClassificationSetupError(f"{args.test}: fewer than two labels with {args.min_count} pieces or more")
    train = read_labelled_set(args.train, args.label_field, wanted)
    seed, n_resamples = int(cfg["SEED"]), int(cfg["EVAL_BOOTSTRAP"])
    probe_config = classify.ProbeConfig(seed=seed)
    results: dict[str, dict[str, Any]] = {}
    described: dict[str, list[str]] = {}
    with DropLog("classification", args.error_log, echo=lambda m: print(m, file=sys.stderr)) as drops:
        for system in systems:
            choice = choose_models(cfg, weights=args.weights, model_config=args.model_config,
                                            no_adapter=system == BASELINE)
            if system == LORA and not any(choice.adapters.values()):
                log("adapters: no adapter found (LORA_ABC_ADAPTER_DIR / LORA_MTF_ADAPTER_DIR): left out")
                continue
            cache_dir = Path(args.cache_dir) if args.cache_dir else repo_path(choice.cfg["RAWFILE_CACHE_DIR"])
            embedder = Embedder(choice, cache_dir=cache_dir, abc_mode=args.abc_mode)
            described[system] = choice.describe()
            log(f"[{system}] " + described[system][0])
            results[system] = evaluate_system(embedder, train, test, wanted, args.template, probe_config,
                                              n_resamples, seed, drops, log)
    report = {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "labels": wanted, "label_field": args.label_field, "template": args.template,
        "train": {"jsonl": str(train.jsonl), "sha256": file_sha256(train.jsonl), "n": len(train.ids),
                  "counts": {label: train.labels.count(label) for label in wanted}},
        "test": {"jsonl": str(test.jsonl), "sha256": file_sha256(test.jsonl), "n": len(test.ids),
                 "counts": {label: test.labels.count(label) for label in wanted}},
        "models": described, "probe": vars(probe_config), "seed": seed, "n_resamples": n_resamples,
        "systems": results, "comparison": compare_systems(results, n_resamples, seed),
    }
    output = Path(args.output) if args.output else repo_path(cfg["RESULTS_DIR"]) / f"classification_{test.jsonl.stem}.json"
    atomic_write_text(output, json.dumps(report, indent=2) + "\n")
    lines = summary_lines(report)
    atomic_write_text(output.with_suffix(".txt"), "\n".join(lines) + "\n")
    for line in lines:
        print(line)
    print(f"report: {output}")
    return 0
