"""Benchmark: the trainer's start-up at PDMX scale, from the launch to the first training step.

    python bench/bench_startup.py [--records 10000,100000] [--kib 16] [--processes 1,2] [--json FILE]

A synthetic MTF corpus (``data/bench/startup/``, built once and reused): every file is real MIDI
text (the official fixtures' MTF messages, windows of them in a seeded order, transposed per file
so every file differs) of ``--kib`` KiB, one file per record, three seeded captions per record.
Each row launches the real trainer (``code/train_clamp3_lora.py`` under ``torchrun``, gloo, CPU)
on the tiny fixture model (so the model is not the cost), ``NUM_WORKERS`` 2 per rank, the
validation records held out (``VALID_FRACTION``), and stops it at the end of its first
optimizer step. Each (records, processes) pair runs twice: *cold* (new run folder, new text cache)
and *warm* (the same run folder and text cache again, as ``--resume`` or a restart finds them).

Columns: ``load`` is ``data.load_records`` (JSONL parse + file check) and ``check`` the file check
in it; records/s per process = records / load / processes; ``text cache`` is
``TextFeatureCache.build`` (training and validation caches, variants drawn and features computed);
``first step`` the time from the launch (``torchrun`` start, imports included) to the end of the
first step. Peak RSS: rank 0's process (``ru_maxrss``) and its largest child (a file-check worker).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from fileio import REPO_ROOT, write_jsonl

BENCH_DIR = REPO_ROOT / "data" / "bench" / "startup"
OFFICIAL = Path(os.environ.get("CLAMP3_SHARED_DIR", REPO_ROOT.parent / "shared")).resolve() / "fixtures" / "official"
TINY_WEIGHTS = OFFICIAL / "model" / "tiny_clamp3.pth"
TINY_MODEL_CONFIG = OFFICIAL / "model" / "tiny_model_config.json"
SCRIPT = REPO_ROOT / "code" / "train_clamp3_lora.py"
FILES_PER_FOLDER = 1000


# ----------------------------------------------------------------------------- corpus


def _mtf_sources() -> list[tuple[list[str], list[str]]]:
    """``(header lines, message lines)`` of every official fixture MTF file with notes."""
    sources = []
    for path in sorted((OFFICIAL / "outputs" / "mtf").glob("*.mtf")):
        lines = path.read_text(encoding="utf-8").splitlines()
        first_note = next((i for i, line in enumerate(lines) if line.startswith("note_on")), None)
        if first_note is None or len(lines) - first_note < 64:
            continue
        sources.append((lines[:first_note], lines[first_note:]))
    if not sources:
        raise SystemExit(f"no fixture MTF files under {OFFICIAL / 'outputs' / 'mtf'} (set CLAMP3_SHARED_DIR)")
    return sources


def _transpose(line: str, shift: int) -> str:
    parts = line.split(" ")
    if parts[0] in ("note_on", "note_off") and len(parts) == 5:
        parts[3] = str(min(127, max(0, int(parts[3]) + shift)))
    return " ".join(parts)


def synthetic_mtf(number: int, kib: float, sources: list[tuple[list[str], list[str]]]) -> str:
    """About ``kib`` KiB of MTF: a fixture's header, then windows of fixture messages, transposed."""
    rng = random.Random(number)
    header, _ = sources[rng.randrange(len(sources))]
    shift = rng.randint(-6, 6)
    lines = list(header)
    size = sum(len(line) + 1 for line in lines)
    while size < kib * 1024:
        _, body = sources[rng.randrange(len(sources))]
        start = rng.randrange(0, len(body) - 32)
        for line in body[start : start + rng.randint(32, 512)]:
            line = _transpose(line, shift)
            lines.append(line)
            size += len(line) + 1
    return "\n".join(lines) + "\n"


def corpus(records: int, kib: float) -> Path:
    """``records_<n>.jsonl`` of a corpus of ``kib`` KiB files (the files shared by every count)."""
    root = BENCH_DIR / f"mtf_{kib:g}kib"
    jsonl = root / f"records_{records}.jsonl"
    if jsonl.is_file():
        return jsonl
    from bench_train import WORDS

    sources = _mtf_sources()
    rows = []
    for i in range(records):
        relative = f"music/{i // FILES_PER_FOLDER:04d}/{i:07d}.mtf"
        path = root / relative
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(synthetic_mtf(i, kib, sources), encoding="utf-8")
        rng = random.Random(f"caption {i}")
        title = " ".join(WORDS[(i // len(WORDS) ** k) % len(WORDS)] for k in range(3))
        rows.append({"id": f"piece{i}", "filepaths": [relative], "title": title,
                     "genres": [" ".join(rng.choices(WORDS, k=2))],
                     "description": " ".join(rng.choices(WORDS, k=rng.randint(12, 40)))})
    write_jsonl(jsonl, rows)
    return jsonl


# ----------------------------------------------------------------------------- one launch


def worker(out: Path, trainer_args: list[str]) -> int:
    """Inside ``torchrun``: the trainer with timers around loading, text cache and its first step,
    ended after that step (every rank writes ``out.<rank>.json``)."""
    times: dict[str, object] = {"start": time.time()}
    import train_clamp3_lora
    from training import data, loop, text_cache

    def timed(name, function):
        def wrapper(*args, **kwargs):
            started = time.time()
            result = function(*args, **kwargs)
            times.setdefault(name, []).append(time.time() - started)
            return result
        return wrapper

    data.load_records = timed("load", data.load_records)
    data._check_music_files = timed("check", data._check_music_files)
    build = text_cache.TextFeatureCache.build.__func__
    text_cache.TextFeatureCache.build = classmethod(timed("text_cache", build))
    step = loop.contrastive_step

    def first_step(*args, **kwargs):
        step(*args, **kwargs)
        times["first_step_end"] = time.time()
        own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        times.update(peak_rss_mb=own, peak_child_rss_mb=children)
        rank = os.environ.get("RANK", "0")
        Path(f"{out}.{rank}.json").write_text(json.dumps(times))
        raise SystemExit(0)  # every rank ends after its first step (distributed_session: clean exit)

    loop.contrastive_step = first_step
    return train_clamp3_lora.main(trainer_args)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(jsonl: Path, processes: int, run: Path, tokenizer: Path, batch: int) -> dict:
    settings = {"LORA_MTF_TRAIN_JSONL": str(jsonl), "LORA_MTF_VALID_JSONL": "", "VALID_FRACTION": 0.01,
                "TEXT_MODEL_NAME": str(tokenizer), "LORA_LOG_DIR": str(run / "run"),
                "LORA_MTF_ADAPTER_DIR": str(run / "adapter"), "TEXT_CACHE_DIR": str(run / "text_cache"),
                "LORA_BATCH_SIZE": batch, "LORA_NUM_EPOCHS": 1, "NUM_WORKERS": 2, "TRAIN_DEVICE": "cpu"}
    trainer_args = ["--format", "mtf", "--weights", str(TINY_WEIGHTS), "--model_config", str(TINY_MODEL_CONFIG),
                    "--quiet", *(f"--{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in settings.items())]
    out = run / f"times-{time.time_ns()}"
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
               "--master_addr=127.0.0.1", f"--master_port={free_port()}", __file__, "--worker", str(out), "--",
               *trainer_args]
    started = time.time()
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          check=False)
    if done.returncode != 0:
        raise SystemExit(f"trainer failed ({done.returncode}):\n{done.stderr[-4000:]}")
    ranks = [json.loads(Path(f"{out}.{r}.json").read_text()) for r in range(processes)]
    main = ranks[0]
    log = (run / "run" / "MTF_training.log").read_text().splitlines()
    loaded = [line for line in log if "records loaded in" in line][-1]
    return {"load_s": sum(main["load"]), "check_s": sum(main["check"]), "text_cache_s": sum(main["text_cache"]),
            "first_step_s": max(r["first_step_end"] for r in ranks) - started,
            "peak_rss_mb": main["peak_rss_mb"], "peak_child_rss_mb": main["peak_child_rss_mb"],
            "rank_load_s": [round(sum(r["load"]), 2) for r in ranks], "log": loaded.split("] ", 1)[-1]}


# ----------------------------------------------------------------------------- table


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--worker"]:
        out, rest = argv[1], argv[2:]
        return worker(Path(out), rest[1:] if rest[:1] == ["--"] else rest)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Example: python bench/bench_startup.py --records 10000,100000 --kib 16")
    parser.add_argument("--records", default="10000,100000", help="record counts, comma-separated (default %(default)s)")
    parser.add_argument("--kib", type=float, default=150.0,
                        help="size of each MTF file in KiB (default %(default)s, MidiCaps-like; PDMX ABC: a few to tens)")
    parser.add_argument("--processes", default="1,2", help="torchrun process counts (default %(default)s)")
    parser.add_argument("--batch", type=int, default=8, help="LORA_BATCH_SIZE per process (default %(default)s)")
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON here "
                        "(default: data/bench/startup/results_<kib>kib.json)")
    parser.add_argument("--keep", action="store_true", help="keep the run folders (default: deleted after each row)")
    args = parser.parse_args(argv)
    from bench_train import tokenizer_folder

    tokenizer = tokenizer_folder()
    rows = []
    header = (f"{'records':>8} {'procs':>5} {'cache':>5} {'load s':>7} {'check s':>7} {'rec/s/proc':>10} "
              f"{'text cache s':>12} {'first step s':>12} {'RSS MB':>7} {'worker MB':>9}")
    print(header, flush=True)
    for records in (int(n) for n in args.records.split(",")):
        started = time.time()
        jsonl = corpus(records, args.kib)
        print(f"corpus: {records:,} records of {args.kib:g} KiB MTF at {jsonl.parent} "
              f"({time.time() - started:.0f} s to build or find)", flush=True)
        for processes in (int(n) for n in args.processes.split(",")):
            run = BENCH_DIR / "runs" / f"{args.kib:g}kib-{records}-{processes}"
            shutil.rmtree(run, ignore_errors=True)
            for cache in ("cold", "warm"):
                row = {"records": records, "kib": args.kib, "processes": processes, "cache": cache,
                       **launch(jsonl, processes, run, tokenizer, args.batch)}
                row["records_per_s_per_process"] = records / row["load_s"] / processes
                rows.append(row)
                print(f"{records:>8,} {processes:>5} {cache:>5} {row['load_s']:>7.1f} {row['check_s']:>7.1f} "
                      f"{row['records_per_s_per_process']:>10,.0f} {row['text_cache_s']:>12.1f} "
                      f"{row['first_step_s']:>12.1f} {row['peak_rss_mb']:>7.0f} {row['peak_child_rss_mb']:>9.0f}",
                      flush=True)
            if not args.keep:
                shutil.rmtree(run, ignore_errors=True)
    path = Path(args.json) if args.json else BENCH_DIR / f"results_{args.kib:g}kib.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": platform.platform(), "cpus": os.cpu_count(), "rows": rows}, indent=2))
    print(f"rows written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
