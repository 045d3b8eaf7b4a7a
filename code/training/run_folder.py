"""The run folder (``LORA_LOG_DIR``): what a training run writes, and the console/log-file logger.

```
<run>/config.json            effective configuration, argv, commit, versions, base fingerprint
<run>/{ABC,MTF}_training.log what the console showed (rank 0), and a line every TRAIN_LOG_EVERY_STEPS steps
<run>/{ABC,MTF}_history.json one entry per epoch
<run>/{ABC,MTF}_drops.jsonl  records left out of the data, with reasons
<run>/checkpoints/           resumable checkpoints, the newest LORA_KEEP_CHECKPOINTS kept
```
A fresh run refuses a folder that holds a checkpoint unless ``--resume`` or ``--overwrite``; a folder
left by a start that wrote no checkpoint is reused.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from fileio import REPO_ROOT, atomic_write_text
from tqdm import tqdm

from training.checkpoint import CHECKPOINT_DIR


class RunFolderError(RuntimeError):
    """A run folder that would be overwritten by accident."""


def has_checkpoint(run_dir: Path) -> bool:
    folder = run_dir / CHECKPOINT_DIR
    return folder.is_dir() and any(name.endswith(".pt") for name in os.listdir(folder))


def prepare_run_folder(run_dir: Path, resume: bool, overwrite: bool) -> str:
    """Create ``run_dir``, or check that it may be used; returns a line saying how.

    A folder holding a checkpoint is a run that trained: a fresh start there needs ``--resume``
    (continue it) or ``--overwrite`` (delete it). A folder with a configuration but no checkpoint
    is a start that failed or stopped before its first checkpoint (a wrong path, a killed first
    epoch): nothing in it can be resumed, so a fresh start reuses it (its logs are appended to,
    everything else is written anew)."""
    trained = run_dir.is_dir() and has_checkpoint(run_dir)
    if trained and not (resume or overwrite):
        raise RunFolderError(
            f"{run_dir} already holds a training run; pass --resume latest to continue it, --overwrite to "
            "start again (its checkpoints and logs are deleted), or another --LORA_LOG_DIR")
    how = f"run folder: {run_dir}"
    if run_dir.is_dir() and overwrite and not resume:
        for name in os.listdir(run_dir):
            target = run_dir / name
            if target.is_dir():
                shutil.rmtree(target)
            else:
                target.unlink()
        how += " (--overwrite: its earlier contents deleted)"
    elif not trained and (run_dir / "config.json").is_file():
        how += " (reused: an earlier start there wrote no checkpoint)"
    run_dir.mkdir(parents=True, exist_ok=True)
    return how


RUN_FILE_SUFFIXES = {"training": ".log", "history": ".json", "drops": ".jsonl"}  # per format


def run_file(run_dir: Path, fmt: str, contents: str) -> Path:
    """``<run>/ABC_training.log``, ``ABC_history.json``, ``ABC_drops.jsonl`` ...: the format's file
    of ``contents`` (a key of ``RUN_FILE_SUFFIXES``)."""
    return run_dir / f"{fmt.upper()}_{contents}{RUN_FILE_SUFFIXES[contents]}"


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                             timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def environment() -> dict[str, Any]:
    import peft
    import torch
    import transformers

    return {"python": sys.version.split()[0], "platform": platform.platform(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__,
            "cuda": torch.version.cuda if torch.cuda.is_available() else None}


def write_json(path: Path, payload: Any) -> Path:
    return atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")


class RunLogger:
    """Lines to the console (through tqdm, so bars stay intact) and to the format's log file, on
    the main rank only; other ranks stay silent. ``console=False``: the log file only."""

    def __init__(self, path: Path | None, enabled: bool):
        self.enabled = enabled
        self.path = path
        if enabled and path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, message: str, console: bool = True) -> None:
        if not self.enabled:
            return
        if console:
            tqdm.write(message)
        if self.path is not None:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")


Item = TypeVar("Item")


class StepLog:
    """Every ``every`` optimizer steps (0: never) one line in the log file, as open_clip logs:
    ``[abc] epoch 1 step 50/1200: loss 2.1234, lr 1.0000e-04, 123.4 samples/s, data 0.012 s``;
    samples/s (every rank's samples) and the seconds spent waiting for the data loader are those
    since the previous line, or since the epoch's first batch was asked for. The progress bar
    and wandb show every step; this keeps the numbers with the run."""

    LINE = "[{fmt}] epoch {epoch} step {step}/{steps}: loss {loss:.4f}, lr {lr:.4e}, {rate:.1f} samples/s, data {data:.3f} s"

    def __init__(self, log: RunLogger, fmt: str, every: int, steps: int):
        self.log = log
        self.fmt = fmt
        self.every = every
        self.steps = steps
        self._since = time.perf_counter()
        self._samples = 0
        self._data_seconds = 0.0

    def timed(self, batches: Iterable[Item]) -> Iterator[Item]:
        """``batches``, counting the time each takes to arrive; a new epoch starts a new window
        (the validation between epochs is no step's time)."""
        self._since, self._samples, self._data_seconds = time.perf_counter(), 0, 0.0
        iterator = iter(batches)
        while True:
            asked = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                return
            self._data_seconds += time.perf_counter() - asked
            yield batch

    def step_done(self, epoch: int, step: int, loss: float, lr: float, samples: int) -> None:
        """After optimizer step ``step`` (1-based, of the run) of ``samples`` examples, which used
        learning rate ``lr``."""
        self._samples += samples
        if self.every <= 0 or step % self.every:
            return
        now = time.perf_counter()
        rate = self._samples / max(1e-9, now - self._since)
        self.log(self.LINE.format(fmt=self.fmt, epoch=epoch, step=step, steps=self.steps, loss=loss, lr=lr,
                                  rate=rate, data=self._data_seconds), console=False)
        self._since, self._samples, self._data_seconds = now, 0, 0.0
