"""ABC -> MusicXML (batch_abc2xml.py) against every official fixture, and against abc2xml's own
command line on the inputs the fixtures lack (several tunes, blank lines, encodings...)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import OFFICIAL, REPO_ROOT, load_script
from preprocess import abc2xml
from preprocess.errors import ConversionError

SCRIPT = REPO_ROOT / "preprocessing" / "abc" / "batch_abc2xml.py"
# (input folder, the official batch_abc2xml.py output for it)
FOLDERS = [(OFFICIAL / "inputs" / "abc", OFFICIAL / "outputs" / "xml_from_abc"),
           (OFFICIAL / "outputs" / "int_abc", OFFICIAL / "outputs" / "xml_from_int_abc")]
CASES = [(source, expected / (source.stem + ".xml")) for inputs, expected in FOLDERS for source in sorted(inputs.iterdir())]
CONVERTED = [case for case in CASES if case[1].exists()]
NO_OUTPUT = ["malformed_empty.abc"]  # the official script wrote nothing for these


def masked(xml: bytes) -> bytes:
    """MusicXML without what may differ from the official files: the conversion day, and the
    encoder's version (the official repository vendors abc2xml VERSION 245; abctoolkit bundles 238)."""
    xml = re.sub(rb"<encoding-date>\d{4}-\d\d-\d\d</encoding-date>", b"<encoding-date/>", xml, count=1)
    return re.sub(rb"<encoder>abc2xml version \d+</encoder>", b"<encoder>abc2xml</encoder>", xml, count=1)


def test_fixture_counts():
    assert len(CASES) == 14 + 22 and len(CONVERTED) == 13 + 22
    assert sorted(source.name for source, expected in CASES if not expected.exists()) == NO_OUTPUT
    assert (OFFICIAL / "inputs" / "abc" / NO_OUTPUT[0]).stat().st_size == 0
    # Every fixture carries each masked element once.
    for _, expected in CONVERTED:
        data = masked(expected.read_bytes())
        assert data.count(b"<encoding-date/>") == 1 and data.count(b"<encoder>abc2xml</encoder>") == 1
        assert b"<encoding-date>" not in data and b"version 245" not in data


@pytest.mark.parametrize(("source", "expected"), CONVERTED, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_matches_official_bytes(source, expected):
    xml = abc2xml.convert_file(source)
    assert masked(xml) == masked(expected.read_bytes())
    assert b"<encoder>abc2xml version 238</encoder>" in xml  # says which converter wrote it


@pytest.mark.slow
def test_batch_script_writes_every_official_output_and_logs_the_rest(tmp_path):
    script = load_script(SCRIPT)
    for inputs, expected in FOLDERS:
        out, log = tmp_path / expected.name, tmp_path / f"{expected.name}.jsonl"
        args = [str(inputs), str(out), "--workers", "2", "--error_log", str(log), "--quiet"]
        assert script.main(args) == 0
        written = sorted(p.name for p in out.iterdir())
        assert written == sorted(p.name for p in expected.iterdir())
        for name in written:
            assert masked((out / name).read_bytes()) == masked((expected / name).read_bytes()), name
        failures = [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines()] if log.exists() else []
        missing = [source.name for source in sorted(inputs.iterdir()) if source.stem + ".xml" not in written]
        assert missing == (NO_OUTPUT if inputs.name == "abc" else [])
        assert [Path(f["file"]).name for f in failures] == missing
        assert all("empty" in f["reason"] for f in failures)
        # Resume: nothing is converted again; --strict reports the file that has no output.
        assert script.main([*args, "--strict"]) == (1 if missing else 0)


# Inputs the fixtures lack, each with what it exercises. Written as bytes: encodings matter.
EDGE_CASES = {
    "several_tunes.abc": b"X:1\nT:One\nK:C\nCDEF|GABc|\n\nX:2\nT:Two\nK:G\nGABc|\n",
    "blank_line_inside.abc": b"X:1\nT:Blank\nK:C\nCDEF|\n\nGABc|\n",
    "preamble.abc": b"%%scale 0.8\nI:linebreak $\n\nX:1\nT:Preamble\nK:D\nDEF|\n",
    "latin1.abc": b"X:1\nT:Caf\xe9 \xfcber\nK:C\n\"\xc9t\xe9\"CDEF|\n",
    "utf8.abc": "X:1\nT:Über\nK:C\n\"Ünïcødé\"CDEF|\n".encode(),
    "crlf.abc": b"X:1\r\nT:CRLF\r\nK:C\r\nCDEF|GABc|\r\n",
    "bom.abc": b"\xef\xbb\xbfX:1\nT:BOM\nK:C\nCDEF|\n",
    "no_x_field.abc": b"T:No X\nM:3/4\nK:A\nABc|d3|\n",
    "no_key.abc": b"X:1\nT:No key\nabc|def|\n",
    "header_only.abc": b"X:1\nT:Only header\nK:C\n",
    "whitespace_only.abc": b"   \n\n",
    "prose.abc": b"hello, this is not ABC\n",
    "no_final_newline.abc": b"X:1\nT:Tail\nK:C\nCDEF|",
    "nul_byte.abc": b"X:1\nT:nul\x00\nK:C\nCDEF|\n",
    "redefined_symbol.abc": b"X:2\nT:Redefined\nU:T=!fermata!\nM:2/4\nL:1/8\nK:G\nTd2 cB|A4|]\n",
    "syntax_error.abc": b"X:1\nT:Bad score\n%%score (1\nK:C\nabc|\n",
}


@pytest.mark.slow
def test_same_bytes_as_abc2xmls_command_line(tmp_path):
    """Each input through abc2xml's own command line, one process per file as the official script
    runs it (``abc2xml.py file.abc``, stdout kept), and through ``convert_file`` in this process."""
    command_line = Path(abc2xml._a2x.__file__)
    for name, data in EDGE_CASES.items():
        source = tmp_path / name
        source.write_bytes(data)
        official = subprocess.run([sys.executable, "-W", "ignore", str(command_line), str(source)], cwd=tmp_path,
                                  capture_output=True, timeout=60, check=True).stdout
        if official:
            assert abc2xml.convert_file(source) == official, name
        else:
            with pytest.raises(ConversionError) as info:
                abc2xml.convert_file(source)
            assert info.value.stage == "abc2xml" and info.value.reason.strip(), name
    assert not official  # syntax_error.abc, last: the command line wrote nothing


def test_first_tune_only_with_a_message():
    messages: list[str] = []
    xml = abc2xml.convert_text(EDGE_CASES["several_tunes.abc"].decode(), messages=messages)
    assert b"<work-title>One</work-title>" in xml and b"Two" not in xml
    assert any("2 tunes" in m and "only the first" in m for m in messages)


def test_blank_line_ends_the_tune_as_in_abc2xml():
    xml = abc2xml.convert_text(EDGE_CASES["blank_line_inside.abc"].decode())
    assert xml.count(b"<note>") == 4  # CDEF; the bar after the blank line is not part of the tune


def test_latin1_is_read_when_not_utf8(tmp_path):
    source = tmp_path / "latin1.abc"
    source.write_bytes(EDGE_CASES["latin1.abc"])
    assert "<work-title>Café über</work-title>".encode() in abc2xml.convert_file(source)


def test_include_directives_read_no_file(tmp_path):
    included = tmp_path / "included.abc"
    included.write_text("X:9\nT:Included\nK:C\nCDEF|\n", encoding="utf-8")
    messages: list[str] = []
    xml = abc2xml.convert_text(f"X:1\nT:Main\n%%abc-include {included}\nK:C\nGABc|\n", messages=messages)
    assert b"<work-title>Main</work-title>" in xml and b"Included" not in xml
    assert any("abc-include" in m and "ignored" in m for m in messages)


def test_failure_gives_the_parse_error_and_prints_nothing(capfd):
    with pytest.raises(ConversionError) as info:
        abc2xml.convert_text(EDGE_CASES["syntax_error.abc"].decode())
    assert "abc2xml cannot parse the tune: Expected ')'" in info.value.reason
    abc2xml.convert_text(EDGE_CASES["utf8.abc"].decode())
    assert capfd.readouterr() == ("", "")


def test_script_help(capsys):
    with pytest.raises(SystemExit) as done:
        load_script(SCRIPT).main(["--help"])
    assert done.value.code == 0
    shown = " ".join(capsys.readouterr().out.split())
    for words in ("--num_shards", "--error_log", ".abc", "first tune", "blank line", "Latin-1", "<encoding-date>",
                  "VERSION 245", "failure log"):
        assert words in shown, words
