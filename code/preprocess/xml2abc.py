"""MusicXML (``.mxl``, ``.xml``, ``.musicxml``) -> standard ABC, byte-identical to the official
``xml2abc.py -d 8 -x`` (W. G. Vree, VERSION 143), converted in-process.

The official pipeline starts one Python interpreter per file (``subprocess`` + shell). Here the
xml2abc copy that ``abctoolkit`` bundles is imported once and driven as a library:

* **No state leaks between files.** xml2abc keeps its output object in the module global
  ``abcOut`` and its parser state on a ``Parser`` instance; every call installs a fresh pair and
  removes them afterwards, so converting A, B, A gives the same bytes for A both times.
* **Output and messages are captured** without touching ``sys.stdout``/``sys.stderr``: the ABC is
  written to a ``StringIO`` set as the output object's file, and xml2abc's ``info()`` (its only
  writer to stderr) is replaced for the duration of the call.
* **``!stemless!``.** abctoolkit's copy differs from the vendored VERSION 143 in one statement of
  ``Parser.doNote``: for a note whose MusicXML ``<stem>`` is ``none``, the vendored script writes
  the user-defined symbol ``s`` before the note and declares ``U:s=!stemless!`` after the header's
  ``K:`` line; abctoolkit writes ``!stemless!`` and no ``U:`` line. ``_VendoredNote`` and
  ``_VendoredOutput`` restore the vendored behaviour during a conversion (see their docstrings),
  so the bytes match the official ones for such scores too.
* **Speed.** xml2abc looks up child paths such as ``pitch/step`` hundreds of thousands of times;
  the C ``Element.find`` hands every path containing ``/`` to the pure-Python ``ElementPath``
  module, whose selector cache (100 entries) xml2abc's many distinct paths keep flushing. During a
  conversion, ``ElementPath.find/findall/findtext`` get a fast path for plain ``tag/tag`` paths
  that walks the same children in the same order with the C single-tag lookups (same results,
  see tests); other paths go to the original functions.
* **Inputs the official script drops are converted**: an ``.mxl`` whose score member ends in
  ``.musicxml`` (the official code only opens ``*.xml`` members, so ``fobj`` is never set), plain
  ``.musicxml`` files, and files whose content does not match their extension (a zip archive
  named ``.xml``, plain XML named ``.mxl``). For every file the official code converts, the member
  choice and the bytes are the same.
"""

from __future__ import annotations

import io
import os
import re
import types
import zipfile
from pathlib import Path
from xml.etree import ElementPath, ElementTree

from abctoolkit import xml2abc as _x2a  # NOT abctoolkit.convert: importing it runs a shell command
from patching import patched

from preprocess.errors import ConversionError, describe_exception

XML_EXTENSIONS = (".mxl", ".xml", ".musicxml")

# The score member of an .mxl is decompressed in memory; a zip bomb must not take the worker down.
MAX_MEMBER_BYTES = 512 * 2**20

_ZIP_MAGIC = b"PK\x03\x04"


def official_options() -> types.SimpleNamespace:
    """The parsed command line of ``xml2abc.py -d 8 -x`` (optparse leaves unset flags at None)."""
    return types.SimpleNamespace(
        u=None, m=0, c=0, d=8, n=0, b=0, o="", v=0, x=True, p=[], j=None, t=None, s=None,
        v1=None, ped=True, stm=False, i=None,
    )


class _DecorationList(list):
    """``Note.before`` of the vendored script: ``s`` where abctoolkit's copy appends ``!stemless!``.

    abctoolkit's ``doNote`` runs ``note.before += ['!stemless!']; abcOut.stemless = 0``; the
    vendored one runs ``note.before += ['s']; abcOut.stemless = 1``. The token sits at the same
    position of the same list, so translating it on ``+=`` (and flagging the output object, whose
    ``stemless`` then ignores the ``= 0``) reproduces the vendored bytes exactly.
    """

    def __iadd__(self, other):
        other = list(other)
        if other == ["!stemless!"]:
            other = ["s"]
            output = getattr(_x2a, "abcOut", None)
            if isinstance(output, _VendoredOutput):
                output.saw_stemless = True
        return super().__iadd__(other)


class _VendoredNote(_x2a.Note):
    """xml2abc's ``Note`` whose ``before`` list is always a ``_DecorationList``."""

    @property
    def before(self) -> list:
        return self._before

    @before.setter
    def before(self, value: list) -> None:
        # doNote and the slur/ornament code rebind ``before`` to plain lists; keep the hook on.
        self._before = value if isinstance(value, _DecorationList) else _DecorationList(value)


class _VendoredOutput(_x2a.ABCoutput):
    """xml2abc's output object writing to memory, with the vendored ``U:s=!stemless!`` header rule."""

    saw_stemless = False

    @property
    def stemless(self) -> int:
        return 1 if self.saw_stemless else 0

    @stemless.setter
    def stemless(self, value: int) -> None:
        # abctoolkit resets the flag to 0 after every stemless note; the vendored script sets it to 1.
        if value:
            self.saw_stemless = True


_PLAIN_PATH = re.compile(r"[A-Za-z0-9_\-]+(?:/[A-Za-z0-9_\-]+)+")
_plain_paths: dict[str, tuple[str, ...] | None] = {}
_ELEMENTPATH_ORIGINALS = {name: getattr(ElementPath, name) for name in ("find", "findall", "findtext")}


def _plain_tags(path: str, namespaces) -> tuple[str, ...] | None:
    """``("a", "b")`` for a path ``a/b`` of plain tag names, None for anything ElementPath must parse."""
    if namespaces:
        return None
    try:
        return _plain_paths[path]
    except KeyError:
        tags = tuple(path.split("/")) if _PLAIN_PATH.fullmatch(path) else None
        if len(_plain_paths) < 4096:
            _plain_paths[path] = tags
        return tags


def _first_match(elem, tags: tuple[str, ...]):
    # ElementPath's order: every child matching tags[0] in document order, then depth first.
    if len(tags) == 1:
        return elem.find(tags[0])
    for child in elem.findall(tags[0]):
        found = _first_match(child, tags[1:])
        if found is not None:
            return found
    return None


def _all_matches(elem, tags: tuple[str, ...]) -> list:
    level = [elem]
    for tag in tags:
        level = [child for parent in level for child in parent.findall(tag)]
    return level


def _fast_find(elem, path, namespaces=None):
    tags = _plain_tags(path, namespaces)
    if tags is None:
        return _ELEMENTPATH_ORIGINALS["find"](elem, path, namespaces)
    return _first_match(elem, tags)


def _fast_findall(elem, path, namespaces=None):
    tags = _plain_tags(path, namespaces)
    if tags is None:
        return _ELEMENTPATH_ORIGINALS["findall"](elem, path, namespaces)
    return _all_matches(elem, tags)


def _fast_findtext(elem, path, default=None, namespaces=None):
    tags = _plain_tags(path, namespaces)
    if tags is None:
        return _ELEMENTPATH_ORIGINALS["findtext"](elem, path, default, namespaces)
    found = _first_match(elem, tags)
    if found is None:
        return default
    return found.text or ""


_FAST_ELEMENTPATH = {"find": _fast_find, "findall": _fast_findall, "findtext": _fast_findtext}


def _pick_score_member(archive: zipfile.ZipFile) -> str:
    names = archive.namelist()
    # The official rule first (first non-META member ending in .xml), so the same member is read.
    for name in names:
        if name[:4] != "META" and name[-4:].lower() == ".xml":
            return name
    # MusicXML 3+ archives may hold a .musicxml score: the container names the root file.
    if "META-INF/container.xml" in names:
        try:
            container = ElementTree.fromstring(archive.read("META-INF/container.xml"))
            for rootfile in container.iter():
                if rootfile.tag.rsplit("}", 1)[-1] == "rootfile":
                    path = rootfile.get("full-path", "")
                    if path in names and "pdf" not in rootfile.get("media-type", ""):
                        return path
        except ElementTree.ParseError:
            pass  # a broken container: fall through to the name rule
    for name in names:
        if not name.startswith("META") and name.lower().endswith(".musicxml"):
            return name
    raise ConversionError(f"the .mxl archive holds no MusicXML score (members: {', '.join(names[:10])})",
                          stage="read")


def read_musicxml(path: str | os.PathLike) -> bytes:
    """The MusicXML bytes of ``path``: the score member of an archive, or the file itself."""
    path = Path(path)
    with open(path, "rb") as f:
        data = f.read()
    if not data.strip():
        raise ConversionError("empty file", stage="read")
    # Sniff the content rather than trusting the extension (a renamed archive is still a score).
    if not data.startswith(_ZIP_MAGIC):
        if path.suffix.lower() == ".mxl" and not data.lstrip().startswith(b"<"):
            raise ConversionError("not a valid .mxl archive (no zip signature) and not XML", stage="read")
        return data
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            member = _pick_score_member(archive)
            size = archive.getinfo(member).file_size
            if size > MAX_MEMBER_BYTES:
                raise ConversionError(f"score member {member!r} is too large ({size} bytes uncompressed)",
                                      stage="read")
            return archive.read(member)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as exc:
        raise ConversionError(f"not a valid .mxl (zip) archive: {exc or type(exc).__name__}",
                              stage="read") from exc


def _document_problem(data: bytes) -> str | None:
    """Why ``data`` is not a MusicXML document xml2abc can read, or None if it looks like one."""
    try:
        root = ElementTree.fromstring(data)
    except ElementTree.ParseError as parse_error:
        return f"invalid XML: {parse_error}"
    tag = root.tag.rsplit("}", 1)[-1]
    if tag == "score-timewise":
        return "score-timewise MusicXML is not supported by xml2abc (convert it to score-partwise)"
    if tag != "score-partwise":
        return f"not a MusicXML score (root element <{tag}>, expected <score-partwise>)"
    if root.find("part-list") is None:
        return "MusicXML score without a <part-list>"
    return None


def _explain_failure(exc: BaseException, data: bytes) -> str:
    """A reason a person can act on, for an exception raised inside xml2abc's parser."""
    if isinstance(exc, ElementTree.ParseError):
        return f"invalid XML: {exc}"
    return _document_problem(data) or f"xml2abc failed: {describe_exception(exc)}"


def musicxml_to_abc(data: bytes, name: str = "input.xml", messages: list[str] | None = None) -> str:
    """Convert MusicXML bytes to standard ABC exactly as ``xml2abc.py -d 8 -x`` prints it.

    ``name`` only appears in xml2abc's messages, which are appended to ``messages`` when given.
    Raises ``ConversionError`` for invalid XML, non-MusicXML input and scores without notes.
    """
    options = official_options()
    log: list[str] = []
    output = _VendoredOutput(os.path.splitext(name)[0] + ".abc", "", 0, options)
    output.outfile = io.StringIO()

    def collect(text: str, warn: int = 1) -> None:
        log.append(("-- " if warn else "") + text)

    try:
        with (patched(_x2a, abcOut=output, info=collect, Note=_VendoredNote),
              patched(ElementPath, **_FAST_ELEMENTPATH)):
            _x2a.Parser(options).parse(io.BytesIO(data))
    except (TimeoutError, MemoryError, KeyboardInterrupt):
        raise  # the batch runner's own limits, not a property of the file
    except RecursionError as exc:
        raise ConversionError("score structure too deeply nested for xml2abc", stage="convert") from exc
    except Exception as exc:  # noqa: BLE001 - xml2abc raises anything on bad input
        raise ConversionError(_explain_failure(exc, data), stage="convert") from exc
    finally:
        if messages is not None:
            messages.extend(log)
    text = output.outfile.getvalue()
    if not text:
        reason = _document_problem(data) or "the score has no notes (xml2abc wrote nothing)"
        raise ConversionError(reason, stage="convert")
    return text


def convert_file(path: str | os.PathLike, messages: list[str] | None = None) -> str:
    """Standard ABC for one MusicXML file (``.mxl``, ``.xml`` or ``.musicxml``)."""
    return musicxml_to_abc(read_musicxml(path), name=os.fspath(path), messages=messages)

