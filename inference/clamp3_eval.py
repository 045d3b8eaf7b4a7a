"""Retrieval metrics between two folders of global CLaMP 3 features, as the official clamp3_eval.py.

    python inference/clamp3_eval.py QUERY_FOLDER REFERENCE_FOLDER [--output_dir DIR] [--json FILE]
                                    [--n_resamples B] [--seed S]

Each query file's correct item is the reference with its key (folder relative to the root + name up
to the first dot, see ``retrieval``); several query files may share a key, a reference folder keeps
the first file per key in sorted path order. An unmatched key on either side is listed in
``unmatched_files.jsonl`` and the run exits with status 1. Otherwise it prints the official lines
(MRR, Hit@1, Hit@10, Hit@100: means over all query files, rounded to 4 decimals) and writes
``retrieval_ranks.jsonl`` (``query``, ``reference``, ``rank``; sorted by rank, then query). Both
files go to the working directory, as the official script's do, or to ``--output_dir``.

Ranks are the official ones, query for query, ties included: similarity is float32 cosine and an
exact tie counts in favour of the correct item. The fast path (normalised rows, one matrix product
per chunk of queries) differs from ``torch.cosine_similarity`` by up to ~1e-7, which could move a
reference that close to the correct one across it; such near-ties (within 1e-5) are recomputed with
``torch.cosine_similarity`` as the official loop does, so the ranks and numbers are identical to the
official ones (``metrics.official_ranks``; ``bench/bench_eval.py`` checks it at 5,000 × 5,000).

``--json FILE`` adds what the official script lacks (via ``metrics``): both tie rules, bootstrap
intervals, the random-ranking baseline, Hit@5, the reverse direction (each reference against all
query files, every file of its key correct) and the cosines of matched pairs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from fileio import atomic_write_text, write_jsonl
from retrieval import FeatureFileError, load_query_and_reference, match_keys

if TYPE_CHECKING:  # --help answers before torch is imported; the functions import metrics
    import metrics

RANKS_FILE = "retrieval_ranks.jsonl"
UNMATCHED_FILE = "unmatched_files.jsonl"
OFFICIAL_KS = (1, 10, 100)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("query_folder", help="folder of query features (.npy, (1, D)), searched recursively")
    parser.add_argument("reference_folder", help="folder of reference features (.npy, (1, D))")
    parser.add_argument("--output_dir", default=".",
                        help=f"where {RANKS_FILE} and {UNMATCHED_FILE} go (default: the working directory)")
    parser.add_argument("--json", metavar="FILE",
                        help="also write a JSON report: both directions, both tie rules, bootstrap intervals")
    parser.add_argument("--n_resamples", type=int, default=1000, help="bootstrap resamples for --json (default: 1000)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed for --json (default: 0)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    print("Query folder:", args.query_folder)
    print("Reference folder:", args.reference_folder)
    try:
        queries, references = load_query_and_reference(args.query_folder, args.reference_folder, True)
    except (FileNotFoundError, FeatureFileError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if references.shadowed:
        print(f"note: {len(references.shadowed)} reference files share a key with an earlier file and were "
              f"left out (the first in sorted order is kept), e.g. {references.shadowed_paths()[0]}",
              file=sys.stderr)
    output_dir = Path(args.output_dir)
    match = match_keys(queries, references)
    if not match.complete:
        rows = match.unmatched_rows(queries, references)
        path = write_jsonl(output_dir / UNMATCHED_FILE, rows)
        print(f"error: {len(match.unmatched_query_keys)} query keys and {len(match.unmatched_reference_keys)} "
              f"reference keys have no match; listed in {path}", file=sys.stderr)
        return 1
    print(f"There are {len(references)} common keys between query and reference features.")

    import metrics  # here, not at the top: it loads torch, which --help need not wait for

    ranks = metrics.official_ranks(queries.vectors, references.vectors, match.targets)
    rank_of = ranks.official
    rows = sorted(({"query": queries.path(i), "reference": references.path(int(match.targets[i])),
                    "rank": int(rank_of[i])} for i in range(len(queries))),
                  key=lambda row: (row["rank"], row["query"]))
    ranks_path = write_jsonl(output_dir / RANKS_FILE, rows)
    numbers = {"MRR": float(np.mean(1.0 / rank_of)),
               **{f"Hit@{k}": float(np.mean(rank_of <= k)) for k in OFFICIAL_KS}}
    print(f"Total query features: {len(queries)}")
    print(f"Total reference features: {len(references)}")
    for name, value in numbers.items():
        print(f"{name}: {round(value, 4)}")
    print(f"Rank details saved in '{ranks_path}'.")

    if args.json:
        report = json_report(args, queries, references, match.targets, ranks, numbers)
        atomic_write_text(args.json, json.dumps(report, indent=2) + "\n")
        print(f"Report saved in '{args.json}'.")
    return 0


def json_report(args: argparse.Namespace, queries, references, targets: np.ndarray, ranks: metrics.Ranks,
                numbers: dict[str, float]) -> dict:
    """Both directions through ``metrics`` (query→reference uses the official ranks themselves)."""
    import metrics

    reverse = metrics.rank_queries(references.vectors, queries.vectors,
                                   query_groups=references.keys, reference_groups=queries.keys)
    ks = metrics.DEFAULT_KS
    return {
        "query_folder": args.query_folder, "reference_folder": args.reference_folder,
        "n_query_files": len(queries), "n_reference_files": len(references), "n_keys": len(references),
        "shadowed_reference_files": references.shadowed_paths(),
        "official": numbers,
        "settings": {"similarity": "cosine, float32 (near-ties within "
                                   f"{metrics.NEAR_TIE_TOLERANCE:g} settled by torch.cosine_similarity)",
                     "ks": list(ks), "n_resamples": args.n_resamples, "seed": args.seed,
                     "tie_rules": metrics.TIE_RULES,
                     "reference_to_query": "each reference against all query files; every file of its key "
                                           "is correct, the best-ranked one counts",
                     "pair_cosines": "query file i with its reference; 'unmatched' pairs are all (i, j != i), "
                                     "so files of one key count there too when a key has several"},
        "query_to_reference": metrics.summarise(ranks, ks, args.n_resamples, args.seed),
        "reference_to_query": metrics.summarise(reverse, ks, args.n_resamples, args.seed),
        "pair_cosines": metrics.pair_cosines(queries.vectors, references.vectors[targets]),
    }


if __name__ == "__main__":
    sys.exit(main())
