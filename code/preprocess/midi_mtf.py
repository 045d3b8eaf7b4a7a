"""MIDI <-> MTF (MIDI Text Format), byte-identical to the official CLaMP 3 ``batch_midi2mtf.py``.

The official converter loads a file with ``mido.MidiFile`` (mido 1.3.0), walks ``merged_track`` and
writes one line per message from ``msg.dict().values()``. Building, copying and re-checking a mido
``Message`` object per event dominates its run time, so this module reads the Standard MIDI File
bytes itself and formats each line directly, while reproducing every mido behaviour that changes
the output or decides whether a file is rejected:

* header fields are read as signed 16-bit numbers (an SMPTE division gives a negative
  ``ticks_per_beat``); extra header bytes are skipped; a chunk that is not ``MTrk`` where a track is
  expected is an error (mido does not skip unknown chunks);
* running status is kept across channel, sysex and system-common messages but not meta messages;
  a data byte after a sysex restarts a sysex and is discarded, as in mido;
* channel data bytes above 127, undefined status bytes (0xF4, 0xF5, 0xF9, 0xFD), sysex payloads
  with a byte above 127 after stripping F0/F7, and meta/sysex payloads over 1,000,000 bytes are
  errors;
* meta payloads are decoded (and validated) like mido's meta specs: short payloads, unknown key
  signatures, SMPTE minutes/seconds > 59 or sub-frames > 99, and time-signature denominators that
  mido's ``math.log`` check refuses are errors; unknown meta types become ``unknown_meta`` and,
  as in mido, lose their delta time (they sit at time 0 relative to the previous message, and the
  rest of their track moves earlier by that delta);
* a track that runs past its chunk length is an error (mido reads on into the next chunk and
  always fails later);
* tracks are merged by absolute time with a stable sort (earlier tracks first on ties), every
  ``end_of_track`` is dropped (its delta passes to the next message) and one is appended at the
  end; with ``m3_compatible`` the text-like metas are dropped *after* the merge, so their deltas
  are lost, exactly as in the official loop.

Type-2 files (independent sequences) make the official script fail, because mido has no merged
track for them. Here their tracks are **played one after another**: each track starts when the
previous one ends (at its own ``end_of_track`` time), and the result is formatted like a merged
track. Type-0/1 output is unaffected by this choice.

``mtf_to_midi`` writes an MTF text back to a type-0 MIDI file, so that MIDI -> MTF -> MIDI -> MTF
reproduces the first MTF exactly.
"""

from __future__ import annotations

import math
import os
import struct
from operator import itemgetter

from preprocess.errors import ConversionError

__all__ = [
    "M3_SKIPPED_META_TYPES",
    "MidiFormatError",
    "MtfFormatError",
    "midi_bytes_to_mtf",
    "midi_to_mtf",
    "mtf_file_to_midi",
    "mtf_to_midi",
]

# Meta types the official ``--m3_compatible`` flag drops (reference section 7.1, step 4).
M3_SKIPPED_META_TYPES = frozenset(
    {"text", "copyright", "track_name", "instrument_name", "lyrics", "marker", "cue_marker", "device_name"}
)

# mido refuses longer sysex/meta payloads (midifiles.MAX_MESSAGE_LENGTH).
_MAX_PAYLOAD = 1_000_000


class MidiFormatError(ConversionError):
    """A MIDI file the official converter (mido 1.3.0) would also reject, with the reason."""

    def __init__(self, reason: str):
        super().__init__(reason, stage="parse_midi")


class MtfFormatError(ConversionError):
    """An MTF text that cannot be written back as MIDI."""

    def __init__(self, reason: str):
        super().__init__(reason, stage="parse_mtf")


# --- lookup tables -------------------------------------------------------------------------------

_CHANNEL_TYPES = {0x80: "note_off", 0x90: "note_on", 0xA0: "polytouch", 0xB0: "control_change",
                  0xC0: "program_change", 0xD0: "aftertouch", 0xE0: "pitchwheel"}
# Indexed by status byte: the line start up to the delta, and " <channel>" which follows it.
_CHANNEL_HEAD = [""] * 256
_CHANNEL_SUFFIX = [""] * 256
for _status in range(0x80, 0xF0):
    _CHANNEL_HEAD[_status] = _CHANNEL_TYPES[_status & 0xF0] + " "
    _CHANNEL_SUFFIX[_status] = f" {_status & 0x0F}"

# System common / real-time messages mido reads inside a track: name and number of data bytes.
_SYSTEM_TYPES = {0xF1: ("quarter_frame", 1), 0xF2: ("songpos", 2), 0xF3: ("song_select", 1),
                 0xF6: ("tune_request", 0), 0xF8: ("clock", 0), 0xFA: ("start", 0),
                 0xFB: ("continue", 0), 0xFC: ("stop", 0), 0xFE: ("active_sensing", 0)}

_TEXT_META_TYPES = {0x01: "text", 0x02: "copyright", 0x03: "track_name", 0x04: "instrument_name",
                    0x05: "lyrics", 0x06: "marker", 0x07: "cue_marker", 0x09: "device_name"}

_KEY_NAMES = {
    (-7, 0): "Cb", (-6, 0): "Gb", (-5, 0): "Db", (-4, 0): "Ab", (-3, 0): "Eb", (-2, 0): "Bb", (-1, 0): "F",
    (0, 0): "C", (1, 0): "G", (2, 0): "D", (3, 0): "A", (4, 0): "E", (5, 0): "B", (6, 0): "F#", (7, 0): "C#",
    (-7, 1): "Abm", (-6, 1): "Ebm", (-5, 1): "Bbm", (-4, 1): "Fm", (-3, 1): "Cm", (-2, 1): "Gm",
    (-1, 1): "Dm", (0, 1): "Am", (1, 1): "Em", (2, 1): "Bm", (3, 1): "F#m", (4, 1): "C#m", (5, 1): "G#m",
    (6, 1): "D#m", (7, 1): "A#m",
}
_KEY_CODES = {name: code for code, name in _KEY_NAMES.items()}

_SMPTE_RATES = {0: "24", 1: "25", 2: "29.97", 3: "30"}
_SMPTE_CODES = {name: code for code, name in _SMPTE_RATES.items()}

# mido checks a time-signature denominator 2**k with float math.log(2**k, 2) == int(...), which is
# false for some k (29, 31, 39, ...); such files are rejected, so the same test is reproduced here.
_VALID_DENOMINATOR_EXPONENTS = frozenset(
    k for k in range(256) if math.log(2**k, 2) == int(math.log(2**k, 2))
)

_KNOWN_META_TYPES = frozenset({0x00, 0x20, 0x21, 0x2F, 0x51, 0x54, 0x58, 0x59, 0x7F, *_TEXT_META_TYPES})

_by_time = itemgetter(0)


# --- MIDI -> MTF ---------------------------------------------------------------------------------


def _meta_line_head(meta_type: int, payload: bytes, m3_compatible: bool) -> str | None:
    """The MTF line of a meta message up to its delta time (which comes last), or None if dropped.

    Raises MidiFormatError where mido's meta decoder raises.
    """
    text_type = _TEXT_META_TYPES.get(meta_type)
    if text_type is not None:
        if m3_compatible:
            return None
        # mido decodes meta text as latin-1; the official line is then unicode_escape'd, which
        # only ever changes the text part of the line.
        text = payload.decode("latin-1").encode("unicode_escape").decode("ascii")
        return f"{text_type} {text} "
    size = len(payload)
    try:
        if meta_type == 0x51:
            return f"set_tempo {(payload[0] << 16) | (payload[1] << 8) | payload[2]} "
        if meta_type == 0x58:
            if payload[1] not in _VALID_DENOMINATOR_EXPONENTS:
                raise MidiFormatError(f"time_signature denominator 2**{payload[1]} is refused by mido")
            return f"time_signature {payload[0]} {2 ** payload[1]} {payload[2]} {payload[3]} "
        if meta_type == 0x59:
            key = payload[0] - 256 if payload[0] > 127 else payload[0]
            name = _KEY_NAMES.get((key, payload[1]))
            if name is None:
                raise MidiFormatError(f"key_signature with key {key} and mode {payload[1]} is invalid")
            return f"key_signature {name} "
        if meta_type == 0x00:
            # An empty sequence_number occurs in real files; mido reads it as 0.
            number = 0 if size == 0 else (payload[0] << 8) | payload[1]
            return f"sequence_number {number} "
        if meta_type == 0x20:
            return f"channel_prefix {payload[0]} "
        if meta_type == 0x21:
            return f"midi_port {payload[0] if size else 0} "
        if meta_type == 0x54:
            rate = _SMPTE_RATES.get(payload[0] >> 5)
            if rate is None:
                raise MidiFormatError(f"smpte_offset frame-rate code {payload[0] >> 5} is invalid")
            if payload[1] > 59 or payload[2] > 59 or payload[4] > 99:
                raise MidiFormatError("smpte_offset minutes/seconds above 59 or sub-frames above 99")
            return (f"smpte_offset {rate} {payload[0] & 0x1F} {payload[1]} {payload[2]} "
                    f"{payload[3]} {payload[4]} ")
        if meta_type == 0x7F:
            return f"sequencer_specific {tuple(payload)} "
    except IndexError:
        raise MidiFormatError(f"meta message 0x{meta_type:02X} has a too short payload ({size} bytes)") from None
    return f"unknown_meta {meta_type} {tuple(payload)} "


def _read_track(data: bytes, pos: int, end: int, m3_compatible: bool,
                events: list[tuple[int, str | None, str]]) -> int:
    """Append ``(absolute_tick, line_head, line_tail)`` for each message of one track chunk.

    The MTF line is ``head + str(delta) + tail``; a head of None marks a message that takes part
    in the merge but is not written. ``end_of_track`` messages are not appended. Returns the
    absolute tick of the last message (the track's end time). Raises IndexError when the data
    ends early.
    """
    append = events.append
    channel_head = _CHANNEL_HEAD
    channel_suffix = _CHANNEL_SUFFIX
    now = 0
    last_status = 0  # 0: no running status yet
    while pos != end:
        if pos > end:
            raise MidiFormatError(f"a message runs past the end of its track chunk (byte {end})")
        delta = data[pos]
        pos += 1
        if delta >= 0x80:
            delta &= 0x7F
            while True:  # no length limit on variable-length numbers, as in mido
                byte = data[pos]
                pos += 1
                delta = (delta << 7) | (byte & 0x7F)
                if byte < 0x80:
                    break
        now += delta

        status = data[pos]
        pos += 1
        if status < 0x80:
            if not last_status:
                raise MidiFormatError(f"running status without a previous status byte (byte {pos - 1})")
            first = status
            status = last_status
            if status < 0xF0:
                if status < 0xC0 or status >= 0xE0:
                    second = data[pos]
                    pos += 1
                    if second > 127:
                        raise MidiFormatError(f"data byte 0x{second:02X} above 127 (byte {pos - 1})")
                    if status < 0xE0:
                        append((now, channel_head[status], f"{channel_suffix[status]} {first} {second}"))
                    else:
                        append((now, channel_head[status], f"{channel_suffix[status]} {first + (second << 7) - 8192}"))
                else:
                    append((now, channel_head[status], f"{channel_suffix[status]} {first}"))
                continue
            if status != 0xF0 and status != 0xF7:
                pos = _read_system(data, pos - 1, status, now, first_is_peeked=True, append=append)
                continue
            # A data byte after a sysex: mido drops it and reads a new sysex length after it.
        elif status < 0xF0:
            last_status = status
            first = data[pos]
            if status < 0xC0 or status >= 0xE0:
                second = data[pos + 1]
                pos += 2
                if first > 127 or second > 127:
                    raise MidiFormatError(f"data byte above 127 in a channel message (byte {pos - 2})")
                if status < 0xE0:
                    append((now, channel_head[status], f"{channel_suffix[status]} {first} {second}"))
                else:
                    append((now, channel_head[status], f"{channel_suffix[status]} {first + (second << 7) - 8192}"))
            else:
                pos += 1
                if first > 127:
                    raise MidiFormatError(f"data byte 0x{first:02X} above 127 (byte {pos - 1})")
                append((now, channel_head[status], f"{channel_suffix[status]} {first}"))
            continue
        elif status == 0xFF:
            meta_type = data[pos]
            pos += 1
            length, pos = _read_varlen(data, pos)
            payload = _read_payload(data, pos, length)
            pos += length
            if meta_type != 0x2F:
                if meta_type not in _KNOWN_META_TYPES:
                    # mido builds unknown metas without their delta (time 0): the delta is lost
                    # and later messages of the track move earlier by it.
                    now -= delta
                append((now, _meta_line_head(meta_type, payload, m3_compatible), ""))
            continue
        else:
            last_status = status
            if status != 0xF0 and status != 0xF7:
                pos = _read_system(data, pos, status, now, first_is_peeked=False, append=append)
                continue
        # sysex (F0 or F7, possibly through running status)
        length, pos = _read_varlen(data, pos)
        payload = _read_payload(data, pos, length)
        pos += length
        if payload[:1] == b"\xf0":
            payload = payload[1:]
        if payload[-1:] == b"\xf7":
            payload = payload[:-1]
        if payload and max(payload) > 127:
            raise MidiFormatError(f"sysex data byte above 127 (message ending at byte {pos})")
        append((now, "sysex ", f" {list(payload)}"))
    return now


def _read_varlen(data: bytes, pos: int) -> tuple[int, int]:
    value = 0
    while True:
        byte = data[pos]
        pos += 1
        value = (value << 7) | (byte & 0x7F)
        if byte < 0x80:
            return value, pos


def _read_payload(data: bytes, pos: int, length: int) -> bytes:
    if length > _MAX_PAYLOAD:
        raise MidiFormatError(f"message length {length} exceeds the maximum {_MAX_PAYLOAD}")
    payload = data[pos:pos + length]
    if len(payload) < length:
        raise IndexError
    return payload


def _read_system(data: bytes, pos: int, status: int, now: int, *, first_is_peeked: bool, append) -> int:
    """Read a system common/real-time message whose data starts at ``pos``; return the new position."""
    spec = _SYSTEM_TYPES.get(status)
    if spec is None:
        raise MidiFormatError(f"undefined status byte 0x{status:02X} (byte {pos - 1})")
    name, size = spec
    if first_is_peeked and size == 0:
        raise MidiFormatError(f"data byte after a {name} message (running status for a message without data)")
    values = data[pos:pos + size]
    if len(values) < size:
        raise IndexError
    if any(v > 127 for v in values):
        raise MidiFormatError(f"data byte above 127 in a {name} message (byte {pos})")
    pos += size
    if name == "quarter_frame":
        tail = f" {values[0] >> 4} {values[0] & 15}"
    elif name == "songpos":
        tail = f" {values[0] | (values[1] << 7)}"
    elif name == "song_select":
        tail = f" {values[0]}"
    else:
        tail = ""
    append((now, name + " ", tail))
    return pos


def midi_bytes_to_mtf(data: bytes, m3_compatible: bool) -> str:
    """The MTF text of a Standard MIDI File given as bytes; see the module docstring.

    Raises MidiFormatError (with a reason) for input the official converter would reject.
    """
    if len(data) == 0:
        raise MidiFormatError("empty file (0 bytes)")
    if len(data) < 8:
        raise MidiFormatError(f"truncated MIDI header: the file has only {len(data)} bytes")
    name, header_size = struct.unpack_from(">4sL", data, 0)
    if name != b"MThd":
        raise MidiFormatError(f"not a MIDI file: it starts with {data[:4]!r} instead of b'MThd'")
    if header_size < 6 or len(data) < 14:
        raise MidiFormatError(f"truncated MIDI header: {min(header_size, len(data) - 8)} of 6 header bytes")
    file_type, track_count, ticks_per_beat = struct.unpack_from(">hhh", data, 8)
    pos = 8 + header_size

    events: list[tuple[int, str | None, str]] = []
    track_ends: list[int] = []
    tracks_with_events = 0  # one track's events are already in time order: only several need the sort
    for track_index in range(track_count):
        chunk = data[pos:pos + 8]
        if len(chunk) < 8:
            raise MidiFormatError(
                f"truncated MIDI file: the header declares {track_count} tracks but the data ends "
                f"before track {track_index + 1}")
        chunk_name, size = struct.unpack(">4sL", chunk)
        if chunk_name != b"MTrk":
            raise MidiFormatError(f"expected an 'MTrk' chunk for track {track_index + 1}, found {chunk_name!r}")
        pos += 8
        before = len(events)
        try:
            end_tick = _read_track(data, pos, pos + size, m3_compatible, events)
        except IndexError:
            raise MidiFormatError(
                f"truncated MIDI data: track {track_index + 1} of {track_count} ends early "
                f"(chunk declares {size} bytes, file has {len(data)} bytes)") from None
        if file_type == 2 and track_ends:
            # Type 2: the next sequence starts when the previous one ends.
            offset = sum(track_ends)
            events[before:] = [(tick + offset, head, tail) for tick, head, tail in events[before:]]
        track_ends.append(end_tick)
        tracks_with_events += len(events) > before
        pos += size

    if tracks_with_events > 1 and file_type != 2:
        events.sort(key=_by_time)  # stable: earlier tracks first at equal times, like mido
    end_of_all = (sum(track_ends) if file_type == 2 else max(track_ends)) if track_ends else 0

    lines = [f"ticks_per_beat {ticks_per_beat}"]
    append = lines.append
    previous = 0
    for tick, head, tail in events:
        if head is not None:
            append(f"{head}{tick - previous}{tail}")
        previous = tick
    append(f"end_of_track {end_of_all - previous}")
    return "\n".join(lines)


def midi_to_mtf(path: str | os.PathLike, m3_compatible: bool) -> str:
    """The MTF text of a MIDI file, byte-identical to the official ``batch_midi2mtf.py`` output
    (with ``--m3_compatible`` when ``m3_compatible``), and defined for type-2 files too."""
    with open(path, "rb") as f:
        data = f.read()
    return midi_bytes_to_mtf(data, m3_compatible)


# --- MTF -> MIDI ---------------------------------------------------------------------------------

_CHANNEL_STATUS = {name: status for status, name in _CHANNEL_TYPES.items()}
_SYSTEM_STATUS = {name: (status, size) for status, (name, size) in _SYSTEM_TYPES.items()}
_TEXT_META_CODES = {name: code for code, name in _TEXT_META_TYPES.items()}


def _varlen(value: int) -> bytes:
    if value < 0:
        raise ValueError("negative delta time or length")
    out = [value & 0x7F]
    value >>= 7
    while value:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    return bytes(reversed(out))


def _meta(meta_type: int, payload: bytes) -> bytes:
    return bytes((0xFF, meta_type)) + _varlen(len(payload)) + payload


def _int_sequence(text: str, opening: str, closing: str) -> bytes:
    if not (text.startswith(opening) and text.endswith(closing)):
        raise ValueError(f"expected {opening}...{closing}, got {text!r}")
    inner = text[1:-1].strip().rstrip(",")
    return bytes(int(v) for v in inner.split(",")) if inner else b""


def _mtf_event(line: str) -> tuple[int, bytes]:
    """(delta, event bytes) of one MTF message line."""
    kind, _, rest = line.partition(" ")
    status = _CHANNEL_STATUS.get(kind)
    if status is not None:
        fields = [int(v) for v in rest.split(" ")]
        delta, channel, values = fields[0], fields[1], fields[2:]
        if not 0 <= channel <= 15:
            raise ValueError(f"channel {channel} out of range")
        if kind == "pitchwheel":
            (pitch,) = values
            if not -8192 <= pitch <= 8191:
                raise ValueError(f"pitch {pitch} out of range")
            values = [(pitch + 8192) & 0x7F, (pitch + 8192) >> 7]
        elif len(values) != (1 if status in (0xC0, 0xD0) else 2):
            raise ValueError("wrong number of values")
        if not all(0 <= v <= 127 for v in values):
            raise ValueError("data values must be in 0..127")
        return delta, bytes([status | channel, *values])
    if kind == "sysex":
        delta_text, _, data_text = rest.partition(" ")
        payload = _int_sequence(data_text, "[", "]")
        return int(delta_text), b"\xf0" + _varlen(len(payload) + 1) + payload + b"\xf7"
    if kind in _SYSTEM_STATUS:
        status, size = _SYSTEM_STATUS[kind]
        fields = [int(v) for v in rest.split(" ")]
        delta, values = fields[0], fields[1:]
        if kind == "quarter_frame":
            values = [(values[0] << 4) | values[1]]
        elif kind == "songpos":
            values = [values[0] & 0x7F, values[0] >> 7]
        if len(values) != size or not all(0 <= v <= 127 for v in values):
            raise ValueError("wrong number of values or a value outside 0..127")
        return delta, bytes([status, *values])

    # Meta messages: the delta is the last field.
    body, _, delta_text = rest.rpartition(" ")
    delta = int(delta_text)
    if kind in _TEXT_META_CODES:
        text = body.encode("utf-8").decode("unicode_escape")
        try:
            payload = text.encode("latin-1")
        except UnicodeEncodeError:
            payload = text.encode("utf-8")
        return delta, _meta(_TEXT_META_CODES[kind], payload)
    if kind == "end_of_track":
        return int(rest), _meta(0x2F, b"")
    fields = body.split(" ")
    if kind == "set_tempo":
        return delta, _meta(0x51, int(fields[0]).to_bytes(3, "big"))
    if kind == "time_signature":
        numerator, denominator, clocks, thirty_seconds = (int(v) for v in fields)
        exponent = denominator.bit_length() - 1
        if denominator != 1 << exponent:
            raise ValueError(f"denominator {denominator} is not a power of 2")
        return delta, _meta(0x58, bytes((numerator, exponent, clocks, thirty_seconds)))
    if kind == "key_signature":
        key, mode = _KEY_CODES[fields[0]]
        return delta, _meta(0x59, bytes((key & 0xFF, mode)))
    if kind == "sequence_number":
        return delta, _meta(0x00, int(fields[0]).to_bytes(2, "big"))
    if kind == "channel_prefix":
        return delta, _meta(0x20, bytes((int(fields[0]),)))
    if kind == "midi_port":
        return delta, _meta(0x21, bytes((int(fields[0]),)))
    if kind == "smpte_offset":
        rate, hours, minutes, seconds, frames, sub_frames = fields
        first = (_SMPTE_CODES[rate] << 5) | int(hours)
        return delta, _meta(0x54, bytes((first, int(minutes), int(seconds), int(frames), int(sub_frames))))
    if kind == "sequencer_specific":
        return delta, _meta(0x7F, _int_sequence(body, "(", ")"))
    if kind == "unknown_meta":
        type_text, _, data_text = body.partition(" ")
        return delta, _meta(int(type_text), _int_sequence(data_text, "(", ")"))
    raise ValueError(f"unknown message type {kind!r}")


def mtf_to_midi(text: str) -> bytes:
    """A type-0 Standard MIDI File holding the messages of an MTF text, in order.

    Converting the result back with ``midi_to_mtf`` (with the same ``m3_compatible`` setting that
    produced ``text``) gives ``text`` again. Messages an ``--m3_compatible`` MTF left out are not
    recovered, and their delta times are lost, as in the MTF itself. Raises MtfFormatError with the
    line number for text that is not MTF.
    """
    lines = text.split("\n")
    header = lines[0].split(" ")
    if len(header) != 2 or header[0] != "ticks_per_beat":
        raise MtfFormatError(f"line 1 must be 'ticks_per_beat <N>', got {lines[0][:80]!r}")
    try:
        ticks_per_beat = struct.pack(">h", int(header[1]))
    except (ValueError, struct.error):
        raise MtfFormatError(f"line 1: ticks_per_beat {header[1][:20]!r} is not a 16-bit integer") from None

    track = bytearray()
    ended = False
    for number, line in enumerate(lines[1:], start=2):
        if not line:
            continue
        try:
            delta, event = _mtf_event(line)
            track += _varlen(delta)
        except (ValueError, KeyError, IndexError, OverflowError) as exc:
            raise MtfFormatError(f"line {number}: cannot read {line[:80]!r} ({exc or type(exc).__name__})") from None
        track += event
        ended = event == b"\xff\x2f\x00"
    if not ended:
        track += b"\x00\xff\x2f\x00"
    header_chunk = b"MThd" + struct.pack(">Lhh", 6, 0, 1) + ticks_per_beat
    return header_chunk + b"MTrk" + struct.pack(">L", len(track)) + bytes(track)


def mtf_file_to_midi(path: str | os.PathLike) -> bytes:
    """``mtf_to_midi`` of an MTF file (UTF-8)."""
    with open(path, encoding="utf-8", newline="") as f:
        return mtf_to_midi(f.read())
