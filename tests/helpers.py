"""What several test modules share that is not a fixture: where things are, loading a script as a
module, and launching ``torchrun`` jobs. Fixtures live in ``conftest.py``."""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import ModuleType

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DIR = Path(os.environ.get("CLAMP3_SHARED_DIR", REPO_ROOT.parent / "shared")).resolve()
OFFICIAL = SHARED_DIR / "fixtures" / "official"
TINY_WEIGHTS = OFFICIAL / "model" / "tiny_clamp3.pth"
TINY_MODEL_CONFIG = OFFICIAL / "model" / "tiny_model_config.json"


def load_script(path: str | os.PathLike, name: str | None = None) -> ModuleType:
    """A script (which is not importable by name: ``clamp3_eval.py`` exists twice) as a module.

    ``path`` is relative to the repository root unless absolute; ``name`` defaults to the path's
    folder and stem, so the two ``clamp3_eval.py`` never share a module name."""
    path = Path(path)
    path = path if path.is_absolute() else REPO_ROOT / path
    if name is None:
        relative = path.resolve().relative_to(REPO_ROOT) if path.resolve().is_relative_to(REPO_ROOT) else path
        name = "script_" + "_".join(relative.with_suffix("").parts)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(script: str | os.PathLike, nproc: int, args: list[str], timeout: float = 240,
             launcher: str = "torch.distributed.run", env: dict[str, str] | None = None,
             ) -> subprocess.CompletedProcess:
    """``torchrun`` (or the seed README's ``python -m torch.distributed.launch --use_env``) with
    ``nproc`` CPU processes, from this interpreter (no path to a ``torchrun`` binary assumed)."""
    extra = ["--use_env"] if launcher == "torch.distributed.launch" else []
    command = [sys.executable, "-m", launcher, f"--nproc_per_node={nproc}", *extra, "--master_addr=127.0.0.1",
               f"--master_port={free_port()}", str(script), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, check=False)
