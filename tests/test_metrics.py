"""metrics: chunked ranks, both tie rules, summaries, pair cosines and the bootstrap, each checked
against a brute-force computation over the full similarity matrix or an exact enumeration."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from metrics import (
    Ranks,
    bootstrap_interval,
    bootstrap_intervals,
    compare_ranks,
    mrr,
    pair_cosines,
    paired_difference,
    rank_queries,
    retrieval_report,
    summarise,
)

KS = (1, 2, 5, 10)


def tied_pairs(n: int = 23, dim: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Row-paired text and music features with exact ties: three copies of one music row, a pair of
    duplicate music rows, and a pair of duplicate text rows."""
    rng = np.random.default_rng(seed)
    text = rng.standard_normal((n, dim)).astype(np.float32)
    music = (0.6 * text + rng.standard_normal((n, dim))).astype(np.float32)
    music[5] = music[9] = music[2]
    music[14] = music[11]
    text[7] = text[3]
    return text, music


def brute_force(queries: np.ndarray, references: np.ndarray, correct: list[set[int]], ks=KS) -> dict:
    """Official ranks by sorting on (similarity, is_correct), and expectations under random
    tie-breaking by enumerating every order of the tie group of the best correct item."""
    sims = (F.normalize(torch.as_tensor(queries).float(), dim=1)
            @ F.normalize(torch.as_tensor(references).float(), dim=1).T).numpy()
    official, expected, reciprocal = [], [], []
    hits = {k: [] for k in ks}
    for i, row in enumerate(sims.tolist()):
        order = sorted(((s, j in correct[i]) for j, s in enumerate(row)), reverse=True)
        official.append(next(p for p, (_, is_correct) in enumerate(order) if is_correct) + 1)
        best = max(row[j] for j in correct[i])
        above = sum(s > best for s in row)
        group = [j in correct[i] for j, s in enumerate(row) if s == best]
        ranks = [above + 1 + perm.index(True) for perm in itertools.permutations(group)]
        expected.append(np.mean(ranks))
        reciprocal.append(np.mean([1 / r for r in ranks]))
        for k in ks:
            hits[k].append(np.mean([r <= k for r in ranks]))
    return {"official": np.array(official), "expected": np.array(expected), "reciprocal": np.array(reciprocal),
            "hits": {k: np.array(v) for k, v in hits.items()}}


def assert_matches(ranks: Ranks, brute: dict) -> None:
    np.testing.assert_array_equal(ranks.official, brute["official"])
    assert ranks.official.dtype == np.int64
    np.testing.assert_allclose(ranks.expected, brute["expected"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(ranks.reciprocal_expected, brute["reciprocal"], rtol=0, atol=1e-12)
    for k, values in brute["hits"].items():
        np.testing.assert_allclose(ranks.hits(k, "expected"), values, rtol=0, atol=1e-12)
        np.testing.assert_array_equal(ranks.hits(k, "official"), brute["official"] <= k)


@pytest.mark.parametrize("chunk_size", [1, 4, 7, 100])
def test_single_target_ranks_match_brute_force_with_ties(chunk_size):
    text, music = tied_pairs()
    n = len(text)
    for queries, references in ((text, music), (music, text)):
        ranks = rank_queries(queries, references, np.arange(n), chunk_size=chunk_size)
        brute = brute_force(queries, references, [{i} for i in range(n)])
        assert_matches(ranks, brute)
        assert ranks.pool_size == n and ranks.n_queries == n
    ranks = rank_queries(text, music, list(range(n)), chunk_size=chunk_size)
    # Queries 2, 5, 9 each tie with the two other copies of their music row; 11 and 14 with one.
    assert ranks.tied_others[[2, 5, 9, 11, 14]].tolist() == [2, 2, 2, 1, 1]
    assert (ranks.expected > ranks.official).sum() == 5


@pytest.mark.parametrize("chunk_size", [3, 5, 64])
def test_several_correct_items_match_brute_force(chunk_size):
    text, music = tied_pairs()
    rng = np.random.default_rng(1)
    correct = [sorted({i, *rng.choice(len(music), size=rng.integers(0, 3), replace=True).tolist()})
               for i in range(len(text))]
    correct[0] = [2, 5]  # two tied correct copies and one tied other (music 9): c = 2, t = 1
    correct[1] = [2, 5, 9]  # the whole tie group correct
    correct[4] = [4, 4]  # a repeated index is one item
    ranks = rank_queries(text, music, correct, chunk_size=chunk_size)
    assert_matches(ranks, brute_force(text, music, [set(c) for c in correct]))
    assert ranks.tied_correct[:2].tolist() == [2, 3] and ranks.tied_others[:2].tolist() == [1, 0]
    assert ranks.n_correct.tolist() == [len(set(c)) for c in correct]


def test_group_keys_match_explicit_target_lists():
    text, music = tied_pairs()
    keys = [f"caption {i % 9}" for i in range(len(text))]
    keys[9] = "lonely"
    by_key = [{j for j, other in enumerate(keys) if other == key} for key in keys]
    ranks = rank_queries(text, music, query_groups=keys, reference_groups=keys, chunk_size=6)
    assert_matches(ranks, brute_force(text, music, by_key))
    explicit = rank_queries(text, music, [sorted(s) for s in by_key], chunk_size=5)
    np.testing.assert_array_equal(ranks.official, explicit.official)
    np.testing.assert_array_equal(ranks.reciprocal_expected, explicit.reciprocal_expected)


def test_all_references_identical_is_one_tie_group():
    references = np.ones((6, 4), dtype=np.float32)
    ranks = rank_queries(np.eye(3, 4, dtype=np.float32), references, [0, 3, 5], chunk_size=2)
    assert ranks.official.tolist() == [1, 1, 1]
    np.testing.assert_allclose(ranks.expected, 3.5)
    np.testing.assert_allclose(ranks.reciprocal_expected, sum(1 / r for r in range(1, 7)) / 6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_input_is_ranked_in_float32(dtype):
    text, music = tied_pairs()
    low_text, low_music = torch.as_tensor(text).to(dtype), torch.as_tensor(music).to(dtype)
    ranks = rank_queries(low_text, low_music, torch.arange(len(text)), chunk_size=4, device="cpu")
    reference = rank_queries(low_text.float(), low_music.float(), np.arange(len(text)), chunk_size=4)
    np.testing.assert_array_equal(ranks.greater, reference.greater)
    np.testing.assert_array_equal(ranks.tied_others, reference.tied_others)
    assert mrr(low_text, low_music) == pytest.approx(float(reference.reciprocal_official.mean()), abs=1e-15)
    numpy_half = rank_queries(text.astype(np.float16), music.astype(np.float16), np.arange(len(text)))
    assert numpy_half.official.shape == (len(text),)


@pytest.mark.parametrize(("g", "t", "c"), [(g, t, c) for g in (0, 2) for t in range(5) for c in range(1, 4)])
def test_tie_group_expectations_by_exact_enumeration(g, t, c):
    ranks = Ranks(np.array([g]), np.array([t]), np.array([c]), np.array([c]), pool_size=g + t + c + 1)
    orders = list(itertools.permutations([True] * c + [False] * t))
    first = [g + 1 + order.index(True) for order in orders]
    assert ranks.official[0] == g + 1
    assert ranks.expected[0] == pytest.approx(np.mean(first), abs=1e-12)
    assert ranks.reciprocal_expected[0] == pytest.approx(np.mean([1 / r for r in first]), abs=1e-12)
    for k in range(1, g + t + c + 2):
        assert ranks.hits(k, "expected")[0] == pytest.approx(np.mean([r <= k for r in first]), abs=1e-12)


@pytest.mark.parametrize(("pool", "n_correct"), [(1, 1), (2, 1), (4, 1), (6, 1), (5, 2), (6, 3)])
def test_random_baseline_by_exact_enumeration(pool, n_correct):
    orders = list(itertools.permutations([True] * n_correct + [False] * (pool - n_correct)))
    first = np.array([order.index(True) + 1 for order in orders])
    ranks = Ranks(np.zeros(2, np.int64), np.zeros(2, np.int64), np.ones(2, np.int64),
                  np.full(2, n_correct), pool_size=pool)
    baseline = summarise(ranks, ks=(1, 3, 10))["random"]
    assert baseline["mrr"] == pytest.approx(np.mean(1 / first), abs=1e-12)
    assert baseline["mean_rank"] == pytest.approx(first.mean(), abs=1e-12)
    for k in (1, 3, 10):
        assert baseline[f"hit@{k}"] == pytest.approx(np.mean(first <= k), abs=1e-12)
    if n_correct == 1:  # the closed forms
        assert baseline["mrr"] == pytest.approx(sum(1 / m for m in range(1, pool + 1)) / pool, abs=1e-12)
        assert baseline["hit@3"] == pytest.approx(min(3, pool) / pool)


def test_summary_values_against_brute_force():
    text, music = tied_pairs()
    n = len(text)
    brute = brute_force(text, music, [{i} for i in range(n)])
    summary = summarise(rank_queries(text, music, np.arange(n), chunk_size=5), ks=KS)
    assert summary["n_queries"] == n and summary["pool_size"] == n and summary["queries_with_ties"] == 5
    assert summary["official"]["mrr"] == pytest.approx(np.mean(1 / brute["official"]), abs=1e-12)
    assert summary["official"]["mean_rank"] == pytest.approx(brute["official"].mean(), abs=1e-12)
    assert summary["official"]["median_rank"] == float(np.median(brute["official"]))
    assert summary["expected"]["mrr"] == pytest.approx(brute["reciprocal"].mean(), abs=1e-12)
    assert summary["expected"]["mean_rank"] == pytest.approx(brute["expected"].mean(), abs=1e-12)
    assert summary["expected"]["median_rank"] == float(np.median(brute["expected"]))
    for k in KS:
        assert summary["official"][f"hit@{k}"] == pytest.approx(np.mean(brute["official"] <= k), abs=1e-12)
        assert summary["expected"][f"hit@{k}"] == pytest.approx(brute["hits"][k].mean(), abs=1e-12)
    assert summary["expected"]["mrr"] < summary["official"]["mrr"]
    assert "ci" not in summary


def test_summary_intervals_bracket_the_estimates():
    text, music = tied_pairs(n=300, dim=16)
    summary = summarise(rank_queries(text, music, np.arange(300)), ks=KS, n_resamples=500, seed=3)
    assert summary["ci"]["level"] == 0.95 and summary["ci"]["n_resamples"] == 500
    for rule in ("official", "expected"):
        assert set(summary["ci"][rule]) == {"mrr", "mean_rank", *(f"hit@{k}" for k in KS)}
        for name, (low, high) in summary["ci"][rule].items():
            assert low <= summary[rule][name] <= high and low < high


def test_bootstrap_is_seeded_contains_the_mean_and_narrows_with_n():
    rng = np.random.default_rng(0)
    small, large = (rng.random(200) < 0.3).astype(float), (rng.random(5000) < 0.3).astype(float)
    assert bootstrap_interval(small, seed=7) == bootstrap_interval(small, seed=7)
    assert bootstrap_interval(small, seed=7) != bootstrap_interval(small, seed=8)
    for values in (small, large):
        low, high = bootstrap_interval(values)
        assert low <= values.mean() <= high
    width_small = np.subtract(*bootstrap_interval(small)[::-1])
    width_large = np.subtract(*bootstrap_interval(large)[::-1])
    assert width_large < width_small / 3  # ~ sqrt(5000 / 200) = 5 times narrower
    normal_width = 2 * 1.96 * math.sqrt(large.mean() * (1 - large.mean()) / large.size)
    assert width_large == pytest.approx(normal_width, rel=0.15)
    # Several columns share one set of resamples: each interval is the one it would get alone.
    shared = bootstrap_intervals({"a": small, "b": 1 - small}, seed=7)
    assert tuple(shared["a"]) == bootstrap_interval(small, seed=7)
    assert shared["b"] == pytest.approx([1 - shared["a"][1], 1 - shared["a"][0]])


def test_paired_difference_identical_and_clearly_better_systems():
    rng = np.random.default_rng(0)
    baseline = rng.random(400)
    same = paired_difference(baseline, baseline.copy(), seed=1)
    assert same["mean_diff"] == 0 and same["ci"] == [0.0, 0.0]
    assert same["p_value"] == 1.0 and same["bootstrap_p_value"] == 1.0
    better = np.clip(baseline + 0.05 + 0.1 * rng.standard_normal(400), 0, None)
    result = paired_difference(better, baseline, n_resamples=2000, seed=1)
    assert result["mean_diff"] == pytest.approx(better.mean() - baseline.mean())
    assert 0 < result["ci"][0] <= result["mean_diff"] <= result["ci"][1]
    assert result["p_value"] == pytest.approx(1 / 2001) and result["bootstrap_p_value"] == 0.0
    assert paired_difference(better, baseline, n_resamples=2000, seed=1) == result
    noise = paired_difference(baseline + 0.01 * rng.standard_normal(400), baseline, seed=2)
    assert noise["p_value"] > 0.05 and noise["ci"][0] < 0 < noise["ci"][1]
    with pytest.raises(ValueError, match="one length"):
        paired_difference(baseline, baseline[:-1])


def test_compare_ranks_pairs_every_metric():
    text, music = tied_pairs(n=200, dim=16)
    good = rank_queries(text, music, np.arange(200))
    shuffled = rank_queries(text, np.random.default_rng(0).permutation(music), np.arange(200))
    result = compare_ranks(good, shuffled, ks=KS, n_resamples=500)
    assert set(result) == {"official", "expected"}
    assert result["official"]["mrr"]["p_value"] < 0.01 and result["official"]["mrr"]["mean_diff"] > 0
    assert result["official"]["mean_rank"]["mean_diff"] < 0
    assert compare_ranks(good, good, ks=KS)["expected"]["hit@5"]["p_value"] == 1.0


@pytest.mark.parametrize("chunk_size", [1, 3, 100])
def test_pair_cosines_against_brute_force(chunk_size):
    text, music = tied_pairs()
    a, b = text.astype(np.float64), music.astype(np.float64)
    cosines = (a / np.linalg.norm(a, axis=1, keepdims=True)) @ (b / np.linalg.norm(b, axis=1, keepdims=True)).T
    n = len(a)
    result = pair_cosines(text, music, chunk_size=chunk_size)
    assert result["matched_mean"] == pytest.approx(np.trace(cosines) / n, abs=1e-6)
    assert result["unmatched_mean"] == pytest.approx(cosines[~np.eye(n, dtype=bool)].mean(), abs=1e-6)
    assert result["gap"] == pytest.approx(result["matched_mean"] - result["unmatched_mean"])
    assert result["n_unmatched_pairs"] == n * (n - 1)
    single = pair_cosines(text[:1], music[:1])
    assert single["unmatched_mean"] is None and single["gap"] is None


def test_retrieval_report_both_directions_caption_level_and_json():
    text, music = tied_pairs()
    n = len(text)
    keys = [f"caption {i % 8}" for i in range(n)]
    report = retrieval_report(text, music, text_groups=keys, ks=KS, n_resamples=200, seed=4, chunk_size=6)
    json.dumps(report, allow_nan=False)
    for direction, (queries, references) in (("text_to_music", (text, music)), ("music_to_text", (music, text))):
        expected = summarise(rank_queries(queries, references, np.arange(n)), ks=KS, n_resamples=200, seed=4)
        assert report[direction] == expected
        caption = report["caption_level"][direction]
        assert caption["official"]["mrr"] >= report[direction]["official"]["mrr"]
        assert caption["random"]["mrr"] > report[direction]["random"]["mrr"]
    assert report["caption_level"]["n_groups"] == 8
    assert report["pair_cosines"] == pair_cosines(text, music)
    assert set(report["settings"]["tie_rules"]) == {"official", "expected"}
    assert report["text_to_music"]["official"]["mrr"] == pytest.approx(mrr(text, music, chunk_size=5), abs=1e-15)
    assert "caption_level" not in retrieval_report(text, music, ks=KS, n_resamples=10)


def test_invalid_inputs_are_named():
    text, music = tied_pairs()
    with pytest.raises(ValueError, match="out of range"):
        rank_queries(text, music, np.full(len(text), len(music)))
    with pytest.raises(ValueError, match="no correct reference"):
        rank_queries(text[:2], music, [[0], []])
    with pytest.raises(ValueError, match="no reference with their key"):
        rank_queries(text[:2], music[:2], query_groups=["a", "z"], reference_groups=["a", "b"])
    for correct in ({}, {"query_groups": ["a"] * len(text)},
                    {"targets": np.arange(len(text)), "query_groups": ["a"] * len(text), "reference_groups": ["a"] * 23}):
        with pytest.raises(ValueError, match="either targets or both"):
            rank_queries(text, music, **correct)
    with pytest.raises(ValueError, match="dimension"):
        rank_queries(text, music[:, :4], np.arange(len(text)))
    with pytest.raises(ValueError, match="3 targets for"):
        rank_queries(text, music, [0, 1, 2])
    broken = text.copy()
    broken[3, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        mrr(broken, music)
