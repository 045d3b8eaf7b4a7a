"""PEFT LoRA on the symbolic encoder: the one place that builds, loads, merges and exports adapters.

An adapter wraps the whole ``CLaMP3Model`` but targets only modules under ``symbolic_model`` (a
regex), so the text and audio towers are untouched and a saved adapter loads onto a plain
``CLaMP3Model`` with ``PeftModel.from_pretrained(model, folder)`` and no project code.
``merge_and_unload`` gives back the official key names; ``save_official_checkpoint`` writes them in
the official checkpoint format. Training, evaluation, search and the demo all go through here.
"""

from __future__ import annotations

import copy
import io
import os
import re
from pathlib import Path
from typing import Any

import torch
from fileio import atomic_write_bytes, repo_path
from formats import FORMATS
from modeling import CLaMP3Model
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

# PEFT initialisations that rewrite the base weights when the adapter is created: an adapter
# trained that way only works on the rewritten base, never on the stock C2 weights.
_BASE_REWRITING_INITS = ("pissa", "olora", "corda", "eva", "loftq")
# Where modules_to_save may live: the symbolic side only.
_SYMBOLIC_ROOTS = ("symbolic_model", "symbolic_proj")


class AdapterConfigError(ValueError):
    """A LoRA setting that cannot give an adapter for the stock base weights."""


def target_pattern(module_names: list[str]) -> str:
    """A PEFT ``target_modules`` regex matching the named linears inside ``symbolic_model`` only
    (``query`` alone would also hit the text and audio towers)."""
    if not module_names:
        raise AdapterConfigError("LORA_TARGET_MODULES is empty")
    names = "|".join(re.escape(name) for name in module_names)
    return rf"symbolic_model\.(.*\.)?({names})"


def modules_to_save(cfg: dict[str, Any], fmt: str) -> list[str]:
    return list(cfg[f"LORA_{fmt.upper()}_MODULES_TO_SAVE"])


def lora_config(cfg: dict[str, Any], fmt: str) -> LoraConfig:
    """The PEFT config of the ``fmt`` adapter from the LORA_* keys; base-rewriting inits refused."""
    if fmt not in FORMATS:
        raise AdapterConfigError(f"unknown format {fmt!r}; expected one of {FORMATS}")
    init = str(cfg["LORA_INIT_WEIGHTS"]).strip().lower()
    if init.startswith(_BASE_REWRITING_INITS):
        raise AdapterConfigError(
            f"LORA_INIT_WEIGHTS={cfg['LORA_INIT_WEIGHTS']!r} rewrites the base weights when the adapter is "
            "created, so the adapter would not load onto the stock CLaMP 3 weights; use 'default' or 'gaussian'")
    if init not in ("default", "true", "gaussian"):
        raise AdapterConfigError(f"LORA_INIT_WEIGHTS must be 'default' or 'gaussian', not {init!r}")
    return LoraConfig(
        r=int(cfg["LORA_R"]), lora_alpha=int(cfg["LORA_ALPHA"]), lora_dropout=float(cfg["LORA_DROPOUT"]),
        target_modules=target_pattern(list(cfg["LORA_TARGET_MODULES"])),
        modules_to_save=modules_to_save(cfg, fmt) or None,
        use_rslora=bool(cfg["LORA_USE_RSLORA"]), use_dora=bool(cfg["LORA_USE_DORA"]),
        init_lora_weights=True if init in ("default", "true") else "gaussian",
        bias="none",
    )


def _check_modules_to_save(model: nn.Module, names: list[str]) -> None:
    module_names = [name for name, _ in model.named_modules()]
    for name in names:
        hits = [m for m in module_names if m == name or m.endswith("." + name)]
        if not hits:
            raise AdapterConfigError(f"modules_to_save: no module named {name!r} in the model")
        outside = [m for m in hits if not m.startswith(_SYMBOLIC_ROOTS)]
        if outside:
            raise AdapterConfigError(
                f"modules_to_save: {name!r} matches {outside}, outside the symbolic encoder and projection")


def add_adapter(model: CLaMP3Model, cfg: dict[str, Any], fmt: str) -> PeftModel:
    """Freeze ``model`` and wrap it with a fresh ``fmt`` adapter (trainable: LoRA + modules_to_save)."""
    config = lora_config(cfg, fmt)
    _check_modules_to_save(model, modules_to_save(cfg, fmt))
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    peft_model = get_peft_model(model, config, adapter_name="default")
    check_symbolic_only(peft_model)
    return peft_model


def check_symbolic_only(peft_model: PeftModel) -> None:
    """Raise if any trainable parameter lies outside the symbolic encoder and its projection."""
    stray = [name for name, p in peft_model.named_parameters() if p.requires_grad
             and not name.removeprefix("base_model.model.").startswith(_SYMBOLIC_ROOTS)]
    if stray:
        raise AdapterConfigError(f"trainable parameters outside the symbolic side: {stray[:5]}")


def adapter_dir(cfg: dict[str, Any], fmt: str) -> Path:
    return repo_path(cfg[f"LORA_{fmt.upper()}_ADAPTER_DIR"])


def load_adapter(model: CLaMP3Model, folder: str | os.PathLike, is_trainable: bool = False) -> PeftModel:
    """A saved adapter (PEFT format) on ``model``; ``is_trainable`` to continue training it."""
    folder = Path(folder)
    if not (folder / "adapter_config.json").is_file():
        raise FileNotFoundError(f"no adapter in {folder} (expected adapter_config.json; train one with "
                                "code/train_clamp3_lora.py)")
    return PeftModel.from_pretrained(model, str(folder), is_trainable=is_trainable)


def with_adapter(base: CLaMP3Model, folder: str | os.PathLike) -> CLaMP3Model:
    """``base`` with the saved adapter in ``folder``, in eval mode, leaving ``base`` itself untouched.

    PEFT injects the adapter's layers into the model it is given, so the adapter goes onto a copy;
    the text and audio towers (never adapted) are shared with ``base`` rather than copied, so each
    further format costs the symbolic encoder's memory only.
    """
    frozen_towers = {id(module): module for module in
                     (base.text_model, base.text_proj, base.audio_model, base.audio_proj)}
    return load_adapter(copy.deepcopy(base, memo=frozen_towers), folder).get_base_model().eval()


def merged_state_dict(peft_model: PeftModel) -> dict[str, torch.Tensor]:
    """The official-key state dict of the base with the adapter merged in, leaving ``peft_model``
    usable (merge, read, unmerge) instead of unloading it."""
    peft_model.merge_adapter()
    try:
        base = peft_model.get_base_model()
        state = {}
        for key, value in base.state_dict().items():
            official = _official_key(key)
            if official is not None:
                state[official] = value.detach().clone()
    finally:
        peft_model.unmerge_adapter()
    return state


def _official_key(key: str) -> str | None:
    """PEFT's in-place names back to the official ones: ``x.base_layer.weight`` -> ``x.weight``,
    ``x.modules_to_save.default.weight`` -> ``x.weight``; adapter tensors and the untrained
    originals kept beside modules_to_save copies -> None."""
    if ".lora_" in key or "lora_magnitude_vector" in key or ".original_module." in key:
        return None
    key = key.replace(".base_layer.", ".")
    return re.sub(r"\.modules_to_save\.[^.]+\.", ".", key)


def save_official_checkpoint(state: dict[str, torch.Tensor], path: str | os.PathLike,
                             extra: dict[str, Any] | None = None) -> Path:
    """``{'model': state_dict, ...}`` as the official scripts save it, written atomically."""
    buffer = io.BytesIO()
    torch.save({"model": {k: v.detach().cpu() for k, v in state.items()}, **(extra or {})}, buffer)
    return atomic_write_bytes(path, buffer.getvalue())
