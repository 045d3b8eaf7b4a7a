"""WikiMT-X preparation: real-looking single-voice lead sheets (music21 corpus tunes, no V:1)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from patchilizer import M3Patchilizer
from preprocess import wikimt
from preprocess.interleave import interleave_abc

SCRIPT = Path(__file__).resolve().parent.parent / "preprocessing" / "prepare_wikimt.py"

# Nottingham Music Database tune with chord symbols, as shipped in music21's corpus
# (nottingham-dataset/reelsa-c.abc, X: 80); no V: line.
CUCKOO = """X: 80
T:Cuckoo's Nest
% Nottingham Music Database
S:Scottish, via EF
M:4/4
L:1/4
K:D
P:A
A|"D"A/2d/2d/2c/2 d/2e/2f/2d/2|"Em"e/2d/2c/2B/2 "A"AA/2B/2|\\
"C"=c/2B/2A/2B/2 c/2e/2d/2c/2|"Em"B/2A/2G/2F/2 "A7"GA/2G/2|
"D"F/2D/2F/2A/2 d/2f/2e/2d/2|"Em"c/2A/2G/2F/2 "A7"GA/2G/2|\\
"D"FD "A7"C/2D/2E/2G/2|"D"FD D:|
"""

# O'Neill's 1850, no. 2 (music21 corpus oneills1850/0001-0050.abc), first strain.
FARE_YOU_WELL = """X: 2
T: Fare You Well
M: 2/4
L: 1/16
K:D
f-g | a3-b g3-a | f4 e3-d | d3-c A3-B | c4 d3-e |
d3-c (3(A2G2F2) | G4F2-G2 | A-d3 d3-e | d6 ||
"""

TEXTS = {
    "background": "A Scottish reel collected in the Nottingham Music Database.",
    "analysis": "The tune is in D major and 4/4.\nIt moves between D, Em and A7 chords.",
    "description": "A lively dance tune with a running quaver melody.",
    "scene": "A crowded village hall on a winter evening, dancers spinning in pairs.",
}


def records() -> list[object]:
    return [
        {"leadsheet": CUCKOO, "title": "Cuckoo's Nest", "artists": ["Traditional"], "genre": "Folk", **TEXTS},
        {"leadsheet": FARE_YOU_WELL, "title": "Fare You Well", "artists": [], "genre": "Folk",
         "background": "An Irish slow air.", "analysis": "  ", "description": None, "scene": "A quiet shore."},
        {"leadsheet": "X:1\nT:No key\nabc|def|\n", "title": "Broken", **TEXTS},
        {"title": "No music", **TEXTS},
    ]


@pytest.fixture
def jsonl(tmp_path) -> Path:
    path = tmp_path / "wikimt-x.jsonl"
    lines = [json.dumps(r, ensure_ascii=False) for r in records()]
    lines.insert(3, "{this is not json")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_lead_sheets_are_interleaved_and_texts_split(jsonl, tmp_path):
    out = tmp_path / "wikimt"
    summary = wikimt.prepare(jsonl, out, progress=False)
    assert (summary.pieces, summary.written, summary.failed) == (5, 2, 3)

    abc = (out / "abc" / "0000.abc").read_text(encoding="utf-8")
    assert abc == interleave_abc(CUCKOO)  # exactly the training interleaving
    body = [line for line in abc.splitlines() if line.startswith("[V:1]")]
    assert len(body) >= 8 and '"Em"' in abc
    assert "T:" not in abc and "X:" not in abc  # title and number are not part of the music
    assert len(M3Patchilizer().encode(abc, add_special_patches=True)) > 2

    for text_type, text in TEXTS.items():
        assert (out / "text" / text_type / "0000.txt").read_text(encoding="utf-8") == text
    assert (out / "text" / "background" / "0001.txt").read_text(encoding="utf-8") == "An Irish slow air."
    assert not (out / "text" / "analysis" / "0001.txt").exists()  # blank text
    assert not (out / "text" / "description" / "0001.txt").exists()  # null text
    assert summary.missing_text == {"analysis": 1, "description": 1}


def test_records_and_failures(jsonl, tmp_path):
    out = tmp_path / "wikimt"
    wikimt.prepare(jsonl, out, progress=False)
    rows = read(out / wikimt.RECORDS_NAME)
    assert rows[0] == {"id": "0000", "filepaths": ["abc/0000.abc"], "title": "Cuckoo's Nest",
                       "artists": ["Traditional"], "genre": "Folk", **TEXTS}
    assert rows[1] == {"id": "0001", "filepaths": ["abc/0001.abc"], "title": "Fare You Well", "genre": "Folk",
                       "background": "An Irish slow air.", "scene": "A quiet shore."}
    for row in rows:
        assert (out / row["filepaths"][0]).is_file()
    failures = read(out / wikimt.FAILURES_NAME)
    assert [(f["line"], f["id"]) for f in failures] == [(3, "0002"), (4, None), (5, "0004")]
    assert "K:" in failures[0]["reason"] and failures[0]["title"] == "Broken"
    assert failures[1]["reason"].startswith("not valid JSON")
    assert failures[2]["reason"] == "read: no leadsheet"


def test_own_ids_duplicates_and_stale_outputs(tmp_path):
    path = tmp_path / "w.jsonl"
    out = tmp_path / "out"
    good = {"id": "wmt-7", "leadsheet": FARE_YOU_WELL, "title": "Fare You Well", **TEXTS}
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "title": "again"}) + "\n"
                    + json.dumps({**good, "id": "../escape"}) + "\n", encoding="utf-8")
    summary = wikimt.prepare(path, out, progress=False)
    assert summary.written == 1 and summary.failed == 2
    assert (out / "abc" / "wmt-7.abc").is_file()
    reasons = [f["reason"] for f in read(out / wikimt.FAILURES_NAME)]
    assert reasons[0] == "duplicate id 'wmt-7'" and "file name" in reasons[1]
    assert not (tmp_path / "escape.abc").exists()

    # The same piece breaks in a later version of the file: its old music and texts go away.
    path.write_text(json.dumps({**good, "leadsheet": "X:1\n"}) + "\n", encoding="utf-8")
    wikimt.prepare(path, out, progress=False)
    assert not (out / "abc" / "wmt-7.abc").exists()
    assert not any((out / "text").rglob("wmt-7.txt"))
    assert read(out / wikimt.RECORDS_NAME) == []


def test_script(jsonl, tmp_path):
    out = tmp_path / "eval"
    result = subprocess.run([sys.executable, str(SCRIPT), "--input", str(jsonl), "--output_dir", str(out),
                             "--quiet"], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "written: 2" in result.stdout and "failed: 3" in result.stdout
    strict = subprocess.run([sys.executable, str(SCRIPT), "--input", str(jsonl), "--output_dir", str(out),
                             "--quiet", "--strict"], capture_output=True, text=True, timeout=60)
    assert strict.returncode == 1
    missing = subprocess.run([sys.executable, str(SCRIPT), "--input", str(tmp_path / "none.jsonl")],
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "none.jsonl" in missing.stderr
