"""Similarity between two folders of global CLaMP 3 features, as the official clamp3_score.py.

    python inference/clamp3_score.py QUERY_FOLDER REFERENCE_FOLDER [--group] [--skip_unmatched]
                                     [--output_dir DIR] [--json FILE]

Pairwise mode (default): every query file is paired with the reference of its key (the key rule of
``clamp3_eval.py``: folder + name up to the first dot; the first reference file per key in sorted
order); it prints the mean cosine of the pairs and writes ``pairwise_similarities.jsonl`` (``query``,
``reference``, ``similarity``, best first) to the working directory or ``--output_dir``. An
unmatched key on either side is listed in ``unmatched_files.jsonl`` there and the run exits with
status 1; with ``--skip_unmatched`` it is listed and left out instead. Unlike the official script,
nothing is ever asked on standard input.

``--group``: the cosine of the mean of all query vectors and the mean of all reference vectors
(every file of both folders, keys not used). Cosines of pairs are float32
``torch.cosine_similarity``; the group means and their cosine are float64.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from fileio import atomic_write_text, write_jsonl
from retrieval import FeatureFileError, FeatureSet, load_query_and_reference, match_keys

PAIRS_FILE = "pairwise_similarities.jsonl"
UNMATCHED_FILE = "unmatched_files.jsonl"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("query_folder", help="folder of query features (.npy, (1, D)), searched recursively")
    parser.add_argument("reference_folder", help="folder of reference features (.npy, (1, D))")
    parser.add_argument("--group", action="store_true",
                        help="cosine of the mean query vector and the mean reference vector")
    parser.add_argument("--skip_unmatched", action="store_true",
                        help="pairwise mode: leave unmatched keys out (still listed) instead of failing")
    parser.add_argument("--output_dir", default=".",
                        help=f"where {PAIRS_FILE} and {UNMATCHED_FILE} go (default: the working directory)")
    parser.add_argument("--json", metavar="FILE", help="also write the numbers as JSON")
    return parser


def group_similarity(queries: np.ndarray, references: np.ndarray) -> float:
    """Cosine of the mean query vector and the mean reference vector (float64)."""
    mean_query = queries.astype(np.float64).mean(0)
    mean_reference = references.astype(np.float64).mean(0)
    norms = max(float(np.linalg.norm(mean_query) * np.linalg.norm(mean_reference)), 1e-16)
    return float(mean_query @ mean_reference) / norms


def pair_similarities(queries: np.ndarray, references: np.ndarray) -> np.ndarray:
    """Float32 cosine of row i of ``queries`` with row i of ``references``."""
    import torch  # here, not at the top: --help need not wait for it

    return torch.cosine_similarity(torch.from_numpy(queries), torch.from_numpy(references), dim=1).numpy()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    print("Query folder:", args.query_folder)
    print("Reference folder:", args.reference_folder)
    try:
        queries, references = load_query_and_reference(args.query_folder, args.reference_folder, not args.group)
    except (FileNotFoundError, FeatureFileError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.group:
        similarity = group_similarity(queries.vectors, references.vectors)
        print(f"Total query features: {len(queries)}")
        print(f"Total reference features: {len(references)}")
        print(f"Group similarity: {round(similarity, 4)}")
        if args.json:
            write_report(args.json, {"mode": "group", "n_query_files": len(queries),
                                     "n_reference_files": len(references), "group_similarity": similarity})
        return 0
    return pairwise(args, queries, references)


def pairwise(args: argparse.Namespace, queries: FeatureSet, references: FeatureSet) -> int:
    output_dir = Path(args.output_dir)
    match = match_keys(queries, references)
    unmatched = match.unmatched_rows(queries, references)
    if unmatched:
        path = write_jsonl(output_dir / UNMATCHED_FILE, unmatched)
        counts = (f"{len(match.unmatched_query_keys)} query keys and {len(match.unmatched_reference_keys)} "
                  f"reference keys have no match; listed in {path}")
        if not args.skip_unmatched:
            print(f"error: {counts} (--skip_unmatched leaves them out)", file=sys.stderr)
            return 1
        print(f"note: {counts}; left out (--skip_unmatched)", file=sys.stderr)
    matched = np.flatnonzero(match.targets >= 0)
    if matched.size == 0:
        print("error: no query file has a reference with its key", file=sys.stderr)
        return 1
    targets = match.targets[matched]
    similarities = pair_similarities(queries.vectors[matched], references.vectors[targets])
    common_keys = len(set(targets.tolist()))
    print(f"There are {common_keys} common keys between query and reference features.")
    rows = sorted(({"query": queries.path(int(i)), "reference": references.path(int(t)), "similarity": float(s)}
                   for i, t, s in zip(matched, targets, similarities, strict=True)),
                  key=lambda row: (-row["similarity"], row["query"]))
    pairs_path = write_jsonl(output_dir / PAIRS_FILE, rows)
    mean = float(similarities.astype(np.float64).mean())
    print(f"Total query features: {matched.size}")
    print(f"Total reference features: {common_keys}")
    print(f"Avg. pairwise similarity: {round(mean, 4)}")
    print(f"Pairwise similarity scores saved in '{pairs_path}'.")
    if args.json:
        import metrics

        low, high = metrics.bootstrap_interval(similarities)
        write_report(args.json, {
            "mode": "pairwise", "n_pairs": int(matched.size), "n_keys": common_keys,
            "mean_similarity": mean, "ci": [low, high], "ci_method": "percentile bootstrap over pairs, 95%",
            "pair_cosines": metrics.pair_cosines(queries.vectors[matched], references.vectors[targets]),
            "unmatched": unmatched})
    return 0


def write_report(path: str, report: dict) -> None:
    atomic_write_text(path, json.dumps(report, indent=2) + "\n")
    print(f"Report saved in '{path}'.")


if __name__ == "__main__":
    sys.exit(main())
