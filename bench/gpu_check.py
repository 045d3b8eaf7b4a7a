"""GPU check: the trainer and extraction on one CUDA GPU at the official model size, in one run.

    python bench/gpu_check.py                 # what `make gpu-check` runs: under 8 minutes on one GPU
    python bench/gpu_check.py --cpu           # the parts a CPU can run (also chosen without CUDA)
    python bench/gpu_check.py --cpu --size tiny --out /tmp/check.json   # seconds (tests/test_gpu_check.py)

Parts, each one or more rows of one table (printed, and written as JSON to ``--out``):

1. **tests**: ``pytest -m gpu`` (tests/test_gpu.py: the trainer end to end per precision on the
   tiny fixture model, extraction against the CPU, the frozen-base kernels, GradCache's dropout on
   the GPU) as a subprocess. GPU mode only.
2. **precision**: per precision (fp32, bf16, fp16), the trainer's step (``training.loss.contrastive_step``
   with the trainer's ``music_encoder``, clipping, fused AdamW, a GradScaler for fp16) for a few
   steps on the same synthetic batches from the same LoRA weights, dropout off so that only the
   arithmetic differs. Checks: every loss finite; each step's loss within 2% of fp32's; on the
   first batch, before any update, the music features at cosine >= 0.99 and the LoRA gradient at
   cosine >= 0.99 to fp32's. The precision asked for is resolved as the trainer resolves it
   (``training.precision``: bf16 becomes fp16 on a GPU without native bf16).
3. **gradcache**: dropout on (the symbolic encoder's and LoRA's), GradCache's gradient against
   plain autograd over the same micro-batches in the same order from the same seed (each re-run
   must draw its first pass's dropout masks), and the same against another seed (the control:
   the masks matter); plus one micro-batch encoded without gradient and re-encoded with gradient
   from the same RNG state (max feature difference). fp32, and bf16 on the GPU (on CPU when
   ``--precisions`` names it).
4. **extraction**: ``features.FeatureExtractor`` global features of synthetic pieces (some longer
   than one segment) on the GPU against the CPU in float32: float32 within 1e-4, bfloat16 and
   float16 autocast at cosine >= 0.999. On CPU: one segment per batch against the batched
   float32 path, and CPU bfloat16 autocast.
5. **bench**: samples/s and peak memory of part 2's steps at batch 32 (one row per precision),
   and GradCache at a global batch of 1,024 in micro-batches of 32 in the default precision
   (``auto``), against the batch-32 row of the same precision. Timed with ``torch.cuda.synchronize``
   around every step; peak memory is ``torch.cuda.max_memory_allocated`` (on CPU, glibc's bytes in
   use, bench_train's ``PeakMemory``), also as what the steps added to the model already in memory.

Model: the symbolic encoder at the official size (12 layers, hidden 768, 12 heads, 512 patches;
random weights, as bench_train.py and bench_extract.py use) with LoRA (the trainer's defaults: r 8
on q/k/v; its B weights drawn at std 0.02 so every LoRA weight has a gradient); the text side is
fixed random features (the trainer's cached text features), the loss the normalised one (bounded,
so its value compares across precisions). Batches: random patch ids, lengths uniform in 16-512
patches, unbucketed. Exit status 0 when every check passes (GPU mode or CPU mode), 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fileio import REPO_ROOT, repo_path

if TYPE_CHECKING:  # --help answers before torch is imported; the functions import it
    import torch

# hidden size, layers (heads: hidden / 64, at least 2)
SIZES = {"official": (768, 12), "medium": (384, 6), "small": (128, 2), "tiny": (32, 2)}
PATCH_LENGTH = 512
# Settings per mode; a command-line value replaces the mode's.
MODE_DEFAULTS = {
    "gpu": {"size": "official", "batch": 32, "steps": 4, "precisions": "fp32,bf16,fp16", "check_batch": 32,
            "check_micro": 8, "global_batch": 1024, "micro_batch": 32, "gc_steps": 2, "pieces": 48},
    "cpu": {"size": "small", "batch": 8, "steps": 2, "precisions": "fp32", "check_batch": 8,
            "check_micro": 2, "global_batch": 32, "micro_batch": 8, "gc_steps": 1, "pieces": 16},
}
LOSS_TOLERANCE = 0.02  # each step's loss within 2% of fp32's (relative)
COSINE_LIMIT = 0.99  # features and LoRA gradient of the first batch against fp32's
EXTRACT_FP32_LIMIT = 1e-4  # max |GPU - CPU| of float32 global features
EXTRACT_COSINE_LIMIT = 0.999  # bf16/fp16 global features against the CPU's float32
# GradCache against plain autograd with the same masks: max |difference| / max |gradient|;
# the re-run's features: max |difference| / max |feature|.
GRAD_CACHE_LIMITS = {"fp32": 1e-4, "bf16": 1e-2, "fp16": 1e-2}
TESTS_TIMEOUT_S = 300


# ---------------------------------------------------------------------------------------- set-up
def sync(device: torch.device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def effective_precision(requested: str, device: torch.device) -> str:
    """The precision the trainer would run for ``requested`` on ``device``."""
    try:
        from training.precision import resolve_precision
    except ImportError:  # a trainer without the module: autocast on CUDA only
        if device.type != "cuda":
            return "fp32"
        return "bf16" if requested == "auto" else requested
    return resolve_precision(requested, device).name


def grad_scaler(precision: str, device: torch.device, **kwargs) -> torch.amp.GradScaler | None:
    import torch

    return torch.amp.GradScaler(device.type, **kwargs) if precision == "fp16" else None


def model_config(size: str):
    from bench_extract import TINY_TEXT, bert
    from modeling import ModelConfig

    hidden, layers = SIZES[size]
    return ModelConfig(symbolic=bert(hidden, layers, max(2, hidden // 64), PATCH_LENGTH), audio=bert(32, 1, 2, 128),
                       text=TINY_TEXT, projection_size=hidden)


def base_model(size: str):
    import torch
    from modeling import CLaMP3Model

    torch.manual_seed(0)
    return CLaMP3Model(model_config(size), attn_implementation="sdpa").eval()


def lora_model(size: str, dropout: float, device: torch.device):
    """(PEFT model, its core) on ``device``: the trainer's LoRA with LoRA dropout ``dropout``."""
    import lora
    import runconfig
    import torch

    trained = lora.add_adapter(base_model(size), runconfig.build_config(overrides={"LORA_DROPOUT": dropout}), "abc")
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in trained.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)
    trained.to(device)
    return trained, trained.get_base_model()


def synthetic_batch(count: int, patch_size: int, projection: int, seed: int, device: torch.device,
                    longest: int = PATCH_LENGTH) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """A collated music batch (random patch ids, lengths uniform in 16..``longest``, padded to its
    longest) and fixed text features ``[count, projection]``."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min(16, longest), longest + 1, (count,), generator=generator)
    width = int(lengths.max())
    mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
    patches = torch.randint(0, 128, (count, width, patch_size), generator=generator) * mask[..., None]
    text = torch.randn(count, projection, generator=generator)
    return {"patches": patches.to(device), "patch_mask": mask.to(device)}, text.to(device)


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def restore(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in state:
                p.copy_(state[name])
    model.zero_grad(set_to_none=True)


def flat_grad(model: torch.nn.Module, scale: float = 1.0) -> torch.Tensor:
    import torch

    return torch.cat([p.grad.detach().float().flatten().cpu() / scale
                      for _, p in model.named_parameters() if p.grad is not None])


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    import torch

    return float(torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0))


class Memory:
    """Peak memory of a block: CUDA's allocator counters, or bench_train's ``PeakMemory`` on CPU.
    ``peak_mib`` is the most allocated at once, ``added_mib`` that minus what was allocated before."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_mib = self.added_mib = None
        self._cpu = None

    def __enter__(self) -> Memory:
        import torch

        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._before = torch.cuda.memory_allocated(self.device)
        else:
            try:
                from bench_train import PeakMemory

                self._cpu = PeakMemory().__enter__()
            except OSError:  # no glibc: no CPU figure
                self._cpu = None
        return self

    def __exit__(self, *exc) -> None:
        import torch

        if self.device.type == "cuda":
            sync(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
            self.peak_mib, self.added_mib = peak / 2**20, (peak - self._before) / 2**20
        elif self._cpu is not None:
            self._cpu.__exit__(*exc)
            self.peak_mib, self.added_mib = self._cpu.peak / 2**20, self._cpu.added_mb


# ------------------------------------------------------------------------------------ the parts
class Steps:
    """The trainer's step on one model for one precision: ``contrastive_step`` with the trainer's
    music encoder, clipping at 1.0, fused AdamW at the trainer's learning rate, a GradScaler in fp16."""

    def __init__(self, trained, core, device: torch.device, precision: str, rows_per_pass: int):
        import runconfig
        from training.loss import ContrastiveLoss
        from training.model_setup import music_encoder
        from training.optimizer import build_optimizer

        self.trained, self.device, self.precision = trained, device, precision
        self.encode = music_encoder(core, device, precision, patch_budget=rows_per_pass * PATCH_LENGTH)
        self.loss_fn = ContrastiveLoss("normalized").to(device)
        self.optimizer = build_optimizer(trained, self.loss_fn, runconfig.build_config(), device)
        self.scaler = grad_scaler(precision, device)
        self.parameters = [p for p in trained.parameters() if p.requires_grad] + list(self.loss_fn.parameters())
        self.skipped = 0

    def __call__(self, batch, text, micro_batch: int = 0) -> float:
        import torch
        from training.loss import contrastive_step

        loss = contrastive_step(batch, self.encode, text, self.loss_fn, micro_batch=micro_batch, scaler=self.scaler)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.parameters, 1.0)
        if self.scaler is not None:
            scale = self.scaler.get_scale()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.skipped += self.scaler.get_scale() < scale  # an overflow: the step was skipped
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss


def timed_steps(step: Steps, batches, micro_batch: int = 0) -> dict[str, Any]:
    """One warm-up step, then the others timed one by one (synchronised on CUDA); peak memory over
    all of them."""
    losses, seconds = [], []
    with Memory(step.device) as memory:
        for batch, text in batches:
            sync(step.device)
            start = time.perf_counter()
            losses.append(step(batch, text, micro_batch))
            sync(step.device)
            seconds.append(time.perf_counter() - start)
    samples = sum(len(text) for _, text in batches[1:])
    return {"losses": losses, "step_seconds": seconds, "samples_per_s": samples / max(1e-9, sum(seconds[1:])),
            "seconds_per_sample": sum(seconds[1:]) / max(1, samples), "peak_memory_mib": memory.peak_mib,
            "added_memory_mib": memory.added_mib, "scaler_skipped_steps": step.skipped}


def first_batch_numbers(trained, core, device: torch.device, precision: str, batch, text) -> dict[str, Any]:
    """Features (no gradient) and the LoRA gradient of the first batch, from the initial weights.
    fp16 scales the loss by 1024 (a fixed GradScaler) and divides the gradient back."""
    import torch
    from training.loss import ContrastiveLoss, contrastive_step
    from training.model_setup import music_encoder

    encode = music_encoder(core, device, precision)
    with torch.no_grad():
        features = encode(batch).float().cpu()
    trained.zero_grad(set_to_none=True)
    scaler = grad_scaler(precision, device, init_scale=1024.0)
    contrastive_step(batch, encode, text, ContrastiveLoss("normalized").to(device), scaler=scaler)
    gradient = flat_grad(trained, 1024.0 if scaler is not None else 1.0)
    trained.zero_grad(set_to_none=True)
    return {"features": features, "gradient": gradient}


def precision_part(args, device: torch.device, rows: list[dict]) -> dict[str, dict]:
    """Part 2 (and the batch-32 bench rows): returns the per-precision results."""
    import torch

    trained, core = lora_model(args.size, 0.0, device)
    from training.model_setup import set_train_mode

    set_train_mode(core, text_frozen=True, symbolic_dropout=False)
    initial = trainable_state(trained)
    config = core.model_config
    batches = [synthetic_batch(args.batch, config.patch_size, config.projection_size, seed, device)
               for seed in range(args.steps + 1)]
    results: dict[str, dict] = {}
    for requested in args.precisions.split(","):
        precision = effective_precision(requested, device)
        restore(trained, initial)
        torch.manual_seed(0)
        first = first_batch_numbers(trained, core, device, precision, *batches[0])
        restore(trained, initial)
        torch.manual_seed(0)
        result = timed_steps(Steps(trained, core, device, precision, args.batch), batches)
        results[requested] = {"precision": precision, **result, **first}
    reference = results.get("fp32")
    for requested, result in results.items():
        finite = all(map(_finite, result["losses"])) and bool(torch.isfinite(result["gradient"]).all())
        values = {"requested": requested, "precision": result["precision"], "losses": result["losses"],
                  "scaler_skipped_steps": result["scaler_skipped_steps"]}
        status = finite
        text = (f"loss {result['losses'][0]:.4f} -> {result['losses'][-1]:.4f}"
                + (f", {result['scaler_skipped_steps']} step(s) skipped by the scaler" if result["scaler_skipped_steps"] else ""))
        limit = "finite"
        if reference is not None and requested != "fp32":
            loss_gap = max(abs(a - b) / max(1.0, abs(b)) for a, b in zip(result["losses"], reference["losses"], strict=True))
            feature_cos = min(cosine(a, b) for a, b in zip(result["features"], reference["features"], strict=True))
            grad_cos = cosine(result["gradient"], reference["gradient"])
            values.update(loss_gap_vs_fp32=loss_gap, feature_min_cosine_vs_fp32=feature_cos,
                          gradient_cosine_vs_fp32=grad_cos)
            status = status and loss_gap <= LOSS_TOLERANCE and feature_cos >= COSINE_LIMIT and grad_cos >= COSINE_LIMIT
            text += f"; vs fp32: loss {100 * loss_gap:.3f}%, features cos {feature_cos:.5f}, gradient cos {grad_cos:.5f}"
            limit = f"finite; loss <= {100 * LOSS_TOLERANCE:g}%, cos >= {COSINE_LIMIT}"
        case = requested if requested == result["precision"] else f"{requested} (runs {result['precision']})"
        rows.append(row("precision", case, text, limit, "PASS" if status else "FAIL", values))
        rows.append(row("bench", f"batch {args.batch}, {case}", bench_text(result), "", "INFO",
                        {k: result[k] for k in ("samples_per_s", "seconds_per_sample", "peak_memory_mib",
                                                "added_memory_mib", "step_seconds")}))
    del trained, core
    return results


def bench_text(result: dict) -> str:
    text = f"{result['samples_per_s']:.1f} samples/s"
    if result["peak_memory_mib"] is not None:
        text += f", peak {result['peak_memory_mib'] / 1024:.2f} GiB (+{result['added_memory_mib'] / 1024:.2f} GiB)"
    return text


def _finite(value: float) -> bool:
    return value == value and abs(value) != float("inf")


def grad_cache_part(args, device: torch.device, rows: list[dict]) -> None:
    """Part 3: GradCache's re-run with dropout drawn on ``device``."""
    import torch
    from training.loss import ContrastiveLoss, contrastive_step, split_batch
    from training.model_setup import music_encoder, set_train_mode

    trained, core = lora_model(args.size, 0.1, device)
    set_train_mode(core, text_frozen=True, symbolic_dropout=True)
    config = core.model_config
    batch, text = synthetic_batch(args.check_batch, config.patch_size, config.projection_size, 100, device)
    micro = args.check_micro
    wanted = device.type == "cuda" or "bf16" in args.precisions.split(",")
    precisions = ["fp32"] + ([effective_precision("bf16", device)] if wanted else [])
    for precision in dict.fromkeys(precisions):
        encode = music_encoder(core, device, precision)
        runs = []
        for seed, cached in ((123, True), (123, False), (321, False)):
            trained.zero_grad(set_to_none=True)
            loss_fn = ContrastiveLoss("normalized").to(device)
            torch.manual_seed(seed)
            if cached:
                loss = contrastive_step(batch, encode, text, loss_fn, micro_batch=micro)
            else:
                music = torch.cat([encode(chunk) for chunk in split_batch(batch, micro)])
                value = loss_fn(text, music)
                value.backward()
                loss = float(value.detach())
            runs.append((loss, flat_grad(trained)))
        trained.zero_grad(set_to_none=True)
        (cached_loss, cached), (loss, reference), (_, other) = runs
        scale = float(reference.abs().max())
        grad_gap = float((cached - reference).abs().max()) / scale
        control_gap = float((other - reference).abs().max()) / scale

        # One micro-batch without gradient, then again with gradient from the same RNG state.
        chunk = split_batch(batch, micro)[0]
        torch.manual_seed(7)
        state = (torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None)
        with torch.no_grad():
            first = encode(chunk).float()
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1], device)
        again = encode(chunk).detach().float()
        rerun_gap = float((first - again).abs().max()) / float(first.abs().max())
        with torch.no_grad():
            third = encode(chunk).float()  # the RNG moved on: other masks
        rerun_control = float((first - third).abs().max()) / float(first.abs().max())

        limit = GRAD_CACHE_LIMITS.get(precision, 1e-2)
        ok = (grad_gap <= limit and rerun_gap <= limit and control_gap > 10 * grad_gap and rerun_control > 10 * rerun_gap
              and _finite(cached_loss) and abs(cached_loss - loss) <= limit * max(1.0, abs(loss)))
        text_ = (f"gradient {grad_gap:.2e} (other seed {control_gap:.2e}); re-run features {rerun_gap:.2e} "
                 f"(other masks {rerun_control:.2e}); loss {cached_loss:.5f} vs {loss:.5f}")
        rows.append(row("gradcache", f"{precision}, batch {args.check_batch} / micro {micro}, dropout on", text_,
                        f"<= {limit:g} relative, control > 10x", "PASS" if ok else "FAIL",
                        {"precision": precision, "gradient_gap": grad_gap, "control_gradient_gap": control_gap,
                         "rerun_feature_gap": rerun_gap, "control_rerun_gap": rerun_control,
                         "grad_cache_loss": cached_loss, "reference_loss": loss}))
    del trained, core


def extraction_part(args, device: torch.device, rows: list[dict]) -> None:
    """Part 4: FeatureExtractor on ``device`` against the CPU's float32 (on CPU: one segment per
    batch against the batched path, and CPU bfloat16)."""
    import copy

    import numpy as np
    import torch
    from features import FeatureExtractor

    model = base_model(args.size)
    config = model.model_config
    generator = torch.Generator().manual_seed(5)
    lengths = torch.randint(16, 3 * PATCH_LENGTH, (args.pieces,), generator=generator).tolist()
    pieces = [torch.randint(0, 128, (n, config.patch_size), generator=generator) for n in lengths]
    reference_extractor = FeatureExtractor(model, device="cpu")
    start = time.perf_counter()
    reference = np.concatenate(reference_extractor.extract("symbolic", pieces))
    cpu_rate = len(pieces) / (time.perf_counter() - start)
    if device.type == "cuda":
        target, cases = copy.deepcopy(model).to(device), [("float32", {}), ("bfloat16", {}), ("float16", {})]
        name = "GPU"
    else:
        target, cases = model, [("float32", {"tokens_per_batch": 1}), ("bfloat16", {})]
        name = "CPU"
    segments = sum(-(-n // PATCH_LENGTH) for n in lengths)
    for dtype, options in cases:
        extractor = FeatureExtractor(target, device=device, dtype=dtype, **options)
        extractor.extract("symbolic", pieces[:2])  # warm-up
        sync(device)
        start = time.perf_counter()
        ours = np.concatenate(extractor.extract("symbolic", pieces))
        sync(device)
        rate = len(pieces) / (time.perf_counter() - start)
        gap = float(np.abs(ours - reference).max())
        cos = float(((ours * reference).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(reference, axis=1)).min())
        finite = bool(np.isfinite(ours).all())
        if dtype == "float32":
            ok, limit = finite and gap <= EXTRACT_FP32_LIMIT, f"max abs diff <= {EXTRACT_FP32_LIMIT:g}"
        else:
            ok, limit = finite and cos >= EXTRACT_COSINE_LIMIT, f"cos >= {EXTRACT_COSINE_LIMIT}"
        case = f"{name} {dtype}" + (" (one segment per batch)" if options else "") + " vs CPU float32"
        rows.append(row("extraction", case, f"max abs diff {gap:.2e}, min cos {cos:.6f}, {rate:.1f} pieces/s "
                        f"(CPU float32 {cpu_rate:.1f})", limit, "PASS" if ok else "FAIL",
                        {"dtype": dtype, "max_abs_diff": gap, "min_cosine": cos, "pieces_per_s": rate,
                         "cpu_float32_pieces_per_s": cpu_rate, "pieces": len(pieces), "segments": segments}))


def grad_cache_bench_part(args, device: torch.device, rows: list[dict], batch_rows: dict[str, dict]) -> None:
    """Part 5's GradCache row: a global batch of ``global_batch`` in micro-batches, the default
    precision, against the batch-``batch`` row of the same precision if there is one."""
    import torch
    from training.model_setup import set_train_mode

    requested = "auto"
    precision = effective_precision(requested, device)
    trained, core = lora_model(args.size, 0.0, device)
    set_train_mode(core, text_frozen=True, symbolic_dropout=False)
    config = core.model_config
    batches = [synthetic_batch(args.global_batch, config.patch_size, config.projection_size, 1000 + k, device)
               for k in range(args.gc_steps + 1)]
    torch.manual_seed(0)
    result = timed_steps(Steps(trained, core, device, precision, args.micro_batch), batches, args.micro_batch)
    finite = all(map(_finite, result["losses"]))
    values = {k: result[k] for k in ("samples_per_s", "seconds_per_sample", "peak_memory_mib", "added_memory_mib",
                                     "step_seconds", "losses")}
    text = bench_text(result)
    small = next((r for r in batch_rows.values() if r["precision"] == precision), None)
    if small is not None:
        values["seconds_per_sample_vs_batch"] = result["seconds_per_sample"] / small["seconds_per_sample"]
        text += f"; time/sample x{values['seconds_per_sample_vs_batch']:.2f} of batch {args.batch}"
        if result["peak_memory_mib"] is not None and small["added_memory_mib"]:
            values["added_memory_vs_batch"] = result["added_memory_mib"] / small["added_memory_mib"]
            text += f", added memory x{values['added_memory_vs_batch']:.2f}"
    rows.append(row("bench", f"GradCache {args.global_batch} / micro {args.micro_batch}, {precision}", text,
                    "finite loss", "PASS" if finite else "FAIL", values))
    del trained, core


def tests_part(rows: list[dict]) -> None:
    """Part 1: the gpu-marked tests in a subprocess."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "disabled"}
    command = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider"]
    start = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                              timeout=TESTS_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        rows.append(row("tests", "pytest -m gpu", f"timed out after {TESTS_TIMEOUT_S} s", "all pass", "FAIL", {}))
        return
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    summary = lines[-1].strip("= ") if lines else "(no output)"
    ok = done.returncode == 0 and "passed" in summary and "skipped" not in summary
    values = {"returncode": done.returncode, "summary": summary, "seconds": time.perf_counter() - start}
    if not ok:
        values["output_tail"] = (done.stdout + done.stderr)[-4000:]
    rows.append(row("tests", "pytest -m gpu", summary, "all pass, none skipped", "PASS" if ok else "FAIL", values))


# ---------------------------------------------------------------------------------- the report
def row(part: str, case: str, text: str, limit: str, status: str, values: dict) -> dict:
    return {"part": part, "case": case, "result": text, "limit": limit, "status": status, "values": values}


def table(rows: list[dict]) -> str:
    columns = ("part", "case", "result", "limit", "status")
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(r[c]).replace("|", "/") for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def choose_mode(cpu: bool, cuda_available: bool) -> tuple[str, str]:
    """("gpu" | "cpu", the line saying why)."""
    import torch

    if cpu:
        return "cpu", "CPU mode (--cpu): the parts a CPU can run"
    if not cuda_available:
        return "cpu", "no CUDA GPU here: running the CPU parts only (what --cpu runs)"
    return "gpu", f"GPU mode on {torch.cuda.get_device_name()}"


def machine(device: torch.device) -> dict[str, Any]:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(), "device": str(device)}
    if device.type == "cuda":
        info.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                    gpu_memory_gib=torch.cuda.get_device_properties(device).total_memory / 2**30,
                    bf16_supported=torch.cuda.is_bf16_supported(), matmul_tf32=torch.backends.cuda.matmul.allow_tf32)
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true", help="CPU mode (chosen anyway without CUDA)")
    parser.add_argument("--size", choices=sorted(SIZES), help="model size (GPU mode: official; CPU mode: small)")
    parser.add_argument("--batch", type=int, help="pieces per step of the precision part")
    parser.add_argument("--steps", type=int, help="timed steps per precision (after one warm-up)")
    parser.add_argument("--precisions", help="comma-separated: fp32,bf16,fp16 (CPU mode: fp32; bf16/fp16 run CPU autocast)")
    parser.add_argument("--check_batch", type=int, help="batch of the GradCache re-run check")
    parser.add_argument("--check_micro", type=int, help="micro-batch of the GradCache re-run check")
    parser.add_argument("--global_batch", type=int, help="global batch of the GradCache bench row")
    parser.add_argument("--micro_batch", type=int, help="micro-batch of the GradCache bench row")
    parser.add_argument("--gc_steps", type=int, help="timed steps of the GradCache bench row")
    parser.add_argument("--pieces", type=int, help="synthetic pieces for the extraction check")
    parser.add_argument("--parts", default="tests,precision,gradcache,extraction,bench",
                        help="comma-separated parts to run")
    parser.add_argument("--out", help="JSON report (default: results/gpu_check.json under the repository root)")
    args = parser.parse_args(argv)
    import torch  # after parsing: --help need not wait for it

    mode, reason = choose_mode(args.cpu, torch.cuda.is_available())
    for key, value in MODE_DEFAULTS[mode].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    device = torch.device("cuda" if mode == "gpu" else "cpu")
    parts = set(args.parts.split(","))
    print(reason, flush=True)
    settings = {key: getattr(args, key) for key in MODE_DEFAULTS[mode]}
    print("settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()), flush=True)

    started = time.perf_counter()
    rows: list[dict] = []
    batch_rows: dict[str, dict] = {}
    def tests() -> None:
        if mode == "gpu":
            tests_part(rows)
        else:
            rows.append(row("tests", "pytest -m gpu", "not run without a GPU", "", "SKIP", {}))

    steps = [("tests", tests),
             ("precision", lambda: batch_rows.update(precision_part(args, device, rows))),
             ("gradcache", lambda: grad_cache_part(args, device, rows)),
             ("extraction", lambda: extraction_part(args, device, rows)),
             ("bench", lambda: grad_cache_bench_part(args, device, rows, batch_rows))]
    for name, run in steps:
        if name not in parts:
            continue
        part_start = time.perf_counter()
        try:
            run()
        except Exception as exc:  # noqa: BLE001 - one part failing must not hide the others
            rows.append(row(name, "error", f"{type(exc).__name__}: {exc}"[:300], "", "FAIL", {}))
        print(f"[{name}] {time.perf_counter() - part_start:.1f} s", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()

    ok = all(r["status"] in ("PASS", "INFO", "SKIP") for r in rows)
    print()
    print(table(rows))
    print(f"\n{'all checks pass' if ok else 'SOME CHECKS FAIL'} ({time.perf_counter() - started:.0f} s)")
    report = {"mode": mode, "reason": reason, "machine": machine(device), "settings": settings,
              "limits": {"loss_relative": LOSS_TOLERANCE, "cosine_vs_fp32": COSINE_LIMIT,
                         "extract_fp32_abs": EXTRACT_FP32_LIMIT, "extract_cosine": EXTRACT_COSINE_LIMIT,
                         "grad_cache_relative": GRAD_CACHE_LIMITS},
              "rows": rows, "ok": ok, "seconds": time.perf_counter() - started}
    out = Path(args.out) if args.out else repo_path("results/gpu_check.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=float) + "\n", encoding="utf-8")
    print(f"report: {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
