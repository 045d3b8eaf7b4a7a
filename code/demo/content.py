"""Content descriptions of a tune from its MIDI rendering, as MidiCaps-style captions describe music:
what is heard (tempo, note density, range, loudness, instrument, the key and meter the notes
suggest), computed here from the MTF text, not taken from the header.

``mtf_facts(text)`` reads an MTF file (one merged track, delta ticks: channel messages carry the
time second, meta messages last); the key comes from the notes alone (Krumhansl-Kessler
profiles correlated with the duration-weighted pitch-class histogram), the meter from the first
time signature. ``content_caption(facts, language, family, rng)`` writes one description in the
``measured`` or ``listening`` family.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import Any

from demo import languages

CONTENT_FAMILIES = ("measured", "listening")
CONTENT_LANGUAGES = ("en", "de")
_CHANNEL_MESSAGES = frozenset({"note_on", "note_off", "control_change", "program_change", "pitchwheel",
                               "aftertouch", "polytouch", "sysex"})
_MAJOR_PROFILE = (6.35, 2.23, 3.48, 2.33, 4.38, 4.09, 2.52, 5.19, 2.39, 3.66, 2.29, 2.88)
_MINOR_PROFILE = (6.33, 2.68, 3.52, 5.38, 2.60, 3.53, 2.54, 4.75, 3.98, 2.69, 3.34, 3.17)
_SPELLING = {"major": ("C", "Db", "D", "Eb", "E", "F", "F#", "G", "Ab", "A", "Bb", "B"),
             "minor": ("C", "C#", "D", "Eb", "E", "F", "F#", "G", "G#", "A", "Bb", "B")}
_PITCH_NAMES = ("C", "C#", "D", "Eb", "E", "F", "F#", "G", "Ab", "A", "Bb", "B")
# General MIDI families, eight programs each: (English, German).
_GM_FAMILIES = (("piano", "Klavier"), ("chromatic percussion", "Stabspiele"), ("organ", "Orgel"),
                ("guitar", "Gitarre"), ("bass", "Bass"), ("strings", "Streicher"), ("ensemble", "Ensemble"),
                ("brass", "Blechbläser"), ("reeds", "Rohrblattinstrumente"), ("flute", "Flöte"),
                ("synth lead", "Synthesizer"), ("synth pad", "Synthesizer-Flächen"), ("synth effects", "Synthesizer-Effekte"),
                ("folk instruments", "Volksinstrumente"), ("percussion", "Schlagwerk"), ("sound effects", "Geräusche"))


def mtf_facts(text: str) -> dict[str, Any] | None:
    """What the notes of an MTF text say, or None when it holds no note."""
    lines = text.split("\n")
    header = lines[0].split(" ")
    if header[0] != "ticks_per_beat":
        raise ValueError("not an MTF text (the first line is not ticks_per_beat)")
    ticks_per_beat = int(header[1])
    tick = 0
    tempo_changes: list[tuple[int, int]] = []
    meter = None
    program = None
    sounding: dict[tuple[int, int], tuple[int, int]] = {}
    notes: list[tuple[int, int, int, int]] = []  # start, end, pitch, velocity
    for line in lines[1:]:
        parts = line.split(" ")
        kind = parts[0]
        try:
            tick += int(parts[1] if kind in _CHANNEL_MESSAGES else parts[-1])
        except (IndexError, ValueError):
            continue
        if kind == "set_tempo":
            tempo_changes.append((tick, int(parts[1])))
        elif kind == "time_signature" and meter is None:
            meter = f"{parts[1]}/{parts[2]}"
        elif kind == "program_change" and program is None and parts[2] != "9":
            program = int(parts[3])
        elif kind in ("note_on", "note_off") and parts[2] != "9":
            channel, pitch, velocity = int(parts[2]), int(parts[3]), int(parts[4])
            started = sounding.pop((channel, pitch), None)
            if started is not None:
                notes.append((started[0], tick, pitch, started[1]))
            if kind == "note_on" and velocity > 0:
                sounding[(channel, pitch)] = (tick, velocity)
    notes.extend((start, tick, pitch, velocity) for (_, pitch), (start, velocity) in sounding.items())
    if not notes:
        return None
    end = max(stop for _, stop, _, _ in notes)
    seconds = _seconds(end, ticks_per_beat, tempo_changes)
    histogram = [0.0] * 12
    for start, stop, pitch, _ in notes:
        histogram[pitch % 12] += max(stop - start, 1)
    tonic, mode = estimate_key(histogram)
    low, high = min(n[2] for n in notes), max(n[2] for n in notes)
    first_tempo = tempo_changes[0][1] if tempo_changes else 500000
    return {"tempo_bpm": round(60_000_000 / first_tempo), "seconds": round(seconds, 1), "notes": len(notes),
            "notes_per_second": round(len(notes) / seconds, 1) if seconds else 0.0,
            "lowest": pitch_name(low), "highest": pitch_name(high), "span": high - low,
            "velocity": round(sum(n[3] for n in notes) / len(notes)), "meter": meter,
            "program": program if program is not None else 0,
            "tonic": tonic[0], "accidental": tonic[1:], "mode": mode}


def _seconds(ticks: int, ticks_per_beat: int, tempo_changes: list[tuple[int, int]]) -> float:
    """Seconds from tick 0 to ``ticks`` under the tempo map (500,000 µs a beat until the first change)."""
    total, last_tick, tempo = 0, 0, 500000
    for at, new_tempo in sorted(tempo_changes):
        if at >= ticks:
            break
        total += (at - last_tick) * tempo
        last_tick, tempo = at, new_tempo
    total += (ticks - last_tick) * tempo
    return total / ticks_per_beat / 1e6


def estimate_key(histogram: list[float]) -> tuple[str, str]:
    """(tonic spelling, "major" or "minor") whose Krumhansl-Kessler profile best correlates with a
    pitch-class histogram; ties go to the lower pitch class, then to major."""
    best = None
    for mode, profile in (("major", _MAJOR_PROFILE), ("minor", _MINOR_PROFILE)):
        for tonic in range(12):
            score = _correlation(histogram, [profile[(pc - tonic) % 12] for pc in range(12)])
            if best is None or score > best[0] + 1e-12:
                best = (score, tonic, mode)
    _, tonic, mode = best
    return _SPELLING[mode][tonic], mode


def _correlation(a: list[float], b: list[float]) -> float:
    mean_a, mean_b = sum(a) / len(a), sum(b) / len(b)
    cov = sum((x - mean_a) * (y - mean_b) for x, y in zip(a, b, strict=True))
    norm = math.sqrt(sum((x - mean_a) ** 2 for x in a) * sum((y - mean_b) ** 2 for y in b))
    return cov / norm if norm else 0.0


def pitch_name(midi_number: int) -> str:
    """Scientific pitch name: 60 -> C4, 61 -> C#4."""
    return f"{_PITCH_NAMES[midi_number % 12]}{midi_number // 12 - 1}"


# ------------------------------------------------------------------------------------- captions

def _loudness(velocity: int, language: str) -> str:
    level = 0 if velocity < 50 else 1 if velocity < 85 else 2
    return (("soft", "moderately loud", "loud"), ("leise", "mittellaut", "laut"))[language == "de"][level]


def _busyness(density: float, language: str) -> str:
    level = 0 if density < 2 else 1 if density < 4 else 2
    return (("sparse", "flowing", "busy"), ("ruhig", "fließend", "sehr bewegt"))[language == "de"][level]


def _measured_frames(facts: dict[str, Any], language: str) -> list[Callable[[], str]]:
    instrument = _GM_FAMILIES[facts["program"] // 8][language == "de"]
    key = languages.key_name(facts, language)
    if language == "de":
        meter = f" im {facts['meter']}-Takt" if facts["meter"] else ""
        return [lambda: f"{instrument.capitalize()} mit {facts['tempo_bpm']} BPM{meter}, {facts['notes']} Noten in "
                        f"{facts['seconds']} s ({facts['notes_per_second']} pro Sekunde), Umfang {facts['lowest']} bis "
                        f"{facts['highest']}, {_loudness(facts['velocity'], language)}; die Töne deuten auf {key}.",
                lambda: f"Tempo {facts['tempo_bpm']} BPM{meter}, {_loudness(facts['velocity'], language)} gespielt "
                        f"({instrument}), Tonhöhen von {facts['lowest']} bis {facts['highest']}, etwa "
                        f"{facts['notes_per_second']} Noten pro Sekunde, vermutlich {key}."]
    meter = f", in {facts['meter']}" if facts["meter"] else ""
    return [lambda: f"{instrument.capitalize()} at {facts['tempo_bpm']} BPM{meter}, {facts['notes']} notes in "
                    f"{facts['seconds']} s ({facts['notes_per_second']} per second), range {facts['lowest']} to "
                    f"{facts['highest']}, {_loudness(facts['velocity'], language)}; the notes point to {key}.",
            lambda: f"A {_loudness(facts['velocity'], language)} {instrument} performance, tempo {facts['tempo_bpm']} "
                    f"BPM{meter}, pitches from {facts['lowest']} to {facts['highest']}, about "
                    f"{facts['notes_per_second']} notes per second, likely in {key}."]


def _listening_frames(facts: dict[str, Any], language: str) -> list[Callable[[], str]]:
    instrument = _GM_FAMILIES[facts["program"] // 8][language == "de"]
    key = languages.key_name(facts, language)
    busy = _busyness(facts["notes_per_second"], language)
    if language == "de":
        return [lambda: f"Klingt {_loudness(facts['velocity'], language)} und {busy}: rund {facts['tempo_bpm']} "
                        f"Schläge pro Minute, ein Tonumfang von {facts['span']} Halbtönen, nach Gehör {key}, "
                        f"gespielt auf {instrument}."]
    return [lambda: f"Heard as {_loudness(facts['velocity'], language)} and {busy}: about {facts['tempo_bpm']} beats "
                    f"a minute over a {facts['span']}-semitone range, by ear {key}, played on {instrument}.",
            lambda: f"What you hear: {instrument}, {busy} ({facts['notes_per_second']} notes a second), "
                    f"{_loudness(facts['velocity'], language)}, roughly {facts['tempo_bpm']} beats per minute, "
                    f"sounding like {key}."]


_FAMILY_FRAMES = {"measured": _measured_frames, "listening": _listening_frames}


def content_caption(facts: dict[str, Any], language: str, family: str, rng: random.Random) -> str:
    """One content description of ``mtf_facts``' facts in ``language`` and ``family``."""
    if language not in CONTENT_LANGUAGES:
        raise ValueError(f"content descriptions are written in {CONTENT_LANGUAGES}, not {language!r}")
    if family not in _FAMILY_FRAMES:
        raise ValueError(f"unknown content family {family!r}; expected one of {CONTENT_FAMILIES}")
    return rng.choice(_FAMILY_FRAMES[family](facts, language))()
