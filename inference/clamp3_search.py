"""The features of a folder nearest to one query feature by cosine similarity.

    python inference/clamp3_search.py QUERY.npy FEATURES_FOLDER [--top_k K] [--json]

QUERY.npy and every ``.npy`` under FEATURES_FOLDER are ``(1, D)`` global features
(``extract_clamp3.py --get_global``). Prints the K best, most similar first (equal scores in sorted
path order): rank, float32 cosine, key (folder + name up to the first dot) and file. ``--json``
prints the same as one JSON object instead, for scripts.
"""

from __future__ import annotations

import argparse
import json
import sys

from retrieval import FeatureFileError, load_feature, load_feature_folder


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("query", help="the query feature (.npy, shape (1, D))")
    parser.add_argument("features_folder", help="folder of features to search (.npy, searched recursively)")
    parser.add_argument("--top_k", type=int, default=10, help="how many results (default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.top_k < 1:
        parser.error(f"--top_k must be positive, got {args.top_k}")
    try:
        query = load_feature(args.query)
        features = load_feature_folder(args.features_folder)
    except (FileNotFoundError, FeatureFileError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if query.shape[0] != features.dimension:
        print(f"error: {args.query} has dimension {query.shape[0]}, the features {features.dimension}",
              file=sys.stderr)
        return 2
    from metrics import top_k  # here, not at the top: it loads torch, which --help need not wait for

    indices, scores = top_k(query, features.vectors, args.top_k)
    results = [{"rank": rank, "score": float(score), "key": features.keys[index], "file": features.path(index)}
               for rank, (index, score) in enumerate(zip(indices[0].tolist(), scores[0], strict=True), 1)]
    if args.json:
        print(json.dumps({"query": args.query, "features_folder": args.features_folder,
                          "n_features": len(features), "results": results}, indent=2))
        return 0
    print(f"{len(results)} nearest of {len(features)} features to {args.query}:")
    for result in results:
        print(f"{result['rank']:>5}  {result['score']:.4f}  {result['key']}  {result['file']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
