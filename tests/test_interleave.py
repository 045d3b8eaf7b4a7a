"""Standard ABC -> interleaved ABC: the 32 official outputs byte for byte, and the inputs the official
script drops (no V:1 line, [B2g2]-style chords, inline [V:n] bodies) converted into valid ABC."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from abctoolkit.check import check_alignment_unrotated
from abctoolkit.rotate import rotate_abc
from abctoolkit.utils import remove_bar_no_annotations, remove_information_field, strip_empty_bars
from helpers import OFFICIAL, REPO_ROOT
from patchilizer import M3Patchilizer
from preprocess.errors import ConversionError
from preprocess.interleave import convert_file, interleave_abc, read_abc_text

STD_ABC = OFFICIAL / "outputs" / "std_abc"
ABC_INPUTS = OFFICIAL / "inputs" / "abc"
INT_FROM_XML = sorted((OFFICIAL / "outputs" / "int_abc").glob("*.abc"))
INT_FROM_ABC = sorted((OFFICIAL / "outputs" / "int_abc_from_abc_inputs").glob("*.abc"))
SCRIPT = REPO_ROOT / "preprocessing" / "abc" / "batch_interleaved_abc.py"
NO_V1 = ["oneills1850_0001-0050_X1_n0.abc", "ryansMammoth_AbithaMugginsFavoriteReel_X1_n0.abc"]
STRIP_INDEX_ERROR = "airdsAirs_book6_X1003_n2.abc"

LEAD_SHEET = """X:1
T:Test Song
C:Someone
M:4/4
L:1/8
Q:1/4=96
K:G
% verse
"G"B2 AG "Em"E2 D2|"C"E2 G2 "D7"A4|\\
"G"B2 d2 "Em"e2 d2|
w: la la la
"Am"c2 B2 "D"A2 FA|"G"G8-|G8
"""

CHORDS_WITH_DURATIONS = """X:1
T:Chords with durations inside brackets
M:3/4
L:1/8
K:D
V:1
[B2g2] [A2f2] [G2e2]|[F4d4] z2|[E2c2] [c/e/][d/f/] [e2g2]|[D6A6d6]|]
"""

INLINE_VOICES = """X:1
T:Inline voices with named ids
%%score (S A)
M:2/4
L:1/8
V:S clef=treble name="Soprano"
V:A clef=treble name="Alto"
K:F
[V:S] c2 d2|e2 f2|
[V:A] A2 B2|c2 A2|
[V:S] g2 a2|f4|]
[V:A] B2 c2|A4|]
"""


def official_style(text: str) -> str:
    """The official batch_interleaved_abc.py steps (section 7.3) applied to one text, raising
    where the official script skips the file (the check included)."""
    lines = [line for line in re.findall(r"[^\n]*\n|[^\n]+$", text) if line.strip()]
    lines = remove_bar_no_annotations(remove_information_field(lines, ["X:", "T:", "C:", "W:", "w:", "Z:", "%%MIDI"]))
    for i, line in enumerate(lines):
        if not (re.match(r"^[A-Za-z]:", line) or line.startswith("%")):
            quoted = [q for q in re.findall(r'"[^"]*"', line) if "|" in q or "::" in q]
            for q in quoted:
                line = line.replace(q, "")
            lines[i] = line if quoted else line.replace('\\"', "")
    stripped, _ = strip_empty_bars(lines)
    if stripped is None:
        raise ValueError("failed to strip")
    check_alignment_unrotated(stripped)
    return "".join(rotate_abc(stripped))


def notes(abc_music: str) -> list[str]:
    """Pitched notes in order, without chord symbols, annotations, decorations and inline fields."""
    abc_music = re.sub(r'"[^"]*"|![^!\n]*!|\[[A-Za-z]:[^\]]*\]', "", abc_music)
    return re.findall(r"[_=^]*[A-Ga-g][,']*", abc_music)


def body_notes_by_voice(interleaved: str) -> dict[str, list[str]]:
    voices: dict[str, list[str]] = {}
    for line in interleaved.splitlines():
        for voice, segment in re.findall(r"\[V:(\w+)\]((?:(?!\[V:).)*)", line):
            voices.setdefault(voice, []).extend(notes(segment))
    return voices


def assert_interleaved_structure(text: str, voices: int) -> None:
    """Metadata lines, then one line per bar holding [V:1]...[V:n] segments that end in a barline."""
    assert text.endswith("\n")
    lines = text.splitlines()
    first_body = next(i for i, line in enumerate(lines) if line.startswith("[V:"))
    assert all(re.match(r"^([A-Za-z]:|%)", line) for line in lines[:first_body]), lines[:first_body]
    for line in lines[first_body:]:
        segments = re.findall(r"\[V:(\d+)\]((?:(?!\[V:\d).)*)", line)
        assert [int(v) for v, _ in segments] == list(range(1, voices + 1)), line
        assert all(re.search(r"(\||::|\|\]|\|:)\S*$", seg) for _, seg in segments), line
    patches = M3Patchilizer().encode(text, add_special_patches=True)
    # One patch per field or %% line; the patchilizer deletes "L:1/8" and skips plain % comments.
    header_patches = [line for line in lines[:first_body] if line != "L:1/8" and not re.match(r"%[^%]", line)]
    assert len(patches) >= 2 + len(header_patches) + (len(lines) - first_body) * voices
    assert patches[0] == [1] * 64 and patches[-1] == [1] + [2] * 63


def test_fixture_counts():
    assert len(INT_FROM_XML) == 22 and len(INT_FROM_ABC) == 10


@pytest.mark.parametrize("expected", INT_FROM_XML, ids=lambda p: p.name)
def test_int_abc_from_std_abc_matches_official(expected):
    assert interleave_abc((STD_ABC / expected.name).read_text(encoding="utf-8")).encode() == expected.read_bytes()


@pytest.mark.parametrize("expected", INT_FROM_ABC, ids=lambda p: p.name)
def test_int_abc_from_abc_inputs_matches_official(expected):
    assert convert_file(ABC_INPUTS / expected.name).encode() == expected.read_bytes()


@pytest.mark.parametrize("expected", INT_FROM_XML, ids=lambda p: p.name)
def test_interleaved_output_is_a_fixed_point(expected):
    text = expected.read_text(encoding="utf-8")
    assert interleave_abc(text) == text


@pytest.mark.parametrize("name", NO_V1)
def test_no_v1_folk_tunes(name):
    text = (ABC_INPUTS / name).read_text(encoding="utf-8")
    with pytest.raises(Exception, match="tunebody index not found"):
        official_style(text)
    out = interleave_abc(text)
    assert_interleaved_structure(out, voices=1)
    assert "K:" in out and "X:" not in out and "T:" not in out
    body = text.split("\nK:", 1)[1].split("\n", 1)[1]
    assert body_notes_by_voice(out) == {"1": notes(body)}


@pytest.mark.parametrize("name", ["airdsAirs_book3_X0401_n0_v1.abc", "oneills1850_0351-0400_X352_n1_v1.abc"])
def test_without_v1_same_as_official_with_inserted_v1(name):
    """The fixtures whose only change was an inserted V:1 line give the official output without it."""
    text = (ABC_INPUTS / name).read_text(encoding="utf-8")
    assert "\nV:1\n" in text
    assert interleave_abc(text.replace("\nV:1\n", "\n", 1)) == (OFFICIAL / "outputs" / "int_abc_from_abc_inputs" / name).read_text(encoding="utf-8")


def test_line_start_barlines_keep_every_bar():
    """`...:|` then `|:...` on the next line: the official steps mis-pair the bars and lose the
    second half of this hornpipe (its fixture output stops at bar 13); without the V:1 line the
    tune takes the rewriting path, which merges the two barlines into `::` and keeps every note."""
    name = "ryansMammoth_BellesOfSouthBostonHornpipe_X1_n0_v1.abc"
    text = (ABC_INPUTS / name).read_text(encoding="utf-8")
    body = text.split("\nV:1\n", 1)[1]
    official = (OFFICIAL / "outputs" / "int_abc_from_abc_inputs" / name).read_text(encoding="utf-8")
    assert len(body_notes_by_voice(official)["1"]) < len(notes(body))
    out = interleave_abc(text.replace("\nV:1\n", "\n", 1))
    assert_interleaved_structure(out, voices=1)
    assert "[V:1]G2B2G2::\n[V:1](ucB)|\n" in out
    assert body_notes_by_voice(out) == {"1": notes(body)}


def test_strip_empty_bars_index_error_case():
    text = (ABC_INPUTS / STRIP_INDEX_ERROR).read_text(encoding="utf-8")
    with pytest.raises(IndexError):
        official_style(text)
    out = interleave_abc(text)
    assert_interleaved_structure(out, voices=2)
    assert "\nV:2 merge\n" in out
    expected = {"1": [], "2": []}
    for voice, segment in re.findall(r"^\[V:(\d)\](.*)$", text, flags=re.M):
        expected[voice] += notes(segment)
    assert body_notes_by_voice(out) == expected


def test_chords_with_durations_are_kept():
    with pytest.raises(Exception, match="Illegal symbol"):
        official_style(CHORDS_WITH_DURATIONS)  # the official check raises: the file is skipped
    warnings: list[str] = []
    out = interleave_abc(CHORDS_WITH_DURATIONS, warnings=warnings)
    assert_interleaved_structure(out, voices=1)
    assert "[V:1][B2g2] [A2f2] [G2e2]|\n" in out and out.endswith("[V:1][D6A6d6]|]\n")
    assert any("alignment not checked" in w and "Illegal symbol" in w for w in warnings)
    assert interleave_abc(CHORDS_WITH_DURATIONS) == out  # the check never changes the output


def test_inline_voices_with_named_ids():
    out = interleave_abc(INLINE_VOICES)
    assert_interleaved_structure(out, voices=2)
    assert out.startswith('%%score (1 2)\nM:2/4\nL:1/8\nK:F\nV:1 clef=treble name="Soprano"\n'
                          'V:2 clef=treble name="Alto"\n[V:1]c2 d2|[V:2]A2 B2|\n')
    assert body_notes_by_voice(out) == {"1": notes("c2 d2 e2 f2 g2 a2 f4"), "2": notes("A2 B2 c2 A2 B2 c2 A4")}


def test_lead_sheet_without_voice_lines():
    """The WikiMT-X path: chord symbols, a comment, a continuation, lyrics, no final barline."""
    warnings: list[str] = []
    out = interleave_abc(LEAD_SHEET, warnings=warnings)
    assert_interleaved_structure(out, voices=1)
    assert out.startswith("M:4/4\nL:1/8\nQ:1/4=96\nK:G\n[V:1]\"G\"B2 AG \"Em\"E2 D2|\n")
    assert out.endswith('[V:1]"G"G8-|\n[V:1]G8|\n')
    assert "la la" not in out and "verse" not in out and "\\" not in out
    assert body_notes_by_voice(out) == {"1": notes(LEAD_SHEET.split("K:G\n")[1].replace("w: la la la", "").replace("% verse", ""))}
    assert any("rewritten" in w for w in warnings)


def test_body_fields_become_inline_fields():
    out = interleave_abc("X:1\nM:2/4\nL:1/8\nK:C\nCDEF|GABc|\nK:D\nM:3/4\nd2 e2 f2|]\n")
    assert out.endswith("[V:1]GABc|\n[V:1][K:D][M:3/4]d2 e2 f2|]\n")


def test_voice_starting_like_a_field_line():
    out = interleave_abc("X:1\nM:2/4\nL:1/8\nK:C\nV:1\nc4|c4|\nV:2\nC:|C4:|\n")
    assert out.endswith("[V:1]c4|[V:2]C:|\n[V:1]c4|[V:2]C4:|\n")


def test_crlf_and_missing_final_newline():
    text = "X:1\r\nM:4/4\r\nL:1/8\r\nK:C\r\nV:1\r\nCDEF GABc|c8|]"
    assert interleave_abc(text) == "M:4/4\nL:1/8\nK:C\n[V:1]CDEF GABc|\n[V:1]c8|]\n"


@pytest.mark.parametrize(
    "text, reason",
    [
        ("X:1\nM:4/4\nK:C\nV:1\nCDEF|GABc|c4 z4|\nV:2\nC,8|G,8|\n", "different numbers of bars"),
        ("X:1\nM:4/4\nK:C\nz8|z8|]\n", "no bar holds a note"),
        ("X:1\nK:C\nCDEF|\nX:2\nK:G\nGABc|\n", "2 tunes"),
        ("X:1\nK:C\nCDEF|\n X:2\nK:G\nGABc|\n", "2 tunes"),  # abc2xml's rule: leading blanks allowed
        ("X:1\nT:only a header\nM:4/4\n", "no K:"),
        ("X:1\nT:t\nK:C\n% nothing but a comment\n", "no music"),
    ],
)
def test_unconvertible_input_gives_reason(text, reason):
    with pytest.raises(ConversionError) as info:
        interleave_abc(text)
    assert reason in info.value.reason


def test_nothing_is_printed(capfd):
    interleave_abc((STD_ABC / "bach_bwv1.6.abc").read_text(encoding="utf-8"), warnings=[])
    with pytest.raises(ConversionError):
        interleave_abc("X:1\nM:4/4\nK:C\nV:1\nCDEF|GABc|c4 z4|\nV:2\nC,8|G,8|\n")
    assert capfd.readouterr() == ("", "")


def test_non_utf8_text(tmp_path):
    path = tmp_path / "latin1.abc"
    path.write_bytes("X:1\nT:Caf\u00e9 Polka\nM:2/4\nL:1/8\nK:D\nV:1\ndf af|g2 f2|]\n".encode("latin-1"))
    assert read_abc_text(path).splitlines()[1] == "T:Caf\u00e9 Polka"  # documented Latin-1 fallback
    assert convert_file(path).endswith("[V:1]g2 f2|]\n")
    with pytest.raises(ConversionError, match="not valid UTF-8"):
        convert_file(path, latin1_fallback=False)
    binary = tmp_path / "binary.abc"
    binary.write_bytes(b"X:1\x00\x01\x02")
    with pytest.raises(ConversionError, match="NUL"):
        convert_file(binary)


@pytest.mark.slow
def test_batch_script_mixed_good_and_bad(tmp_path):
    src, out, log = tmp_path / "in", tmp_path / "out", tmp_path / "logs" / "errors.jsonl"
    good = {
        "bach_bwv1.6.abc": ("it's a [weird] $name café.abc", STD_ABC),
        NO_V1[0]: ("folk/no v1.ABC", ABC_INPUTS),
        "josquin_milleRegrets_X2_n1_v1.abc": ("folk/josquin.abc", ABC_INPUTS),
    }
    for original, (name, folder) in good.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(folder / original, src / name)
    (src / "bad").mkdir()
    (src / "bad" / "empty.abc").write_bytes(b"")
    (src / "bad" / "unequal.abc").write_text("X:1\nK:C\nV:1\nCDEF|GABc|\nV:2\nC,8|\n", encoding="utf-8")
    (src / "bad" / "binary.abc").write_bytes(b"\x00\xff" * 10)
    (src / "notes.txt").write_text("not an input", encoding="utf-8")
    cmd = [sys.executable, str(SCRIPT), str(src), str(out), "--error_log", str(log), "--quiet", "--workers", "2"]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "3 converted" in result.stdout and "3 failed" in result.stdout
    for original, (name, folder) in good.items():
        assert (out / name).read_text(encoding="utf-8") == convert_file(folder / original)
    assert (out / "bach_bwv1.6.abc").exists() is False
    failures = {Path(r["file"]).name: r for r in map(json.loads, log.read_text(encoding="utf-8").splitlines())}
    assert set(failures) == {"empty.abc", "unequal.abc", "binary.abc"}
    assert "different numbers of bars" in failures["unequal.abc"]["reason"]
    assert all(r["reason"] and r["stage"] for r in failures.values())
    assert not (out / "bad").exists() and not (out / "notes.txt").exists()


def music21_folk_tunes(step: int) -> list[str]:
    """Every ``step``-th tune of the ABC collections bundled with music21 (split at X: lines)."""
    import music21

    tunes = []
    for path in sorted((Path(music21.__file__).parent / "corpus").rglob("*.abc")):
        text = path.read_bytes().decode("utf-8", "replace")
        tunes += [t for t in re.split(r"(?m)^(?=X:)", text) if t.startswith("X:")]
    return tunes[::step]


def test_music21_abc_corpus_sample_converts_and_keeps_notes():
    """The lead-sheet path at scale: ~650 real tunes, most without any V: line."""
    tunes = music21_folk_tunes(step=20)
    assert len(tunes) > 600
    checked = 0
    for tune in tunes:
        out = interleave_abc(tune)
        if "V:" in tune or "K:" not in tune:
            assert out.endswith("\n") and "\n[V:1]" in out
            continue
        assert_interleaved_structure(out, voices=1)
        body = tune.split("\nK:", 1)[1].split("\n", 1)[1]
        music = [re.sub(r"%.*", "", line) for line in body.splitlines()
                 if not re.match(r"^[A-Za-z]:", line) and not line.startswith("%")]
        assert body_notes_by_voice(out) == {"1": notes("\n".join(music))}, tune[:200]
        checked += 1
    assert checked > 500
