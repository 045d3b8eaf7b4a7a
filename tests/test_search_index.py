"""The persistent search index (code/search_index.py): exact, deterministic results; incremental updates
that embed only what changed; crash-safe writes; the model_key guard. Synthetic vectors, no models."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import search_index
from search_index import (
    FileFacts,
    IndexChangedError,
    ModelKeyMismatchError,
    SearchIndex,
    SearchIndexError,
)

D = 16


def sha_of(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class Folder:
    """A fake folder: path -> (content, mtime_ns); vectors are a deterministic function of the
    content, and every embed call is recorded."""

    def __init__(self, seed: int = 0):
        self.files: dict[str, tuple[str, int]] = {}
        self.rng = np.random.default_rng(seed)
        self.vectors: dict[str, np.ndarray] = {}
        self.calls: list[list[str]] = []
        self.fail: set[str] = set()

    def put(self, path: str, content: str, mtime_ns: int = 1) -> None:
        self.files[path] = (content, mtime_ns)
        if content not in self.vectors:
            self.vectors[content] = self.rng.standard_normal(D).astype(np.float32)

    def facts(self, hashed: list[str] | None = None) -> dict[str, FileFacts]:
        def lazy(content: str, path: str):
            def digest() -> str:
                if hashed is not None:
                    hashed.append(path)
                return sha_of(content)
            return digest

        return {p: FileFacts(len(c), m, lazy(c, p)) for p, (c, m) in self.files.items()}

    def embed(self, paths: list[str]) -> dict:
        self.calls.append(list(paths))
        out = {}
        for p in paths:
            content = self.files[p][0]
            if p in self.fail:
                out[p] = ValueError("cannot parse")
            else:
                out[p] = (sha_of(content), self.vectors[content], p.rsplit(".", 1)[1])
        return out

    def embedded(self) -> list[str]:
        return sorted(p for call in self.calls for p in call)


def brute_force(index: SearchIndex, query: np.ndarray) -> list[tuple[float, str]]:
    """Every indexed file's float64 cosine with the query, best first, ties in path order."""
    q = query.astype(np.float64) / np.linalg.norm(query.astype(np.float64))
    vectors = np.asarray(index._vectors, dtype=np.float64)
    return sorted(((float(vectors[e.row] @ q), e.path) for e in index.entries), key=lambda t: (-t[0], t[1]))


@pytest.fixture
def built(tmp_path):
    folder = Folder()
    for i in range(12):
        folder.put(f"piece{i:02d}.{'abc' if i % 3 else 'mtf'}", f"content {i}")
    folder.put("copies/piece03.abc", "content 3")  # identical content under another path
    folder.put("z_copy.abc", "content 3")
    index = SearchIndex.open(tmp_path / "index", "model-A", root="/music")
    summary = index.update(folder.facts(), folder.embed)
    return folder, index, summary


def test_build_and_exact_sorted_results(built):
    folder, index, summary = built
    assert summary.written and len(summary.added) == 14 and not summary.failed
    assert len(index) == 14 and index.n_vectors == 12  # the three copies share a row
    rng = np.random.default_rng(5)
    queries = rng.standard_normal((4, D)).astype(np.float32)
    for q, hits in zip(queries, index.search(queries, k=30, dedupe=False), strict=True):
        expected = brute_force(index, q)
        assert [h.rank for h in hits] == list(range(1, 15))
        assert all(a.score >= b.score for a, b in zip(hits, hits[1:], strict=False))
        for hit, (score, _) in zip(hits, expected, strict=True):
            assert hit.score == pytest.approx(score, abs=1e-5)
            assert hit.score == pytest.approx(dict((p, s) for s, p in expected)[hit.path], abs=1e-5)


def test_dedupe_folds_identical_content(built):
    folder, index, _ = built
    query = folder.vectors["content 3"]
    folded = index.search_one(query, k=3)
    assert folded[0].path == "copies/piece03.abc"  # the first path of the content
    assert folded[0].duplicates == ("piece03.mtf", "z_copy.abc")
    assert folded[0].score == pytest.approx(1.0, abs=1e-6)
    assert len({h.sha256 for h in folded}) == 3
    plain = index.search_one(query, k=3, dedupe=False)
    assert [h.path for h in plain] == ["copies/piece03.abc", "piece03.mtf", "z_copy.abc"]
    assert plain[1].duplicates == ("copies/piece03.abc", "z_copy.abc")
    assert plain[0].score == plain[1].score == plain[2].score


def test_exclude_sha256_and_kind_filter(built):
    folder, index, _ = built
    query = folder.vectors["content 3"]
    own = sha_of("content 3")
    hits = index.search_one(query, k=20, exclude_sha256=own)
    assert own not in {h.sha256 for h in hits} and len(hits) == 11
    assert hits[0].path == brute_force(index, query)[3][1]  # the best file after the three copies
    per_query = index.search(np.stack([query, folder.vectors["content 4"]]), k=2,
                             exclude_per_query=[own, None])
    assert per_query[0][0].sha256 != own and per_query[1][0].sha256 == sha_of("content 4")
    only_mtf = index.search_one(query, k=20, kinds=["mtf"])
    assert {h.kind for h in only_mtf} == {"mtf"} and len(only_mtf) == 4
    expected = [p for _, p in brute_force(index, query) if p.endswith(".mtf")]
    assert [h.path for h in only_mtf] == expected
    assert index.search_one(query, k=5, kinds=["midi"]) == []


def test_ties_are_in_path_order(tmp_path):
    # Different contents with identical vectors: equal scores, ordered by path whatever their rows.
    vector = np.ones(D, dtype=np.float32)
    files = [{"path": p, "sha256": sha_of(p), "size": 1, "mtime_ns": 1, "kind": "abc"}
             for p in ["d.abc", "b.abc", "a.abc", "c.abc", "e.abc"]]
    other = np.zeros(D, dtype=np.float32)
    other[0] = 1
    vectors = np.stack([vector] * 4 + [other])
    index = SearchIndex.build(tmp_path / "i", "m", None, files, vectors)
    assert [h.path for h in index.search_one(vector, k=2)] == ["a.abc", "b.abc"]
    # Across chunk boundaries too (tiny chunks force the merge).
    assert [h.path for h in index.search_one(vector, k=3, chunk_rows=2)] == ["a.abc", "b.abc", "c.abc"]
    assert [h.path for h in index.search_one(vector, k=3, chunk_rows=1)] == ["a.abc", "b.abc", "c.abc"]


def test_chunked_search_equals_single_chunk(tmp_path):
    rng = np.random.default_rng(1)
    n = 300
    vectors = rng.standard_normal((n, D)).astype(np.float32)
    vectors[50] = vectors[7]  # an exact tie between different files
    files = [{"path": f"f{i:03d}.abc", "sha256": sha_of(str(i)), "size": 1, "mtime_ns": 1, "kind": "abc"}
             for i in range(n)]
    index = SearchIndex.build(tmp_path / "i", "m", None, files, vectors)
    queries = np.concatenate([rng.standard_normal((3, D)).astype(np.float32), vectors[7:8]])
    whole = index.search(queries, k=25, chunk_rows=10_000)
    for chunk in (1, 7, 64):
        assert index.search(queries, k=25, chunk_rows=chunk) == whole
    assert [h.path for h in whole[3][:2]] == ["f007.abc", "f050.abc"]


def test_incremental_update(built, tmp_path):
    folder, index, _ = built
    folder.calls.clear()
    hashed: list[str] = []
    again = index.update(folder.facts(hashed), folder.embed)
    assert folder.calls == [] and hashed == [] and not again.written and len(again.unchanged) == 14

    folder.put("piece01.abc", "content 1 edited", mtime_ns=2)  # changed
    folder.put("piece02.abc", "content 2", mtime_ns=5)  # touched: same content, new mtime
    del folder.files["piece04.abc"]  # removed
    folder.put("new.abc", "brand new")  # added
    folder.put("renamed/piece05.abc", "content 5")  # a copy of indexed content: no embedding
    folder.put("bad.abc", "garbage")
    folder.fail.add("bad.abc")
    hashed.clear()
    summary = index.update(folder.facts(hashed), folder.embed)
    assert folder.embedded() == ["bad.abc", "new.abc", "piece01.abc"]
    assert sorted(hashed) == ["bad.abc", "new.abc", "piece01.abc", "piece02.abc", "renamed/piece05.abc"]
    assert summary.added == ["new.abc", "renamed/piece05.abc"] and summary.updated == ["piece01.abc"]
    assert summary.removed == ["piece04.abc"] and summary.reused == ["renamed/piece05.abc"]
    assert summary.failed == {"bad.abc": "ValueError: cannot parse"}
    assert "piece02.abc" in summary.unchanged and summary.written
    assert index.entry("bad.abc") is None and index.entry("piece04.abc") is None
    assert index.entry("piece02.abc").mtime_ns == 5
    assert index.entry("piece01.abc").sha256 == sha_of("content 1 edited")
    assert index.search_one(folder.vectors["content 1 edited"], k=1)[0].path == "piece01.abc"
    assert "1 failed" in summary.line()

    # The failure is remembered: not tried again while the file is unchanged, unless asked to.
    folder.calls.clear()
    reopened = SearchIndex.open(tmp_path / "index", "model-A")
    assert set(reopened.failures) == {"bad.abc"}
    quiet = reopened.update(folder.facts(), folder.embed)
    assert folder.calls == [] and quiet.skipped_failed == ["bad.abc"] and not quiet.written
    folder.fail.clear()
    retried = reopened.update(folder.facts(), folder.embed, retry_failed=True)
    assert folder.embedded() == ["bad.abc"] and retried.added == ["bad.abc"] and reopened.failures == {}
    # Only files that need embedding reach the embedder, in batches if asked.
    folder.calls.clear()
    for i in range(5):
        folder.put(f"batch{i}.abc", f"batch {i}")
    progress = []
    reopened.update(folder.facts(), folder.embed, batch_size=2, progress=lambda d, t: progress.append((d, t)))
    assert [len(c) for c in folder.calls] == [2, 2, 1] and progress == [(0, 5), (2, 5), (4, 5), (5, 5)]


def test_unused_rows_are_dropped_and_files_cleaned(built, tmp_path):
    folder, index, _ = built
    for path in [p for p in folder.files if p != "piece00.mtf"]:
        del folder.files[path]
    index.update(folder.facts(), folder.embed)
    assert len(index) == 1 and index.n_vectors == 1
    names = sorted(p.name for p in (tmp_path / "index").iterdir())
    assert names == sorted([".lock", "manifest.json", index.manifest["vectors_file"], index.manifest["entries_file"]])
    assert index.search_one(folder.vectors["content 0"], k=5)[0].path == "piece00.mtf"


def test_reopen_gives_identical_results(built, tmp_path):
    folder, index, _ = built
    queries = np.random.default_rng(9).standard_normal((3, D)).astype(np.float32)
    for preload in (False, True):
        reopened = SearchIndex.open(tmp_path / "index", "model-A", preload=preload)
        assert reopened.entries == index.entries and reopened.root == "/music"
        assert reopened.search(queries, k=7) == index.search(queries, k=7)
        assert np.array_equal(reopened.vector("piece03.mtf"), index.vector_for_sha256(sha_of("content 3")))


def test_other_model_key_is_refused(built, tmp_path):
    folder, index, _ = built
    with pytest.raises(ModelKeyMismatchError, match="model-A.*model-B.*rebuild"):
        SearchIndex.open(tmp_path / "index", "model-B")
    rebuilt = SearchIndex.open(tmp_path / "index", "model-B", rebuild=True)
    assert len(rebuilt) == 0
    # Until the rebuild writes, the old index is still there for model-A.
    assert len(SearchIndex.open(tmp_path / "index", "model-A")) == 14
    folder.calls.clear()
    rebuilt.update(folder.facts(), folder.embed)
    assert len(folder.embedded()) == 14  # everything embedded again with the new model
    assert SearchIndex.open(tmp_path / "index", "model-B").model_key == "model-B"
    with pytest.raises(ModelKeyMismatchError):
        SearchIndex.open(tmp_path / "index", "model-A")
    with pytest.raises(FileNotFoundError):
        SearchIndex.open(tmp_path / "nothing", "model-A", create=False)


@pytest.mark.parametrize("where", ["vectors", "manifest"])
def test_interrupted_write_leaves_old_index(built, tmp_path, monkeypatch, where):
    folder, index, _ = built
    query = folder.vectors["content 2"]
    before = index.search_one(query, k=5)
    manifest_before = (tmp_path / "index" / "manifest.json").read_text()

    def crash(*args, **kwargs):
        raise OSError("disk full (simulated)")

    if where == "vectors":
        monkeypatch.setattr(search_index, "_write_npy_rows", crash)
    else:
        monkeypatch.setattr(search_index, "_write_manifest", crash)
    folder.put("new.abc", "brand new")
    with pytest.raises(OSError, match="simulated"):
        index.update(folder.facts(), folder.embed)
    monkeypatch.undo()
    assert (tmp_path / "index" / "manifest.json").read_text() == manifest_before
    survivor = SearchIndex.open(tmp_path / "index", "model-A")
    assert survivor.search_one(query, k=5) == before and survivor.entry("new.abc") is None
    # The next update succeeds and removes what the failed one left behind.
    survivor.update(folder.facts(), folder.embed)
    names = {p.name for p in (tmp_path / "index").iterdir()}
    assert names == {".lock", "manifest.json", survivor.manifest["vectors_file"], survivor.manifest["entries_file"]}
    assert survivor.entry("new.abc") is not None


def test_concurrent_update_is_refused(built, tmp_path):
    folder, index, _ = built
    other = SearchIndex.open(tmp_path / "index", "model-A")
    folder.put("one.abc", "one")
    other.update(folder.facts(), folder.embed)
    folder.put("two.abc", "two")
    with pytest.raises(IndexChangedError):
        index.update(folder.facts(), folder.embed)
    plan = other.plan(folder.facts())
    other.update(folder.facts(), folder.embed)
    with pytest.raises(IndexChangedError):
        other.apply(plan, {})


def test_k_larger_than_index_and_empty_index(built, tmp_path):
    folder, index, _ = built
    hits = index.search_one(folder.vectors["content 0"], k=1000)
    assert len(hits) == 12 and len(index.search_one(folder.vectors["content 0"], k=1000, dedupe=False)) == 14
    empty = SearchIndex.open(tmp_path / "empty", "m")
    assert empty.search(np.ones((2, D), dtype=np.float32), k=5) == [[], []]
    summary = empty.update({}, folder.embed)
    assert summary.written and len(SearchIndex.open(tmp_path / "empty", "m")) == 0
    assert SearchIndex.open(tmp_path / "empty", "m").search_one(np.ones(D), k=3) == []
    # Emptying a populated index.
    index.update({}, folder.embed)
    assert len(index) == 0 and index.search_one(np.ones(D), k=3) == []


def test_bad_input_is_reported(built, tmp_path):
    folder, index, _ = built
    with pytest.raises(ValueError, match="dimension"):
        index.search(np.ones(D + 1, dtype=np.float32))
    with pytest.raises(ValueError, match="k must be positive"):
        index.search(np.ones(D), k=0)
    with pytest.raises(ValueError, match="zero"):
        index.search(np.zeros(D))
    with pytest.raises(ValueError, match="relative"):
        index.plan({"../outside.abc": (1, 1, sha_of("x"))})
    folder.put("short.abc", "short")
    folder.put("nan.abc", "nan")
    folder.vectors["short"] = np.ones(D - 1, dtype=np.float32)
    folder.vectors["nan"] = np.full(D, np.nan, dtype=np.float32)
    summary = index.update(folder.facts(), folder.embed)
    assert "dimension" in summary.failed["short.abc"] and "not finite" in summary.failed["nan.abc"]
    # An exception raised by the embedder itself aborts without writing.
    folder.put("later.abc", "later")
    generation = index.generation

    def broken(paths):
        raise RuntimeError("model crashed")

    with pytest.raises(RuntimeError, match="model crashed"):
        index.update(folder.facts(), broken)
    assert SearchIndex.open(tmp_path / "index", "model-A").generation == generation
    with pytest.raises(SearchIndexError, match="already holds"):
        SearchIndex.build(tmp_path / "index", "model-A", None, [], np.zeros((0, D), dtype=np.float32))


def test_manifest_contents(built, tmp_path):
    manifest = json.loads((tmp_path / "index" / "manifest.json").read_text())
    assert manifest["format_version"] == search_index.FORMAT_VERSION and manifest["model_key"] == "model-A"
    assert manifest["dimension"] == D and manifest["root"] == "/music"
    assert manifest["counts"] == {"files": 14, "vectors": 12, "failures": 0}
    assert manifest["created"] and manifest["updated"]
    lines = (tmp_path / "index" / manifest["entries_file"]).read_text().splitlines()
    assert len(lines) == 14 and set(json.loads(lines[0])) == {"path", "sha256", "size", "mtime_ns", "kind", "row"}
    vectors = np.load(tmp_path / "index" / manifest["vectors_file"])
    assert vectors.dtype == np.float32 and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-6)


def test_a_version_1_index_is_read_and_written_as_version_2(built, tmp_path):
    """Version 1 called the entries' kind "format": such an index is searched as it is, and the first
    update that changes something writes version 2 (entries file included), with nothing embedded again."""
    folder, index, _ = built
    manifest_path = tmp_path / "index" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    entries_path = tmp_path / "index" / manifest["entries_file"]
    rows = [json.loads(line) for line in entries_path.read_text().splitlines()]
    entries_path.write_text("".join(json.dumps({("format" if k == "kind" else k): v for k, v in row.items()}) + "\n"
                                    for row in rows))
    manifest_path.write_text(json.dumps({**manifest, "format_version": 1}))
    old = SearchIndex.open(tmp_path / "index", "model-A")
    assert old.entries == index.entries and old.manifest["format_version"] == 1
    query = folder.vectors["content 1"]
    assert old.search_one(query, k=5, kinds=["mtf"]) == index.search_one(query, k=5, kinds=["mtf"])
    assert not old.update(folder.facts(), folder.embed).written  # nothing changed: left as it is
    assert json.loads(manifest_path.read_text())["format_version"] == 1
    calls = len(folder.calls)
    folder.files.pop("z_copy.abc")
    assert old.update(folder.facts(), folder.embed).removed == ["z_copy.abc"] and len(folder.calls) == calls
    manifest = json.loads(manifest_path.read_text())
    assert manifest["format_version"] == search_index.FORMAT_VERSION == 2
    lines = (tmp_path / "index" / manifest["entries_file"]).read_text().splitlines()
    assert all("kind" in json.loads(line) and "format" not in json.loads(line) for line in lines)
    assert SearchIndex.open(tmp_path / "index", "model-A").entries == [e for e in index.entries
                                                                      if e.path != "z_copy.abc"]
    manifest_path.write_text(json.dumps({**manifest, "format_version": 3}))
    with pytest.raises(search_index.IndexCorruptError, match="format version 3, this code reads 1 and 2"):
        SearchIndex.open(tmp_path / "index", "model-A")


def test_a_version_1_index_whose_failures_change_gets_a_version_2_entries_file(tmp_path):
    folder = Folder()
    folder.put("a.abc", "a")
    folder.put("b.abc", "b")
    folder.fail.add("b.abc")
    index = SearchIndex.open(tmp_path / "index", "model-A")
    index.update(folder.facts(), folder.embed)
    manifest_path = tmp_path / "index" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    entries_path = tmp_path / "index" / manifest["entries_file"]
    entries_path.write_text(entries_path.read_text().replace('"kind"', '"format"'))
    manifest_path.write_text(json.dumps({**manifest, "format_version": 1}))
    folder.files.pop("b.abc")  # only the failures change: the entries are the same
    assert SearchIndex.open(tmp_path / "index", "model-A").update(folder.facts(), folder.embed).written
    assert [e.path for e in SearchIndex.open(tmp_path / "index", "model-A").entries] == ["a.abc"]


def test_file_facts_hashes_lazily(tmp_path):
    root = tmp_path / "music"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "a.abc").write_text("X:1\n")
    facts = search_index.file_facts(root, ["sub/a.abc"])
    assert set(facts) == {"sub/a.abc"} and facts["sub/a.abc"].size == 4
    assert facts["sub/a.abc"].digest() == hashlib.sha256(b"X:1\n").hexdigest()
