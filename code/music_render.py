"""What a person looks at and listens to for one music file: its score as SVG and its sound as WAV.

**Scores.** Sheet music is engraved by Verovio: MusicXML (``.xml``/``.musicxml``, and ``.mxl``
unzipped here) as it is, ABC through the project's ABC → MusicXML converter
(``preprocess.abc2xml``), so interleaved ABC renders as the model reads it. MIDI and MTF hold no
notation (quantising a performance into notes would be a guess), so they are drawn as a piano roll
(time across, pitch up, one colour per channel), and the caption says so (``Score.notation``).

Recordings (audio files) have no score and are played as they are.

**Sound.** MIDI and MTF files are played from their own messages (MTF back to MIDI through
``preprocess.midi_mtf``); sheet music from the MIDI Verovio writes for the engraved score. The MIDI
goes through FluidSynth with a General MIDI soundfont when both are installed (``find_soundfont``),
else through ``synthesise``, a small additive synthesiser in numpy (a few decaying harmonics per
note, noise bursts for the drum channel): plain, but every pitch and onset is there. The sound is
capped at ``MAX_AUDIO_SECONDS``.

Everything raises ``RenderError`` with a reason a page can show; no exception of a converter or a
library escapes as it is.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tempfile
import wave
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import numpy as np
from preprocess import abc2xml, midi_mtf
from preprocess.errors import ConversionError, describe_exception

SAMPLE_RATE = 22050
MAX_AUDIO_SECONDS = 120.0
FLUIDSYNTH_TIMEOUT_S = 60.0
# Where Debian's (and most distributions') General MIDI soundfonts live, the fullest first.
SOUNDFONT_CANDIDATES = ("/usr/share/sounds/sf2/FluidR3_GM.sf2", "/usr/share/sounds/sf2/default-GM.sf2",
                        "/usr/share/soundfonts/default.sf2", "/usr/share/sounds/sf2/TimGM6mb.sf2",
                        "/usr/share/soundfonts/FluidR3_GM.sf2")
# Verovio's page: A4 (in tenths of a millimetre) at a size a list of hits can show; only the first
# page is drawn (a folk tune fits on it; a symphony's first page is enough to recognise it).
VEROVIO_OPTIONS = {"pageWidth": 2100, "pageHeight": 2970, "adjustPageHeight": True, "scale": 35,
                   "header": "none", "footer": "none", "breaks": "auto"}
MAX_ROLL_NOTES = 20000
ROLL_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf",
                "#bcbd22", "#7f7f7f")

# Sheet music is engraved on one thread: abc2xml keeps its state in module globals, and Verovio's
# element ids come from a generator of the thread (a fixed seed gives the same SVG on the same thread).
_ENGRAVER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="music_render_engraver")
_TOOLKIT: Any = None


class RenderError(ValueError):
    """A file that cannot be drawn or played, with the reason (shown to the user as it is)."""


@dataclass(frozen=True)
class Note:
    """One sounding note: onset and end in seconds, MIDI pitch and velocity, channel, GM program."""

    start: float
    end: float
    pitch: int
    velocity: int
    channel: int
    program: int


@dataclass(frozen=True)
class Score:
    """A file's picture: the SVG text; ``notation``: True for an engraved score, False for a piano
    roll (MIDI and MTF); ``pages``: how many pages the engraving has (the SVG is the first)."""

    svg: str
    notation: bool
    pages: int = 1


# ---------------------------------------------------------------------------- file kinds
SHEET_KINDS = frozenset({"abc", "musicxml"})
PERFORMANCE_KINDS = frozenset({"midi", "mtf"})
RECORDING_KINDS = frozenset({"audio"})  # played as they are; no score
NO_SCORE = {"audio": "a recording has no score to draw", "mert": "MERT features are not music a person can read"}


def musicxml_text(path: Path) -> str:
    """A MusicXML file's text; for ``.mxl`` the score its container names (or the first .xml inside)."""
    if path.suffix.lower() != ".mxl":
        return path.read_bytes().decode("utf-8", errors="replace")
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            target = None
            if "META-INF/container.xml" in names:
                root = ElementTree.fromstring(archive.read("META-INF/container.xml"))
                rootfile = next((el for el in root.iter() if el.tag.endswith("rootfile")), None)
                target = rootfile.get("full-path") if rootfile is not None else None
            if target not in names:
                target = next((n for n in names if n.lower().endswith((".xml", ".musicxml"))
                               and not n.startswith("META-INF/")), None)
            if target is None:
                raise RenderError(f"{path.name}: the .mxl archive holds no MusicXML score")
            return archive.read(target).decode("utf-8", errors="replace")
    except (zipfile.BadZipFile, ElementTree.ParseError, KeyError) as exc:
        raise RenderError(f"{path.name}: not a readable .mxl archive ({describe_exception(exc)})") from exc


def sheet_musicxml(path: Path, kind: str) -> str:
    """The MusicXML Verovio engraves for a sheet-music file (ABC converted by the project's converter)."""
    if kind == "musicxml":
        return musicxml_text(path)
    if kind == "abc":
        try:
            return abc2xml.convert_file(path).decode("utf-8")
        except ConversionError as exc:
            raise RenderError(f"{path.name}: ABC → MusicXML failed: {exc.reason}") from exc
        except Exception as exc:  # noqa: BLE001 - the vendored converter's own crash is this file's failure
            raise RenderError(f"{path.name}: ABC → MusicXML failed: {describe_exception(exc)}") from exc
    raise RenderError(f"{path.name}: {kind} files are not sheet music")


def _toolkit() -> Any:
    """The process's one Verovio toolkit (made on first use, on the engraver's thread). One is kept:
    a toolkit made after another has gone can fail to load its fonts."""
    global _TOOLKIT
    if _TOOLKIT is None:
        try:
            import verovio
        except ImportError as exc:
            raise RenderError("scores need the verovio package: pip install verovio (make setup installs "
                              "it)") from exc
        verovio.enableLog(verovio.LOG_ERROR)
        toolkit = verovio.toolkit()
        toolkit.setOptions(VEROVIO_OPTIONS)
        _TOOLKIT = toolkit
    return _TOOLKIT


def _engrave_here(path: Path, kind: str) -> tuple[str, int, bytes]:
    import base64

    musicxml = sheet_musicxml(path, kind)
    toolkit = _toolkit()
    toolkit.resetXmlIdSeed(1)
    if not toolkit.loadData(musicxml) or toolkit.getPageCount() < 1:
        raise RenderError(f"{path.name}: Verovio could not read the score")
    svg = toolkit.renderToSVG(1)
    pages = int(toolkit.getPageCount())
    midi = base64.b64decode(toolkit.renderToMIDI() or "")
    if not svg:
        raise RenderError(f"{path.name}: Verovio drew nothing")
    return svg, pages, midi


def engrave(path: Path, kind: str) -> tuple[str, int, bytes]:
    """A sheet-music file engraved by Verovio (on the engraver's thread, one file at a time): the SVG of
    the first page, the number of pages, and Verovio's MIDI rendering of the whole score. The element
    ids come from a fixed seed, so one file always gives the same SVG."""
    return _ENGRAVER.submit(_engrave_here, path, kind).result()


def performance_midi(path: Path, kind: str) -> bytes:
    """The MIDI bytes of a MIDI or MTF file."""
    if kind == "midi":
        return path.read_bytes()
    if kind == "mtf":
        try:
            return midi_mtf.mtf_file_to_midi(path)
        except (ConversionError, UnicodeDecodeError) as exc:
            raise RenderError(f"{path.name}: not readable MTF ({describe_exception(exc)})") from exc
    raise RenderError(f"{path.name}: {kind} files hold no MIDI")


def file_midi(path: Path, kind: str) -> bytes:
    """What a file sounds like, as MIDI: its own (MIDI, MTF) or Verovio's rendering of its score."""
    if kind in PERFORMANCE_KINDS:
        return performance_midi(path, kind)
    if kind in SHEET_KINDS:
        return engrave(path, kind)[2]
    if kind in RECORDING_KINDS:
        raise RenderError(f"{path.name}: a recording is played as it is, not through MIDI")
    raise RenderError(f"{path.name}: {kind} files cannot be played (MERT features are not sound)")


def score(path: Path, kind: str) -> Score:
    """The SVG of a file: Verovio's engraving for sheet music, a piano roll for MIDI and MTF."""
    if kind in SHEET_KINDS:
        svg, pages, _ = engrave(path, kind)
        return Score(svg, notation=True, pages=pages)
    if kind in PERFORMANCE_KINDS:
        return Score(piano_roll_svg(midi_notes(performance_midi(path, kind))), notation=False)
    raise RenderError(f"{path.name}: {NO_SCORE.get(kind, f'{kind} files have no score')}")


# ---------------------------------------------------------------------------- MIDI → notes
def midi_notes(data: bytes, max_seconds: float = MAX_AUDIO_SECONDS) -> list[Note]:
    """The notes of a MIDI file in seconds (tempo changes followed), those starting after
    ``max_seconds`` left out; a note-off, or the key struck again, ends every note of its key begun
    before it, and a note never released ends at the last message."""
    import mido

    try:
        midi = mido.MidiFile(file=io.BytesIO(data), clip=True)
        messages = list(midi)  # merged tracks, delta times in seconds
    except Exception as exc:  # noqa: BLE001 - mido raises many types for malformed files
        raise RenderError(f"not a readable MIDI file ({describe_exception(exc)})") from exc
    now = 0.0
    programs = [0] * 16
    sounding: dict[tuple[int, int], list[tuple[float, int, int]]] = {}
    notes: list[Note] = []

    def release(channel: int, pitch: int, at_end: bool = False) -> None:
        # A note-off ends every note of its key that began before it (files often double a note, and
        # an unmatched extra note-on would otherwise sound to the end); one that began at this very
        # instant keeps sounding (its note-off is still to come). At the end, everything stops.
        started = sounding.get((channel, pitch), [])
        ending = [item for item in started if at_end or item[0] < now]
        sounding[(channel, pitch)] = [item for item in started if not (at_end or item[0] < now)]
        for start, velocity, program in ending:
            if start < max_seconds:
                notes.append(Note(start, max(now, start + 0.05), pitch, velocity, channel, program))

    for message in messages:
        now += float(message.time)
        if message.type == "program_change":
            programs[message.channel] = message.program
        elif message.type == "note_on" and message.velocity > 0:
            release(message.channel, message.note)  # a key struck again ends its earlier note
            sounding.setdefault((message.channel, message.note), []).append(
                (now, message.velocity, programs[message.channel]))
        elif message.type in ("note_off", "note_on"):
            release(message.channel, message.note)
    for channel, pitch in list(sounding):
        release(channel, pitch, at_end=True)
    notes.sort(key=lambda n: (n.start, n.pitch, n.channel))
    return notes


# ---------------------------------------------------------------------------- piano roll
def piano_roll_svg(notes: list[Note], width: int = 1000, height: int = 260) -> str:
    """An SVG piano roll: time across, pitch up, one colour per channel, octave lines at each C."""
    if not notes:
        return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="60" viewBox="0 0 {width} 60">'
                '<text x="10" y="35" font-family="sans-serif" font-size="16">no notes</text></svg>')
    notes = notes[:MAX_ROLL_NOTES]
    low = min(n.pitch for n in notes) - 2
    high = max(n.pitch for n in notes) + 2
    end = max(n.end for n in notes)
    x_scale = (width - 20) / max(end, 1e-3)
    row = min(height / (high - low + 1), 8.0)  # a narrow range stays a narrow roll
    height = int(round(row * (high - low + 1)))
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}"><rect width="100%" height="100%" fill="#fbfbf8"/>']
    for pitch in range(low, high + 1):
        if pitch % 12 == 0:
            y = height - (pitch - low + 1) * row
            parts.append(f'<line x1="0" x2="{width}" y1="{y + row:.1f}" y2="{y + row:.1f}" stroke="#ddd"/>'
                         f'<text x="2" y="{y + row - 2:.1f}" font-size="9" font-family="sans-serif" '
                         f'fill="#999">C{pitch // 12 - 1}</text>')
    for note in notes:
        x = 18 + note.start * x_scale
        y = height - (note.pitch - low + 1) * row
        w = max((note.end - note.start) * x_scale, 1.0)
        colour = ROLL_COLOURS[note.channel % len(ROLL_COLOURS)]
        parts.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{w:.1f}" height="{max(row - 0.5, 1):.1f}" '
                     f'fill="{colour}" fill-opacity="{0.35 + 0.65 * note.velocity / 127:.2f}"/>')
    parts.append("</svg>")
    return "".join(parts)


# ---------------------------------------------------------------------------- MIDI → sound
def synthesise(notes: list[Note], sample_rate: int = SAMPLE_RATE,
               max_seconds: float = MAX_AUDIO_SECONDS) -> np.ndarray:
    """Mono float32 samples in [-1, 1] of the notes, by a small additive synthesiser: each note a
    few harmonics under an attack-decay-release envelope (higher harmonics fade faster), the drum
    channel (10) as short noise bursts."""
    release_s = 0.12
    end = min(max((n.end for n in notes), default=0.0) + release_s, max_seconds)
    out = np.zeros(int(end * sample_rate) + 1, dtype=np.float64)
    noise = np.random.default_rng(0).uniform(-1.0, 1.0, int(0.2 * sample_rate))
    for note in notes:
        begin = int(note.start * sample_rate)
        if begin >= out.size:
            continue
        gain = (note.velocity / 127.0) ** 1.5 * 0.3
        if note.channel == 9:
            burst = noise[: min(noise.size, out.size - begin)]
            t = np.arange(burst.size) / sample_rate
            out[begin:begin + burst.size] += gain * burst * np.exp(-t * 30.0)
            continue
        held = max(note.end - note.start, 0.03)
        length = min(int((held + release_s) * sample_rate), out.size - begin)
        t = np.arange(length) / sample_rate
        frequency = 440.0 * 2.0 ** ((note.pitch - 69) / 12.0)
        wave_ = np.zeros(length)
        for harmonic, amplitude in ((1, 1.0), (2, 0.45), (3, 0.22), (4, 0.1)):
            if frequency * harmonic < sample_rate / 2:
                wave_ += amplitude * np.exp(-t * 1.5 * harmonic) * np.sin(2 * np.pi * frequency * harmonic * t)
        envelope = np.minimum(t / 0.005, 1.0) * np.where(t < held, 1.0, np.exp(-(t - held) / (release_s / 4)))
        out[begin:begin + length] += gain * envelope * wave_
    peak = float(np.max(np.abs(out))) if out.size else 0.0
    if peak > 0.95:
        out *= 0.95 / peak
    return out.astype(np.float32)


def wav_bytes(samples: np.ndarray, sample_rate: int = SAMPLE_RATE) -> bytes:
    """16-bit mono PCM WAV of float samples in [-1, 1]."""
    pcm = (np.clip(samples, -1.0, 1.0) * 32767.0).astype("<i2")
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(sample_rate)
        out.writeframes(pcm.tobytes())
    return buffer.getvalue()


def find_soundfont(explicit: str | os.PathLike | None = None) -> Path | None:
    """The soundfont FluidSynth uses: ``explicit`` (or ``$SOUNDFONT``) when it exists, else the
    first of ``SOUNDFONT_CANDIDATES`` present."""
    for candidate in (explicit, os.environ.get("SOUNDFONT"), *SOUNDFONT_CANDIDATES):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


@dataclass(frozen=True)
class Synthesiser:
    """MIDI → WAV: FluidSynth with ``soundfont`` when both are there, else ``synthesise``."""

    fluidsynth: str | None
    soundfont: Path | None

    @classmethod
    def detect(cls, soundfont: str | os.PathLike | None = None, use_fluidsynth: bool = True) -> Synthesiser:
        found = find_soundfont(soundfont)
        binary = shutil.which("fluidsynth") if use_fluidsynth else None
        return cls(binary if found else None, found if binary else None)

    def describe(self) -> str:
        if self.fluidsynth:
            return f"FluidSynth with {self.soundfont}"
        return "the built-in synthesiser (install fluidsynth and a General MIDI soundfont for real instruments)"

    def wav(self, midi: bytes) -> bytes:
        """WAV bytes of a MIDI file (FluidSynth's when it works on this file, else the built-in's)."""
        notes = midi_notes(midi)  # also checks the file before FluidSynth sees it
        if self.fluidsynth:
            rendered = self._fluidsynth(midi)
            if rendered is not None:
                return rendered
        return wav_bytes(synthesise(notes))

    def _fluidsynth(self, midi: bytes) -> bytes | None:
        with tempfile.TemporaryDirectory(prefix="clamp3_synth_") as folder:
            source, target = Path(folder) / "in.mid", Path(folder) / "out.wav"
            source.write_bytes(midi)
            command = [self.fluidsynth, "-ni", "-q", "-g", "0.6", "-r", str(SAMPLE_RATE), "-T", "wav",
                       "-F", str(target), str(self.soundfont), str(source)]
            try:
                subprocess.run(command, capture_output=True, timeout=FLUIDSYNTH_TIMEOUT_S, check=True)
            except (OSError, subprocess.SubprocessError):
                return None
            if not target.is_file() or target.stat().st_size <= 44:
                return None
            return _trim_wav(target.read_bytes(), MAX_AUDIO_SECONDS)


def _trim_wav(data: bytes, max_seconds: float) -> bytes:
    """A WAV cut to ``max_seconds`` (FluidSynth renders the whole file)."""
    with wave.open(io.BytesIO(data), "rb") as source:
        params = source.getparams()
        frames = source.readframes(min(source.getnframes(), int(max_seconds * source.getframerate())))
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setparams(params)
        out.writeframes(frames)
    return buffer.getvalue()
