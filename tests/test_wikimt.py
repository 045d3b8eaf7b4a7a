"""WikiMT-X preparation: real-looking single-voice lead sheets (music21 corpus tunes, no V:1)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from patchilizer import M3Patchilizer
from preprocess import wikimt
from preprocess.abc_normalise import normalise_abc
from preprocess.errors import ConversionError
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

# abc2xml cannot parse this %%score directive (unbalanced parenthesis); the tune itself is fine, so
# the loader falls back to interleaving it as written.
UNBALANCED_SCORE = """X:3
T:Unbalanced score
%%score (1
M:2/4
L:1/8
K:G
GABc|d2B2|c2A2|G4|]
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
    # The training normalisation: MusicXML round trip into xml2abc's layout, then interleaving.
    assert abc == interleave_abc(normalise_abc(CUCKOO))
    assert abc != interleave_abc(CUCKOO)
    assert "L:1/8" in abc.splitlines() and "L:1/4" not in abc  # xml2abc's unit, not the tune's
    body = [line for line in abc.splitlines() if line.startswith("[V:1]")]
    assert len(body) >= 8 and '"Em"' in abc
    assert "Addc" in body[1]  # "A"A/2d/2d/2c/2 at L:1/4 is Addc at L:1/8
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
    assert rows[0] == {"id": "0000", "filepaths": ["abc/0000.abc"], "normalisation": "musicxml_roundtrip",
                       "title": "Cuckoo's Nest", "artists": ["Traditional"], "genre": "Folk", **TEXTS}
    assert rows[1] == {"id": "0001", "filepaths": ["abc/0001.abc"], "normalisation": "musicxml_roundtrip",
                       "title": "Fare You Well", "genre": "Folk",
                       "background": "An Irish slow air.", "scene": "A quiet shore."}
    for row in rows:
        assert (out / row["filepaths"][0]).is_file()
    failures = read(out / wikimt.FAILURES_NAME)
    assert [(f["line"], f.get("id")) for f in failures] == [(3, "0002"), (4, None), (5, "0004")]
    assert "K:" in failures[0]["reason"] and failures[0]["title"] == "Broken"
    assert "MusicXML round trip" in failures[0]["reason"]  # both ways failed, both reasons given
    assert failures[1]["reason"].startswith("not valid JSON")
    assert failures[2]["reason"] == "read: no leadsheet"


def test_round_trip_failure_falls_back_to_direct_interleaving(tmp_path):
    with pytest.raises(ConversionError, match="abc2xml"):
        normalise_abc(UNBALANCED_SCORE)
    path = tmp_path / "w.jsonl"
    path.write_text(json.dumps({"leadsheet": UNBALANCED_SCORE, "title": "Unbalanced"}) + "\n"
                    + json.dumps({"leadsheet": CUCKOO, "title": "Cuckoo's Nest"}) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    summary = wikimt.prepare(path, out, progress=False)
    assert (summary.written, summary.failed, summary.direct) == (2, 0, 1)
    assert "written without the MusicXML round trip: 1" in summary.lines()
    rows = read(out / wikimt.RECORDS_NAME)
    assert [row["normalisation"] for row in rows] == ["direct", "musicxml_roundtrip"]
    assert (out / "abc" / "0000.abc").read_text(encoding="utf-8") == interleave_abc(UNBALANCED_SCORE)
    assert read(out / wikimt.FAILURES_NAME) == []  # a fallback is not a failure


def test_without_round_trip_interleaves_as_written(jsonl, tmp_path):
    out = tmp_path / "direct"
    summary = wikimt.prepare(jsonl, out, progress=False, roundtrip=False)
    assert (summary.written, summary.failed, summary.direct) == (2, 3, 0)
    assert (out / "abc" / "0000.abc").read_text(encoding="utf-8") == interleave_abc(CUCKOO)
    assert (out / "abc" / "0001.abc").read_text(encoding="utf-8") == interleave_abc(FARE_YOU_WELL)
    assert [row["normalisation"] for row in read(out / wikimt.RECORDS_NAME)] == ["direct", "direct"]
    failures = read(out / wikimt.FAILURES_NAME)
    assert "K:" in failures[0]["reason"] and "MusicXML" not in failures[0]["reason"]


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


@pytest.mark.slow
def test_script(jsonl, tmp_path):
    out = tmp_path / "eval"
    result = subprocess.run([sys.executable, str(SCRIPT), "--input", str(jsonl), "--output_dir", str(out),
                             "--quiet"], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "written: 2" in result.stdout and "failed: 3" in result.stdout
    assert (out / "abc" / "0000.abc").read_text(encoding="utf-8") == interleave_abc(normalise_abc(CUCKOO))
    direct = subprocess.run([sys.executable, str(SCRIPT), "--input", str(jsonl), "--output_dir", str(out),
                             "--quiet", "--no_musicxml_roundtrip"], capture_output=True, text=True, timeout=60)
    assert direct.returncode == 0, direct.stderr
    assert (out / "abc" / "0000.abc").read_text(encoding="utf-8") == interleave_abc(CUCKOO)
    assert {row["normalisation"] for row in read(out / wikimt.RECORDS_NAME)} == {"direct"}
    strict = subprocess.run([sys.executable, str(SCRIPT), "--input", str(jsonl), "--output_dir", str(out),
                             "--quiet", "--strict"], capture_output=True, text=True, timeout=60)
    assert strict.returncode == 1
    missing = subprocess.run([sys.executable, str(SCRIPT), "--input", str(tmp_path / "none.jsonl")],
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "none.jsonl" in missing.stderr
