"""The model a format trains: the base wrapped in a LoRA adapter (or unfrozen for the full symbolic
stage), activation checkpointing, which towers are in training mode, and the music encoder the
loss steps call, with the kernels chosen for the run's effective precision
(``training.precision``)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lora
import torch
from fast_linears import onednn_linear_available, onednn_linears
from modeling import CLaMP3Model, ModelConfig, load_clamp3
from torch import nn

from training.frozen_ops import frozen_base_kernels, pre_activation_layers
from training.precision import Precision


def build_model(cfg: dict[str, Any], fmt: str, model_config: ModelConfig, weights: Path,
                device: torch.device) -> tuple[nn.Module, CLaMP3Model, bool]:
    """(the module whose parameters train, the CLaMP3Model that computes features, text frozen)."""
    base = load_clamp3(model_config, weights, device="cpu", attn_implementation=cfg["ATTN_IMPLEMENTATION"])
    if cfg["TRAIN_MODE"] == "lora":
        model: nn.Module = lora.add_adapter(base, cfg, fmt)
        core = model.get_base_model()
        text_frozen = True
    else:
        text_frozen = bool(cfg["FREEZE_TEXT"])
        trained = ("symbolic_model", "symbolic_proj") + (
            ("text_proj",) if cfg["TRAIN_TEXT_PROJ"] else () if text_frozen else ("text_model", "text_proj"))
        for name, parameter in base.named_parameters():
            # The poolers are unused by CLaMP 3 (masked mean instead): training them only decays them.
            parameter.requires_grad_(name.startswith(trained) and ".pooler." not in name)
        model = core = base
    core.to(device)
    if cfg["GRADIENT_CHECKPOINTING"]:
        enable_checkpointing(core.symbolic_model.base)
        if not text_frozen:
            enable_checkpointing(core.text_model)
    return model, core, text_frozen


def enable_checkpointing(model: nn.Module) -> None:
    """Activation (gradient) checkpointing of every layer of a transformers model, non-reentrant:
    ``activation_checkpointing_enable`` where transformers has it (``gradient_checkpointing_enable``
    is deprecated from 5.x and goes in v6), the older name before."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def set_train_mode(core: CLaMP3Model, text_frozen: bool, symbolic_dropout: bool) -> None:
    """Dropout on where parameters train; frozen towers in eval mode, as the official code does.
    Without ``symbolic_dropout`` the symbolic encoder's own dropout (hidden and attention) is off
    while LoRA's dropout stays on; attention then runs in the fused kernel on CPU too."""
    core.train()
    core.audio_model.eval()
    if text_frozen:
        core.text_model.eval()
    if not symbolic_dropout:
        core.symbolic_model.eval()
        for name, module in core.symbolic_model.named_modules():
            if "lora_dropout" in name.split("."):
                module.train()
            elif getattr(module, "gradient_checkpointing", False):
                # transformers checkpoints a layer only in training mode; the layer itself draws no
                # random numbers (its dropouts and attention, below it, stay in eval mode).
                module.training = True


def autocast_for(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Autocast for an effective precision (``precision.resolve_precision``), on CPU as on CUDA."""
    if precision not in ("bf16", "fp16", "fp32"):
        raise ValueError(f"not an effective precision: {precision!r} (expected bf16, fp16 or fp32)")
    return Precision(precision, device.type, precision).autocast()


def music_encoder(core: CLaMP3Model, device: torch.device, precision: str, frozen_feed_forward: bool = True,
                  patch_budget: int = 0) -> Callable[[dict[str, Any]], torch.Tensor]:
    """``(micro-)batch -> features`` with gradient, as the loss steps call it, in the effective
    ``precision``. A micro-batch of GradCache is cut to its own longest piece first: slices of a
    batch padded to the batch's longest would otherwise carry its padding (the features do not
    change). ``patch_budget``: the most patches (rows × length) one encoding with gradient can
    bring, the run's (micro-)batch × patch length; a shorter one keeps feed-forward
    pre-activations within that memory (``frozen_ops.pre_activation_layers``).
    ``frozen_feed_forward=False`` exists for the benchmark's naive row (``bench/bench_train.py``):
    plain autograd through the frozen base instead of ``training.frozen_ops``."""

    # The frozen-base kernels (training.frozen_ops) compute in float32 only: autocast would change
    # the dtypes. They draw no random numbers, so GradCache's first pass (no gradient) runs them too
    # and its dropout masks still match the re-run; there they beat extraction's oneDNN linears
    # (bench/README.md).
    frozen_path = frozen_feed_forward and precision == "fp32"
    fast_first_pass = device.type == "cpu" and precision == "fp32" and onednn_linear_available()
    # The frozen patch embedding's transposed table, kept from step to step (training.frozen_ops).
    embedding_cache: dict = {}

    def encode(batch: dict[str, Any]) -> torch.Tensor:
        patches, mask = batch["patches"], batch["patch_mask"]
        longest = int(mask.sum(dim=1).max()) if mask.numel() else 0
        if 0 < longest < mask.shape[1]:
            patches, mask = patches[:, :longest], mask[:, :longest]
        if frozen_path:
            keep = 0
            if patch_budget and torch.is_grad_enabled():
                keep = pre_activation_layers(core.symbolic_model, patches.shape[0] * patches.shape[1], patch_budget)
            kernels = frozen_base_kernels(core.symbolic_model, embedding_cache, keep_pre_activations=keep)
        elif fast_first_pass and not torch.is_grad_enabled():
            kernels = onednn_linears(core)
        else:
            kernels = contextlib.nullcontext()
        with autocast_for(device, precision), kernels:
            return core.features("symbolic", patches, mask)

    return encode
