"""The training run, top to bottom: set-up, then one adapter (or the full symbolic stage) per format.

For each format: load the base strictly, wrap it (LoRA) or unfreeze the symbolic side (full), load
and check the records, cache the text features when the text tower is frozen, then epochs of
contrastive steps with gradients averaged over ranks, validation (loss and text->music MRR) after
every epoch, the best model saved, a resumable checkpoint at every epoch end (and every
``LORA_CHECKPOINT_STEPS`` steps), early stopping. The pieces it calls: ``training.model_setup``
(the model and its music encoder), ``training.text_side`` (text features), ``training.optimizer``,
``training.data`` (records, plans, batches), ``training.loss`` (the step), ``training.checkpoint``,
``training.run_parts`` (what it shares with the joint run). With ``ALIGN_WEIGHT`` > 0 and
``--format both`` the two adapters train together instead (``training.joint``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import lora
import runconfig
import torch
from features import load_text_tokenizer
from fileio import DropLog, file_sha256, repo_path
from formats import FORMATS
from modeling import ModelConfig
from patchilizer import M3Patchilizer
from peft import PeftModel
from tqdm import tqdm

from training import checkpoint as ckpt
from training import data, distributed
from training.joint import check_joint_settings, train_joint
from training.loss import LOSS_VARIANTS, ContrastiveLoss, contrastive_step
from training.model_setup import build_model, music_encoder, set_train_mode
from training.optimizer import build_optimizer, build_scheduler, optimizer_step
from training.precision import PrecisionError, device_description, resolve_precision
from training.run_folder import (
    RunLogger,
    StepLog,
    environment,
    git_commit,
    prepare_run_folder,
    run_file,
    write_json,
)
from training.run_parts import (
    FormatState,
    RunContext,
    TrainingSetupError,
    augmentation,
    best_location,
    data_loader,
    export_merged,
    load_format_data,
    peak_memory_mb,
    resume_training_state,
    save_best,
    start_wandb,
    to_device,
    validate,
)
from training.text_side import TextSide

__all__ = ["TrainingSetupError", "train", "train_format"]  # the CLI's names


# ------------------------------------------------------------------------------------ set-up


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
    joint = check_joint_settings(cfg, args.format)  # ALIGN_WEIGHT > 0: both adapters in one run
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
        ckpt.check_resumable(resume_state, cfg, base_fingerprint, dist.world_size, ["joint"] if joint else formats)
    if dist.is_main:
        write_json(run_dir / "config.json", {
            "config": cfg, "argv": list(sys.argv), "commit": git_commit(), "environment": environment(),
            "base_weights": str(weights), "base_fingerprint": base_fingerprint, "world_size": dist.world_size,
            "formats": formats, "model_config": model_config.to_dict(), "resumed_from": str(resume_path or ""),
            "precision": {"requested": precision.requested, "effective": precision.name, "note": precision.note},
            "device": str(dist.device), "device_name": device_name,
            **({"joint": True} if joint else {})})
    if joint:
        train_joint(ctx, resume_state)
        return 0
    for fmt in formats:
        if resume_state is not None and fmt in resume_state["completed_formats"]:
            continue
        state_for_format = resume_state if resume_state is not None and resume_state["format"] == fmt else None
        train_format(ctx, fmt, state_for_format)
        resume_state = None if state_for_format is not None else resume_state
    return 0


# ------------------------------------------------------------------------------------ one format


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
        records, valid = load_format_data(ctx, fmt, patchilizer, drops, log)

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
        state = resume_training_state(model, loss_fn, optimizer, scheduler, scaler, resume_state, dist, log, fmt)
    wandb_run = start_wandb(ctx, fmt)

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
            epoch=state.epoch, train=True, augmentation=augmentation(cfg), rank=dist.rank,
            world_size=dist.world_size, start_batch=state.position, pad_to_longest=bool(cfg["LENGTH_BUCKETING"]))
        set_train_mode(core, text_frozen, bool(cfg["SYMBOLIC_DROPOUT"]))
        bar = tqdm(total=len(plan), initial=state.position, desc=f"{fmt} epoch {state.epoch + 1}", unit="step",
                   disable=not (ctx.progress and dist.is_main), dynamic_ncols=True)
        samples_done = 0
        for batch in step_log.timed(data_loader(ctx, dataset, state.epoch)):
            batch = to_device(batch, dist.device)
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
                 "peak_memory_mb": peak_memory_mb(dist.device)}
        if loss_fn.learnable:
            entry["logit_scale"] = float(loss_fn.scale().detach())
        state.history.append(entry)
        log(f"[{fmt}] epoch {entry['epoch']}: train loss {entry['train_loss']:.4f}, valid loss {valid_loss:.4f}, "
            f"valid text->music MRR {valid_mrr:.4f} (N={len(valid)}), {entry['samples_per_s']:.1f} samples/s")
        if wandb_run is not None:
            wandb_run.log({f"{fmt}/{k}": v for k, v in entry.items()}, step=state.step)
        if valid_mrr > state.best_mrr:
            state.best_mrr, state.best_epoch, state.bad_epochs = valid_mrr, entry["epoch"], 0
            save_best(ctx, fmt, model, core, entry, len(valid))
            log(f"[{fmt}] best so far: saved to {best_location(ctx, fmt)}")
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
        f"{best_location(ctx, fmt)}")
    if ctx.args.export_merged and dist.is_main:
        export_merged(ctx, fmt, log)
    distributed.barrier()
    return best or {}
