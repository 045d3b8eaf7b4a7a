"""Benchmark: retrieval evaluation cost, and inference/clamp3_eval.py against the official loop.

    python bench/bench_eval.py [--sizes 1000 10000 100000] [--official_sizes 1000 5000] [--dim 768]

Part 1, the metrics: ``metrics.retrieval_report`` (both directions, both tie rules, 1,000 bootstrap
resamples, pair cosines) on N × N random row-paired features, D = 768. Seconds and peak memory (the
most bytes allocated at once during the call, glibc's ``mallinfo2``, minus what was allocated before
it: the features themselves are not counted), the report's two matrix products alone timed in the
same run (``bare_products``: the floor), the ratio of the two, and how the time grows with N.

Part 2, the tool: folders of N reference and N + N/50 query ``.npy`` features (one key in fifty has
a second query file; one reference in a hundred is an exact copy of another, so there are exact
ties), evaluated by

- *official loop*: this file's own re-implementation of the documented official algorithm
  (CLAMP3_REFERENCE.md §8): keys by the official rule, then per query file ``torch.cosine_similarity``
  against all references, a Python sort by (similarity, is the correct one) descending, and the
  position of the correct item. The official script builds the reference tensor again for every
  query (``torch.tensor(np.array([...]))`` inside the loop); the *official loop* column does the same,
  the *stacked once* column builds it once (a lower bound on the official script's time);
- *clamp3_eval.py*: ``inference/clamp3_eval.py``'s ``main`` on the same folders, in process (the
  fastest of 3 runs; the official loop runs once).

Both times include reading the folders. The script asserts the same printed MRR/Hit numbers and the
same rank for every query file.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_train import PeakMemory
from fileio import REPO_ROOT, read_jsonl


def paired_features(n: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Row-paired float32 features with a moderate signal (MRR well between random and perfect)."""
    import torch  # here, not at the top: --help need not wait for it

    generator = torch.Generator().manual_seed(seed)
    text = torch.randn(n, dim, generator=generator)
    music = 0.06 * text + torch.randn(n, dim, generator=generator)
    return text.numpy(), music.numpy()


def bare_products(text: np.ndarray, music: np.ndarray, chunk_size: int = 1024) -> float:
    """Seconds of the report's two N × N × D products alone (rows normalised, one matmul per chunk
    of queries, in both directions, the results dropped): the floor the report is measured against."""
    import torch

    start = time.perf_counter()
    with torch.no_grad():
        a = torch.nn.functional.normalize(torch.from_numpy(text), dim=1)
        b = torch.nn.functional.normalize(torch.from_numpy(music), dim=1)
        for queries, references in ((a, b), (b, a)):
            for first in range(0, queries.shape[0], chunk_size):
                queries[first:first + chunk_size] @ references.T
    return time.perf_counter() - start


def bench_metrics(n: int, dim: int, n_resamples: int) -> dict:
    import metrics  # loads torch

    text, music = paired_features(n, dim, seed=n)
    with PeakMemory() as memory:
        start = time.perf_counter()
        report = metrics.retrieval_report(text, music, n_resamples=n_resamples)
        seconds = time.perf_counter() - start
    products = bare_products(text, music)
    return {"n": n, "seconds": seconds, "products_seconds": products, "peak_mb": memory.added_mb,
            "mrr": report["text_to_music"]["official"]["mrr"],
            "hit@10": report["text_to_music"]["official"]["hit@10"]}


def write_folders(root: Path, n: int, dim: int, seed: int) -> tuple[Path, Path]:
    rng = np.random.default_rng(seed)
    references = rng.standard_normal((n, dim)).astype(np.float32)
    copies = rng.choice(n, size=(n // 100, 2), replace=False)
    references[copies[:, 0]] = references[copies[:, 1]]
    query_dir, reference_dir = root / "queries", root / "references"
    for i in range(n):
        key = f"group{i % 10}/piece{i:06d}"  # nested keys, ten folders
        (reference_dir / key).parent.mkdir(parents=True, exist_ok=True)
        (query_dir / key).parent.mkdir(parents=True, exist_ok=True)
        np.save(reference_dir / f"{key}.npy", references[i:i + 1])
        query = 0.06 * references[i] + rng.standard_normal(dim).astype(np.float32)
        np.save(query_dir / f"{key}.1.npy", query[None])
        if i % 50 == 0:
            second = 0.06 * references[i] + rng.standard_normal(dim).astype(np.float32)
            np.save(query_dir / f"{key}.2.npy", second[None])
    return query_dir, reference_dir


def official_loop(query_folder: str, reference_folder: str,
                  restack_per_query: bool) -> tuple[dict[str, float], dict[str, int]]:
    """The documented official evaluation, one query at a time: (numbers rounded as printed, rank of
    each query file). References keep the first file per key in sorted order, like clamp3_eval.py.
    ``restack_per_query``: build the reference tensor again for every query, as the official
    script does, rather than once."""
    import torch

    def features_by_key(folder: str) -> dict[str, list[tuple[str, np.ndarray]]]:
        found: dict[str, list[tuple[str, np.ndarray]]] = {}
        depth = len(Path(folder).parts)
        for directory, subdirectories, names in os.walk(folder):
            subdirectories.sort()
            for name in sorted(names):
                if name.endswith(".npy"):
                    relative = "/".join(Path(directory).parts[depth:])
                    stem = name.split(".")[0]
                    key = f"{relative}/{stem}" if relative else stem
                    path = os.path.join(directory, name)
                    found.setdefault(key, []).append((path, np.load(path).squeeze()))
        return found

    queries = features_by_key(query_folder)
    references = {key: files[0] for key, files in features_by_key(reference_folder).items()}
    if set(queries) != set(references):
        raise ValueError("unmatched keys")
    keys = list(references)
    reference_matrix = torch.tensor(np.stack([references[key][1] for key in keys]))
    ranks: dict[str, int] = {}
    for correct, key in enumerate(keys):
        for path, vector in queries[key]:
            if restack_per_query:
                reference_matrix = torch.tensor(np.stack([references[k][1] for k in keys]))
            similarities = torch.cosine_similarity(torch.tensor(vector).unsqueeze(0), reference_matrix).tolist()
            order = sorted(range(len(keys)), key=lambda j: (similarities[j], j == correct), reverse=True)
            ranks[path] = order.index(correct) + 1
    values = np.array(list(ranks.values()))
    total = len(values)
    numbers = {"MRR": round(sum(1 / r for r in ranks.values()) / total, 4),
               **{f"Hit@{k}": round(int((values <= k).sum()) / total, 4) for k in (1, 10, 100)}}
    return numbers, ranks


def load_eval_script():
    spec = importlib.util.spec_from_file_location("clamp3_eval_script", REPO_ROOT / "inference" / "clamp3_eval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bench_tool(n: int, dim: int, skip_official: bool) -> dict:
    clamp3_eval = load_eval_script()
    with tempfile.TemporaryDirectory(prefix="bench_eval_") as tmp:
        query_dir, reference_dir = write_folders(Path(tmp), n, dim, seed=n)
        out = Path(tmp) / "out"
        ours_seconds = float("inf")
        for _ in range(3):  # the fastest of 3 (the official loop runs once: it takes minutes)
            printed = io.StringIO()
            with PeakMemory() as ours_memory, contextlib.redirect_stdout(printed):
                start = time.perf_counter()
                status = clamp3_eval.main([str(query_dir), str(reference_dir), "--output_dir", str(out)])
                ours_seconds = min(ours_seconds, time.perf_counter() - start)
            assert status == 0, printed.getvalue()
        ours_numbers = {name: float(value) for name, value in
                        (line.split(": ") for line in printed.getvalue().splitlines()
                         if line.startswith(("MRR:", "Hit@")))}
        ours_ranks = {row["query"]: row["rank"] for row in read_jsonl(out / "retrieval_ranks.jsonl")}
        result = {"n": n, "query_files": len(ours_ranks), "ours_seconds": ours_seconds,
                  "ours_peak_mb": ours_memory.added_mb, **ours_numbers}
        if skip_official:
            return result
        for restack in (True, False):
            with PeakMemory() as official_memory:
                start = time.perf_counter()
                official_numbers, official_ranks = official_loop(str(query_dir), str(reference_dir), restack)
                official_seconds = time.perf_counter() - start
            assert official_numbers == ours_numbers, (official_numbers, ours_numbers)
            assert official_ranks == ours_ranks, [q for q in official_ranks if official_ranks[q] != ours_ranks.get(q)][:5]
            name = "official" if restack else "stacked_once"
            result.update({f"{name}_seconds": official_seconds, f"{name}_peak_mb": official_memory.added_mb,
                           f"{name}_speedup": official_seconds / ours_seconds})
        result["identical"] = True
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="*", default=[1000, 10000, 100000],
                        help="N of the metrics rows (default: %(default)s)")
    parser.add_argument("--official_sizes", type=int, nargs="*", default=[1000, 5000],
                        help="N of the clamp3_eval.py vs official loop rows (default: %(default)s)")
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--n_resamples", type=int, default=1000)
    parser.add_argument("--skip_official", action="store_true", help="time clamp3_eval.py only")
    args = parser.parse_args(argv)
    import torch  # after parsing: --help need not wait for it

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), Python {platform.python_version()}")

    if args.sizes:
        print("\n| N × N | seconds | bare products s | report / products | peak MB | time / previous | N² / previous "
              "| t→m MRR |\n|---|---|---|---|---|---|---|---|")
        previous = None
        for n in args.sizes:
            row = bench_metrics(n, args.dim, args.n_resamples)
            growth = f"{row['seconds'] / previous['seconds']:.1f}×" if previous else "–"
            pairs = f"{(n / previous['n']) ** 2:.0f}×" if previous else "–"
            print(f"| {n:,} × {n:,} | {row['seconds']:.2f} | {row['products_seconds']:.2f} | "
                  f"{row['seconds'] / row['products_seconds']:.2f}× | {row['peak_mb']:.0f} | {growth} | {pairs} | "
                  f"{row['mrr']:.4f} |", flush=True)
            previous = row

    if args.official_sizes:
        print("\n| N | query files | official loop s | stacked once s | clamp3_eval.py s | speedup | speedup "
              "(stacked once) | official MB | ours MB | MRR | Hit@1 | Hit@10 | Hit@100 | identical ranks |\n"
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for n in args.official_sizes:
            row = bench_tool(n, args.dim, args.skip_official)
            official = (f"{row['official_seconds']:.1f} | {row['stacked_once_seconds']:.1f} | {row['ours_seconds']:.2f} | "
                        f"**{row['official_speedup']:.0f}×** | {row['stacked_once_speedup']:.0f}× | "
                        f"{row['official_peak_mb']:.0f} | {row['ours_peak_mb']:.0f}") if "identical" in row else \
                f"– | – | {row['ours_seconds']:.2f} | – | – | – | {row['ours_peak_mb']:.0f}"
            print(f"| {n:,} | {row['query_files']:,} | {official} | {row['MRR']} | {row['Hit@1']} | {row['Hit@10']} | "
                  f"{row['Hit@100']} | {'yes' if row.get('identical') else 'not checked'} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
