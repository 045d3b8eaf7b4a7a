"""Benchmark: candidate engines for the search index (issue 19), on the operations the index needs.

    python bench/bench_engines.py [--sizes 100000 1000000] [--dim 768] [--queries 20]

Needs ``pip install lancedb`` (not in requirements.txt: the index chose SQLite and FAISS, which are;
see bench/README.md and bench_search.py for the chosen design).
For each engine and N random unit vectors (float32, D = 768) with a file table (path, sha256, size,
mtime_ns, kind):

- *build*: the first write of N rows;
- *open*: a new process's view of the index, ready to answer (the table's row count read);
- *update 1%*: N/100 rows removed and N/100 new ones added, and the bytes the engine wrote for it
  (the folder's size growth plus rewritten files: what a "no rewrite of unchanged vectors" target
  is about);
- *exact top-10*: mean ms per query over ``--queries`` queries, checked against float64 brute force;
- *ANN*: build seconds, mean ms per query and recall@10 against the exact top-10.

Engines: **LanceDB** (embedded, versioned, appendable; IVF_HNSW_SQ index) and **FAISS + SQLite**
(a flat inner-product index file plus an HNSW index, the file table in SQLite). The home-made index
(``search_index``) is ``bench_search.py``'s subject; its numbers are in bench/README.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def unit_vectors(n: int, dim: int, seed: int, clusters: int = 1000) -> np.ndarray:
    """Unit vectors around ``clusters`` random centres (noise of the centres' size): embeddings of
    real pieces cluster, and uniform random vectors are every approximate method's worst case."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(0).standard_normal((clusters, dim), dtype=np.float32)
    vectors = centres[rng.integers(0, clusters, n)] + rng.standard_normal((n, dim), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors


def exact_top10(vectors: np.ndarray, query: np.ndarray) -> np.ndarray:
    """The ten rows of largest inner product with ``query``, in float64 (64k rows at a time)."""
    q = query.astype(np.float64)
    scores = np.concatenate([vectors[i:i + 65536].astype(np.float64) @ q for i in range(0, len(vectors), 65536)])
    return np.argsort(-scores, kind="stable")[:10]


def timed_queries(search, queries: np.ndarray) -> tuple[float, list[np.ndarray]]:
    """Mean milliseconds per query of ``search(query) -> ids`` and the ids found, query by query."""
    found = []
    start = time.perf_counter()
    for query in queries:
        found.append(np.asarray(search(query)))
    return (time.perf_counter() - start) / len(queries) * 1000, found


def recall(found: list[np.ndarray], truth: list[np.ndarray]) -> float:
    return float(np.mean([len(set(f.tolist()) & set(t.tolist())) / 10 for f, t in zip(found, truth, strict=True)]))


def bench_lancedb(folder: Path, vectors: np.ndarray, queries: np.ndarray, truth: list[np.ndarray],
                  ann: bool) -> dict:
    import lancedb
    import pyarrow as pa

    n, dim = vectors.shape

    def table_of(rows: np.ndarray, ids: np.ndarray) -> pa.Table:
        flat = pa.array(rows.reshape(-1), type=pa.float32())
        return pa.table({"id": pa.array(ids, type=pa.int64()),
                         "path": pa.array([f"music/{i:08d}.abc" for i in ids]),
                         "sha256": pa.array([f"{i:064x}" for i in ids]),
                         "size": pa.array(np.full(len(ids), 1000), type=pa.int64()),
                         "mtime_ns": pa.array(np.full(len(ids), 1), type=pa.int64()),
                         "kind": pa.array(["abc"] * len(ids)),
                         "vector": pa.FixedSizeListArray.from_arrays(flat, dim)})

    row = {}
    start = time.perf_counter()
    db = lancedb.connect(folder)
    table = db.create_table("index", table_of(vectors, np.arange(n)))
    row["build_s"] = time.perf_counter() - start
    start = time.perf_counter()
    reopened = lancedb.connect(folder).open_table("index")
    count = reopened.count_rows()
    row["open_s"] = time.perf_counter() - start
    assert count == n
    row["exact_ms"], exact = timed_queries(
        lambda q: reopened.search(q, vector_column_name="vector").metric("dot").limit(10).to_arrow()["id"], queries)
    row["exact_recall"] = recall(exact, truth)
    before = folder_bytes(folder)
    changed = max(1, n // 100)
    start = time.perf_counter()
    table.delete(f"id < {changed}")
    table.add(table_of(unit_vectors(changed, dim, seed=7), np.arange(n, n + changed)))
    row["update_s"] = time.perf_counter() - start
    row["update_mb_written"] = (folder_bytes(folder) - before) / 1e6
    if not ann:
        return row
    start = time.perf_counter()
    table.create_index(metric="dot", vector_column_name="vector", index_type="IVF_HNSW_SQ")
    row["ann_build_s"] = time.perf_counter() - start
    current = np.concatenate([vectors[changed:], unit_vectors(changed, dim, seed=7)])
    ids = np.concatenate([np.arange(changed, n), np.arange(n, n + changed)])
    truth_now = [ids[exact_top10(current, q)] for q in queries]
    row["ann_ms"], found = timed_queries(
        lambda q: table.search(q, vector_column_name="vector").metric("dot").limit(10).nprobes(20)
        .refine_factor(10).to_arrow()["id"], queries)
    row["ann_recall"] = recall(found, truth_now)
    return row


def bench_lance_matmul(folder: Path, vectors: np.ndarray, queries: np.ndarray, truth: list[np.ndarray],
                       ann: bool) -> dict:
    """LanceDB as the store, exact search as this project's chunked float32 matmul (``metrics.top_k``)
    over the vector column read from Lance: the design the first two engines' numbers point to. Its
    *open* is the connection and row count; the vectors are read on the first query, reported apart
    (``first query s``, in the update column's place of the ANN columns)."""
    import lancedb
    import metrics
    import pyarrow as pa

    n, dim = vectors.shape
    row: dict = {}
    start = time.perf_counter()
    table = lancedb.connect(folder).create_table("index", pa.table({
        "id": pa.array(np.arange(n), type=pa.int64()),
        "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), type=pa.float32()), dim)}))
    row["build_s"] = time.perf_counter() - start
    start = time.perf_counter()
    reopened = lancedb.connect(folder).open_table("index")
    assert reopened.count_rows() == n
    row["open_s"] = time.perf_counter() - start
    start = time.perf_counter()
    column = reopened.to_arrow()
    matrix = column["vector"].combine_chunks().values.to_numpy(zero_copy_only=False).reshape(-1, dim)
    ids = column["id"].to_numpy()
    row["read_vectors_s"] = time.perf_counter() - start
    row["exact_ms"], exact = timed_queries(lambda q: ids[metrics.top_k(q, matrix, 10)[0][0]], queries)
    row["exact_recall"] = recall(exact, truth)
    row["update_s"], row["update_mb_written"] = float("nan"), float("nan")  # as LanceDB's row: the same store
    del table
    return row


def bench_faiss(folder: Path, vectors: np.ndarray, queries: np.ndarray, truth: list[np.ndarray],
                ann: bool) -> dict:
    import faiss

    n, dim = vectors.shape
    folder.mkdir(parents=True, exist_ok=True)
    row = {}
    start = time.perf_counter()
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    index.add_with_ids(vectors, np.arange(n, dtype=np.int64))
    faiss.write_index(index, str(folder / "vectors.faiss"))
    db = sqlite3.connect(folder / "files.sqlite")
    db.execute("CREATE TABLE files (id INTEGER PRIMARY KEY, path TEXT, sha256 TEXT, size INT, mtime_ns INT, kind TEXT)")
    db.executemany("INSERT INTO files VALUES (?, ?, ?, ?, ?, ?)",
                   ((i, f"music/{i:08d}.abc", f"{i:064x}", 1000, 1, "abc") for i in range(n)))
    db.commit()
    db.close()
    row["build_s"] = time.perf_counter() - start
    start = time.perf_counter()
    reopened = faiss.read_index(str(folder / "vectors.faiss"), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
    count = sqlite3.connect(folder / "files.sqlite").execute("SELECT COUNT(*) FROM files").fetchone()[0]
    row["open_s"] = time.perf_counter() - start
    assert count == n and reopened.ntotal == n
    row["exact_ms"], exact = timed_queries(lambda q: reopened.search(q[None], 10)[1][0], queries)
    row["exact_recall"] = recall(exact, truth)
    changed = max(1, n // 100)
    before = folder_bytes(folder)
    start = time.perf_counter()
    index.remove_ids(np.arange(changed, dtype=np.int64))
    index.add_with_ids(unit_vectors(changed, dim, seed=7), np.arange(n, n + changed, dtype=np.int64))
    faiss.write_index(index, str(folder / "vectors.faiss"))  # a flat file is written whole
    db = sqlite3.connect(folder / "files.sqlite")
    db.execute("DELETE FROM files WHERE id < ?", (changed,))
    db.executemany("INSERT INTO files VALUES (?, ?, ?, ?, ?, ?)",
                   ((i, f"music/{i:08d}.abc", f"{i:064x}", 1000, 1, "abc") for i in range(n, n + changed)))
    db.commit()
    db.close()
    row["update_s"] = time.perf_counter() - start
    row["update_mb_written"] = (os.path.getsize(folder / "vectors.faiss") + max(0, folder_bytes(folder) - before)) / 1e6
    if not ann:
        return row
    start = time.perf_counter()
    current = np.concatenate([vectors[changed:], unit_vectors(changed, dim, seed=7)])
    hnsw = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
    hnsw.hnsw.efConstruction = 64
    hnsw.add(current)
    row["ann_build_s"] = time.perf_counter() - start
    hnsw.hnsw.efSearch = 128
    truth_now = [exact_top10(current, q) for q in queries]
    row["ann_ms"], found = timed_queries(lambda q: hnsw.search(q[None], 10)[1][0], queries)
    row["ann_recall"] = recall(found, truth_now)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="*", default=[100000, 1000000])
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--queries", type=int, default=20)
    parser.add_argument("--engines", nargs="*", default=["lancedb", "faiss"], choices=["lancedb", "faiss", "lance+matmul"])
    parser.add_argument("--ann_up_to", type=int, default=100000,
                        help="build the approximate indexes only up to this N (an HNSW build of 1M is long here)")
    args = parser.parse_args(argv)
    print("| engine | N | build s | open s | update 1% s | update MB written | exact top-10 ms | exact recall | "
          "ANN build s | ANN ms | ANN recall@10 |\n|---|---|---|---|---|---|---|---|---|---|---|")
    for n in args.sizes:
        vectors = unit_vectors(n, args.dim, seed=n)
        queries = unit_vectors(args.queries, args.dim, seed=1)
        truth = [exact_top10(vectors, q) for q in queries]
        for engine in args.engines:
            folder = Path(tempfile.mkdtemp(prefix=f"bench_{engine}_"))
            try:
                bench = {"lancedb": bench_lancedb, "faiss": bench_faiss, "lance+matmul": bench_lance_matmul}[engine]
                row = bench(folder / "index", vectors, queries, truth,
                                                                              n <= args.ann_up_to)
            finally:
                shutil.rmtree(folder, ignore_errors=True)
            print(f"| {engine} | {n:,} | {row['build_s']:.1f} | {row['open_s']:.3f} | {row['update_s']:.2f} | "
                  f"{row['update_mb_written']:.0f} | {row['exact_ms']:.1f} | {row['exact_recall']:.3f} | "
                  + (f"{row['ann_build_s']:.1f} | {row['ann_ms']:.2f} | {row['ann_recall']:.3f} |" if "ann_ms" in row
                     else "– | – | – |")
                  + (f" (vectors read from Lance on the first query: {row['read_vectors_s']:.2f} s)"
                     if "read_vectors_s" in row else ""), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
