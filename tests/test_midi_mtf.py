"""MIDI <-> MTF: byte identity with the official outputs and with the mido-based official algorithm,
failure reasons, type-2 files, and the MIDI -> MTF -> MIDI -> MTF round trip."""

from __future__ import annotations

import io
import random
import struct
from pathlib import Path

import mido
import pytest
from helpers import OFFICIAL
from preprocess.errors import describe_exception
from preprocess.midi_mtf import (
    M3_SKIPPED_META_TYPES,
    MidiFormatError,
    MtfFormatError,
    midi_bytes_to_mtf,
    midi_to_mtf,
    mtf_to_midi,
)

MID_DIR = OFFICIAL / "inputs" / "mid"
MTF_DIR = OFFICIAL / "outputs" / "mtf"
MIDI_INPUTS = sorted(p for p in MID_DIR.iterdir() if p.suffix.lower() in (".mid", ".midi"))
GOOD_INPUTS = [p for p in MIDI_INPUTS if not p.name.startswith("malformed_")]


def official_algorithm(data: bytes, m3_compatible: bool) -> str:
    """The official conversion (reference section 7.1), written the straightforward way with mido."""
    mid = mido.MidiFile(file=io.BytesIO(data))
    lines = ["ticks_per_beat " + str(mid.ticks_per_beat)]
    for msg in mid.merged_track:
        if m3_compatible and msg.type in M3_SKIPPED_META_TYPES:
            continue
        line = ""
        for value in msg.dict().values():
            line += " " + str(value)
        lines.append(line.strip().encode("unicode_escape").decode("utf-8"))
    return "\n".join(lines)


def mtf_stem(path: Path) -> str:
    return path.name.rsplit(".", 1)[0] + ".mtf"


def test_fixture_set_is_complete(official_dir):
    assert len(MIDI_INPUTS) == 32
    assert len(list(MTF_DIR.glob("*.mtf"))) == 30


@pytest.mark.parametrize("path", [p for p in GOOD_INPUTS if (MTF_DIR / mtf_stem(p)).exists()], ids=lambda p: p.name)
def test_official_mtf_reproduced_byte_for_byte(path):
    expected = (MTF_DIR / mtf_stem(path)).read_bytes()
    assert midi_to_mtf(path, m3_compatible=True).encode("utf-8") == expected


@pytest.mark.parametrize("m3_compatible", [False, True])
def test_matches_the_mido_algorithm_on_every_fixture(m3_compatible):
    mismatched = [p.name for p in GOOD_INPUTS
                  if midi_to_mtf(p, m3_compatible) != official_algorithm(p.read_bytes(), m3_compatible)]
    assert mismatched == []


def test_text_metas_kept_and_escaped_without_the_flag():
    text = midi_to_mtf(MID_DIR / "edge_type1_text_metas.mid", m3_compatible=False)
    assert "\ntrack_name " in text and "\\n" in text and "\\\\" in text
    assert "track_name" not in midi_to_mtf(MID_DIR / "edge_type1_text_metas.mid", m3_compatible=True)


@pytest.mark.parametrize("name", ["malformed_empty.mid", "malformed_random.mid"])
def test_malformed_fixtures_fail_with_a_reason(name):
    with pytest.raises(MidiFormatError) as info:
        midi_to_mtf(MID_DIR / name, m3_compatible=True)
    assert info.value.reason.strip()
    assert describe_exception(info.value).strip()
    with pytest.raises(Exception):  # noqa: B017 - the official code rejects them too
        official_algorithm((MID_DIR / name).read_bytes(), True)


def test_truncated_files_fail_where_mido_fails():
    data = (MID_DIR / "m21test_test01.mid").read_bytes()
    for cut in (3, 8, 13, 14, 22, 30, len(data) // 2, len(data) - 1):
        with pytest.raises(MidiFormatError) as info:
            midi_bytes_to_mtf(data[:cut], True)
        assert info.value.reason.strip(), cut
        with pytest.raises(Exception):  # noqa: B017
            official_algorithm(data[:cut], True)


def _save(mid: mido.MidiFile) -> bytes:
    buffer = io.BytesIO()
    mid.save(file=buffer)
    return buffer.getvalue()


def test_unusual_messages_match_mido():
    """Metas and system messages rarely seen in the fixtures, with running status and odd deltas."""
    mid = mido.MidiFile(type=1, ticks_per_beat=384)
    first, second = mido.MidiTrack(), mido.MidiTrack()
    first += [
        mido.MetaMessage("sequence_number", number=7),
        mido.MetaMessage("smpte_offset", frame_rate=29.97, hours=1, minutes=2, seconds=3, frames=4, sub_frames=5),
        mido.MetaMessage("key_signature", key="C#m", time=5),
        mido.MetaMessage("key_signature", key="Cb", time=0),
        mido.MetaMessage("channel_prefix", channel=3),
        mido.MetaMessage("midi_port", port=2),
        mido.MetaMessage("sequencer_specific", data=(1, 2, 3), time=3),
        mido.MetaMessage("lyrics", text="caf\xe9 \\ \"x\"\t end ", time=2),
        mido.Message("note_on", note=60, velocity=1, time=10),
        mido.Message("note_on", note=62, velocity=2, time=0),  # written with running status
        mido.Message("pitchwheel", pitch=-1, time=1),
        mido.Message("sysex", data=[], time=4),
        mido.MetaMessage("end_of_track", time=7),
    ]
    second += [
        mido.Message("control_change", control=1, value=2, time=15),
        mido.MetaMessage("end_of_track", time=100),
        mido.Message("note_off", note=60, time=3),  # after an end_of_track: kept, delta carried
    ]
    mid.tracks += [first, second]
    data = bytearray(_save(mid))
    # An unknown meta (type 0x60) with a non-zero delta: mido loses that delta.
    data += b"MTrk" + struct.pack(">L", 11) + b"\x40\xff\x60\x01\x05" + b"\x10\xf8" + b"\x00\xff\x2f\x00"
    data[10:12] = struct.pack(">h", 3)
    for m3_compatible in (False, True):
        assert midi_bytes_to_mtf(bytes(data), m3_compatible) == official_algorithm(bytes(data), m3_compatible)


def _random_midi(rng: random.Random) -> bytes:
    """A small, mostly valid MIDI file with a little of everything (and sometimes a defect)."""
    def varlen(value):
        out = [value & 0x7F]
        value >>= 7
        while value:
            out.append((value & 0x7F) | 0x80)
            value >>= 7
        return bytes(reversed(out))

    def event(may_run):
        delta = varlen(rng.choice([0, 0, 1, rng.randrange(1000), rng.randrange(1 << 20)]))
        kind = rng.random()
        if kind < 0.55:
            status = rng.choice([0x80, 0x90, 0xA0, 0xB0, 0xC0, 0xD0, 0xE0]) | rng.randrange(16)
            body = bytes(rng.randrange(128) for _ in range(1 if status >> 4 in (0xC, 0xD) else 2))
            if rng.random() < 0.01:
                body = b"\x80" + body[1:]
            return delta + (body if may_run and rng.random() < 0.3 else bytes([status]) + body)
        if kind < 0.85:
            meta_type = rng.choice([0, 1, 3, 5, 8, 0x20, 0x21, 0x2F, 0x51, 0x54, 0x58, 0x59, 0x7F, 0x4B])
            size = {0x51: 3, 0x54: 5, 0x58: 4, 0x59: 2, 0: 2}.get(meta_type, rng.randrange(6))
            if rng.random() < 0.05:
                size = rng.randrange(6)
            payload = bytes(rng.choice([rng.randrange(8), rng.randrange(60), rng.randrange(256)]) for _ in range(size))
            if meta_type == 0x59 and rng.random() < 0.9:
                payload = bytes([rng.randrange(-7, 8) & 0xFF, rng.randrange(2)])
            return delta + bytes([0xFF, meta_type]) + varlen(len(payload)) + payload
        if kind < 0.95:
            payload = bytes(rng.randrange(128) for _ in range(rng.randrange(5))) + b"\xf7" * rng.randrange(2)
            return delta + bytes([rng.choice([0xF0, 0xF7])]) + varlen(len(payload)) + payload
        status = rng.choice([0xF1, 0xF2, 0xF3, 0xF6, 0xF8, 0xFA, 0xFC, 0xFE, 0xF9])
        return delta + bytes([status]) + bytes(rng.randrange(128) for _ in range({0xF1: 1, 0xF2: 2, 0xF3: 1}.get(status, 0)))

    tracks = rng.choice([0, 1, 2, 3, 4])
    data = b"MThd" + struct.pack(">Lhhh", 6, rng.choice([0, 1, 1, 3]), tracks, rng.choice([96, 480, -7904]))
    for _ in range(tracks):
        body = b"".join(event(i > 0) for i in range(rng.randrange(12)))
        if rng.random() < 0.9:
            body += b"\x05\xff\x2f\x00"
        size = len(body) + (rng.choice([-1, 1]) if body and rng.random() < 0.03 else 0)
        data += b"MTrk" + struct.pack(">L", size) + body
    return data if rng.random() > 0.03 else data[: rng.randrange(len(data))]


def test_differential_against_mido_on_random_files():
    rng = random.Random(20261125)
    outcomes = {"same output": 0, "both rejected": 0}
    for _ in range(400):
        data = _random_midi(rng)
        m3_compatible = rng.random() < 0.5
        try:
            expected = official_algorithm(data, m3_compatible)
        except Exception:  # noqa: BLE001 - mido rejects it: so must we
            with pytest.raises(MidiFormatError) as info:
                midi_bytes_to_mtf(data, m3_compatible)
            assert info.value.reason.strip()
            outcomes["both rejected"] += 1
            continue
        assert midi_bytes_to_mtf(data, m3_compatible) == expected, data.hex()
        outcomes["same output"] += 1
    assert outcomes["same output"] > 100 and outcomes["both rejected"] > 50, outcomes


def test_type2_tracks_play_one_after_another(tmp_path):
    from patchilizer import M3Patchilizer

    mid = mido.MidiFile(type=2, ticks_per_beat=480)
    for pitch in (60, 67):
        track = mido.MidiTrack([
            mido.MetaMessage("track_name", name=f"pattern {pitch}"),
            mido.Message("note_on", note=pitch, velocity=80, time=0),
            mido.Message("note_off", note=pitch, velocity=0, time=480),
            mido.MetaMessage("end_of_track", time=240),
        ])
        mid.tracks.append(track)
    path = tmp_path / "patterns.mid"
    mid.save(path)
    with pytest.raises(AttributeError):  # the official algorithm cannot handle type 2
        official_algorithm(path.read_bytes(), True)

    assert midi_to_mtf(path, m3_compatible=False).split("\n") == [
        "ticks_per_beat 480",
        "track_name pattern 60 0", "note_on 0 0 60 80", "note_off 480 0 60 0",
        "track_name pattern 67 240",  # the second pattern starts at the first one's end_of_track
        "note_on 0 0 67 80", "note_off 480 0 67 0",
        "end_of_track 240",
    ]
    text = midi_to_mtf(path, m3_compatible=True)
    # As in the official --m3_compatible output, a dropped message takes its delta with it.
    assert text.split("\n") == [
        "ticks_per_beat 480",
        "note_on 0 0 60 80", "note_off 480 0 60 0", "note_on 0 0 67 80", "note_off 480 0 67 0",
        "end_of_track 240",
    ]
    patches = M3Patchilizer().encode(text, add_special_patches=True)
    assert len(patches) >= 3 and all(len(p) == 64 for p in patches)
    assert mtf_text_round_trips(text, m3_compatible=True)


def mtf_text_round_trips(text: str, m3_compatible: bool) -> bool:
    midi = mtf_to_midi(text)
    mido.MidiFile(file=io.BytesIO(midi))  # a valid file for mido too
    return midi_bytes_to_mtf(midi, m3_compatible) == text


@pytest.mark.parametrize("m3_compatible", [True, False])
def test_round_trip_is_stable_on_fixtures(m3_compatible):
    unstable = [p.name for p in GOOD_INPUTS
                if not mtf_text_round_trips(midi_to_mtf(p, m3_compatible), m3_compatible)]
    assert unstable == []


def test_round_trip_keeps_unusual_messages():
    text = "\n".join([
        "ticks_per_beat -7904",
        "sequence_number 7 0", "smpte_offset 29.97 1 2 3 4 5 0", "key_signature Abm 3",
        "time_signature 6 8 24 8 0", "set_tempo 400000 0", "channel_prefix 3 0", "midi_port 2 0",
        "sequencer_specific (5,) 0", "unknown_meta 75 (1, 2) 0", "text caf\\xe9 \\\\ \\n 0",
        "sysex 1 []", "sysex 0 [1, 2, 3]", "quarter_frame 0 3 9", "songpos 2 1000", "song_select 0 5",
        "clock 0", "pitchwheel 0 15 -8192", "aftertouch 0 1 5", "polytouch 0 2 60 7",
        "program_change 0 9 0", "end_of_track 12",
    ])
    assert mtf_text_round_trips(text, m3_compatible=False)


@pytest.mark.parametrize("bad", ["", "hello", "ticks_per_beat 480\nnote_on x 0 60 1",
                                 "ticks_per_beat 480\nwhatever 0", "ticks_per_beat 99999",
                                 "ticks_per_beat 480\nnote_on 0 0 200 1", "ticks_per_beat 480\nnote_on -1 0 60 1"])
def test_bad_mtf_is_reported(bad):
    with pytest.raises(MtfFormatError) as info:
        mtf_to_midi(bad)
    assert info.value.reason.strip()
