"""Standard ABC -> MusicXML -> standard ABC in xml2abc's ``-d 8 -x`` layout, in-process.

CLaMP 3 was trained on interleaved ABC made from MusicXML by ``xml2abc.py -d 8 -x``: unit length
``L:1/8``, a ``V:1`` voice line, bar-number comments, xml2abc's spelling of decorations, chord
symbols and parts. Plain ABC (folk collections, WikiMT-X lead sheets) is written by hand in many
layouts (``L:1/4`` or ``L:1/16``, comments, ``P:`` sections, ``w:`` lyrics, no voices). The
faithful way to give such tunes the training layout is the round trip the training data went
through for its last leg::

    ABC --abc2xml--> MusicXML --xml2abc -d 8 -x--> ABC --interleave_abc--> interleaved ABC

``abc_to_musicxml`` drives the ``abc2xml`` copy that ``abctoolkit`` bundles (W. G. Vree, VERSION
238) as a library; ``normalise_abc`` adds the second leg with ``preprocess.xml2abc``.

abc2xml is a command-line script whose state lives at module level. Each call here isolates it:

* **A fresh converter object per call.** ``abc2xml.mxm`` (the ``MusicXml`` instance every helper
  reaches through the module global) is replaced by a new one for the duration of the call, so
  nothing a tune sets (metadata, voices, percussion maps...) reaches the next tune.
* **Class-level dictionaries are copied.** A ``U:`` field writes into ``MusicXml.uSyms``, a class
  attribute shared by every instance, so one tune's ``U:T=!fermata!`` would turn every later
  tune's ``T`` (trill) into a fermata. Each converter object gets its own copies, taken from the
  values at import time.
* **``prevloc``**, the module global that remembers where the previous note matched (for beam
  breaks), starts at 0 as in a fresh process; otherwise the first note of a tune would be compared
  with a position in the previous tune.
* **Messages are captured**: ``abc2xml.info`` (its only writer to stderr; it never prints to
  stdout as a library) is replaced for the call, and its messages go to ``messages`` when given.
* **Python warnings** (pyparsing's deprecation notices about abc2xml's API use) are silenced
  for the call.
* **No file access**: ``%%abc-include`` would make abc2xml read a file named by the tune (``-``
  meaning stdin, which blocks a batch worker); includes are ignored, with a message.

Because the module globals are swapped for the duration of a call, calls must not run
concurrently in threads of one process (the batch runner uses processes).

Input contract: one tune per text, with a ``K:`` line ending its header; the rule is
``interleave.check_one_tune``, the one ``interleave_abc`` applies. Several tunes (several ``X:``
lines) raise ``ConversionError`` rather than silently keeping the first one (split collections
first).
Blank lines are dropped before conversion: in ABC a blank line ends a tune, so abc2xml would
silently discard everything after the first one, whereas the direct ``interleave_abc`` path keeps
all lines; dropping them keeps both paths' notes the same.

The MusicXML is what ``abc2xml.py tune.abc`` prints (first tune, default options), including its
``<encoding-date>`` (today's date). xml2abc does not read that date, so ``normalise_abc`` is
deterministic.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from patching import patched
from pyparsing import ParseException

from preprocess.errors import ConversionError, describe_exception
from preprocess.interleave import check_one_tune, interleave_abc, read_abc_text
from preprocess.xml2abc import musicxml_to_abc

with warnings.catch_warnings():
    # Building abc2xml's grammar calls pyparsing's camelCase API (deprecated in pyparsing 3.3).
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    from abctoolkit import abc2xml as _a2x  # NOT abctoolkit.convert: importing it runs a shell command

# Taken before any conversion of ours, so every call starts from abc2xml's defaults.
_CLASS_DICTS = {name: dict(getattr(_a2x.MusicXml, name)) for name in ("uSyms", "metaMap")}

_STOP = (TimeoutError, MemoryError, KeyboardInterrupt)  # the batch runner's limits, not the tune's


class _IsolatedMusicXml(_a2x.MusicXml):
    """abc2xml's converter with private copies of the class dictionaries it mutates.

    ``parse`` remembers the exception it raised: ``getXmlDocs`` swallows every exception (after
    logging it), and the caller needs the real one, both for the reason it reports and to let
    the batch runner's timeout through.
    """

    def __init__(self) -> None:
        for name, value in _CLASS_DICTS.items():
            setattr(self, name, dict(value))  # instance attributes shadow the shared class ones
        self.failure: BaseException | None = None
        super().__init__()

    def parse(self, *args, **kwargs):
        try:
            return super().parse(*args, **kwargs)
        except BaseException as exc:
            self.failure = exc
            raise


def _failure_reason(failure: BaseException | None, log: list[str]) -> str:
    if isinstance(failure, ParseException):
        # A syntax error in the music is logged as the offending line, a caret line and a verdict
        # (the last three unprefixed messages); one in a directive such as %%score is not logged.
        shown = [line.strip() for line in log if not line.startswith("-- ")][-3:]
        detail = " | ".join(shown) if len(shown) == 3 else " ".join(str(failure).split())
        return f"abc2xml cannot parse the tune: {detail}"
    if failure is not None:
        return f"abc2xml failed: {describe_exception(failure)}"
    return "abc2xml produced no score"


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
    converter = _IsolatedMusicXml()

    def refuse_include(path: str, errmsg: str = "") -> None:  # noqa: ARG001 - readfile's signature
        log.append(f"-- %%abc-include {path.strip()} ignored (no file access while converting)")

    def collect(message: str, warn: int = 1) -> None:
        log.append(("-- " if warn else "") + str(message))

    try:
        with patched(_a2x, mxm=converter, info=collect, readfile=refuse_include, prevloc=0):
            with warnings.catch_warnings():
                # abc2xml calls pyparsing's camelCase API, deprecated in pyparsing 3.3: not the tune's fault.
                warnings.filterwarnings("ignore", category=DeprecationWarning)
                docs = _a2x.getXmlDocs(text, skip=0, num=1)
            if isinstance(converter.failure, _STOP):
                raise converter.failure
            if isinstance(converter.failure, RecursionError):
                raise ConversionError("tune structure too deeply nested for abc2xml", stage="abc2xml")
            if not docs:
                raise ConversionError(_failure_reason(converter.failure, log), stage="abc2xml")
            score = docs[0]
            if score.find("part/measure/note") is None:
                raise ConversionError("the tune has no notes or rests (abc2xml wrote an empty score)",
                                      stage="abc2xml")
            xml = _a2x.fixDoctype(score)
    finally:
        if messages is not None:
            messages.extend(log)
    return (xml + "\n").encode("utf-8")


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
