"""Cleaning the values of metadata records (CSV cells, JSON fields) into text a record can hold.

Every metadata source the project reads (PDMX, MidiCaps, WikiMT-X) spells "no value" in its own
ways (NaN, "nan", "None", "[]", "NA", empty strings) and stores lists either as lists or as their
Python repr. These helpers turn any of them into clean strings, lists of strings, or None.
"""

from __future__ import annotations

import ast
import math
import re
import unicodedata
from collections.abc import Iterable
from typing import Any

# Spellings of "no value" that survive a CSV round trip of Python/pandas objects.
_NULL_STRINGS = {"", "nan", "none", "null", "nat", "<na>", "[]", "{}", "()", "''", '""', "n/a"}
_TRUE_STRINGS = {"true", "1", "1.0", "yes", "t", "y"}
_FALSE_STRINGS = {"false", "0", "0.0", "no", "f", "n", ""}

# PDMX's own wrangling code stores genres/groups/tags as lower-case letters-only items joined by "-"
# ("classical-piano"); the letters-only rule means a "-" there can only be a separator.
_DASH_JOINED = re.compile(r"^[a-z]+(?:-[a-z]+)+$")


def is_null(value: Any) -> bool:
    """True for None, NaN and NaN-like values (pandas.NA, NaT)."""
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    try:  # pandas.NA / NaT without importing pandas here
        return bool(value != value)  # noqa: PLR0124 - NaN-like values are not equal to themselves
    except (TypeError, ValueError):
        return False


def clean_text(value: Any) -> str | None:
    """One text value with whitespace collapsed, or None for every spelling of "missing"."""
    if is_null(value):
        return None
    text = " ".join(str(value).split())
    # "NA" is the missing-value marker PDMX's wrangling code writes; only the upper-case spelling
    # is treated as missing so that a real word such as "Na" survives.
    if text.casefold() in _NULL_STRINGS or text == "NA":
        return None
    return text


def dedupe(values: Iterable[str | None]) -> list[str]:
    """Drop None and repeats (compared case-insensitively), keeping the first spelling and order."""
    seen: set[str] = set()
    out = []
    for value in values:
        if value is None:
            continue
        key = value.casefold()
        if key not in seen:
            seen.add(key)
            out.append(value)
    return out


def parse_list(value: Any, dash_joined: bool = False) -> list[str]:
    """A list-valued cell ("['a', 'b']", '["a"]', "a, b" inside brackets, or a plain "a") as clean,
    case-insensitively deduplicated strings in their first-seen order. With ``dash_joined``, a
    PDMX-style "classical-piano" is split too."""
    if isinstance(value, (list, tuple)):
        items: list[Any] = list(value)
    else:
        text = clean_text(value)
        if text is None:
            return []
        items = [text]
        if dash_joined and _DASH_JOINED.match(text):
            items = text.split("-")
        elif text.startswith("[") and text.endswith("]"):
            try:
                parsed = ast.literal_eval(text)
            except (ValueError, SyntaxError, MemoryError, RecursionError):
                # Not a Python literal (e.g. unquoted words): fall back to splitting on commas.
                parsed = [part.strip().strip("'\"") for part in text[1:-1].split(",")]
            items = list(parsed) if isinstance(parsed, (list, tuple, set)) else [parsed]
    return dedupe(clean_text(item) for item in items)


def parse_bool(value: Any) -> bool:
    """A flag: a real boolean, or "True"/"False"/"1"/"0" text; missing counts as False."""
    if isinstance(value, bool):
        return value
    if is_null(value):
        return False
    if isinstance(value, (int, float)):
        return bool(value)
    text = str(value).strip().casefold()
    if text in _TRUE_STRINGS:
        return True
    if text in _FALSE_STRINGS:
        return False
    raise ValueError(f"not a boolean: {value!r}")



def piece_hash(seed: int, piece_id: str) -> bytes:
    """A seeded SHA-256 of a piece id: the one rule behind every split and selection by piece
    (training/validation split, test-set order, demo splits), independent of the records' order."""
    import hashlib

    return hashlib.sha256(f"{seed}\x00{piece_id}".encode("utf-8", "surrogatepass")).digest()


def same_text_key(text: str) -> str:
    """What two texts share when they read the same: NFKC, casefolded, whitespace collapsed."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())
