"""Folder-to-folder feature extraction: the work behind ``extract_clamp3.py``.

One ``.npy`` per input at the mirrored relative path (input name up to its last dot + ``.npy``);
existing outputs are skipped, so an interrupted run resumes; every output is written atomically; a
bad file is reported, logged and skipped without stopping the batch.

**Several processes** (``torchrun``, ``python -m torch.distributed.launch --use_env``, several nodes
over a shared filesystem): when a process group is up, rank 0 plans the folder (what is pending,
cut into chunks of ``files_per_chunk`` files exactly as one process cuts it) and hands the plan to
every rank; each chunk goes to exactly one rank, the chunks balanced by their files' bytes
(``split_chunks``). A chunk is read and batched as a whole, as one process batches it, so every
output is bitwise the one a single process with the same settings writes (batches group segments by
length, and a feature's last bits depend on the batch it was computed in: the chunk, not the rank,
fixes that batch). Each rank logs its failures to its own log (``rank_log_path``), which rank 0
appends to the main log at the end; the summary counts every rank. Without a process group (plain
``python``), all of this is the identity: one rank, one log, every chunk in order.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from features import MODALITY_OF_EXTENSION, FeatureExtractor
from fileio import DropLog, atomic_save_npy, find_files, plan_outputs, with_extension
from tqdm import tqdm
from training.distributed import all_gather_object, broadcast_object, get_rank, get_world_size, is_distributed

# The wait at the end of a multi-process run (a rank may finish long before the slowest one) is not
# bounded by DIST_TIMEOUT_MINUTES, which bounds the set-up collectives; a crashed rank still ends the
# job at once (torchrun stops every process when one exits non-zero).
FINISH_TIMEOUT_HOURS = 72.0


def output_path_for(relative: Path) -> Path:
    return with_extension(relative, ".npy")


def extract_config_path(output_dir: str | os.PathLike) -> Path:
    """Where a run's effective configuration goes: beside the feature folder, as
    ``<output_dir>.extract_config.json``, so the folder holds only features for the tools that walk it."""
    folder = Path(os.path.abspath(output_dir))  # "." and "out/" have a name to extend too
    return folder.with_name(folder.name + ".extract_config.json")


# ---------------------------------------------------------------------------- ranks
def chunk_ranges(count: int, per_chunk: int) -> list[range]:
    """Positions ``0..count-1`` cut into consecutive chunks of ``per_chunk`` (the last may be shorter)."""
    per_chunk = max(1, int(per_chunk))
    return [range(start, min(start + per_chunk, count)) for start in range(0, count, per_chunk)]


def chunk_weights(sizes: Sequence[int], per_chunk: int) -> list[int]:
    """The bytes of each chunk of ``chunk_ranges(len(sizes), per_chunk)``: what ``split_chunks`` balances."""
    return [sum(sizes[i] for i in span) for span in chunk_ranges(len(sizes), per_chunk)]


def split_chunks(weights: Sequence[int], world_size: int) -> list[list[int]]:
    """The chunks (by index) each rank takes, balanced by weight (bytes): heaviest chunk first to the
    least loaded rank (ties: the lower chunk index, the lower rank). Every chunk goes to exactly one
    rank; each rank's chunks are in index order. One rank takes every chunk in order."""
    shares: list[list[int]] = [[] for _ in range(world_size)]
    loads = [0] * world_size
    for index in sorted(range(len(weights)), key=lambda i: (-weights[i], i)):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        shares[rank].append(index)
        loads[rank] += max(int(weights[index]), 1)
    return [sorted(share) for share in shares]


def rank_log_path(path: str | os.PathLike | None, rank: int, world_size: int) -> Path | None:
    """The failure log a rank writes: ``path`` itself for rank 0 (and for one process), else
    ``<stem>.rank<r><suffix>`` beside it (``extract_clamp3_failures.rank1.jsonl``)."""
    if path is None:
        return None
    path = Path(path)
    if world_size <= 1 or rank == 0:
        return path
    return path.with_name(f"{path.stem}.rank{rank}{path.suffix}")


def merge_rank_logs(path: str | os.PathLike | None, world_size: int) -> None:
    """Rank 0's step once every rank is done: append each other rank's log to ``path`` in rank order
    and delete it. A rank log left by an interrupted run is merged by the next one, so no row is lost."""
    if path is None or world_size <= 1:
        return
    path = Path(path)
    for rank in range(1, world_size):
        part = rank_log_path(path, rank, world_size)
        if part is None or not part.is_file():
            continue
        data = part.read_bytes()
        if data:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "ab") as f:
                f.write(data if data.endswith(b"\n") else data + b"\n")
        part.unlink()


class RankShare:
    """This process's place in a folder job: ``rank`` of ``world_size`` (0 of 1 without a process
    group), a plan made once on rank 0 and handed to all, and the gather at the end, which waits up
    to ``FINISH_TIMEOUT_HOURS`` for the slowest rank. Every rank must create it and call its
    collectives in the same order."""

    def __init__(self) -> None:
        self.rank, self.world_size = get_rank(), get_world_size()
        self._group: Any = None
        if is_distributed():
            self._group = dist.new_group(backend="gloo", timeout=timedelta(hours=FINISH_TIMEOUT_HOURS))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def from_main(self, make: Callable[[], Any]) -> Any:
        """``make()`` run on rank 0 only, its result on every rank."""
        return broadcast_object(make() if self.is_main else None)

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, once every rank has got here."""
        if self._group is None:
            return all_gather_object(obj)
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, obj, group=self._group)
        return gathered

    def close(self) -> None:
        if self._group is not None:
            dist.destroy_process_group(self._group)
            self._group = None

    def prefix(self) -> str:
        return f"[rank {self.rank}] " if self.world_size > 1 else ""


def idle_note(chunks: int, world_size: int, per_chunk: int, files: int) -> str | None:
    """A line for rank 0 when there are fewer chunks than ranks (some ranks have nothing to do)."""
    if world_size <= 1 or chunks >= world_size or not files:
        return None
    return (f"note: {files} files make {chunks} chunk(s) of up to {per_chunk} files (EXTRACT_FILES_PER_CHUNK) "
            f"for {world_size} processes, so {world_size - chunks} process(es) have nothing to do; a smaller "
            "EXTRACT_FILES_PER_CHUNK spreads the files wider (outputs are then bitwise those of one process "
            "with that smaller setting)")


# ---------------------------------------------------------------------------- the plan
@dataclass
class ExtractionPlan:
    """What a run will do, fixed before any output is written: the pending inputs (relative, in
    order), their bytes, how many are already done, and the inputs refused for a name clash."""

    pending: list[Path]
    sizes: list[int]
    skipped: int
    clashes: list[tuple[Path, str, str]]
    files_per_chunk: int

    def chunks(self) -> list[list[Path]]:
        return [[self.pending[i] for i in span] for span in chunk_ranges(len(self.pending), self.files_per_chunk)]

    def chunk_weights(self) -> list[int]:
        return chunk_weights(self.sizes, self.files_per_chunk)

    def needs(self, suffix: str) -> bool:
        """Whether any pending input has this extension (``.txt``: the tokenizer is needed)."""
        return any(rel.suffix.lower() == suffix for rel in self.pending)


def _make_plan(input_dir: Path, output_dir: Path, files_per_chunk: int) -> ExtractionPlan:
    pending, sizes, skipped, named = plan_outputs(input_dir, output_dir, find_files(input_dir, MODALITY_OF_EXTENSION),
                                                  output_path_for)
    clashes = [(rel, "name", f"its output {out} is already produced by {other}") for rel, out, other in named]
    return ExtractionPlan(pending, sizes, skipped, clashes, int(files_per_chunk))


def plan_folder(input_dir: str | os.PathLike, output_dir: str | os.PathLike,
                files_per_chunk: int = 256) -> ExtractionPlan:
    """The plan of a run, made by rank 0 and handed to every rank (so every rank splits the same list,
    whatever another rank has written meanwhile); in one process, just the plan."""
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    if not input_dir.is_dir():
        raise FileNotFoundError(f"input directory not found: {input_dir}")
    return broadcast_object(_make_plan(input_dir, output_dir, files_per_chunk) if get_rank() == 0 else None)


# ---------------------------------------------------------------------------- extraction
@dataclass
class ExtractionSummary:
    extracted: int = 0
    skipped: int = 0
    failed: int = 0
    failures: list[dict] = field(default_factory=list)
    extracted_per_rank: list[int] = field(default_factory=list)  # filled for several processes

    def line(self) -> str:
        text = f"extract: {self.extracted} extracted, {self.skipped} skipped (already done), {self.failed} failed"
        if len(self.extracted_per_rank) > 1:
            text += (f" ({len(self.extracted_per_rank)} processes; extracted per rank: "
                     + ", ".join(str(n) for n in self.extracted_per_rank) + ")")
        return text


def extract_folder(
    extractor: FeatureExtractor,
    input_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    get_global: bool,
    files_per_chunk: int = 256,
    error_log: str | os.PathLike | None = None,
    progress: bool = True,
    plan: ExtractionPlan | None = None,
) -> ExtractionSummary:
    """Features of every input under ``input_dir`` that has none yet under ``output_dir``, read and
    batched ``files_per_chunk`` files at a time; failures go to ``error_log`` (JSONL) and the summary.

    With a process group, this rank's chunks of the plan (``plan_folder``; made here if not given),
    its failures in its own log (merged into ``error_log`` by rank 0 at the end), and a summary of
    every rank, returned on every rank. Every rank must call it."""
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    if plan is None:
        plan = plan_folder(input_dir, output_dir, files_per_chunk)
    share = RankShare()
    try:
        mine = _extract_share(extractor, input_dir, output_dir, get_global, plan, share, error_log, progress)
        everyone = share.gather(mine)
    finally:
        share.close()
    if share.is_main:
        merge_rank_logs(error_log, share.world_size)
    summary = ExtractionSummary(skipped=plan.skipped)
    for part in everyone:
        summary.extracted += part.extracted
        summary.failed += part.failed
        summary.failures.extend(part.failures)
    if share.world_size > 1:
        summary.extracted_per_rank = [part.extracted for part in everyone]
    return summary


def _extract_share(extractor: FeatureExtractor, input_dir: Path, output_dir: Path, get_global: bool,
                   plan: ExtractionPlan, share: RankShare, error_log: str | os.PathLike | None,
                   progress: bool) -> ExtractionSummary:
    """This rank's chunks of ``plan``, each extracted as one process would extract it."""
    chunks = plan.chunks()
    assigned = split_chunks(plan.chunk_weights(), share.world_size)[share.rank]
    summary = ExtractionSummary()
    prefix = share.prefix()
    log = DropLog("extract", rank_log_path(error_log, share.rank, share.world_size),
                  echo=lambda message: tqdm.write(prefix + message, file=sys.stderr))

    def report(rel: Path, stage: str, reason: str) -> None:
        summary.failed += 1
        summary.failures.append(log.fail(input_dir / rel, stage, reason))

    try:
        if share.is_main:
            for rel, stage, reason in plan.clashes:
                report(rel, stage, reason)
            note = idle_note(len(chunks), share.world_size, plan.files_per_chunk, len(plan.pending))
            if note and progress:
                tqdm.write(note, file=sys.stderr)
        total = sum(len(chunks[index]) for index in assigned)
        desc = "extract" if share.world_size == 1 else f"extract (rank 0 of {share.world_size})"
        bar = tqdm(total=total, desc=desc, unit="file", disable=not progress or not share.is_main,
                   dynamic_ncols=True)
        for index in assigned:
            _extract_chunk(extractor, input_dir, output_dir, chunks[index], get_global, report, summary, bar)
        bar.close()
    finally:
        log.close()
    return summary


def _extract_chunk(extractor: FeatureExtractor, input_dir: Path, output_dir: Path, chunk: list[Path],
                   get_global: bool, report: Callable[[Path, str, str], None], summary: ExtractionSummary,
                   bar: Any) -> None:
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
