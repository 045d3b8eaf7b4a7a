"""Labels of feature files, and the labelled arrays a classifier trains on: numpy only, no torch,
so the classification scripts can parse their arguments (``LABEL_RULES``) before ``classify`` loads it.

**Labels.** The official rule takes a file's basename up to the first underscore
(``pop_12.npy`` -> ``pop``; a name without an underscore keeps its whole basename, extension
included, exactly as the official scripts do). ``folder`` takes the first sub-folder of the file's
path relative to the feature root (``pop/x.npy`` -> ``pop``). A label file (CSV with a header holding
``key`` or ``path`` and ``label``, or JSONL objects with the same fields) maps keys to labels; every key
or path is reduced with ``retrieval.feature_key`` (folder relative to the feature root + name up to the
first dot), so ``pop/x.abc``, ``pop/x.npy`` and ``pop/x`` name the same file.

**Training data** (``load_training_data``, what ``classification/train_cls.py`` trains on): the
labelled files of a feature folder, with a validation folder or a seeded, stratified split of the
training files; files without a label are left out with a note, and input no classifier can learn
from (one label, validation labels never seen in training, mismatched dimensions) is an
``UnusableDataError`` naming a file.
"""

from __future__ import annotations

import csv
import io
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
from fileio import find_files, iter_jsonl
from retrieval import (
    FEATURE_EXTENSION,
    FeatureFileError,
    FeatureSet,
    feature_key,
    load_feature,
    load_feature_folder,
)

LABEL_RULES = ("name", "folder")


class LabelError(ValueError):
    """A label file or label assignment that cannot be used (the message names the file and line)."""


class UnusableDataError(ValueError):
    """Features no classifier can be trained on; the message says which file or folder and why."""


# --------------------------------------------------------------------------------------------- labels

def label_from_name(path: str | os.PathLike) -> str:
    """The official label of a feature file: its basename up to the first underscore."""
    return os.path.basename(os.fspath(path)).split("_")[0]


def label_from_folder(relative: str | os.PathLike) -> str | None:
    """The first sub-folder of a path relative to the feature root; ``None`` for a file at the top."""
    parts = Path(relative).parts
    return parts[0] if len(parts) > 1 else None


def _key_of(text: str) -> str:
    text = text.strip().replace("\\", "/")
    while text.startswith("./"):
        text = text[2:]
    return feature_key(text)


def read_label_file(path: str | os.PathLike) -> dict[str, str]:
    """Key -> label from a CSV (header with ``key`` or ``path``, and ``label``) or a JSONL file of
    ``{"key" or "path": ..., "label": ...}``; the format is told by the extension (``.csv``,
    ``.jsonl``/``.json``), else by the first character. A key given twice with different labels,
    a missing field or an empty label is an error naming the line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise LabelError(f"{path}: cannot be read ({exc})") from exc
    suffix = path.suffix.lower()
    is_jsonl = suffix in (".jsonl", ".json") or (suffix != ".csv" and text.lstrip().startswith("{"))
    rows = _jsonl_label_rows(path) if is_jsonl else _csv_label_rows(path, text)
    labels: dict[str, str] = {}
    for where, raw_key, raw_label in rows:
        if raw_key is None or raw_label is None:
            raise LabelError(f"{where}: needs a key (or path) and a label")
        label = str(raw_label).strip()
        key = _key_of(str(raw_key))
        if not label or not key:
            raise LabelError(f"{where}: empty key or label")
        if labels.get(key, label) != label:
            raise LabelError(f"{where}: key {key!r} has label {label!r}, but an earlier line gave {labels[key]!r}")
        labels[key] = label
    if not labels:
        raise LabelError(f"{path}: holds no labels")
    return labels


def _jsonl_label_rows(path: Path) -> list[tuple[str, object, object]]:
    try:
        return [(f"{path}:{number}", obj.get("key", obj.get("path")), obj.get("label"))
                for number, obj in iter_jsonl(path)]
    except ValueError as exc:
        raise LabelError(str(exc)) from exc


def _csv_label_rows(path: Path, text: str) -> list[tuple[str, object, object]]:
    reader = csv.DictReader(io.StringIO(text))
    fields = [name.strip() for name in reader.fieldnames or []]
    key_field = "key" if "key" in fields else "path" if "path" in fields else None
    if key_field is None or "label" not in fields:
        raise LabelError(f"{path}: a label CSV needs a header with columns key (or path) and label, got {fields}")
    reader.fieldnames = fields
    # Line numbers count the header as line 1, as an editor shows them.
    return [(f"{path}:{number}", row.get(key_field), row.get("label")) for number, row in enumerate(reader, 2)]


def labels_for(files: Sequence[str | os.PathLike], rule: str = "name",
               label_map: Mapping[str, str] | None = None) -> list[str | None]:
    """The label of each file (paths relative to the feature root): from ``label_map`` (keys as
    ``read_label_file`` gives) when one is given, else by ``rule`` (``name`` or ``folder``);
    ``None`` where a file has none."""
    if label_map is not None:
        return [label_map.get(_key_of(Path(f).as_posix())) for f in files]
    if rule == "name":
        return [label_from_name(f) for f in files]
    if rule == "folder":
        return [label_from_folder(f) for f in files]
    raise ValueError(f"unknown label rule {rule!r}; expected one of {LABEL_RULES}")


def load_features_tolerant(root: str | os.PathLike, dimension: int | None = None
                           ) -> tuple[FeatureSet, list[tuple[str, str]]]:
    """Every ``.npy`` feature under ``root``, leaving out (not raising on) files that cannot be read or
    whose dimension differs from ``dimension`` (default: the first good file's): ``(features,
    [(path, reason), ...])``. No ``.npy`` file at all raises ``FileNotFoundError``."""
    relatives = find_files(root, [FEATURE_EXTENSION])
    if not relatives:
        raise FileNotFoundError(f"no {FEATURE_EXTENSION} files under {root}")
    files: list[Path] = []
    vectors: list[np.ndarray] = []
    skipped: list[tuple[str, str]] = []
    for relative in relatives:
        path = os.path.join(root, *relative.parts)
        try:
            vector = load_feature(path)
        except FeatureFileError as exc:
            skipped.append((path, str(exc).removeprefix(f"{path}: ")))
            continue
        if dimension is None:
            dimension = int(vector.shape[0])
        if vector.shape[0] != dimension:
            skipped.append((path, f"dimension {vector.shape[0]}, expected {dimension}"))
            continue
        files.append(relative)
        vectors.append(vector)
    matrix = np.stack(vectors) if vectors else np.empty((0, dimension or 0), dtype=np.float32)
    return FeatureSet(str(root), files, [feature_key(f.as_posix()) for f in files], matrix), skipped


# ------------------------------------------------------------------------------------------- splits

def split_train_validation(labels: Sequence[str], fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Seeded ``(train indices, validation indices)``, stratified: each label with at least two items
    gives ``round(fraction × n)`` of them (at least one, never all) to validation; a label seen once
    stays in training. Indices come back sorted."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"the validation fraction must be in [0, 1), got {fraction}")
    rng = np.random.default_rng(seed)
    by_label: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        by_label.setdefault(label, []).append(i)
    validation: list[int] = []
    if fraction > 0:
        # Sorted labels: the split must not depend on the order in which labels first appear.
        for label in sorted(by_label):
            members = np.array(by_label[label])
            if len(members) < 2:
                continue
            count = min(max(1, round(fraction * len(members))), len(members) - 1)
            validation.extend(rng.permutation(members)[:count].tolist())
    held = np.zeros(len(labels), dtype=bool)
    held[validation] = True
    return np.flatnonzero(~held), np.flatnonzero(held)


# ------------------------------------------------------------------------------------ training data

class LabelledRows(NamedTuple):
    """Feature rows ``(N, D)`` with their labels and file paths, in the same order."""

    vectors: np.ndarray
    labels: list[str]
    paths: list[str]


@dataclass
class TrainingData:
    """What a probe trains on: training and validation rows (validation may be empty) and the
    label order (sorted), which is the checkpoint's label indices."""

    train: LabelledRows
    validation: LabelledRows
    label_order: list[str]


def _stderr_note(message: str) -> None:
    print(message, file=sys.stderr)


def labelled_rows(features: FeatureSet, rule: str, label_map: Mapping[str, str] | None, source: str,
                  note: Callable[[str], None] = _stderr_note) -> tuple[list[int], list[str]]:
    """Rows of ``features`` that have a label, and their labels; unlabelled files are named in a
    ``note``. ``source`` says where labels come from, for the messages."""
    labels = labels_for(features.files, rule, label_map)
    rows = [i for i, label in enumerate(labels) if label is not None]
    missing = [features.path(i) for i, label in enumerate(labels) if label is None]
    if missing:
        note(f"note: {len(missing)} of {len(features)} files under {features.root} have no label ({source}) "
             f"and are left out, e.g. {missing[0]}")
    if not rows:
        hint = "; keys are paths relative to the feature folder, name up to the first dot" if label_map else ""
        raise UnusableDataError(f"no file under {features.root} has a label ({source}{hint})")
    return rows, [labels[i] for i in rows]


def load_training_data(train_folder: str, eval_folder: str | None = None, eval_split: float = 0.2, seed: int = 0,
                       label_from: str = "name", labels_file: str | None = None,
                       note: Callable[[str], None] = _stderr_note) -> TrainingData:
    """The labelled training and validation rows, by ``label_from`` or from ``labels_file``: the
    validation rows from ``eval_folder``, else a stratified ``eval_split`` of the training files
    (``split_train_validation``). Raises ``FileNotFoundError``, ``retrieval.FeatureFileError``,
    ``LabelError`` or ``UnusableDataError``, each naming a file."""
    label_map = read_label_file(labels_file) if labels_file else None
    source = f"from {labels_file}" if labels_file else f"label rule {label_from!r}"
    train_set = load_feature_folder(train_folder)
    rows, labels = labelled_rows(train_set, label_from, label_map, source, note)
    vectors, paths = train_set.vectors[rows], [train_set.path(i) for i in rows]
    distinct = sorted(set(labels))
    if len(distinct) < 2:
        raise UnusableDataError(f"all {len(labels)} labelled files under {train_folder} have the label "
                                f"{distinct[0]!r} ({source}; e.g. {paths[0]}); a classifier needs at least two labels")
    if eval_folder:
        eval_set = load_feature_folder(eval_folder)
        if eval_set.dimension != train_set.dimension:
            raise UnusableDataError(f"{eval_set.path(0)}: dimension {eval_set.dimension}, but the training "
                                    f"features (e.g. {train_set.path(0)}) have {train_set.dimension}")
        eval_rows, eval_labels = labelled_rows(eval_set, label_from, label_map, source, note)
        unseen = sorted(set(eval_labels) - set(distinct))
        if unseen:
            example = eval_set.path(eval_rows[eval_labels.index(unseen[0])])
            raise UnusableDataError(f"{len(unseen)} validation labels never occur in training: {unseen[:10]} "
                                    f"(e.g. {example})")
        validation = LabelledRows(eval_set.vectors[eval_rows], eval_labels, [eval_set.path(i) for i in eval_rows])
        return TrainingData(LabelledRows(vectors, labels, paths), validation, distinct)
    train_idx, val_idx = split_train_validation(labels, eval_split, seed)

    def pick(indices: np.ndarray) -> LabelledRows:
        return LabelledRows(vectors[indices], [labels[i] for i in indices], [paths[i] for i in indices])

    return TrainingData(pick(train_idx), pick(val_idx), distinct)
