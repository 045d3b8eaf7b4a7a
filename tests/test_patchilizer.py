"""The patchilizer against every official patch array in the fixtures."""

from __future__ import annotations

import json
import random

import pytest
from helpers import OFFICIAL
from patchilizer import M3Patchilizer

PATCH_FILES = sorted((OFFICIAL / "patches").rglob("*.json"))


def test_fixture_patch_files_present():
    assert len(PATCH_FILES) == 62


@pytest.mark.parametrize("patch_file", PATCH_FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_encode_matches_official(patch_file):
    source = OFFICIAL / "outputs" / patch_file.parent.name / patch_file.name[: -len(".json")]
    text = source.read_text(encoding="utf-8")
    expected = json.loads(patch_file.read_text())
    assert M3Patchilizer().encode(text, add_special_patches=True) == expected


def test_special_patches_and_eos_rule():
    patches = M3Patchilizer().encode("X:1\nK:C\nabc|\n", add_special_patches=True)
    assert patches[0] == [1] * 64
    assert patches[-1] == [1] + [2] * 63
    assert patches[1] == [1] + [ord(c) for c in "X:1\n"] + [2] + [0] * 58
    long_line = "A" * 70 + "|\n"
    (patch,) = M3Patchilizer().encode(long_line)
    assert len(patch) == 64 and 2 not in patch  # 63 characters and no EOS


def test_abc_rules():
    p = M3Patchilizer()
    # L:1/8 removed; a line with no barline gives no patch; volta digit after the last bar is lost
    assert p.patch_strings("L:1/8\nM:4/4\nabc\n[V:1]d4 [dB]4|1\n") == ["M:4/4\n", "[V:1]d4 [dB]4|\n"]
    assert p.split_bars("|:ab|cd:|") == ["|:ab|", "cd:|"]


def test_mtf_packing():
    text = "ticks_per_beat 480\nnote_on 0 0 60 80\nnote_on 10 1 40 90\nnote_off 0 0 60 0"
    assert M3Patchilizer().patch_strings(text) == [
        "ticks_per_beat 480\n", "note_on 0 0 60 80\t10 1 40 90\n", "note_off 0 0 60 0"]


def test_truncation_consumes_rng_like_official():
    text = "".join(f"a{i}|\n" for i in range(600))
    p = M3Patchilizer()
    random.seed(3)
    head = p.encode(text, truncate=True)
    after = random.random()
    random.seed(3)
    random.choice(["head", "tail", "middle"])
    assert random.random() == after
    assert len(head) == 512 and head == p.encode(text)[:512]


def test_decode_roundtrip():
    p = M3Patchilizer()
    text = "M:4/4\nK:C\n[V:1]abc|[V:2]def|\n"
    assert p.decode(p.encode(text)) == text


def test_remove_instrument_info():
    from patchilizer import remove_instrument_info

    abc = 'V:1 treble nm="Violin" snm="Vl."\nV:2 bass snm="Vc."\n[V:1]abc|\n'
    assert remove_instrument_info(abc) == "V:1 treble\nV:2 bass\n[V:1]abc|\n"
    mtf = "ticks_per_beat 480\nprogram_change 0 0 40\nnote_on 0 0 60 80"
    assert remove_instrument_info(mtf) == "ticks_per_beat 480\nprogram_change 0 0 0\nnote_on 0 0 60 80"
