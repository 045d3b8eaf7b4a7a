"""MidiCaps -> CLaMP 3 records, from hand-written JSONL and CSV tables."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from preprocess import midicaps

SCRIPT = Path(__file__).resolve().parent.parent / "preprocessing" / "parse_midicaps.py"

ROWS = [
    {"location": "lmd_full/1/1a0751ac.mid",
     "caption": "A melodic electronic song with ambient elements, featuring piano and synth pad. "
                "The song is in C major with a 4/4 time signature and a moderate tempo of 120 bpm.",
     "genre": ["electronic", "ambient"], "genre_prob": [0.61, 0.2], "mood": ["melodic", "relaxing", "melodic"],
     "mood_prob": [0.3, 0.2, 0.1], "key": "C major", "time_signature": "4/4", "tempo": 120,
     "tempo_word": "Moderato", "duration": 182, "duration_word": "Long",
     "chord_summary": ["C", "G", "Am", "F"], "chord_summary_occurence": 12,
     "instrument_summary": ["Piano", "Synth Pad"], "instrument_numbers_sorted": [0, 88],
     "all_chords": ["C", "G"], "all_chords_timestamps": [0.5, 1.4], "test_set": False},
    {"location": "lmd_full/2/2b6d1f3e.mid",
     "caption": "A short classical piece for string ensemble in D minor.",
     "genre": ["classical"], "mood": [], "key": "D minor", "time_signature": "3/4", "tempo": 90,
     "tempo_word": "Andante", "duration": 40, "duration_word": "Short", "chord_summary": ["Dm", "A"],
     "instrument_summary": ["Violin", "Viola", "Cello"], "test_set": True},
    {"location": "lmd_full/3/3c000000.mid", "caption": "", "genre": ["pop"], "test_set": False},
    {"location": "lmd_full/4/4d000000.mid", "caption": "A rock song that nobody converted.",
     "test_set": False},
    {"location": "lmd_full/5/5e000000.mid", "caption": "A jazz trio.", "key": None, "mood": None,
     "test_set": "True"},
    {"location": "lmd_full/1/1a0751ac.mid", "caption": "The same file again.", "test_set": False},
]


@pytest.fixture
def tree(tmp_path, official_dir):
    mtf_root = tmp_path / "mtf"
    for stem, source in (("1/1a0751ac", "m21test_test01.mtf"), ("2/2b6d1f3e", "edge_multitrack_8.mtf"),
                         ("3/3c000000", "m21test_test03.mtf"), ("5/5e000000", "m21test_test05.mtf")):
        (mtf_root / stem).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(official_dir / "outputs/mtf" / source, mtf_root / f"{stem}.mtf")
    jsonl = tmp_path / "train.json"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    return tmp_path


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_jsonl_rows_become_records_split_by_test_set(tree):
    out = tree / "training"
    summary = midicaps.convert(tree / "train.json", tree / "mtf", out, strip_prefix="lmd_full", progress=False)
    train, test = read(out / midicaps.TRAIN_NAME), read(out / midicaps.TEST_NAME)
    assert [r["id"] for r in train] == ["lmd_full/1/1a0751ac"]
    assert [r["id"] for r in test] == ["lmd_full/2/2b6d1f3e", "lmd_full/5/5e000000"]
    first = train[0]
    assert list(first) == ["id", "filepaths", "caption", "genre", "mood", "key", "time_signature",
                           "tempo_word", "duration_word", "instrument_summary", "chord_summary"]
    assert first["filepaths"] == ["../mtf/1/1a0751ac.mtf"]
    assert first["mood"] == ["melodic", "relaxing"]
    assert first["instrument_summary"] == ["Piano", "Synth Pad"]
    assert (out / first["filepaths"][0]).is_file()
    assert test[1] == {"id": "lmd_full/5/5e000000", "filepaths": ["../mtf/5/5e000000.mtf"],
                       "caption": "A jazz trio."}
    assert "mood" not in test[0]  # empty list left out
    dropped = {(d["row"], d["reason"]) for d in read(out / midicaps.DROPPED_NAME)}
    assert dropped == {(2, "no caption"), (3, "missing file"), (5, "duplicate location")}
    assert summary.written == {"train": 1, "test": 2} and len(summary.drops) == 3


def test_csv_with_list_strings_gives_the_same_records(tree):
    csv_path = tree / "midicaps.csv"
    columns = list(ROWS[0])
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in ROWS:
            # pandas writes lists as their Python repr and missing values as empty cells
            writer.writerow({c: ("" if row.get(c) is None else str(row.get(c, ""))) for c in columns})
    midicaps.convert(tree / "train.json", tree / "mtf", tree / "a", strip_prefix="lmd_full", progress=False)
    midicaps.convert(csv_path, tree / "mtf", tree / "b", strip_prefix="lmd_full/", progress=False)
    for name in (midicaps.TRAIN_NAME, midicaps.TEST_NAME):
        assert read(tree / "a" / name) == read(tree / "b" / name)


def test_location_mapping():
    assert midicaps.mtf_path("lmd_full/1/x.mid", "/m") == Path("/m/lmd_full/1/x.mtf")
    assert midicaps.mtf_path("lmd_full/1/x.mid", "/m", "lmd_full") == Path("/m/1/x.mtf")
    assert midicaps.mtf_path("./a/b.c.midi", "/m") == Path("/m/a/b.c.mtf")
    with pytest.raises(ValueError):
        midicaps.mtf_path("../../etc/x.mid", "/m")


def test_verify_files_and_allow_missing(tree):
    (tree / "mtf/5/5e000000.mtf").write_bytes(b"\x80\x81")
    out = tree / "v"
    midicaps.convert(tree / "train.json", tree / "mtf", out, strip_prefix="lmd_full", verify_files=True,
                     progress=False)
    reasons = {d["location"]: d["reason"] for d in read(out / midicaps.DROPPED_NAME)}
    assert reasons["lmd_full/5/5e000000.mid"] == "not UTF-8 (byte 0)"
    midicaps.convert(tree / "train.json", tree / "mtf", out, strip_prefix="lmd_full", allow_missing=True,
                     progress=False)
    assert "lmd_full/4/4d000000" in [r["id"] for r in read(out / midicaps.TRAIN_NAME)]


def test_bad_inputs_name_the_file(tree):
    with pytest.raises(midicaps.MidiCapsError, match="nope.jsonl"):
        midicaps.convert(tree / "nope.jsonl", tree / "mtf", tree / "o", progress=False)
    broken = tree / "broken.jsonl"
    broken.write_text('{"location": "a.mid", "caption": "x"}\n{oops\n', encoding="utf-8")
    with pytest.raises(midicaps.MidiCapsError, match=r"broken\.jsonl:2"):
        midicaps.convert(broken, tree / "mtf", tree / "o", progress=False)
    other = tree / "other.csv"
    other.write_text("file,text\na.mid,x\n", encoding="utf-8")
    with pytest.raises(midicaps.MidiCapsError, match="location"):
        midicaps.convert(other, tree / "mtf", tree / "o", progress=False)


@pytest.mark.slow
def test_script(tree, tmp_path):
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--input", str(tree / "train.json"), "--midi_root", str(tree / "mtf"),
         "--output_dir", str(tree / "training"), "--strip_prefix", "lmd_full", "--quiet", "--workers", "1"],
        capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "train: 1, test: 2" in result.stdout and "no caption: 1" in result.stdout
    bad = subprocess.run([sys.executable, str(SCRIPT), "--input", str(tmp_path / "x.csv"), "--midi_root", "m"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "x.csv" in bad.stderr
