"""The optimiser and learning-rate schedule of a training run (AdamW with weight decay on matrices
only, linear warmup then cosine decay), and one optimiser step."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from training import distributed


def parameter_groups(model: nn.Module, loss_fn: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only; biases, LayerNorm weights and the temperature undecayed."""
    decay, no_decay = [], []
    for _, parameter in model.named_parameters():
        if parameter.requires_grad:
            (decay if parameter.ndim >= 2 else no_decay).append(parameter)
    no_decay += [p for p in loss_fn.parameters() if p.requires_grad]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, loss_fn: nn.Module, cfg: dict[str, Any],
                    device: torch.device) -> torch.optim.AdamW:
    """AdamW over the trainable parameters (``parameter_groups``), from ``LORA_LEARNING_RATE`` and
    ``LORA_WEIGHT_DECAY``; PyTorch's fused kernel where it runs (CPU and CUDA, floating
    parameters): one kernel for every tensor instead of several ops per tensor (a LoRA step has
    dozens of small ones; bench/README.md)."""
    groups = parameter_groups(model, loss_fn, float(cfg["LORA_WEIGHT_DECAY"]))
    fused = device.type in ("cpu", "cuda") and all(
        p.is_floating_point() and p.device.type == device.type for group in groups for p in group["params"])
    return torch.optim.AdamW(groups, lr=float(cfg["LORA_LEARNING_RATE"]), fused=fused)


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup over ``warmup`` steps, then cosine decay to ``min_ratio`` at ``total``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: dict[str, Any],
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """``lr_factor`` from ``LORA_WARMUP_STEPS`` and ``LORA_MIN_LR_RATIO`` over ``total_steps``."""
    warmup, min_ratio = int(cfg["LORA_WARMUP_STEPS"]), float(cfg["LORA_MIN_LR_RATIO"])
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, warmup, total_steps, min_ratio))


def optimizer_step(parameters: list[nn.Parameter], optimizer: torch.optim.Optimizer,
                   scheduler: torch.optim.lr_scheduler.LRScheduler, scaler: torch.amp.GradScaler | None,
                   max_grad_norm: float, clipped: list[nn.Parameter]) -> float:
    """Average the gradients of ``parameters`` over ranks, clip those of ``clipped`` to
    ``max_grad_norm`` (0: no clipping), step the optimiser (through the fp16 ``scaler``) and the
    schedule, clear the gradients; returns the learning rate the step used."""
    distributed.all_reduce_gradients(parameters)
    if scaler is not None:
        scaler.unscale_(optimizer)
    if max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(clipped, max_grad_norm)
    lr = scheduler.get_last_lr()[0]
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return lr
