"""PNG plots of a comparison: metrics with intervals, rank CDFs, matched/unmatched similarities,
training curves. Rendered off-screen (Agg) and written atomically."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display on servers; must precede pyplot

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from fileio import atomic_write_bytes  # noqa: E402
from formats import BASELINE, LORA  # noqa: E402

from evaluation.results import CROSS_FORMAT_SET, SystemResults, similarity_key  # noqa: E402

PLOT_METRICS = ("mrr", "hit@1", "hit@10", "hit@100")
COLOURS = {BASELINE: "tab:blue", LORA: "tab:orange"}
LABELS = {BASELINE: "baseline", LORA: "LoRA"}


def _grid(n_panels: int, width: float = 4.2, height: float = 3.2):
    columns = min(4, max(1, n_panels))
    rows = math.ceil(n_panels / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(width * columns, height * rows), squeeze=False)
    for extra in axes.flat[n_panels:]:
        extra.set_visible(False)
    return figure, list(axes.flat[:n_panels])


def _save(figure, path: Path) -> Path:
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    return atomic_write_bytes(path, buffer.getvalue())


def plot_metrics(comparison: dict[str, Any], set_name: str, path: Path,
                 labels: dict[str, str] = LABELS) -> Path:
    """Bars of MRR and Hit@k per field and direction, baseline against LoRA, with their intervals and
    the random baseline as a black tick."""
    rule = comparison["headline_tie_rule"]
    panels = [(field_name, direction, entry)
              for field_name, by_level in comparison["results"][set_name].items()
              for direction, entry in by_level.get("pair", {}).items()]
    figure, axes = _grid(len(panels))
    x = np.arange(len(PLOT_METRICS))
    for axis, (field_name, direction, entry) in zip(axes, panels, strict=True):
        for offset, system in ((-0.2, BASELINE), (0.2, LORA)):
            values = [entry[rule][m][system] for m in PLOT_METRICS]
            cis = [entry[rule][m][f"{system}_ci"] or [v, v] for m, v in zip(PLOT_METRICS, values, strict=True)]
            errors = np.array([[v - ci[0] for v, ci in zip(values, cis, strict=True)],
                               [ci[1] - v for v, ci in zip(values, cis, strict=True)]]).clip(min=0)
            axis.bar(x + offset, values, 0.4, yerr=errors, capsize=3, color=COLOURS[system], label=labels[system])
        axis.scatter(x, [entry["random"][m] for m in PLOT_METRICS], marker="_", s=300, color="black",
                     label="random", zorder=3)
        axis.set_xticks(x, [m.replace("mrr", "MRR").replace("hit", "Hit") for m in PLOT_METRICS])
        axis.set_ylim(0, 1)
        axis.set_title(f"{field_name}: {direction.replace('_', ' ')} (N={entry['n_queries']})", fontsize=9)
    axes[0].legend(fontsize=8)
    figure.suptitle(f"{set_name}: retrieval, 95% intervals ({rule} tie rule)", fontsize=10)
    return _save(figure, path)


def plot_rank_cdfs(baseline: SystemResults, lora: SystemResults, set_name: str, path: Path,
                   labels: dict[str, str] = LABELS) -> Path:
    """Fraction of queries whose expected rank is at most r, both systems, per field and direction."""
    keys = [key for key in baseline.ranks if key[0] == set_name and key[2] == "pair"]
    figure, axes = _grid(len(keys))
    for axis, key in zip(axes, keys, strict=True):
        for system, results in ((BASELINE, baseline), (LORA, lora)):
            ranks = np.sort(results.ranks[key][1].expected)
            axis.step(ranks, np.arange(1, len(ranks) + 1) / len(ranks), where="post", color=COLOURS[system],
                      label=labels[system])
        pool = baseline.ranks[key][1].pool_size
        positions = np.arange(1, pool + 1)
        axis.step(positions, positions / pool, where="post", color="grey", linestyle=":", label="random")
        axis.set_xscale("log")
        axis.set_xlim(1, max(2, pool))
        axis.set_ylim(0, 1)
        axis.set_xlabel("rank")
        axis.set_ylabel("fraction of queries")
        axis.set_title(f"{key[1]}: {key[3].replace('_', ' ')} (pool {pool})", fontsize=9)
    axes[0].legend(fontsize=8)
    figure.suptitle(f"{set_name}: rank CDFs (expected ranks)", fontsize=10)
    return _save(figure, path)


def plot_similarities(baseline: SystemResults, lora: SystemResults, set_name: str, fields: list[str],
                      path: Path, labels: dict[str, str] = LABELS) -> Path | None:
    """Histograms of matched against unmatched cosines per field, both systems; None without samples."""
    panels = [f for f in fields if similarity_key(set_name, f, "matched") in baseline.similarities
              and similarity_key(set_name, f, "matched") in lora.similarities]
    if not panels:
        return None
    figure, axes = _grid(len(panels))
    for axis, field_name in zip(axes, panels, strict=True):
        samples = {(system, kind): results.similarities[similarity_key(set_name, field_name, kind)]
                   for system, results in ((BASELINE, baseline), (LORA, lora))
                   for kind in ("matched", "unmatched")}
        everything = np.concatenate([v for v in samples.values() if v.size])
        bins = np.linspace(float(everything.min()), float(everything.max()) + 1e-6, 40)
        for (system, kind), values in samples.items():
            if values.size:
                axis.hist(values, bins=bins, density=True, histtype="step", linewidth=1.4, color=COLOURS[system],
                          linestyle="-" if kind == "matched" else "--", label=f"{labels[system]} {kind}")
        axis.set_xlabel("cosine similarity")
        axis.set_ylabel("density")
        axis.set_title(f"{field_name}" if set_name != CROSS_FORMAT_SET else "sheet against MIDI", fontsize=9)
    axes[0].legend(fontsize=7)
    figure.suptitle(f"{set_name}: matched (solid) against unmatched (dashed) pairs", fontsize=10)
    return _save(figure, path)


def plot_training_curves(histories: dict[str, list[dict[str, Any]]], path: Path) -> Path | None:
    """Loss and validation MRR per epoch of each format's training run; None without histories."""
    histories = {fmt: entries for fmt, entries in histories.items() if entries}
    if not histories:
        return None
    figure, axes = _grid(2 * len(histories))
    for row, (fmt, entries) in enumerate(histories.items()):
        epochs = [entry.get("epoch", i + 1) for i, entry in enumerate(entries)]
        loss_axis, mrr_axis = axes[2 * row], axes[2 * row + 1]
        for name, style in (("train_loss", "-"), ("valid_loss", "--")):
            values = [entry.get(name) for entry in entries]
            if any(v is not None for v in values):
                loss_axis.plot(epochs, [np.nan if v is None else v for v in values], style, marker="o", label=name)
        loss_axis.set_title(f"{fmt.upper()}: loss", fontsize=9)
        loss_axis.set_xlabel("epoch")
        loss_axis.legend(fontsize=8)
        mrr_axis.plot(epochs, [entry.get("valid_mrr", np.nan) for entry in entries], marker="o", color="tab:green")
        mrr_axis.set_title(f"{fmt.upper()}: validation text→music MRR", fontsize=9)
        mrr_axis.set_xlabel("epoch")
    return _save(figure, path)


def write_plots(comparison: dict[str, Any], baseline: SystemResults, lora: SystemResults,
                histories: dict[str, list[dict[str, Any]]], plot_dir: Path,
                labels: dict[str, str] = LABELS) -> list[Path]:
    """Every plot of the comparison under ``plot_dir``; returns the files written. ``labels`` name the
    reference (``baseline`` slot) and the candidate (``lora`` slot) in the legends."""
    written: list[Path] = []
    for set_name, by_field in comparison["results"].items():
        written.append(plot_metrics(comparison, set_name, plot_dir / f"metrics_{set_name}.png", labels))
        written.append(plot_rank_cdfs(baseline, lora, set_name, plot_dir / f"rank_cdf_{set_name}.png", labels))
        histogram = plot_similarities(baseline, lora, set_name, list(by_field),
                                      plot_dir / f"similarities_{set_name}.png", labels)
        if histogram is not None:
            written.append(histogram)
    curves = plot_training_curves(histories, plot_dir / "training_curves.png")
    if curves is not None:
        written.append(curves)
    return written
