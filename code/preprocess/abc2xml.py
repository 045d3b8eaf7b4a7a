"""ABC (standard or interleaved) -> MusicXML, as the official ``utils/abc2xml.py "<file>"`` prints it,
converted in-process.

The official ``batch_abc2xml.py`` starts one interpreter per file, runs abc2xml with its default
options and keeps stdout as ``<stem>.xml``. What that means for one file, and what
``convert_file`` therefore does:

* **Decoding**: UTF-8, or Latin-1 when the bytes are not valid UTF-8 (abc2xml's ``decodeInput``).
* **The whole text goes to abc2xml**, blank lines included (in ABC a blank line ends a tune, so
  abc2xml ignores what follows one), and without a ``K:`` check: whatever abc2xml makes of it,
  a score without notes included, is the output.
* **Only the first tune** of a file with several ``X:`` tunes is converted (abc2xml's default
  ``-m 0 1``); text before the first ``X:`` is kept in front of it; a text without ``X:`` is one
  tune. A message says how many tunes were left out.
* **No output** when abc2xml converts nothing (a syntax error, an exception inside abc2xml): the
  official script writes no file and logs the path; here ``ConversionError`` carries the reason.

Where the bytes differ from the official files: the official repository vendors abc2xml VERSION 245;
the copy used here is the one ``abctoolkit`` bundles (VERSION 238, the only one a package registry
offers). On every official fixture the two write the same MusicXML except for the version number in
``<encoder>abc2xml version N</encoder>``; ``<encoding-date>`` is the day of the conversion in both.
``%%abc-include`` lines are ignored (with a message) instead of reading the named file relative to
the working directory (``-`` would read standard input and block a batch worker).

abc2xml is a command-line script whose state lives at module level, and a fresh process gives
every official conversion a fresh state. Each call here isolates it instead:

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
* **Python warnings** (pyparsing's deprecation notices about abc2xml's API use) are silenced.

Because the module globals are swapped for the duration of a call, calls must not run
concurrently in threads of one process (the batch runner uses processes).
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from xml.etree import ElementTree

from patching import patched
from pyparsing import ParseException

from preprocess.errors import ConversionError, describe_exception

with warnings.catch_warnings():
    # Building abc2xml's grammar calls pyparsing's camelCase API (deprecated in pyparsing 3.3).
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    from abctoolkit import abc2xml as _a2x  # NOT abctoolkit.convert: importing it runs a shell command

ABC_EXTENSIONS = (".abc",)

# Taken before any conversion of ours, so every call starts from abc2xml's defaults.
_CLASS_DICTS = {name: dict(getattr(_a2x.MusicXml, name)) for name in ("uSyms", "metaMap")}

_STOP = (TimeoutError, MemoryError, KeyboardInterrupt)  # the batch runner's limits, not the tune's

# How abc2xml's getXmlDocs cuts a text into tunes.
_TUNE_START = re.compile(r"^\s*X:", flags=re.M)


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


def parse_first_tune(text: str, log: list[str]) -> ElementTree.Element:
    """The MusicXML tree abc2xml builds for the first tune of ``text`` (``getXmlDocs(text, 0, 1)``,
    its command line's default), on an isolated converter. abc2xml's messages are appended to
    ``log``. Raises ``ConversionError`` (stage ``abc2xml``) when it converts nothing; the batch
    runner's limits (timeout, memory, Ctrl-C) propagate as they are."""
    converter = _IsolatedMusicXml()

    def refuse_include(path: str, errmsg: str = "") -> None:  # noqa: ARG001 - readfile's signature
        log.append(f"-- %%abc-include {path.strip()} ignored (no file access while converting)")

    def collect(message: str, warn: int = 1) -> None:
        log.append(("-- " if warn else "") + str(message))

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
    return docs[0]


def score_bytes(score: ElementTree.Element) -> bytes:
    """A MusicXML tree as abc2xml prints it to stdout: declaration, doctype, the tree, a newline."""
    return (_a2x.fixDoctype(score) + "\n").encode("utf-8")


def convert_text(text: str, messages: list[str] | None = None) -> bytes:
    """What ``abc2xml.py file.abc`` prints for a file holding ``text`` (see the module docstring):
    the first tune's MusicXML as UTF-8 bytes. abc2xml's messages are appended to ``messages`` when
    given; nothing is printed. Raises ``ConversionError`` (stage ``abc2xml``) when abc2xml writes
    nothing."""
    log: list[str] = []
    try:
        score = parse_first_tune(text, log)
        tunes = len(_TUNE_START.findall(text))
        if tunes > 1:
            log.append(f"-- {tunes} tunes in the text: only the first is converted (abc2xml's default -m 0 1)")
        return score_bytes(score)
    finally:
        if messages is not None:
            messages.extend(log)


def read_abc_file(path: str | os.PathLike) -> str:
    """The text of an ABC file as abc2xml reads it: UTF-8, or Latin-1 when the bytes are not valid
    UTF-8 (every byte string is valid Latin-1)."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def convert_file(path: str | os.PathLike, messages: list[str] | None = None) -> bytes:
    """MusicXML for one ABC file, as the official ``abc2xml.py "<file>"`` prints it (for the batch
    runner, which logs the ``ConversionError`` of a file that gets no output)."""
    return convert_text(read_abc_file(path), messages=messages)
