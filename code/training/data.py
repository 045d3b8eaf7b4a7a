"""The trainer's data: training records of one format, the official music augmentation
(reference section 6; the text half, section 5, is ``training.text``), per-epoch batch plans and
the batches themselves.

Determinism: every random choice for an example comes from a ``random.Random`` seeded from
``(seed, epoch, record index, stream)``, never from global state, and a plan of *global* batches
is drawn from ``(seed, epoch)``; rank r takes its own rows of each global batch. So an epoch gives
the same examples with any number of DataLoader workers, on any number of ranks (N ranks of B rows
= one process of N*B rows), and after a resume at any batch position.

Bad records are found once, when the records are loaded (every music file is read and patchified),
and left out with a reason in a ``fileio.DropLog``: the model never sees an empty text or an
unreadable file, and no batch is ever skipped. A bad JSONL line is one more drop. Across ranks each
rank checks a share of the files and the verdicts are gathered, so every rank gets the records one
process would; verdicts are kept by path, size and mtime (``FileCheckCache``) for the next start.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fileio import DropLog, atomic_write_text, scan_jsonl
from formats import FORMATS
from patchilizer import M3Patchilizer, remove_instrument_info
from pools import process_context
from torch.utils.data import Dataset
from tqdm import tqdm

from training.text import (
    TextSource,
    bytes_hash,
    normalised_text_key,
    seeded_rng,
    stable_hash,
    validation_text,
)

REMOVE_INSTRUMENTS_P = 0.9


# ----------------------------------------------------------------------------- seeds


def example_rng(seed: int, epoch: int, index: int, stream: str) -> random.Random:
    """The generator of one example's ``stream`` (``"text"`` or ``"music"``): separate streams, so
    switching one augmentation off leaves the other draws of the example unchanged."""
    return seeded_rng("example", seed, epoch, index, stream)


# ----------------------------------------------------------------------------- records


@dataclass(frozen=True, slots=True)
class TrainingRecord:
    """One usable text-music pair of one format.

    ``index`` is the record's 0-based position in its JSONL (dropped records count), the key of
    every per-record seed; ``id`` is the record's ``id``, or its first filepath as written when it
    has none; ``fields`` are its text fields; ``music_files`` the paths of its files of the format
    (resolved against the JSONL's folder) and ``music_keys`` their content hashes; ``length`` the
    patches of its longest file (special patches included) capped at the patch length;
    ``text_key`` the hash of its normalised full text; ``pair_id`` the record's ``pair_id`` (the
    same piece in the other format's JSONL, ``training.pairs``), None without one.
    """

    index: int
    id: str
    fields: dict[str, Any]
    music_files: tuple[str, ...]
    music_keys: tuple[int, ...]
    length: int
    text_key: int
    pair_id: str | None = None


@dataclass(frozen=True)
class _FileCheck:
    reason: str | None
    patches: int = 0
    key: int = 0
    detail: str | None = None


def read_music(path: str | os.PathLike) -> tuple[bytes, str]:
    """A music file's bytes and its text (strict UTF-8, newlines translated as Python's text mode
    does, which is how the official code reads files)."""
    data = Path(path).read_bytes()
    return data, data.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")


def _check_music_file(path: str, patchilizer: M3Patchilizer) -> _FileCheck:
    try:
        data, text = read_music(path)
    except FileNotFoundError:
        return _FileCheck("missing music file")
    except UnicodeDecodeError as exc:
        return _FileCheck("music file is not UTF-8", detail=str(exc))
    except OSError as exc:
        return _FileCheck("unreadable music file", detail=str(exc))
    if not text.strip():
        return _FileCheck("empty music file")
    try:
        patches = len(patchilizer.patch_strings(text))
    except Exception as exc:  # whatever the patchilizer trips on, the file cannot train
        return _FileCheck("unpatchifiable music file", detail=f"{type(exc).__name__}: {exc}")
    if patches == 0:
        return _FileCheck("no patches in music file")
    return _FileCheck(None, patches + 2, bytes_hash(data))  # + the BOS and EOS patches


FILE_CHECK_VERSION = 1  # raise when _check_music_file's verdicts change: cached verdicts are then redone
_PROGRESS_ROUNDS = 100  # progress updates (one small gather each across ranks) per check


def _file_stat(path: str) -> tuple[int, int] | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_size, stat.st_mtime_ns


class FileCheckCache:
    """Verdicts of the music-file check by path, each valid while the file keeps its size and
    ``mtime_ns`` and the check its settings (patch size and length, ``FILE_CHECK_VERSION``).

    One JSON file (``path``; None keeps the cache in memory only), written atomically by ``save``
    with the verdicts of the files checked since it was opened: a resumed run, the validation
    records and a restart after a failed start read each unchanged file's verdict instead of
    reading and patchifying the file again. A missing file is never cached. An unreadable cache file
    or one of other settings counts as empty.
    """

    def __init__(self, path: str | os.PathLike | None, patchilizer: M3Patchilizer):
        self.path = Path(path) if path is not None else None
        self.settings = {"version": FILE_CHECK_VERSION, "patch_size": patchilizer.patch_size,
                         "patch_length": patchilizer.patch_length}
        self.saved: dict[str, list] = {}
        self.current: dict[str, list] = {}
        self.hits = 0  # verdicts taken from the cache (every rank's, after a gathered check)
        self.checked = 0  # files read and patchified
        if self.path is not None and self.path.is_file():
            try:
                stored = json.loads(self.path.read_text(encoding="utf-8"))
                if stored.get("settings") == self.settings and isinstance(stored.get("files"), dict):
                    self.saved = stored["files"]
            except (OSError, ValueError, AttributeError):
                self.saved = {}

    def get(self, path: str) -> list | None:
        """``[size, mtime_ns, reason, patches, key, detail]`` of ``path``'s last check, or None."""
        return self.current.get(path) or self.saved.get(path)

    def put(self, path: str, stat: tuple[int, int] | None, check: _FileCheck) -> None:
        if stat is not None:
            self.current[path] = [*stat, check.reason, check.patches, check.key, check.detail]

    def save(self) -> None:
        if self.path is None:
            return
        payload = {"settings": self.settings, "files": self.current}
        atomic_write_text(self.path, json.dumps(payload, ensure_ascii=False, separators=(",", ":")))


def _check_cached(item: tuple[str, list | None], patchilizer: M3Patchilizer
                  ) -> tuple[tuple[int, int] | None, _FileCheck, bool]:
    """``(stat, verdict, from the cache)`` of one file. The file is stat'ed before it is read: a
    change after that gives another stat at the next check, never a stale verdict."""
    path, cached = item
    stat = _file_stat(path)
    if cached is not None and stat is not None and (cached[0], cached[1]) == stat:
        return stat, _FileCheck(cached[2], cached[3], cached[4], cached[5]), True
    return stat, _check_music_file(path, patchilizer), False


def _check_music_files(paths: list[str], patchilizer: M3Patchilizer, workers: int, progress: bool,
                       description: str, cache: FileCheckCache | None = None, rank: int = 0,
                       world_size: int = 1, gather: Callable[[Any], list[Any]] | None = None
                       ) -> list[_FileCheck]:
    """The verdict of each of ``paths``, in order. With ``world_size`` > 1, rank r checks
    ``paths[r::world_size]`` (in a pool of ``workers`` processes) and ``gather`` (every rank's
    object in rank order, e.g. ``distributed.all_gather_object``; every rank calls this with the
    same paths) hands every rank every verdict, so all ranks end with one process's result. The
    progress bar counts every rank's files: the ranks exchange their counts in
    ``_PROGRESS_ROUNDS`` rounds, which also keeps each collective short."""
    if world_size > 1 and gather is None:
        raise ValueError("a file check shared by several ranks needs a gather")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    share = paths[rank::world_size]
    items = [(path, cache.get(path) if cache is not None else None) for path in share]
    largest_share = -(-len(paths) // world_size)  # rank 0's
    rounds = min(_PROGRESS_ROUNDS, largest_share)
    per_round = -(-largest_share // rounds) if rounds else 0
    check = partial(_check_cached, patchilizer=patchilizer)
    ranks = f", {world_size} ranks" if world_size > 1 else ""
    bar = tqdm(total=len(paths), desc=f"{description} ({len(paths):,} files{ranks})", unit="file",
               disable=not progress, dynamic_ncols=True)
    results: list[tuple[tuple[int, int] | None, _FileCheck, bool]] = []
    pool = None
    try:
        if workers > 1 and len(items) > 1:
            pool = process_context().Pool(min(workers, len(items)))
            chunk = max(1, min(256, len(items) // (workers * 16)))
            stream = pool.imap(check, items, chunksize=chunk)
        else:
            stream = map(check, items)
        for _ in range(rounds):
            for _ in range(min(per_round, len(items) - len(results))):
                results.append(next(stream))
            done = sum(gather(len(results))) if world_size > 1 else len(results)
            bar.update(done - bar.n)
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        bar.close()
    parts = gather(results) if world_size > 1 else [results]
    merged: list[Any] = [None] * len(paths)
    for part_rank, part in enumerate(parts):
        merged[part_rank::world_size] = part
    verdicts = []
    for path, (stat, verdict, hit) in zip(paths, merged, strict=True):
        if cache is not None:
            cache.put(path, stat, verdict)
            cache.hits += hit
            cache.checked += not hit
        verdicts.append(verdict)
    return verdicts


def load_records(jsonl_path: str | os.PathLike, fmt: str, patchilizer: M3Patchilizer, drops: DropLog,
                 workers: int = 1, progress: bool = True, cache: FileCheckCache | None = None,
                 rank: int = 0, world_size: int = 1,
                 gather: Callable[[Any], list[Any]] | None = None) -> list[TrainingRecord]:
    """The usable records of a training JSONL for one format (``abc`` or ``mtf``).

    Only ``filepaths`` ending in ``.<fmt>`` count. Each distinct file is read and patchified once
    (in a pool of ``workers`` processes when > 1), unless ``cache`` holds its verdict; with
    ``world_size`` > 1 every rank calls this with the same arguments but its ``rank``, checks its
    share of the files, and ``gather`` (``distributed.all_gather_object``) gives every rank the same
    records as one process. Left out, each with a row in ``drops`` (``reason``, ``line`` and, where
    known, ``id`` and ``file``): a line that is not a JSON object (``bad JSONL line: not valid JSON
    (...)``, ``...: expected a JSON object, not list``, ``...: not UTF-8``; ``jsonl`` names the
    file), a record with no file of the format (``no .<fmt> file``) or no usable text (``no
    text``); a file that is missing, empty, not UTF-8, unpatchifiable or gives no patch. A record
    keeps its good files and is left out when none is left (its bad files are its rows in
    the log). Every non-blank line, bad ones included, counts for ``TrainingRecord.index``.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")
    jsonl_path = Path(jsonl_path)
    base = jsonl_path.parent
    suffix = "." + fmt
    pending: list[tuple[int, int, str, dict[str, Any], list[str]]] = []
    for index, (line, obj, problem) in enumerate(scan_jsonl(jsonl_path)):
        if obj is None:
            drops.add(f"bad JSONL line: {problem}", line=line, jsonl=str(jsonl_path))
            continue
        filepaths = obj.get("filepaths")
        filepaths = [filepaths] if isinstance(filepaths, str) else filepaths
        filepaths = [p for p in filepaths if isinstance(p, str) and p] if isinstance(filepaths, list) else []
        record_id = obj.get("id")
        record_id = str(record_id) if record_id not in (None, "") else (filepaths[0] if filepaths else "")
        own = [os.path.normpath(base / p) for p in filepaths if p.lower().endswith(suffix)]
        if not own:
            drops.add(f"no {suffix} file", id=record_id or None, line=line)
            continue
        fields = {k: v for k, v in obj.items() if k not in ("id", "filepaths")}
        if not validation_text(fields):
            drops.add("no text", id=record_id, line=line, file=own[0])
            continue
        pending.append((index, line, record_id, fields, list(dict.fromkeys(own))))

    paths = sorted({path for *_, files in pending for path in files})
    checks = dict(zip(paths, _check_music_files(paths, patchilizer, workers, progress, f"checking {suffix} files",
                                                cache=cache, rank=rank, world_size=world_size, gather=gather),
                      strict=True))
    records = []
    for index, line, record_id, fields, files in pending:
        good = []
        for path in files:
            check = checks[path]
            if check.reason is None:
                good.append((path, check))
            else:
                drops.add(check.reason, id=record_id, line=line, file=path, detail=check.detail)
        if not good:
            continue
        records.append(TrainingRecord(
            index=index, id=record_id, fields=fields,
            music_files=tuple(path for path, _ in good),
            music_keys=tuple(check.key for _, check in good),
            length=min(max(check.patches for _, check in good), patchilizer.patch_length),
            text_key=normalised_text_key(validation_text(fields)),
            pair_id=_pair_id(fields),
        ))
    return records


def _pair_id(fields: dict[str, Any]) -> str | None:
    value = fields.get("pair_id")
    return str(value) if isinstance(value, str | int) and not isinstance(value, bool) and str(value) else None


def held_out_split(records: Sequence[TrainingRecord], fraction: float,
                   seed: int) -> tuple[list[TrainingRecord], list[TrainingRecord]]:
    """``(train, held_out)``: a record is held out when the hash of ``(seed, pair_id or id)``
    falls in the first ``fraction`` of the hash range, so the split is by piece (both members of a
    pair on the same side) and the same on every run."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"held-out fraction must be in [0, 1), got {fraction}")
    threshold = fraction * 2.0**64
    train, held_out = [], []
    for record in records:
        position = stable_hash("held-out", seed, record.pair_id or record.id) & 0xFFFF_FFFF_FFFF_FFFF
        (held_out if position < threshold else train).append(record)
    return train, held_out


# ----------------------------------------------------------------------------- music


@dataclass(frozen=True)
class Augmentation:
    """The official training augmentations, each switchable. Validation uses none of them
    (full text, first file, instruments kept, head truncation)."""

    text_dropout: bool = True  # official ``text_dropout``; off: the full text (``validation_text``)
    random_file: bool = True  # a random choice among the record's files of the format
    remove_instruments_p: float = REMOVE_INSTRUMENTS_P  # probability of ``remove_instrument_info``
    random_truncation: bool = True  # head/tail/middle instead of the head

    @classmethod
    def none(cls) -> Augmentation:
        return cls(text_dropout=False, random_file=False, remove_instruments_p=0.0, random_truncation=False)


def music_patches(record: TrainingRecord, patchilizer: M3Patchilizer, rng: random.Random,
                  augmentation: Augmentation | None) -> tuple[list[list[int]], int]:
    """``(patches, file number)`` of one example: official ``encode`` with special patches and
    truncation to the patch length. ``augmentation=None`` is validation. The file choice and the
    instrument coin are always drawn, so a switch never shifts the other draws."""
    file_choice = rng.randrange(len(record.music_files))
    remove = rng.random() < (augmentation.remove_instruments_p if augmentation else 0.0)
    number = file_choice if augmentation and augmentation.random_file else 0
    _, text = read_music(record.music_files[number])
    if remove:
        text = remove_instrument_info(text)
    random_truncate = bool(augmentation and augmentation.random_truncation)
    patches = patchilizer.encode(text, add_special_patches=True, truncate=True,
                                 random_truncate=random_truncate, rng=rng)
    return patches, number


# ----------------------------------------------------------------------------- plans


@dataclass(frozen=True)
class EpochPlan:
    """Global batches (positions into the record list) of one epoch, in order.

    ``unplaced``: records no batch could take without two equal text or music keys;
    ``left_over``: records of the incomplete last global batch, left out in training.
    """

    batches: list[list[int]]
    unplaced: int = 0
    left_over: int = 0

    def __len__(self) -> int:
        return len(self.batches)


def _shuffled_order(records: Sequence[TrainingRecord], rng: random.Random, bucketing: bool,
                    pool_size: int) -> list[int]:
    order = list(range(len(records)))
    rng.shuffle(order)
    if not bucketing:
        return order
    # Sorting within pools of many batches keeps the epoch random while neighbours have similar
    # lengths; sorted() is stable, so ties keep the shuffled order.
    return [position for start in range(0, len(order), pool_size)
            for position in sorted(order[start : start + pool_size], key=lambda p: records[p].length)]


class _BatchUnderConstruction:
    def __init__(self, records: Sequence[TrainingRecord]):
        self.records = records
        self.positions: list[int] = []
        self.text_keys: set[int] = set()
        self.music_keys: set[int] = set()

    def place(self, position: int) -> bool:
        """Add the record unless its text or a music key is already in the batch."""
        record = self.records[position]
        if record.text_key in self.text_keys or not self.music_keys.isdisjoint(record.music_keys):
            return False
        self.positions.append(position)
        self.text_keys.add(record.text_key)
        self.music_keys.update(record.music_keys)
        return True


def _fill_batches(order: list[int], records: Sequence[TrainingRecord], size: int,
                  no_duplicates: bool) -> tuple[list[list[int]], int]:
    """Cut ``order`` into batches of ``size``; with ``no_duplicates`` a record whose text or music
    key is already in the batch waits for a later one (oldest waiting first), as in
    sentence-transformers' NO_DUPLICATES sampler. Returns the batches and how many never fit."""
    if not no_duplicates:
        return [order[start : start + size] for start in range(0, len(order), size)], 0
    batches: list[list[int]] = []
    waiting: list[int] = []
    stream = iter(order)
    while True:
        batch = _BatchUnderConstruction(records)
        still_waiting = []
        for position in waiting:
            if len(batch.positions) >= size or not batch.place(position):
                still_waiting.append(position)
        waiting = still_waiting
        while len(batch.positions) < size:
            position = next(stream, None)
            if position is None:
                break
            if not batch.place(position):
                waiting.append(position)
        if not batch.positions:
            break
        batches.append(batch.positions)
        if len(batch.positions) < size:  # the stream is spent and the waiting records clash with each other
            break
    return batches, len(waiting)


def plan_epoch(records: Sequence[TrainingRecord], global_batch: int, epoch: int, seed: int,
               bucketing: bool = True, no_duplicates: bool = True, pool_batches: int = 50) -> EpochPlan:
    """The training batches of one epoch: a shuffle from ``(seed, epoch)``; with ``bucketing``,
    pools of ``pool_batches`` global batches sorted by length, cut into batches, batch order
    shuffled; with ``no_duplicates``, no two records with an equal text or music key in one global
    batch. Every batch has exactly ``global_batch`` records (the incomplete last one is left out,
    as the official code truncates), so every rank gets the same number of batches. Resume at
    batch k by taking batches k.. of the same plan."""
    if global_batch < 1:
        raise ValueError(f"global batch must be positive, got {global_batch}")
    rng = seeded_rng("plan", seed, epoch)
    order = _shuffled_order(records, rng, bucketing, global_batch * pool_batches)
    batches, unplaced = _fill_batches(order, records, global_batch, no_duplicates)
    left_over = 0
    if batches and len(batches[-1]) < global_batch:
        left_over = len(batches.pop())
    if bucketing:
        rng.shuffle(batches)
    return EpochPlan(batches, unplaced=unplaced, left_over=left_over)


def plan_validation(records: Sequence[TrainingRecord], global_batch: int, seed: int,
                    bucketing: bool = True, pool_batches: int = 50) -> EpochPlan:
    """Every record once, in the same batches every epoch (a fixed shuffle, pools sorted by length
    with ``bucketing``); the last batch may be smaller. No key-clash deferral: the loss masks
    equal keys, and validation must not lose records."""
    if global_batch < 1:
        raise ValueError(f"global batch must be positive, got {global_batch}")
    order = _shuffled_order(records, seeded_rng("validation plan", seed), bucketing,
                            global_batch * pool_batches)
    return EpochPlan([order[start : start + global_batch] for start in range(0, len(order), global_batch)])


def rows_of_rank(batch: Sequence[int], rank: int, world_size: int) -> list[int]:
    """Rank ``rank``'s rows of a global batch: ``[r*G//W, (r+1)*G//W)``, i.e. rows
    ``[r*B, (r+1)*B)`` of a full batch of ``B*W``; a smaller last batch splits as evenly as it can
    (sizes differ by at most one; a rank gets no row when fewer rows than ranks are left)."""
    size = len(batch)
    return list(batch[size * rank // world_size : size * (rank + 1) // world_size])


# ----------------------------------------------------------------------------- dataset


class BatchDataset(Dataset):
    """One rank's batches of an epoch plan, collated: ``DataLoader(ds, batch_size=None, ...)``.

    Item k is the rank's rows of global batch ``start_batch + k``, a dict of tensors:
    ``patches`` [b, L, patch_size] and ``patch_mask`` [b, L] (L = the longest in the batch with
    ``pad_to_longest``, else the patch length, as officially); ``record_index``, ``music_keys``
    (content hash of the file used) and ``text_keys`` (hash of the text's token ids: equal inputs
    to the text tower share it), all [b] int64; and the text source's tensors
    (``training.text.TextSource``: ``text_ids``/``text_mask`` [b, T] of ``LiveText``, ``text_rows``
    [b] of a ``TextFeatureCache``).

    ``train=False`` is validation: the full text (``validation_text``, head truncation), the first
    file, no augmentation (``augmentation`` is ignored); a cache must then be a validation cache.
    Long token sequences are cut at random in training whatever the augmentation, as officially.
    """

    def __init__(self, records: Sequence[TrainingRecord], plan: EpochPlan, patchilizer: M3Patchilizer, *,
                 text: TextSource, seed: int, epoch: int, train: bool = True,
                 augmentation: Augmentation | None = None, rank: int = 0, world_size: int = 1,
                 start_batch: int = 0, pad_to_longest: bool = True):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        if not 0 <= start_batch <= len(plan):
            raise ValueError(f"start batch {start_batch} outside the plan's {len(plan)} batches")
        self.augmentation = (augmentation or Augmentation()) if train else None
        self.text_dropout = self.augmentation is not None and self.augmentation.text_dropout
        text.check(train, self.text_dropout)
        self.records = records
        self.plan = plan
        self.patchilizer = patchilizer
        self.text = text
        self.seed = seed
        self.epoch = epoch
        self.train = train
        self.rank = rank
        self.world_size = world_size
        self.start_batch = start_batch
        self.pad_to_longest = pad_to_longest

    def __len__(self) -> int:
        return len(self.plan) - self.start_batch

    def positions(self, k: int) -> list[int]:
        """Positions (into ``records``) of this rank's rows of item ``k``."""
        return rows_of_rank(self.plan.batches[self.start_batch + k], self.rank, self.world_size)

    def __getitem__(self, k: int) -> dict[str, torch.Tensor]:
        if not 0 <= k < len(self):
            raise IndexError(k)
        records = [self.records[p] for p in self.positions(k)]
        patch_lists, music_keys, text_keys, texts = [], [], [], []
        for record in records:
            patches, number = music_patches(record, self.patchilizer,
                                            example_rng(self.seed, self.epoch, record.index, "music"),
                                            self.augmentation)
            patch_lists.append(patches)
            music_keys.append(record.music_keys[number])
            text, key = self.text.item(record, example_rng(self.seed, self.epoch, record.index, "text"),
                                       self.train, self.text_dropout)
            texts.append(text)
            text_keys.append(key)
        batch = self._collate_patches(patch_lists)
        batch["record_index"] = torch.tensor([r.index for r in records], dtype=torch.long)
        batch["music_keys"] = torch.tensor(music_keys, dtype=torch.long)
        batch["text_keys"] = torch.tensor(text_keys, dtype=torch.long)
        batch.update(self.text.collate(texts, self.pad_to_longest))
        return batch

    def _collate_patches(self, patch_lists: list[list[list[int]]]) -> dict[str, torch.Tensor]:
        size = self.patchilizer.patch_size
        length = self.patchilizer.patch_length
        if self.pad_to_longest:
            length = max((len(p) for p in patch_lists), default=0)
        patches = np.zeros((len(patch_lists), length, size), dtype=np.int64)
        mask = np.zeros((len(patch_lists), length), dtype=np.int64)
        for row, example in enumerate(patch_lists):
            if example:
                patches[row, : len(example)] = example
                mask[row, : len(example)] = 1
        return {"patches": torch.from_numpy(patches), "patch_mask": torch.from_numpy(mask)}
