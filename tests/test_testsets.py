"""prepare_test_data.py and evaluation.testsets: selection, the leakage guard, the folder format."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from evaluation import testsets
from fileio import read_jsonl, write_jsonl
from helpers import ABC_FILES, ABC_FIXTURES, MTF_FILES, MTF_FIXTURES, REPO_ROOT, make_sources
from records import piece_hash

SCRIPT = REPO_ROOT / "prepare_test_data.py"


def run_prepare(paths: dict[str, Path], output: Path, *args: str, training: bool = True) -> subprocess.CompletedProcess:
    """The script with every training-JSONL key pointed into the tmp folder (the repository's own
    data/training must not decide a test)."""
    absent = paths["root"] / "no_such_training.jsonl"
    keys = [f"--{key}={absent}" for key in ("LORA_ABC_TRAIN_JSONL", "LORA_ABC_VALID_JSONL",
                                             "LORA_MTF_TRAIN_JSONL", "LORA_MTF_VALID_JSONL")]
    extra = ["--training_jsonl", str(paths["training"])] if training else []
    command = [sys.executable, str(SCRIPT), "--wikimt_dir", str(paths["wikimt"]),
               "--midicaps_test", str(paths["midicaps"]), "--output_dir", str(output), *keys, *extra, *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


@pytest.fixture
def sources(tmp_path) -> dict[str, Path]:
    return make_sources(tmp_path / "sources")


def summary_of(folder: Path) -> dict:
    return json.loads((folder / testsets.SUMMARY_NAME).read_text(encoding="utf-8"))


def test_leakage_guard_refuses_exactly_the_shared_pieces(sources, tmp_path):
    out = tmp_path / "test"
    result = run_prepare(sources, out, "--num_abc", "100", "--num_mtf", "100")
    assert result.returncode == 0, result.stderr
    summary = summary_of(out)
    assert summary["refused_by_reason"] == {
        "abc": {"id in training data": 1, "title in training data": 1, "no text": 1,
                "unusable music file: empty file": 1},
        "mtf": {"content in training data": 1},
    }
    refused = {(row["id"], row["reason"]) for row in summary["refused"]}
    assert {("wm01", "id in training data"), ("wm02", "title in training data"),
            ("lmd/b/1", "content in training data")} <= refused
    assert summary["counts"]["abc"] == {"requested": 100, "offered": 6, "refused": 4, "selected": 2}
    assert summary["counts"]["mtf"] == {"requested": 100, "offered": 4, "refused": 1, "selected": 3}
    assert summary["training_jsonls"]["missing"] and summary["training_jsonls"]["music_files_not_found"] == 1
    assert summary["config"]["SEED"] == summary["seed"]
    # Refusals are printed too, and the absent training JSONLs are reported, not ignored.
    assert "refused, title in training data: 1" in result.stdout
    assert "training JSONL not found" in result.stderr

    abc = read_jsonl(out / "test_abc.jsonl")
    assert sorted(r["id"] for r in abc) == ["wm00", "wm03"]
    wm00 = next(r for r in abc if r["id"] == "wm00")
    assert list(wm00) == ["id", "filepaths", "source", "texts", "title"]
    assert wm00["filepaths"] == ["abc/wm00.abc"] and wm00["source"] == "wikimt" and wm00["title"] == "Tune 0"
    assert wm00["texts"] == {"background": "background 0", "description": "description 0", "scene": "a scene"}
    assert (out / "abc" / "wm00.abc").read_bytes() == (sources["wikimt"] / "abc" / "wm00.abc").read_bytes()
    mtf = read_jsonl(out / "test_mtf.jsonl")
    assert sorted(r["id"] for r in mtf) == ["lmd/a/0", "lmd/a/2", "lmd/b/3"]
    for record in mtf:
        assert record["texts"] == {"caption": f"caption {record['id'][-1]}"} and "pair_id" not in record
        assert record["filepaths"] == [f"mtf/{record['id']}.mtf"] and (out / record["filepaths"][0]).is_file()
        assert testsets.record_problem(record, out) is None


def test_selection_is_deterministic_and_a_rerun_replaces_the_folder(sources, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    for out in (first, second):
        assert run_prepare(sources, out, "--num_abc", "1", "--num_mtf", "2").returncode == 0
    for name in ("test_abc.jsonl", "test_mtf.jsonl"):
        assert (first / name).read_bytes() == (second / name).read_bytes()
    assert len(read_jsonl(first / "test_mtf.jsonl")) == 2

    # A larger run, then a smaller one into the same folder: no file of the larger run is left.
    assert run_prepare(sources, first, "--num_abc", "100", "--num_mtf", "100").returncode == 0
    assert run_prepare(sources, first, "--num_abc", "1", "--num_mtf", "0").returncode == 0
    files = sorted(p.relative_to(first).as_posix() for p in first.rglob("*") if p.is_file())
    only = read_jsonl(first / "test_abc.jsonl")[0]["id"]
    assert files == [f"abc/{only}.abc", "test_abc.jsonl", "test_data_summary.json"]
    assert not list(tmp_path.glob(".first*"))  # no staging folder left behind


def test_more_pieces_requested_than_the_source_has(sources, tmp_path):
    result = run_prepare(sources, tmp_path / "test", "--num_abc", "50", "--num_mtf", "1")
    assert result.returncode == 0, result.stderr
    assert "abc: only 2 usable pieces, fewer than the 50 requested" in result.stderr
    assert len(read_jsonl(tmp_path / "test" / "test_abc.jsonl")) == 2
    assert len(read_jsonl(tmp_path / "test" / "test_mtf.jsonl")) == 1


def test_missing_sources_are_named_with_the_command_to_run(sources, tmp_path):
    sources["midicaps"].unlink()
    out = tmp_path / "test"
    result = run_prepare(sources, out)
    assert result.returncode == 0, result.stderr
    assert "MidiCaps test split (MTF)" in result.stderr and "parse_midicaps.py" in result.stderr
    assert (out / "test_abc.jsonl").is_file() and not (out / "test_mtf.jsonl").exists()
    assert summary_of(out)["sources"]["midicaps"]["available"] is False

    shutil.rmtree(sources["wikimt"])
    result = run_prepare(sources, tmp_path / "none")
    assert result.returncode != 0
    assert "no test data source is available" in result.stderr
    assert "prepare_wikimt.py" in result.stderr and "parse_midicaps.py" in result.stderr
    assert not (tmp_path / "none").exists()


def test_without_training_data_the_guard_warns_that_it_checked_nothing(sources, tmp_path):
    result = run_prepare(sources, tmp_path / "test", training=False)
    assert result.returncode == 0, result.stderr
    assert "the leakage guard checked nothing" in result.stderr
    assert summary_of(tmp_path / "test")["counts"]["abc"]["selected"] == 4


def test_a_folder_that_is_not_a_test_set_is_never_replaced(sources, tmp_path):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    result = run_prepare(sources, out)
    assert result.returncode == 2 and "refusing to replace it" in result.stderr
    assert (out / "notes.txt").read_text() == "keep me"


def test_help_runs():
    result = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, check=False)
    assert result.returncode == 0 and "--num_abc" in result.stdout


def test_selection_order_depends_on_the_seed_not_the_source_order():
    ids = [f"piece{i}" for i in range(20)]
    order = sorted(ids, key=lambda i: piece_hash(42, i))
    assert order == sorted(reversed(ids), key=lambda i: piece_hash(42, i))
    assert order != sorted(ids, key=lambda i: piece_hash(7, i))


def test_a_broken_training_jsonl_is_an_error_naming_the_line(sources, tmp_path):
    with open(sources["training"], "a", encoding="utf-8") as f:
        f.write("{not json\n")
    result = run_prepare(sources, tmp_path / "test")
    assert result.returncode == 2 and "clamp3_train.jsonl:4: not valid JSON" in result.stderr
    assert not (tmp_path / "test").exists()


def test_the_demo_corpus_is_a_source_of_both_formats_with_pair_ids(tmp_path):
    demo = tmp_path / "demo_test"
    for fmt, folder, names in (("abc", ABC_FIXTURES, ABC_FILES[:3]), ("mtf", MTF_FIXTURES, MTF_FILES[:3])):
        (demo / fmt).mkdir(parents=True)
        rows = []
        for number, name in enumerate(names):
            shutil.copyfile(folder / f"{name}.{fmt}", demo / fmt / f"t{number}.{fmt}")
            rows.append({"id": f"{fmt}-t{number}", "filepaths": [f"{fmt}/t{number}.{fmt}"], "source": "demo",
                         "texts": {"caption_en": f"tune {number}", "caption_de": f"Stück {number}"},
                         "title": f"T{number}", "pair_id": f"t{number}"})
        write_jsonl(demo / testsets.TEST_FILES[fmt], rows)
    training = tmp_path / "train.jsonl"
    write_jsonl(training, [{"id": "abc-t1", "filepaths": []}])  # one held-out piece leaked by id
    out = tmp_path / "test"
    absent = tmp_path / "absent.jsonl"
    keys = [f"--{key}={absent}" for key in ("LORA_ABC_TRAIN_JSONL", "LORA_ABC_VALID_JSONL",
                                             "LORA_MTF_TRAIN_JSONL", "LORA_MTF_VALID_JSONL")]
    done = subprocess.run([sys.executable, str(SCRIPT), "--demo_dir", str(demo), "--output_dir", str(out),
                           "--training_jsonl", str(training), *keys], capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stderr
    abc, mtf = read_jsonl(out / "test_abc.jsonl"), read_jsonl(out / "test_mtf.jsonl")
    assert sorted(r["id"] for r in abc) == ["abc-t0", "abc-t2"] and len(mtf) == 3
    assert {r["pair_id"] for r in mtf} == {"t0", "t1", "t2"}
    assert all(r["source"] == "demo" and set(r["texts"]) == {"caption_en", "caption_de"} for r in abc + mtf)


def test_the_guard_refuses_a_test_piece_whose_other_format_is_in_training(tmp_path):
    """A demo-style source of both formats: t0's MIDI is in training as a paired record (its
    pair_id), t1's sheet music is there under its bare id after losing its partner, and a training
    record with pair_id "abc-t2" names t2's sheet music as one member of a pair. Each of those
    test pieces is refused as "other format in training data"; what shares nothing stays."""
    demo = tmp_path / "demo_test"
    for fmt, folder, names in (("abc", ABC_FIXTURES, ABC_FILES[:4]), ("mtf", MTF_FIXTURES, MTF_FILES[:4])):
        (demo / fmt).mkdir(parents=True)
        rows = []
        for number, name in enumerate(names):
            shutil.copyfile(folder / f"{name}.{fmt}", demo / fmt / f"t{number}.{fmt}")
            rows.append({"id": f"{fmt}-t{number}", "filepaths": [f"{fmt}/t{number}.{fmt}"], "source": "demo",
                         "texts": {"caption_en": f"tune {number}"}, "pair_id": f"t{number}"})
        write_jsonl(demo / testsets.TEST_FILES[fmt], rows)
    training = tmp_path / "train.jsonl"
    write_jsonl(training, [{"id": "midi-of-t0", "filepaths": [], "pair_id": "t0"},
                           {"id": "t1", "filepaths": []},
                           {"id": "score-of-t2", "filepaths": [], "pair_id": "abc-t2"}])
    plan = testsets.plan_test_set(testsets.demo_sources(demo), {"abc": 10, "mtf": 10}, [training], seed=42)
    refused = {(row["id"], row["reason"]) for row in plan.refused.rows}
    other = testsets.REFUSED_PAIR
    assert refused == {("abc-t0", other), ("mtf-t0", other), ("abc-t1", other), ("mtf-t1", other),
                       ("abc-t2", other)}
    assert sorted(c.id for c in plan.selected["abc"]) == ["abc-t3"]
    assert sorted(c.id for c in plan.selected["mtf"]) == ["mtf-t2", "mtf-t3"]
    assert plan.refused_by_reason()["abc"] == {other: 3}
