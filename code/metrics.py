"""Retrieval metrics: the one place that turns features into ranks, and ranks into reported numbers.

Similarity is cosine in float32 (rows normalised, then one matmul per chunk, ``_cosine_chunks``), as
in the official ``inference/clamp3_eval.py``. The full query × reference matrix is never built: each
chunk of queries only counts, per query, the references more similar than its best correct one and
those exactly as similar, so memory is O(chunk × pool). Three functions rank: ``rank_queries`` (both
tie rules, one or several correct items), ``official_ranks`` (the official tool's ranks to the bit,
near-ties settled by ``torch.cosine_similarity``) and ``top_k`` (the nearest references of a query).

Two tie rules are always reported side by side:

- ``official``: a tie counts in favour of the correct item (the official sort by
  ``(similarity, is_correct)``), rank = 1 + #references strictly more similar.
- ``expected``: the expectation under a uniformly random order within the tie group. With ``c``
  correct and ``t`` other references tied at the best correct similarity and ``g`` above it,
  E[rank] = 1 + g + t / (c + 1). Its MRR is the exact mean of E[1/rank] over that order (for one
  correct item: the mean of 1/(g+1), ..., 1/(g+t+1)), not 1 / E[rank]; its Hit@k is P(rank <= k).

Exact float ties arise from identical rows (duplicate pieces or captions); similarities of distinct
rows agree with another chunk size or device only to float32 rounding (~1e-7), so near-ties that
close may order differently there, as they would between any two matmul implementations.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
import torch.nn.functional as F

FeatureArray = np.ndarray | torch.Tensor
Targets = Sequence[int] | np.ndarray | torch.Tensor | Sequence[Sequence[int]]
DEFAULT_KS = (1, 5, 10, 100)
TIE_RULES = {
    "official": "ties broken in favour of the correct item (official clamp3_eval): rank = 1 + #greater",
    "expected": "expectation under random tie-breaking: rank = 1 + #greater + #tied_others / (#tied_correct + 1); "
                "mrr = mean of exact E[1/rank]; hit@k = P(rank <= k)",
}
P_VALUE_METHOD = "paired sign-flip permutation test, two-sided, p = (1 + #|flipped mean| >= |observed|) / (1 + B)"
# How far apart the two float32 cosines (normalised rows times matmul, and torch.cosine_similarity)
# may be: measured at most ~1.2e-7 for D = 768, so this leaves two orders of magnitude of margin.
NEAR_TIE_TOLERANCE = 1e-5
# Resampling works on blocks of at most this many (resample, query) cells, so memory stays bounded.
_RESAMPLE_BLOCK_CELLS = 1 << 22


@dataclass(frozen=True, eq=False)
class Ranks:
    """Per-query rank ingredients for one retrieval direction; every rank is derived from them.

    ``greater``: references strictly more similar than the query's best correct reference;
    ``tied_others`` / ``tied_correct``: non-correct / correct references exactly as similar as it
    (``tied_correct`` counts the best one itself, so it is >= 1); ``n_correct``: all correct references.
    """

    greater: np.ndarray
    tied_others: np.ndarray
    tied_correct: np.ndarray
    n_correct: np.ndarray
    pool_size: int

    @property
    def n_queries(self) -> int:
        return int(self.greater.shape[0])

    @property
    def official(self) -> np.ndarray:
        """1-based int64 ranks with ties in favour of the correct item."""
        return self.greater + 1

    @property
    def expected(self) -> np.ndarray:
        """Expected 1-based ranks under random tie-breaking (float64)."""
        return 1.0 + self.greater + self.tied_others / (self.tied_correct + 1.0)

    @property
    def reciprocal_official(self) -> np.ndarray:
        return 1.0 / self.official

    @cached_property
    def reciprocal_expected(self) -> np.ndarray:
        """E[1/rank] under random tie-breaking (float64)."""
        return _expected_reciprocal(self.greater, self.tied_others, self.tied_correct, self.pool_size)

    def hits(self, k: int, rule: str) -> np.ndarray:
        """Per-query Hit@k: 0/1 for ``official``, P(rank <= k) for ``expected``."""
        if rule == "official":
            return (self.official <= k).astype(np.float64)
        if rule == "expected":
            return _hit_probability(self.greater, self.tied_others, self.tied_correct, k)
        raise ValueError(f"unknown tie rule {rule!r}; expected one of {sorted(TIE_RULES)}")


def rank_queries(
    queries: FeatureArray,
    references: FeatureArray,
    targets: Targets | None = None,
    *,
    query_groups: Sequence[Hashable] | None = None,
    reference_groups: Sequence[Hashable] | None = None,
    chunk_size: int = 1024,
    device: str | torch.device | None = None,
) -> Ranks:
    """Rank each query's correct references among all ``references`` by cosine similarity.

    Correct items are given either by ``targets`` (one reference index per query, or a sequence of
    index sequences for several correct items) or by group keys (``query_groups[i] ==
    reference_groups[j]`` makes reference j correct for query i). With several correct items the
    rank is that of the best-ranked one. ``device`` (default CPU) is where the matmuls run.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    device = torch.device(device) if device is not None else torch.device("cpu")
    query_matrix = _as_matrix(queries, "queries")
    reference_matrix = _as_matrix(references, "references")
    n_queries, pool_size = query_matrix.shape[0], reference_matrix.shape[0]
    if query_matrix.shape[1] != reference_matrix.shape[1]:
        raise ValueError(f"queries have dimension {query_matrix.shape[1]}, references {reference_matrix.shape[1]}")
    correct = _CorrectItems(targets, query_groups, reference_groups, n_queries, pool_size, device)

    greater = np.empty(n_queries, dtype=np.int64)
    tied_others = np.empty(n_queries, dtype=np.int64)
    tied_correct = np.empty(n_queries, dtype=np.int64)
    n_correct = np.empty(n_queries, dtype=np.int64)
    with torch.no_grad():
        for start, stop, sims in _cosine_chunks(query_matrix, reference_matrix, chunk_size,
                                                lambda rows, name: _normalised(rows, device, name)):
            mask = correct.mask(start, stop)
            if mask is None:
                best = sims.gather(1, correct.single[start:stop, None])
                tied = (sims == best).sum(1)
                tied_correct_chunk = torch.ones_like(tied)
                n_correct_chunk = tied_correct_chunk
            else:
                best = sims.masked_fill(~mask, -math.inf).amax(1, keepdim=True)
                equal = sims == best
                tied = equal.sum(1)
                tied_correct_chunk = (equal & mask).sum(1)
                n_correct_chunk = mask.sum(1)
            greater[start:stop] = (sims > best).sum(1).cpu().numpy()
            tied_others[start:stop] = (tied - tied_correct_chunk).cpu().numpy()
            tied_correct[start:stop] = tied_correct_chunk.cpu().numpy()
            n_correct[start:stop] = n_correct_chunk.cpu().numpy()
    return Ranks(greater, tied_others, tied_correct, n_correct, pool_size)


def official_ranks(queries: FeatureArray, references: FeatureArray, targets: np.ndarray, chunk_size: int = 512,
                   tolerance: float = NEAR_TIE_TOLERANCE) -> Ranks:
    """Ranks of each query's one correct reference (``targets[i]``), identical to the official
    ``clamp3_eval.py``: rank = 1 + #references whose ``torch.cosine_similarity`` (float32) with the
    query is greater than the correct one's, so an exact tie counts in favour of the correct item.

    Why not ``rank_queries`` alone: the fast cosine (rows normalised, one matmul per chunk) and
    ``torch.cosine_similarity`` round differently, by up to ~1e-7, so a reference that close to the
    correct one may fall on the other side of it (a few queries in 5,000 random ones of D = 768).
    Here the matmul decides every reference further than ``tolerance`` from the correct similarity,
    and the few within it (the correct one included) are recomputed with ``torch.cosine_similarity``
    (a row pair's value does not depend on the other rows of the call), which settles near-ties and
    exact duplicates the official way. The result is a ``Ranks`` (one correct item per query) for
    ``summarise``.
    """
    query_matrix = _as_float32_tensor(queries, "queries")
    reference_matrix = _as_float32_tensor(references, "references")
    targets = np.asarray(targets, dtype=np.int64)
    n_queries, pool_size = query_matrix.shape[0], reference_matrix.shape[0]
    if targets.shape != (n_queries,):
        raise ValueError(f"{targets.shape} targets for {n_queries} queries")
    if n_queries and (targets.min() < 0 or targets.max() >= pool_size):
        raise ValueError(f"target index out of range for a pool of {pool_size}")
    if query_matrix.shape[1] != reference_matrix.shape[1]:
        raise ValueError(f"queries have dimension {query_matrix.shape[1]}, references {reference_matrix.shape[1]}")
    target_tensor = torch.from_numpy(targets)
    greater = np.empty(n_queries, dtype=np.int64)
    tied_others = np.zeros(n_queries, dtype=np.int64)
    with torch.no_grad():
        for start, stop, sims in _cosine_chunks(query_matrix, reference_matrix, chunk_size, _unit_rows):
            gaps = sims.sub_(sims.gather(1, target_tensor[start:stop, None]))  # in place: no new chunk
            greater_chunk = (gaps > tolerance).sum(1)
            # Every (query, reference) pair within the tolerance, the correct pairs included, in one
            # call: torch.cosine_similarity's value for a row pair is the same as in the official
            # one-query-against-all call (tested).
            rows, columns = torch.nonzero(gaps.abs_() <= tolerance, as_tuple=True)
            exact = torch.cosine_similarity(query_matrix[start + rows], reference_matrix[columns])
            is_correct = columns == target_tensor[start + rows]
            exact_correct = torch.empty(stop - start, dtype=exact.dtype).index_put_((rows[is_correct],),
                                                                                   exact[is_correct])
            greater_chunk.index_add_(0, rows, (exact > exact_correct[rows]).to(greater_chunk.dtype))
            ties = torch.zeros_like(greater_chunk).index_add_(
                0, rows, (exact == exact_correct[rows]).to(greater_chunk.dtype))
            greater[start:stop] = greater_chunk.numpy()
            tied_others[start:stop] = ties.numpy() - 1
    ones = np.ones(n_queries, dtype=np.int64)
    return Ranks(greater, tied_others, ones, ones.copy(), pool_size)


def top_k(queries: FeatureArray, features: FeatureArray, k: int,
          chunk_size: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` features most cosine-similar to each query (float32): ``(indices, scores)``, each
    ``(queries, min(k, N))``, best first; equal scores in index order. ``queries`` may be one ``(D,)``
    vector. Features are scanned ``chunk_size`` rows at a time, so memory stays O(queries × chunk)."""
    if k < 1:
        raise ValueError(f"k must be positive, got {k}")
    query_matrix = torch.as_tensor(queries).to(dtype=torch.float32)
    if query_matrix.ndim == 1:
        query_matrix = query_matrix[None]
    feature_matrix = _as_float32_tensor(features, "features")
    if query_matrix.ndim != 2 or query_matrix.shape[1] != feature_matrix.shape[1]:
        raise ValueError(f"queries of shape {tuple(query_matrix.shape)} do not match features of "
                         f"dimension {feature_matrix.shape[1]}")
    n_queries = query_matrix.shape[0]
    best_scores = torch.empty((n_queries, 0), dtype=torch.float32)
    best_indices = torch.empty((n_queries, 0), dtype=torch.int64)
    with torch.no_grad():
        for start, _, sims in _cosine_chunks(query_matrix, feature_matrix, chunk_size, _unit_rows, over="references"):
            # A stable sort (not topk) keeps equal scores in index order, so the cut at k is deterministic.
            scores, order = torch.sort(sims, dim=1, descending=True, stable=True)
            scores = torch.cat([best_scores, scores[:, :k]], dim=1)
            indices = torch.cat([best_indices, order[:, :k] + start], dim=1)
            scores, merged = torch.sort(scores, dim=1, descending=True, stable=True)
            best_scores, best_indices = scores[:, :k], indices.gather(1, merged)[:, :k]
    return best_indices.numpy(), best_scores.numpy()


def mrr(text_features: FeatureArray, music_features: FeatureArray, chunk_size: int = 1024,
        device: str | torch.device | None = None) -> float:
    """Text→music MRR of row-paired features, official tie rule: the cheap per-epoch validation number."""
    n = _as_matrix(text_features, "text_features").shape[0]
    ranks = rank_queries(text_features, music_features, np.arange(n), chunk_size=chunk_size, device=device)
    return float(ranks.reciprocal_official.mean())


def per_query_metrics(ranks: Ranks, ks: Sequence[int] = DEFAULT_KS) -> dict[str, dict[str, np.ndarray]]:
    """Per-query values whose means are the reported metrics, by tie rule then metric name."""
    columns: dict[str, dict[str, np.ndarray]] = {}
    for rule, rank, reciprocal in (("official", ranks.official, ranks.reciprocal_official),
                                   ("expected", ranks.expected, ranks.reciprocal_expected)):
        columns[rule] = {"mrr": reciprocal, **{f"hit@{k}": ranks.hits(k, rule) for k in ks},
                         "mean_rank": rank.astype(np.float64)}
    return columns


def summarise(ranks: Ranks, ks: Sequence[int] = DEFAULT_KS, n_resamples: int = 0, seed: int = 0,
              level: float = 0.95) -> dict:
    """MRR, Hit@k, mean and median rank for both tie rules, the random-ranking baseline on the same
    pool, and (when ``n_resamples`` > 0) bootstrap intervals of every per-query-mean metric.

    The ``expected`` median rank is the median of per-query expected ranks. The random baseline is
    exact: with one correct item per query its MRR is H_M / M and its Hit@k min(k, M) / M.
    """
    if ranks.n_queries == 0:
        raise ValueError("no queries to summarise")
    columns = per_query_metrics(ranks, ks)
    summary: dict = {"n_queries": ranks.n_queries, "pool_size": ranks.pool_size,
                     "queries_with_ties": int((ranks.tied_others > 0).sum())}
    for rule, rank in (("official", ranks.official), ("expected", ranks.expected)):
        summary[rule] = {name: float(values.mean()) for name, values in columns[rule].items()}
        summary[rule]["median_rank"] = float(np.median(rank))
    summary["random"] = _random_baseline(ranks, ks)
    if n_resamples > 0:
        flat = {(rule, name): values for rule, by_name in columns.items() for name, values in by_name.items()}
        intervals = bootstrap_intervals(flat, n_resamples=n_resamples, seed=seed, level=level)
        summary["ci"] = {"level": level, "n_resamples": n_resamples, "seed": seed, "method": "percentile bootstrap over queries",
                         **{rule: {name: intervals[(rule, name)] for name in columns[rule]} for rule in columns}}
    return summary


def pair_cosines(a: FeatureArray, b: FeatureArray, chunk_size: int = 4096,
                 device: str | torch.device | None = None) -> dict:
    """Mean cosine of matched rows (a_i, b_i), of all N(N-1) unmatched pairs (a_i, b_j≠i), and the gap.

    The unmatched mean is exact without the pair matrix: the sum over all pairs of normalised rows is
    (Σ a_i)·(Σ b_j), accumulated in float64, minus the matched sum.
    """
    a_matrix, b_matrix = _as_matrix(a, "a"), _as_matrix(b, "b")
    if a_matrix.shape != b_matrix.shape:
        raise ValueError(f"paired features must have the same shape, got {tuple(a_matrix.shape)} and {tuple(b_matrix.shape)}")
    device = torch.device(device) if device is not None else torch.device("cpu")
    n = a_matrix.shape[0]
    if n == 0:
        raise ValueError("no pairs")
    sum_a = torch.zeros(a_matrix.shape[1], dtype=torch.float64, device=device)
    sum_b = torch.zeros_like(sum_a)
    matched_sum = 0.0
    with torch.no_grad():
        for start in range(0, n, chunk_size):
            chunk_a = _normalised(a_matrix[start:start + chunk_size], device, "a").double()
            chunk_b = _normalised(b_matrix[start:start + chunk_size], device, "b").double()
            matched_sum += float((chunk_a * chunk_b).sum())
            sum_a += chunk_a.sum(0)
            sum_b += chunk_b.sum(0)
    matched_mean = matched_sum / n
    unmatched_mean = (float(sum_a @ sum_b) - matched_sum) / (n * (n - 1)) if n > 1 else None
    gap = matched_mean - unmatched_mean if unmatched_mean is not None else None
    return {"matched_mean": matched_mean, "unmatched_mean": unmatched_mean, "gap": gap,
            "n_pairs": n, "n_unmatched_pairs": n * (n - 1)}


def bootstrap_intervals(columns: Mapping[Hashable, np.ndarray], n_resamples: int = 1000, seed: int = 0,
                        level: float = 0.95) -> dict[Hashable, list[float]]:
    """Percentile bootstrap intervals of the means of several per-query columns, all from the same
    resamples of queries (so the intervals of related metrics are consistent with one another)."""
    names = list(columns)
    matrix = np.stack([np.asarray(columns[name], dtype=np.float64) for name in names])
    means = _resampled_means(matrix, n_resamples, np.random.default_rng(seed))
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2], axis=0)
    return {name: [float(low[i]), float(high[i])] for i, name in enumerate(names)}


def bootstrap_interval(values: np.ndarray, n_resamples: int = 1000, seed: int = 0,
                       level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (queries resampled with replacement)."""
    low, high = bootstrap_intervals({0: values}, n_resamples=n_resamples, seed=seed, level=level)[0]
    return low, high


def paired_difference(a: np.ndarray, b: np.ndarray, n_resamples: int = 1000, seed: int = 0,
                      level: float = 0.95) -> dict:
    """Mean of ``a - b`` over the same queries, its paired percentile bootstrap interval, and two
    two-sided p-values for "no difference": ``p_value`` from a paired sign-flip permutation test
    (the one to quote) and ``bootstrap_p_value`` = 2 × the smaller bootstrap tail beyond 0."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"paired values must be two non-empty 1-D arrays of one length, got {a.shape} and {b.shape}")
    diff = a - b
    observed = float(diff.mean())
    rng = np.random.default_rng(seed)
    boot = _resampled_means(diff[None, :], n_resamples, rng)[:, 0]
    low, high = np.quantile(boot, [(1 - level) / 2, (1 + level) / 2])
    flipped = _sign_flipped_means(diff, n_resamples, rng)
    # Flipped means that equal the observed one in exact arithmetic can differ from it in rounding.
    tolerance = 1e-12 * max(1.0, float(np.abs(diff).max()))
    extreme = int((np.abs(flipped) >= abs(observed) - tolerance).sum())
    bootstrap_tail = min(float((boot <= 0).mean()), float((boot >= 0).mean()))
    return {"n": int(diff.size), "mean_a": float(a.mean()), "mean_b": float(b.mean()), "mean_diff": observed,
            "ci": [float(low), float(high)], "level": level, "p_value": (1 + extreme) / (1 + n_resamples),
            "p_value_method": P_VALUE_METHOD, "bootstrap_p_value": min(1.0, 2 * bootstrap_tail),
            "n_resamples": n_resamples, "seed": seed}


def compare_ranks(ranks_a: Ranks, ranks_b: Ranks, ks: Sequence[int] = DEFAULT_KS, n_resamples: int = 1000,
                  seed: int = 0, level: float = 0.95) -> dict:
    """Paired differences (system a − system b) of every per-query-mean metric, both tie rules."""
    if ranks_a.n_queries != ranks_b.n_queries or ranks_a.pool_size != ranks_b.pool_size:
        raise ValueError("paired comparison needs the same queries and pool: got "
                         f"{ranks_a.n_queries}×{ranks_a.pool_size} and {ranks_b.n_queries}×{ranks_b.pool_size}")
    columns_a, columns_b = per_query_metrics(ranks_a, ks), per_query_metrics(ranks_b, ks)
    return {rule: {name: paired_difference(columns_a[rule][name], columns_b[rule][name], n_resamples, seed, level)
                   for name in columns_a[rule]} for rule in columns_a}


def retrieval_report(
    text_features: FeatureArray,
    music_features: FeatureArray,
    text_groups: Sequence[Hashable] | None = None,
    ks: Sequence[int] = DEFAULT_KS,
    n_resamples: int = 1000,
    seed: int = 0,
    chunk_size: int = 1024,
    device: str | torch.device | None = None,
    level: float = 0.95,
) -> dict:
    """Text→music and music→text metrics of row-paired features (row i of one matches row i of the
    other), pair cosines, and, given ``text_groups`` (one key per row, e.g. the normalised caption),
    caption-level metrics where every item whose key equals the query's counts as correct.
    JSON-ready: plain floats, ints, lists and dicts."""
    n = _as_matrix(text_features, "text_features").shape[0]
    if _as_matrix(music_features, "music_features").shape[0] != n:
        raise ValueError("text and music features must have one row per pair")
    pairs = np.arange(n)

    def directions(**correct) -> dict:
        return {
            name: summarise(rank_queries(queries, refs, **correct, chunk_size=chunk_size, device=device),
                            ks, n_resamples, seed, level)
            for name, queries, refs in (("text_to_music", text_features, music_features),
                                        ("music_to_text", music_features, text_features))
        }

    report = {"settings": {"similarity": "cosine, float32", "ks": list(ks), "n_resamples": n_resamples,
                           "seed": seed, "level": level, "tie_rules": TIE_RULES},
              **directions(targets=pairs),
              "pair_cosines": pair_cosines(text_features, music_features, device=device)}
    if text_groups is not None:
        if len(text_groups) != n:
            raise ValueError(f"text_groups has {len(text_groups)} keys for {n} pairs")
        report["caption_level"] = {"n_groups": len(set(text_groups)),
                                   **directions(query_groups=text_groups, reference_groups=text_groups)}
    return report


class _CorrectItems:
    """Which references are correct for each query, as a per-chunk mask (or one index per query)."""

    def __init__(self, targets: Targets | None, query_groups: Sequence[Hashable] | None,
                 reference_groups: Sequence[Hashable] | None, n_queries: int, pool_size: int,
                 device: torch.device) -> None:
        self.single: torch.Tensor | None = None
        self._offsets: np.ndarray | None = None
        self._flat: torch.Tensor | None = None
        self._query_codes: torch.Tensor | None = None
        self._reference_codes: torch.Tensor | None = None
        self._device = device
        self._pool_size = pool_size
        groups_given = (query_groups is not None, reference_groups is not None)
        if (targets is not None) == any(groups_given) or any(groups_given) != all(groups_given):
            raise ValueError("give either targets or both query_groups and reference_groups")
        if targets is not None:
            self._from_targets(targets, n_queries, pool_size)
        else:
            self._from_groups(query_groups, reference_groups, n_queries, pool_size)

    def _from_targets(self, targets: Targets, n_queries: int, pool_size: int) -> None:
        if _is_flat_int_array(targets):
            as_array = np.asarray(targets.cpu() if isinstance(targets, torch.Tensor) else targets, dtype=np.int64)
            if as_array.shape != (n_queries,):
                raise ValueError(f"{as_array.shape[0]} targets for {n_queries} queries")
            _check_indices(as_array, pool_size)
            self.single = torch.as_tensor(as_array, dtype=torch.int64, device=self._device)
            return
        lists = [np.atleast_1d(np.asarray(item)) for item in targets]
        if len(lists) != n_queries:
            raise ValueError(f"{len(lists)} targets for {n_queries} queries")
        for i, indices in enumerate(lists):
            if indices.size == 0:
                raise ValueError(f"query {i} has no correct reference")
            if not np.issubdtype(indices.dtype, np.integer):
                raise ValueError(f"targets of query {i} are not integer indices: {indices!r}")
            _check_indices(indices, pool_size)
        self._offsets = np.concatenate([[0], np.cumsum([len(indices) for indices in lists])])
        self._flat = torch.as_tensor(np.concatenate(lists), dtype=torch.int64, device=self._device)

    def _from_groups(self, query_groups: Sequence[Hashable], reference_groups: Sequence[Hashable],
                     n_queries: int, pool_size: int) -> None:
        if len(query_groups) != n_queries or len(reference_groups) != pool_size:
            raise ValueError(f"{len(query_groups)} query keys for {n_queries} queries, "
                             f"{len(reference_groups)} reference keys for {pool_size} references")
        codes: dict[Hashable, int] = {}
        reference_codes = [codes.setdefault(key, len(codes)) for key in reference_groups]
        missing = [i for i, key in enumerate(query_groups) if key not in codes]
        if missing:
            raise ValueError(f"{len(missing)} queries have no reference with their key, first: query "
                             f"{missing[0]} ({query_groups[missing[0]]!r})")
        self._query_codes = torch.tensor([codes[key] for key in query_groups], device=self._device)
        self._reference_codes = torch.tensor(reference_codes, device=self._device)

    def mask(self, start: int, stop: int) -> torch.Tensor | None:
        """Boolean (stop - start) × pool mask of correct references; None for one target per query."""
        if self.single is not None:
            return None
        if self._query_codes is not None:
            return self._query_codes[start:stop, None] == self._reference_codes[None, :]
        first, last = int(self._offsets[start]), int(self._offsets[stop])
        rows = torch.repeat_interleave(torch.arange(stop - start, device=self._device),
                                       torch.as_tensor(np.diff(self._offsets[start:stop + 1]), device=self._device))
        mask = torch.zeros((stop - start, self._pool_size), dtype=torch.bool, device=self._device)
        mask[rows, self._flat[first:last]] = True
        return mask


def _is_flat_int_array(targets: Targets) -> bool:
    """One target index per query (as opposed to a sequence of index sequences)."""
    if isinstance(targets, torch.Tensor):
        targets = targets.cpu().numpy()
    if isinstance(targets, np.ndarray):
        return targets.ndim == 1 and np.issubdtype(targets.dtype, np.integer)
    return all(isinstance(item, int | np.integer) and not isinstance(item, bool) for item in targets)


def _check_indices(indices: np.ndarray, pool_size: int) -> None:
    if indices.size and (indices.min() < 0 or indices.max() >= pool_size):
        raise ValueError(f"target index out of range for a pool of {pool_size}: {indices.min()}..{indices.max()}")


def _as_matrix(features: FeatureArray, name: str) -> torch.Tensor:
    """A 2-D CPU or device tensor view of the features (not yet cast: chunks are cast as they are used)."""
    matrix = features if isinstance(features, torch.Tensor) else torch.from_numpy(np.asarray(features))
    if matrix.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (items × dimension) array, got shape {tuple(matrix.shape)}")
    if not matrix.dtype.is_floating_point:
        raise ValueError(f"{name} must be floating point, got {matrix.dtype}")
    return matrix


def _as_float32_tensor(features: FeatureArray, name: str) -> torch.Tensor:
    """A 2-D contiguous float32 CPU copy or view (``official_ranks`` and ``top_k`` work on the CPU)."""
    tensor = torch.as_tensor(features).to(dtype=torch.float32, device="cpu")
    if tensor.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (items × dimension) array, got shape {tuple(tensor.shape)}")
    return tensor.contiguous()


def _normalised(rows: torch.Tensor, device: torch.device, name: str) -> torch.Tensor:
    rows = rows.to(device=device, dtype=torch.float32)
    if not bool(torch.isfinite(rows).all()):
        raise ValueError(f"{name} contain NaN or infinite values")
    return F.normalize(rows, dim=1)


def _unit_rows(rows: torch.Tensor, name: str) -> torch.Tensor:
    """Rows scaled to unit length, as they are (float32 CPU rows already checked by the caller)."""
    return F.normalize(rows, dim=1)


def _cosine_chunks(queries: torch.Tensor, references: torch.Tensor, chunk_size: int,
                   unit: Callable[[torch.Tensor, str], torch.Tensor],
                   over: str = "queries") -> Iterator[tuple[int, int, torch.Tensor]]:
    """The float32 query × reference cosines, one chunk at a time: the one matmul behind every rank and
    search here. Yields ``(start, stop, sims)``: rows ``start:stop`` of the queries against every
    reference (``over="queries"``), or every query against references ``start:stop``
    (``over="references"``). ``unit(rows, name)`` normalises rows (checking or moving them as its
    caller needs); the side that is not chunked is normalised once."""
    if over == "queries":
        fixed = unit(references, "references")
        for start in range(0, queries.shape[0], chunk_size):
            stop = min(start + chunk_size, queries.shape[0])
            yield start, stop, unit(queries[start:stop], "queries") @ fixed.T
    elif over == "references":
        fixed = unit(queries, "queries")
        for start in range(0, references.shape[0], chunk_size):
            stop = min(start + chunk_size, references.shape[0])
            yield start, stop, fixed @ unit(references[start:stop], "references").T
    else:
        raise ValueError(f"over must be 'queries' or 'references', got {over!r}")


def _harmonic_numbers(n: int) -> np.ndarray:
    """H_0 ... H_n."""
    return np.concatenate([[0.0], np.cumsum(1.0 / np.arange(1, n + 1, dtype=np.float64))])


def _survival(x: np.ndarray, tied_others: np.ndarray, tied_correct: np.ndarray) -> np.ndarray:
    """P(the first x items of a random order of the tie group are all non-correct), 0 <= x <= t."""
    t = torch.as_tensor(tied_others, dtype=torch.float64)
    c = torch.as_tensor(tied_correct, dtype=torch.float64)
    x = torch.as_tensor(x, dtype=torch.float64)
    log_survival = (torch.lgamma(t + 1) - torch.lgamma(t - x + 1)
                    + torch.lgamma(t + c - x + 1) - torch.lgamma(t + c + 1))
    survival = torch.exp(log_survival).numpy()
    single = tied_correct == 1  # exact where the closed form is simple: (t + 1 - x) / (t + 1)
    survival[single] = (tied_others[single] + 1.0 - x.numpy()[single]) / (tied_others[single] + 1.0)
    return survival


def _expected_reciprocal(greater: np.ndarray, tied_others: np.ndarray, tied_correct: np.ndarray,
                         pool_size: int) -> np.ndarray:
    """E[1 / (g + 1 + X)] where X counts non-correct items ahead of the first correct one in a random
    order of a tie group of t non-correct and c correct items."""
    g, t, c = greater, tied_others, tied_correct
    result = 1.0 / (g + 1.0)  # exact without others in the tie group
    single = (t > 0) & (c == 1)
    if single.any():  # X is uniform on 0..t: a difference of harmonic numbers
        harmonic = _harmonic_numbers(pool_size)
        gs, ts = g[single], t[single]
        result[single] = (harmonic[gs + ts + 1] - harmonic[gs]) / (ts + 1)
    several = (t > 0) & (c > 1)
    if several.any():  # negative hypergeometric X; few distinct (g, t, c) in practice
        triples, inverse = np.unique(np.stack([g[several], t[several], c[several]], axis=1), axis=0,
                                     return_inverse=True)
        values = np.empty(len(triples))
        for i, (g_i, t_i, c_i) in enumerate(triples):
            steps = np.arange(t_i)
            survival = np.concatenate([[1.0], np.cumprod((t_i - steps) / (t_i + c_i - steps)), [0.0]])
            probability = survival[:-1] - survival[1:]
            values[i] = float((probability / (g_i + 1.0 + np.arange(t_i + 1))).sum())
        result[several] = values[inverse.reshape(-1)]
    return result


def _hit_probability(greater: np.ndarray, tied_others: np.ndarray, tied_correct: np.ndarray,
                     k: int) -> np.ndarray:
    """P(g + 1 + X <= k) under random tie-breaking."""
    allowed = k - 1 - greater  # the most non-correct tied items that may precede the first correct one
    probability = (allowed >= tied_others).astype(np.float64)
    partial = (allowed >= 0) & (allowed < tied_others)
    if partial.any():
        probability[partial] = 1.0 - _survival(allowed[partial] + 1, tied_others[partial], tied_correct[partial])
    return probability


def _random_baseline(ranks: Ranks, ks: Sequence[int]) -> dict:
    """Metrics of a uniformly random ranking of the same pool: the whole pool as one tie group."""
    zeros = np.zeros_like(ranks.n_correct)
    others = ranks.pool_size - ranks.n_correct
    return {"mrr": float(_expected_reciprocal(zeros, others, ranks.n_correct, ranks.pool_size).mean()),
            **{f"hit@{k}": float(_hit_probability(zeros, others, ranks.n_correct, k).mean()) for k in ks},
            "mean_rank": float((1.0 + others / (ranks.n_correct + 1.0)).mean())}


def _resampled_means(matrix: np.ndarray, n_resamples: int, rng: np.random.Generator) -> np.ndarray:
    """(n_resamples × columns) means of bootstrap resamples of the rows of ``matrix.T``."""
    n = matrix.shape[1]
    block = max(1, _RESAMPLE_BLOCK_CELLS // n)
    means = []
    for done in range(0, n_resamples, block):
        size = min(block, n_resamples - done)
        picks = rng.integers(0, n, size=(size, n)) + n * np.arange(size)[:, None]
        counts = np.bincount(picks.ravel(), minlength=size * n).reshape(size, n)
        means.append(counts @ matrix.T / n)
    return np.concatenate(means)


def _sign_flipped_means(diff: np.ndarray, n_resamples: int, rng: np.random.Generator) -> np.ndarray:
    n = diff.size
    block = max(1, _RESAMPLE_BLOCK_CELLS // n)
    means = []
    for done in range(0, n_resamples, block):
        size = min(block, n_resamples - done)
        signs = rng.integers(0, 2, size=(size, n), dtype=np.int8) * 2 - 1
        means.append(signs @ diff / n)
    return np.concatenate(means)
