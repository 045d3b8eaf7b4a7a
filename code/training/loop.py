"""The training run, top to bottom: set-up, then one adapter (or the full symbolic stage) per format.

For each format: load the base strictly, wrap it (LoRA) or unfreeze the symbolic side (full), load
and check the records, cache the text features when the text tower is frozen, then epochs of
contrastive steps with gradients averaged over ranks, validation (loss and text->music MRR) after
every epoch, the best model saved, a resumable checkpoint at every epoch end (and every
``LORA_CHECKPOINT_STEPS`` steps), early stopping. The pieces it calls: ``training.model_setup``
(the model and its music encoder), ``training.text_side`` (text features), ``training.optimizer``,
``training.data`` (records, plans, batches), ``training.loss`` (the step), ``training.checkpoint``.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lora
import metrics
import runconfig
import torch
from features import load_text_tokenizer
from fileio import DropLog, file_sha256, repo_path, swap_in_folder
from formats import FORMATS
from modeling import CLaMP3Model, ModelConfig, load_clamp3
from patchilizer import M3Patchilizer
from peft import PeftModel
from torch import nn
from tqdm import tqdm

from training import checkpoint as ckpt
from training import data, distributed
from training.loss import LOSS_VARIANTS, ContrastiveLoss, contrastive_step
from training.model_setup import build_model, music_encoder, set_train_mode
from training.optimizer import build_optimizer, build_scheduler, optimizer_step
from training.precision import Precision, PrecisionError, device_description, resolve_precision
from training.run_folder import (
    RunLogger,
    StepLog,
    environment,
    git_commit,
    prepare_run_folder,
    run_file,
    write_json,
)
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


# ------------------------------------------------------------------------------------ set-up


class TrainingSetupError(ValueError):
    """A run that cannot train as configured (settings, too few or too uniform records): the CLI
    prints it as one line, not a traceback."""


def train(cfg: dict[str, Any], args: argparse.Namespace) -> int:
    """The whole run on this process; returns the exit status."""
    return distributed.run_distributed(lambda dist: _run(cfg, args, dist), device_name=cfg["TRAIN_DEVICE"],
                                       timeout_minutes=float(cfg["DIST_TIMEOUT_MINUTES"]))


def _run(cfg: dict[str, Any], args: argparse.Namespace, dist: distributed.DistContext) -> int:
    if cfg["TRAIN_MODE"] not in ("lora", "full"):
        raise TrainingSetupError(f"TRAIN_MODE must be 'lora' or 'full', not {cfg['TRAIN_MODE']!r}")
    if cfg["LOSS"] not in LOSS_VARIANTS:
        raise TrainingSetupError(f"LOSS must be 'clamp3' or 'normalized', not {cfg['LOSS']!r}")
    try:
        # Once, here: every later choice (kernels, autocast, scaler, text cache) reads the result.
        precision = resolve_precision(str(cfg["TRAIN_PRECISION"]), dist.device)
    except PrecisionError as exc:
        raise TrainingSetupError(str(exc)) from None
    lora.lora_config(cfg, "abc")  # refuse base-rewriting inits before any work
    run_dir = repo_path(cfg["LORA_LOG_DIR"])
    resume_path = None
    folder_line = ""
    if dist.is_main:
        folder_line = prepare_run_folder(run_dir, resume=bool(args.resume), overwrite=args.overwrite)
        if args.resume:
            resume_path = ckpt.resolve_resume(args.resume, run_dir)
    distributed.barrier()
    resume_path = distributed.broadcast_object(resume_path)
    model_config = ModelConfig.resolve(cfg, runconfig.model_config_path(args.model_config, cfg))
    weights = Path(args.weights) if args.weights else repo_path(cfg["CLAMP3_WEIGHTS_PATH"])
    if not weights.is_file():
        raise FileNotFoundError(f"base checkpoint not found: {weights}. Download the official CLaMP 3 C2 "
                                "weights (see README) or pass --weights PATH.")
    base_fingerprint = file_sha256(weights) if dist.is_main else None
    base_fingerprint = distributed.broadcast_object(base_fingerprint)
    formats = list(FORMATS) if args.format == "both" else [args.format]
    ctx = RunContext(cfg=cfg, args=args, dist=dist, run_dir=run_dir, model_config=model_config, weights=weights,
                     base_fingerprint=base_fingerprint, tokenizer=load_text_tokenizer(cfg["TEXT_MODEL_NAME"]),
                     progress=not args.quiet, formats=formats, precision=precision)
    ctx.notes += [folder_line] if folder_line else []
    device_name = device_description(dist.device)
    ctx.notes.append(f"precision: {precision.name} on {device_name} (TRAIN_PRECISION="
                     f"{precision.requested})" + (f": {precision.note}" if precision.note else ""))
    resume_state = ckpt.load_checkpoint(resume_path) if resume_path else None
    if resume_state is not None:
        ckpt.check_resumable(resume_state, cfg, base_fingerprint, dist.world_size, formats)
    if dist.is_main:
        write_json(run_dir / "config.json", {
            "config": cfg, "argv": list(sys.argv), "commit": git_commit(), "environment": environment(),
            "base_weights": str(weights), "base_fingerprint": base_fingerprint, "world_size": dist.world_size,
            "formats": formats, "model_config": model_config.to_dict(), "resumed_from": str(resume_path or ""),
            "precision": {"requested": precision.requested, "effective": precision.name, "note": precision.note},
            "device": str(dist.device), "device_name": device_name})
    for fmt in formats:
        if resume_state is not None and fmt in resume_state["completed_formats"]:
            continue
        state_for_format = resume_state if resume_state is not None and resume_state["format"] == fmt else None
        train_format(ctx, fmt, state_for_format)
        resume_state = None if state_for_format is not None else resume_state
    return 0


# ------------------------------------------------------------------------------------ one format


def _load_data(ctx: RunContext, fmt: str, patchilizer: M3Patchilizer, drops: DropLog, log: RunLogger):
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


def train_format(ctx: RunContext, fmt: str, resume_state: dict[str, Any] | None) -> dict[str, Any]:
    """Train the ``fmt`` adapter (or full model) from the base; returns the best epoch's entry."""
    cfg, dist = ctx.cfg, ctx.dist
    log = RunLogger(run_file(ctx.run_dir, fmt, "training"), dist.is_main)
    for note in ctx.notes:
        log(note)
    # The adapter's initialisation draws from the RNG: the same seed on every rank (and for any
    # number of ranks) gives every rank the same starting model. Dropout then draws per rank.
    distributed.seed_everything(int(cfg["SEED"]))
    model, core, text_frozen = build_model(cfg, fmt, ctx.model_config, ctx.weights, dist.device)
    seed = distributed.seed_everything(int(cfg["SEED"]), dist.rank)
    log(f"[{fmt}] {cfg['TRAIN_MODE']} training on {dist.world_size} process(es), device {dist.device}, "
        f"seed {int(cfg['SEED'])} (+ rank for dropout: {seed} here)")
    if dist.is_main and isinstance(model, PeftModel):
        model.print_trainable_parameters()
    trainable = [p for p in model.parameters() if p.requires_grad]
    log(f"[{fmt}] trainable parameters: {sum(p.numel() for p in trainable):,}")

    patchilizer = M3Patchilizer(ctx.model_config.patch_size,
                                int(ctx.model_config.symbolic.get("max_position_embeddings", cfg["PATCH_LENGTH"])))
    # Every rank loads the records, each checking a share of the music files; the main rank
    # writes the drops, anew (a resume finds the same ones again).
    drops_path = run_file(ctx.run_dir, fmt, "drops") if dist.is_main else None
    if drops_path is not None:
        drops_path.unlink(missing_ok=True)
    with DropLog(f"{fmt} records", drops_path) as drops:
        records, valid = _load_data(ctx, fmt, patchilizer, drops, log)

    loss_fn = ContrastiveLoss(cfg["LOSS"], logit_scale=float(cfg["LOGIT_SCALE"])).to(dist.device)
    optimizer = build_optimizer(model, loss_fn, cfg, dist.device)
    per_rank = int(cfg["LORA_BATCH_SIZE"])
    global_batch = per_rank * dist.world_size
    batches_per_epoch = len(records) // global_batch
    total_steps = int(cfg["LORA_NUM_EPOCHS"]) * batches_per_epoch
    if int(cfg["LORA_MAX_STEPS"]) > 0:
        total_steps = min(total_steps, int(cfg["LORA_MAX_STEPS"]))
    scheduler = build_scheduler(optimizer, cfg, total_steps)
    scaler = ctx.precision.grad_scaler()

    text_source = TextSide(cfg, core, text_frozen, records, valid, log, tokenizer=ctx.tokenizer,
                           precision=ctx.precision, dist=dist, progress=ctx.progress)
    state = FormatState()
    if resume_state is not None:
        ckpt.restore_trainable_state(model, loss_fn, resume_state["trainable"])
        optimizer.load_state_dict(resume_state["optimizer"])
        scheduler.load_state_dict(resume_state["scheduler"])
        if scaler is not None and resume_state.get("scaler"):
            scaler.load_state_dict(resume_state["scaler"])
        state = FormatState(**resume_state["state"])
        ckpt.set_rng_state(resume_state["rng"][dist.rank], dist.device)
        log(f"[{fmt}] resumed at epoch {state.epoch + 1}, batch {state.position}, step {state.step}")
    wandb_run = _start_wandb(ctx, fmt)

    def save_checkpoint() -> None:
        rng_states = distributed.all_gather_object(ckpt.rng_state(dist.device))
        if not dist.is_main:
            return
        payload = {
            "format": fmt, "completed_formats": ctx.formats[: ctx.formats.index(fmt)],
            "config": cfg, "base_fingerprint": ctx.base_fingerprint, "world_size": dist.world_size,
            "trainable": ckpt.trainable_state(model, loss_fn), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler else None,
            "rng": rng_states, "state": vars(state).copy()}
        ckpt.save_checkpoint(ctx.run_dir, fmt, state.step, payload, keep=int(cfg["LORA_KEEP_CHECKPOINTS"]))

    log(f"[{fmt}] {len(records)} records, global batch {global_batch} ({per_rank} x {dist.world_size}), "
        f"{batches_per_epoch} steps per epoch, {total_steps} steps in all"
        + (f", GradCache micro-batch {cfg['GRAD_CACHE_MICRO_BATCH']}" if cfg["GRAD_CACHE_MICRO_BATCH"] else ""))
    micro = int(cfg["GRAD_CACHE_MICRO_BATCH"])
    rows_per_pass = micro if 0 < micro < per_rank else per_rank
    encode_music = music_encoder(core, dist.device, ctx.precision.name,
                                 patch_budget=rows_per_pass * patchilizer.patch_length)
    max_steps = int(cfg["LORA_MAX_STEPS"])
    checkpoint_every = int(cfg["LORA_CHECKPOINT_STEPS"])
    step_log = StepLog(log, fmt, int(cfg["TRAIN_LOG_EVERY_STEPS"]), total_steps)
    while not state.done and state.epoch < int(cfg["LORA_NUM_EPOCHS"]):
        epoch_start = time.time()
        if dist.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dist.device)
        plan = data.plan_epoch(records, global_batch, state.epoch, int(cfg["SEED"]),
                               bucketing=bool(cfg["LENGTH_BUCKETING"]), no_duplicates=bool(cfg["NO_DUPLICATE_NEGATIVES"]))
        if not len(plan):
            # Silently training nothing (a loss of 0, an unchanged adapter) is worse than stopping.
            distinct = len({record.text_key for record in records})
            raise TrainingSetupError(
                f"[{fmt}] epoch {state.epoch + 1} has no full batch of {global_batch}: with NO_DUPLICATE_NEGATIVES "
                f"no batch may hold two records with the same text or music, and these {len(records)} records "
                f"have {distinct} distinct texts. Lower LORA_BATCH_SIZE, give the records more varied texts, or "
                "set NO_DUPLICATE_NEGATIVES=False (equal texts then serve as negatives, as in the official code)")
        if plan.unplaced and state.position == 0:
            log(f"[{fmt}] epoch {state.epoch + 1}: {plan.unplaced} records left out (no batch could take them "
                "without two equal texts or music files, NO_DUPLICATE_NEGATIVES)")
        dataset = data.BatchDataset(
            records, plan, patchilizer, text=text_source.for_dataset(True), seed=int(cfg["SEED"]),
            epoch=state.epoch, train=True, augmentation=_augmentation(cfg), rank=dist.rank,
            world_size=dist.world_size, start_batch=state.position, pad_to_longest=bool(cfg["LENGTH_BUCKETING"]))
        set_train_mode(core, text_frozen, bool(cfg["SYMBOLIC_DROPOUT"]))
        bar = tqdm(total=len(plan), initial=state.position, desc=f"{fmt} epoch {state.epoch + 1}", unit="step",
                   disable=not (ctx.progress and dist.is_main), dynamic_ncols=True)
        samples_done = 0
        for batch in step_log.timed(_data_loader(ctx, dataset, state.epoch)):
            batch = _to_device(batch, dist.device)
            keys = ({"text_keys": batch["text_keys"], "music_keys": batch["music_keys"]}
                    if cfg["NO_DUPLICATE_NEGATIVES"] else {})
            loss_value = contrastive_step(batch, encode_music, text_source.batch_side(core, batch, train=True),
                                          loss_fn, micro_batch=int(cfg["GRAD_CACHE_MICRO_BATCH"]), scaler=scaler,
                                          **keys)
            lr = optimizer_step(trainable + list(loss_fn.parameters()), optimizer, scheduler, scaler,
                                float(cfg["LORA_MAX_GRAD_NORM"]), clipped=trainable)
            state.step += 1
            state.position += 1
            state.epoch_loss_sum += float(loss_value) * global_batch
            state.epoch_samples += global_batch
            samples_done += global_batch
            step_log.step_done(state.epoch + 1, state.step, float(loss_value), lr, global_batch)
            elapsed = max(1e-9, time.time() - epoch_start)
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss_value):.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}",
                            samples_s=f"{samples_done / elapsed:.1f}")
            if wandb_run is not None:
                wandb_run.log({f"{fmt}/train_loss": float(loss_value), f"{fmt}/lr": scheduler.get_last_lr()[0]},
                              step=state.step)
            if max_steps > 0 and state.step >= max_steps:
                state.done = True
                break
            if checkpoint_every > 0 and state.step % checkpoint_every == 0 and state.position < len(plan):
                save_checkpoint()
        bar.close()
        seconds = time.time() - epoch_start
        valid_loss, valid_mrr = validate(ctx, core, loss_fn, valid, patchilizer, text_source)
        entry = {"epoch": state.epoch + 1, "step": state.step,
                 "train_loss": state.epoch_loss_sum / max(1, state.epoch_samples),
                 "valid_loss": valid_loss, "valid_mrr": valid_mrr, "lr": scheduler.get_last_lr()[0],
                 "samples_per_s": samples_done / max(1e-9, seconds), "seconds": seconds,
                 "peak_memory_mb": _peak_memory_mb(dist.device)}
        if loss_fn.learnable:
            entry["logit_scale"] = float(loss_fn.scale().detach())
        state.history.append(entry)
        log(f"[{fmt}] epoch {entry['epoch']}: train loss {entry['train_loss']:.4f}, valid loss {valid_loss:.4f}, "
            f"valid text->music MRR {valid_mrr:.4f} (N={len(valid)}), {entry['samples_per_s']:.1f} samples/s")
        if wandb_run is not None:
            wandb_run.log({f"{fmt}/{k}": v for k, v in entry.items()}, step=state.step)
        if valid_mrr > state.best_mrr:
            state.best_mrr, state.best_epoch, state.bad_epochs = valid_mrr, entry["epoch"], 0
            _save_best(ctx, fmt, model, core, entry, len(valid))
            log(f"[{fmt}] best so far: saved to {_best_location(ctx, fmt)}")
        else:
            state.bad_epochs += 1
            if int(cfg["LORA_PATIENCE"]) > 0 and state.bad_epochs >= int(cfg["LORA_PATIENCE"]):
                log(f"[{fmt}] no better validation MRR for {state.bad_epochs} epochs: stopping early")
                state.done = True
        state.epoch += 1
        state.position = 0
        state.epoch_loss_sum, state.epoch_samples = 0.0, 0
        if dist.is_main:
            write_json(run_file(ctx.run_dir, fmt, "history"), state.history)
        save_checkpoint()
    if wandb_run is not None:
        wandb_run.finish()
    best = next((e for e in state.history if e["epoch"] == state.best_epoch), None)
    log(f"[{fmt}] done: best validation MRR {state.best_mrr:.4f} at epoch {state.best_epoch} -> "
        f"{_best_location(ctx, fmt)}")
    if ctx.args.export_merged and dist.is_main:
        _export_merged(ctx, fmt, log)
    distributed.barrier()
    return best or {}


# ------------------------------------------------------------------------------------ pieces


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def _augmentation(cfg: dict[str, Any]) -> data.Augmentation:
    return data.Augmentation(random_file=bool(cfg["RANDOM_FILEPATH"]),
                             remove_instruments_p=float(cfg["REMOVE_INSTRUMENT_PROB"]),
                             random_truncation=bool(cfg["RANDOM_TRUNCATION"]),
                             text_dropout=bool(cfg["TEXT_DROPOUT"]))


def _data_loader(ctx: RunContext, dataset: torch.utils.data.Dataset, epoch: int) -> torch.utils.data.DataLoader:
    # A generator of its own: the DataLoader must not draw its worker seeds from the global RNG,
    # which also drives dropout and is restored on resume.
    generator = torch.Generator().manual_seed(int(ctx.cfg["SEED"]) * 1000 + epoch)
    return torch.utils.data.DataLoader(dataset, batch_size=None, shuffle=False,
                                       num_workers=int(ctx.cfg["NUM_WORKERS"]), generator=generator,
                                       pin_memory=ctx.dist.device.type == "cuda")


@torch.no_grad()
def validate(ctx: RunContext, core: CLaMP3Model, loss_fn: ContrastiveLoss, valid, patchilizer: M3Patchilizer,
             text_side: TextSide) -> tuple[float, float]:
    """(validation loss, text->music MRR) over every validation record. Each rank embeds its rows
    of every batch; the features of all ranks are gathered, so no rank waits on another's work."""
    cfg, dist = ctx.cfg, ctx.dist
    core.eval()
    global_batch = int(cfg["LORA_BATCH_SIZE"]) * dist.world_size
    plan = data.plan_validation(valid, global_batch, int(cfg["SEED"]), bucketing=bool(cfg["LENGTH_BUCKETING"]))
    dataset = data.BatchDataset(valid, plan, patchilizer, text=text_side.for_dataset(False), seed=int(cfg["SEED"]),
                                epoch=0, train=False, rank=dist.rank, world_size=dist.world_size,
                                pad_to_longest=bool(cfg["LENGTH_BUCKETING"]))
    loss_sum, count = 0.0, 0
    text_parts, music_parts = [], []
    batches = tqdm(_data_loader(ctx, dataset, 0), total=len(dataset), desc="validation", unit="batch",
                   disable=not (ctx.progress and dist.is_main), dynamic_ncols=True, leave=False)
    dim = ctx.model_config.projection_size
    for position, batch in enumerate(batches):
        batch = _to_device(batch, dist.device)
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
    text_all = distributed.all_gather_tensor(torch.cat(text_parts) if text_parts else torch.zeros(0, dim))
    music_all = distributed.all_gather_tensor(torch.cat(music_parts) if music_parts else torch.zeros(0, dim))
    return loss_sum / max(1, count), metrics.mrr(text_all, music_all)


def _best_location(ctx: RunContext, fmt: str) -> Path:
    if ctx.cfg["TRAIN_MODE"] == "lora":
        return lora.adapter_dir(ctx.cfg, fmt)
    return repo_path(str(ctx.cfg["FULL_WEIGHTS_PATH"]).format(format=fmt))


def _save_best(ctx: RunContext, fmt: str, model: nn.Module, core: CLaMP3Model, entry: dict[str, Any],
               n_valid: int) -> None:
    if not ctx.dist.is_main:
        return
    selection = {"format": fmt, "selected_by": "validation text->music MRR", "n_valid": n_valid, **entry,
                 "run_dir": str(ctx.run_dir), "base_weights": str(ctx.weights),
                 "base_fingerprint": ctx.base_fingerprint, "train_mode": ctx.cfg["TRAIN_MODE"]}
    target = _best_location(ctx, fmt)
    if ctx.cfg["TRAIN_MODE"] == "full":
        lora.save_official_checkpoint(core.state_dict(), target, {"selection": selection, "config": ctx.cfg})
        return
    # Written beside the target, then swapped in, so the folder always holds one whole adapter.
    staging = target.with_name(f".{target.name}.saving")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(str(staging))
    write_json(staging / "selection.json", selection)
    swap_in_folder(staging, target)


def _export_merged(ctx: RunContext, fmt: str, log: RunLogger) -> None:
    """The best adapter merged into a fresh copy of the base, saved as an official checkpoint."""
    base = load_clamp3(ctx.model_config, ctx.weights)
    adapted = lora.load_adapter(base, lora.adapter_dir(ctx.cfg, fmt))
    path = lora.save_official_checkpoint(lora.merged_state_dict(adapted), ctx.args.export_merged,
                                         {"merged_adapter": str(lora.adapter_dir(ctx.cfg, fmt)), "format": fmt})
    log(f"[{fmt}] merged model written to {path} (official format; load_clamp3 reads it)")


def _start_wandb(ctx: RunContext, fmt: str):
    if not (ctx.cfg["WANDB_ENABLED"] and ctx.dist.is_main):
        return None
    import wandb

    return wandb.init(project=ctx.cfg["WANDB_PROJECT"], mode=ctx.cfg["WANDB_MODE"], dir=str(ctx.run_dir),
                      name=f"{ctx.run_dir.name}-{fmt}", config=ctx.cfg, reinit=True)
