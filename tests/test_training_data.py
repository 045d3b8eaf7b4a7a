"""The trainer's data pipeline on real fixture files: bad-record drops, the held-out split, text
dropout, augmentation switches, batch plans (ranks, workers, resume, bucketing, no duplicates) and
the cached text features against the tiny model."""

from __future__ import annotations

import json
import pickle
import random
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from fileio import DropLog, iter_jsonl
from helpers import OFFICIAL
from patchilizer import M3Patchilizer
from torch.utils.data import DataLoader
from training.data import (
    Augmentation,
    BatchDataset,
    FileCheckCache,
    held_out_split,
    load_records,
    plan_epoch,
    plan_validation,
    rows_of_rank,
)
from training.text import LiveText, text_dropout, text_token_ids, token_key, truncate_ids, validation_text
from training.text_cache import TextFeatureCache, fingerprint, variant_token_ids

ABC_DIR = OFFICIAL / "outputs" / "int_abc"
MTF_DIR = OFFICIAL / "outputs" / "mtf"
SEED = 7


def words(*numbers: int) -> str:
    return " ".join(f"w{n}" for n in numbers)


def write_records(tmp_path: Path, rows: list[dict], name: str = "train.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def load(path: Path, fmt: str = "abc") -> list:
    return load_records(path, fmt, M3Patchilizer(), DropLog("test"), progress=False)


def copy_music(tmp_path: Path, source_dir: Path) -> list[str]:
    """The fixture files copied under tmp_path/music, as paths relative to tmp_path."""
    target = tmp_path / "music"
    target.mkdir(exist_ok=True)
    names = []
    for source in sorted(source_dir.iterdir()):
        shutil.copy(source, target / source.name)
        names.append(f"music/{source.name}")
    return names


@pytest.fixture(scope="module")
def abc_corpus(tmp_path_factory) -> tuple[Path, list]:
    """22 ABC records with varied lengths and word texts; titles repeat (every 4th record)."""
    tmp_path = tmp_path_factory.mktemp("abc")
    files = copy_music(tmp_path, ABC_DIR)
    rows = [{"id": f"piece{i}", "filepaths": [f], "title": words(i % 4),
             "artists": [words(10 + i), words(50 + i)], "genres": [words(100 + i % 3)]}
            for i, f in enumerate(files)]
    path = write_records(tmp_path, rows)
    records = load(path)
    assert len(records) == len(files)
    return path, records


@pytest.fixture(scope="module")
def tokenizer(word_tokenizer):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(word_tokenizer)


def dataset(records, plan, tokenizer, **kwargs) -> BatchDataset:
    options = {"seed": SEED, "epoch": 0, "text": LiveText(tokenizer, 16)}
    options.update(kwargs)
    return BatchDataset(records, plan, M3Patchilizer(), **options)


def examples(batch: dict) -> list[tuple]:
    """Each example of a collated batch without its padding, to compare across paddings."""
    out = []
    for row in range(len(batch["record_index"])):
        patches = batch["patches"][row][batch["patch_mask"][row].bool()].tolist()
        text = batch["text_ids"][row][batch["text_mask"][row].bool()].tolist() if "text_ids" in batch \
            else int(batch["text_rows"][row])
        out.append((int(batch["record_index"][row]), patches, text, int(batch["music_keys"][row]),
                    int(batch["text_keys"][row])))
    return out


# ----------------------------------------------------------------------------- records


def test_bad_records_are_dropped_with_file_and_reason(tmp_path):
    music = tmp_path / "music"
    music.mkdir()
    shutil.copy(ABC_DIR / "bach_bwv1.6.abc", music / "good.abc")
    shutil.copy(MTF_DIR / "edge_multitrack_8.mtf", music / "good.mtf")
    (music / "empty.abc").write_text("")
    (music / "garbled.abc").write_bytes(b"X:1\nK:C\n\xff\xfe\x80abc|\n")
    (music / "nopatch.abc").write_text("just words without a barline\n")
    rows = [
        {"id": "good", "filepaths": ["music/good.abc", "music/good.mtf"], "title": "w1"},
        {"id": "missing", "filepaths": ["music/missing.abc"], "title": "w2"},
        {"id": "empty", "filepaths": ["music/empty.abc"], "title": "w3"},
        {"id": "garbled", "filepaths": ["music/garbled.abc"], "title": "w4"},
        {"id": "nopatch", "filepaths": ["music/nopatch.abc"], "title": "w5"},
        {"id": "notext", "filepaths": ["music/good.abc"], "title": " ", "tags": [], "language": "en"},
        {"id": "mtfonly", "filepaths": ["music/good.mtf"], "title": "w6"},
        {"filepaths": ["music/missing.abc", "music/good.abc"], "genres": ["w7"]},  # one bad file of two
    ]
    path = write_records(tmp_path, rows)
    for workers in (1, 2):
        drops = DropLog("records")
        records = load_records(path, "abc", M3Patchilizer(), drops, workers=workers, progress=False)
        assert [r.id for r in records] == ["good", "music/missing.abc"]
        assert [r.index for r in records] == [0, 7]
        assert records[1].music_files == (str(music / "good.abc"),)
        assert records[0].music_keys == records[1].music_keys  # same content, same key
        by_id = {row["id"]: row for row in drops.rows}
        assert by_id["missing"]["reason"] == "missing music file"
        assert by_id["missing"]["file"] == str(music / "missing.abc")
        assert by_id["empty"]["reason"] == "empty music file"
        assert by_id["garbled"]["reason"] == "music file is not UTF-8"
        assert by_id["garbled"]["file"] == str(music / "garbled.abc")
        assert by_id["nopatch"]["reason"] == "no patches in music file"
        assert by_id["notext"]["reason"] == "no text" and by_id["notext"]["file"] == str(music / "good.abc")
        assert by_id["mtfonly"]["reason"] == "no .abc file"
        assert by_id["music/missing.abc"]["reason"] == "missing music file"
        assert sum(drops.counts.values()) == 7
    mtf = load(path, "mtf")
    assert [r.id for r in mtf] == ["good", "mtfonly"]


def test_bad_jsonl_lines_are_drops_with_their_line_numbers(tmp_path):
    """An invalid line and a line that is JSON but not an object are drops like any bad record:
    the good lines keep the indices they would have (every non-blank line counts)."""
    files = copy_music(tmp_path, ABC_DIR)[:2]
    path = tmp_path / "train.jsonl"
    path.write_bytes(b"".join([
        json.dumps({"id": "a", "filepaths": [files[0]], "title": "w1"}).encode() + b"\n",
        b'{"id": "broken", "filepaths": [\n',
        b"[1, 2]\n",
        b"\n",
        b'{"title": "w\xff"}\n',
        json.dumps({"id": "b", "filepaths": [files[1]], "title": "w2"}).encode() + b"\n",
    ]))
    drops = DropLog("records")
    records = load_records(path, "abc", M3Patchilizer(), drops, progress=False)
    assert [(r.id, r.index) for r in records] == [("a", 0), ("b", 4)]
    assert [(row["line"], row["reason"]) for row in drops.rows] == [
        (2, "bad JSONL line: not valid JSON (Expecting value)"),
        (3, "bad JSONL line: expected a JSON object, not list"),
        (5, "bad JSONL line: not UTF-8")]
    assert all(row["jsonl"] == str(path) for row in drops.rows)
    with pytest.raises(ValueError, match=r"train\.jsonl:2: not valid JSON"):
        list(iter_jsonl(path))  # the strict reading of the other callers is unchanged


class ThreadGather:
    """``distributed.all_gather_object`` for ranks played by threads."""

    def __init__(self, world_size: int):
        self.slots: list = [None] * world_size
        self.barrier = threading.Barrier(world_size)

    def for_rank(self, rank: int):
        def gather(obj):
            self.slots[rank] = obj
            self.barrier.wait()
            gathered = list(self.slots)
            self.barrier.wait()
            return gathered
        return gather


def mixed_records(tmp_path: Path) -> Path:
    """Good, bad and shared files over 13 records (an odd count, so rank shares differ)."""
    files = copy_music(tmp_path, ABC_DIR)[:9]
    (tmp_path / "music" / "empty.abc").write_text("")
    rows = [{"id": f"p{i}", "filepaths": [files[i % len(files)]], "title": words(i)} for i in range(11)]
    rows += [{"id": "empty", "filepaths": ["music/empty.abc"], "title": "w1"},
             {"id": "gone", "filepaths": ["music/gone.abc", files[0]], "title": "w2"}]
    return write_records(tmp_path, rows)


@pytest.mark.parametrize("world_size", [2, 3])
def test_a_file_check_shared_by_ranks_gives_every_rank_the_one_process_result(tmp_path, world_size):
    path = mixed_records(tmp_path)
    one_drops = DropLog("one")
    one = load_records(path, "abc", M3Patchilizer(), one_drops, progress=False)
    gather = ThreadGather(world_size)
    results: dict[int, tuple] = {}

    def rank_main(rank: int) -> None:
        drops = DropLog(f"rank {rank}")
        records = load_records(path, "abc", M3Patchilizer(), drops, progress=False, rank=rank,
                               world_size=world_size, gather=gather.for_rank(rank))
        results[rank] = (records, drops.rows)

    threads = [threading.Thread(target=rank_main, args=(rank,)) for rank in range(world_size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(results) == list(range(world_size))
    for records, rows in results.values():
        assert records == one
        assert rows == one_drops.rows


def test_file_checks_are_cached_by_path_size_mtime_and_patch_settings(tmp_path):
    path = mixed_records(tmp_path)
    cache_file = tmp_path / "run" / "file_checks.abc.json"

    def load_cached(patchilizer=None, workers=1):
        patchilizer = patchilizer or M3Patchilizer()
        cache = FileCheckCache(cache_file, patchilizer)
        drops = DropLog("records")
        records = load_records(path, "abc", patchilizer, drops, workers=workers, progress=False, cache=cache)
        cache.save()
        return records, drops.rows, cache

    first, first_drops, cache = load_cached()
    assert (cache.checked, cache.hits) == (11, 0)  # 9 good files, the empty one, the missing one
    assert cache_file.is_file() and not list(cache_file.parent.glob("*.tmp"))
    again, again_drops, cache = load_cached(workers=2)
    assert (again, again_drops) == (first, first_drops)
    assert (cache.checked, cache.hits) == (1, 10)  # only the missing file is looked at again
    changed = Path(first[1].music_files[0])
    changed.write_text(changed.read_text() + "|\n")  # another size: checked again, not taken from the cache
    third, _, cache = load_cached()
    assert (cache.checked, cache.hits) == (2, 9)
    assert third[1].music_keys != first[1].music_keys
    _, _, cache = load_cached(M3Patchilizer(patch_size=32))
    assert cache.hits == 0  # other patch settings, other verdicts


def test_record_length_is_capped_at_the_patch_length(abc_corpus):
    _, records = abc_corpus
    lengths = {Path(r.music_files[0]).name: r.length for r in records}
    assert lengths["demos_multiple-verses.abc"] == 6  # 4 patches + BOS + EOS
    assert lengths["beethoven_opus59no1_movement2.abc"] == 512  # 3345 patches, capped


def test_held_out_split_is_deterministic_and_by_piece(tmp_path):
    shutil.copy(ABC_DIR / "bach_bwv1.6.abc", tmp_path / "a.abc")
    rows = [{"id": f"p{i // 2}", "filepaths": ["a.abc"], "title": f"w{i}"} for i in range(400)]
    records = load(write_records(tmp_path, rows))
    train, held = held_out_split(records, 0.2, seed=3)
    assert held_out_split(records, 0.2, seed=3) == (train, held)
    assert 50 < len(held) < 110 and len(train) + len(held) == 400
    assert not {r.id for r in train} & {r.id for r in held}  # both records of a piece on one side
    assert held_out_split(records, 0.2, seed=4)[1] != held
    assert held_out_split(records, 0.0, seed=3)[1] == []


def test_a_pair_id_is_read_kept_out_of_the_text_and_keeps_a_pair_on_one_side(tmp_path):
    """``pair_id`` names one piece across the two formats' JSONLs: the record keeps it, no text
    line ever holds it, and the held-out split follows it (records of one pair with other ids
    land together); a record without one splits by its id as before."""
    shutil.copy(ABC_DIR / "bach_bwv1.6.abc", tmp_path / "a.abc")
    rows = [{"id": f"r{i}", "filepaths": ["a.abc"], "title": f"w{i}", "pair_id": f"piece{i // 2}"}
            for i in range(400)] + [{"id": "single", "filepaths": ["a.abc"], "title": "w400"}]
    records = load(write_records(tmp_path, rows))
    assert [r.pair_id for r in records[:3]] == ["piece0", "piece0", "piece1"] and records[-1].pair_id is None
    assert "piece0" not in validation_text(records[0].fields)
    assert all("piece" not in text_dropout(r.fields, random.Random(n)) for n, r in enumerate(records))
    train, held = held_out_split(records, 0.2, seed=3)
    assert 50 < len(held) < 110
    assert not {r.pair_id for r in train} & {r.pair_id for r in held}
    without = load(write_records(tmp_path, [{k: v for k, v in row.items() if k != "pair_id"} for row in rows],
                                 "plain.jsonl"))
    assert [r.id for r in held_out_split(without, 0.2, seed=3)[1]] != [r.id for r in held]


# ----------------------------------------------------------------------------- text


RECORD_FIELDS = {"title": "w1 w2", "artists": ["w3", "w3", "w4"], "description": "w5\nw6\n\nw1 w2",
                 "language": "en", "year": 1999, "translations": {"language": "de", "title": "w7"}}


def test_validation_text_keeps_record_order_and_dedupes():
    assert validation_text(RECORD_FIELDS) == "w1 w2</s>w3</s>w4</s>w5</s>w6"
    assert validation_text({"translations": {"language": "fr", "title": "w9"}}) == "w9"
    assert validation_text({"title": "", "tags": [None, " "]}) == ""


def test_text_dropout_is_deterministic_and_never_empty():
    lines = set(validation_text(RECORD_FIELDS).split("</s>")) | {"w7"}
    samples = [text_dropout(RECORD_FIELDS, random.Random(seed)) for seed in range(200)]
    assert samples == [text_dropout(RECORD_FIELDS, random.Random(seed)) for seed in range(200)]
    assert all(samples)
    assert all(set(s.split("</s>")) <= lines for s in samples)
    assert "w7" in samples  # translations chosen about half the time
    assert len(set(samples)) > 20
    assert all(len(s.split("</s>")) == len(set(s.split("</s>"))) for s in samples)
    only_translated = {"translations": {"language": "de", "title": "w8"}}
    assert {text_dropout(only_translated, random.Random(s)) for s in range(20)} == {"w8"}


def test_text_truncation_follows_the_official_rule(tokenizer):
    ids = list(range(10))
    assert truncate_ids(ids, 4, None) == [0, 1, 2, 3]
    seen = {tuple(truncate_ids(ids, 4, random.Random(s))) for s in range(100)}
    assert (0, 1, 2, 3) in seen and (6, 7, 8, 9) in seen
    assert all(list(window) == list(range(window[0], window[0] + 4)) for window in seen)
    assert all(1 <= window[0] for window in seen if window != (0, 1, 2, 3))  # middle starts at >= 1
    assert text_token_ids(tokenizer, "w0 w1</s>w2", 16, None) == [0, 4, 5, 2, 6, 2]


# ----------------------------------------------------------------------------- music


def test_patchilizer_rng_argument_matches_the_global_stream():
    text = "".join(f"a{i}|\n" for i in range(600))
    p = M3Patchilizer()
    random.seed(5)
    official = p.encode(text, truncate=True, random_truncate=True)
    state = random.getstate()
    assert p.encode(text, truncate=True, random_truncate=True, rng=random.Random(5)) == official
    assert random.getstate() == state  # a passed generator leaves global state alone


def test_augmentation_switches(tmp_path, tokenizer):
    files = copy_music(tmp_path, ABC_DIR)
    long_file = "music/beethoven_opus59no1_movement2.abc"
    named = "music/demos_multiple-verses.abc"  # V:1 treble nm="test"
    rows = [{"id": "two", "filepaths": [named, "music/bach_bwv67.4.abc"], "title": "w1",
             "artists": ["w2", "w3"], "genres": ["w4"]},
            {"id": "long", "filepaths": [long_file], "title": "w2"}]
    records = load(write_records(tmp_path, rows))
    assert len(files) == 22 and len(records) == 2
    head = M3Patchilizer().encode((tmp_path / long_file).read_text(), add_special_patches=True)[:512]
    plan = plan_epoch(records, 2, 0, SEED, bucketing=False)

    def run(augmentation, train=True):
        out = []
        for epoch in range(12):
            ds = dataset(records, plan, tokenizer, epoch=epoch, augmentation=augmentation, train=train)
            batch = ds[0]
            out.append({int(i): examples(batch)[row] for row, i in enumerate(batch["record_index"])})
        return out

    def has_names(patches):
        return any("nm=" in M3Patchilizer().decode([p]) for p in patches)

    on = run(Augmentation())
    assert len({e[0][3] for e in on}) == 2  # both files of record "two" get used
    assert any(not has_names(e[0][1]) for e in on)
    assert len({str(e[1][1][:3]) for e in on}) > 1 and any(e[1][1] != head for e in on)  # random cuts
    assert all(len(e[1][1]) == 512 for e in on)
    off = run(Augmentation.none())
    assert len({e[0][3] for e in off}) == 1 and all(has_names(e[0][1]) for e in off)
    assert all(e[1][1] == head for e in off)
    assert all(has_names(e[0][1]) for e in run(Augmentation(remove_instruments_p=0.0)))
    assert not any(has_names(e[0][1]) for e in run(Augmentation(remove_instruments_p=1.0)))
    assert len({tuple(e[0][2]) for e in on}) > 3  # text dropout
    full_text = [0, 5, 2, 6, 2, 7, 2, 8, 2]  # w1</s>w2</s>w3</s>w4 in record order
    assert all(e[0][2] == full_text for e in run(Augmentation(text_dropout=False)))
    validation = run(Augmentation(), train=False)
    assert all(e[1][1] == head and has_names(e[0][1]) for e in validation)
    assert all(e[0][2] == full_text for e in validation)
    # Switching the file choice off leaves the other draws alone: the cut of "long" is unchanged.
    assert [e[1][1] for e in run(Augmentation(random_file=False))] == [e[1][1] for e in on]


# ----------------------------------------------------------------------------- plans


def test_workers_do_not_change_the_batches(abc_corpus, tokenizer):
    _, records = abc_corpus
    plan = plan_epoch(records, 4, epoch=1, seed=SEED)
    ds = dataset(records, plan, tokenizer, epoch=1)
    serial = [examples(b) for b in DataLoader(ds, batch_size=None, num_workers=0)]
    parallel = [examples(b) for b in DataLoader(ds, batch_size=None, num_workers=2)]
    assert serial == parallel and len(serial) == 5


def test_two_ranks_of_two_equal_one_rank_of_four(abc_corpus, tokenizer):
    _, records = abc_corpus
    plan = plan_epoch(records, 4, epoch=2, seed=SEED)
    whole = dataset(records, plan, tokenizer, epoch=2)
    ranks = [dataset(records, plan, tokenizer, epoch=2, rank=r, world_size=2) for r in range(2)]
    assert len(whole) == len(ranks[0]) == len(ranks[1]) == 5 and plan.left_over == 2
    for k in range(len(whole)):
        assert examples(whole[k]) == examples(ranks[0][k]) + examples(ranks[1][k])
        assert all(len(ranks[r][k]["record_index"]) == 2 for r in range(2))


def test_resume_gives_the_remaining_batches(abc_corpus, tokenizer):
    _, records = abc_corpus
    plan = plan_epoch(records, 4, epoch=3, seed=SEED)
    full = [examples(b) for b in dataset(records, plan, tokenizer, epoch=3)]
    resumed = dataset(records, plan_epoch(records, 4, epoch=3, seed=SEED), tokenizer, epoch=3, start_batch=2)
    assert [examples(b) for b in resumed] == full[2:]


def test_epochs_differ_and_records_appear_at_most_once(abc_corpus):
    _, records = abc_corpus
    plans = [plan_epoch(records, 4, epoch=e, seed=SEED) for e in range(3)]
    for plan in plans:
        flat = [p for batch in plan.batches for p in batch]
        assert len(flat) == len(set(flat)) == 20 and all(len(b) == 4 for b in plan.batches)
    assert plans[0].batches != plans[1].batches
    assert plan_epoch(records, 4, epoch=1, seed=SEED).batches == plans[1].batches


def test_no_two_equal_texts_or_files_in_a_global_batch(tmp_path):
    shutil.copy(ABC_DIR / "bach_bwv1.6.abc", tmp_path / "shared.abc")
    files = copy_music(tmp_path, ABC_DIR)
    rows = [{"id": f"p{i}", "filepaths": [files[i % 22]], "title": f"w{i % 5}"} for i in range(40)]
    rows += [{"id": f"s{i}", "filepaths": ["shared.abc"], "title": f"w{100 + i}"} for i in range(3)]
    records = load(write_records(tmp_path, rows))
    for bucketing in (True, False):
        plan = plan_epoch(records, 4, epoch=0, seed=SEED, bucketing=bucketing)
        for batch in plan.batches:
            texts = [records[p].text_key for p in batch]
            music = [k for p in batch for k in records[p].music_keys]
            assert len(set(texts)) == len(texts) and len(set(music)) == len(music)
        placed = sum(len(b) for b in plan.batches)
        assert placed + plan.unplaced + plan.left_over == len(records)
        assert placed >= 36
    # Five records that all read the same can share no batch: four cannot be placed.
    same = [{"id": f"d{i}", "filepaths": [files[i]], "title": "w1"} for i in range(5)]
    same += [{"id": f"o{i}", "filepaths": [files[5 + i]], "title": f"w{10 + i}"} for i in range(3)]
    clashing = load(write_records(tmp_path, same, "same.jsonl"))
    plan = plan_epoch(clashing, 4, epoch=0, seed=SEED)
    assert len(plan) == 1 and plan.unplaced + plan.left_over == 4
    # Without the rule, records fall where the shuffle puts them.
    assert sum(len(b) for b in plan_epoch(clashing, 4, 0, SEED, no_duplicates=False).batches) == 8


def test_bucketing_pads_less(abc_corpus, tokenizer):
    _, records = abc_corpus

    def padded_slots(bucketing, pad_to_longest=True):
        plan = plan_epoch(records, 4, epoch=0, seed=SEED, bucketing=bucketing)
        ds = dataset(records, plan, tokenizer, pad_to_longest=pad_to_longest)
        return sum(int(b["patch_mask"].numel() - b["patch_mask"].sum()) for b in ds)

    bucketed = padded_slots(True)
    assert bucketed < padded_slots(False) / 3  # both padded to the longest in the batch
    assert padded_slots(False) < padded_slots(False, pad_to_longest=False)
    unbucketed_plan = plan_epoch(records, 4, epoch=0, seed=SEED, bucketing=False)
    padded = dataset(records, unbucketed_plan, tokenizer, pad_to_longest=False)[0]
    assert padded["patches"].shape[1:] == (512, 64)


def test_validation_plan_keeps_every_record_and_splits_the_last_batch(abc_corpus, tokenizer):
    _, records = abc_corpus
    plan = plan_validation(records, 8, seed=SEED)
    assert sorted(p for b in plan.batches for p in b) == list(range(22)) and len(plan) == 3
    assert plan_validation(records, 8, seed=SEED).batches == plan.batches
    assert [len(rows_of_rank(plan.batches[-1], r, 4)) for r in range(4)] == [1, 2, 1, 2]
    assert rows_of_rank(list(range(8)), 1, 2) == [4, 5, 6, 7]
    ranks = [dataset(records, plan, tokenizer, train=False, rank=r, world_size=4) for r in range(4)]
    seen = sorted(int(i) for ds in ranks for b in ds for i in b["record_index"])
    assert seen == sorted(r.index for r in records)
    assert [len(ds) for ds in ranks] == [3, 3, 3, 3]


def test_text_keys_are_hashes_of_the_text_used(abc_corpus, tokenizer):
    _, records = abc_corpus
    plan = plan_epoch(records, 4, epoch=0, seed=SEED)
    batch = dataset(records, plan, tokenizer)[0]
    for row in range(4):
        ids = batch["text_ids"][row][batch["text_mask"][row].bool()].tolist()
        assert int(batch["text_keys"][row]) == token_key(ids)
        assert ids[0] == 0 and len(ids) <= 16
    assert batch["patches"].dtype == torch.long and batch["music_keys"].dtype == torch.long


# ----------------------------------------------------------------------------- text cache


@pytest.fixture(scope="module")
def text_records(tmp_path_factory):
    """Records with long word texts (truncation matters at 12 tokens) and two with one short line
    (all their variants are the same ids)."""
    tmp_path = tmp_path_factory.mktemp("texts")
    shutil.copy(ABC_DIR / "bach_bwv1.6.abc", tmp_path / "a.abc")
    rows = [{"id": f"t{i}", "filepaths": ["a.abc"], "title": words(i, i + 1),
             "description": "\n".join(words(*range(i + j, i + j + 4)) for j in range(5))} for i in range(10)]
    rows += [{"id": f"short{i}", "filepaths": ["a.abc"], "title": "w0 w1"} for i in range(2)]
    path = write_records(tmp_path, rows)
    return load(path)


def text_encoder(model):
    def encode(ids, mask):
        return model.features("text", ids, mask)
    return encode


def test_cached_features_equal_live_ones(tmp_path, text_records, tokenizer, tiny_model):
    stamp = fingerprint(tiny_model.text_model, tiny_model.text_proj)
    cache = TextFeatureCache.build(tmp_path, text_records, tokenizer, text_encoder(tiny_model), stamp,
                                   max_text_length=12, variants=4, seed=SEED, tokens_per_batch=40,
                                   progress=False)
    assert cache.computed == len(cache) < 4 * len(text_records)  # identical ids share one row
    truncated = 0
    for record in text_records:
        for variant in range(4):
            ids = variant_token_ids(record, variant, tokenizer, 12, SEED)
            truncated += ids[0] != 0
            with torch.no_grad():
                mask = torch.ones(1, len(ids), dtype=torch.long)
                live = tiny_model.features("text", torch.tensor([ids]), mask)
            cached = cache.features([cache.rows_for(record, variant)])
            torch.testing.assert_close(cached, live, atol=1e-6, rtol=0)
            assert cache.key_for(record, variant) == token_key(ids)
    assert truncated > 0  # some variants were cut at a tail or in the middle
    short_rows = {cache.rows_for(record, v) for record in text_records[-2:] for v in range(4)}
    assert len(short_rows) == 1

    plan = plan_epoch(text_records, 4, epoch=0, seed=SEED, no_duplicates=False)
    batch = BatchDataset(text_records, plan, M3Patchilizer(), text=cache, seed=SEED, epoch=0)[0]
    assert set(batch) == {"patches", "patch_mask", "record_index", "music_keys", "text_keys", "text_rows"}
    assert cache.features(batch["text_rows"]).shape == (4, 32)
    cache.features([0])  # opens the memory maps; a pickled copy (a spawned worker) reopens its own
    restored = pickle.loads(pickle.dumps(cache))
    assert restored._shards is None
    torch.testing.assert_close(restored.features(batch["text_rows"]), cache.features(batch["text_rows"]))
    loaded = [DataLoader(BatchDataset(text_records, plan, M3Patchilizer(), text=cache, seed=SEED, epoch=0),
                         batch_size=None, num_workers=w) for w in (0, 2)]
    assert [b["text_rows"].tolist() for b in loaded[0]] == [b["text_rows"].tolist() for b in loaded[1]]
    with pytest.raises(ValueError, match="validation"):
        BatchDataset(text_records, plan, M3Patchilizer(), text=cache, seed=SEED, epoch=0, train=False)


def test_cache_is_reused_and_keyed_by_fingerprint(tmp_path, text_records, tokenizer, tiny_model):
    encode = text_encoder(tiny_model)
    options = {"max_text_length": 12, "seed": SEED, "progress": False, "variants": 3}
    first = TextFeatureCache.build(tmp_path, text_records[:6], tokenizer, encode, "aaaa", **options)
    again = TextFeatureCache.build(tmp_path, text_records[:6], tokenizer, encode, "aaaa", **options)
    assert first.computed > 0 and again.computed == 0 and again.folder == first.folder
    rows = [first.rows_for(r, v) for r in text_records[:6] for v in range(3)]
    torch.testing.assert_close(again.features(rows), first.features(rows), atol=0, rtol=0)
    grown = TextFeatureCache.build(tmp_path, text_records, tokenizer, encode, "aaaa", **options)
    assert 0 < grown.computed < len(grown)  # only the new records' keys
    validation = TextFeatureCache.build(tmp_path, text_records, tokenizer, encode, "aaaa", train=False,
                                        **options)
    assert validation.variants == 1 and not validation.train
    full = TextFeatureCache.build(tmp_path, text_records, tokenizer, encode, "aaaa", text_dropout=False,
                                  **options)
    assert len({full.rows_for(text_records[-1], v) for v in range(3)}) == 1
    plan = plan_epoch(text_records, 4, epoch=0, seed=SEED, no_duplicates=False)
    with pytest.raises(ValueError, match="text_dropout"):
        BatchDataset(text_records, plan, M3Patchilizer(), text=full, seed=SEED, epoch=0)
    BatchDataset(text_records, plan, M3Patchilizer(), text=full, seed=SEED, epoch=0,
                 augmentation=Augmentation(text_dropout=False))
    other = TextFeatureCache.build(tmp_path, text_records[:6], tokenizer, encode, "bbbb", **options)
    assert other.folder != first.folder and other.computed == first.computed


def test_fingerprint_follows_the_weights(tiny_model):
    stamp = fingerprint(tiny_model.text_model, tiny_model.text_proj)
    assert stamp == fingerprint(tiny_model.text_model, tiny_model.text_proj)
    proj = torch.nn.Linear(32, 32)
    proj.load_state_dict(tiny_model.text_proj.state_dict())
    with torch.no_grad():
        proj.bias[0] += 1e-3
    assert fingerprint(tiny_model.text_model, proj) != stamp


def test_cache_built_on_two_ranks_matches_one(tmp_path, text_records, tokenizer, tiny_model):
    encode = text_encoder(tiny_model)
    options = {"max_text_length": 12, "variants": 3, "seed": SEED, "progress": False}
    single = TextFeatureCache.build(tmp_path / "one", text_records, tokenizer, encode, "cccc", **options)
    barrier = threading.Barrier(2)
    built: dict[int, TextFeatureCache] = {}

    def build(rank):
        built[rank] = TextFeatureCache.build(tmp_path / "two", text_records, tokenizer, encode, "cccc",
                                             rank=rank, world_size=2, barrier=barrier.wait, **options)

    threads = [threading.Thread(target=build, args=(r,)) for r in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert built[0].computed + built[1].computed == single.computed and built[1].computed > 0
    for record in text_records:
        for variant in range(3):
            expected = single.features([single.rows_for(record, variant)])
            for rank in range(2):
                got = built[rank].features([built[rank].rows_for(record, variant)])
                torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    assert len(list((tmp_path / "two").rglob("*.features.npy"))) == 2
    assert np.array_equal(built[0]._rows, built[1]._rows)
