"""Benchmark: training throughput and memory of the trainer's pieces against naive alternatives.

    python bench/bench_train.py [--steps N] [--batch B] [--rows a,b,c,d,data]

Every row trains the same model (medium: symbolic encoder of 6 layers, hidden 384; a small text
tower of 4 layers, hidden 256) on the same data (music21-corpus MusicXML scores converted to
interleaved ABC by this repository, as ``bench_extract.py`` uses, with synthetic captions), with the
same thread count, each in a fresh process so that memory figures do not mix:

(a) **this trainer**: LoRA (r 8 on q/k/v), cached text features, length-bucketed batches padded to
    their longest piece, gathered patch embedding, fused attention, frozen feed-forward blocks that
    keep only their input for backward (``training.frozen_ops``);
(b) **naive loop**: the same LoRA, but the text tower runs every step, every batch is padded to
    512 patches, and the official arithmetic (one-hot patch embedding, eager attention, plain
    autograd through the frozen feed-forward blocks);
(c) **full fine-tuning** of the symbolic encoder and projection (otherwise as (a));
(d) **GradCache**: as (a), with a batch of 8 micro-batches of B (the last one encoded once, its
    graph kept), against (a) at batch B on the same pieces (row ``a_micro``: each of d's batches
    cut into its 8 micro-batches, one step each, for its memory; for the time ratio, row d also
    times those steps in its own process, passes alternating with its own);
data: the data pipeline alone (records -> collated batches, no model), one worker.

A step is the trainer's: ``training.loss.contrastive_step`` (forward, loss, backward, with the
trainer's ``music_encoder``), gradient clipping and an AdamW step. Timings: ``--steps`` steps
after one warm-up step, each step's fastest time over ``--repeats`` passes over the same batches,
summed, with nothing else running in the process. Peak memory, measured in a pass of its own (warm-up and the same
steps), is the most memory allocated at once (glibc's count of bytes in use, sampled by a thread),
minus what was allocated just before the first step (model, data and text cache already in
memory): what training adds. Useful GFLOP/s
counts the symbolic encoder's work on real (unpadded) patches: forward, plus the backward's
gradients with respect to activations (the frozen base needs no weight gradients; the LoRA and
projection terms are negligible), compared with this machine's dense float32 matmul rate,
measured in the row's own process right before and after its timed passes, the higher rate
kept (``of_matmul_rate``).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import platform
import random
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from fileio import REPO_ROOT, DropLog, write_jsonl

if TYPE_CHECKING:  # --help answers before torch is imported; the functions import it
    import torch

BENCH_DIR = REPO_ROOT / "data" / "bench" / "train"
WORDS = [f"tok{i}" for i in range(996)]
TEXT_TOWER = {"vocab_size": 1000, "hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4,
              "intermediate_size": 1024, "max_position_embeddings": 514, "type_vocab_size": 1,
              "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2}


def medium_model():
    import torch
    from bench_extract import bert
    from modeling import CLaMP3Model, ModelConfig

    config = ModelConfig(symbolic=bert(384, 6, 6, 512), audio=bert(32, 1, 2, 128), text=TEXT_TOWER,
                         projection_size=384)
    torch.manual_seed(0)
    return CLaMP3Model(config, attn_implementation="sdpa").eval()


def tokenizer_folder() -> Path:
    """An offline word-level tokenizer over ``WORDS`` with XLM-R's special ids (0-3)."""
    folder = BENCH_DIR / "tokenizer"
    if (folder / "tokenizer.json").is_file():
        return folder
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(specials + WORDS)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", sep_token="</s>",
                            cls_token="<s>", pad_token="<pad>", unk_token="<unk>").save_pretrained(folder)
    return folder


def corpus_records(count: int) -> Path:
    """Training records over ``count`` corpus scores, each with three seeded random captions."""
    jsonl = BENCH_DIR / f"records_{count}.jsonl"
    if jsonl.is_file():
        return jsonl
    from bench_extract import corpus_pieces

    rng = random.Random(0)
    rows = []
    for i, piece in enumerate(corpus_pieces(count)):
        path = BENCH_DIR / "music" / f"{i:04d}.abc"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(piece, encoding="utf-8")
        rows.append({"id": f"piece{i}", "filepaths": [f"music/{path.name}"],
                     **{field: " ".join(rng.choices(WORDS, k=rng.randint(4, 16)))
                        for field in ("title", "description", "genres")}})
    write_jsonl(jsonl, rows)
    return jsonl


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


class PeakMemory:
    """Peak of the bytes allocated and not yet freed (glibc's ``mallinfo2``: heap in use plus
    mmapped blocks), sampled every 2 ms by a thread. Unlike resident memory, it falls when a
    tensor is freed, so it shows what training holds at once (CPU has no allocator counters)."""

    def __init__(self) -> None:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
        self._mallinfo = libc.mallinfo2
        self.baseline = self.peak = self.current()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def current(self) -> int:
        info = self._mallinfo()
        return info.uordblks + info.hblkhd

    def _watch(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self.current())

    def __enter__(self) -> PeakMemory:
        self.baseline = self.peak = self.current()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.current())

    @property
    def added_mb(self) -> float:
        return (self.peak - self.baseline) / 2**20


def symbolic_flops(model, masks: list[torch.Tensor], backward: bool) -> float:
    from bench_extract import useful_flops

    lengths = [int(n) for mask in masks for n in mask.sum(dim=1)]
    return useful_flops(model, lengths) * (2.0 if backward else 1.0)


def write_profile(path: str, work) -> None:
    """``work()`` under the CPU profiler: ops by self time, then by input shapes, to ``path``."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        work()
    averages = prof.key_averages()
    Path(path).write_text(averages.table(sort_by="self_cpu_time_total", row_limit=80, max_name_column_width=60)
                          + "\n\n" + prof.key_averages(group_by_input_shape=True).table(
                              sort_by="self_cpu_time_total", row_limit=120, max_name_column_width=60,
                              max_shapes_column_width=90))


def run_row(row: str, steps: int, batch: int, records_count: int, symbolic_dropout: bool, repeats: int,
            profile: str | None = None) -> dict:
    """One benchmark row, in this process; with ``profile``, one more pass over the timed steps
    afterwards under ``torch.profiler`` (not timed), its op table written to that file."""
    import lora
    import runconfig
    import torch
    from bench_extract import matmul_gflops
    from patchilizer import M3Patchilizer
    from training import data
    from training.loss import ContrastiveLoss, contrastive_step, split_batch
    from training.model_setup import music_encoder, set_train_mode
    from training.optimizer import build_optimizer
    from training.text import LiveText
    from training.text_cache import TextFeatureCache, fingerprint
    from transformers import AutoTokenizer

    torch.manual_seed(0)
    model = medium_model()
    patchilizer = M3Patchilizer(64, 512)
    records = data.load_records(corpus_records(records_count), "abc", patchilizer, DropLog("bench"), progress=False)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder())
    micro = 0
    global_batch = batch
    if row in ("d", "a_micro"):  # the same pieces: d in batches of 8 micro-batches, a_micro one by one
        global_batch, micro = 8 * batch, batch if row == "d" else 0
    naive = row == "b"

    if row == "data":
        plan = data.plan_epoch(records, batch, 0, 0)
        dataset = data.BatchDataset(records, plan, patchilizer, text=LiveText(tokenizer, 128), seed=0, epoch=0)
        start = time.perf_counter()
        count = sum(len(dataset[k]["record_index"]) for k in range(len(dataset)))
        return {"row": row, "samples_per_s": count / (time.perf_counter() - start), "samples": count}

    if row == "c":
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(name.startswith(("symbolic_model", "symbolic_proj")) and ".pooler." not in name)
        trained, core = model, model
    else:
        trained = lora.add_adapter(model, runconfig.build_config(overrides={"LORA_DROPOUT": 0.0}), "abc")
        core = trained.get_base_model()
    if naive:
        core.symbolic_model.use_one_hot = True
        for module in core.symbolic_model.modules():
            if hasattr(module, "config") and hasattr(module.config, "_attn_implementation"):
                module.config._attn_implementation = "eager"

    if naive:
        text = LiveText(tokenizer, 128)
    else:
        started = time.perf_counter()
        with torch.no_grad():
            text = TextFeatureCache.build(
                BENCH_DIR / "text_cache", records, tokenizer,
                lambda ids, mask: core.features("text", ids, mask).float(), fingerprint(core.text_model, core.text_proj),
                max_text_length=128, variants=1, seed=0, progress=False)
        cache_seconds = time.perf_counter() - started
    plan = data.plan_epoch(records, global_batch, 0, 0, bucketing=not naive)
    dataset = data.BatchDataset(records, plan, patchilizer, text=text, seed=0, epoch=0, pad_to_longest=not naive)
    batches = [dataset[k] for k in range(min(len(dataset), steps + 1))]
    if len(batches) < steps + 1:
        raise SystemExit(f"only {len(batches)} batches of {global_batch}: use more --records")
    if row == "a_micro":
        batches = [part for b in batches for part in split_batch(b, batch)]
        batches = batches[: 1 + steps * 8]

    loss_fn = ContrastiveLoss("clamp3")
    parameters = [p for p in trained.parameters() if p.requires_grad]
    optimizer = build_optimizer(trained, loss_fn, runconfig.build_config(), torch.device("cpu"))
    set_train_mode(core, text_frozen=True, symbolic_dropout=symbolic_dropout)

    # The trainer's budget: the rows of one encoding with gradient (d's micro-batch) × patch length.
    encode_music = music_encoder(core, torch.device("cpu"), "fp32", frozen_feed_forward=not naive,
                                 patch_budget=batch * patchilizer.patch_length)

    def step(b, micro_batch: int = micro):
        if naive:
            with torch.no_grad():
                side = core.features("text", b["text_ids"], b["text_mask"]).float()
        else:
            side = text.features(b["text_rows"])
        loss = contrastive_step(b, encode_music, side, loss_fn, micro_batch=micro_batch)
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    # Memory and time in separate passes: the sampling thread wakes every 2 ms on a machine with
    # as many cores as compute threads, and slowed the steps it watched by 8-15% (measured).
    with PeakMemory() as memory:
        step(batches[0])  # warm-up (allocates the optimizer state, which counts as memory)
        for b in batches[1:]:
            step(b)
    # The reference rate right before the timed passes, in the same process: on a shared machine
    # the rate drifts by 10% over minutes, and the efficiency is a ratio of the two.
    reference = matmul_gflops(seconds=2.0)
    # Row d also times (a′) on exactly its timed pieces, each of its batches cut into its
    # micro-batches, one step each, in passes alternating with d's: the ratio of the two then
    # compares them at the same machine speed (between rows, in separate processes minutes
    # apart, the reference rate moved by 3% and more).
    paired = [part for b in batches[1:] for part in split_batch(b, batch)] if row == "d" else []
    if paired:
        step(split_batch(batches[0], batch)[0], 0)  # its warm-up
    # The machine is shared: each step's fastest time over ``repeats`` passes over the same
    # batches, summed (a slow spell then costs one pass's step, not the whole pass).
    fastest = [float("inf")] * (len(batches) - 1)
    fastest_paired = [float("inf")] * len(paired)
    for _ in range(repeats):
        for k, b in enumerate(batches[1:]):
            start = time.perf_counter()
            step(b)
            fastest[k] = min(fastest[k], time.perf_counter() - start)
        for k, b in enumerate(paired):
            start = time.perf_counter()
            step(b, 0)
            fastest_paired[k] = min(fastest_paired[k], time.perf_counter() - start)
    seconds = sum(fastest)
    # The reference again after the passes, the higher of the two kept: the conservative ratio.
    reference = max(reference, matmul_gflops(seconds=2.0))
    if profile:
        write_profile(profile, lambda: [step(b) for b in batches[1:]])
    samples = sum(len(b["record_index"]) for b in batches[1:])
    flops = symbolic_flops(core, [b["patch_mask"] for b in batches[1:]], backward=True)
    if row == "c":
        flops *= 1.5  # weight gradients too: forward + activation and weight gradients = 3x forward
    padded = sum(b["patch_mask"].numel() for b in batches[1:])
    real = sum(int(b["patch_mask"].sum()) for b in batches[1:])
    result = {"row": row, "symbolic_dropout": symbolic_dropout, "batch": batch if row == "a_micro" else global_batch,
              "micro_batch": micro, "steps": len(batches) - 1,
              "samples_per_s": samples / seconds, "seconds_per_sample": seconds / samples,
              "peak_memory_mb": memory.added_mb, "useful_gflops": flops / seconds / 1e9,
              "padding_ratio": padded / real, "trainable": sum(p.numel() for p in parameters),
              "matmul_gflops": reference, "of_matmul_rate": flops / seconds / 1e9 / reference}
    if not naive:
        result["text_cache_seconds"] = cache_seconds
    if paired:
        result["paired_a_micro_seconds_per_sample"] = sum(fastest_paired) / sum(len(b["record_index"]) for b in paired)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="a,b,c,d,a_micro,data",
                        help="comma-separated rows: a,b,c,d,a_micro (a on d's pieces, batch = d's micro-batch),data")
    parser.add_argument("--steps", type=int, default=4,
                        help="timed steps per row (after one warm-up); row d needs 64 x (steps + 1) records")
    parser.add_argument("--batch", type=int, default=8, help="pieces per step (per micro-batch for d)")
    parser.add_argument("--records", type=int, default=400, help="corpus scores to train on (converted once)")
    parser.add_argument("--repeats", type=int, default=2, help="timed passes over the steps; each step's fastest time counts")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--no_symbolic_dropout", action="store_true",
                        help="every row with SYMBOLIC_DROPOUT=False (fused attention on CPU)")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    parser.add_argument("--profile", help="after timing, profile one more pass of each row (torch.profiler) and "
                        "write its op tables to PROFILE.<row>.txt")
    parser.add_argument("--row", help=argparse.SUPPRESS)  # the child process of one row
    args = parser.parse_args(argv)
    import torch  # after parsing: --help need not wait for it

    if args.threads is None:
        args.threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    if args.row:
        print(json.dumps(run_row(args.row, args.steps, args.batch, args.records, not args.no_symbolic_dropout,
                                 args.repeats, args.profile and f"{args.profile}.{args.row}.txt")))
        return 0

    from bench_extract import matmul_gflops

    corpus_records(args.records)
    tokenizer_folder()
    rate = matmul_gflops()
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{args.threads} threads; dense float32 matmul {rate:.1f} GFLOP/s", flush=True)
    rows = {}
    for row in args.rows.split(","):
        command = [sys.executable, __file__, "--row", row, "--steps", str(args.steps), "--batch", str(args.batch),
                   "--records", str(args.records), "--threads", str(args.threads), "--repeats", str(args.repeats)]
        command += ["--no_symbolic_dropout"] if args.no_symbolic_dropout else []
        command += ["--profile", args.profile] if args.profile else []
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode:
            print(done.stderr[-3000:], file=sys.stderr)
            return 1
        rows[row] = json.loads(done.stdout.strip().splitlines()[-1])
        print(json.dumps(rows[row]), flush=True)
    summary = {}
    if {"a", "b"} <= rows.keys():
        summary["a_over_b_samples_per_s"] = rows["a"]["samples_per_s"] / rows["b"]["samples_per_s"]
    if {"a", "c"} <= rows.keys():
        summary["a_over_c_peak_memory"] = rows["a"]["peak_memory_mb"] / rows["c"]["peak_memory_mb"]
    if {"a_micro", "d"} <= rows.keys():
        summary["d_over_a_peak_memory"] = rows["d"]["peak_memory_mb"] / rows["a_micro"]["peak_memory_mb"]
        summary["d_over_a_seconds_per_sample"] = (rows["d"]["seconds_per_sample"]
                                                  / rows["a_micro"]["seconds_per_sample"])
    if "d" in rows:  # (a′) timed in d's process, alternating with d on the same pieces
        summary["d_over_a_seconds_per_sample_paired"] = (rows["d"]["seconds_per_sample"]
                                                         / rows["d"]["paired_a_micro_seconds_per_sample"])
    if "a" in rows:
        summary["a_efficiency"] = rows["a"]["of_matmul_rate"]  # against the rate measured beside it
    print(json.dumps(summary, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps({"matmul_gflops": rate, "rows": rows, "summary": summary}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
