"""The optional audio block of an evaluation: recordings of the test pieces, ranked against the
pieces' scores and MIDI (sheet ↔ audio, MIDI ↔ audio) and against their texts (text ↔ audio).

The audio test set is a JSONL file (``--audio_test`` or ``AUDIO_TEST_JSONL``) of records ``{"id",
"filepaths": [one audio file (.wav/.mp3/.flac/.ogg) or MERT .npy, relative to the JSONL's folder],
"pair_id", "texts": {field: text}}``: ``pair_id`` ties a recording to the symbolic test pieces of
the same ``pair_id`` (as ``cross_format`` ties sheet to MIDI), ``texts`` are optional. Audio goes
through MERT (``MERT_MODEL_PATH``, code/audio/) and the base's audio tower, text through the base's
text tower: both are the same for every system (the adapters live in the symbolic encoder), so what
moves between the base and the adapters is the symbolic side of the sheet/MIDI ↔ audio rows. The
text ↔ audio rows are there as the level the symbolic rows are read against, and they equal the
baseline's by construction.

Every recording must give features: a missing file, one that does not decode or one under 1 s
(no MERT window) is an error naming it, not a drop, as for the symbolic test sets.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import metrics
import numpy as np
from fileio import file_sha256
from formats import AUDIO_EXTENSIONS, FORMATS

from evaluation.results import (
    AUDIO_CROSS_DIRECTIONS,
    AUDIO_PAIR_FIELD,
    AUDIO_SET,
    AUDIO_TEXT_DIRECTIONS,
    ranks_file_rows,
    similarity_key,
)

READABLE = (*AUDIO_EXTENSIONS, ".npy")
FILES_PER_BATCH = 16  # recordings decoded and run through MERT together


class AudioTestSetError(ValueError):
    """An audio test set that cannot be evaluated as given; the message names the record or file."""


@dataclass
class AudioPiece:
    id: str
    path: Path
    texts: dict[str, str]
    pair_id: str | None


@dataclass
class AudioTestSet:
    jsonl: Path
    pieces: list[AudioPiece] = field(default_factory=list)

    def ids_sha256(self) -> str:
        return hashlib.sha256("\n".join(p.id for p in self.pieces).encode("utf-8")).hexdigest()

    def fields(self) -> list[str]:
        return list(dict.fromkeys(name for piece in self.pieces for name in piece.texts))


def load_audio_test_set(jsonl: Path) -> AudioTestSet:
    if not jsonl.is_file():
        raise AudioTestSetError(f"audio test set not found: {jsonl}")
    test_set = AudioTestSet(jsonl)
    seen: set[str] = set()
    for number, line in enumerate(jsonl.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise AudioTestSetError(f"{jsonl}:{number}: not JSON: {exc}") from exc
        piece_id = str(record.get("id", ""))
        if not piece_id or piece_id in seen:
            raise AudioTestSetError(f"{jsonl}:{number}: missing or duplicate id {piece_id!r}")
        seen.add(piece_id)
        files = [p for p in record.get("filepaths", []) if str(p).lower().endswith(READABLE)]
        if not files:
            raise AudioTestSetError(f"{jsonl}:{number}: piece {piece_id!r} has no audio or MERT .npy file "
                                    f"({' '.join(READABLE)}) in filepaths")
        path = jsonl.parent / files[0]
        if not path.is_file():
            raise AudioTestSetError(f"{jsonl}:{number}: file not found: {path}")
        texts = {name: value.strip() for name, value in (record.get("texts") or {}).items()
                 if isinstance(value, str) and value.strip()}
        pair_id = record.get("pair_id")
        test_set.pieces.append(AudioPiece(piece_id, path, texts, None if pair_id is None else str(pair_id)))
    if not test_set.pieces:
        raise AudioTestSetError(f"{jsonl} holds no records")
    return test_set


@dataclass
class AudioFeatures:
    test_set: AudioTestSet
    audio: np.ndarray  # (pieces, D)
    texts: dict[str, tuple[np.ndarray, np.ndarray]]  # field -> (piece indices, text features)
    mert_folder: str


def mert_arrays(test_set: AudioTestSet, mert: Any, log: Callable[[str], None]) -> list[np.ndarray]:
    """The MERT features ``(1, windows, width)`` of every recording (``.npy`` files as they are)."""
    from audio.decode import AudioDecodeError
    from audio.mert_features import mean_features
    from audio.windows import TooShortError

    arrays: list[np.ndarray | None] = [None] * len(test_set.pieces)
    todo = []
    for index, piece in enumerate(test_set.pieces):
        if piece.path.suffix.lower() == ".npy":
            arrays[index] = np.load(piece.path, allow_pickle=False)
        else:
            todo.append(index)
    log(f"[{AUDIO_SET}] MERT features of {len(todo)} recordings ({len(test_set.pieces) - len(todo)} given as .npy)")
    for first in range(0, len(todo), FILES_PER_BATCH):
        batch = todo[first:first + FILES_PER_BATCH]
        waveforms = []
        for index in batch:
            try:
                waveforms.append(mert.waveform(test_set.pieces[index].path))
            except (AudioDecodeError, OSError) as exc:
                raise AudioTestSetError(f"{test_set.pieces[index].path}: {exc}") from exc
        for index, result in zip(batch, mert.features(waveforms), strict=True):
            if isinstance(result, TooShortError):
                raise AudioTestSetError(f"{test_set.pieces[index].path}: {result}")
            arrays[index] = mean_features(result)
    return arrays  # type: ignore[return-value] - every item is set


def extract_audio_set(test_set: AudioTestSet, extractor: Any, mert: Any, log: Callable[[str], None]) -> AudioFeatures:
    """Global features of every recording (MERT, then the audio tower of ``extractor``'s model) and of
    every field's texts."""
    width = int(extractor.model.model_config.audio["hidden_size"])
    if mert.width != width:
        raise AudioTestSetError(f"the MERT model in {mert.folder} gives {mert.width}-wide features but the CLaMP 3 "
                                f"audio tower reads {width}-wide ones (MERT-v1-95M: 768)")
    inputs = [extractor.audio_input(array) for array in mert_arrays(test_set, mert, log)]
    audio = np.concatenate(extractor.extract("audio", inputs, get_global=True)).astype(np.float32)
    texts: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name in test_set.fields():
        indices = np.array([i for i, piece in enumerate(test_set.pieces) if name in piece.texts], dtype=np.int64)
        strings = [test_set.pieces[i].texts[name] for i in indices]
        distinct = list(dict.fromkeys(strings))
        features = np.concatenate(extractor.extract("text", [extractor.text_input(s) for s in distinct],
                                                    get_global=True)).astype(np.float32)
        row_of = {text: row for row, text in enumerate(distinct)}
        texts[name] = (indices, features[[row_of[s] for s in strings]])
    return AudioFeatures(test_set, audio, texts, str(mert.folder))


def _first_of(pair_ids: Sequence[str | None]) -> dict[str, int]:
    first: dict[str, int] = {}
    for index, pair_id in enumerate(pair_ids):
        if pair_id is not None:
            first.setdefault(pair_id, index)
    return first


def _paired_block(forward: str, backward: str, a: np.ndarray, b: np.ndarray, ids: Sequence[str],
                  rank_field: str, n_resamples: int, seed: int, rows: list[dict]) -> dict[str, Any]:
    """Both directions between row-aligned ``a`` and ``b`` (row i of each is one piece): each
    direction's summary, the pair cosines, and the ranks rows appended to ``rows``."""
    block: dict[str, Any] = {"n_pairs": len(ids)}
    for direction, queries, references in ((forward, a, b), (backward, b, a)):
        ranks = metrics.rank_queries(queries, references, np.arange(len(ids)))
        block[direction] = metrics.summarise(ranks, n_resamples=n_resamples, seed=seed)
        rows.extend(ranks_file_rows((AUDIO_SET, rank_field, "pair", direction), ids, ranks))
    block["pair_cosines"] = metrics.pair_cosines(a, b)
    return block


def evaluate_audio(audio: AudioFeatures, symbolic: dict[str, tuple[Sequence[str | None], np.ndarray]],
                   n_resamples: int, seed: int, max_unmatched: int, rows: list[dict],
                   similarities: dict[str, np.ndarray], sample: Callable[..., tuple[np.ndarray, np.ndarray]]
                   ) -> dict[str, Any]:
    """The report's ``audio`` block; the ranks rows and similarity samples appended to ``rows`` and
    ``similarities``. ``symbolic``: per format evaluated, each piece's ``pair_id`` and global feature."""
    test_set = audio.test_set
    fields: dict[str, Any] = {}
    for name, (indices, text_matrix) in audio.texts.items():
        recordings = audio.audio[indices]
        ids = [test_set.pieces[i].id for i in indices]
        entry = _paired_block(*AUDIO_TEXT_DIRECTIONS, text_matrix, recordings, ids, name, n_resamples, seed, rows)
        matched, unmatched = sample(text_matrix, recordings, max_unmatched, seed)
        similarities[similarity_key(AUDIO_SET, name, "matched")] = matched
        similarities[similarity_key(AUDIO_SET, name, "unmatched")] = unmatched
        fields[name] = entry
    cross: dict[str, Any] = {}
    audio_first = _first_of([piece.pair_id for piece in test_set.pieces])
    for fmt in FORMATS:
        if fmt not in symbolic:
            continue
        pair_ids, music = symbolic[fmt]
        music_first = _first_of(pair_ids)
        shared = [pair_id for pair_id in audio_first if pair_id in music_first]
        if not shared:
            continue
        scores = music[[music_first[p] for p in shared]]
        recordings = audio.audio[[audio_first[p] for p in shared]]
        block = _paired_block(*AUDIO_CROSS_DIRECTIONS[fmt], scores, recordings, shared, AUDIO_PAIR_FIELD,
                              n_resamples, seed, rows)
        matched, unmatched = sample(scores, recordings, max_unmatched, seed)
        similarities[similarity_key(AUDIO_SET, fmt, "matched")] = matched
        similarities[similarity_key(AUDIO_SET, fmt, "unmatched")] = unmatched
        cross[fmt] = block
    return {"jsonl": str(test_set.jsonl), "jsonl_sha256": file_sha256(test_set.jsonl),
            "n_pieces": len(test_set.pieces), "ids_sha256": test_set.ids_sha256(), "mert_model": audio.mert_folder,
            "fields": fields, "cross": cross}


def audio_summary(report: dict[str, Any], field_name: str, direction: str) -> dict[str, Any]:
    """The ``metrics.summarise`` block of one audio row inside a report."""
    block = report["audio"]
    if field_name == AUDIO_PAIR_FIELD:
        fmt = next(f for f, directions in AUDIO_CROSS_DIRECTIONS.items() if direction in directions)
        return block["cross"][fmt][direction]
    return block["fields"][field_name][direction]
