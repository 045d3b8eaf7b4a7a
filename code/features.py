"""The one feature-extraction path (extraction, evaluation and search all use it).

Long inputs are cut into segments as the official ``extract_clamp3.py`` does: ``x[0:S], x[S:2S], ...``
with the last segment replaced by the final ``S`` items; global features are the length-weighted
mean of the segments' projected pooled vectors (the overlapping last segment weighted by the
remainder only). Unlike the official one-segment-per-forward loop padded to ``S``, segments of many
pieces are sorted by length and run together, each batch padded only to its own longest segment.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import config
import numpy as np
import torch
from fast_linears import ONEDNN_DTYPES, onednn_linear_available, onednn_linears
from modeling import CLaMP3Model, ModelConfig, masked_mean, resolve_device
from patchilizer import M3Patchilizer

# Which tower reads a file, by extension: symbolic music, text captions, MERT audio features.
MODALITY_OF_EXTENSION = {".abc": "symbolic", ".mtf": "symbolic", ".txt": "text", ".npy": "audio"}
EXTRACT_DTYPES = ("float32", "bfloat16", "float16")


def check_dtype(dtype: str) -> None:
    """The one check of EXTRACT_DTYPE (float32 matches the official features; the others autocast)."""
    if dtype not in EXTRACT_DTYPES:
        raise ValueError(f"EXTRACT_DTYPE must be float32, bfloat16 or float16, not {dtype!r}")


def segment_bounds(length: int, segment_length: int) -> list[tuple[int, int]]:
    """``[start, end)`` of each segment; the last one is the final ``segment_length`` items."""
    if length <= 0:
        raise ValueError("cannot segment an empty input")
    bounds = [(s, min(s + segment_length, length)) for s in range(0, length, segment_length)]
    bounds[-1] = (max(0, length - segment_length), length)
    return bounds


def segment_weights(length: int, segment_length: int) -> list[int]:
    """Official aggregation weights: ``S`` per full segment, the remainder for the last one."""
    weights = [segment_length] * (length // segment_length)
    if length % segment_length:
        weights.append(length % segment_length)
    return weights


def segment_length_limits(model_config: ModelConfig) -> dict[str, int]:
    """The longest segment each tower takes: its position-embedding count (the text tower's
    positions start after the padding index, as in RoBERTa, so it takes ``pad_token_id + 1`` fewer)."""
    text = model_config.text
    return {
        "symbolic": int(model_config.symbolic.get("max_position_embeddings", 512)),
        "text": int(text.get("max_position_embeddings", 512)) - int(text.get("pad_token_id", 1)) - 1,
        "audio": int(model_config.audio.get("max_position_embeddings", 512)),
    }


@dataclass
class _Segment:
    piece: int
    index: int
    start: int
    end: int


# Downloads are opt-in: only an explicit HF_HUB_OFFLINE=0 (or false/no/off) lets the hub be asked.
# Unset, the Hugging Face libraries would go online by default; this project never does unasked.
DOWNLOAD_OPT_IN = "HF_HUB_OFFLINE=0"


def downloads_allowed() -> bool:
    """True only when the environment sets ``HF_HUB_OFFLINE`` explicitly to 0/false/no/off."""
    value = os.environ.get("HF_HUB_OFFLINE")
    return value is not None and value.strip().lower() in ("0", "false", "no", "off")


def _looks_like_path(name: str) -> bool:
    """A name that cannot be a hub id (``owner/name``): an absolute or dotted path, or deeper folders."""
    return Path(name).is_absolute() or name.startswith((".", "~")) or name.count("/") > 1 or "\\" in name


def load_text_tokenizer(name_or_path: str, allow_download: bool | None = None):
    """The XLM-R tokenizer from a local folder (relative: to the repository root), else from the
    Hugging Face cache without touching the network; a download only when ``allow_download`` (default:
    ``downloads_allowed()``, i.e. ``HF_HUB_OFFLINE=0`` set explicitly). Fails at once with the fix."""
    from fileio import repo_path
    from transformers import AutoTokenizer

    # TEXT_MODEL_NAME is a configuration path: a relative folder is under the repository root (the
    # path rule of docs/ARCHITECTURE.md), whatever the working directory; otherwise a hub name.
    local = repo_path(name_or_path)
    fix = (f"Fix: --TEXT_MODEL_NAME=DIR, a local folder holding the {config.TEXT_MODEL_NAME} tokenizer (e.g. "
           "written by AutoTokenizer.save_pretrained), or allow one download into the Hugging Face cache by "
           f"setting {DOWNLOAD_OPT_IN} explicitly (README, 'Offline behaviour')")
    if local.is_dir():
        try:
            return AutoTokenizer.from_pretrained(str(local), local_files_only=True)
        except Exception as exc:  # noqa: BLE001 - transformers raises many kinds; the advice is the same
            raise RuntimeError(f"the folder {local} (TEXT_MODEL_NAME) holds no loadable tokenizer: {_reason(exc)}. "
                               f"{fix}") from exc
    if _looks_like_path(str(name_or_path)):
        raise RuntimeError(f"text tokenizer folder not found: {local} (TEXT_MODEL_NAME={name_or_path!r}). {fix}")
    download = downloads_allowed() if allow_download is None else allow_download
    if not download:
        # The cache is read as files: even ``local_files_only`` lets the hub library contact the hub
        # (its telemetry), which an offline machine must not wait for.
        snapshot = _cached_snapshot(name_or_path)
        if snapshot is None:
            from huggingface_hub import constants

            raise RuntimeError(
                f"text tokenizer {name_or_path!r} (TEXT_MODEL_NAME) is neither a folder ({local}) nor in the "
                f"Hugging Face cache ({constants.HF_HUB_CACHE}); nothing is downloaded unless asked. {fix}")
        try:
            return AutoTokenizer.from_pretrained(str(snapshot), local_files_only=True)
        except Exception as exc:  # noqa: BLE001 - transformers raises many kinds; the advice is the same
            raise RuntimeError(f"text tokenizer {name_or_path!r} is in the Hugging Face cache ({snapshot}) but "
                               f"does not load: {_reason(exc)}. {fix}") from exc
    try:
        return AutoTokenizer.from_pretrained(name_or_path)
    except Exception as exc:  # noqa: BLE001 - the hub raises many kinds; the advice is the same
        raise RuntimeError(f"cannot download the text tokenizer {name_or_path!r} (downloads allowed): {_reason(exc)}. "
                           "Fix: check the connection, or --TEXT_MODEL_NAME=DIR, a local folder holding the "
                           "tokenizer") from exc


def _reason(exc: Exception) -> str:
    """An exception's message on one line, without its final full stop (a sentence follows)."""
    return " ".join(str(exc).split()).rstrip(".")


def _cached_snapshot(repo_id: str) -> Path | None:
    """The Hugging Face cache's folder of ``repo_id`` (its ``main`` snapshot) holding a tokenizer file,
    found on disk alone; None when it is not cached."""
    from huggingface_hub import try_to_load_from_cache

    for filename in ("tokenizer_config.json", "tokenizer.json", "sentencepiece.bpe.model"):
        try:
            found = try_to_load_from_cache(repo_id, filename)
        except Exception:  # noqa: BLE001 - an invalid repo id is simply not cached
            return None
        if isinstance(found, str):
            return Path(found).parent
    return None


class FeatureExtractor:
    """Batched, length-grouped CLaMP 3 features for symbolic music, text and audio (MERT) inputs."""

    def __init__(
        self,
        model: CLaMP3Model,
        device: str | torch.device | None = None,
        dtype: str = config.EXTRACT_DTYPE,
        tokens_per_batch: int = config.EXTRACT_TOKENS_PER_BATCH,
        tokenizer: Any = None,
        patchilizer: M3Patchilizer | None = None,
        segment_lengths: dict[str, int] | None = None,
        max_padding: float = config.EXTRACT_MAX_PADDING,
    ):
        """Defaults are config.py's; ``from_config`` takes them from a run's configuration instead.
        ``device`` defaults to the model's. ``segment_lengths`` overrides PATCH_LENGTH,
        MAX_TEXT_LENGTH and MAX_AUDIO_LENGTH per modality; the model's position limits cap them."""
        check_dtype(dtype)
        self.model = model
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.dtype = dtype
        self.tokens_per_batch = tokens_per_batch
        self.max_padding = max_padding
        self.use_onednn = onednn_linear_available()
        self.tokenizer = tokenizer
        self.patchilizer = patchilizer or M3Patchilizer(model.model_config.patch_size)
        requested = {"symbolic": config.PATCH_LENGTH, "text": config.MAX_TEXT_LENGTH,
                     "audio": config.MAX_AUDIO_LENGTH, **(segment_lengths or {})}
        limits = segment_length_limits(model.model_config)
        self.segment_lengths = {modality: min(int(requested[modality]), limits[modality]) for modality in limits}

    @classmethod
    def from_config(cls, model: CLaMP3Model, cfg: dict[str, Any], tokenizer: Any = None,
                    device: str | torch.device | None = None) -> FeatureExtractor:
        """An extractor with every setting from ``cfg`` (``runconfig.build_config``): EXTRACT_DTYPE,
        EXTRACT_TOKENS_PER_BATCH, EXTRACT_MAX_PADDING, the segment lengths PATCH_LENGTH,
        MAX_TEXT_LENGTH and MAX_AUDIO_LENGTH, and EXTRACT_DEVICE unless ``device`` is given."""
        return cls(
            model, device=resolve_device(cfg["EXTRACT_DEVICE"]) if device is None else device,
            dtype=cfg["EXTRACT_DTYPE"], tokens_per_batch=cfg["EXTRACT_TOKENS_PER_BATCH"], tokenizer=tokenizer,
            max_padding=cfg["EXTRACT_MAX_PADDING"],
            segment_lengths={"symbolic": cfg["PATCH_LENGTH"], "text": cfg["MAX_TEXT_LENGTH"],
                             "audio": cfg["MAX_AUDIO_LENGTH"]},
        )

    # ------------------------------------------------------------------ inputs
    def symbolic_input(self, text: str) -> torch.Tensor:
        """Interleaved ABC or MTF text -> ``[N, patch_size]`` ids with BOS/EOS patches."""
        return torch.tensor(self.patchilizer.encode(text, add_special_patches=True), dtype=torch.long)

    def text_input(self, text: str) -> torch.Tensor:
        """Lines deduplicated (first occurrence kept, where the official ``set`` order is random),
        joined with the separator token, tokenized with special tokens and no truncation."""
        if self.tokenizer is None:
            raise RuntimeError("text inputs need a tokenizer (FeatureExtractor(tokenizer=...))")
        lines = [line for line in dict.fromkeys(text.split("\n")) if line.strip()]
        if not lines:
            raise ValueError("text is empty")
        ids = self.tokenizer(self.tokenizer.sep_token.join(lines))["input_ids"]
        return torch.tensor(ids, dtype=torch.long)

    def audio_input(self, features: np.ndarray) -> torch.Tensor:
        """MERT features -> ``[N + 2, D]`` with the official zero vector at both ends."""
        width = self.model.model_config.audio["hidden_size"]
        array = np.asarray(features, dtype=np.float32)
        if array.size == 0 or array.size % width:
            raise ValueError(f"MERT features of shape {array.shape} cannot be read as rows of {width}")
        rows = torch.from_numpy(array.reshape(-1, width).copy())
        zero = torch.zeros(1, width)
        return torch.cat([zero, rows, zero], dim=0)

    def read_input(self, path: str | Path) -> tuple[str, torch.Tensor]:
        """(modality, model input) for one file, by extension."""
        path = Path(path)
        modality = MODALITY_OF_EXTENSION.get(path.suffix.lower())
        if modality is None:
            raise ValueError(f"unsupported file type {path.suffix!r}")
        if modality == "audio":
            return modality, self.audio_input(np.load(path, allow_pickle=False))
        text = path.read_text(encoding="utf-8")
        if not text.strip():
            raise ValueError("file is empty")
        if modality == "text":
            return modality, self.text_input(text)
        return modality, self.symbolic_input(text)

    # ------------------------------------------------------------------ forward
    def _pad_value(self, modality: str) -> int:
        if modality == "text":
            return int(self.model.model_config.text.get("pad_token_id", 1))
        return 0

    def _autocast(self):
        if self.dtype == "float32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=getattr(torch, self.dtype))

    def _fast_kernels(self):
        dtype = getattr(torch, self.dtype)
        if (self.use_onednn and self.device.type == "cpu" and dtype in ONEDNN_DTYPES
                and onednn_linear_available(dtype)):
            return onednn_linears(self.model, dtype)
        return contextlib.nullcontext()

    def _batches(self, segments: list[_Segment]) -> list[list[_Segment]]:
        """Longest first. A batch closes when its padded size (count x longest) would pass the
        budget, or when taking the next segment would make padding more than ``max_padding`` of
        the batch: most compute goes to real patches while batches stay large."""
        ordered = sorted(segments, key=lambda s: s.end - s.start, reverse=True)
        batches: list[list[_Segment]] = []
        current: list[_Segment] = []
        real = 0
        for seg in ordered:
            length = seg.end - seg.start
            if current:
                longest = current[0].end - current[0].start
                padded = longest * (len(current) + 1)
                if padded > self.tokens_per_batch or padded - (real + length) > self.max_padding * padded:
                    batches.append(current)
                    current, real = [], 0
            current.append(seg)
            real += length
        if current:
            batches.append(current)
        return batches

    @torch.inference_mode()
    def extract(
        self, modality: str, inputs: Sequence[torch.Tensor], get_global: bool = True
    ) -> list[np.ndarray]:
        """Features of each input: ``(1, D)`` global or ``(1, N, hidden)`` per item, float32."""
        seg_len = self.segment_lengths[modality]
        segments = [
            _Segment(piece, index, start, end)
            for piece, x in enumerate(inputs)
            for index, (start, end) in enumerate(segment_bounds(len(x), seg_len))
        ]
        outputs: dict[tuple[int, int], torch.Tensor] = {}
        with self._fast_kernels():
            for batch in self._batches(segments):
                self._run_batch(modality, batch, inputs, get_global, outputs)
        return [self._combine(outputs, piece, len(x), seg_len, get_global) for piece, x in enumerate(inputs)]

    def _run_batch(self, modality: str, batch: list[_Segment], inputs: Sequence[torch.Tensor],
                   get_global: bool, outputs: dict[tuple[int, int], torch.Tensor]) -> None:
        pad = self._pad_value(modality)
        projection = self.model.projection(modality)
        longest = batch[0].end - batch[0].start
        first = inputs[batch[0].piece]
        values = torch.full((len(batch), longest, *first.shape[1:]), pad, dtype=first.dtype)
        mask = torch.zeros(len(batch), longest, dtype=torch.long)
        for row, seg in enumerate(batch):
            values[row, : seg.end - seg.start] = inputs[seg.piece][seg.start : seg.end]
            mask[row, : seg.end - seg.start] = 1
        values, mask = values.to(self.device), mask.to(self.device)
        with self._autocast():
            hidden = self.model.hidden_states(modality, values, mask).float()
            if get_global:
                result = projection(masked_mean(hidden, mask)).float()
        for row, seg in enumerate(batch):
            if get_global:
                outputs[(seg.piece, seg.index)] = result[row].cpu()
            else:
                outputs[(seg.piece, seg.index)] = hidden[row, : seg.end - seg.start].cpu()

    @staticmethod
    def _combine(outputs, piece: int, length: int, seg_len: int, get_global: bool) -> np.ndarray:
        weights = segment_weights(length, seg_len)
        parts = [outputs[(piece, i)] for i in range(len(weights))]
        if get_global:
            w = torch.tensor(weights, dtype=torch.float32).unsqueeze(-1)
            stacked = torch.stack(parts)
            feature = (stacked * w).sum(dim=0) / w.sum()
            return feature.unsqueeze(0).numpy()
        remainder = length % seg_len
        if remainder:
            parts[-1] = parts[-1][-remainder:]
        return torch.cat(parts, dim=0).unsqueeze(0).numpy()
