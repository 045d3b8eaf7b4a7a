"""The trainer's numeric precision, resolved once at set-up: which autocast dtype, and whether a
gradient scaler runs.

``TRAIN_PRECISION`` asks for ``auto``, ``bf16``, ``fp16`` or ``fp32``; ``resolve_precision`` turns
that and the device into the one effective value every part of the run uses (the music encoder's
kernel choice, autocast, the scaler, the text cache's fingerprint) and the run records:

- ``auto`` (the default): bf16 on a GPU that computes it natively (Ampere and newer), fp16 with a
  gradient scaler on older GPUs (V100, T4), fp32 on CPU;
- ``bf16`` on a GPU without native bf16: fp16 with the scaler instead, said in the run's log
  (``torch.cuda.is_bf16_supported()`` counts emulation, which runs every bf16 product through
  float32 at a fraction of the speed);
- ``bf16``/``fp16`` asked for on CPU: CPU autocast (and for fp16 the scaler), so those branches run
  and are tested without a GPU; slower than fp32 there, never the default.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class PrecisionError(ValueError):
    """A ``TRAIN_PRECISION`` that is not one of ``PRECISIONS``."""


@dataclass(frozen=True)
class Precision:
    """What the run computes in: ``name`` (``bf16``/``fp16``/``fp32``) on ``device``, and why when
    it is not what was asked for (``note``)."""

    name: str
    device_type: str
    requested: str
    note: str = ""

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return AUTOCAST_DTYPES.get(self.name)

    @property
    def uses_scaler(self) -> bool:
        """fp16 gradients underflow without loss scaling; bf16 has float32's range."""
        return self.name == "fp16"

    def autocast(self) -> contextlib.AbstractContextManager:
        """Autocast to the run's dtype on its device; nothing in fp32."""
        dtype = self.autocast_dtype
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=dtype)

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        return torch.amp.GradScaler(self.device_type) if self.uses_scaler else None


def native_cuda_bf16() -> bool:
    """Whether the current GPU computes bf16 natively (emulation does not count)."""
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)


def check_precision(requested: str) -> str:
    """``requested`` if it is a known precision; else a ``PrecisionError`` naming the choices."""
    if requested not in PRECISIONS:
        raise PrecisionError(f"TRAIN_PRECISION must be one of {', '.join(PRECISIONS)}, not {requested!r}")
    return requested


def resolve_precision(requested: str, device: torch.device,
                      bf16_native: Callable[[], bool] = native_cuda_bf16) -> Precision:
    """The effective precision of a run on ``device`` (see the module's docstring).
    ``bf16_native`` tells whether the GPU has native bf16 (a parameter so the rule is testable
    without one)."""
    check_precision(requested)
    device_type = torch.device(device).type
    if device_type != "cuda":
        name = "fp32" if requested == "auto" else requested
        return Precision(name, device_type, requested)
    if requested in ("auto", "bf16") and not bf16_native():
        return Precision("fp16", device_type, requested,
                         note="this GPU has no native bf16 (it would be emulated, at a fraction of the speed): "
                              "fp16 autocast with a gradient scaler instead")
    return Precision("bf16" if requested == "auto" else requested, device_type, requested)


def device_description(device: torch.device) -> str:
    """The device's name as a person reads it (the GPU model on CUDA)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type
