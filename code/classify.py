"""Classification on global CLaMP 3 features: a linear probe in the official checkpoint layout,
zero-shot labels by cosine similarity, and a classification report. Arrays only; no CLaMP 3 model is
loaded here (``classification/`` scripts and the raw-file tools feed it features). Which label a file
has, and the labelled arrays a probe trains on, are ``feature_labels``' (no torch there).

**Checkpoint** (what the official ``train_cls.py`` saves and ``inference_cls.py`` loads):
``{"model": {"fc.weight": (L, D), "fc.bias": (L,)}, "labels": {label: index}, "input_size": D,
"epoch", "best_epoch", "max_eval_acc", ...}``, only tensors and plain values, so it loads with
``torch.load(weights_only=True)``. A JSON sidecar (``<stem>.summary.json``) keeps the training summary.
"""

from __future__ import annotations

import io
import json
import os
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from fileio import atomic_write_bytes, atomic_write_text
from metrics import bootstrap_interval
from torch import nn

CHECKPOINT_KEYS = ("model", "labels", "input_size")
# On equal validation accuracy, a later epoch is better only if its validation loss is lower by more
# than this: on separable data the loss keeps shrinking by tiny amounts, which must not defeat
# early stopping.
LOSS_TOLERANCE = 1e-3


class CheckpointError(ValueError):
    """A classifier checkpoint that is not in the official layout (the message names the file)."""


# --------------------------------------------------------------------------------------- the probe

@dataclass
class ProbeConfig:
    """How a ``LinearProbe`` is trained. ``batch_size`` 0 means full batch; ``patience`` 0 disables
    early stopping; ``balanced`` weights the loss by inverse label frequency."""

    num_epochs: int = 200
    learning_rate: float = 1e-3
    weight_decay: float = 0.01
    batch_size: int = 64
    patience: int = 30
    balanced: bool = False
    seed: int = 0

    def check(self) -> None:
        if self.num_epochs < 1:
            raise ValueError(f"num_epochs must be positive, got {self.num_epochs}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")
        if self.weight_decay < 0 or self.batch_size < 0 or self.patience < 0:
            raise ValueError("weight_decay, batch_size and patience must not be negative")


@dataclass
class TrainingSummary:
    """What ``LinearProbe.fit`` did: sizes, the best epoch and its validation numbers, every epoch."""

    config: dict
    n_train: int
    n_validation: int
    epochs_run: int
    best_epoch: int
    max_eval_acc: float | None
    best_eval_macro_f1: float | None
    best_eval_loss: float | None
    stopped_early: bool
    history: list[dict] = field(default_factory=list)


class _Head(nn.Module):
    """One linear layer named ``fc``: the state-dict keys are the official ``fc.weight``/``fc.bias``."""

    def __init__(self, input_size: int, n_labels: int):
        super().__init__()
        self.fc = nn.Linear(input_size, n_labels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


class LinearProbe:
    """A softmax linear classifier on ``(N, D)`` features, labels in a fixed order (index = row)."""

    def __init__(self, labels: Sequence[str], input_size: int):
        if len(set(labels)) != len(labels):
            raise ValueError("labels must be distinct")
        self.labels = list(labels)
        self.input_size = int(input_size)
        self.head = _Head(self.input_size, len(self.labels))
        # Zero start: the problem is convex, so nothing is lost, and no random draw has to be seeded.
        with torch.no_grad():
            self.head.fc.weight.zero_()
            self.head.fc.bias.zero_()
        self.head.eval()
        self.summary: TrainingSummary | None = None
        self.checkpoint_extra: dict = {}

    @property
    def label_index(self) -> dict[str, int]:
        return {label: i for i, label in enumerate(self.labels)}

    # ---- prediction

    def _matrix(self, features: np.ndarray) -> torch.Tensor:
        array = np.asarray(features, dtype=np.float32)
        if array.ndim == 1:
            array = array[None]
        if array.ndim != 2 or array.shape[1] != self.input_size:
            raise ValueError(f"features of shape {array.shape} do not match the probe's input size {self.input_size}")
        return torch.from_numpy(np.ascontiguousarray(array))

    def logits(self, features: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return self.head(self._matrix(features)).numpy()

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        """``(N, L)`` softmax probabilities, columns in ``self.labels`` order."""
        with torch.no_grad():
            return torch.softmax(self.head(self._matrix(features)), dim=1).numpy()

    def predict(self, features: np.ndarray) -> list[str]:
        """The most probable label of each row (the first label on an exact tie, as ``argmax``)."""
        return [self.labels[i] for i in self.logits(features).argmax(axis=1)]

    # ---- training

    @classmethod
    def fit(cls, features: np.ndarray, labels: Sequence[str], config: ProbeConfig | None = None,
            validation: tuple[np.ndarray, Sequence[str]] | None = None,
            label_order: Sequence[str] | None = None,
            log: Callable[[dict], None] | None = None) -> LinearProbe:
        """Train on ``features``/``labels`` with AdamW, keeping the epoch with the best validation
        accuracy (ties: a validation loss lower by more than ``LOSS_TOLERANCE``); without ``validation`` every epoch runs and the
        last is kept. Deterministic for a given ``config.seed`` (zero start, seeded batch order).
        ``log`` is called with each epoch's row of the history.

        Runs on one thread (restored afterwards): the steps are far too small to gain from more, on a
        busy machine more are several times slower, and the result then does not depend on the
        machine's thread count."""
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return cls._fit(features, labels, config, validation, label_order, log)
        finally:
            torch.set_num_threads(threads)

    @classmethod
    def _fit(cls, features: np.ndarray, labels: Sequence[str], config: ProbeConfig | None,
             validation: tuple[np.ndarray, Sequence[str]] | None, label_order: Sequence[str] | None,
             log: Callable[[dict], None] | None) -> LinearProbe:
        config = config or ProbeConfig()
        config.check()
        x = np.asarray(features, dtype=np.float32)
        if x.ndim != 2 or x.shape[0] != len(labels) or x.shape[0] == 0:
            raise ValueError(f"features of shape {x.shape} for {len(labels)} labels")
        order = list(label_order) if label_order is not None else sorted(set(labels))
        if len(order) < 2:
            raise ValueError(f"a classifier needs at least two labels, got {order}")
        probe = cls(order, x.shape[1])
        index = probe.label_index
        unknown = sorted(set(labels) - set(index))
        if unknown:
            raise ValueError(f"training labels missing from label_order: {unknown}")
        train_x = torch.from_numpy(np.ascontiguousarray(x))
        train_y = torch.tensor([index[label] for label in labels], dtype=torch.int64)
        val_x = val_y = None
        if validation is not None and len(validation[1]):
            unseen = sorted(set(validation[1]) - set(index))
            if unseen:
                raise ValueError(f"validation labels not among the training labels: {unseen}")
            val_x = probe._matrix(validation[0])
            val_y = torch.tensor([index[label] for label in validation[1]], dtype=torch.int64)

        weight = None
        if config.balanced:
            counts = torch.bincount(train_y, minlength=len(order)).to(torch.float32)
            # n / (L × count): a label's share of the loss no longer follows its frequency; a label
            # absent from training (only possible with label_order) gets weight 0 instead of inf.
            weight = torch.where(counts > 0, len(train_y) / (len(order) * counts.clamp(min=1)), torch.zeros(()))
        loss_fn = nn.CrossEntropyLoss(weight=weight)
        head = probe.head
        optimizer = torch.optim.AdamW(head.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
        generator = torch.Generator().manual_seed(config.seed)
        n = len(train_y)
        batch = config.batch_size if 0 < config.batch_size < n else n

        history: list[dict] = []
        best_state = {k: v.clone() for k, v in head.state_dict().items()}
        best_row: dict = {}
        since_best = 0
        stopped_early = False
        for epoch in range(1, config.num_epochs + 1):
            head.train()
            order_idx = torch.randperm(n, generator=generator) if batch < n else torch.arange(n)
            loss_sum, correct = 0.0, 0
            for start in range(0, n, batch):
                rows = order_idx[start:start + batch]
                logits = head(train_x[rows])
                loss = loss_fn(logits, train_y[rows])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                loss_sum += loss.item() * len(rows)
                correct += int((logits.argmax(1) == train_y[rows]).sum())
            head.eval()
            row = {"epoch": epoch, "train_loss": loss_sum / n, "train_acc": correct / n}
            if val_x is not None:
                with torch.no_grad():
                    val_logits = head(val_x)
                    val_loss = float(F.cross_entropy(val_logits, val_y))
                predicted = val_logits.argmax(1).numpy()
                truth = val_y.numpy()
                row.update(eval_loss=val_loss, eval_acc=float(np.mean(predicted == truth)),
                           eval_macro_f1=_macro_f1(confusion_matrix_indices(truth, predicted, len(order))))
                improved = best_row == {} or row["eval_acc"] > best_row["eval_acc"] or (
                    row["eval_acc"] == best_row["eval_acc"] and val_loss < best_row["eval_loss"] - LOSS_TOLERANCE)
            else:
                improved = True
            history.append(row)
            if log is not None:
                log(row)
            if improved:
                best_state = {k: v.clone() for k, v in head.state_dict().items()}
                best_row = row
                since_best = 0
            else:
                since_best += 1
                if config.patience and since_best >= config.patience:
                    stopped_early = True
                    break
        head.load_state_dict(best_state)
        head.eval()
        probe.summary = TrainingSummary(
            config=asdict(config), n_train=n, n_validation=0 if val_y is None else len(val_y),
            epochs_run=len(history), best_epoch=best_row["epoch"], max_eval_acc=best_row.get("eval_acc"),
            best_eval_macro_f1=best_row.get("eval_macro_f1"), best_eval_loss=best_row.get("eval_loss"),
            stopped_early=stopped_early, history=history)
        return probe

    # ---- checkpoint

    def checkpoint(self) -> dict:
        """The official checkpoint layout (tensors and plain values only)."""
        state = {k: v.detach().clone().contiguous() for k, v in self.head.state_dict().items()}
        summary = self.summary
        return {
            "model": state,
            "labels": self.label_index,
            "input_size": self.input_size,
            "epoch": summary.epochs_run if summary else 0,
            "best_epoch": summary.best_epoch if summary else 0,
            "max_eval_acc": summary.max_eval_acc if summary else None,
            **self.checkpoint_extra,
        }

    def save(self, path: str | os.PathLike, extra: Mapping | None = None) -> Path:
        """The checkpoint at ``path`` and the training summary at ``summary_path(path)``, both atomically.
        ``extra``: further JSON-able facts (folders, label rule) for the summary."""
        buffer = io.BytesIO()
        torch.save(self.checkpoint(), buffer)
        path = atomic_write_bytes(path, buffer.getvalue())
        sidecar = {"weights": str(path), "labels": self.labels, "input_size": self.input_size,
                   **(dict(extra) if extra else {}),
                   "training": asdict(self.summary) if self.summary else None}
        atomic_write_text(summary_path(path), json.dumps(sidecar, indent=2, ensure_ascii=False) + "\n")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> LinearProbe:
        """A checkpoint in the official layout (ours or the official ``train_cls.py``'s), loaded with
        ``weights_only=True``; anything off raises ``CheckpointError`` naming the file."""
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise
        except Exception as exc:  # noqa: BLE001 - unpickling errors come in many types
            raise CheckpointError(f"{path}: cannot be loaded with weights_only=True ({exc})") from exc
        if not isinstance(data, dict) or any(k not in data for k in CHECKPOINT_KEYS):
            found = sorted(data) if isinstance(data, dict) else type(data).__name__
            raise CheckpointError(f"{path}: not a classifier checkpoint (needs keys {list(CHECKPOINT_KEYS)}, "
                                  f"found {found})")
        state, label_map = data["model"], data["labels"]
        if not isinstance(state, Mapping) or set(state) != {"fc.weight", "fc.bias"}:
            raise CheckpointError(f"{path}: 'model' must hold exactly fc.weight and fc.bias")
        if not isinstance(label_map, Mapping) or sorted(label_map.values()) != list(range(len(label_map))):
            raise CheckpointError(f"{path}: 'labels' must map each label to a distinct index 0..L-1")
        labels = [str(label) for label, _ in sorted(label_map.items(), key=lambda item: item[1])]
        input_size = int(data["input_size"])
        expected = {"fc.weight": (len(labels), input_size), "fc.bias": (len(labels),)}
        for key, shape in expected.items():
            if tuple(state[key].shape) != shape:
                raise CheckpointError(f"{path}: {key} has shape {tuple(state[key].shape)}, expected {shape} "
                                      f"for {len(labels)} labels and input size {input_size}")
        probe = cls(labels, input_size)
        probe.head.load_state_dict({k: v.to(torch.float32) for k, v in state.items()})
        probe.head.eval()
        # Kept so that saving a loaded checkpoint again loses nothing of what its trainer recorded.
        probe.checkpoint_extra = {k: v for k, v in data.items() if k not in CHECKPOINT_KEYS}
        return probe


def summary_path(weights: str | os.PathLike) -> Path:
    """Where the training summary of a checkpoint goes: ``weights-x.pth`` -> ``weights-x.summary.json``."""
    return Path(weights).with_suffix(".summary.json")


def report_path(weights: str | os.PathLike) -> Path:
    """Where the validation report of a checkpoint goes: ``weights-x.pth`` -> ``weights-x.report.json``."""
    return Path(weights).with_suffix(".report.json")


# ---------------------------------------------------------------------------------------- zero-shot

def prompt_texts(labels: Sequence[str], template: str = "a {label}") -> list[str]:
    """One text per label for the text tower, ``template`` filled with the label."""
    if "{label}" not in template:
        raise ValueError(f"the template {template!r} has no {{label}} field")
    return [template.format(label=label) for label in labels]


@dataclass(frozen=True)
class ZeroShotResult:
    """``predicted[i]`` = ``labels[indices[i]]``; ``scores`` = ``(N, L)`` cosine similarities."""

    predicted: list[str]
    indices: np.ndarray
    scores: np.ndarray


def _unit_rows(matrix: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    # A zero vector has cosine 0 with everything rather than NaN.
    return matrix / np.where(norms > 0, norms, 1.0)


def zero_shot(music_features: np.ndarray, label_features: np.ndarray, labels: Sequence[str]) -> ZeroShotResult:
    """Each music feature's label = the label whose (text) feature is most cosine-similar (the first
    label on an exact tie)."""
    music = np.asarray(music_features, dtype=np.float64)
    texts = np.asarray(label_features, dtype=np.float64)
    if music.ndim == 1:
        music = music[None]
    if texts.ndim != 2 or texts.shape[0] != len(labels):
        raise ValueError(f"label features of shape {texts.shape} for {len(labels)} labels")
    if music.ndim != 2 or music.shape[1] != texts.shape[1]:
        raise ValueError(f"music features of shape {music.shape} do not match label features {texts.shape}")
    scores = (_unit_rows(music) @ _unit_rows(texts).T).astype(np.float32)
    indices = scores.argmax(axis=1) if len(labels) else np.zeros(len(music), dtype=np.int64)
    return ZeroShotResult([labels[i] for i in indices], indices, scores)


# ------------------------------------------------------------------------------------------- report

def confusion_matrix_indices(true: np.ndarray, predicted: np.ndarray, n_labels: int) -> np.ndarray:
    """``(L, L)`` counts from label indices: rows = true, columns = predicted."""
    true, predicted = np.asarray(true, dtype=np.int64), np.asarray(predicted, dtype=np.int64)
    return np.bincount(true * n_labels + predicted, minlength=n_labels * n_labels).reshape(n_labels, n_labels)


def _per_label(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    tp = np.diag(cm).astype(np.float64)
    predicted, support = cm.sum(axis=0), cm.sum(axis=1)
    # An undefined ratio (no prediction / no item of the label) counts as 0, sklearn's zero_division=0.
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    total = precision + recall
    f1 = np.divide(2 * precision * recall, total, out=np.zeros_like(tp), where=total > 0)
    return precision, recall, f1


def _macro_f1(cm: np.ndarray) -> float:
    """Mean F1 over the labels that occur among the true or the predicted labels (a label that is in
    neither says nothing about this set and would only pull the mean towards 0)."""
    present = (cm.sum(axis=0) + cm.sum(axis=1)) > 0
    return float(_per_label(cm)[2][present].mean()) if present.any() else 0.0


def _expected_uniform_macro_f1(support: np.ndarray) -> float:
    """F1 of a label under uniform random guessing, in expectation (precision → its share p, recall
    → 1/L), averaged over the labels present."""
    n, n_labels = support.sum(), len(support)
    if n == 0 or n_labels == 0:
        return 0.0
    share = support[support > 0] / n
    return float(np.mean(2 * share / n_labels / (share + 1 / n_labels)))


def classification_report(true: Sequence[str], predicted: Sequence[str], labels: Sequence[str],
                          n_resamples: int = 1000, seed: int = 0, level: float = 0.95,
                          majority_label: str | None = None) -> dict:
    """Accuracy, macro F1 (over labels present among true or predicted), per-label precision, recall,
    F1 and support, the confusion matrix (rows = true, columns = predicted, in ``labels`` order), the
    majority-class and uniform-chance baselines, and percentile bootstrap intervals of accuracy and
    macro F1. ``majority_label`` (e.g. the training set's most frequent label) defaults to this
    set's most frequent true label. A label outside ``labels`` is an error."""
    labels = list(labels)
    if len(true) != len(predicted):
        raise ValueError(f"{len(true)} true labels but {len(predicted)} predictions")
    index = {label: i for i, label in enumerate(labels)}
    unknown = sorted({str(x) for x in (*true, *predicted) if x not in index})
    if unknown:
        raise ValueError(f"labels missing from the label list: {unknown}")
    t = np.array([index[x] for x in true], dtype=np.int64)
    p = np.array([index[x] for x in predicted], dtype=np.int64)
    n, n_labels = len(t), len(labels)
    cm = confusion_matrix_indices(t, p, n_labels)
    precision, recall, f1 = _per_label(cm)
    support = cm.sum(axis=1)
    correct = (t == p).astype(np.float64)
    accuracy = float(correct.mean()) if n else 0.0

    if majority_label is None and n:
        counts = Counter(true)
        # Most frequent, ties broken by label order, so the baseline is deterministic.
        majority_label = max(labels, key=lambda label: (counts.get(label, 0), -index[label]))
    majority: dict = {"label": majority_label}
    if majority_label is not None and n:
        if majority_label not in index:
            raise ValueError(f"majority label {majority_label!r} is not in the label list")
        constant = np.full(n, index[majority_label])
        majority.update(accuracy=float(np.mean(t == constant)),
                        macro_f1=_macro_f1(confusion_matrix_indices(t, constant, n_labels)))

    report = {
        "n": n,
        "accuracy": accuracy,
        "macro_f1": _macro_f1(cm),
        "labels": labels,
        "per_label": {label: {"precision": float(precision[i]), "recall": float(recall[i]),
                              "f1": float(f1[i]), "support": int(support[i])} for i, label in enumerate(labels)},
        "confusion_matrix": cm.tolist(),
        "baselines": {"majority": majority,
                      "uniform": {"accuracy": 1.0 / n_labels if n_labels else 0.0,
                                  "macro_f1": _expected_uniform_macro_f1(support)}},
        "interval": {"level": level, "n_resamples": n_resamples, "seed": seed},
    }
    if n and n_resamples > 0:
        report["interval"]["accuracy"] = list(bootstrap_interval(correct, n_resamples, seed, level))
        report["interval"]["macro_f1"] = _bootstrap_macro_f1(t, p, n_labels, n_resamples, seed, level)
    return report


def _bootstrap_macro_f1(true: np.ndarray, predicted: np.ndarray, n_labels: int, n_resamples: int, seed: int,
                        level: float) -> list[float]:
    rng = np.random.default_rng(seed)
    values = np.empty(n_resamples)
    for b in range(n_resamples):
        rows = rng.integers(0, len(true), len(true))
        values[b] = _macro_f1(confusion_matrix_indices(true[rows], predicted[rows], n_labels))
    low, high = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
    return [float(low), float(high)]


def format_report(report: dict, max_labels: int = 30) -> str:
    """A few readable lines: accuracy and macro F1 with intervals, the baselines, the confusion matrix
    (left out beyond ``max_labels`` labels)."""
    interval = report.get("interval", {})

    def with_interval(name: str) -> str:
        bounds = interval.get(name)
        text = f"{report[name]:.4f}"
        return f"{text} [{bounds[0]:.4f}, {bounds[1]:.4f}]" if bounds else text

    level = f"{interval.get('level', 0.95):.0%}"
    majority, uniform = report["baselines"]["majority"], report["baselines"]["uniform"]
    lines = [f"n = {report['n']}; accuracy {with_interval('accuracy')}, macro F1 {with_interval('macro_f1')}"
             f" ({level} bootstrap intervals)"]
    if "accuracy" in majority:
        lines.append(f"baselines: majority class ({majority['label']}) accuracy {majority['accuracy']:.4f}, "
                     f"macro F1 {majority['macro_f1']:.4f}; uniform chance accuracy {uniform['accuracy']:.4f}, "
                     f"macro F1 {uniform['macro_f1']:.4f}")
    labels = report["labels"]
    if len(labels) <= max_labels:
        width = max(len(str(label)) for label in labels)
        cells = max(5, *(len(str(v)) for row in report["confusion_matrix"] for v in row))
        lines.append("confusion matrix (rows = true, columns = predicted, in this label order):")
        for label, row in zip(labels, report["confusion_matrix"], strict=True):
            lines.append(f"  {label:>{width}} " + " ".join(f"{v:>{cells}}" for v in row))
    return "\n".join(lines)
