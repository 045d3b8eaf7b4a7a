"""What the training runs share (``training.loop``'s one adapter per format, ``training.joint``'s
two adapters in one run): the run's context and per-format state, the set-up error, a format's
records, batches on the device, the DataLoader, validation, saving the selected model, wandb."""

from __future__ import annotations

import argparse
import hashlib
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lora
import metrics
import torch
from fileio import DropLog, repo_path, swap_in_folder
from modeling import CLaMP3Model, ModelConfig, load_clamp3
from patchilizer import M3Patchilizer
from torch import nn
from tqdm import tqdm

from training import checkpoint as ckpt
from training import data, distributed
from training.loss import ContrastiveLoss
from training.precision import Precision
from training.run_folder import RunLogger, write_json
from training.text_side import TextSide


@dataclass
class RunContext:
    """What every format of the run shares."""

    cfg: dict[str, Any]
    args: argparse.Namespace
    dist: distributed.DistContext
    run_dir: Path
    model_config: ModelConfig
    weights: Path | None
    base_fingerprint: str | None
    tokenizer: Any
    progress: bool
    formats: list[str]
    precision: Precision
    notes: list[str] = field(default_factory=list)  # set-up lines every format's log starts with


@dataclass
class FormatState:
    """Everything a checkpoint restores besides tensors of modules."""

    epoch: int = 0
    position: int = 0  # batches of the current epoch already done
    step: int = 0
    best_mrr: float = -1.0
    best_epoch: int = -1
    bad_epochs: int = 0
    epoch_loss_sum: float = 0.0
    epoch_samples: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    done: bool = False
    term_sums: dict[str, list[float]] = field(default_factory=dict)  # joint run: loss term -> [sum, steps] this epoch


class TrainingSetupError(ValueError):
    """A run that cannot train as configured (settings, too few or too uniform records): the CLI
    prints it as one line, not a traceback."""


def load_format_data(ctx: RunContext, fmt: str, patchilizer: M3Patchilizer, drops: DropLog, log: RunLogger):
    """The training and validation records of ``fmt``, the same on every rank: every rank reads the
    JSONL and checks its share of the music files (``data.load_records``), the verdicts gathered;
    the verdicts are kept in ``<run>/file_checks.<fmt>.json`` (``data.FileCheckCache``), so a resume
    or a restart reads only new or changed files."""
    cfg, dist = ctx.cfg, ctx.dist
    train_path = repo_path(cfg[f"LORA_{fmt.upper()}_TRAIN_JSONL"])
    if not train_path.is_file():
        raise FileNotFoundError(f"training records not found: {train_path} (set LORA_{fmt.upper()}_TRAIN_JSONL; "
                                "see data/README.md)")
    started = time.perf_counter()
    cache = data.FileCheckCache(ctx.run_dir / f"file_checks.{fmt}.json", patchilizer)
    settings = dict(workers=max(1, int(cfg["NUM_WORKERS"])), progress=ctx.progress and dist.is_main, cache=cache,
                    rank=dist.rank, world_size=dist.world_size, gather=distributed.all_gather_object)

    def load(path: Path) -> list[data.TrainingRecord]:
        loaded = data.load_records(path, fmt, patchilizer, drops, **settings)
        if dist.is_main:
            cache.save()
        return loaded

    def no_usable_record(split: str, path: Path) -> TrainingSetupError:
        return TrainingSetupError(f"[{fmt}] no usable {split} record in {path}: {drops.summary_line()}"
                                  + (f" (details: {drops.path})" if drops.path else ""))

    records = load(train_path)
    if not records:
        raise no_usable_record("training", train_path)
    valid_name = cfg[f"LORA_{fmt.upper()}_VALID_JSONL"]
    valid_path = repo_path(valid_name) if valid_name else None
    if valid_path is not None and valid_path.is_file():
        valid = load(valid_path)
        log(f"[{fmt}] records: {len(records)} train ({train_path}), {len(valid)} validation ({valid_path})")
        if not valid:
            raise no_usable_record("validation", valid_path)
    else:
        records, valid = data.held_out_split(records, float(cfg["VALID_FRACTION"]), int(cfg["SEED"]))
        log(f"[{fmt}] records: {len(records)} train, {len(valid)} validation held out by piece hash "
            f"(VALID_FRACTION={cfg['VALID_FRACTION']}; no file at {valid_path})")
    log(f"[{fmt}] records loaded in {time.perf_counter() - started:.1f} s on {dist.world_size} process(es): "
        f"{cache.checked} music files checked, {cache.hits} unchanged ones taken from {cache.path.name}")
    if drops.rows:
        log(f"[{fmt}] {drops.summary_line()} (details: {drops.path})")
    # Every rank built its records itself: a node that sees other files would train on others.
    digest = hashlib.blake2b(repr([(r.index, r.id, r.music_keys, r.length, r.text_key)
                                   for r in (*records, *valid)]).encode(), digest_size=16).hexdigest()
    if len(set(distributed.all_gather_object(digest))) > 1:
        raise TrainingSetupError(f"[{fmt}] the ranks read different records: every node must see the same "
                                 f"JSONL ({train_path}) and music files")
    global_batch = int(cfg["LORA_BATCH_SIZE"]) * dist.world_size
    if len(records) < global_batch:
        raise TrainingSetupError(f"[{fmt}] {len(records)} training records are fewer than one global batch "
                                 f"({global_batch} = LORA_BATCH_SIZE x {dist.world_size} processes)")
    if not valid:
        raise TrainingSetupError(f"[{fmt}] no validation records (raise VALID_FRACTION or give a validation JSONL)")
    return records, valid


# ------------------------------------------------------------------------------------ pieces


def resume_training_state(module: nn.Module, loss_fn: ContrastiveLoss, optimizer: torch.optim.Optimizer,
                          scheduler: Any, scaler: Any, resume_state: dict[str, Any], dist: distributed.DistContext,
                          log: RunLogger, name: str) -> FormatState:
    """Everything a checkpoint holds put back (trainable tensors, optimizer, scheduler, scaler, this
    rank's random state); the run's position returned. One format's run and the joint run alike."""
    ckpt.restore_trainable_state(module, loss_fn, resume_state["trainable"])
    optimizer.load_state_dict(resume_state["optimizer"])
    scheduler.load_state_dict(resume_state["scheduler"])
    if scaler is not None and resume_state.get("scaler"):
        scaler.load_state_dict(resume_state["scaler"])
    state = FormatState(**resume_state["state"])
    ckpt.set_rng_state(resume_state["rng"][dist.rank], dist.device)
    log(f"[{name}] resumed at epoch {state.epoch + 1}, batch {state.position}, step {state.step}")
    return state


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def augmentation(cfg: dict[str, Any]) -> data.Augmentation:
    return data.Augmentation(random_file=bool(cfg["RANDOM_FILEPATH"]),
                             remove_instruments_p=float(cfg["REMOVE_INSTRUMENT_PROB"]),
                             random_truncation=bool(cfg["RANDOM_TRUNCATION"]),
                             text_dropout=bool(cfg["TEXT_DROPOUT"]))


def data_loader(ctx: RunContext, dataset: torch.utils.data.Dataset, epoch: int) -> torch.utils.data.DataLoader:
    # A generator of its own: the DataLoader must not draw its worker seeds from the global RNG,
    # which also drives dropout and is restored on resume.
    generator = torch.Generator().manual_seed(int(ctx.cfg["SEED"]) * 1000 + epoch)
    return torch.utils.data.DataLoader(dataset, batch_size=None, shuffle=False,
                                       num_workers=int(ctx.cfg["NUM_WORKERS"]), generator=generator,
                                       pin_memory=ctx.dist.device.type == "cuda")


@torch.no_grad()
def validation_features(ctx: RunContext, core: CLaMP3Model, loss_fn: ContrastiveLoss, valid, patchilizer: M3Patchilizer,
                        text_side: TextSide) -> tuple[float, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(validation loss, text features, music features, record indices), the features and indices
    of every validation record gathered from every rank, row-paired. Each rank embeds its rows
    of every batch; the features of all ranks are gathered, so no rank waits on another's work."""
    cfg, dist = ctx.cfg, ctx.dist
    core.eval()
    global_batch = int(cfg["LORA_BATCH_SIZE"]) * dist.world_size
    plan = data.plan_validation(valid, global_batch, int(cfg["SEED"]), bucketing=bool(cfg["LENGTH_BUCKETING"]))
    dataset = data.BatchDataset(valid, plan, patchilizer, text=text_side.for_dataset(False), seed=int(cfg["SEED"]),
                                epoch=0, train=False, rank=dist.rank, world_size=dist.world_size,
                                pad_to_longest=bool(cfg["LENGTH_BUCKETING"]))
    loss_sum, count = 0.0, 0
    text_parts, music_parts, index_parts = [], [], []
    batches = tqdm(data_loader(ctx, dataset, 0), total=len(dataset), desc="validation", unit="batch",
                   disable=not (ctx.progress and dist.is_main), dynamic_ncols=True, leave=False)
    dim = ctx.model_config.projection_size
    for position, batch in enumerate(batches):
        batch = to_device(batch, dist.device)
        if batch["patches"].shape[0] == 0:
            # A last batch with fewer rows than ranks leaves this rank none: it still joins the
            # loss's gathers (every rank must), with no rows of its own.
            music = text = torch.zeros(0, dim, device=dist.device)
        else:
            with ctx.precision.autocast():
                music = core.features("symbolic", batch["patches"], batch["patch_mask"]).float()
            text = text_side.batch_side(core, batch, train=False)
        # The loss gathers every rank's rows: the same global-batch loss on every rank.
        loss = loss_fn(text, music, text_keys=batch["text_keys"], music_keys=batch["music_keys"])
        rows = len(plan.batches[position])
        loss_sum += float(loss) * rows
        count += rows
        text_parts.append(text.float().cpu())
        music_parts.append(music.cpu())
        index_parts.append(batch["record_index"].cpu())
    text_all = distributed.all_gather_tensor(torch.cat(text_parts) if text_parts else torch.zeros(0, dim))
    music_all = distributed.all_gather_tensor(torch.cat(music_parts) if music_parts else torch.zeros(0, dim))
    index_all = distributed.all_gather_tensor(torch.cat(index_parts) if index_parts
                                              else torch.zeros(0, dtype=torch.long))
    return loss_sum / max(1, count), text_all, music_all, index_all


def validate(ctx: RunContext, core: CLaMP3Model, loss_fn: ContrastiveLoss, valid, patchilizer: M3Patchilizer,
             text_side: TextSide) -> tuple[float, float]:
    """(validation loss, text->music MRR) over every validation record (``validation_features``)."""
    loss, text_all, music_all, _ = validation_features(ctx, core, loss_fn, valid, patchilizer, text_side)
    return loss, metrics.mrr(text_all, music_all)


def best_location(ctx: RunContext, fmt: str) -> Path:
    if ctx.cfg["TRAIN_MODE"] == "lora":
        return lora.adapter_dir(ctx.cfg, fmt)
    return repo_path(str(ctx.cfg["FULL_WEIGHTS_PATH"]).format(format=fmt))


def save_best(ctx: RunContext, fmt: str, model: nn.Module, core: CLaMP3Model, entry: dict[str, Any],
              n_valid: int, selected_by: str = "validation text->music MRR") -> None:
    """The selected adapter (or full model) of ``fmt``, with ``selection.json`` saying what selected it."""
    if not ctx.dist.is_main:
        return
    selection = {"format": fmt, "selected_by": selected_by, "n_valid": n_valid, **entry,
                 "run_dir": str(ctx.run_dir), "base_weights": str(ctx.weights),
                 "base_fingerprint": ctx.base_fingerprint, "train_mode": ctx.cfg["TRAIN_MODE"]}
    target = best_location(ctx, fmt)
    if ctx.cfg["TRAIN_MODE"] == "full":
        lora.save_official_checkpoint(core.state_dict(), target, {"selection": selection, "config": ctx.cfg})
        return
    # Written beside the target, then swapped in, so the folder always holds one whole adapter.
    staging = target.with_name(f".{target.name}.saving")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(str(staging))
    write_json(staging / "selection.json", selection)
    swap_in_folder(staging, target)


def export_merged(ctx: RunContext, fmt: str, log: RunLogger) -> None:
    """The best adapter merged into a fresh copy of the base, saved as an official checkpoint."""
    base = load_clamp3(ctx.model_config, ctx.weights)
    adapted = lora.load_adapter(base, lora.adapter_dir(ctx.cfg, fmt))
    path = lora.save_official_checkpoint(lora.merged_state_dict(adapted), ctx.args.export_merged,
                                         {"merged_adapter": str(lora.adapter_dir(ctx.cfg, fmt)), "format": fmt})
    log(f"[{fmt}] merged model written to {path} (official format; load_clamp3 reads it)")


def start_wandb(ctx: RunContext, fmt: str):
    if not (ctx.cfg["WANDB_ENABLED"] and ctx.dist.is_main):
        return None
    import wandb

    return wandb.init(project=ctx.cfg["WANDB_PROJECT"], mode=ctx.cfg["WANDB_MODE"], dir=str(ctx.run_dir),
                      name=f"{ctx.run_dir.name}-{fmt}", config=ctx.cfg, reinit=True)
