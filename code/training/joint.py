"""The joint run (``--format both`` with ``ALIGN_WEIGHT`` > 0): the ABC and the MTF adapter trained
together, each step's loss text <-> sheet + text <-> MIDI + ``ALIGN_WEIGHT`` x sheet <-> MIDI over
a global batch of pieces (``training.pairs``, ``training.joint_loss``).

Each format has its own model (the base with that format's adapter, its initialisation drawn from
the seed as in a run of that format alone) and its own text features; the frozen text tower is
shared. Validation after every epoch measures text -> sheet MRR (ABC validation records), text ->
MIDI MRR (MTF) and sheet -> MIDI MRR (the validation pairs); the mean of those ``ALIGN_SELECT_BY``
names selects both adapters, saved in PEFT's format where a run of one format saves its own
(``LORA_{ABC,MTF}_ADAPTER_DIR``). The run's files are ``JOINT_*`` (log, history) and its
checkpoints ``joint_step*.pt``, resumable bitwise as any run's.
"""

from __future__ import annotations

import time
from typing import Any

import metrics
import torch
from fileio import DropLog
from formats import FORMATS
from patchilizer import M3Patchilizer
from patching import patched
from torch import nn
from tqdm import tqdm

from training import checkpoint as ckpt
from training import data, distributed
from training.joint_loss import TERMS, JointLoss, joint_step
from training.model_setup import build_model, music_encoder, set_train_mode
from training.optimizer import build_optimizer, build_scheduler, optimizer_step
from training.pairs import JointBatchDataset, Pairing, pair_records, plan_joint_epoch
from training.run_folder import RunLogger, StepLog, run_file, write_json
from training.run_parts import (
    FormatState,
    RunContext,
    TrainingSetupError,
    augmentation,
    best_location,
    data_loader,
    load_format_data,
    peak_memory_mb,
    resume_training_state,
    save_best,
    start_wandb,
    to_device,
    validation_features,
)
from training.text_side import TextSide

JOINT = "joint"  # the run's name in its files: JOINT_training.log, JOINT_history.json, joint_step*.pt


def check_joint_settings(cfg: dict[str, Any], fmt: str) -> bool:
    """Whether this run is joint (``ALIGN_WEIGHT`` > 0); a ``TrainingSetupError`` for settings a
    joint run cannot have."""
    weight = float(cfg["ALIGN_WEIGHT"])
    if weight < 0:
        raise TrainingSetupError(f"ALIGN_WEIGHT must be >= 0, not {weight}")
    if weight == 0:
        return False
    if fmt != "both":
        raise TrainingSetupError(f"ALIGN_WEIGHT > 0 trains both adapters together: use --format both (not {fmt})")
    if cfg["TRAIN_MODE"] != "lora":
        raise TrainingSetupError("ALIGN_WEIGHT > 0 trains LoRA adapters: TRAIN_MODE must be 'lora'")
    chosen = list(cfg["ALIGN_SELECT_BY"])
    if not chosen or any(name not in TERMS for name in chosen) or len(set(chosen)) != len(chosen):
        raise TrainingSetupError(f"ALIGN_SELECT_BY must name distinct validation MRRs of {list(TERMS)}, "
                                 f"not {chosen}")
    return True


def _models(ctx: RunContext) -> tuple[dict[str, nn.Module], dict[str, Any]]:
    """Each format's PEFT model and its CLaMP3Model; the second shares the first's frozen text and
    audio towers (the same weights, held once)."""
    models, cores = {}, {}
    for fmt in FORMATS:
        # The same seed as a run of this format alone: the same starting adapter.
        distributed.seed_everything(int(ctx.cfg["SEED"]))
        models[fmt], cores[fmt], _ = build_model(ctx.cfg, fmt, ctx.model_config, ctx.weights, ctx.dist.device)
    cores["mtf"].text_model, cores["mtf"].audio_model = cores["abc"].text_model, cores["abc"].audio_model
    return models, cores


def _pairing_line(split: str, pairing: Pairing) -> str:
    return f"[{JOINT}] {split}: {pairing.summary()}"


def train_joint(ctx: RunContext, resume_state: dict[str, Any] | None) -> dict[str, Any]:
    """Train both adapters together; returns the best epoch's entry."""
    cfg, dist = ctx.cfg, ctx.dist
    log = RunLogger(run_file(ctx.run_dir, JOINT, "training"), dist.is_main)
    for note in ctx.notes:
        log(note)
    models, cores = _models(ctx)
    seed = distributed.seed_everything(int(cfg["SEED"]), dist.rank)
    weight = float(cfg["ALIGN_WEIGHT"])
    log(f"[{JOINT}] both adapters in one run on {dist.world_size} process(es), device {dist.device}, seed "
        f"{int(cfg['SEED'])} (+ rank for dropout: {seed} here): text<->sheet + text<->MIDI + {weight} x sheet<->MIDI")
    container = nn.ModuleDict(models)
    trainable = [p for p in container.parameters() if p.requires_grad]
    log(f"[{JOINT}] trainable parameters: {sum(p.numel() for p in trainable):,} (both adapters)")

    patchilizer = M3Patchilizer(ctx.model_config.patch_size,
                                int(ctx.model_config.symbolic.get("max_position_embeddings", cfg["PATCH_LENGTH"])))
    records: dict[str, list[data.TrainingRecord]] = {}
    valid: dict[str, list[data.TrainingRecord]] = {}
    for fmt in FORMATS:
        drops_path = run_file(ctx.run_dir, fmt, "drops") if dist.is_main else None
        if drops_path is not None:
            drops_path.unlink(missing_ok=True)
        with DropLog(f"{fmt} records", drops_path) as drops:
            records[fmt], valid[fmt] = load_format_data(ctx, fmt, patchilizer, drops, log)
    pairing, valid_pairing = pair_records(records), pair_records(valid)
    log(_pairing_line("training", pairing))
    log(_pairing_line("validation", valid_pairing))
    chosen = list(cfg["ALIGN_SELECT_BY"])
    if not pairing.pairs:
        raise TrainingSetupError(f"[{JOINT}] no training record of one format shares its pair_id with one of the "
                                 "other: nothing to align (generate_training_jsonl.py writes pair_id)")
    if "abc_mtf" in chosen and not valid_pairing.pairs:
        raise TrainingSetupError(f"[{JOINT}] no validation pair, so no sheet->MIDI MRR to select by: give the "
                                 "validation records pair_ids, or leave abc_mtf out of ALIGN_SELECT_BY")

    loss_fn = JointLoss(cfg["LOSS"], float(cfg["LOGIT_SCALE"]), weight).to(dist.device)
    optimizer = build_optimizer(container, loss_fn, cfg, dist.device)
    per_rank = int(cfg["LORA_BATCH_SIZE"])
    global_batch = per_rank * dist.world_size
    if len(pairing.pieces) < global_batch:
        raise TrainingSetupError(f"[{JOINT}] {len(pairing.pieces)} pieces are fewer than one global batch ({global_batch})")
    batches_per_epoch = len(pairing.pieces) // global_batch
    total_steps = int(cfg["LORA_NUM_EPOCHS"]) * batches_per_epoch
    if int(cfg["LORA_MAX_STEPS"]) > 0:
        total_steps = min(total_steps, int(cfg["LORA_MAX_STEPS"]))
    scheduler = build_scheduler(optimizer, cfg, total_steps)
    scaler = ctx.precision.grad_scaler()
    sides = {fmt: TextSide(cfg, cores[fmt], True, records[fmt], valid[fmt], log, tokenizer=ctx.tokenizer,
                           precision=ctx.precision, dist=dist, progress=ctx.progress) for fmt in FORMATS}
    state = FormatState()
    if resume_state is not None:
        state = resume_training_state(container, loss_fn, optimizer, scheduler, scaler, resume_state, dist, log, JOINT)
    wandb_run = start_wandb(ctx, JOINT)

    def save_checkpoint() -> None:
        rng_states = distributed.all_gather_object(ckpt.rng_state(dist.device))
        if not dist.is_main:
            return
        payload = {
            "format": JOINT, "completed_formats": [], "config": cfg, "base_fingerprint": ctx.base_fingerprint,
            "world_size": dist.world_size, "trainable": ckpt.trainable_state(container, loss_fn),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler else None, "rng": rng_states, "state": vars(state).copy()}
        ckpt.save_checkpoint(ctx.run_dir, JOINT, state.step, payload, keep=int(cfg["LORA_KEEP_CHECKPOINTS"]))

    micro = int(cfg["GRAD_CACHE_MICRO_BATCH"])
    log(f"[{JOINT}] global batch {global_batch} pieces ({per_rank} x {dist.world_size}), {batches_per_epoch} steps "
        f"per epoch, {total_steps} steps in all" + (f", GradCache micro-batch {micro}" if micro else ""))
    rows_per_pass = micro if 0 < micro < per_rank else per_rank
    encoders = {fmt: music_encoder(cores[fmt], dist.device, ctx.precision.name,
                                   patch_budget=rows_per_pass * patchilizer.patch_length) for fmt in FORMATS}
    dim = ctx.model_config.projection_size
    no_duplicates = bool(cfg["NO_DUPLICATE_NEGATIVES"])
    max_steps = int(cfg["LORA_MAX_STEPS"])
    checkpoint_every = int(cfg["LORA_CHECKPOINT_STEPS"])
    step_log = StepLog(log, JOINT, int(cfg["TRAIN_LOG_EVERY_STEPS"]), total_steps)
    while not state.done and state.epoch < int(cfg["LORA_NUM_EPOCHS"]):
        epoch_start = time.time()
        if dist.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dist.device)
        plan = plan_joint_epoch(pairing, global_batch, state.epoch, int(cfg["SEED"]),
                                bucketing=bool(cfg["LENGTH_BUCKETING"]), no_duplicates=no_duplicates)
        if not len(plan):
            raise TrainingSetupError(f"[{JOINT}] epoch {state.epoch + 1} has no full batch of {global_batch} pieces "
                                     "(NO_DUPLICATE_NEGATIVES: no two pieces of a batch may share a text or music "
                                     "of one format); lower LORA_BATCH_SIZE")
        if plan.pieces.unplaced and state.position == 0:
            log(f"[{JOINT}] epoch {state.epoch + 1}: {plan.pieces.unplaced} pieces left out (no batch could take "
                "them without two equal texts or music files of one format, NO_DUPLICATE_NEGATIVES)")
        dataset = JointBatchDataset({fmt: data.BatchDataset(
            records[fmt], plan.formats[fmt], patchilizer, text=sides[fmt].for_dataset(True), seed=int(cfg["SEED"]),
            epoch=state.epoch, train=True, augmentation=augmentation(cfg), rank=dist.rank,
            world_size=dist.world_size, start_batch=state.position, pad_to_longest=bool(cfg["LENGTH_BUCKETING"]))
            for fmt in FORMATS}, plan.pairs)
        for fmt in FORMATS:
            set_train_mode(cores[fmt], True, bool(cfg["SYMBOLIC_DROPOUT"]))
        bar = tqdm(total=len(plan), initial=state.position, desc=f"joint epoch {state.epoch + 1}", unit="step",
                   disable=not (ctx.progress and dist.is_main), dynamic_ncols=True)
        samples_done = 0
        for batch in step_log.timed(data_loader(ctx, dataset, state.epoch)):
            parts = {fmt: to_device(batch[fmt], dist.device) for fmt in FORMATS}
            texts = {fmt: sides[fmt].batch_side(cores[fmt], parts[fmt], train=True) if parts[fmt]["patches"].shape[0]
                     else torch.zeros(0, dim, device=dist.device) for fmt in FORMATS}
            keys = ({fmt: {"text_keys": parts[fmt]["text_keys"], "music_keys": parts[fmt]["music_keys"]}
                     for fmt in FORMATS} if no_duplicates else None)
            loss_value, terms = joint_step(parts, encoders, texts, loss_fn, int(batch["pairs"]), dim, keys=keys,
                                           micro_batch=micro, scaler=scaler)
            lr = optimizer_step(trainable + list(loss_fn.parameters()), optimizer, scheduler, scaler,
                                float(cfg["LORA_MAX_GRAD_NORM"]), clipped=trainable)
            state.step += 1
            state.position += 1
            state.epoch_loss_sum += loss_value * global_batch
            state.epoch_samples += global_batch
            for term, value in terms.items():
                total = state.term_sums.setdefault(term, [0.0, 0])
                total[0] += value
                total[1] += 1
            samples_done += global_batch
            step_log.step_done(state.epoch + 1, state.step, loss_value, lr, global_batch)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
            if wandb_run is not None:
                wandb_run.log({f"{JOINT}/train_loss": loss_value, f"{JOINT}/lr": scheduler.get_last_lr()[0],
                               **{f"{JOINT}/train_{t}": v for t, v in terms.items()}}, step=state.step)
            if max_steps > 0 and state.step >= max_steps:
                state.done = True
                break
            if checkpoint_every > 0 and state.step % checkpoint_every == 0 and state.position < len(plan):
                save_checkpoint()
        bar.close()
        seconds = time.time() - epoch_start
        scores, valid_losses = validate_joint(ctx, cores, loss_fn, valid, valid_pairing, patchilizer, sides)
        score = sum(scores[name] for name in chosen) / len(chosen)
        entry = {"epoch": state.epoch + 1, "step": state.step,
                 "train_loss": state.epoch_loss_sum / max(1, state.epoch_samples),
                 **{f"train_loss_{t}": total / steps for t, (total, steps) in sorted(state.term_sums.items())},
                 "valid_loss": sum(valid_losses.values()), **{f"valid_loss_{t}": v for t, v in valid_losses.items()},
                 "valid_mrr": score, **{f"valid_mrr_{t}": v for t, v in scores.items()},
                 "lr": scheduler.get_last_lr()[0], "samples_per_s": samples_done / max(1e-9, seconds),
                 "seconds": seconds, "peak_memory_mb": peak_memory_mb(dist.device)}
        if loss_fn.learnable:
            entry.update({f"logit_scale_{t}": float(loss_fn.terms[t].scale().detach()) for t in TERMS})
        state.history.append(entry)
        log(f"[{JOINT}] epoch {entry['epoch']}: train loss {entry['train_loss']:.4f}, validation MRR text->sheet "
            f"{scores['text_abc']:.4f} (N={len(valid['abc'])}), text->MIDI {scores['text_mtf']:.4f} "
            f"(N={len(valid['mtf'])}), sheet->MIDI {scores['abc_mtf']:.4f} (N={len(valid_pairing.pairs)}); "
            f"selection score {score:.4f}, {entry['samples_per_s']:.1f} pieces/s")
        if wandb_run is not None:
            wandb_run.log({f"{JOINT}/{k}": v for k, v in entry.items()}, step=state.step)
        if score > state.best_mrr:
            state.best_mrr, state.best_epoch, state.bad_epochs = score, entry["epoch"], 0
            selected_by = f"joint run: mean validation MRR of {', '.join(chosen)} (ALIGN_SELECT_BY)"
            for fmt in FORMATS:
                save_best(ctx, fmt, models[fmt], cores[fmt], entry, len(valid[fmt]), selected_by=selected_by)
            log(f"[{JOINT}] best so far: saved to {best_location(ctx, 'abc')} and {best_location(ctx, 'mtf')}")
        else:
            state.bad_epochs += 1
            if int(cfg["LORA_PATIENCE"]) > 0 and state.bad_epochs >= int(cfg["LORA_PATIENCE"]):
                log(f"[{JOINT}] no better selection score for {state.bad_epochs} epochs: stopping early")
                state.done = True
        state.epoch += 1
        state.position = 0
        state.epoch_loss_sum, state.epoch_samples, state.term_sums = 0.0, 0, {}
        if dist.is_main:
            write_json(run_file(ctx.run_dir, JOINT, "history"), state.history)
        save_checkpoint()
    if wandb_run is not None:
        wandb_run.finish()
    log(f"[{JOINT}] done: best selection score {state.best_mrr:.4f} at epoch {state.best_epoch}")
    distributed.barrier()
    return next((e for e in state.history if e["epoch"] == state.best_epoch), {})


def validate_joint(ctx: RunContext, cores: dict[str, Any], loss_fn: JointLoss, valid: dict[str, list],
                   pairing: Pairing, patchilizer: M3Patchilizer, sides: dict[str, TextSide]
                   ) -> tuple[dict[str, float], dict[str, float]]:
    """(validation MRRs by term: text->sheet, text->MIDI, sheet->MIDI; each format's text loss).
    The sheet->MIDI MRR ranks every validation pair's MIDI for its sheet music."""
    scores, losses, music, row_of = {}, {}, {}, {}
    for fmt in FORMATS:
        # The term gathers its rows itself here, as a one-format run's loss does: validation
        # batches are embedded rank by rank.
        with patched(loss_fn.terms[f"text_{fmt}"], gather=True) as term:
            loss, text, music[fmt], index = validation_features(ctx, cores[fmt], term, valid[fmt], patchilizer,
                                                                sides[fmt])
        losses[f"text_{fmt}"] = loss
        scores[f"text_{fmt}"] = metrics.mrr(text, music[fmt])
        row_of[fmt] = {int(i): row for row, i in enumerate(index.tolist())}
    pairs = pairing.pairs
    if pairs:
        rows = {fmt: [row_of[fmt][valid[fmt][piece.position(fmt)].index] for piece in pairs] for fmt in FORMATS}
        scores["abc_mtf"] = metrics.mrr(music["abc"][rows["abc"]], music["mtf"][rows["mtf"]])
    else:
        scores["abc_mtf"] = float("nan")
    return scores, losses
