"""The MERT model: where its weights are (``MERT_MODEL_PATH``) and loading them strictly.

The official code loads MERT-v1-95M with its own ``MusicHubertModel.from_pretrained(folder)``, a
transformers model whose layers, with the CQT branch off, are HuBERT's: a seven-layer convolutional
front end (group norm in the first layer), a projection, a weight-normed positional convolution and
post-LayerNorm transformer layers. Here the folder's ``config.json`` becomes a transformers
``HubertConfig`` (unknown fields, such as ``model_type: mert_model``, are ignored; the MERT
options HuBERT lacks must be off) and its weights are loaded by name into ``HubertModel``: every
parameter must be in the file (a missing one would stay random), the weight-norm tensors under
either their current names or the older ``weight_g``/``weight_v``.

Where: a local folder (relative paths under the repository root), or a Hugging Face hub id found in
the local cache without the network; a download only when ``HF_HUB_OFFLINE=0`` is set explicitly.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from features import DOWNLOAD_OPT_IN, downloads_allowed
from fileio import repo_path

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# MERT options HuBERT does not have: each must have its "off" value for HubertModel to be the same model.
_MERT_ONLY_OFF = {"feature_extractor_cqt": False, "deepnorm": False}
_RENAMED = {"weight_g": "parametrizations.weight.original0", "weight_v": "parametrizations.weight.original1"}


class MertModelError(RuntimeError):
    """The MERT weights are missing or do not fit; the message is one line with the fix."""


def _fix(setting: str) -> str:
    return (f"Fix: --{setting}=DIR, a folder holding MERT-v1-95M's config.json and weights (e.g. the Hugging "
            "Face repository m-a-p/MERT-v1-95M downloaded on another machine), or set "
            f"{DOWNLOAD_OPT_IN} explicitly to fetch it into the Hugging Face cache once")


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return (len(parts) == 2 and all(parts) and not Path(name).is_absolute()
            and not name.startswith((".", "~")) and "\\" not in name)


def resolve_mert_folder(name_or_path: str, setting: str = "MERT_MODEL_PATH",
                        allow_download: bool | None = None) -> Path:
    """The folder holding the MERT model named by ``name_or_path``; ``MertModelError`` with the fix."""
    if not str(name_or_path).strip():
        raise MertModelError(f"no MERT model configured ({setting} is empty). {_fix(setting)}")
    local = repo_path(name_or_path)
    if local.is_dir():
        return local
    if not _looks_like_hub_id(str(name_or_path)):
        raise MertModelError(f"MERT model folder not found: {local} ({setting}={name_or_path!r}). {_fix(setting)}")
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(str(name_or_path), "config.json")
    if isinstance(found, str):
        return Path(found).parent
    download = downloads_allowed() if allow_download is None else allow_download
    if not download:
        from huggingface_hub import constants

        raise MertModelError(f"MERT model {name_or_path!r} ({setting}) is neither a folder ({local}) nor in the "
                             f"Hugging Face cache ({constants.HF_HUB_CACHE}); nothing is downloaded unless asked. "
                             f"{_fix(setting)}")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(name_or_path), allow_patterns=["*.json", *WEIGHT_FILES]))
    except Exception as exc:  # noqa: BLE001 - the hub raises many kinds; the advice is the same
        raise MertModelError(f"cannot download the MERT model {name_or_path!r}: {' '.join(str(exc).split())}. "
                             f"{_fix(setting)}") from exc


def mert_files(folder: Path) -> list[Path]:
    """The files that make the model: its config and its weights (what a fingerprint covers)."""
    weights = [folder / name for name in WEIGHT_FILES if (folder / name).is_file()]
    return [folder / "config.json", *weights[:1]]


def hubert_config(folder: Path) -> Any:
    from transformers import HubertConfig

    path = folder / "config.json"
    try:
        fields = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MertModelError(f"no config.json in the MERT model folder {folder}. {_fix('MERT_MODEL_PATH')}") from None
    except ValueError as exc:
        raise MertModelError(f"{path} is not valid JSON: {exc}") from exc
    for key, off in _MERT_ONLY_OFF.items():
        if fields.get(key, off) != off:
            raise MertModelError(f"{path}: {key}={fields[key]!r} is not supported (only MERT models with it off, "
                                 "as MERT-v1-95M, are)")
    if float(fields.get("attention_relax", -1.0)) > 0:
        raise MertModelError(f"{path}: attention_relax={fields['attention_relax']} is not supported")
    known = {k: v for k, v in fields.items() if k not in ("model_type", "architectures", "auto_map")}
    return HubertConfig(**known)


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    for name in WEIGHT_FILES:
        path = folder / name
        if not path.is_file():
            continue
        if name.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    raise MertModelError(f"no weights ({' or '.join(WEIGHT_FILES)}) in the MERT model folder {folder}. "
                         f"{_fix('MERT_MODEL_PATH')}")


def load_mert(folder: str | os.PathLike, device: str | torch.device = "cpu") -> torch.nn.Module:
    """transformers ``HubertModel`` with the folder's config and weights, every parameter loaded, in eval
    mode (no dropout, layer drop or time masking) on ``device``."""
    from transformers import HubertModel

    folder = Path(folder)
    config = hubert_config(folder)
    config._attn_implementation = "sdpa"
    model = HubertModel(config)
    state = {}
    for key, tensor in _read_weights(folder).items():
        head, _, last = key.rpartition(".")
        state[f"{head}.{_RENAMED[last]}" if last in _RENAMED else key] = tensor
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    misshaped = sorted(k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape))
    unexpected = sorted(k for k in set(state) - set(expected)
                        if k.startswith(("feature_extractor.", "feature_projection.", "encoder.")))
    if missing or misshaped or unexpected:
        parts = [f"{label} {keys[:5]}{' ...' if len(keys) > 5 else ''}" for label, keys in
                 (("missing", missing), ("misshaped", misshaped), ("unexpected", unexpected)) if keys]
        raise MertModelError(f"the weights in {folder} do not fit its config.json: " + "; ".join(parts))
    model.load_state_dict({k: state[k] for k in expected}, strict=True)
    return model.eval().to(device)
