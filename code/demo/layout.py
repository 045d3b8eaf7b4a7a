"""Where the embedded default (``python -m demo``) keeps what it builds: the one description of a
demo's folder, for the demo itself and for the raw-file tools that fall back to its models.

A demo lives in one root folder: ``data/demo/``, ``data/demo-quick/`` with ``--quick``, with
``-seed<N>`` appended for a seed other than 42. The committed stage configs (``configs/demo_*.py``)
name their paths under ``data/demo/``; the demo points every stage at its own root with
``path_overrides``, and ``model_settings`` moves the evaluation config's paths the same way for the
raw-file tools. Light on purpose: the embedder imports it, so it imports none of the demo's
stages (corpus, text tower).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import runconfig
from fileio import REPO_ROOT
from formats import FORMATS

CONFIGS = REPO_ROOT / "configs"
EVAL_CONFIG = CONFIGS / "demo_eval.py"
COMMITTED_ROOT = "data/demo/"  # the root the committed configs name
DEFAULT_SEED = 42
BASE_WEIGHTS = "base_abc.pth"  # the trained base: a root that holds it has models to use

# Every path setting the stages share, relative to a demo's root. The trainer's own paths that
# differ per stage (its starting weights, log folder and base-training corpus) are the stages'.
PATH_SETTINGS = {
    "MODEL_CONFIG": "model_config.json", "TEXT_MODEL_NAME": "text_tower", "FULL_WEIGHTS_PATH": "base_{format}.pth",
    "TEXT_CACHE_DIR": "cache/text_features/", "LORA_ABC_ADAPTER_DIR": "adapters/lora_abc_adapter/",
    "LORA_MTF_ADAPTER_DIR": "adapters/lora_mtf_adapter/", "TEST_DATA_DIR": "test/", "RESULTS_DIR": "results/",
    **{f"LORA_{fmt.upper()}_{split.upper()}_JSONL": f"corpus/adapt_{split}_{fmt}.jsonl"
       for fmt in FORMATS for split in ("train", "valid")},
}

# With --joint: the adapters of the joint run (ALIGN_WEIGHT, issue 20), its run folder, and the
# evaluation's name for them (``evaluate_lora.py --name``); the separately trained ones stay where they are.
JOINT_ADAPTER_DIRS = {fmt: f"adapters/joint_{fmt}_adapter/" for fmt in FORMATS}
JOINT_RUN_DIR = "runs/joint/"
JOINT_ALIGN_WEIGHT = 1.0


def joint_overrides(root: Path) -> list[str]:
    """``--KEY=path`` overrides that point the adapter settings at the joint run's adapters under ``root``."""
    relative = root.relative_to(REPO_ROOT).as_posix()
    return [f"--LORA_{fmt.upper()}_ADAPTER_DIR={relative}/{path}" for fmt, path in JOINT_ADAPTER_DIRS.items()]


def demo_root(quick: bool = False, seed: int = DEFAULT_SEED) -> Path:
    """The folder of one demo: another seed is another demo, so no stage of one seed is reused for another."""
    return REPO_ROOT / "data" / (("demo-quick" if quick else "demo") + ("" if seed == DEFAULT_SEED else f"-seed{seed}"))


# The demos the raw-file tools look for when no checkpoint is configured, the full demo's models first.
FALLBACK_ROOTS = (demo_root(), demo_root(quick=True))


def is_built(root: Path) -> bool:
    """Whether the demo in ``root`` has trained its base (adapters, if any, come with their own files)."""
    return (Path(root) / BASE_WEIGHTS).is_file()


def path_overrides(root: Path) -> list[str]:
    """``--KEY=path`` overrides that move every shared path of a committed stage config under ``root``."""
    relative = root.relative_to(REPO_ROOT).as_posix()
    return [f"--{key}={relative}/{path}" for key, path in PATH_SETTINGS.items()]


def relocated(value: Any, root: Path) -> Any:
    """A committed config's value with its ``data/demo/`` path moved under ``root`` (others as they are)."""
    if isinstance(value, str) and value.startswith(COMMITTED_ROOT):
        return str(root / value.removeprefix(COMMITTED_ROOT))
    return value


def joint_adapters_built(root: Path) -> bool:
    """Whether ``root`` holds both adapters of a joint run (``python -m demo --joint``)."""
    return all((Path(root) / path / "adapter_config.json").is_file() for path in JOINT_ADAPTER_DIRS.values())


def model_settings(cfg: dict[str, Any], root: Path) -> dict[str, Any]:
    """``cfg`` with the demo's model settings (``configs/demo_eval.py``, its paths under ``root``) for
    every key the user left at its default. Where the demo also trained the joint adapters (sheet
    music and MIDI aligned with each other, issue 20), those are the adapters, unless the user named
    adapter folders."""
    defaults = runconfig.default_config()
    result = dict(cfg)
    for key, value in runconfig.load_config_file(EVAL_CONFIG).items():
        if key in defaults and cfg.get(key) == defaults[key]:
            result[key] = relocated(value, root)
    keys = {fmt: f"LORA_{fmt.upper()}_ADAPTER_DIR" for fmt in FORMATS}
    if joint_adapters_built(root) and all(cfg.get(key) == defaults.get(key) for key in keys.values()):
        result.update({key: str(Path(root) / JOINT_ADAPTER_DIRS[fmt]) for fmt, key in keys.items()})
    return result
