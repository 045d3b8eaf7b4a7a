"""inference/clamp3_{eval,score,search}.py, code/retrieval.py and metrics.official_ranks/top_k on small
feature folders: the official key rule, ranks against a naive one-query-at-a-time re-implementation of the official sort, the exact
printed lines, where outputs go, unmatched keys, and search against brute force."""

from __future__ import annotations

import builtins
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from fileio import read_jsonl
from helpers import REPO_ROOT, load_script
from metrics import official_ranks, top_k
from retrieval import FeatureFileError, feature_key, load_feature, load_feature_folder, match_keys

INFERENCE = REPO_ROOT / "inference"
DIM = 8




clamp3_eval = load_script(INFERENCE / "clamp3_eval.py")
clamp3_score = load_script(INFERENCE / "clamp3_score.py")
clamp3_search = load_script(INFERENCE / "clamp3_search.py")


def save(folder: Path, relative: str, vector: np.ndarray) -> None:
    path = folder / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, np.asarray(vector, dtype=np.float32).reshape(1, -1))


def make_folders(root: Path, seed: int = 0) -> tuple[Path, Path]:
    """Query and reference folders with nested keys, several query files per key, a reference key
    with two files, exact ties (duplicate and power-of-two-scaled references), and a zero query."""
    rng = np.random.default_rng(seed)
    keys = ["top", "a/one", "a/two", "a/b/three", "a/b/four", "five", "six", "seven", "eight", "nine"]
    references = {key: rng.standard_normal(DIM) for key in keys}
    references["five"] = references["top"].copy()          # exact duplicate of another reference
    references["six"] = 2.0 * references["a/one"]          # scaled copy: cosine ties exactly too
    query_dir, reference_dir = root / "queries", root / "references"
    for key, vector in references.items():
        save(reference_dir, f"{key}.npy", vector)
    save(reference_dir, "seven.extra.npy", rng.standard_normal(DIM))  # sorts before seven.npy: kept
    queries = {key: [references[key] + 0.8 * rng.standard_normal(DIM)] for key in keys}
    queries["top"] = [references["top"] + 0.3 * rng.standard_normal(DIM) for _ in range(3)]
    queries["five"] = [references["top"] + 0.3 * rng.standard_normal(DIM)]
    queries["a/one"].append(references["a/one"] * 3.0)     # ties with "six" at cosine 1
    queries["eight"] = [np.zeros(DIM)]                     # every reference ties at 0
    for key, vectors in queries.items():
        for i, vector in enumerate(vectors):
            save(query_dir, f"{key}.q{i}.npy", vector)
    return query_dir, reference_dir


def naive_official(query_dir: Path, reference_dir: Path) -> dict[str, tuple[str, int]]:
    """Query file -> (reference file, rank) by the official loop: per query, torch.cosine_similarity
    against every reference, a sort by (similarity, is the correct one) descending, and the
    position of the correct one. The first reference file per key is the first by name."""
    def by_key(root: Path) -> dict[str, list[str]]:
        found: dict[str, list[str]] = {}
        for folder, _, names in os.walk(root):
            relative = os.path.relpath(folder, root)
            for name in names:
                if name.endswith(".npy"):
                    key = name.split(".")[0] if relative == "." else relative + "/" + name.split(".")[0]
                    found.setdefault(key, []).append(os.path.join(folder, name))
        return {key: sorted(paths) for key, paths in found.items()}

    reference_files = {key: paths[0] for key, paths in by_key(reference_dir).items()}
    keys = list(reference_files)
    reference_matrix = torch.tensor(np.stack([np.load(reference_files[key])[0] for key in keys]))
    result = {}
    for key, paths in by_key(query_dir).items():
        correct = keys.index(key)
        for path in paths:
            similarities = torch.cosine_similarity(torch.tensor(np.load(path)), reference_matrix).tolist()
            order = sorted(range(len(keys)), key=lambda j: (similarities[j], j == correct), reverse=True)
            result[path] = (reference_files[key], order.index(correct) + 1)
    return result


def official_lines(ranks: list[int], query_dir: Path, reference_dir: Path, ranks_path: str) -> list[str]:
    n = len(ranks)
    values = np.array(ranks)
    return [f"Query folder: {query_dir}", f"Reference folder: {reference_dir}",
            "There are 10 common keys between query and reference features.",
            f"Total query features: {n}", "Total reference features: 10",
            f"MRR: {round(sum(1 / r for r in ranks) / n, 4)}",
            *(f"Hit@{k}: {round(int((values <= k).sum()) / n, 4)}" for k in (1, 10, 100)),
            f"Rank details saved in '{ranks_path}'."]


def test_feature_key_is_folder_plus_name_up_to_the_first_dot():
    assert feature_key("x.npy") == "x"
    assert feature_key("x.1.npy") == "x"
    assert feature_key("a/b/x.abc.2.npy") == "a/b/x"
    assert feature_key(Path("a") / "x.npy") == "a/x"


def test_feature_files_of_another_shape_or_unreadable_name_the_file(tmp_path):
    cases = {"flat.npy": np.zeros(DIM, np.float32), "two.npy": np.zeros((2, DIM), np.float32),
             "patches.npy": np.zeros((1, 3, DIM), np.float32), "ints.npy": np.zeros((1, DIM), np.int64),
             "nan.npy": np.full((1, DIM), np.nan, np.float32)}
    for name, array in cases.items():
        np.save(tmp_path / name, array)
    (tmp_path / "junk.npy").write_bytes(b"not an array")
    for name in [*cases, "junk.npy"]:
        with pytest.raises(FeatureFileError, match=name):
            load_feature(tmp_path / name)
    folder = tmp_path / "mixed"
    save(folder, "a.npy", np.ones(DIM))
    save(folder, "b.npy", np.ones(DIM + 1))
    with pytest.raises(FeatureFileError, match="b.npy: dimension 9"):
        load_feature_folder(folder)


def test_reference_folder_keeps_the_first_file_per_key_in_sorted_order(tmp_path):
    _, reference_dir = make_folders(tmp_path)
    references = load_feature_folder(reference_dir, first_per_key=True)
    assert len(references) == 10 and len(set(references.keys)) == 10
    assert Path("seven.extra.npy") in references.files and references.shadowed == [Path("seven.npy")]
    assert sorted(references.files, key=Path.as_posix) == references.files


def test_eval_ranks_and_printed_lines_match_the_official_loop(tmp_path, capsys, monkeypatch):
    query_dir, reference_dir = make_folders(tmp_path)
    expected = naive_official(query_dir, reference_dir)
    monkeypatch.chdir(tmp_path)
    assert clamp3_eval.main([str(query_dir), str(reference_dir)]) == 0
    rows = read_jsonl(tmp_path / "retrieval_ranks.jsonl")  # in the working directory by default
    assert {row["query"]: (row["reference"], row["rank"]) for row in rows} == expected
    assert [row["rank"] for row in rows] == sorted(row["rank"] for row in rows)
    ranks = [row["rank"] for row in rows]
    # The fixture's ties are exercised: the zero query, the duplicate and the scaled copy.
    assert expected[str(query_dir / "eight.q0.npy")][1] == 1
    assert expected[str(query_dir / "a" / "one.q1.npy")][1] == 1
    captured = capsys.readouterr()
    assert captured.out.splitlines() == official_lines(ranks, query_dir, reference_dir, "retrieval_ranks.jsonl")
    assert "seven.npy" in captured.err  # the shadowed reference file is named
    assert not (tmp_path / "unmatched_files.jsonl").exists()


def test_official_ranks_settle_near_ties_the_official_way():
    """References a hair away from the correct one (cosines within ~1e-8 of it), which float32
    rounding may put on either side of it: official_ranks orders them as torch.cosine_similarity does."""
    rng = np.random.default_rng(1)
    dim, n_queries, pool = 64, 60, 400
    queries = rng.standard_normal((n_queries, dim)).astype(np.float32)
    references = rng.standard_normal((pool, dim)).astype(np.float32)
    targets = rng.integers(0, pool, n_queries)
    for i, target in enumerate(targets[:40]):  # near copies of the correct reference, other positions
        others = rng.choice(np.setdiff1d(np.arange(pool), targets), 6, replace=False)
        references[others] = references[target] * (1 + 1e-7 * rng.standard_normal((6, 1))) \
            + 1e-7 * rng.standard_normal((6, dim))
        queries[i] = references[target] + rng.standard_normal(dim)
    naive = []
    for i in range(n_queries):
        similarities = torch.cosine_similarity(torch.from_numpy(queries[i:i + 1]), torch.from_numpy(references))
        naive.append(1 + int((similarities > similarities[targets[i]]).sum()))
    ranks = official_ranks(queries, references, targets, chunk_size=16)
    assert ranks.official.tolist() == naive
    # The fixture does hold near-ties: other references within float32 rounding of the correct one
    # (on this machine the plain matmul of metrics.rank_queries orders some of them differently).
    normalised_q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    normalised_r = references / np.linalg.norm(references, axis=1, keepdims=True)
    sims = normalised_q.astype(np.float64) @ normalised_r.T.astype(np.float64)
    gaps = np.abs(sims - sims[np.arange(n_queries), targets][:, None])
    gaps[np.arange(n_queries), targets] = np.inf
    assert int((gaps.min(1) < 1e-7).sum()) >= 20


def test_eval_output_dir_and_json_report(tmp_path, capsys, monkeypatch):
    query_dir, reference_dir = make_folders(tmp_path)
    monkeypatch.chdir(tmp_path)
    out, report_path = tmp_path / "out", tmp_path / "report.json"
    assert clamp3_eval.main([str(query_dir), str(reference_dir), "--output_dir", str(out), "--json",
                             str(report_path), "--n_resamples", "50"]) == 0
    assert (out / "retrieval_ranks.jsonl").is_file() and not (tmp_path / "retrieval_ranks.jsonl").exists()
    ranks = [row["rank"] for row in read_jsonl(out / "retrieval_ranks.jsonl")]
    report = json.loads(report_path.read_text())
    forward = report["query_to_reference"]
    assert forward["n_queries"] == len(ranks) == report["n_query_files"] and forward["pool_size"] == 10
    assert forward["official"]["mrr"] == pytest.approx(np.mean(1 / np.array(ranks)), abs=1e-12)
    assert report["official"]["MRR"] == pytest.approx(forward["official"]["mrr"], abs=1e-12)
    assert set(forward["ci"]["official"]) >= {"mrr", "hit@1", "hit@5", "hit@10", "hit@100"}
    low, high = forward["ci"]["official"]["mrr"]
    assert low <= forward["official"]["mrr"] <= high
    assert forward["queries_with_ties"] >= 1 and forward["expected"]["mrr"] < forward["official"]["mrr"]
    backward = report["reference_to_query"]
    assert backward["n_queries"] == 10 and backward["pool_size"] == len(ranks)
    assert report["shadowed_reference_files"] == [str(reference_dir / "seven.npy")]
    assert report["pair_cosines"]["n_pairs"] == len(ranks)
    assert f"Rank details saved in '{out / 'retrieval_ranks.jsonl'}'." in capsys.readouterr().out


def test_eval_lists_unmatched_keys_and_fails(tmp_path, monkeypatch, capsys):
    query_dir, reference_dir = make_folders(tmp_path)
    save(query_dir, "sub/orphan.1.npy", np.ones(DIM))
    save(query_dir, "sub/orphan.2.npy", np.ones(DIM))
    save(reference_dir, "lonely.npy", np.ones(DIM))
    monkeypatch.chdir(tmp_path)
    assert clamp3_eval.main([str(query_dir), str(reference_dir)]) == 1
    rows = read_jsonl(tmp_path / "unmatched_files.jsonl")
    assert rows == [{"unmatched_query": [str(query_dir / "sub" / "orphan.1.npy"),
                                         str(query_dir / "sub" / "orphan.2.npy")], "key": "sub/orphan"},
                    {"unmatched_reference": [str(reference_dir / "lonely.npy")], "key": "lonely"}]
    assert not (tmp_path / "retrieval_ranks.jsonl").exists()
    assert "1 query keys and 1 reference keys have no match" in capsys.readouterr().err


def test_eval_script_as_a_subprocess(tmp_path, monkeypatch):
    query_dir, reference_dir = make_folders(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    result = subprocess.run([sys.executable, str(INFERENCE / "clamp3_eval.py"), "../queries", "../references"],
                            cwd=work, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    rows = read_jsonl(work / "retrieval_ranks.jsonl")
    monkeypatch.chdir(work)  # the official file names: the folder as typed, joined with the relative path
    expected = naive_official(Path("../queries"), Path("../references"))
    assert {row["query"]: (row["reference"], row["rank"]) for row in rows} == expected
    assert result.stdout.splitlines() == official_lines([row["rank"] for row in rows], Path("../queries"),
                                                        Path("../references"), "retrieval_ranks.jsonl")
    bad = tmp_path / "bad"
    save(bad, "x.npy", np.ones(DIM))
    np.save(bad / "y.npy", np.zeros((1, 4, DIM), np.float32))
    result = subprocess.run([sys.executable, str(INFERENCE / "clamp3_eval.py"), str(bad), str(reference_dir)],
                            cwd=work, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "y.npy: shape (1, 4, 8) is not a (1, D) global feature" in result.stderr


def test_score_pairwise_and_group_against_numpy(tmp_path, monkeypatch, capsys):
    query_dir, reference_dir = make_folders(tmp_path)
    monkeypatch.chdir(tmp_path)
    queries = load_feature_folder(query_dir)
    references = load_feature_folder(reference_dir, first_per_key=True)
    targets = match_keys(queries, references).targets
    q, r = queries.vectors.astype(np.float64), references.vectors[targets].astype(np.float64)
    norms = np.maximum(np.linalg.norm(q, axis=1) * np.linalg.norm(r, axis=1), 1e-8)
    pairwise = (q * r).sum(1) / norms
    assert clamp3_score.main([str(query_dir), str(reference_dir), "--json", "pairs.json"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[2:] == ["There are 10 common keys between query and reference features.",
                       f"Total query features: {len(queries)}", "Total reference features: 10",
                       f"Avg. pairwise similarity: {round(pairwise.mean(), 4)}",
                       "Pairwise similarity scores saved in 'pairwise_similarities.jsonl'.", "Report saved in 'pairs.json'."]
    report = json.loads(Path("pairs.json").read_text())
    assert report["mean_similarity"] == pytest.approx(pairwise.mean(), abs=1e-6)
    rows = read_jsonl(tmp_path / "pairwise_similarities.jsonl")
    assert len(rows) == len(queries) and [row["similarity"] for row in rows] == sorted(
        (row["similarity"] for row in rows), reverse=True)
    by_query = {row["query"]: row["similarity"] for row in rows}
    assert [by_query[queries.path(i)] for i in range(len(queries))] == pytest.approx(pairwise, abs=1e-6)

    all_references = load_feature_folder(reference_dir).vectors.astype(np.float64)
    mean_q, mean_r = q.mean(0), all_references.mean(0)
    group = mean_q @ mean_r / (np.linalg.norm(mean_q) * np.linalg.norm(mean_r))
    assert clamp3_score.main([str(query_dir), str(reference_dir), "--group", "--json", "group.json"]) == 0
    assert capsys.readouterr().out.splitlines()[2:5] == [
        f"Total query features: {len(queries)}", f"Total reference features: {len(all_references)}",
        f"Group similarity: {round(float(group), 4)}"]
    assert json.loads(Path("group.json").read_text())["group_similarity"] == pytest.approx(group, abs=1e-12)


def test_score_unmatched_keys_follow_the_flag_and_never_read_stdin(tmp_path, monkeypatch, capsys):
    query_dir, reference_dir = make_folders(tmp_path)
    save(query_dir, "orphan.npy", np.ones(DIM))
    save(reference_dir, "lonely.npy", np.ones(DIM))
    monkeypatch.chdir(tmp_path)

    def no_prompt(*_):
        raise AssertionError("the score script must never read standard input")

    monkeypatch.setattr(builtins, "input", no_prompt)
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    monkeypatch.setattr(sys.stdin, "read", no_prompt)
    monkeypatch.setattr(sys.stdin, "readline", no_prompt)
    assert clamp3_score.main([str(query_dir), str(reference_dir), "--output_dir", "out"]) == 1
    assert {row["key"] for row in read_jsonl(tmp_path / "out" / "unmatched_files.jsonl")} == {"orphan", "lonely"}
    assert not (tmp_path / "out" / "pairwise_similarities.jsonl").exists()
    assert "--skip_unmatched" in capsys.readouterr().err
    assert clamp3_score.main([str(query_dir), str(reference_dir), "--output_dir", "out", "--skip_unmatched"]) == 0
    rows = read_jsonl(tmp_path / "out" / "pairwise_similarities.jsonl")
    assert len(rows) == len(load_feature_folder(query_dir)) - 1
    assert all("orphan" not in row["query"] for row in rows)
    assert "Total reference features: 10" in capsys.readouterr().out


def test_score_script_as_a_subprocess(tmp_path):
    query_dir, reference_dir = make_folders(tmp_path)
    save(query_dir, "orphan.npy", np.ones(DIM))
    script = str(INFERENCE / "clamp3_score.py")
    result = subprocess.run([sys.executable, script, str(query_dir), str(reference_dir)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120, stdin=subprocess.PIPE)
    assert result.returncode == 1 and "EOFError" not in result.stderr
    assert (tmp_path / "unmatched_files.jsonl").is_file()
    result = subprocess.run([sys.executable, script, str(query_dir), str(reference_dir), "--group"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.splitlines()[-1].startswith("Group similarity: ")


def test_top_k_against_brute_force():
    rng = np.random.default_rng(3)
    features = rng.standard_normal((53, DIM)).astype(np.float32)
    features[[10, 30, 31]] = features[4]  # equal scores: index order
    queries = np.concatenate([features[4:5], rng.standard_normal((4, DIM)).astype(np.float32)])
    normalised = features / np.linalg.norm(features, axis=1, keepdims=True)
    for k in (1, 5, 60):
        indices, scores = top_k(queries, features, k, chunk_size=7)
        assert indices.shape == (5, min(k, 53))
        for q, query in enumerate(queries):
            brute = normalised @ (query / np.linalg.norm(query))
            order = sorted(range(53), key=lambda j: (-round(float(brute[j]), 5), j))[:k]
            assert indices[q].tolist() == order
            assert scores[q] == pytest.approx(brute[order], abs=1e-6)
    assert top_k(queries, features, 4)[0][0].tolist() == [4, 10, 30, 31]


def test_search_script_prints_and_json(tmp_path, capsys):
    rng = np.random.default_rng(4)
    folder = tmp_path / "features"
    vectors = rng.standard_normal((20, DIM)).astype(np.float32)
    for i, vector in enumerate(vectors):
        save(folder, f"{'deep/' if i % 3 else ''}piece{i:02d}.seg.npy", vector)
    save(tmp_path, "query.npy", vectors[7] + 0.01)
    files = load_feature_folder(folder)
    query = load_feature(tmp_path / "query.npy")
    scores = files.vectors @ query / (np.linalg.norm(files.vectors, axis=1) * np.linalg.norm(query))
    best = np.argsort(-scores, kind="stable")[:3]
    assert clamp3_search.main([str(tmp_path / "query.npy"), str(folder), "--top_k", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"3 nearest of 20 features to {tmp_path / 'query.npy'}:"
    assert lines[1:] == [f"{rank:>5}  {scores[i]:.4f}  {files.keys[i]}  {files.path(i)}"
                         for rank, i in enumerate(best, 1)]
    assert files.keys[best[0]] == "deep/piece07"
    result = subprocess.run([sys.executable, str(INFERENCE / "clamp3_search.py"), str(tmp_path / "query.npy"),
                             str(folder), "--top_k", "25", "--json"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    assert found["n_features"] == 20 and len(found["results"]) == 20
    assert [r["file"] for r in found["results"]] == [files.path(i) for i in np.argsort(-scores, kind="stable")]
    assert [r["rank"] for r in found["results"]] == list(range(1, 21))


@pytest.mark.parametrize("name", ["clamp3_eval", "clamp3_score", "clamp3_search"])
def test_scripts_have_help(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_script(INFERENCE / f"{name}.py").main(["--help"])
    assert exit_info.value.code == 0 and "usage:" in capsys.readouterr().out
