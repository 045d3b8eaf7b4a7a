"""Standard ABC -> MusicXML -> standard ABC in xml2abc's ``-d 8 -x`` layout, in-process.

CLaMP 3 was trained on interleaved ABC made from MusicXML by ``xml2abc.py -d 8 -x``: unit length
``L:1/8``, a ``V:1`` voice line, bar-number comments, xml2abc's spelling of decorations, chord
symbols and parts. Plain ABC (folk collections, WikiMT-X lead sheets) is written by hand in many
layouts (``L:1/4`` or ``L:1/16``, comments, ``P:`` sections, ``w:`` lyrics, no voices). The
faithful way to give such tunes the training layout is the round trip the training data went
through for its last leg::

    ABC --abc2xml--> MusicXML --xml2abc -d 8 -x--> ABC --interleave_abc--> interleaved ABC

``abc_to_musicxml`` drives ``preprocess.abc2xml`` (the ``abc2xml`` copy that ``abctoolkit`` bundles,
W. G. Vree, VERSION 238, run in-process with its state isolated per call; see there);
``normalise_abc`` adds the second leg with ``preprocess.xml2abc``.

Input contract: one tune per text, with a ``K:`` line ending its header; the rule is
``interleave.check_one_tune``, the one ``interleave_abc`` applies. Several tunes (several ``X:``
lines) raise ``ConversionError`` rather than silently keeping the first one (split collections
first).
Blank lines are dropped before conversion: in ABC a blank line ends a tune, so abc2xml would
silently discard everything after the first one, whereas the direct ``interleave_abc`` path keeps
all lines; dropping them keeps both paths' notes the same.

The MusicXML is what ``abc2xml.py tune.abc`` prints for the checked text (``abc2xml.convert_text``,
which the batch tool ``batch_abc2xml.py`` applies without these checks), including its
``<encoding-date>`` (today's date); xml2abc does not read that date, so ``normalise_abc`` is
deterministic. ``%%abc-include`` lines are ignored: no file is read while converting.
"""

from __future__ import annotations

from pathlib import Path

from preprocess.abc2xml import parse_first_tune, score_bytes
from preprocess.errors import ConversionError
from preprocess.interleave import check_one_tune, interleave_abc, read_abc_text
from preprocess.xml2abc import musicxml_to_abc


def abc_to_musicxml(text: str, messages: list[str] | None = None) -> bytes:
    """MusicXML (UTF-8 bytes) of one standard-ABC tune, as ``abc2xml.py tune.abc`` prints it.

    abc2xml's warnings (skipped header fields, misplaced symbols it dropped...) are appended to
    ``messages`` when given; nothing is printed. Raises ``ConversionError`` (stage ``abc2xml``)
    for empty input, several tunes in one text, a text without a ``K:`` line, ABC that abc2xml
    cannot parse, and tunes without notes.
    """
    lines = [line for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n") if line.strip()]
    if not lines:
        raise ConversionError("empty ABC text", stage="abc2xml")
    text = "\n".join(lines) + "\n"
    check_one_tune(lines, stage="abc2xml")  # the same rule as interleave_abc

    log: list[str] = []
    try:
        score = parse_first_tune(text, log)
    finally:
        if messages is not None:
            messages.extend(log)
    if score.find("part/measure/note") is None:
        raise ConversionError("the tune has no notes or rests (abc2xml wrote an empty score)", stage="abc2xml")
    return score_bytes(score)


def normalise_abc(text: str, messages: list[str] | None = None) -> str:
    """One standard-ABC tune rewritten by the MusicXML round trip into xml2abc's ``-d 8 -x`` layout.

    The result is what the training pipeline's first leg would have produced had the tune been
    engraved as MusicXML; feed it to ``interleave_abc``. Messages of both converters are appended
    to ``messages`` when given. Raises ``ConversionError`` (stage ``abc2xml`` or ``convert``).
    """
    return musicxml_to_abc(abc_to_musicxml(text, messages=messages), name="tune.xml", messages=messages)


def convert_file(path: str | Path, latin1_fallback: bool = True) -> str:
    """Interleaved ABC for one plain-ABC file, normalised first (for the batch runner)."""
    return interleave_abc(normalise_abc(read_abc_text(path, latin1_fallback=latin1_fallback)))
