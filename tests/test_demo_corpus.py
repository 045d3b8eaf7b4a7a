"""The demo corpus: captions from real corpus headers in several languages and families, content
descriptions from the MIDI, no caption source in the model's input, held-out fields only in the test
set, and a small real build (a few tunes per split, converted by the project's converters and music21)."""

from __future__ import annotations

import hashlib
import json
import random

import pytest
from demo import content, languages
from demo.caption_plan import CaptionPlan, field_kind
from demo.captions import caption_source_lines, captions_for, parse_key, strip_caption_sources, tune_metadata
from demo.corpus import (
    COLLECTIONS,
    SPLITS,
    CorpusSize,
    build_corpus,
    music21_corpus_dir,
    read_collections,
    split_tunes,
)
from evaluation.testsets import record_problem
from fileio import DropLog, read_jsonl
from helpers import OFFICIAL
from preprocess.interleave import read_abc_text
from preprocess.midi_mtf import M3_SKIPPED_META_TYPES
from preprocess.training_jsonl import normalise_title

PLAN = CaptionPlan.load()

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
        "key_de": "A-Dur", "tonic": "A", "accidental": "", "mode": "major", "meter": "2/4",
        "composer": "Conn. Higgins", "noun_en": "reel", "noun_de": "Reel", "noun_gender": "m",
        "collection_name": "Ryan's Mammoth Collection"}
    assert parse_key("Bb")[1:] == ("major", "B", "Dur") and parse_key("Bb")[0] == "B-flat"
    assert parse_key("F#m") == ("F-sharp", "minor", "fis", "Moll")
    assert parse_key("Edor") == ("E", "Dorian", "E", "Dorisch")
    assert parse_key("B")[2] == "H" and parse_key("none") is None


def test_captions_are_deterministic_multilingual_and_never_the_title_alone(real_tunes):
    fields = PLAN.test_fields()
    for collection, text in real_tunes:
        meta = tune_metadata(text, collection)
        seen = set()
        for seed in range(12):
            captions = captions_for(meta, f"42:{seed}", fields)
            assert captions == captions_for(dict(meta), f"42:{seed}", fields)
            assert list(captions) == list(fields)
            for name, value in captions.items():
                assert value.strip(" .\u201c\u201d\u201e\u00ab\u00bb\u2018\u2019") != meta.get("title")
                language = fields[name][0]
                if "tonic" in meta:  # each language names the key its own way
                    tonic = languages.tonic_name(meta["tonic"], meta["accidental"], language)
                    assert tonic.lower() in value.lower(), (name, value)
            seen.add(captions["caption_en"])
        assert len(seen) > 1, "several phrasings per piece"


def test_keys_are_named_as_each_language_names_them():
    meta = {"tonic": "D", "accidental": "", "mode": "major"}
    assert [languages.key_name(meta, lang) for lang in languages.LANGUAGES] == [
        "D major", "D-Dur", "ré majeur", "re mayor", "re maggiore", "D majeur"]
    minor = {"tonic": "B", "accidental": "b", "mode": "minor"}
    assert [languages.key_name(minor, lang) for lang in ("de", "nl", "fr", "es", "it")] == [
        "b-Moll", "bes mineur", "si bémol mineur", "si bemol menor", "si bemolle minore"]
    assert languages.key_name({"tonic": "B", "accidental": "", "mode": "major"}, "de") == "H-Dur"
    assert languages.key_name({"tonic": "F", "accidental": "#", "mode": "dorian"}, "en", "spelled") == \
        "the key of F-sharp, Dorian mode"
    assert languages.meter_phrase("6/8", "en", "named") == "in jig time"
    assert languages.meter_phrase("6/8", "de", "words") == "im Sechsachteltakt"
    assert languages.meter_phrase("5/4", "fr", "words") == "à 5/4"  # no word for it: the figures


def test_a_held_out_family_shares_no_caption_with_the_training_families(real_tunes):
    """The held-out family is another way of writing, not a reshuffle: over many draws, none of its
    captions is one the training families write, in any language."""
    for collection, text in real_tunes:
        meta = tune_metadata(text, collection)
        for language in languages.LANGUAGES:
            trained = {languages.caption(meta, language, family, random.Random(seed))
                       for family in PLAN.training_families for seed in range(20)}
            held = {languages.caption(meta, language, family, random.Random(seed))
                    for family in PLAN.held_out_families for seed in range(20)}
            assert held and not held & trained, (language, held & trained)


def test_the_caption_plan_refuses_overlaps_and_unknown_names():
    fields = {name: getattr(PLAN, name) for name in CaptionPlan.__dataclass_fields__}
    with pytest.raises(ValueError, match="both trained on and held out"):
        CaptionPlan(**{**fields, "held_out_languages": ("it", "en")})
    with pytest.raises(ValueError, match="held_out_families"):
        CaptionPlan(**{**fields, "held_out_families": ("limerick",)})
    assert set(PLAN.held_out_languages) - set(PLAN.training_languages) == set(PLAN.held_out_languages)
    solfege = {"fr", "es", "it"}
    assert len(solfege & set(PLAN.training_languages + PLAN.held_out_languages)) >= 2
    assert len(set(PLAN.training_languages + PLAN.held_out_languages) - {"en"}) >= 5
    kinds = {field_kind(name) for name in {**PLAN.test_fields(), **PLAN.content_test_fields()}}
    assert kinds == {"in-family", "held-out family", "held-out language", "content", "held-out content"}


def test_content_facts_are_read_from_the_notes():
    text = (OFFICIAL / "outputs" / "mtf" / "m21test_test01.mtf").read_text(encoding="utf-8")
    facts = content.mtf_facts(text)
    assert facts["tempo_bpm"] == 120 and facts["meter"] == "4/4" and facts["program"] == 0
    assert facts["notes"] == sum(1 for line in text.splitlines()
                                 if line.startswith("note_on") and not line.endswith(" 0"))
    scale = "ticks_per_beat 480\n" + "\n".join(
        f"note_on 0 0 {pitch} 80\nnote_on 480 0 {pitch} 0" for pitch in (62, 64, 66, 67, 69, 71, 73, 74, 62, 69))
    facts = content.mtf_facts(scale)  # D major, 10 beats at the default 120 BPM
    assert (facts["tonic"], facts["mode"]) == ("D", "major") and facts["seconds"] == 5.0
    assert facts["lowest"] == "D4" and facts["highest"] == "D5" and facts["span"] == 12
    assert content.mtf_facts("ticks_per_beat 480\nset_tempo 500000 0") is None
    for family in content.CONTENT_FAMILIES:
        for language in content.CONTENT_LANGUAGES:
            caption = content.content_caption(facts, language, family, random.Random(0))
            assert "120" in caption and languages.key_name(facts, language) in caption


def test_captions_come_from_metadata_only(real_tunes):
    collection, text = real_tunes[0]
    other_notes = text.replace("vA2(Ac)", "B4")
    assert tune_metadata(other_notes, collection) == tune_metadata(text, collection)
    meta = tune_metadata(text, collection)
    fields = PLAN.test_fields()
    assert captions_for(meta, 7, fields) == captions_for(tune_metadata(other_notes, collection), 7, fields)
    untitled = {k: v for k, v in meta.items() if k != "title"}
    for seed in range(12):
        assert "Regiment" not in " ".join(captions_for(untitled, seed, fields).values())


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
        expected = {"id", "filepaths", *PLAN.training_fields()}
        if fmt == "mtf":
            expected |= set(PLAN.content_training_fields())
        if role == "adapt":  # a tune in both formats' files of the split is one pair (its id as pair_id)
            other = "abc" if fmt == "mtf" else "mtf"
            partners = {r["id"] for r in read_jsonl(root / f"{name.rsplit('_', 1)[0]}_{other}.jsonl")}
        for record in records:
            paired = role == "adapt" and record["id"] in partners
            assert record.get("pair_id", None) == (record["id"] if paired else None)
            # no held-out family, language or content in any training record
            assert set(record) - {"pair_id"} == expected
            assert record["filepaths"] == [f"{fmt}/{record['id']}.{fmt}"]
            assert (root / record["filepaths"][0]).is_file()
            assert COLLECTIONS[record["id"].split("-", 1)[0]][1] == role
        assert role == "base" or any("pair_id" in record for record in records)


def test_build_writes_test_sets_in_the_reader_format(built):
    root, _ = built
    test_dir = root / "test"
    by_format = {fmt: read_jsonl(test_dir / f"test_{fmt}.jsonl") for fmt in ("abc", "mtf")}
    for fmt, records in by_format.items():
        assert len(records) == PIECES
        for record in records:
            assert set(record) - {"title"} == {"id", "filepaths", "source", "texts", "pair_id"}
            assert record["source"] == "demo" and record["filepaths"] == [f"{fmt}/{record['id']}.{fmt}"]
            assert list(record["texts"]) == [*PLAN.test_fields(), *PLAN.content_test_fields()]
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


def test_a_tune_with_many_repeats_is_rendered_once_through_not_unfolded(tmp_path):
    """Aird's book 1 no. 102 has ten repeat ends and no start: music21's expander turned its 713
    bytes into 2.2 MB of MIDI text (170 s), so the corpus depended on the machine's speed. Beyond
    MAX_UNFOLDED_REPEATS repeats are played once: a bound in work, the same on every machine."""
    from demo.corpus import MAX_UNFOLDED_REPEATS, tune_to_mtf

    (tune,) = [t for t in corpus_tunes("airdsAirs/book1.abc", 200) if t.startswith("X:0102")]
    assert tune.count(":|") > MAX_UNFOLDED_REPEATS
    path = tmp_path / "tune.abc"
    path.write_text(tune, encoding="utf-8")
    mtf = tune_to_mtf(path)
    notes = sum(1 for line in mtf.splitlines() if line.startswith("note_on ") and not line.endswith(" 0"))
    assert len(mtf) < 50_000  # rendered, and no explosion
    assert 100 < notes < 1000


def _slow_for_one(path):
    import time

    if path.stem == "slow":
        time.sleep(30)
    return "ticks_per_beat 480\nnote_on 0 0 60 80\nnote_on 480 0 60 0"


def test_a_tune_stopped_by_the_hang_guard_is_retried_not_remembered(tmp_path, monkeypatch):
    """The hang guard's verdict depends on the machine, so it must not outlive the build: the tune is
    dropped (and listed) this time, and the next build converts it again."""
    from demo import corpus

    monkeypatch.setattr(corpus, "CONVERSION_TIMEOUT_S", 1.0)
    tunes = {name: corpus.Tune(name, "airds", f"x#{name}", f"X:1\nK:D\n{name}\n", name, frozenset())
             for name in ("quick", "slow")}
    work = tmp_path / "work"
    drops = DropLog("t")
    counts = corpus._convert("t", tunes, work, "mtf", _slow_for_one, 1, False, drops)
    assert counts["converted"] == 1 and counts["failed"] == 1
    assert [row["id"] for row in drops.rows] == ["slow"] and "TimeoutError" in drops.rows[0]["reason"]
    assert json.loads((work / "mtf_failures.json").read_text()) == {}
    again = corpus._convert("t", tunes, work, "mtf", _slow_for_one, 1, False, DropLog("t"))
    assert again["failed_before"] == 0 and again["failed"] == 1  # tried again, not skipped as known-bad


def test_a_corpus_written_with_another_caption_plan_is_not_current(built, tmp_path):
    """An existing demo folder built before the caption plan changed must not be reused: its models
    were trained on other captions than its test set would hold (the demo then rebuilds everything)."""
    from demo.corpus import corpus_is_current

    root, summary = built
    assert summary.caption_plan == PLAN.fingerprint() and corpus_is_current(root)
    other = CaptionPlan(**{**{name: getattr(PLAN, name) for name in CaptionPlan.__dataclass_fields__},
                           "held_out_languages": ("nl",), "training_languages": ("en", "de", "fr", "es")})
    assert other.fingerprint() != PLAN.fingerprint() and not corpus_is_current(root, other)
    old = tmp_path / "old"
    old.mkdir()
    (old / "corpus_summary.json").write_text(json.dumps({"selected": {}}), encoding="utf-8")  # built before plans
    assert not corpus_is_current(old) and not corpus_is_current(tmp_path / "missing")
