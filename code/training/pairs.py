"""The joint run's data: the two formats' records joined into pieces by ``pair_id``, epoch plans of
pieces, and the batches of both formats a step trains on (``training.joint``).

A **piece** is one pair (an ABC and an MTF record of one ``pair_id``) or one record without a
partner. An epoch plan draws global batches of pieces exactly as ``data.plan_epoch`` draws records
(the same shuffle, length pools and no-duplicate rule: no two pieces of a batch share a text or a
music key of the same format), then cuts each batch into one batch per format: its pairs first, in
the batch's order, then its records without a partner. So rows ``0 .. pairs - 1`` of the gathered
ABC and MTF features of a step are the step's pairs, on any number of ranks: each format's batch
is split over the ranks as ``data.rows_of_rank`` splits a record batch (contiguous, in order).
A format's batch may hold fewer rows than there are ranks, or none.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from formats import FORMATS
from torch.utils.data import Dataset

from training.data import BatchDataset, EpochPlan, TrainingRecord, plan_epoch
from training.text import stable_hash


@dataclass(frozen=True, slots=True)
class Piece:
    """One piece: its record of each format (positions into that format's record list; None where
    it has none). ``length``, ``text_key`` and ``music_keys`` are what ``data.plan_epoch`` reads:
    the longer member's length; a key of the piece's own (pieces never clash on it); and every
    text and music key of both members, tagged with its format, so two pieces clash where their
    records of one format would."""

    abc: int | None
    mtf: int | None
    length: int
    text_key: int
    music_keys: tuple[int, ...]

    @property
    def paired(self) -> bool:
        return self.abc is not None and self.mtf is not None

    def position(self, fmt: str) -> int | None:
        return self.abc if fmt == "abc" else self.mtf


@dataclass
class Pairing:
    """The pieces of two record lists: the pairs first (in ABC record order), then the ABC records
    without a partner, then the MTF ones. ``repeated``: records whose ``pair_id`` an earlier record
    of the same format already had (each trains alone)."""

    pieces: list[Piece]
    repeated: dict[str, int] = field(default_factory=dict)

    @property
    def pairs(self) -> list[Piece]:
        return [piece for piece in self.pieces if piece.paired]

    def alone(self, fmt: str) -> int:
        """How many records of ``fmt`` have no partner."""
        return sum(1 for piece in self.pieces if not piece.paired and piece.position(fmt) is not None)

    def summary(self) -> str:
        repeated = {fmt: n for fmt, n in self.repeated.items() if n}
        return (f"{len(self.pieces)} pieces: {len(self.pairs)} pairs, " +
                ", ".join(f"{self.alone(fmt)} {fmt} records without a partner" for fmt in FORMATS) +
                (f" ({', '.join(f'{n} {fmt}' for fmt, n in repeated.items())} records repeat an earlier "
                 "pair_id of their format and train alone)" if repeated else ""))


def _tagged_keys(fmt: str, record: TrainingRecord) -> tuple[int, ...]:
    return (stable_hash("pair text", fmt, record.text_key),
            *(stable_hash("pair music", fmt, key) for key in record.music_keys))


def pair_records(records: Mapping[str, Sequence[TrainingRecord]]) -> Pairing:
    """Join the records of each format (``{"abc": [...], "mtf": [...]}``) into pieces by
    ``pair_id``; the first record of a format with a ``pair_id`` takes it."""
    first: dict[str, dict[str, int]] = {fmt: {} for fmt in FORMATS}
    repeated = dict.fromkeys(FORMATS, 0)
    for fmt in FORMATS:
        for position, record in enumerate(records[fmt]):
            if record.pair_id is None:
                continue
            if record.pair_id in first[fmt]:
                repeated[fmt] += 1
            else:
                first[fmt][record.pair_id] = position
    partner = {pair_id: (position, first["mtf"][pair_id]) for pair_id, position in first["abc"].items()
               if pair_id in first["mtf"]}
    paired_positions = {fmt: {p[i] for p in partner.values()} for i, fmt in enumerate(FORMATS)}
    members: list[tuple[int | None, int | None]] = [partner[pair_id] for pair_id in first["abc"] if pair_id in partner]
    members += [(p, None) for p in range(len(records["abc"])) if p not in paired_positions["abc"]]
    members += [(None, p) for p in range(len(records["mtf"])) if p not in paired_positions["mtf"]]
    pieces = []
    for number, (abc, mtf) in enumerate(members):
        own = [(fmt, records[fmt][p]) for fmt, p in (("abc", abc), ("mtf", mtf)) if p is not None]
        pieces.append(Piece(abc=abc, mtf=mtf, length=max(r.length for _, r in own),
                            text_key=stable_hash("piece", number),
                            music_keys=tuple(k for fmt, r in own for k in _tagged_keys(fmt, r))))
    return Pairing(pieces, repeated)


@dataclass(frozen=True)
class JointPlan:
    """One epoch of the joint run: global batches of pieces, and each
    format's batches (record positions, pairs first) with the number of pairs in each batch."""

    pieces: EpochPlan
    formats: dict[str, EpochPlan]
    pairs: list[int]

    def __len__(self) -> int:
        return len(self.pieces)


def _cut(pairing: Pairing, plan: EpochPlan) -> JointPlan:
    formats: dict[str, list[list[int]]] = {fmt: [] for fmt in FORMATS}
    pairs = []
    for batch in plan.batches:
        pieces = [pairing.pieces[p] for p in batch]
        ordered = [p for p in pieces if p.paired] + [p for p in pieces if not p.paired]
        for fmt in FORMATS:
            formats[fmt].append([pos for p in ordered if (pos := p.position(fmt)) is not None])
        pairs.append(sum(p.paired for p in pieces))
    return JointPlan(plan, {fmt: EpochPlan(batches) for fmt, batches in formats.items()}, pairs)


def plan_joint_epoch(pairing: Pairing, global_batch: int, epoch: int, seed: int, bucketing: bool = True,
                     no_duplicates: bool = True) -> JointPlan:
    """``data.plan_epoch`` over the pieces (``unplaced`` and ``left_over`` count pieces), cut per format."""
    return _cut(pairing, plan_epoch(pairing.pieces, global_batch, epoch, seed, bucketing=bucketing,
                                    no_duplicates=no_duplicates))


class JointBatchDataset(Dataset):
    """One rank's rows of each global batch of a ``JointPlan``: item k is ``{"abc": ..., "mtf": ...}``
    (each format's ``data.BatchDataset`` item of that batch, possibly without rows) and
    ``"pairs"``, how many of the global batch's rows of each format are pairs (the first ones)."""

    def __init__(self, parts: Mapping[str, BatchDataset], pairs: Sequence[int]):
        lengths = {len(part) for part in parts.values()}
        starts = {part.start_batch for part in parts.values()}
        if len(lengths) != 1 or len(starts) != 1 or set(parts) != set(FORMATS):
            raise ValueError("a joint batch needs one batch dataset per format over the same batches")
        self.parts = dict(parts)
        self.pairs = list(pairs)
        self.start_batch = starts.pop()

    def __len__(self) -> int:
        return len(self.parts[FORMATS[0]])

    def __getitem__(self, k: int) -> dict[str, Any]:
        if not 0 <= k < len(self):
            raise IndexError(k)
        item: dict[str, Any] = {fmt: part[k] for fmt, part in self.parts.items()}
        item["pairs"] = self.pairs[self.start_batch + k]
        return item
