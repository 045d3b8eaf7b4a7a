"""Why a file could not be converted: ``ConversionError`` and one way to word any exception.

The converters (xml2abc, abc2xml, interleaving, MIDI <-> MTF) and the batch runner report every
failure as one line a person can act on. Converter-specific explanations (a document that is not
MusicXML, abc2xml's parse messages) are built on top of ``describe_exception``.
"""

from __future__ import annotations


class ConversionError(Exception):
    """Bad input, with the stage where it was found and a reason a person can act on."""

    def __init__(self, reason: str, stage: str = "convert"):
        super().__init__(reason)
        self.reason = reason
        self.stage = stage


# Many parsers raise these without a message; the type alone says little to a person.
_EMPTY_MESSAGE_HINTS = {
    "EOFError": "unexpected end of file (truncated or empty input)",
    "KeyError": "missing key",
    "IndexError": "index out of range",
    "StopIteration": "unexpected end of data",
    "TimeoutError": "conversion timed out",
    "MemoryError": "out of memory",
}


def describe_exception(exc: BaseException) -> str:
    """A non-empty, one-line reason for ``exc``: ``Type: message`` (a hint where the message is empty),
    or the reason of a ``ConversionError``."""
    if isinstance(exc, ConversionError):
        return exc.reason
    name = type(exc).__name__
    message = " ".join(str(exc).split())
    if not message:
        message = _EMPTY_MESSAGE_HINTS.get(name, "no message")
    return f"{name}: {message}"
