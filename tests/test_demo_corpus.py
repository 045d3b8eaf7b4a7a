"""The demo corpus: captions from real corpus headers, no caption source in the model's input, and a
small real build (a few tunes per split, converted by the project's converters and music21)."""

from __future__ import annotations

import hashlib
import json

import pytest
from demo.captions import caption_source_lines, captions_for, parse_key, strip_caption_sources, tune_metadata
from demo.corpus import (
    COLLECTIONS,
    SPLITS,
    TEST_TEXT_FIELDS,
    CorpusSize,
    build_corpus,
    music21_corpus_dir,
    read_collections,
    split_tunes,
)
from evaluation.testsets import record_problem
from fileio import DropLog, read_jsonl
from preprocess.interleave import read_abc_text
from preprocess.midi_mtf import M3_SKIPPED_META_TYPES
from preprocess.training_jsonl import normalise_title

PIECES = 6
TRAINING_JSONLS = {"base_train": "base_train_abc", "base_valid": "base_valid_abc",
                   "adapt_train_abc": "adapt_train_abc", "adapt_valid_abc": "adapt_valid_abc",
                   "adapt_train_mtf": "adapt_train_mtf", "adapt_valid_mtf": "adapt_valid_mtf"}


def corpus_tunes(relative: str, count: int) -> list[str]:
    return split_tunes(read_abc_text(music21_corpus_dir() / relative))[:count]


@pytest.fixture(scope="module")
def real_tunes() -> list[tuple[str, str]]:
    return ([("ryans", t) for t in corpus_tunes("ryansMammoth/7thRegimentReel.abc", 1)]
            + [("airds", t) for t in corpus_tunes("airdsAirs/book1.abc", 3)]
            + [("oneills", t) for t in corpus_tunes("oneills1850/0001-0050.abc", 3)]
            + [("essen", t) for t in corpus_tunes("essenFolksong/han1.abc", 2)]
            + [("essen", t) for t in corpus_tunes("essenFolksong/erk10.abc", 2)])


def test_metadata_of_a_real_tune():
    (text,) = corpus_tunes("ryansMammoth/7thRegimentReel.abc", 1)
    assert tune_metadata(text, "ryans") == {
        "collection": "ryans", "title": "7th Regiment -- Reel", "tune_type": "reel", "key_en": "A major",
        "key_de": "A-Dur", "meter": "2/4", "composer": "Conn. Higgins"}
    assert parse_key("Bb")[1:] == ("major", "B", "Dur") and parse_key("Bb")[0] == "B-flat"
    assert parse_key("F#m") == ("F-sharp", "minor", "fis", "Moll")
    assert parse_key("Edor") == ("E", "Dorian", "E", "Dorisch")
    assert parse_key("B")[2] == "H" and parse_key("none") is None


def test_captions_are_deterministic_bilingual_and_never_the_title_alone(real_tunes):
    for collection, text in real_tunes:
        meta = tune_metadata(text, collection)
        seen = set()
        for seed in range(12):
            captions = captions_for(meta, f"42:{seed}")
            assert captions == captions_for(dict(meta), f"42:{seed}")
            assert set(captions) == {"caption_en", "caption_de", "description"}
            for value in captions.values():
                assert value.strip(" .\u201c\u201d\u201e") != meta.get("title")
            if "key_en" in meta:
                assert meta["key_en"] in captions["caption_en"] and meta["key_de"] in captions["caption_de"]
            assert any(w in captions["caption_de"] for w in ("Dur", "Moll", " aus ", "Quelle"))
            seen.add(captions["caption_en"])
        assert len(seen) > 1, "several phrasings per piece"


def test_captions_come_from_metadata_only(real_tunes):
    collection, text = real_tunes[0]
    other_notes = text.replace("vA2(Ac)", "B4")
    assert tune_metadata(other_notes, collection) == tune_metadata(text, collection)
    meta = tune_metadata(text, collection)
    assert captions_for(meta, 7) == captions_for(tune_metadata(other_notes, collection), 7)
    untitled = {k: v for k, v in meta.items() if k != "title"}
    for seed in range(12):
        assert "Regiment" not in " ".join(captions_for(untitled, seed).values())


def test_strip_caption_sources_removes_every_source_and_keeps_the_music():
    tune = ("X:3\nT:The Title\nT:Other Name\nC:A. Composer\nO:Europa, Mitteleuropa, Deutschland\nR:reel\n"
            "B:A Book\nN:a note\nS:a source\nZ:transcriber\nH:history\n+:more history\n% free comment\n"
            "%% G A B c\nM:6/8\nL:1/8\nQ:3/8=120\nK:D\n%%score 1\n|:DFA dAF|[T:Part two] GBd gdB % words\n"
            "W:lyrics line\nA2B c2d:|\n")
    stripped = strip_caption_sources(tune)
    assert stripped == ("X:3\nM:6/8\nL:1/8\nQ:3/8=120\nK:D\n%%score 1\n|:DFA dAF| GBd gdB\nA2B c2d:|\n")
    assert caption_source_lines(stripped) == []
    assert len(caption_source_lines(tune)) == 15
    for collection, text in [("ryans", corpus_tunes("ryansMammoth/7thRegimentReel.abc", 1)[0])]:
        clean = strip_caption_sources(text)
        assert "K:A" in clean and "M:2/4" in clean and 'vA2(Ac) "4"eAc"0"e' in clean
        assert not any(line[:2] in {"T:", "C:", "R:", "B:", "N:", "Z:"} for line in clean.splitlines())
        assert tune_metadata(text, collection)["title"] not in clean


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo_corpus")
    summary = build_corpus(root, size=CorpusSize.uniform(PIECES), seed=42, workers=1, progress=False)
    return root, summary


def test_build_writes_the_training_jsonls_and_music(built):
    root, summary = built
    assert summary.selected == {split: PIECES for split in SPLITS}
    assert json.loads((root / "corpus_summary.json").read_text())["selected"] == summary.selected
    for split, name in TRAINING_JSONLS.items():
        records = read_jsonl(root / f"{name}.jsonl")
        assert len(records) == PIECES
        fmt = name.rsplit("_", 1)[1]
        role = "base" if split.startswith("base") else "adapt"
        for record in records:
            assert set(record) == {"id", "filepaths", "caption_en", "caption_de", "description"}
            assert record["filepaths"] == [f"{fmt}/{record['id']}.{fmt}"]
            assert (root / record["filepaths"][0]).is_file()
            assert COLLECTIONS[record["id"].split("-", 1)[0]][1] == role


def test_build_writes_test_sets_in_the_reader_format(built):
    root, _ = built
    test_dir = root / "test"
    by_format = {fmt: read_jsonl(test_dir / f"test_{fmt}.jsonl") for fmt in ("abc", "mtf")}
    for fmt, records in by_format.items():
        assert len(records) == PIECES
        for record in records:
            assert set(record) - {"title"} == {"id", "filepaths", "source", "texts", "pair_id"}
            assert record["source"] == "demo" and record["filepaths"] == [f"{fmt}/{record['id']}.{fmt}"]
            assert tuple(record["texts"]) == TEST_TEXT_FIELDS
            assert record_problem(record, test_dir) is None
            assert COLLECTIONS[record["id"].split("-", 1)[0]][1] == "adapt"
    pairs = [{r["id"]: r["pair_id"] for r in by_format[fmt]} for fmt in ("abc", "mtf")]
    assert pairs[0] == pairs[1] and len(set(pairs[0].values())) == PIECES
    texts = [{r["pair_id"]: r["texts"] for r in by_format[fmt]} for fmt in ("abc", "mtf")]
    assert texts[0] == texts[1]


def test_no_caption_source_reaches_the_model(built):
    root, _ = built
    abc_files = sorted(root.glob("abc/*.abc")) + sorted(root.glob("test/abc/*.abc"))
    mtf_files = sorted(root.glob("mtf/*.mtf")) + sorted(root.glob("test/mtf/*.mtf"))
    assert len(abc_files) == 5 * PIECES and len(mtf_files) == 3 * PIECES
    for path in abc_files:
        text = path.read_text(encoding="utf-8")
        assert caption_source_lines(text) == [], path.name
        assert "K:" in text and "[V:1]" in text
    for path in mtf_files:
        kinds = {line.split(" ", 1)[0] for line in path.read_text(encoding="utf-8").splitlines()}
        assert "note_on" in kinds and not kinds & M3_SKIPPED_META_TYPES, path.name


def test_splits_are_disjoint_by_piece_content_and_title(built):
    root, _ = built
    ids = {split: {r["id"] for r in read_jsonl(root / f"{name}.jsonl")} for split, name in TRAINING_JSONLS.items()}
    ids["test"] = {r["id"] for r in read_jsonl(root / "test" / "test_abc.jsonl")}
    train = ids["base_train"] | ids["adapt_train_abc"] | ids["adapt_train_mtf"]
    valid = ids["base_valid"] | ids["adapt_valid_abc"] | ids["adapt_valid_mtf"]
    assert not train & valid and not train & ids["test"] and not valid & ids["test"]

    def digests(pattern: str) -> list[str]:
        return [hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.glob(pattern))]

    for fmt in ("abc", "mtf"):
        every = digests(f"{fmt}/*.{fmt}") + digests(f"test/{fmt}/*.{fmt}")
        assert len(every) == len(set(every)), f"two {fmt} pieces share their music"

    tunes, _ = read_collections(music21_corpus_dir(), DropLog("test"))
    titles = {t.id: t.titles for t in tunes}
    training_titles = set().union(*(titles[i] for i in train | valid))
    assert not training_titles & set().union(*(titles[i] for i in ids["test"]))
    assert all(normalise_title(r["title"]) in titles[r["id"]]
               for r in read_jsonl(root / "test" / "test_abc.jsonl") if "title" in r)


def test_a_second_build_reuses_everything(built):
    root, first = built
    outputs = {p: p.stat().st_mtime_ns for p in sorted(root.rglob("*")) if p.is_file()
               and p.name not in {"corpus_summary.json", "corpus_drops.jsonl"}}
    second = build_corpus(root, size=CorpusSize.uniform(PIECES), seed=42, workers=1, progress=False)
    for fmt in ("abc", "mtf"):
        assert second.conversions[fmt]["converted"] == 0
        assert second.conversions[fmt]["reused"] == first.conversions[fmt]["converted"]
    assert second.selected == first.selected
    assert {p: p.stat().st_mtime_ns for p in outputs} == outputs
