"""Folder-to-folder feature extraction: the work behind ``extract_clamp3.py``.

One ``.npy`` per input at the mirrored relative path (input name up to its last dot + ``.npy``);
existing outputs are skipped, so an interrupted run resumes; every output is written atomically; a
bad file is reported, logged and skipped without stopping the batch.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from features import MODALITY_OF_EXTENSION, FeatureExtractor
from fileio import DropLog, atomic_save_npy, find_files, with_extension
from tqdm import tqdm


def output_path_for(relative: Path) -> Path:
    return with_extension(relative, ".npy")


def extract_config_path(output_dir: str | os.PathLike) -> Path:
    """Where a run's effective configuration goes: beside the feature folder, as
    ``<output_dir>.extract_config.json``, so the folder holds only features for the tools that walk it."""
    folder = Path(os.path.abspath(output_dir))  # "." and "out/" have a name to extend too
    return folder.with_name(folder.name + ".extract_config.json")


@dataclass
class ExtractionSummary:
    extracted: int = 0
    skipped: int = 0
    failed: int = 0
    failures: list[dict] = field(default_factory=list)

    def line(self) -> str:
        return f"extract: {self.extracted} extracted, {self.skipped} skipped (already done), {self.failed} failed"


def extract_folder(
    extractor: FeatureExtractor,
    input_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    get_global: bool,
    files_per_chunk: int = 256,
    error_log: str | os.PathLike | None = None,
    progress: bool = True,
) -> ExtractionSummary:
    """Features of every input under ``input_dir`` that has none yet under ``output_dir``, read and
    batched ``files_per_chunk`` files at a time; failures go to ``error_log`` (JSONL) and the summary."""
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    if not input_dir.is_dir():
        raise FileNotFoundError(f"input directory not found: {input_dir}")
    summary = ExtractionSummary()
    pending: list[Path] = []
    claimed: dict[Path, Path] = {}
    failures: list[tuple[Path, str, str]] = []
    for rel in find_files(input_dir, MODALITY_OF_EXTENSION):
        out_rel = output_path_for(rel)
        if out_rel in claimed:
            failures.append((rel, "name", f"its output {out_rel} is already produced by {claimed[out_rel]}"))
            continue
        claimed[out_rel] = rel
        if (output_dir / out_rel).exists():
            summary.skipped += 1
        else:
            pending.append(rel)

    log = DropLog("extract", error_log, echo=lambda message: tqdm.write(message, file=sys.stderr))

    def report(rel: Path, stage: str, reason: str) -> None:
        summary.failed += 1
        summary.failures.append(log.fail(input_dir / rel, stage, reason))

    try:
        for rel, stage, reason in failures:
            report(rel, stage, reason)
        bar = tqdm(total=len(pending), desc="extract", unit="file", disable=not progress, dynamic_ncols=True)
        for start in range(0, len(pending), files_per_chunk):
            chunk = pending[start : start + files_per_chunk]
            by_modality: dict[str, list[tuple[Path, torch.Tensor]]] = {}
            for rel in chunk:
                try:
                    modality, tensor = extractor.read_input(input_dir / rel)
                except Exception as exc:  # noqa: BLE001 - one bad file must not stop the batch
                    report(rel, "read", f"{type(exc).__name__}: {exc}")
                    bar.update(1)
                    continue
                by_modality.setdefault(modality, []).append((rel, tensor))
            for modality, items in by_modality.items():
                try:
                    features = extractor.extract(modality, [t for _, t in items], get_global=get_global)
                except Exception as exc:  # noqa: BLE001 - retry one by one to isolate the culprit
                    features = []
                    for rel, tensor in items:
                        try:
                            features.append(extractor.extract(modality, [tensor], get_global=get_global)[0])
                        except Exception as one_exc:  # noqa: BLE001
                            report(rel, "model", f"{type(one_exc).__name__}: {one_exc} (batch error: {exc})")
                            features.append(None)
                for (rel, _), feature in zip(items, features, strict=True):
                    if feature is not None:
                        atomic_save_npy(output_dir / output_path_for(rel), feature)
                        summary.extracted += 1
                    bar.update(1)
        bar.close()
    finally:
        log.close()
    return summary
