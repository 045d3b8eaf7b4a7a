"""The windowed-sinc resampler the official code uses, written here.

Facts it follows (the fixture README, ``../shared/fixtures/official/mert``): the ratio is reduced to
``orig/new`` (44.1 kHz -> 24 kHz is 147 -> 80); the low-pass cut-off is ``min(orig, new) * 0.99``;
each of the ``new`` output phases has a kernel of ``2 * width + orig`` taps, ``width =
ceil(6 * orig / cut-off)``, a sinc tapered by a Hann window (``cos(pi t / 12)^2`` over six zero
crossings each side); the kernel is computed in float64 and cast to float32, and applied as a
strided float32 convolution of the signal padded with ``width`` zeros before and ``width + orig``
after; the output keeps ``ceil(n * new / orig)`` samples. A float32 kernel would move features by
up to 1.8e-5, which is why the float64 step matters.
"""

from __future__ import annotations

import math

import torch

ZERO_CROSSINGS = 6
ROLLOFF = 0.99


def reduced_ratio(orig_rate: int, new_rate: int) -> tuple[int, int]:
    divisor = math.gcd(int(orig_rate), int(new_rate))
    return int(orig_rate) // divisor, int(new_rate) // divisor


def sinc_kernel(orig_rate: int, new_rate: int, zero_crossings: int = ZERO_CROSSINGS,
                rolloff: float = ROLLOFF) -> tuple[torch.Tensor, int]:
    """(float32 kernels ``[new, 1, 2 * width + orig]`` for the reduced ratio, ``width``)."""
    orig, new = reduced_ratio(orig_rate, new_rate)
    cutoff = min(orig, new) * rolloff
    width = math.ceil(zero_crossings * orig / cutoff)
    taps = torch.arange(-width, width + orig, dtype=torch.float64) / orig  # input positions, in input periods
    phases = -torch.arange(new, dtype=torch.float64)[:, None] / new  # each output phase's offset
    t = ((phases + taps[None, :]) * cutoff).clamp(-zero_crossings, zero_crossings)
    window = torch.cos(t * math.pi / zero_crossings / 2) ** 2
    x = t * math.pi
    sinc = torch.where(x == 0, torch.ones_like(x), torch.sin(x) / torch.where(x == 0, torch.ones_like(x), x))
    kernels = sinc * (window * (cutoff / orig))
    return kernels.to(torch.float32)[:, None, :], width


def resample(waveform: torch.Tensor, orig_rate: int, new_rate: int) -> torch.Tensor:
    """``waveform`` ``(..., n)`` float32 at ``orig_rate`` -> ``(..., ceil(n * new / orig))`` at ``new_rate``
    (the same tensor when the rates are equal)."""
    if int(orig_rate) == int(new_rate):
        return waveform
    orig, new = reduced_ratio(orig_rate, new_rate)
    kernels, width = sinc_kernel(orig_rate, new_rate)
    shape = waveform.shape
    length = shape[-1]
    flat = waveform.reshape(-1, 1, length)
    padded = torch.nn.functional.pad(flat, (width, width + orig))
    phases = torch.nn.functional.conv1d(padded, kernels.to(waveform.device), stride=orig)  # [B, new, frames]
    interleaved = phases.transpose(1, 2).reshape(flat.shape[0], -1)
    target = math.ceil(new * length / orig)
    return interleaved[:, :target].reshape(*shape[:-1], target)
