"""Benchmark: the persistent search index (code/search_index.py) at 10k, 100k and 1M vectors.

    python bench/bench_search.py [--sizes 10000 100000 1000000] [--dim 768] [--threads 2]

For each size N: seeded random unit vectors (D = 768) stand for N indexed files. The index is built
through the real API (``SearchIndex.update`` with file facts and an embed callable) up to
``--api_max`` files, and above it with the documented bulk builder ``SearchIndex.build`` (the same
files on disk, without planning a million files one by one). Then, each step in a fresh process so
that memory figures do not mix:

- *build*: seconds to write the index (embedding excluded: the vectors already exist);
- *update*: ``SearchIndex.update`` after 1% of the files changed, 0.1% were removed and 0.1% added
  (planning every file by size and mtime, embedding only the changed and new ones, and rewriting
  the vectors file);
- *open*: ``SearchIndex.open`` (the vectors are memory-mapped) and the first query (which pages the
  vectors in; from the page cache here, as the files were just written);
- *query*: latency of ``search`` (k = 10, dedupe on: the path the search command uses), median and
  p95 of ``--repeats`` single queries and of ``--repeats`` batches of ``--batch`` queries;
- *peak RSS*: the search process's high-water mark (VmHWM) after the queries, mapped vectors
  included.

Every size checks ``--check`` queries (one of them an indexed vector) against a float64 brute force
over all rows: each hit's score within 1e-5 of the float64 score at its rank and of its own float64
score, and the same files in the same order except where float64 scores lie within 1e-5 of each
other. The script prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# search_index (and torch) are imported by the steps and main, after the arguments: --help answers at once.
TOLERANCE = 1e-5


def fake_sha(i: int, salt: int = 0) -> str:
    return f"{salt:08x}{i:056x}"


def random_units(n: int, dim: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 65536):  # in blocks: no float64 copy of a 3 GB matrix
        block = rng.standard_normal((min(65536, n - start), dim), dtype=np.float32)
        out[start:start + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def path_of(i: int) -> str:
    return f"set{i // 1000:04d}/piece{i:07d}.abc"


def vm_hwm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def step_build(folder: Path, n: int, dim: int, seed: int, api_max: int) -> dict:
    from search_index import FileFacts, SearchIndex

    vectors = random_units(n, dim, seed)
    start = time.perf_counter()
    if n <= api_max:
        facts = {path_of(i): FileFacts(1000 + i % 7, 1, fake_sha(i)) for i in range(n)}
        rows = {path_of(i): i for i in range(n)}
        index = SearchIndex.open(folder, "bench-model", root="/synthetic")
        summary = index.update(facts, lambda paths: {p: (fake_sha(rows[p]), vectors[rows[p]], "abc") for p in paths})
        assert len(summary.added) == n and summary.written
        how = "update()"
    else:
        files = [{"path": path_of(i), "sha256": fake_sha(i), "size": 1000 + i % 7, "mtime_ns": 1, "kind": "abc"}
                 for i in range(n)]
        SearchIndex.build(folder, "bench-model", "/synthetic", files, vectors)
        how = "build()"
    return {"build_s": time.perf_counter() - start, "build_how": how, "build_hwm": vm_hwm_bytes()}


def step_update(folder: Path, n: int, dim: int, seed: int) -> dict:
    """1% changed (new content), 0.1% removed, 0.1% added; everything else unchanged by size+mtime."""
    from search_index import FileFacts, SearchIndex

    rng = np.random.default_rng(seed + 1)
    changed = set(rng.choice(n, size=max(1, n // 100), replace=False).tolist())
    removed = set(rng.choice(n, size=max(1, n // 1000), replace=False).tolist()) - changed
    n_added = max(1, n // 1000)
    facts: dict[str, FileFacts] = {}
    for i in range(n):
        if i in removed:
            continue
        facts[path_of(i)] = FileFacts(1000 + i % 7, 2 if i in changed else 1, fake_sha(i, 1 if i in changed else 0))
    for j in range(n_added):
        facts[f"added/piece{j:07d}.abc"] = FileFacts(5, 1, fake_sha(j, 2))
    fresh = random_units(len(changed) + n_added, dim, seed + 2)
    calls = []

    def embed(paths: list[str]) -> dict:
        calls.extend(paths)
        return {p: (facts[p].digest(), fresh[k], "abc") for k, p in enumerate(paths)}

    start = time.perf_counter()
    index = SearchIndex.open(folder, "bench-model")
    opened = time.perf_counter() - start
    summary = index.update(facts, embed)
    seconds = time.perf_counter() - start
    assert len(calls) == len(changed) + n_added and len(summary.removed) == len(removed), summary.line()
    return {"update_s": seconds, "update_open_s": opened, "update_line": summary.line()}


def timed(function, repeats: int) -> tuple[float, float]:
    function()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return float(np.median(times)), float(np.percentile(times, 95))


def step_search(folder: Path, n: int, dim: int, seed: int, repeats: int, batch: int, k: int,
                n_check: int, chunk_rows: int) -> dict:
    from search_index import SearchIndex

    start = time.perf_counter()
    index = SearchIndex.open(folder, "bench-model")
    open_s = time.perf_counter() - start
    rng = np.random.default_rng(seed + 3)
    queries = rng.standard_normal((repeats + 1, dim)).astype(np.float32)
    start = time.perf_counter()
    index.search(queries[0], k=k, chunk_rows=chunk_rows)
    first_s = time.perf_counter() - start
    counter = iter(range(10 ** 9))
    single = timed(lambda: index.search(queries[next(counter) % len(queries)], k=k, chunk_rows=chunk_rows), repeats)
    batches = rng.standard_normal((batch, dim)).astype(np.float32)
    batched = timed(lambda: index.search(batches, k=k, chunk_rows=chunk_rows), repeats)
    hwm = vm_hwm_bytes()

    # Correctness against float64 brute force (after the timings: its float64 blocks are not counted).
    check = np.concatenate([rng.standard_normal((n_check - 1, dim)).astype(np.float32),
                            np.array(index.vector(path_of(n // 2)))[None]])
    hits = index.search(check, k=k, chunk_rows=chunk_rows)
    matrix = index._vectors
    rows = {e.path: e.row for e in index.entries}
    paths_by_row = {e.row: e.path for e in index.entries}
    exact_order = 0
    for q, query_hits in zip(check.astype(np.float64), hits, strict=True):
        q = q / np.linalg.norm(q)
        scores = np.empty(matrix.shape[0])
        for s in range(0, matrix.shape[0], 65536):
            scores[s:s + 65536] = np.asarray(matrix[s:s + 65536], dtype=np.float64) @ q
        order = sorted(np.argsort(-scores, kind="stable")[:k + 10].tolist(),
                       key=lambda r: (-scores[r], paths_by_row[r]))[:k]
        assert len(query_hits) == min(k, len(scores))
        for rank, hit in enumerate(query_hits):
            assert abs(hit.score - scores[order[rank]]) <= TOLERANCE, (hit, scores[order[rank]])
            assert abs(hit.score - scores[rows[hit.path]]) <= TOLERANCE, hit
        same = [h.path for h in query_hits] == [paths_by_row[r] for r in order]
        if not same:  # allowed only where the float64 scores are within the tolerance of each other
            gaps = np.diff(scores[order])
            assert (np.abs(gaps) <= TOLERANCE).any(), "order differs without a near-tie"
        exact_order += same
    assert hits[-1][0].path == path_of(n // 2)
    return {"open_s": open_s, "first_query_s": first_s, "single_median_s": single[0], "single_p95_s": single[1],
            "batch_median_s": batched[0], "batch_p95_s": batched[1], "search_hwm": hwm,
            "checked": n_check, "exact_order": exact_order,
            "index_bytes": sum(p.stat().st_size for p in folder.iterdir())}


def run_step(args: argparse.Namespace, step: str, n: int, folder: Path) -> dict:
    """One step in a fresh interpreter, so that its peak memory is its own."""
    command = [sys.executable, __file__, "--_step", step, "--_size", str(n), "--_folder", str(folder),
               "--dim", str(args.dim), "--threads", str(args.threads), "--seed", str(args.seed),
               "--repeats", str(args.repeats), "--batch", str(args.batch), "--k", str(args.k),
               "--check", str(args.check), "--api_max", str(args.api_max), "--chunk_rows", str(args.chunk_rows)]
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def human_bytes(n: int) -> str:
    return f"{n / 2 ** 30:.2f} GiB" if n >= 2 ** 30 else f"{n / 2 ** 20:.0f} MiB"


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=20, help="timed queries (and batches) per size")
    parser.add_argument("--batch", type=int, default=16, help="queries per batch")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--check", type=int, default=4, help="queries checked against float64 brute force")
    parser.add_argument("--api_max", type=int, default=100_000,
                        help="largest size built through update(); above it, SearchIndex.build")
    parser.add_argument("--chunk_rows", type=int)  # default: search_index.DEFAULT_CHUNK_ROWS
    parser.add_argument("--workdir", type=Path, default=None, help="where indexes are written (default: a temp dir)")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw numbers here")
    parser.add_argument("--_step", help=argparse.SUPPRESS)
    parser.add_argument("--_size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--_folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    import search_index
    import torch

    if args.chunk_rows is None:
        args.chunk_rows = search_index.DEFAULT_CHUNK_ROWS
    torch.set_num_threads(args.threads)

    if args._step:
        folder, n = args._folder, args._size
        if args._step == "build":
            result = step_build(folder, n, args.dim, args.seed, args.api_max)
        elif args._step == "update":
            result = step_update(folder, n, args.dim, args.seed)
        else:
            result = step_search(folder, n, args.dim, args.seed, args.repeats, args.batch, args.k, args.check,
                                 args.chunk_rows)
        print(json.dumps(result))
        return 0

    workdir = Path(tempfile.mkdtemp(prefix="bench_search_", dir=args.workdir))
    rows = []
    try:
        for n in args.sizes:
            folder = workdir / f"index_{n}"
            result = {"n": n}
            result.update(run_step(args, "build", n, folder))
            result.update(run_step(args, "search", n, folder))
            result.update(run_step(args, "update", n, folder))
            rows.append(result)
            print(f"[{n}] " + json.dumps(result), file=sys.stderr, flush=True)
            shutil.rmtree(folder)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    print(f"\nsearch_index, D = {args.dim}, k = {args.k}, {args.threads} threads, torch {torch.__version__}, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; latencies: median / p95 "
          f"of {args.repeats}\n")
    print("| vectors | build (s) | index on disk | open (ms) | first query (ms) | 1 query (ms) | "
          f"{args.batch} queries (ms) | update 1% (s) | peak RSS (search) | checked vs float64 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['n']:,} | {r['build_s']:.2f} ({r['build_how']}) | {human_bytes(r['index_bytes'])} | "
              f"{ms(r['open_s'])} | {ms(r['first_query_s'])} | {ms(r['single_median_s'])} / {ms(r['single_p95_s'])} | "
              f"{ms(r['batch_median_s'])} / {ms(r['batch_p95_s'])} | {r['update_s']:.2f} | "
              f"{human_bytes(r['search_hwm'])} | {r['checked']} ok ({r['exact_order']} same order) |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
