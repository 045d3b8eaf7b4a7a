"""A folder of audio files to a folder of MERT features: the work behind
``preprocessing/audio/extract_mert.py``.

One ``.npy`` per audio file at the mirrored relative path (``name.ext`` -> ``name.npy``, the official
naming): ``(hidden states, windows, width)``, or ``(1, windows, width)`` with ``mean`` (the official
``--mean_features``, what CLaMP 3 reads). Unlike the official script, FLAC and OGG are collected
too, extensions in any case. A file whose output exists is skipped (a stopped run resumes), unless
``overwrite``; outputs are written atomically. Files are decoded and resampled by ``workers`` threads
a chunk ahead of the model, and the windows of a chunk run through MERT together
(``MertExtractor.features``).

Every file that gets no output is named with its stage and reason (``DropLog``: the console and the
failure log): ``read`` (unreadable, or over ``max_bytes``), ``decode`` (not audio FFmpeg reads),
``windows`` (shorter than 1 s: the official script writes nothing for it either, silently), ``model``,
``name`` (two inputs with one output name, ``a.wav`` and ``a.mp3``).

Shards (``num_shards``/``shard_index``) cut the folder as the batch converters do (by a hash of the
relative path), so several jobs can share it. Under a process group (``torchrun``) rank 0 plans,
chunks are balanced by bytes over the ranks (``extraction.split_chunks``), each rank logs to its
own failure log and rank 0 merges them, as ``extract_clamp3.py`` does.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from extraction import RankShare, chunk_ranges, chunk_weights, merge_rank_logs, rank_log_path, split_chunks
from fileio import DropLog, atomic_save_npy, find_files, plan_outputs, with_extension
from preprocess.batch import select_shard
from tqdm import tqdm

from audio.decode import AUDIO_EXTENSIONS, AudioDecodeError
from audio.mert_features import MertExtractor, mean_features
from audio.windows import TooShortError


class AudioInputError(ValueError):
    """An audio file that gives no waveform: the stage (``read``, ``decode``) and the reason."""

    def __init__(self, stage: str, reason: str):
        super().__init__(reason)
        self.stage, self.reason = stage, reason


def read_waveform(extractor: MertExtractor, path: Path, max_bytes: int = 0) -> np.ndarray:
    """The 24 kHz waveform of ``path``; ``AudioInputError`` with the stage that failed."""
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise AudioInputError("read", f"cannot read: {exc.strerror or exc}") from exc
    if size == 0:
        raise AudioInputError("read", "empty file (0 bytes)")
    if max_bytes and size > max_bytes:
        raise AudioInputError("read", f"file too large ({size} bytes > limit {max_bytes})")
    try:
        return extractor.waveform(path)
    except AudioDecodeError as exc:
        raise AudioInputError("decode", str(exc)) from exc
    except OSError as exc:
        raise AudioInputError("read", f"cannot read: {exc.strerror or exc}") from exc


@dataclass
class AudioPlan:
    """Fixed before anything is written: the pending inputs (relative, in order), their bytes, how many
    are done already, and the inputs refused for a name clash."""

    pending: list[Path]
    sizes: list[int]
    skipped: int
    clashes: list[tuple[Path, str]]
    found: int


def plan_audio_folder(input_dir: str | os.PathLike, output_dir: str | os.PathLike, num_shards: int = 1,
                      shard_index: int = 0, overwrite: bool = False) -> AudioPlan:
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    files = select_shard(find_files(input_dir, AUDIO_EXTENSIONS), num_shards, shard_index)
    pending, sizes, skipped, claimed = plan_outputs(input_dir, output_dir, files,
                                                    lambda rel: with_extension(rel, ".npy"), overwrite)
    clashes = [(rel, f"its output {out} is already made from {other}") for rel, out, other in claimed]
    return AudioPlan(pending, sizes, skipped, clashes, len(files))


@dataclass
class MertFolderSummary:
    extracted: int = 0
    skipped: int = 0
    failed: int = 0
    too_short: int = 0
    found: int = 0
    per_rank: list[int] = field(default_factory=list)

    @property
    def without_output(self) -> int:
        """Inputs this run left without an output: failures and files under 1 s."""
        return self.failed + self.too_short

    def line(self) -> str:
        text = (f"extract_mert: {self.found} audio files: {self.extracted} extracted, {self.skipped} skipped "
                f"(already done), {self.too_short} too short (under 1 s, no output), {self.failed} failed")
        if len(self.per_rank) > 1:
            text += f" ({len(self.per_rank)} processes; extracted per rank: {', '.join(map(str, self.per_rank))})"
        return text


def extract_mert_folder(extractor: MertExtractor, input_dir: str | os.PathLike, output_dir: str | os.PathLike,
                        mean: bool = False, num_shards: int = 1, shard_index: int = 0, overwrite: bool = False,
                        workers: int = 2, files_per_chunk: int = 16, max_bytes: int = 0,
                        error_log: str | os.PathLike | None = None, progress: bool = True) -> MertFolderSummary:
    """See the module docstring. Every rank of a process group must call it; each returns the
    summary of all."""
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    if not input_dir.is_dir():
        raise FileNotFoundError(f"input directory not found: {input_dir}")
    share = RankShare()
    try:
        plan = share.from_main(lambda: plan_audio_folder(input_dir, output_dir, num_shards, shard_index, overwrite))
        spans = chunk_ranges(len(plan.pending), files_per_chunk)
        assigned = split_chunks(chunk_weights(plan.sizes, files_per_chunk), share.world_size)[share.rank]
        prefix = share.prefix()
        mine = MertFolderSummary()
        with DropLog("extract_mert", rank_log_path(error_log, share.rank, share.world_size),
                     echo=lambda message: tqdm.write(prefix + message, file=sys.stderr)) as log:
            if share.is_main:
                for rel, reason in plan.clashes:
                    log.fail(input_dir / rel, "name", reason)
                    mine.failed += 1
            chunks = [[plan.pending[i] for i in spans[index]] for index in assigned]
            desc = "extract_mert" if share.world_size == 1 else f"extract_mert (rank 0 of {share.world_size})"
            with tqdm(total=sum(map(len, chunks)), desc=desc, unit="file", dynamic_ncols=True,
                      disable=not progress or not share.is_main) as bar:
                _run_chunks(extractor, input_dir, output_dir, chunks, mean, workers, max_bytes, log, mine, bar.update)
        everyone = share.gather(mine)
    finally:
        share.close()
    if share.is_main:
        merge_rank_logs(error_log, share.world_size)
    total = MertFolderSummary(skipped=plan.skipped, found=plan.found)
    for part in everyone:
        total.extracted += part.extracted
        total.failed += part.failed
        total.too_short += part.too_short
    if share.world_size > 1:
        total.per_rank = [part.extracted for part in everyone]
    return total


def _run_chunks(extractor: MertExtractor, input_dir: Path, output_dir: Path, chunks: list[list[Path]], mean: bool,
                workers: int, max_bytes: int, log: DropLog, summary: MertFolderSummary,
                advance: Callable[[int], None]) -> None:
    """Each chunk's waveforms read by the threads while the model runs on the chunk before it."""

    def load(rel: Path) -> np.ndarray | AudioInputError:
        try:
            return read_waveform(extractor, input_dir / rel, max_bytes)
        except AudioInputError as exc:
            return exc
        except Exception as exc:  # noqa: BLE001 - one bad file must not stop the folder
            return AudioInputError("decode", f"{type(exc).__name__}: {exc}")

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        ahead: list[Future] = [pool.submit(load, rel) for rel in chunks[0]] if chunks else []
        for number, chunk in enumerate(chunks):
            loading, ahead = ahead, ([pool.submit(load, rel) for rel in chunks[number + 1]]
                                     if number + 1 < len(chunks) else [])
            waveforms: list[tuple[Path, np.ndarray]] = []
            for rel, future in zip(chunk, loading, strict=True):
                result = future.result()
                if isinstance(result, AudioInputError):
                    log.fail(input_dir / rel, result.stage, result.reason)
                    summary.failed += 1
                    advance(1)
                else:
                    waveforms.append((rel, result))
            _extract(extractor, input_dir, output_dir, waveforms, mean, log, summary, advance)


def _extract(extractor: MertExtractor, input_dir: Path, output_dir: Path, waveforms: list[tuple[Path, np.ndarray]],
             mean: bool, log: DropLog, summary: MertFolderSummary, advance: Callable[[int], None]) -> None:
    try:
        features = extractor.features([waveform for _, waveform in waveforms])
    except Exception:  # noqa: BLE001 - one at a time, so the culprit is named and the rest kept
        features = []
        for _, waveform in waveforms:
            try:
                features.append(extractor.features([waveform])[0])
            except Exception as exc:  # noqa: BLE001
                features.append(RuntimeError(f"{type(exc).__name__}: {exc}"))
    for (rel, _), result in zip(waveforms, features, strict=True):
        if isinstance(result, TooShortError):
            log.fail(input_dir / rel, "windows", str(result))
            summary.too_short += 1
        elif isinstance(result, Exception):
            log.fail(input_dir / rel, "model", str(result))
            summary.failed += 1
        else:
            atomic_save_npy(output_dir / with_extension(rel, ".npy"), mean_features(result) if mean else result)
            summary.extracted += 1
        advance(1)
