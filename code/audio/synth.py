"""A plain additive synthesiser: MIDI notes to a waveform, and 16-bit WAV files (numpy and the standard
library; mido reads the MIDI). It renders test audio from symbolic music, so the audio side can be
exercised offline where no recording exists; it is not meant to sound like an instrument.
"""

from __future__ import annotations

import os
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DRUM_CHANNEL = 9  # General MIDI percussion: left out (no pitch to render)


@dataclass(frozen=True)
class Note:
    start: float  # seconds
    end: float
    pitch: int
    velocity: int


def midi_notes(path: str | os.PathLike) -> list[Note]:
    """The pitched notes of a MIDI file in seconds (tempo changes applied), sorted by start."""
    import mido

    notes: list[Note] = []
    sounding: dict[tuple[int, int], list[tuple[float, int]]] = {}
    now = 0.0
    for message in mido.MidiFile(str(path)):
        now += message.time
        if message.type not in ("note_on", "note_off") or message.channel == DRUM_CHANNEL:
            continue
        key = (message.channel, message.note)
        if message.type == "note_on" and message.velocity > 0:
            sounding.setdefault(key, []).append((now, message.velocity))
        elif sounding.get(key):
            start, velocity = sounding[key].pop(0)
            notes.append(Note(start, max(now, start + 0.02), message.note, velocity))
    for (_, pitch), started in sounding.items():  # never released: held to the end
        notes.extend(Note(start, max(now, start + 0.25), pitch, velocity) for start, velocity in started)
    return sorted(notes, key=lambda n: (n.start, n.pitch))


def render(notes: list[Note], rate: int = 22050, max_seconds: float | None = None,
           tail: float = 0.3) -> np.ndarray:
    """Mono float32 samples: each note three decaying harmonics with a 5 ms attack, the mix scaled to a
    peak of 0.5 (silence stays silent)."""
    if max_seconds is not None:
        notes = [n for n in notes if n.start < max_seconds]
    end = max((n.end for n in notes), default=0.0) + tail
    if max_seconds is not None:
        end = min(end, max_seconds)
    out = np.zeros(max(1, int(round(end * rate))), dtype=np.float64)
    for note in notes:
        first = int(note.start * rate)
        length = min(int((note.end - note.start + tail) * rate), len(out) - first)
        if length <= 0:
            continue
        t = np.arange(length) / rate
        frequency = 440.0 * 2.0 ** ((note.pitch - 69) / 12)
        tone = sum(np.sin(2 * np.pi * frequency * k * t) / k for k in (1, 2, 3))
        envelope = np.minimum(1.0, t / 0.005) * np.exp(-3.0 * t)
        envelope *= np.exp(-np.maximum(0.0, t - (note.end - note.start)) / 0.05)  # the release
        out[first:first + length] += (note.velocity / 127.0) * tone * envelope
    peak = np.abs(out).max()
    return (out * (0.5 / peak) if peak > 0 else out).astype(np.float32)


def render_midi(path: str | os.PathLike, rate: int = 22050, max_seconds: float | None = 30.0) -> np.ndarray:
    return render(midi_notes(path), rate, max_seconds)


def write_wav(path: str | os.PathLike, samples: np.ndarray, rate: int) -> Path:
    """16-bit PCM WAV of ``samples`` (``(n,)`` mono or ``(channels, n)``), clipped to [-1, 1]."""
    array = np.atleast_2d(np.asarray(samples, dtype=np.float32))
    pcm = np.round(np.clip(array, -1.0, 1.0) * 32767).astype("<i2")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as out:
        out.setnchannels(array.shape[0])
        out.setsampwidth(2)
        out.setframerate(int(rate))
        out.writeframes(np.ascontiguousarray(pcm.T).tobytes())
    return path
