"""Shared test fixtures: where the official reference fixtures live, and offline settings."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DIR = Path(os.environ.get("CLAMP3_SHARED_DIR", REPO_ROOT.parent / "shared")).resolve()
OFFICIAL = SHARED_DIR / "fixtures" / "official"

# Tests never touch the network, whatever the caller's environment says.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")


@pytest.fixture(scope="session")
def official_dir() -> Path:
    if not OFFICIAL.is_dir():
        pytest.fail(f"official fixtures not found at {OFFICIAL} (set CLAMP3_SHARED_DIR)")
    return OFFICIAL
