"""The joint objective and its step: text <-> sheet + text <-> MIDI + ``ALIGN_WEIGHT`` x sheet <-> MIDI
over one global batch of pieces (``training.pairs``), with optional gradient caching.

Each format's text and music features are gathered from every rank with their gradient (one
collective per format, as ``loss.ContrastiveLoss`` gathers), so every rank computes the same global
loss; with parameter gradients averaged over ranks afterwards this is the gradient one process gets
on the global batch (``distributed._GatherWithGrad``). The three terms are CLaMP 3's symmetric
contrastive loss (``loss.ContrastiveLoss`` on the gathered rows, each term with its own temperature
under ``LOSS = "normalized"``). The sheet <-> MIDI term runs over the batch's pairs, rows
``0 .. pairs - 1`` of both formats; off-diagonal pairs whose sheet music or MIDI shares a music key
(the same piece twice) are not negatives, as equal texts or music are not in the text terms.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from formats import FORMATS
from torch import nn

from training.distributed import all_gather_tensor, gather_with_grad
from training.loss import (
    Batch,
    ContrastiveLoss,
    Encoder,
    RandomState,
    backward_scaled,
    backward_through,
    encode_first_pass,
    split_batch,
)

TERMS = ("text_abc", "text_mtf", "abc_mtf")  # the loss terms, and the validation MRRs ALIGN_SELECT_BY names


class JointLoss(nn.Module):
    """``text_abc + text_mtf + align_weight * abc_mtf`` over the global batch; a term without rows
    in the batch (no record of a format, no pair) is left out of the sum."""

    def __init__(self, variant: str, logit_scale: float, align_weight: float):
        super().__init__()
        self.align_weight = float(align_weight)
        self.terms = nn.ModuleDict({term: ContrastiveLoss(variant, logit_scale=logit_scale, gather=False)
                                    for term in TERMS})

    @property
    def learnable(self) -> bool:
        return self.terms["text_abc"].learnable

    def forward(self, texts: Mapping[str, torch.Tensor], music: Mapping[str, torch.Tensor], pairs: int,
                keys: Mapping[str, Mapping[str, torch.Tensor]] | None = None
                ) -> tuple[torch.Tensor, dict[str, float]]:
        """(loss, each term's value) from this rank's rows of each format (``texts[fmt]``,
        ``music[fmt]``: ``[b_fmt, D]``; ``keys[fmt]``: its ``text_keys`` and ``music_keys``, or None
        for no masking). Every rank calls it with its rows of the same global batch."""
        gathered: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        gathered_keys: dict[str, dict[str, torch.Tensor]] = {}
        for fmt in FORMATS:
            text, features = texts[fmt], music[fmt]
            if text.shape[0] != features.shape[0] or text.dim() != 2:
                raise ValueError(f"{fmt}: text and music features must be [B, D] alike, got {tuple(text.shape)} "
                                 f"and {tuple(features.shape)}")
            with torch.autocast(device_type=features.device.type, enabled=False):
                both = gather_with_grad(torch.cat([text.float(), features.float()], dim=1))
            gathered[fmt] = both.split(text.shape[1], dim=1)
            if keys is not None:
                gathered_keys[fmt] = {name: all_gather_tensor(value.reshape(-1).to(both.device, torch.long))
                                      for name, value in keys[fmt].items()}
        values: dict[str, torch.Tensor] = {}
        for fmt in FORMATS:
            text, features = gathered[fmt]
            if features.shape[0]:
                masks = gathered_keys.get(fmt, {})
                values[f"text_{fmt}"] = self.terms[f"text_{fmt}"](
                    text, features, text_keys=masks.get("text_keys"), music_keys=masks.get("music_keys"))
        if pairs > 0 and self.align_weight > 0:
            sheet, midi = gathered["abc"][1][:pairs], gathered["mtf"][1][:pairs]
            masks = ({"text_keys": gathered_keys["abc"]["music_keys"][:pairs],
                      "music_keys": gathered_keys["mtf"]["music_keys"][:pairs]} if keys is not None else {})
            values["abc_mtf"] = self.terms["abc_mtf"](sheet, midi, **masks)
        if not values:
            raise ValueError("a joint batch without any row")
        total = sum(self.align_weight * value if term == "abc_mtf" else value for term, value in values.items())
        return total, {term: float(value.detach()) for term, value in values.items()}


def _no_rows(dim: int, device: torch.device) -> torch.Tensor:
    """Features of a rank without rows of a format: still attached to the graph, so every rank
    runs the gather's backward (a collective) in the same order."""
    return torch.zeros(0, dim, device=device, requires_grad=True)


def joint_step(batches: Mapping[str, Batch], encoders: Mapping[str, Encoder], texts: Mapping[str, torch.Tensor],
               loss_fn: JointLoss, pairs: int, dim: int, keys: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
               micro_batch: int = 0, scaler: torch.amp.GradScaler | None = None) -> tuple[float, dict[str, float]]:
    """Forward and backward of this rank's rows of one global batch of pieces; returns the global
    loss and its terms. ``batches[fmt]``, ``encoders[fmt]`` (music features with gradient) and
    ``texts[fmt]`` (fixed text features ``[b_fmt, D]``) per format. ``micro_batch`` > 0 and below a
    format's rows: gradient caching over micro-batches of that many rows (as ``loss.grad_cache_step``:
    ABC then MTF encoded without gradient, the RNG state remembered before each micro-batch, the
    last one kept with its graph; the loss backpropagated to the cached features; every other
    micro-batch re-encoded from its RNG state), the same gradient as one pass."""
    rows = {fmt: int(batches[fmt]["patches"].shape[0]) for fmt in FORMATS}
    device = next(iter(texts.values())).device
    fixed = {fmt: texts[fmt].detach() for fmt in FORMATS}
    if not (0 < micro_batch < max(rows.values())):
        music = {fmt: encoders[fmt](batches[fmt]) if rows[fmt] else _no_rows(dim, device) for fmt in FORMATS}
        loss, terms = loss_fn(fixed, music, pairs, keys)
        backward_scaled(loss, scaler)
        return float(loss.detach()), terms

    chunks = {fmt: split_batch(batches[fmt], micro_batch) if rows[fmt] else [] for fmt in FORMATS}
    last = [fmt for fmt in FORMATS if chunks[fmt]][-1]
    first_pass: dict[str, tuple[torch.Tensor, list[Any], torch.Tensor | None]] = {}
    for fmt in FORMATS:
        if chunks[fmt]:
            first_pass[fmt] = encode_first_pass(encoders[fmt], chunks[fmt], fmt == last, fmt)
    after_first_pass = RandomState.capture()
    leaves = {fmt: first_pass[fmt][0].detach().requires_grad_(True) if fmt in first_pass else _no_rows(dim, device)
              for fmt in FORMATS}
    loss, terms = loss_fn(fixed, leaves, pairs, keys)
    backward_scaled(loss, scaler)
    for fmt in reversed(FORMATS):  # the kept graph (the last format's) first, so it is freed before any re-run
        if fmt in first_pass and leaves[fmt].grad is not None:
            _, states, kept = first_pass[fmt]
            backward_through(encoders[fmt], chunks[fmt], states, leaves[fmt].grad, fmt, kept)
    after_first_pass.restore()
    return float(loss.detach()), terms
