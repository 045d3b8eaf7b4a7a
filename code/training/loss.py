"""The contrastive loss of CLaMP 3 over the global batch, and one training step with optional
gradient caching (GradCache, Gao et al. 2021) so large global batches fit in memory.

The trainer passes closures that encode one (micro-)batch: ``encode_music(batch) -> [b, D]`` and
``encode_text(batch) -> [b, D]``, or, with the text side frozen, precomputed text features
``[B, D]``. ``contrastive_step`` runs forward and backward and leaves the gradients in the
parameters; averaging them over ranks (``distributed.all_reduce_gradients``) and the optimiser step
stay with the trainer. Autocast may wrap the call or live inside the closures: the loss always runs
in float32.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import config
import torch
import torch.nn.functional as F
from torch import nn

from training.distributed import all_gather_tensor, gather_with_grad

Batch = Mapping[str, Any]
Encoder = Callable[[Batch], torch.Tensor]

LOSS_VARIANTS = ("clamp3", "normalized")  # the values of config.LOSS
OPEN_CLIP_INIT_TEMPERATURE = 0.07
OPEN_CLIP_MAX_LOGIT_SCALE = 100.0


class ContrastiveLoss(nn.Module):
    """Symmetric cross-entropy over the text × music logits of the global batch.

    ``variant="clamp3"``: CLaMP 3's loss, on unnormalised features with the fixed scale ``logit_scale``.
    ``variant="normalized"``: L2-normalised features and a learnable temperature (the log of the scale,
    ``log_logit_scale``, open_clip's initialisation; the scale is capped at ``max_logit_scale``).

    In a multi-process job the features (and keys) of every rank are gathered, so each rank
    computes the same global loss; ``gather=False`` keeps the loss local to the rank.
    """

    def __init__(self, variant: str = "clamp3", logit_scale: float = config.LOGIT_SCALE,
                 init_temperature: float = OPEN_CLIP_INIT_TEMPERATURE,
                 max_logit_scale: float = OPEN_CLIP_MAX_LOGIT_SCALE, gather: bool = True):
        super().__init__()
        if variant not in LOSS_VARIANTS:
            raise ValueError(f"unknown loss {variant!r}; expected one of {LOSS_VARIANTS}")
        self.variant = variant
        self.normalized = variant == "normalized"
        self.fixed_logit_scale = float(logit_scale)
        self.max_log_logit_scale = math.log(max_logit_scale)
        self.gather = gather
        self.log_logit_scale: nn.Parameter | None = None
        if self.normalized:
            self.log_logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)))

    @property
    def temperature_parameter(self) -> nn.Parameter | None:
        """The learnable log scale (keep it out of weight decay; it is in ``state_dict``), or None."""
        return self.log_logit_scale

    @property
    def learnable(self) -> bool:
        return self.log_logit_scale is not None

    def scale(self) -> torch.Tensor:
        """The scale the logits are multiplied by, as used in the forward."""
        if self.log_logit_scale is None:
            return torch.tensor(self.fixed_logit_scale)
        return self.log_logit_scale.clamp(max=self.max_log_logit_scale).exp()

    def forward(self, text_features: torch.Tensor, music_features: torch.Tensor,
                text_keys: torch.Tensor | None = None, music_keys: torch.Tensor | None = None) -> torch.Tensor:
        """Loss of this rank's rows ``[B_local, D]`` against the global batch. Off-diagonal pairs
        sharing a text key or a music key (``[B_local]`` integers) are not negatives: their logits
        are masked out. In a multi-process job every rank passes the same keys (text, music or both)."""
        if text_features.shape != music_features.shape or text_features.dim() != 2:
            raise ValueError(f"text and music features must be [B, D] alike, got {tuple(text_features.shape)} "
                             f"and {tuple(music_features.shape)}")
        dim = text_features.shape[1]
        with torch.autocast(device_type=text_features.device.type, enabled=False):
            # One gather for both sides: one collective, and the same order on every rank.
            pair = torch.cat([text_features.float(), music_features.float()], dim=1)
            if self.gather:
                pair = gather_with_grad(pair)
            text, music = pair.split(dim, dim=1)
            if self.normalized:
                text, music = F.normalize(text, dim=-1), F.normalize(music, dim=-1)
                scale = self.scale()
            else:
                scale = self.fixed_logit_scale
            logits = scale * text @ music.T
            not_negative = self._false_negatives(text_keys, music_keys, logits.device)
            if not_negative is not None:
                logits = logits.masked_fill(not_negative, float("-inf"))
            labels = torch.arange(logits.shape[0], device=logits.device)
            return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2

    def _false_negatives(self, text_keys: torch.Tensor | None, music_keys: torch.Tensor | None,
                         device: torch.device) -> torch.Tensor | None:
        """``[N, N]`` True where an off-diagonal pair shares a key (a symmetric relation, so the
        same mask serves both directions)."""
        mask = None
        for keys in (text_keys, music_keys):
            if keys is None:
                continue
            keys = keys.reshape(-1).to(device=device, dtype=torch.long)
            if self.gather:
                keys = all_gather_tensor(keys)
            same = keys[:, None] == keys[None, :]
            mask = same if mask is None else mask | same
        if mask is None:
            return None
        return mask & ~torch.eye(mask.shape[0], dtype=torch.bool, device=device)


def batch_size(batch: Batch) -> int:
    """The common first dimension of the batch's tensors and lists."""
    sizes = {len(value) for value in batch.values() if isinstance(value, torch.Tensor | list | tuple)}
    if len(sizes) != 1:
        raise ValueError(f"batch entries disagree on the batch size (or there are none): {sorted(sizes)}")
    return sizes.pop()


def split_batch(batch: Batch, micro_batch: int) -> list[dict[str, Any]]:
    """Consecutive micro-batches of at most ``micro_batch`` rows; tensors and lists are sliced
    along their first dimension, any other value is shared by every micro-batch."""
    if micro_batch < 1:
        raise ValueError(f"micro_batch must be positive, got {micro_batch}")
    total = batch_size(batch)
    chunks = []
    for start in range(0, total, micro_batch):
        rows = slice(start, start + micro_batch)
        chunks.append({key: value[rows] if isinstance(value, torch.Tensor | list | tuple) else value
                       for key, value in batch.items()})
    return chunks


@dataclass
class RandomState:
    """The torch RNG state (CPU, and the current CUDA device once CUDA is in use) at one moment,
    so a re-run draws the same dropout masks."""

    cpu: torch.Tensor
    cuda: torch.Tensor | None
    cuda_device: int | None

    @classmethod
    def capture(cls) -> RandomState:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            device = torch.cuda.current_device()
            return cls(torch.get_rng_state(), torch.cuda.get_rng_state(device), device)
        return cls(torch.get_rng_state(), None, None)

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.cuda_device)


def backward_scaled(loss: torch.Tensor, scaler: torch.amp.GradScaler | None) -> None:
    (loss if scaler is None else scaler.scale(loss)).backward()


def contrastive_step(batch: Batch, encode_music: Encoder, text: Encoder | torch.Tensor,
                     loss_fn: Callable[..., torch.Tensor], micro_batch: int = 0,
                     text_keys: torch.Tensor | None = None, music_keys: torch.Tensor | None = None,
                     scaler: torch.amp.GradScaler | None = None) -> float:
    """Forward and backward of one local batch; returns the (global) loss.

    ``text`` is ``encode_text`` (the text side trains) or the batch's text features ``[B, D]``
    (kept fixed). ``micro_batch`` > 0 and below the batch size: gradient caching with micro-batches
    of that many rows, the same gradient as one pass over the batch. With an fp16 ``scaler`` the
    gradients are those of the scaled loss, for ``scaler.unscale_``/``scaler.step``."""
    size = batch_size(batch)
    if isinstance(text, torch.Tensor) and text.shape[0] != size:
        raise ValueError(f"text features have {text.shape[0]} rows for a batch of {size}")
    if 0 < micro_batch < size:
        return grad_cache_step(batch, encode_music, text, loss_fn, micro_batch, text_keys, music_keys, scaler)
    music = encode_music(batch)
    text_features = text.detach() if isinstance(text, torch.Tensor) else text(batch)
    loss = loss_fn(text_features, music, text_keys=text_keys, music_keys=music_keys)
    backward_scaled(loss, scaler)
    return float(loss.detach())


def encode_first_pass(encode: Encoder, chunks: Sequence[Batch], keep_last: bool, side: str,
                       ) -> tuple[torch.Tensor, list[RandomState], torch.Tensor | None]:
    """Every micro-batch's features without gradient and the RNG state before each; with
    ``keep_last`` the last micro-batch is encoded with gradient instead and its output (graph
    attached) returned too, so that it need not be encoded a second time."""
    states, outputs = [], []
    kept = None
    for index, chunk in enumerate(chunks):
        states.append(RandomState.capture())
        if keep_last and index == len(chunks) - 1:
            kept = _with_grad(encode, chunk, side)
            outputs.append(kept.detach())
        else:
            with torch.no_grad():
                outputs.append(encode(chunk))
    return torch.cat(outputs), states, kept


def _with_grad(encode: Encoder, chunk: Batch, side: str) -> torch.Tensor:
    output = encode(chunk)
    if not output.requires_grad:
        raise ValueError(f"encode_{side} returned features without gradient; pass fixed {side} "
                         "features as a tensor instead")
    return output


def backward_through(encode: Encoder, chunks: Sequence[Batch], states: Sequence[RandomState],
                      cached_grad: torch.Tensor, side: str, kept: torch.Tensor | None = None) -> None:
    """Backpropagate each micro-batch's rows of ``cached_grad``: through ``kept``, the last
    micro-batch's output still attached to its graph, if given, and through a re-run of every
    other micro-batch from its remembered RNG state."""
    if kept is not None:
        kept.backward(gradient=cached_grad[cached_grad.shape[0] - kept.shape[0]:].to(kept.dtype))
        chunks, states = chunks[:-1], states[:-1]
    start = 0
    for chunk, state in zip(chunks, states, strict=True):
        state.restore()
        output = _with_grad(encode, chunk, side)
        rows = cached_grad[start: start + output.shape[0]]
        output.backward(gradient=rows.to(output.dtype))
        start += output.shape[0]


def grad_cache_step(batch: Batch, encode_music: Encoder, text: Encoder | torch.Tensor,
                    loss_fn: Callable[..., torch.Tensor], micro_batch: int,
                    text_keys: torch.Tensor | None = None, music_keys: torch.Tensor | None = None,
                    scaler: torch.amp.GradScaler | None = None) -> float:
    """``contrastive_step`` with gradient caching; returns the (global) loss.

    1. Encode every micro-batch without gradient (music first, then text when it trains),
       remembering the RNG state before each. The very last micro-batch encoded (text's when the
       text trains, else music's) is encoded with gradient and its graph kept: it is the one
       graph alive at once, as in step 3, and saves that micro-batch's second forward.
    2. Compute the loss on the concatenated features as leaf tensors and backpropagate to them
       (parameters of ``loss_fn`` get their gradient here).
    3. Backpropagate the kept micro-batch's rows of the cached feature gradient through its graph;
       re-encode each other micro-batch with gradient from its remembered RNG state (the same
       dropout masks) and backpropagate its rows.
    Afterwards the RNG is where step 1 left it, as if each micro-batch had run once."""
    chunks = split_batch(batch, micro_batch)
    text_trains = not isinstance(text, torch.Tensor)
    music_cache, music_states, music_kept = encode_first_pass(encode_music, chunks, not text_trains, "music")
    if text_trains:
        text_cache, text_states, text_kept = encode_first_pass(text, chunks, True, "text")
    else:
        text_cache, text_states, text_kept = text.detach(), [], None
    after_first_pass = RandomState.capture()

    music_leaf = music_cache.detach().requires_grad_(True)
    text_leaf = text_cache.detach().requires_grad_(text_trains)
    loss = loss_fn(text_leaf, music_leaf, text_keys=text_keys, music_keys=music_keys)
    backward_scaled(loss, scaler)

    if text_trains:  # the kept graph first, so it is freed before any re-run
        backward_through(text, chunks, text_states, text_leaf.grad, "text", text_kept)
    backward_through(encode_music, chunks, music_states, music_leaf.grad, "music", music_kept)
    after_first_pass.restore()
    return float(loss.detach())
