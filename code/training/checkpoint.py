"""The run folder of a training run: resumable checkpoints (rotated), RNG states, fingerprints.

A checkpoint holds everything that decides what happens next (trainable parameters, optimizer,
scheduler, scaler, every RNG, epoch, step, position in the epoch's batch plan, history, best
score), so a run killed at any point and resumed from its last checkpoint ends bitwise equal to
one that was never interrupted (on CPU).
"""

from __future__ import annotations

import io
import os
import random
import re
from pathlib import Path
from typing import Any

import config
import numpy as np
import torch
from fileio import atomic_write_bytes
from formats import FORMATS
from torch import nn

CHECKPOINT_DIR = "checkpoints"
_CHECKPOINT_NAME = re.compile(r"^(?P<fmt>[a-z]+)_step(?P<step>\d{8})\.pt$")


class ResumeError(RuntimeError):
    """No checkpoint to resume from, or one that does not fit this run."""


def rng_state(device: torch.device | None = None) -> dict[str, Any]:
    """Every RNG this process draws from: Python's, numpy's, torch's CPU generator and, on a CUDA
    ``device``, that device's generator only. Each rank saves its own GPU's state, never every
    visible GPU's: a job resumed with another layout (1 x 8 as 2 x 4, one GPU visible per
    process under SLURM) sees other devices, and rank r's state must go to rank r's GPU."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if device is not None and torch.device(device).type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device | None = None) -> None:
    """Restore ``rng_state``'s result; its CUDA state goes to ``device`` (this rank's GPU)."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and device is not None and torch.device(device).type == "cuda":
        if isinstance(cuda, (list, tuple)):  # written before the per-rank rule: every visible GPU's
            index = torch.device(device).index or 0
            if index >= len(cuda):
                raise ResumeError(f"the checkpoint holds CUDA RNG states of {len(cuda)} GPUs, none for "
                                  f"cuda:{index}; resume on the same GPU layout")
            cuda = cuda[index]
        torch.cuda.set_rng_state(cuda, device)


def trainable_state(model: nn.Module, loss_fn: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the parameters that train (the model's, ``model.``; the loss's, ``loss.``)."""
    state = {f"model.{n}": p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}
    state.update({f"loss.{n}": p.detach().cpu().clone() for n, p in loss_fn.named_parameters()})
    return state


def restore_trainable_state(model: nn.Module, loss_fn: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy ``trainable_state``'s result back; a ``ResumeError`` when it names other parameters."""
    params = {f"model.{n}": p for n, p in model.named_parameters() if p.requires_grad}
    params.update({f"loss.{n}": p for n, p in loss_fn.named_parameters()})
    if set(params) != set(state):
        missing, extra = sorted(set(params) - set(state)), sorted(set(state) - set(params))
        raise ResumeError(f"checkpoint parameters do not fit this model (missing {missing[:3]}, "
                          f"unexpected {extra[:3]})")
    with torch.no_grad():
        for name, parameter in params.items():
            parameter.copy_(state[name])


def check_resumable(state: dict[str, Any], cfg: dict[str, Any], base_fingerprint: str | None, world_size: int,
                    formats: list[str]) -> None:
    """A ``ResumeError`` unless the checkpoint ``state`` continues this run: the same configuration
    (keys in ``config.run_control_keys`` may differ), base checkpoint and number of processes, and
    one of its ``formats``."""
    saved = state["config"]
    changed = sorted(k for k in set(saved) | set(cfg)
                     if k not in config.run_control_keys and saved.get(k) != cfg.get(k))
    if changed:
        detail = ", ".join(f"{k}: {saved.get(k)!r} -> {cfg.get(k)!r}" for k in changed[:8])
        raise ResumeError(f"the checkpoint was trained with another configuration ({detail}); resume "
                          "with the run's config.json, or start a new run")
    if state["base_fingerprint"] != base_fingerprint:
        raise ResumeError("the checkpoint was trained on another base checkpoint (fingerprint differs)")
    if state["world_size"] != world_size:
        raise ResumeError(f"the checkpoint was written by {state['world_size']} processes; resume with "
                          f"the same number (got {world_size}) so batches stay the same")
    if state["format"] not in formats:
        raise ResumeError(f"the checkpoint is for format {state['format']!r}, not in {formats}")


def checkpoint_name(fmt: str, step: int) -> str:
    return f"{fmt}_step{step:08d}.pt"


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """The run's checkpoints, oldest first: a run trains its formats in the order of ``FORMATS``
    (abc, then mtf), so (format, step) orders them as they were written."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    found = [(m, p) for p in folder.iterdir() if (m := _CHECKPOINT_NAME.match(p.name))]
    order = {fmt: i for i, fmt in enumerate(FORMATS)}
    return [p for m, p in sorted(found, key=lambda mp: (order.get(mp[0]["fmt"], len(order)),
                                                         int(mp[0]["step"])))]


def save_checkpoint(run_dir: str | os.PathLike, fmt: str, step: int, state: dict[str, Any],
                    keep: int = 3) -> Path:
    """Write ``state`` atomically as ``checkpoints/<fmt>_step<N>.pt``, then keep only the ``keep``
    newest checkpoints."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    path = atomic_write_bytes(Path(run_dir) / CHECKPOINT_DIR / checkpoint_name(fmt, step), buffer.getvalue())
    checkpoints = list_checkpoints(run_dir)
    for old in checkpoints[: max(0, len(checkpoints) - max(1, keep))]:
        old.unlink(missing_ok=True)
    return path


def resolve_resume(resume: str, run_dir: str | os.PathLike) -> Path:
    """``--resume latest`` (the newest checkpoint of the run folder) or a checkpoint path."""
    if resume == "latest":
        checkpoints = list_checkpoints(run_dir)
        if not checkpoints:
            raise ResumeError(f"--resume latest: no checkpoint in {Path(run_dir) / CHECKPOINT_DIR}: the run stopped "
                              "before its first one (an epoch's end, or LORA_CHECKPOINT_STEPS steps), so there is "
                              "nothing to continue. Start it again without --resume (the folder is reused), or "
                              "pass a checkpoint path")
        return checkpoints[-1]
    path = Path(resume)
    if not path.is_file():
        raise ResumeError(f"--resume {resume}: checkpoint not found")
    return path


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    # weights_only=False: the checkpoint holds RNG states and the optimizer's plain Python
    # objects; it is the run's own file, never a downloaded one.
    return torch.load(path, map_location="cpu", weights_only=False)
