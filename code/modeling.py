"""The CLaMP 3 model with the official attribute names, built from a model config, and strict
checkpoint loading. State-dict keys equal the official ones, so official weights load as they are.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig, BertModel, XLMRobertaConfig, XLMRobertaModel

# xlm-roberta-base's configuration, so the text tower can be built without a hub download
# (the CLaMP 3 checkpoint supplies its weights).
XLM_ROBERTA_BASE = {
    "vocab_size": 250002,
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1,
    "max_position_embeddings": 514,
    "type_vocab_size": 1,
    "initializer_range": 0.02,
    "layer_norm_eps": 1e-05,
    "pad_token_id": 1,
    "bos_token_id": 0,
    "eos_token_id": 2,
}

CHAR_VOCAB = 128  # patch characters are ASCII after unidecode
MODALITIES = ("symbolic", "text", "audio")


@dataclass
class ModelConfig:
    """Sizes of the three towers: keyword arguments of ``BertConfig`` (symbolic, audio) and
    ``XLMRobertaConfig`` (text), plus the shared projection size and the patch size."""

    symbolic: dict[str, Any]
    audio: dict[str, Any]
    text: dict[str, Any]
    projection_size: int
    patch_size: int = 64
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "model config") -> ModelConfig:
        missing = [k for k in ("symbolic", "audio", "text", "projection_size") if k not in data]
        if missing:
            raise ValueError(f"{source}: missing keys {missing} (expected symbolic, audio, text, projection_size)")
        for key in ("symbolic", "audio", "text"):
            if not isinstance(data[key], dict) or "hidden_size" not in data[key]:
                raise ValueError(f"{source}: '{key}' must be an object with at least hidden_size")
        extra = {k: v for k, v in data.items() if k.startswith("_")}
        return cls(
            symbolic=dict(data["symbolic"]), audio=dict(data["audio"]), text=dict(data["text"]),
            projection_size=int(data["projection_size"]), patch_size=int(data.get("patch_size", 64)),
            extra=extra,
        )

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> ModelConfig:
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(f"model config not found: {path}") from None
        except json.JSONDecodeError as exc:
            raise ValueError(f"model config {path} is not valid JSON: {exc}") from exc
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_constants(cls, cfg: dict[str, Any]) -> ModelConfig:
        """The official sizes, derived from config.py constants as the official scripts do."""
        def bert(hidden: int, layers: int, positions: int) -> dict[str, Any]:
            return {"vocab_size": 1, "hidden_size": hidden, "num_hidden_layers": layers,
                    "num_attention_heads": hidden // 64, "intermediate_size": hidden * 4,
                    "max_position_embeddings": positions}

        text_name = str(cfg["TEXT_MODEL_NAME"])
        local = Path(text_name) / "config.json"
        if local.is_file():
            keys = set(XLM_ROBERTA_BASE)
            text = {k: v for k, v in json.loads(local.read_text()).items() if k in keys}
        elif text_name.rstrip("/").endswith("xlm-roberta-base"):
            text = dict(XLM_ROBERTA_BASE)
        else:
            raise ValueError(f"TEXT_MODEL_NAME={text_name!r} is neither xlm-roberta-base nor a local folder "
                             "with config.json; pass --model_config FILE with a 'text' section")
        return cls(
            symbolic=bert(cfg["M3_HIDDEN_SIZE"], cfg["PATCH_NUM_LAYERS"], cfg["PATCH_LENGTH"]),
            audio=bert(cfg["AUDIO_HIDDEN_SIZE"], cfg["AUDIO_NUM_LAYERS"], cfg["MAX_AUDIO_LENGTH"]),
            text=text, projection_size=cfg["CLAMP3_HIDDEN_SIZE"], patch_size=cfg["PATCH_SIZE"],
        )

    @classmethod
    def resolve(cls, cfg: dict[str, Any], model_config_path: str | os.PathLike | None = None) -> ModelConfig:
        """The JSON model config at ``model_config_path`` if given, else the official sizes of ``cfg``.

        The path is used as it is: callers resolve it by the path rule of docs/ARCHITECTURE.md (a
        ``--model_config`` typed on the command line against the working directory, ``MODEL_CONFIG``
        of the configuration against the repository root), so the model core knows nothing of either.
        """
        if model_config_path:
            return cls.from_json(model_config_path)
        if cfg.get("MODEL_CONFIG"):
            raise ValueError(f"MODEL_CONFIG={cfg['MODEL_CONFIG']!r} is set but no model config path was "
                             "given: resolve it (fileio.repo_path) and pass it as model_config_path")
        return cls.from_constants(cfg)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("extra")
        return data


def _with_attention(config: BertConfig | XLMRobertaConfig, attn_implementation: str):
    config._attn_implementation = attn_implementation
    return config


class M3PatchEncoder(nn.Module):
    """The symbolic encoder: a linear patch embedding of one-hot characters, then BERT.

    The official code multiplies a ``[.., 64*128]`` one-hot matrix by the embedding weight; here the
    same sum is taken by gathering the 64 selected weight columns (``embedding_bag``), which is
    exact up to float summation order and avoids ~12 MFLOP of multiplications by zero per patch.
    """

    def __init__(self, config: BertConfig, patch_size: int = 64):
        super().__init__()
        self.patch_size = patch_size
        self.patch_embedding = nn.Linear(patch_size * CHAR_VOCAB, config.hidden_size)
        nn.init.normal_(self.patch_embedding.weight, std=0.02)
        self.base = BertModel(config)
        self.use_one_hot = False  # True reproduces the official arithmetic literally

    def embed_patches(self, patches: torch.Tensor) -> torch.Tensor:
        """``[B, L, patch_size]`` char ids -> ``[B, L, hidden]`` patch embeddings."""
        weight, bias = self.patch_embedding.weight, self.patch_embedding.bias
        # An adapter layer (PEFT LoRA/DoRA on the patch embedding, recognisable by its
        # ``base_layer``) adds to the product of ``weight``; reading ``weight`` would bypass it, so
        # it runs its own forward on the one-hot input. PEFT's modules_to_save wrapper needs no
        # such care: its ``weight`` is the active trained copy (tests/test_lora.py checks both).
        if self.use_one_hot or hasattr(self.patch_embedding, "base_layer"):
            one_hot = F.one_hot(patches, num_classes=CHAR_VOCAB).to(weight.dtype)
            return self.patch_embedding(one_hot.reshape(*patches.shape[:-1], -1))
        batch, length, slots = patches.shape
        offsets = torch.arange(slots, device=patches.device) * CHAR_VOCAB
        columns = (patches + offsets).reshape(batch * length, slots)
        # embedding_bag reads table rows; on the transposed (strided) weight it is ~50x slower
        # than copying the transpose once per forward.
        summed = F.embedding_bag(columns, weight.t().contiguous(), mode="sum")
        return (summed + bias).reshape(batch, length, -1)

    def forward(self, input_patches: torch.Tensor, input_masks: torch.Tensor):
        embeddings = self.embed_patches(input_patches)
        return self.base(inputs_embeds=embeddings,
                         attention_mask=key_padding_mask(input_masks, self.base.config, embeddings.dtype))


def key_padding_mask(mask: torch.Tensor, config: BertConfig | XLMRobertaConfig,
                     dtype: torch.dtype) -> torch.Tensor | None:
    """A ``[B, L]`` 1/0 padding mask as the attention of ``config`` takes it, broadcast over the
    queries (``[B, 1, 1, L]``: boolean for SDPA, additive with the dtype's minimum for eager, the
    values transformers uses), or None without padding. transformers would materialise it as
    ``[B, 1, L, L]``, which the fused CPU attention then reads for every head (measured: 9% of its
    forward and backward at 8 × 455 patches). Other attention implementations get the mask as it
    is, for transformers to prepare."""
    implementation = getattr(config, "_attn_implementation", None)
    if mask.dim() != 2 or implementation not in ("sdpa", "eager"):
        return mask
    keep = mask.bool()
    if bool(keep.all()):
        return None
    keep = keep[:, None, None, :]
    if implementation == "sdpa":
        return keep
    return torch.zeros(keep.shape, dtype=dtype, device=mask.device).masked_fill_(~keep, torch.finfo(dtype).min)


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the unmasked positions (special tokens and patches included, as officially)."""
    mask = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1)


class CLaMP3Model(nn.Module):
    """CLaMP 3 with the official attribute names (they are the state-dict prefixes)."""

    def __init__(self, model_config: ModelConfig, attn_implementation: str = "eager"):
        super().__init__()
        self.model_config = model_config
        text_cfg = _with_attention(XLMRobertaConfig(**model_config.text), attn_implementation)
        symbolic_cfg = _with_attention(BertConfig(**model_config.symbolic), attn_implementation)
        audio_cfg = _with_attention(BertConfig(**model_config.audio), attn_implementation)
        proj = model_config.projection_size
        self.text_model = XLMRobertaModel(text_cfg)
        self.text_proj = nn.Linear(text_cfg.hidden_size, proj)
        self.symbolic_model = M3PatchEncoder(symbolic_cfg, patch_size=model_config.patch_size)
        self.symbolic_proj = nn.Linear(symbolic_cfg.hidden_size, proj)
        self.audio_model = BertModel(audio_cfg)
        self.audio_proj = nn.Linear(audio_cfg.hidden_size, proj)
        for layer in (self.text_proj, self.symbolic_proj, self.audio_proj):
            nn.init.normal_(layer.weight, std=0.02)

    def hidden_states(self, modality: str, inputs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``last_hidden_state`` of one tower."""
        if modality == "symbolic":
            return self.symbolic_model(inputs, mask)["last_hidden_state"]
        if modality == "text":
            text_mask = key_padding_mask(mask, self.text_model.config, self.text_model.dtype)
            return self.text_model(input_ids=inputs, attention_mask=text_mask)["last_hidden_state"]
        if modality == "audio":
            audio_mask = key_padding_mask(mask, self.audio_model.config, inputs.dtype)
            return self.audio_model(inputs_embeds=inputs, attention_mask=audio_mask)["last_hidden_state"]
        raise ValueError(f"unknown modality {modality!r}; expected one of {MODALITIES}")

    def projection(self, modality: str) -> nn.Linear:
        return {"symbolic": self.symbolic_proj, "text": self.text_proj, "audio": self.audio_proj}[modality]

    def features(self, modality: str, inputs: torch.Tensor, mask: torch.Tensor, get_global: bool = True):
        """Official ``get_*_features``: projected masked mean, or the raw hidden states."""
        hidden = self.hidden_states(modality, inputs, mask)
        if not get_global:
            return hidden
        return self.projection(modality)(masked_mean(hidden.float(), mask))

    def get_symbolic_features(self, symbolic_inputs, symbolic_masks, get_global: bool = False):
        return self.features("symbolic", symbolic_inputs, symbolic_masks, get_global)

    def get_text_features(self, text_inputs, text_masks, get_global: bool = False):
        return self.features("text", text_inputs, text_masks, get_global)

    def get_audio_features(self, audio_inputs, audio_masks, get_global: bool = False):
        return self.features("audio", audio_inputs, audio_masks, get_global)


class CheckpointMismatchError(RuntimeError):
    """A checkpoint whose keys or shapes differ from the model's."""


def read_checkpoint_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict of an official-format checkpoint (``torch.save({'model': state_dict, ...})``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint not found: {path}. Download the official CLaMP 3 C2 weights (Hugging Face repo "
            "sander-wood/clamp3) to code/, or pass --weights PATH.")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means the same to the user
        raise CheckpointMismatchError(f"{path}: cannot be read as a torch checkpoint: {exc}") from exc
    if isinstance(checkpoint, dict) and "model" in checkpoint and isinstance(checkpoint["model"], dict):
        return checkpoint["model"]
    if isinstance(checkpoint, dict) and checkpoint and all(torch.is_tensor(v) for v in checkpoint.values()):
        return checkpoint  # a bare state dict
    raise CheckpointMismatchError(f"{path}: expected a dict with a 'model' state dict")


def check_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Raise CheckpointMismatchError naming every missing, unexpected and misshaped key."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    misshaped = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or misshaped:
        def listing(title: str, items: list[str]) -> str:
            shown = items[:20] + ([f"... and {len(items) - 20} more"] if len(items) > 20 else [])
            return f"\n  {title} ({len(items)}):\n    " + "\n    ".join(shown) if items else ""

        raise CheckpointMismatchError(
            f"{source} does not match the model (is --model_config right for these weights?)"
            + listing("missing keys", missing) + listing("unexpected keys", unexpected)
            + listing("misshaped keys", misshaped))


def load_clamp3(
    model_config: ModelConfig,
    weights: str | os.PathLike | None,
    device: str | torch.device = "cpu",
    attn_implementation: str = "eager",
) -> CLaMP3Model:
    """The one model loader: build from ``model_config``, load ``weights`` strictly, eval mode."""
    state = read_checkpoint_state(weights) if weights else None
    model = CLaMP3Model(model_config, attn_implementation=attn_implementation)
    if state is not None:
        check_state_dict(model, state, source=str(weights))
        model.load_state_dict(state, strict=True)
    return model.to(device).eval()


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but CUDA is not available")
    return device
