"""Projected text features computed once, for training with a frozen text tower.

Each record gets ``variants`` text-dropout samples (seeded from ``(seed, record index, variant)``;
the truncation of long texts is part of the variant), and each distinct token-id sequence one row
of float32 features, computed by a passed ``encode(ids, mask)`` in batches sorted by length under
a token budget. Rows live on disk in ``.npy`` shards, memory-mapped when read:

    <root>/text-<fingerprint>-len<max_text_length>/shard-<hash>.features.npy   float32 [n, D]
                                                   shard-<hash>.keys.npy       uint64 [n]

A shard is never modified: a later build with new keys adds a shard with only those, so a second
run computes nothing and a changed text tower (another fingerprint) uses another folder. The key
index is a sorted uint64 array plus a row array (``searchsorted``), so hundreds of thousands of
records times several variants stay out of Python objects. Across ranks every rank computes a
disjoint share of the missing keys and writes its own shard, between two barriers.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import random
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fileio import atomic_save_npy, atomic_write
from torch import nn
from tqdm import tqdm

from training.data import TrainingRecord
from training.text import seeded_rng, text_dropout, token_key, truncate_ids, validation_text

Encoder = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
DEFAULT_TOKENS_PER_BATCH = 16384  # padded tokens per encode call
_RECORDS_PER_CHUNK = 2048  # records drawn and tokenized together


def fingerprint(*modules: nn.Module) -> str:
    """Hex digest of the modules' state dicts (names, dtypes, shapes and bytes): a changed weight
    gives another fingerprint. About a second for the 280M parameters of XLM-R base."""
    digest = hashlib.blake2b(digest_size=16)
    for number, module in enumerate(modules):
        for name, tensor in module.state_dict().items():
            tensor = tensor.detach()
            digest.update(f"{number}:{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
            digest.update(tensor.reshape(-1).contiguous().cpu().view(torch.uint8).numpy())
    return digest.hexdigest()


def cache_folder(root: str | os.PathLike, text_fingerprint: str, max_text_length: int) -> Path:
    return Path(root) / f"text-{text_fingerprint[:32]}-len{max_text_length}"


def variant_token_ids(record: TrainingRecord, variant: int, tokenizer: Any, max_text_length: int,
                      seed: int, train: bool = True, dropout: bool = True) -> list[int]:
    """The token ids of one cached variant: in training, text dropout (unless ``dropout`` is off:
    the full text) and truncation drawn from ``(seed, record index, variant)``; in validation the
    full text, head-truncated."""
    return _variant_ids([(record, variant)], tokenizer, max_text_length, seed, train, dropout)[0]


def _variant_ids(items: Sequence[tuple[TrainingRecord, int]], tokenizer: Any, max_text_length: int,
                 seed: int, train: bool, dropout: bool) -> list[list[int]]:
    if not items:
        return []
    rngs = [seeded_rng("text variant", seed, record.index, variant) if train else None
            for record, variant in items]
    texts = [text_dropout(record.fields, rng) if rng is not None and dropout
             else validation_text(record.fields) for (record, _), rng in zip(items, rngs, strict=True)]
    encoded = tokenizer(texts)["input_ids"]  # one call: fast tokenizers work on the whole list
    return [truncate_ids(list(ids), max_text_length, rng) for ids, rng in zip(encoded, rngs, strict=True)]


class _ShardIndex:
    """The rows already on disk: sorted keys, their global rows, and the shards' row offsets."""

    def __init__(self, folder: Path):
        self.names = sorted(p.name[: -len(".keys.npy")] for p in folder.glob("shard-*.keys.npy"))
        key_arrays = [np.load(folder / f"{name}.keys.npy") for name in self.names]
        sizes = [len(keys) for keys in key_arrays]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        all_keys = np.concatenate(key_arrays) if key_arrays else np.zeros(0, dtype=np.uint64)
        # A key written by two shards (two runs racing) keeps its first row.
        self.keys, first = np.unique(all_keys, return_index=True)
        self.rows = first.astype(np.int64)

    def lookup(self, keys: np.ndarray) -> np.ndarray:
        """Rows of ``keys`` (any shape), -1 where a key has no row."""
        flat = keys.reshape(-1)
        at = np.searchsorted(self.keys, flat)
        found = at < len(self.keys)
        found[found] = self.keys[at[found]] == flat[found]
        rows = np.full(flat.shape, -1, dtype=np.int64)
        rows[found] = self.rows[at[found]]
        return rows.reshape(keys.shape)


class TextFeatureCache:
    """Text features of a set of records, ``variants`` per record, one row per distinct token-id
    sequence. Build with ``TextFeatureCache.build``; ``rows_for``/``key_for`` give an example's row
    and text key (picklable, cheap: DataLoader workers use them), ``features(rows)`` the vectors.
    A ``training.text.TextSource``: batches get ``text_rows`` [b], a random variant per example in
    training, the one variant in validation."""

    def __init__(self, folder: Path, rows: np.ndarray, keys: np.ndarray, offsets: np.ndarray,
                 shard_names: list[str], train: bool, text_dropout: bool, computed: int):
        self.folder = folder
        self.variants = rows.shape[1]
        self.train = train
        self.text_dropout = text_dropout
        self.computed = computed  # rows this rank computed in its build
        self._rows = rows  # [max record index + 1, variants], -1 for records not in the cache
        self._keys = keys  # same shape, int64 token-id keys
        self._offsets = offsets
        self._shard_names = shard_names
        self._shards: list[np.ndarray] | None = None

    @classmethod
    def build(cls, root: str | os.PathLike, records: Sequence[TrainingRecord], tokenizer: Any,
              encode: Encoder, text_fingerprint: str, *, max_text_length: int, variants: int, seed: int,
              train: bool = True, text_dropout: bool = True,
              tokens_per_batch: int = DEFAULT_TOKENS_PER_BATCH, rank: int = 0, world_size: int = 1,
              barrier: Callable[[], None] | None = None, progress: bool = True) -> TextFeatureCache:
        """Draw every record's variants, compute the features of the keys not on disk yet and open
        the cache. ``train=False`` (validation) has one variant, the full text;
        ``text_dropout=False`` makes the training variants the full text too (they then differ only
        where a long text is cut). With several ranks every rank calls this with the same arguments
        and a ``barrier``; each computes every ``world_size``-th missing key. ``encode`` gets CPU
        LongTensors and moves them itself."""
        if variants < 1:
            raise ValueError(f"a text cache needs at least one variant per record, got {variants}")
        if world_size > 1 and barrier is None:
            raise ValueError("a text cache built on several ranks needs a barrier")
        variants = variants if train else 1
        folder = cache_folder(root, text_fingerprint, max_text_length)
        folder.mkdir(parents=True, exist_ok=True)

        size = max((r.index for r in records), default=-1) + 1
        keys = np.zeros((size, variants), dtype=np.int64)
        lengths = np.zeros((size, variants), dtype=np.int32)
        present = np.zeros(size, dtype=bool)
        draw_bar = tqdm(total=len(records), desc="drawing text variants", unit="record", disable=not progress)
        for start in range(0, len(records), _RECORDS_PER_CHUNK):
            chunk = records[start : start + _RECORDS_PER_CHUNK]
            items = [(record, v) for record in chunk for v in range(variants)]
            drawn = _variant_ids(items, tokenizer, max_text_length, seed, train, text_dropout)
            for (record, v), ids in zip(items, drawn, strict=True):
                keys[record.index, v] = token_key(ids)
                lengths[record.index, v] = len(ids)
                present[record.index] = True
            draw_bar.update(len(chunk))
        draw_bar.close()

        existing = _ShardIndex(folder)
        if barrier is not None:
            barrier()  # every rank has listed the shards before any rank writes one
        unsigned = keys[present].view(np.uint64).reshape(-1)
        unique, first = np.unique(unsigned, return_index=True)
        missing = existing.lookup(unique) < 0
        record_positions = np.flatnonzero(present)
        # Flat position of each missing key's first (record, variant) in keys[present].
        flat = first[missing]
        owner_index = record_positions[flat // variants]
        owner_variant = flat % variants
        owner_length = lengths[owner_index, owner_variant]
        order = np.lexsort((unique[missing], owner_length))[rank::world_size]
        by_index = {r.index: r for r in records}
        computed = 0
        if len(order):
            items = [(by_index[int(owner_index[i])], int(owner_variant[i])) for i in order]
            shard_keys = unique[missing][order]
            blocks = _encode_blocks(items, owner_length[order], tokenizer, encode, max_text_length, seed,
                                    train, text_dropout, tokens_per_batch, progress)
            _write_shard(folder, shard_keys, blocks)
            computed = len(order)
        if barrier is not None:
            barrier()  # every share is on disk

        index = _ShardIndex(folder)
        rows = index.lookup(keys.view(np.uint64))
        rows[~present] = -1
        if (rows[present] < 0).any():
            raise RuntimeError(f"text cache {folder}: {(rows[present] < 0).sum()} keys have no row after the "
                               "build (did another rank fail?)")
        return cls(folder, rows, keys, index.offsets, index.names, train, text_dropout and train, computed)

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def rows_for(self, record: TrainingRecord, variant: int) -> int:
        row = int(self._rows[record.index, variant]) if record.index < len(self._rows) else -1
        if row < 0:
            raise KeyError(f"record {record.index} ({record.id}) is not in the text cache {self.folder}")
        return row

    def key_for(self, record: TrainingRecord, variant: int) -> int:
        """The token-id key of a record's variant (``training.text.token_key`` of its ids)."""
        self.rows_for(record, variant)
        return int(self._keys[record.index, variant])

    def check(self, train: bool, dropout: bool) -> None:
        """A training cache serves training batches with the text dropout it was built with; a
        validation cache serves validation batches."""
        if self.train != train:
            raise ValueError(f"a {'training' if self.train else 'validation'} text cache cannot serve "
                             f"{'training' if train else 'validation'} batches")
        if train and self.text_dropout != dropout:
            raise ValueError(f"the text cache was built with text_dropout={self.text_dropout}, the "
                             f"augmentation has text_dropout={dropout}")

    def item(self, record: TrainingRecord, rng: random.Random, train: bool, dropout: bool) -> tuple[int, int]:
        variant = rng.randrange(self.variants) if train else 0
        return self.rows_for(record, variant), self.key_for(record, variant)

    def collate(self, payloads: list[int], pad_to_longest: bool) -> dict[str, torch.Tensor]:
        return {"text_rows": torch.tensor(payloads, dtype=torch.long)}

    def features(self, rows: torch.Tensor | np.ndarray | Sequence[int]) -> torch.Tensor:
        """float32 [len(rows), D] features of cache rows (e.g. a batch's ``text_rows``)."""
        rows = np.asarray(rows.cpu() if isinstance(rows, torch.Tensor) else rows, dtype=np.int64).reshape(-1)
        shards = self._open_shards()
        if (rows < 0).any() or (rows >= len(self)).any():
            raise IndexError(f"text cache rows outside [0, {len(self)})")
        shard_of = np.searchsorted(self._offsets, rows, side="right") - 1
        out = np.empty((len(rows), shards[0].shape[1] if shards else 0), dtype=np.float32)
        for shard in np.unique(shard_of):
            chosen = shard_of == shard
            out[chosen] = shards[shard][rows[chosen] - self._offsets[shard]]
        return torch.from_numpy(out)

    def _open_shards(self) -> list[np.ndarray]:
        if self._shards is None:
            self._shards = [np.load(self.folder / f"{name}.features.npy", mmap_mode="r")
                            for name in self._shard_names]
        return self._shards

    def __getstate__(self) -> dict[str, Any]:
        # A memmap pickles as a copy of its data: a DataLoader worker reopens the files instead.
        return {**self.__dict__, "_shards": None}


def _encode_blocks(items: list[tuple[TrainingRecord, int]], lengths: np.ndarray, tokenizer: Any,
                   encode: Encoder, max_text_length: int, seed: int, train: bool, dropout: bool,
                   tokens_per_batch: int, progress: bool) -> Iterator[np.ndarray]:
    """Features of ``items`` (sorted by token length) in order, one array per encode call."""
    pad_id = tokenizer.pad_token_id
    bar = tqdm(total=len(items), desc="computing text features", unit="text", disable=not progress)
    start = 0
    while start < len(items):
        stop = start + 1
        # Sorted ascending: the last item is the longest, so rows * its length is the padded size.
        while stop < len(items) and (stop + 1 - start) * int(lengths[stop]) <= tokens_per_batch:
            stop += 1
        id_lists = _variant_ids(items[start:stop], tokenizer, max_text_length, seed, train, dropout)
        width = max(len(ids) for ids in id_lists)
        ids = torch.full((len(id_lists), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(id_lists), width), dtype=torch.long)
        for row, example in enumerate(id_lists):
            ids[row, : len(example)] = torch.tensor(example, dtype=torch.long)
            mask[row, : len(example)] = 1
        with torch.no_grad():
            features = encode(ids, mask)
        yield features.detach().float().cpu().numpy()
        bar.update(stop - start)
        start = stop
    bar.close()


def _write_shard(folder: Path, keys: np.ndarray, blocks: Iterator[np.ndarray]) -> None:
    """Stream feature blocks into ``<name>.features.npy``, then write ``<name>.keys.npy``; both
    atomically, keys last, so a shard with a keys file is complete."""
    name = "shard-" + hashlib.blake2b(keys.astype("<u8").tobytes(), digest_size=10).hexdigest()
    first = next(blocks)
    header = {"descr": "<f4", "fortran_order": False, "shape": (len(keys), first.shape[1])}

    def write(f) -> None:  # noqa: ANN001 - a binary file object
        np.lib.format.write_array_header_1_0(f, header)
        written = 0
        for block in itertools.chain([first], blocks):
            f.write(np.ascontiguousarray(block, dtype="<f4").tobytes())
            written += len(block)
        if written != len(keys):
            raise RuntimeError(f"text cache shard {name}: {written} rows computed for {len(keys)} keys")

    atomic_write(folder / f"{name}.features.npy", write, binary=True)
    atomic_save_npy(folder / f"{name}.keys.npy", keys.astype(np.uint64))
