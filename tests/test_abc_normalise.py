"""ABC -> MusicXML -> ABC normalisation (abc2xml in-process, then xml2abc -d 8 -x), on real corpus tunes."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import warnings
from pathlib import Path

import music21
import pytest
from patchilizer import M3Patchilizer
from preprocess import abc2xml, abc_normalise
from preprocess.abc_normalise import abc_to_musicxml, normalise_abc
from preprocess.errors import ConversionError
from preprocess.interleave import interleave_abc

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "preprocessing" / "abc" / "batch_interleaved_abc.py"
CORPUS = Path(music21.__file__).parent / "corpus"


def corpus_tune(relative: str, number: int) -> str:
    """Tune ``X: number`` of a multi-tune file of the music21 corpus shipped with music21."""
    text = (CORPUS / relative).read_text(encoding="utf-8", errors="replace")
    for tune in re.split(r"(?m)^(?=X:)", text):
        if re.match(rf"X:\s*{number}\s*\n", tune):
            return tune
    raise LookupError(f"X: {number} not in {relative}")


# (file, X:, what it exercises)
TUNES = {
    "oneills": ("oneills1850/0001-0050.abc", 1, "L:1/16, ties, slurs, grace notes, naturals"),
    "nottingham": ("nottingham-dataset/reelsa-c.abc", 80, "L:1/4, chord symbols, P: parts, \\ lines"),
    "chords": ("oneills1850/0550-0625.abc", 599, "note chords [_E4C4] [DB,], trills, >> rhythms"),
    "volta": ("nottingham-dataset/reelsa-c.abc", 81, "|: :| with [1 [2 endings, chord symbols"),
}


@pytest.fixture(scope="module")
def tunes() -> dict[str, str]:
    return {key: corpus_tune(path, number) for key, (path, number, _) in TUNES.items()}


def notes(text: str) -> list[tuple]:
    """(sorted MIDI pitches or 'rest', quarter length) of every note, chord and rest, in order."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        score = music21.converter.parse(text, format="abc")
    out = []
    for item in score.flatten().notesAndRests:
        if isinstance(item, music21.harmony.ChordSymbol):
            continue  # chord symbols ("Em") are annotations, not notes
        pitches = "rest" if item.isRest else tuple(sorted(p.midi for p in item.pitches))
        out.append((pitches, float(item.quarterLength)))
    return out


@pytest.mark.parametrize("key", list(TUNES))
def test_corpus_tunes_round_trip_into_training_layout(tunes, key):
    original = tunes[key]
    messages: list[str] = []
    abc = normalise_abc(original, messages=messages)
    lines = abc.splitlines()
    assert "L:1/8" in lines and "V:1" in lines  # xml2abc's layout, whatever the tune's unit
    assert any(line.startswith("V:1 ") for line in lines)  # the voice declaration xml2abc writes
    assert re.search(r"%\d+$", lines[-1] if lines[-1] else lines[-2])  # bar-number comments
    assert messages and all(isinstance(m, str) for m in messages)

    assert notes(abc) == notes(original)  # same pitches and durations, note for note

    interleaved = interleave_abc(abc)
    body = [line for line in interleaved.splitlines() if line.startswith("[V:1]")]
    assert len(body) >= 8
    assert "X:" not in interleaved and "T:" not in interleaved
    patches = M3Patchilizer().encode(interleaved, add_special_patches=True)
    assert len(patches) > len(body)


def test_layout_details(tunes):
    cuckoo = normalise_abc(tunes["nottingham"])
    assert '"Em"' in cuckoo and "Addc" in cuckoo  # A/2d/2d/2c/2 at L:1/4 -> Addc at L:1/8
    assert "% Nottingham" not in cuckoo and "S:" not in cuckoo
    chords = normalise_abc(tunes["chords"])
    assert "[DB,]" in chords and "L:1/8" in chords
    volta = normalise_abc(tunes["volta"])
    assert "|1" in volta and ":|2" in volta


def test_musicxml_is_what_abc2xml_prints(tunes):
    xml = abc_to_musicxml(tunes["oneills"])
    assert xml.startswith(b"<?xml version='1.0' encoding='utf-8'?>\n<!DOCTYPE score-partwise")
    assert xml.endswith(b"</score-partwise>\n")
    assert b"<work-title>The Enchanted Valley</work-title>" in xml


# U: redefines a symbol in abc2xml's class-level table; T is a trill by default.
TRILL = "X:1\nT:Trill\nM:2/4\nL:1/8\nK:G\nTG2 AB|c4|]\n"
REDEFINES = "X:2\nT:Redefined\nU:T=!fermata!\nM:2/4\nL:1/8\nK:G\nTd2 cB|A4|]\n"


def test_no_state_leaks_between_calls(tunes):
    first = abc_to_musicxml(TRILL)
    other = abc_to_musicxml(REDEFINES)
    again = abc_to_musicxml(TRILL)
    assert first == again
    assert b"trill-mark" in first and b"fermata" in other and b"fermata" not in again
    assert normalise_abc(tunes["oneills"]) == normalise_abc(tunes["oneills"])
    a, b = tunes["nottingham"], tunes["chords"]
    assert [normalise_abc(a), normalise_abc(b), normalise_abc(a)][0] == normalise_abc(a)
    # abc2xml's own module state is back as it was (its global converter, its logger).
    bundled = abc2xml._a2x
    assert bundled.mxm.__class__ is bundled.MusicXml and bundled.info.__module__ == bundled.__name__
    assert bundled.MusicXml.uSyms.get("T") == "trill"


def test_nothing_is_printed(tunes, capfd):
    normalise_abc(tunes["oneills"])
    with pytest.raises(ConversionError):
        abc_to_musicxml("X:1\nK:C\nab\n%%score (1\ncd|\n")
    captured = capfd.readouterr()
    assert captured.out == "" and captured.err == ""


@pytest.mark.parametrize(("text", "reason"), [
    ("", "empty ABC text"),
    ("X:1\nT:No key\nabc|def|\n", "no K: (key) field"),
    ("hello, this is not ABC", "no K: (key) field"),
    ("X:1\nK:C\nabc|\nX:2\nK:G\ndef|\n", "2 tunes (X: fields) in one text"),
    # The rule interleave_abc applies too: a K: line ends the header, an inline [K:] does not.
    ("X:1\nT:Inline key only\n[K:G]\nGABc|\n", "no K: (key) field"),
    ("X:1\nT:Only a header\nK:C\n", "no notes"),
    ("X:1\nT:Bad score\n%%score (1\nK:C\nabc|\n", "abc2xml cannot parse the tune: Expected ')'"),
])
def test_malformed_abc_raises_with_a_reason(text, reason):
    with pytest.raises(ConversionError) as info:
        normalise_abc(text)
    assert info.value.stage == "abc2xml" and reason in info.value.reason


def test_include_directives_read_no_file(tmp_path):
    secret = tmp_path / "secret.abc"
    secret.write_text("X:9\nK:C\nCDEF|\n", encoding="utf-8")
    messages: list[str] = []
    abc = normalise_abc(f"X:1\n%%abc-include {secret}\nK:C\nGABc|\n", messages=messages)
    assert "GABc" in abc and "CDEF" not in abc
    assert any("abc-include" in m and "ignored" in m for m in messages)


@pytest.mark.slow
def test_batch_script_normalise(tmp_path, tunes):
    source = tmp_path / "folk"
    (source / "sub").mkdir(parents=True)
    (source / "cuckoo.abc").write_text(tunes["nottingham"], encoding="utf-8")
    (source / "sub" / "volta.ABC").write_text(tunes["volta"], encoding="utf-8")
    (source / "broken.abc").write_text("X:1\nT:No key\nabc|\n", encoding="utf-8")
    out, log = tmp_path / "out", tmp_path / "errors.jsonl"
    command = [sys.executable, str(SCRIPT), str(source), str(out), "--workers", "1", "--quiet",
               "--error_log", str(log)]
    result = subprocess.run(command + ["--normalise"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert (out / "cuckoo.abc").read_text(encoding="utf-8") == interleave_abc(normalise_abc(tunes["nottingham"]))
    assert (out / "sub" / "volta.ABC").read_text(encoding="utf-8") == interleave_abc(normalise_abc(tunes["volta"]))
    assert not (out / "broken.abc").exists()
    failures = [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines()]
    assert len(failures) == 1 and "K:" in json.dumps(failures[0])

    # Without the flag: the plain interleaving, unchanged.
    plain = tmp_path / "plain"
    result = subprocess.run([sys.executable, str(SCRIPT), str(source), str(plain), "--workers", "1", "--quiet",
                             "--error_log", str(tmp_path / "plain.jsonl")], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert (plain / "cuckoo.abc").read_text(encoding="utf-8") == interleave_abc(tunes["nottingham"])


def test_converter_is_picklable():
    import functools
    import pickle

    convert = functools.partial(abc_normalise.convert_file, latin1_fallback=True)
    assert pickle.loads(pickle.dumps(convert)).func is abc_normalise.convert_file
