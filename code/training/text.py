"""The text half of the trainer's data: stable hashes and seeded generators, the official text
dropout and truncation (reference section 5), token keys, and the text sources a batch dataset
draws from.

A text source is where an example's text comes from: ``LiveText`` (token ids, for a text tower
that runs every step) or ``training.text_cache.TextFeatureCache`` (rows of precomputed features).
Both implement ``TextSource``, so the dataset (``training.data.BatchDataset``) names neither.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from records import same_text_key

TEXT_SEPARATOR = "</s>"  # the literal the official code joins text lines with (XLM-R id 2)
# The official loader's non-text keys, and pair_id (one piece in both formats, training.pairs).
NON_TEXT_KEYS = frozenset({"id", "filepaths", "language", "translations", "pair_id"})
TRANSLATION_P = 0.5  # official: translated fields are the candidates half of the time
KEEP_LINE_P = 0.5
TRUNCATIONS = ("head", "tail", "middle")


# ----------------------------------------------------------------------------- hashing


def stable_hash(*parts: object) -> int:
    """A signed 64-bit hash of the parts' text, the same in every process (unlike ``hash``)."""
    text = "\x1f".join(str(part) for part in parts)
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def bytes_hash(data: bytes) -> int:
    """A signed 64-bit content hash (fits an int64 tensor)."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little", signed=True)


def seeded_rng(*parts: object) -> random.Random:
    """A generator of its own, seeded from the parts (e.g. seed, epoch, record index, stream)."""
    return random.Random(stable_hash(*parts) & 0xFFFF_FFFF_FFFF_FFFF)


# ----------------------------------------------------------------------------- text


def _strings(mapping: dict[str, Any], skip: Iterable[str]) -> list[str]:
    skip = set(skip)
    found: list[str] = []
    for key, value in mapping.items():
        if key in skip:
            continue
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, str):
                found.append(item)
    return found


def text_lines(fields: dict[str, Any], translations: bool = False) -> list[str]:
    """The distinct non-blank lines of a record's text fields (or of its ``translations``), in
    record order. Official: the same candidates, deduplicated through a ``set`` (process-dependent
    order); here the first occurrence wins and lines are stripped."""
    if translations:
        translated = fields.get("translations")
        values = _strings(translated, {"language"}) if isinstance(translated, dict) else []
    else:
        values = _strings(fields, NON_TEXT_KEYS)
    lines: dict[str, None] = {}
    for value in values:
        for line in value.split("\n"):
            line = line.strip()
            if line:
                lines.setdefault(line, None)
    return list(lines)


def validation_text(fields: dict[str, Any]) -> str:
    """Every text line in record order, joined with ``</s>`` (translations only when a record has
    nothing else); empty when the record has no usable text."""
    lines = text_lines(fields) or text_lines(fields, translations=True)
    return TEXT_SEPARATOR.join(lines)


def text_dropout(fields: dict[str, Any], rng: random.Random) -> str:
    """Official text dropout, deterministic given ``rng``: translations with p 0.5, each line kept
    with p 0.5 (all of them if none is kept), shuffled, joined with ``</s>``.

    Unlike the official code, a record whose chosen source (translations or not) is empty falls
    back to the other, so the result is never empty for a record that ``validation_text`` accepts.
    """
    use_translations = rng.random() < TRANSLATION_P
    lines = text_lines(fields, use_translations) or text_lines(fields, not use_translations)
    kept = [line for line in lines if rng.random() < KEEP_LINE_P] or list(lines)
    rng.shuffle(kept)
    return TEXT_SEPARATOR.join(kept)


def normalised_text_key(text: str) -> int:
    """Hash of the casefolded, whitespace-collapsed text: records that read the same share it."""
    return stable_hash(same_text_key(text))


def truncate_ids(ids: list[int], max_length: int, rng: random.Random | None) -> list[int]:
    """Official ``random_truncate`` of token ids longer than ``max_length``: head, tail or a middle
    window starting at ``randint(1, n - max_length)``; the head when ``rng`` is None (validation)."""
    if len(ids) <= max_length:
        return ids
    choice = "head" if rng is None else rng.choice(TRUNCATIONS)
    if choice == "head":
        return ids[:max_length]
    if choice == "tail":
        return ids[-max_length:]
    start = rng.randint(1, len(ids) - max_length)
    return ids[start : start + max_length]


def text_token_ids(tokenizer: Any, text: str, max_length: int, rng: random.Random | None) -> list[int]:
    """``tokenizer(text)`` with special tokens and without truncation, then ``truncate_ids``."""
    return truncate_ids(list(tokenizer(text)["input_ids"]), max_length, rng)


def token_key(ids: Sequence[int]) -> int:
    """Signed 64-bit hash of token ids: equal ids (equal inputs to the text tower) share it."""
    return bytes_hash(np.asarray(ids, dtype="<i8").tobytes())


# ----------------------------------------------------------------------------- text sources


class TextSource(Protocol):
    """Where a batch dataset's texts come from. ``record`` is a ``training.data.TrainingRecord``;
    ``rng`` the example's own text generator; ``train=False`` is validation (full text, head
    truncation); ``dropout`` whether training examples get the official text dropout."""

    def check(self, train: bool, dropout: bool) -> None:
        """Raise ``ValueError`` when this source cannot serve such batches."""

    def item(self, record: Any, rng: random.Random, train: bool, dropout: bool) -> tuple[Any, int]:
        """``(payload, text key)`` of one example: what ``collate`` batches, and the hash equal
        inputs to the text tower share."""

    def collate(self, payloads: list[Any], pad_to_longest: bool) -> dict[str, torch.Tensor]:
        """The batch's text tensors from its examples' payloads, in order."""


@dataclass(frozen=True)
class LiveText:
    """Text tokenized every step (the text tower runs): a Hugging Face tokenizer and the length
    token ids are truncated to. Batches get ``text_ids``/``text_mask`` [b, T]."""

    tokenizer: Any
    max_length: int

    def check(self, train: bool, dropout: bool) -> None:
        """Any batch: the text is drawn as it is asked for."""

    def item(self, record: Any, rng: random.Random, train: bool, dropout: bool) -> tuple[list[int], int]:
        text = text_dropout(record.fields, rng) if train and dropout else validation_text(record.fields)
        ids = text_token_ids(self.tokenizer, text, self.max_length, rng if train else None)
        return ids, token_key(ids)

    def collate(self, payloads: list[list[int]], pad_to_longest: bool) -> dict[str, torch.Tensor]:
        length = max((len(ids) for ids in payloads), default=0) if pad_to_longest else self.max_length
        ids = np.full((len(payloads), length), self.tokenizer.pad_token_id, dtype=np.int64)
        mask = np.zeros((len(payloads), length), dtype=np.int64)
        for row, example in enumerate(payloads):
            ids[row, : len(example)] = example
            mask[row, : len(example)] = 1
        return {"text_ids": torch.from_numpy(ids), "text_mask": torch.from_numpy(mask)}
