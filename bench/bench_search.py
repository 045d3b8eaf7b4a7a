"""Benchmark: the persistent search index (code/search_index.py: SQLite, .npy segments, FAISS IVF) at 10k-1M vectors.

    python bench/bench_search.py [--sizes 10000 100000 1000000] [--dim 768] [--threads 2]

For each size N: seeded synthetic unit vectors (D = 768) stand for N indexed files, by default drawn
from a mixture of ``--clusters`` Gaussian clusters (``--data uniform``: uniformly on the sphere, the
worst case for an approximate index and no case for a music collection). The index is built through
the real API (``SearchIndex.update`` with file facts and an embed callable) up to ``--api_max``
files, and above it with the documented bulk builder ``SearchIndex.build`` (the same files on disk,
without planning a million files one by one). Then, each step in a fresh process so that memory
figures do not mix:

- *build*: seconds to write the index (embedding excluded: the vectors already exist);
- *open*: ``SearchIndex.open`` (the tables' summary read, the vector segments memory-mapped) and the
  first query (which pages the vectors in; from the page cache here, as the files were just written);
- *query*: latency of the exact ``search`` (k = 10, dedupe on: the path the search command uses),
  median and p95 of ``--repeats`` single queries and of ``--repeats`` batches of ``--batch`` queries;
- *peak RSS*: the search process's high-water mark (VmHWM) after the queries, mapped vectors
  included;
- *update*: open + ``SearchIndex.update`` after 1% of the files changed, 0.1% were removed and 0.1%
  added (planning every file by size and mtime, embedding only the changed and new ones), with the
  bytes it wrote (new files plus growth of existing ones);
- *ANN*: ``build_ann`` (IVF-Flat, its default number of lists), then approximate queries at several
  ``n_probe`` values: median latency and recall@10 against the exact search over ``--ann_queries``
  fresh queries from the same distribution.

Every size checks ``--check`` queries (one of them an indexed vector) against a float64 brute force
over all rows: each hit's score within 1e-5 of the float64 score at its rank and of its own float64
score, and the same files in the same order except where float64 scores lie within 1e-5 of each
other. The script prints markdown tables.
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

# search_index (and faiss) are imported by the steps and main, after the arguments: --help answers at once.
TOLERANCE = 1e-5
N_PROBES = (4, 8, 16, 32, 64)


def fake_sha(i: int, salt: int = 0) -> str:
    return f"{salt:08x}{i:056x}"


def synthetic_units(n: int, dim: int, seed: int, data: str, clusters: int, stream: int = 0) -> np.ndarray:
    """``n`` unit float32 rows: uniform on the sphere, or around ``clusters`` fixed centres (the centres
    depend on ``seed`` only, so that queries from another ``stream`` come from the same mixture)."""
    centres = np.random.default_rng(seed).standard_normal((clusters, dim), dtype=np.float32)
    rng = np.random.default_rng([seed, stream + 1])
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 65536):  # in blocks: no float64 copy of a 3 GB matrix
        size = min(65536, n - start)
        block = rng.standard_normal((size, dim), dtype=np.float32)
        if data == "clustered":
            block += centres[rng.integers(0, clusters, size)]
        out[start:start + size] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def path_of(i: int) -> str:
    return f"set{i // 1000:04d}/piece{i:07d}.abc"


def vm_hwm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def folder_sizes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in folder.iterdir()}


def step_build(args: argparse.Namespace, folder: Path, n: int) -> dict:
    from search_index import FileFacts, SearchIndex

    vectors = synthetic_units(n, args.dim, args.seed, args.data, args.clusters)
    start = time.perf_counter()
    if n <= args.api_max:
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
    return {"build_s": time.perf_counter() - start, "build_how": how, "build_hwm": vm_hwm_bytes(),
            "index_bytes": sum(folder_sizes(folder).values())}


def step_update(args: argparse.Namespace, folder: Path, n: int) -> dict:
    """1% changed (new content), 0.1% removed, 0.1% added; everything else unchanged by size+mtime."""
    from search_index import FileFacts, SearchIndex

    rng = np.random.default_rng(args.seed + 1)
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
    fresh = synthetic_units(len(changed) + n_added, args.dim, args.seed, args.data, args.clusters, stream=2)
    calls = []

    def embed(paths: list[str]) -> dict:
        calls.extend(paths)
        return {p: (facts[p].digest(), fresh[k], "abc") for k, p in enumerate(paths)}

    sizes_before = folder_sizes(folder)
    start = time.perf_counter()
    index = SearchIndex.open(folder, "bench-model")
    opened = time.perf_counter() - start
    summary = index.update(facts, embed)
    seconds = time.perf_counter() - start
    index.close()
    sizes_after = folder_sizes(folder)
    written = sum(max(0, size - sizes_before.get(name, 0)) for name, size in sizes_after.items())
    assert len(calls) == len(changed) + n_added and len(summary.removed) == len(removed), summary.line()
    return {"update_s": seconds, "update_open_s": opened, "update_line": summary.line(), "update_bytes": written}


def timed(function, repeats: int) -> tuple[float, float]:
    function()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return float(np.median(times)), float(np.percentile(times, 95))


def all_vectors(index) -> tuple[np.ndarray, dict[int, int]]:
    """Every stored row (dead ones included) and each vid's row in that matrix."""
    blocks, where, offset = [], {}, 0
    for segment in index._segments:
        blocks.append(np.asarray(segment.vectors))
        where.update({segment.first_vid + i: offset + i for i in range(segment.n_rows)})
        offset += segment.n_rows
    return np.concatenate(blocks), where


def step_search(args: argparse.Namespace, folder: Path, n: int) -> dict:
    from search_index import SearchIndex

    start = time.perf_counter()
    index = SearchIndex.open(folder, "bench-model")
    open_s = time.perf_counter() - start
    rng = np.random.default_rng(args.seed + 3)
    queries = synthetic_units(args.repeats + 1, args.dim, args.seed, args.data, args.clusters, stream=3)
    start = time.perf_counter()
    index.search(queries[0], k=args.k)
    first_s = time.perf_counter() - start
    counter = iter(range(10 ** 9))
    single = timed(lambda: index.search(queries[next(counter) % len(queries)], k=args.k), args.repeats)
    batches = synthetic_units(args.batch, args.dim, args.seed, args.data, args.clusters, stream=4)
    batched = timed(lambda: index.search(batches, k=args.k), args.repeats)
    hwm = vm_hwm_bytes()

    # Correctness against float64 brute force (after the timings: its float64 blocks are not counted).
    check = np.concatenate([rng.standard_normal((args.check - 1, args.dim)).astype(np.float32),
                            np.array(index.vector(path_of(n // 2)))[None]])
    hits = index.search(check, k=args.k)
    matrix, where = all_vectors(index)
    entries = index.entries
    row_of_path = {e.path: where[e.row] for e in entries}
    path_of_row = {}
    for e in entries:  # the first path of a content, as dedupe reports it
        path_of_row.setdefault(where[e.row], e.path)
    exact_order = 0
    for q, query_hits in zip(check.astype(np.float64), hits, strict=True):
        q = q / np.linalg.norm(q)
        scores = np.full(matrix.shape[0], -np.inf)
        live = np.fromiter(path_of_row, dtype=np.int64)
        for s in range(0, len(live), 65536):
            rows = live[s:s + 65536]
            scores[rows] = np.asarray(matrix[rows], dtype=np.float64) @ q
        order = sorted(np.argsort(-scores, kind="stable")[:args.k + 10].tolist(),
                       key=lambda r: (-scores[r], path_of_row[r]))[:args.k]
        assert len(query_hits) == min(args.k, len(live))
        for rank, hit in enumerate(query_hits):
            assert abs(hit.score - scores[order[rank]]) <= TOLERANCE, (hit, scores[order[rank]])
            assert abs(hit.score - scores[row_of_path[hit.path]]) <= TOLERANCE, hit
        same = [h.path for h in query_hits] == [path_of_row[r] for r in order]
        if not same:  # allowed only where the float64 scores are within the tolerance of each other
            gaps = np.diff(scores[order])
            assert (np.abs(gaps) <= TOLERANCE).any(), "order differs without a near-tie"
        exact_order += same
    assert hits[-1][0].path == path_of(n // 2)
    return {"open_s": open_s, "first_query_s": first_s, "single_median_s": single[0], "single_p95_s": single[1],
            "batch_median_s": batched[0], "batch_p95_s": batched[1], "search_hwm": hwm,
            "checked": args.check, "exact_order": exact_order}


def step_ann(args: argparse.Namespace, folder: Path, n: int) -> dict:
    from search_index import SearchIndex

    index = SearchIndex.open(folder, "bench-model")
    built = index.build_ann()
    queries = synthetic_units(args.ann_queries, args.dim, args.seed, args.data, args.clusters, stream=5)
    exact = [{h.path for h in hits} for hits in index.search(queries, k=args.k)]
    start = time.perf_counter()
    reopened = SearchIndex.open(folder, "bench-model")
    reopened.search(queries[0], k=args.k, approximate=True, n_probe=N_PROBES[0])  # reads the IVF file
    ann_open_s = time.perf_counter() - start
    probes = []
    for n_probe in N_PROBES:
        approx = [{h.path for h in hits} for hits in reopened.search(queries, k=args.k, approximate=True,
                                                                     n_probe=n_probe)]
        recall = float(np.mean([len(a & e) / len(e) for a, e in zip(approx, exact, strict=True)]))
        counter = iter(range(10 ** 9))
        median, p95 = timed(lambda n_probe=n_probe, counter=counter: reopened.search(
            queries[next(counter) % len(queries)], k=args.k, approximate=True, n_probe=n_probe), args.repeats)
        probes.append({"n_probe": n_probe, "recall": recall, "median_s": median, "p95_s": p95})
    return {"ann_build_s": built["seconds"], "ann_lists": built["n_lists"], "ann_open_s": ann_open_s,
            "ann_probes": probes, "ann_hwm": vm_hwm_bytes(),
            "ann_bytes": (folder / index.info["ann_file"]).stat().st_size}


STEPS = {"build": step_build, "search": step_search, "update": step_update, "ann": step_ann}


def run_step(args: argparse.Namespace, step: str, n: int, folder: Path) -> dict:
    """One step in a fresh interpreter, so that its peak memory is its own."""
    command = [sys.executable, __file__, "--_step", step, "--_size", str(n), "--_folder", str(folder),
               "--dim", str(args.dim), "--threads", str(args.threads), "--seed", str(args.seed),
               "--repeats", str(args.repeats), "--batch", str(args.batch), "--k", str(args.k),
               "--check", str(args.check), "--api_max", str(args.api_max), "--data", args.data,
               "--clusters", str(args.clusters), "--ann_queries", str(args.ann_queries)]
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def human_bytes(n: int) -> str:
    if n >= 2 ** 30:
        return f"{n / 2 ** 30:.2f} GiB"
    return f"{n / 2 ** 20:.0f} MiB" if n >= 2 ** 24 else f"{n / 2 ** 20:.1f} MiB"


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--threads", type=int, default=2, help="torch and FAISS (OpenMP) threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", choices=("clustered", "uniform"), default="clustered")
    parser.add_argument("--clusters", type=int, default=1000, help="mixture components of --data clustered")
    parser.add_argument("--repeats", type=int, default=20, help="timed queries (and batches) per size")
    parser.add_argument("--batch", type=int, default=16, help="queries per batch")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--check", type=int, default=4, help="queries checked against float64 brute force")
    parser.add_argument("--ann_queries", type=int, default=200, help="queries of the recall measurement")
    parser.add_argument("--no_ann", action="store_true", help="skip the approximate index")
    parser.add_argument("--api_max", type=int, default=100_000,
                        help="largest size built through update(); above it, SearchIndex.build")
    parser.add_argument("--workdir", type=Path, default=None, help="where indexes are written (default: a temp dir)")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw numbers here")
    parser.add_argument("--_step", help=argparse.SUPPRESS)
    parser.add_argument("--_size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--_folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    import faiss
    import torch

    faiss.omp_set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    if args._step:
        print(json.dumps(STEPS[args._step](args, args._folder, args._size)))
        return 0

    workdir = Path(tempfile.mkdtemp(prefix="bench_search_", dir=args.workdir))
    rows = []
    try:
        for n in args.sizes:
            folder = workdir / f"index_{n}"
            result = {"n": n}
            for step in ("build", "search", "update") + (() if args.no_ann else ("ann",)):
                result.update(run_step(args, step, n, folder))
            rows.append(result)
            print(f"[{n}] " + json.dumps(result), file=sys.stderr, flush=True)
            shutil.rmtree(folder)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    print(f"\nsearch_index (SQLite, .npy segments, FAISS {faiss.__version__} IVF), D = {args.dim}, k = {args.k}, {args.threads} "
          f"threads, {args.data} data, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
          f"latencies: median / p95 of {args.repeats}\n")
    print("| vectors | build (s) | index on disk | open (ms) | first query (ms) | exact query (ms) | "
          f"{args.batch} queries (ms) | update 1% (s) | update wrote | peak RSS (search) | checked vs float64 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['n']:,} | {r['build_s']:.2f} ({r['build_how']}) | {human_bytes(r['index_bytes'])} | "
              f"{ms(r['open_s'])} | {ms(r['first_query_s'])} | {ms(r['single_median_s'])} / {ms(r['single_p95_s'])} | "
              f"{ms(r['batch_median_s'])} / {ms(r['batch_p95_s'])} | {r['update_s']:.2f} | "
              f"{human_bytes(r['update_bytes'])} | {human_bytes(r['search_hwm'])} | "
              f"{r['checked']} ok ({r['exact_order']} same order) |")
    if not args.no_ann:
        print(f"\nApproximate (IVF-Flat), recall@{args.k} against exact over {args.ann_queries} queries; "
              "latency median / p95 of single queries\n")
        print("| vectors | lists | build (s) | IVF file | first approximate query incl. reading it (s) | "
              + " | ".join(f"n_probe {p}: ms, recall" for p in N_PROBES) + " |")
        print("|---|---|---|---|---|" + "---|" * len(N_PROBES))
        for r in rows:
            cells = " | ".join(f"{ms(p['median_s'])} / {ms(p['p95_s'])}, {p['recall']:.3f}" for p in r["ann_probes"])
            print(f"| {r['n']:,} | {r['ann_lists']} | {r['ann_build_s']:.1f} | {human_bytes(r['ann_bytes'])} | "
                  f"{r['ann_open_s']:.2f} | {cells} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
