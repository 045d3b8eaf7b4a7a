"""PDMX.csv parsing on a small CSV with the real column set and messy values."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
from preprocess import pdmx
from records import parse_bool, parse_list

DATA = Path(__file__).resolve().parent / "data"
SAMPLE = DATA / "pdmx_sample.csv"
SCRIPT = Path(__file__).resolve().parent.parent / "preprocessing" / "parse_pdmx_csv.py"


def by_id(records: list[dict]) -> dict[str, dict]:
    return {r["id"]: r for r in records}


@pytest.fixture(scope="module")
def parsed(tmp_path_factory):
    return pdmx.parse_pdmx(SAMPLE, tmp_path_factory.mktemp("base"), progress=False)


def test_sample_has_every_real_column_in_order():
    with open(SAMPLE, encoding="utf-8", newline="") as f:
        header = next(csv.reader(f))
    assert tuple(header) == pdmx.PDMX_COLUMNS
    assert len(header) == 62


def test_text_fields_are_clean_and_deduplicated(parsed):
    records = by_id(parsed[0])
    elise = records["QmElise01"]["text"]
    assert elise == {
        "title": "Für Elise",  # non-ASCII kept; song_name equal to the title is not repeated
        "subtitle": "Bagatelle No. 25 in A minor",
        "artists": ["Ludwig van Beethoven"],  # composer == artist
        "genres": ["classical", "piano"],
        "tags": ["piano", "beginner"],  # "Piano" repeats "piano"
    }  # publisher "nan" is left out
    moon = records["QmMoon0002"]["text"]
    # title "nan" -> the song name stands in; whitespace collapsed; "None"/"[]"/"" subtitles etc. gone
    assert moon == {"title": "Moonlight Sonata", "genres": ["classical"],
                    "tags": ["beethoven", "sonata", "piano"],  # PDMX's own "-"-joined list form
                    "publisher": "MuseScore Publishing"}
    ave = records["QmABB00006"]["text"]
    assert ave["title"] == "Ave Maria"
    assert "subtitle" not in ave  # "ave maria" only repeats the title
    assert ave["artists"] == ["Franz Schubert", "Schubert"]
    assert ave["genres"] == ["a", "b"]


def test_no_null_spellings_anywhere(parsed):
    for record in parsed[0]:
        for value in record["text"].values():
            items = value if isinstance(value, list) else [value]
            assert items, record
            for item in items:
                assert isinstance(item, str) and item.strip() == item and item
                assert item.casefold() not in {"nan", "none", "[]", "null"}


def test_paths_are_relative_to_base_dir_and_lose_dot_slash(parsed):
    record = by_id(parsed[0])["QmElise01"]
    assert record["paths"]["mxl"] == "mxl/Q/Qm/QmElise01.mxl"
    assert record["paths"]["mid"] == "mid/Q/Qm/QmElise01.mid"
    assert record["row"] == 0
    # a row without mxl keeps its MIDI
    sakura = by_id(parsed[0])["QmNoMxl003"]
    assert "mxl" not in sakura["paths"] and sakura["paths"]["mid"] == "mid/Q/Qm/QmNoMxl003.mid"
    # "NA" (PDMX's missing-value marker) in subtitle, artist and publisher is dropped
    assert sakura["text"] == {"title": "Sakura Sakura さくらさくら", "artists": ["Traditional"],
                              "genres": ["folk"], "tags": ["japanese", "folk", "koto"]}


def test_dash_joined_lists_from_the_pdmx_wrangling_code(tmp_path):
    records, _, _ = pdmx.parse_pdmx(SAMPLE, tmp_path, subset="all", progress=False)
    assert by_id(records)["QmConflict"]["text"]["genres"] == ["soundtrack", "rock", "n", "roll"]
    # only list columns are split, and only letters-and-dashes text
    assert parse_list("hip-hop", dash_joined=True) == ["hip", "hop"]
    assert parse_list("Hip-Hop", dash_joined=True) == ["Hip-Hop"]
    assert parse_list("['hip-hop']", dash_joined=True) == ["hip-hop"]
    assert parse_list("hip-hop") == ["hip-hop"]


def test_drops_are_reported_with_reasons(parsed):
    _, dropped, summary = parsed
    reasons = {(d["id"], d["reason"]) for d in dropped}
    assert reasons == {
        ("QmCorrupt4", "no mxl or mid path"),
        ("QmNoText05", "no usable text"),
        ("QmElise01", "duplicate id"),
        ("QmEscape08", "bad path"),
    }
    assert summary.rows == 10
    assert summary.not_in_subset == 2  # licence conflict, and "false" in lower case
    assert summary.kept == 4 and summary.kept_without_mxl == 1
    assert summary.rows == summary.kept + summary.not_in_subset + len(summary.drops)


@pytest.mark.parametrize(
    ("subset", "expected"),
    [
        ("no_license_conflict", {"QmElise01", "QmMoon0002", "QmNoMxl003", "QmABB00006"}),
        ("all", {"QmElise01", "QmMoon0002", "QmConflict", "QmNoMxl003", "QmABB00006", "QmOdeJoy07"}),
        ("rated", {"QmElise01"}),
        ("deduplicated", {"QmElise01", "QmMoon0002", "QmConflict", "QmNoMxl003", "QmOdeJoy07"}),
    ],
)
def test_subset_filtering(tmp_path, subset, expected):
    records, _, _ = pdmx.parse_pdmx(SAMPLE, tmp_path, subset=subset, progress=False)
    assert {r["id"] for r in records} == expected


def test_check_files_removes_paths_of_absent_files(tmp_path):
    (tmp_path / "mxl/Q/Qm").mkdir(parents=True)
    (tmp_path / "mxl/Q/Qm/QmElise01.mxl").write_bytes(b"PK")
    records, dropped, summary = pdmx.parse_pdmx(SAMPLE, tmp_path, progress=False, check_files=True)
    assert [r["id"] for r in records] == ["QmElise01"]
    assert records[0]["paths"]["mxl"] == "mxl/Q/Qm/QmElise01.mxl" and "mid" not in records[0]["paths"]
    assert (tmp_path / records[0]["paths"]["mxl"]).is_file()  # a record's paths are found under base_dir
    # Moonlight, Sakura, Ave Maria and the text-less row: no file checks out under base_dir
    assert summary.drops.counts["mxl/mid files not found under base_dir"] == 4


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("['a', 'a', 'b']", ["a", "b"]),
        ('["Rock", "rock", " pop "]', ["Rock", "pop"]),
        ("[]", []),
        ("nan", []),
        (float("nan"), []),
        (None, []),
        ("", []),
        ("[classical, piano]", ["classical", "piano"]),  # not a literal: split on commas
        ("jazz", ["jazz"]),
        ("['None', 'nan', 'x']", ["x"]),
        ("NA", []),
        ("['Na', 'NA']", ["Na"]),
    ],
)
def test_parse_list(value, expected):
    assert parse_list(value) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [(True, True), (False, False), ("True", True), ("false", False), ("1", True), ("0", False),
     ("", False), (float("nan"), False), (None, False)],
)
def test_parse_bool(value, expected):
    assert parse_bool(value) is expected


def test_parse_bool_rejects_garbage():
    with pytest.raises(ValueError):
        parse_bool("maybe")


def test_missing_subset_column_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("path,mxl,mid,title\n./data/x.json,./mxl/x.mxl,./mid/x.mid,X\n", encoding="utf-8")
    with pytest.raises(pdmx.PdmxError, match=r"bad\.csv.*subset:no_license_conflict"):
        pdmx.parse_pdmx(bad, tmp_path, progress=False)
    with pytest.raises(pdmx.PdmxError, match="not found"):
        pdmx.parse_pdmx(tmp_path / "absent.csv", tmp_path, progress=False)


def test_report_returns_the_text_and_prints_nothing(parsed, tmp_path, capsys):
    _, _, summary = parsed
    counts, drops = pdmx.report(summary, "no_license_conflict", tmp_path)
    assert capsys.readouterr() == ("", "")
    lines = counts.splitlines()
    assert lines[0] == "rows read: 10" and "kept: 4 (without mxl path: 1, without mid path: 0)" in lines
    assert lines[-1] == f"metadata: {tmp_path / pdmx.METADATA_NAME}"
    assert drops == f"dropped rows and reasons: {tmp_path / pdmx.DROPPED_NAME}"
    assert pdmx.report(pdmx.PdmxSummary(rows=1, not_in_subset=1), "all", tmp_path)[1] == ""


@pytest.mark.slow
def test_script_writes_metadata_atomically_from_another_cwd(tmp_path):
    out = tmp_path / "processed"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--csv_path", str(SAMPLE), "--output_dir", str(out),
         "--base_dir", str(tmp_path), "--quiet"],
        capture_output=True, text=True, cwd=tmp_path, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "kept: 4" in result.stdout and f"metadata: {out / pdmx.METADATA_NAME}" in result.stdout
    assert f"dropped rows and reasons: {out / pdmx.DROPPED_NAME}" in result.stderr
    lines = (out / pdmx.METADATA_NAME).read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["id"] for line in lines] == ["QmElise01", "QmMoon0002", "QmNoMxl003", "QmABB00006"]
    dropped = [json.loads(line) for line in (out / pdmx.DROPPED_NAME).read_text(encoding="utf-8").splitlines()]
    assert len(dropped) == 4 and all(d["reason"] for d in dropped)
    info = json.loads((out / pdmx.SUMMARY_NAME).read_text(encoding="utf-8"))
    assert info["base_dir"] == str(tmp_path.resolve()) and info["subset"] == "no_license_conflict"
    assert not list(out.glob("*.tmp"))


@pytest.mark.slow
def test_script_reports_missing_csv(tmp_path):
    result = subprocess.run([sys.executable, str(SCRIPT), "--csv_path", str(tmp_path / "nope.csv"),
                             "--output_dir", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "nope.csv" in result.stderr
