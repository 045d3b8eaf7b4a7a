"""Standard ABC -> interleaved ABC (one line per bar, ``[V:n]`` segments side by side), the format
the M3 encoder reads.

For every input the official ``batch_interleaved_abc.py`` converts, ``interleave_abc`` returns the
same text byte for byte: it runs the same steps (CLAMP3_REFERENCE.md section 7.3) and calls
abctoolkit 0.0.4's ``remove_information_field``, ``remove_bar_no_annotations``,
``strip_empty_bars`` and ``rotate_abc`` as a library.

It differs where the official script loses files:

* The alignment check (step 6) never produces output, it only prints. The official script runs it
  anyway, and it *raises* on chords with durations inside the brackets (``[B2g2]``, ``[c/e/]``),
  which skips the whole file. Here the check is only run when the caller asks for warnings, and an
  exception in it becomes a warning.
* Inputs the official steps cannot parse (no line that is exactly ``V:1``: plain single-voice folk
  ABC and lead sheets; inline ``[V:n]`` voice bodies; voices named ``V:S``/``V:T``; one voice in
  several sections) are first rewritten into the layout the steps expect, the one xml2abc writes:
  header up to the first ``K:`` line, voice declarations with attributes, then for each voice a
  bare ``V:n`` line followed by its music (``_to_voice_layout``). Body fields that change the music
  (``K: L: M: Q: P:``) become inline fields, comments, backslash continuations, other body fields and
  header lines that are not fields are dropped, a barline ending one line and one starting the
  next are merged (``:|`` + ``|:`` -> ``::``), a final barline is added if missing, and no note is
  lost. The rewritten text then goes through the same official steps.

Input that still cannot be interleaved (voices with different bar counts, no notes, several tunes
in one text, no ``K:`` line) raises ``ConversionError`` with the reason.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from pathlib import Path

from abctoolkit import check as _check
from abctoolkit import duration as _duration
from abctoolkit import utils as _utils
from abctoolkit.rotate import rotate_abc
from patching import patched

from preprocess.errors import ConversionError, describe_exception

ABC_EXTENSIONS = (".abc",)

# Lines the official step 2 removes: tune number, titles, composer, lyrics, transcription notes.
OFFICIAL_REMOVED_FIELDS = ["X:", "T:", "C:", "W:", "w:", "Z:", "%%MIDI"]

_QUOTE = re.compile(_utils.Quote_re)
_FIELD_LINE = re.compile(r"^[A-Za-z]:")
# Fields ABC 2.1 allows inside a tune body. Only these start a field line there: a body line such
# as "A:|" is music (note A, repeat), since A: is a header-only field.
_BODY_FIELD = re.compile(r"^([IKLMmNPQRrsTUVWw]):(.*)$")
_MUSICAL_BODY_FIELDS = "KLMQP"  # kept as inline fields; the rest carry no notes
_INLINE_VOICE = re.compile(r"\[V:\s*([^\]\s]*)[^\]]*\]")
# abc2xml's own tune separator (getXmlDocs): a line starting with X:, leading blanks allowed.
_TUNE_START = re.compile(r"^\s*X:")


def _read_lines(text: str) -> list[str]:
    """``open(..., encoding='utf-8').readlines()`` on ``text``: universal newlines, ends kept."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    parts = text.split("\n")
    lines = [part + "\n" for part in parts[:-1]]
    if parts[-1]:
        lines.append(parts[-1])
    return lines


def _drop_quotes_with_barlines(line: str) -> str:
    """Official step 4 for one body line (including its quirk, see CLAMP3_REFERENCE.md 7.3)."""
    offending = [q for q in _QUOTE.findall(line) if any(b in q for b in _utils.Barlines)]
    if not offending:
        return line.replace('\\"', "")
    # Removing the quoted text from the *original* line discards the escaped-quote removal.
    for quoted in offending:
        line = line.replace(quoted, "")
    return line


@contextlib.contextmanager
def _captured_prints() -> Iterator[list[str]]:
    """What abctoolkit prints during the block, as a list of lines, without touching ``sys.stdout``.

    abctoolkit reports problems with bare ``print`` calls; a module-level ``print`` shadows the
    builtin inside those modules for the duration of one conversion.
    """
    messages: list[str] = []

    def collect(*args, **kwargs) -> None:  # noqa: ARG001 - print's signature
        messages.append(" ".join(str(a) for a in args).strip())

    with contextlib.ExitStack() as stack:
        for module in (_utils, _check, _duration):
            stack.enter_context(patched(module, print=collect))
        yield messages


def check_one_tune(lines: list[str], stage: str) -> int:
    """The index of the ``K:`` line that ends the header of the one tune in ``lines`` (non-blank
    lines of an ABC text). Raises ``ConversionError`` for several tunes, rather than silently keeping
    the first, and for a text without a ``K:`` line, which has no tune body (any text would
    otherwise be read as notes: "hello" -> e, l, l, o)."""
    tunes = sum(1 for line in lines if _TUNE_START.match(line))
    if tunes > 1:
        raise ConversionError(f"{tunes} tunes (X: fields) in one text; split it into single tunes", stage=stage)
    key_index = next((i for i, line in enumerate(lines) if line.startswith("K:")), None)
    if key_index is None:
        raise ConversionError("no K: (key) field, so no tune body: not a complete ABC tune", stage=stage)
    return key_index


def _official_steps(lines: list[str], warnings: list[str] | None) -> str:
    """Steps 1-8 of the official script on ``readlines()`` output; raises ``ConversionError``."""
    lines = [line for line in lines if line.strip() != ""]
    lines = _utils.remove_information_field(abc_lines=lines, info_fields=OFFICIAL_REMOVED_FIELDS)
    if not any(line.strip() == "V:1" for line in lines):
        raise ConversionError("no line that is exactly 'V:1' (tunebody index not found)", stage="interleave")
    lines = _utils.remove_bar_no_annotations(lines)
    for i, line in enumerate(lines):
        if not (_FIELD_LINE.search(line) or line.startswith("%")):
            lines[i] = _drop_quotes_with_barlines(line)
    with _captured_prints() as printed:
        try:
            stripped, _ = _utils.strip_empty_bars(lines)
        except Exception as exc:  # noqa: BLE001 - abctoolkit raises anything on odd input
            raise ConversionError(f"cannot split the voices into bars: {describe_exception(exc)}",
                                  stage="interleave") from exc
        if stripped is None:
            if "Unequal bar numbers." in printed:
                raise ConversionError(f"voices have different numbers of bars ({_bar_counts(lines)})",
                                      stage="interleave")
            raise ConversionError("empty piece: no bar holds a note", stage="interleave")
        if warnings is not None:
            _alignment_warnings(stripped, warnings)
            warnings.extend(printed)
    try:
        rotated = rotate_abc(stripped)
    except Exception as exc:  # noqa: BLE001
        raise ConversionError(f"cannot rotate the voices: {describe_exception(exc)}", stage="interleave") from exc
    return "".join(rotated)


def _alignment_warnings(stripped: list[str], warnings: list[str]) -> None:
    """The official alignment check (step 6), which only ever warns; here it cannot skip a file."""
    try:
        _, bars_equal, durations_equal = _check.check_alignment_unrotated(stripped)
    except Exception as exc:  # noqa: BLE001 - e.g. durations inside chord brackets: [B2g2]
        warnings.append(f"alignment not checked: {describe_exception(exc)}")
        return
    if not bars_equal:
        warnings.append("Unequal bar number")
    if not durations_equal:
        warnings.append("Unequal bar duration (unaligned)")


def _bar_counts(lines: list[str]) -> str:
    try:
        _, _, _, bar_texts, _ = _utils.extract_barline_and_bartext_dict(lines)
    except Exception:  # noqa: BLE001 - only used to word an error message
        return "unknown counts"
    return ", ".join(f"{voice}: {len(bars)}" for voice, bars in bar_texts.items())


def _strip_comment(line: str) -> str:
    """Cut a ``%`` comment (not ``\\%``, not inside a quoted string) and a ``\\`` continuation."""
    in_quote = False
    for i, char in enumerate(line):
        if char == '"' and (i == 0 or line[i - 1] != "\\"):
            in_quote = not in_quote
        elif char == "%" and not in_quote and (i == 0 or line[i - 1] != "\\"):
            line = line[:i]
            break
    line = line.rstrip()
    if line.endswith("\\"):
        line = line[:-1].rstrip()
    return line


def _to_voice_layout(text: str) -> list[str]:
    """Rewrite a standard ABC tune into xml2abc's layout (bare ``V:n`` line before each voice body)."""
    lines = [line.rstrip("\n") for line in _read_lines(text) if line.strip()]
    key_index = check_one_tune(lines, stage="interleave")

    voices: dict[str, list[str]] = {}  # voice id -> chunks of music, in order of first appearance
    declarations: dict[str, str] = {}  # voice id -> attributes of its first V: line that has any

    def voice(value: str) -> str:
        ident, attributes = re.match(r"\s*(\S*)(.*)$", value).groups()
        ident = ident or "1"
        voices.setdefault(ident, [])
        if attributes.strip() and ident not in declarations:
            declarations[ident] = attributes  # verbatim, so a rewritten tune keeps its V: lines
        return ident

    header = []
    for line in lines[: key_index + 1]:
        if line.startswith("V:"):
            voice(line[2:])
        elif _FIELD_LINE.match(line) or line.startswith("%"):
            header.append(line)
        # Anything else in a header is a typo (e.g. "3/8=120" missing its "Q:"): no ABC reader
        # gives it a meaning, and as a metadata line it would look like music to the encoder.

    current: str | None = None
    for line in lines[key_index + 1 :]:
        if line.startswith("%"):
            continue  # comments and stylesheet directives carry no notes
        field = _BODY_FIELD.match(line)
        if field:
            letter, value = field.groups()
            if letter == "V":
                current = voice(value)
            elif letter in _MUSICAL_BODY_FIELDS:
                current = current or voice(next(iter(voices), "1"))
                voices[current].append(f"[{letter}:{_strip_comment(value).strip()}]")
            continue
        music = _strip_comment(line)
        position = 0
        for marker in _INLINE_VOICE.finditer(music):
            before = music[position : marker.start()]
            if before.strip():
                current = current or voice(next(iter(voices), "1"))
                voices[current].append(before.strip())
            current = voice(marker.group(1))
            position = marker.end()
        rest = music[position:]
        if rest.strip():
            current = current or voice(next(iter(voices), "1"))
            voices[current].append(rest.strip())

    # A declared voice with no music would make abctoolkit index an empty bar list.
    used = [ident for ident, chunks in voices.items() if any(_has_bar_content(c) for c in chunks)]
    if not used:
        raise ConversionError("the tune body holds no music", stage="interleave")
    if sorted(used) == sorted(str(n) for n in range(1, len(used) + 1)):
        used.sort(key=int)  # already numbered 1..n: keep the numbers, in xml2abc's order
        number = {ident: ident for ident in used}
    else:
        number = {ident: str(n) for n, ident in enumerate(used, start=1)}

    out = [_renumber_score(line, number) + "\n" for line in header]
    for ident, attributes in declarations.items():
        if ident in number:
            out.append(f"V:{number[ident]}{attributes}\n")
    for ident in used:
        out += [f"V:{number[ident]}\n", _voice_text(voices[ident]) + "\n"]
    return out


_BARLINE_SPLIT = re.compile(_utils.Barline_regexPattern)


def _is_inline_field(chunk: str) -> bool:
    return chunk.startswith("[") and chunk.endswith("]") and not _utils.remove_square_bracket_information_field(chunk)


def _merge_barlines(left: str, right: str) -> str:
    """One barline for two with nothing between them, keeping the repeat signs."""
    if ":" in left and ":" in right:
        return "::" if left.startswith(":") and right.endswith(":") else left
    if ":" in right:
        return right
    if ":" in left:
        return left
    return right if left == "|" else left


def _voice_text(chunks: list[str]) -> str:
    """One voice's music as one line that abctoolkit can pair into bars.

    A line break separates notes like a space does, but abctoolkit deletes newlines inside a bar,
    so music chunks are joined with a space (an inline field binds to what follows). abctoolkit
    pairs bar texts and barlines strictly alternately: two barlines with only whitespace between
    them (``:| |:`` across a line break, ``:||2``) shift the pairing and lose bars, so they are
    merged first; music after the last barline cannot be paired, so a final ``|`` is added.
    """
    text = "".join(chunk + ("" if _is_inline_field(chunk) else " ") for chunk in chunks)
    pieces = _BARLINE_SPLIT.split(text)  # text, barline, text, barline, ..., text
    merged = [pieces[0]]
    for i in range(1, len(pieces), 2):
        if len(merged) > 1 and not merged[-1].strip():
            merged.pop()
            merged[-1] = _merge_barlines(merged[-1], pieces[i])
        else:
            merged.append(pieces[i])
        merged.append(pieces[i + 1])
    if merged[-1].strip():
        merged.append("|")
    text = "".join(merged).strip()
    # Music such as "C:|" at the start of a line would read as a field line and be removed.
    return " " + text if _FIELD_LINE.match(text) else text


def _has_bar_content(chunk: str) -> bool:
    return bool(_utils.remove_square_bracket_information_field(chunk).strip()) or "|" in chunk


def _renumber_score(line: str, number: dict[str, str]) -> str:
    """Rewrite voice ids in ``%%score``/``%%staves`` to the new numbers."""
    if not line.startswith(("%%score", "%%staves")) or all(k == v for k, v in number.items()):
        return line
    directive, _, value = line.partition(" ")
    value = re.sub(r"[^\s(){}\[\]|]+", lambda m: number.get(m.group(), m.group()), value)
    return f"{directive} {value}"


def interleave_abc(text: str, warnings: list[str] | None = None) -> str:
    """Interleaved ABC for one standard-ABC tune.

    Identical to the official ``batch_interleaved_abc.py`` wherever that converts the input; see
    the module docstring for the inputs it drops and what happens to them here. When ``warnings``
    is a list, the official alignment check runs and its messages (and how the input was
    rewritten, if it was) are appended. Raises ``ConversionError`` with the reason when the tune
    cannot be interleaved.
    """
    try:
        return _official_steps(_read_lines(text), warnings)
    except ConversionError as official_failure:
        try:
            rewritten = _to_voice_layout(text)
            result = _official_steps(rewritten, warnings)
        except ConversionError as exc:
            if exc.reason == official_failure.reason:
                raise
            raise ConversionError(f"{exc.reason} (as given: {official_failure.reason})",
                                  stage="interleave") from exc
        if warnings is not None:
            warnings.append(f"rewritten into V:n voice layout first ({official_failure.reason})")
        return result


def read_abc_text(path: str | os.PathLike, latin1_fallback: bool = True) -> str:
    """The text of an ABC file: UTF-8, or Latin-1 when it is not valid UTF-8 and the fallback is on.

    Older folk collections are often Latin-1; every byte string decodes as Latin-1, and the
    patchilizer transliterates to ASCII anyway, so the fallback keeps such tunes. Binary files
    (NUL bytes) are reported, never decoded.
    """
    data = Path(path).read_bytes()
    if not data.strip():
        raise ConversionError("empty file", stage="read")
    if b"\x00" in data:
        raise ConversionError("binary data (NUL bytes): not an ABC text file", stage="read")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        if not latin1_fallback:
            raise ConversionError(f"not valid UTF-8 (byte 0x{data[exc.start]:02x} at offset {exc.start})",
                                  stage="read") from exc
        return data.decode("latin-1")


def convert_file(path: str | os.PathLike, latin1_fallback: bool = True) -> str:
    """Interleaved ABC for one ABC file (for the batch runner)."""
    return interleave_abc(read_abc_text(path, latin1_fallback=latin1_fallback))
