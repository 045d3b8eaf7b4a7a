"""WikiMT-X loader: lead sheets through the training interleaving, texts split per type.

Input: the WikiMT-X JSONL (keys ``leadsheet, title, artists, genre, background, analysis,
description, scene``). Output under ``output_dir``::

    abc/<id>.abc                   the lead sheet as interleaved ABC (``interleave_abc``)
    text/<text_type>/<id>.txt      one file per piece and text type (background, analysis,
                                   description, scene); missing texts are left out
    wikimt.jsonl                   {"id", "filepaths": ["abc/<id>.abc"], "normalisation", "title",
                                    "artists", "genre", "background", "analysis", "description",
                                    "scene"}
    wikimt_failures.jsonl          {"line", "id", "title", "reason"} for every piece left out (a
                                   piece without a usable id or title has no such field)

Lead sheets must reach the model in the layout of the training data, which xml2abc (``-d 8 -x``)
wrote from MusicXML. So by default each lead sheet first makes the round trip ABC -> MusicXML ->
ABC (``preprocess.abc_normalise.normalise_abc``) and is then interleaved; ``"normalisation":
"musicxml_roundtrip"`` in its record says so. A lead sheet the round trip cannot convert is
interleaved as written (``"direct"``), as is every piece when ``roundtrip=False``; a piece is only
reported as failed when direct interleaving fails too (the reason then names both failures).

``id`` is the record's own ``id`` when it has one, otherwise its position among the records,
zero-padded (``0000``, ``0001``, ...), so ids are stable for a given file. A piece that fails is
reported and the rest goes on; outputs of a failed piece left by an earlier run are removed, so the
folder never pairs a text with stale music.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from fileio import DropLog, atomic_write_text, write_jsonl
from records import clean_text, parse_list
from tqdm import tqdm

from preprocess import abc_normalise
from preprocess.errors import ConversionError, describe_exception
from preprocess.interleave import interleave_abc

TEXT_TYPES = ("background", "analysis", "description", "scene")
RECORDS_NAME = "wikimt.jsonl"
FAILURES_NAME = "wikimt_failures.jsonl"
ROUNDTRIP = "musicxml_roundtrip"
DIRECT = "direct"
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")


class WikiMTError(Exception):
    """An input that cannot be read at all; names the file."""


@dataclass
class WikiMTSummary:
    pieces: int = 0
    written: int = 0
    direct: int = 0  # written pieces interleaved without the MusicXML round trip
    missing_text: Counter = field(default_factory=Counter)  # text type -> pieces without it
    failures: DropLog = field(default_factory=lambda: DropLog("wikimt"))

    @property
    def failed(self) -> int:
        return len(self.failures)

    def lines(self) -> list[str]:
        out = [f"pieces read: {self.pieces}", f"written: {self.written}", f"failed: {self.failed}"]
        if self.direct:
            out.append(f"written without the MusicXML round trip: {self.direct}")
        # Reasons quote the tune; a summary line shows the start of each.
        shown: Counter = Counter()
        for reason, n in self.failures.counts.items():
            shown[reason[:120]] += n
        out += [f"  {reason}: {n}" for reason, n in sorted(shown.items())]
        if self.missing_text:
            out.append("pieces without a text: " + ", ".join(f"{t} {n}" for t, n in sorted(self.missing_text.items())))
        return out


def read_lines(path: str | os.PathLike) -> list[tuple[int, str]]:
    """(line number, text) of every non-blank line. Each line is parsed on its own (not with
    ``fileio.iter_jsonl``, which stops at the first bad line): a line that is not a JSON object
    is one piece that fails, and the others are still prepared."""
    path = Path(path)
    if not path.is_file():
        raise WikiMTError(f"WikiMT-X file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise WikiMTError(f"{path}: not UTF-8 (byte {exc.start})") from exc
    return [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]


def text_value(value: object) -> str | list[str] | None:
    """A clean metadata value: a string, a list of strings, or None when empty."""
    if isinstance(value, list):
        items = parse_list(value)
        return items or None
    return clean_text(value)


def long_text(value: object) -> str | None:
    """A long English text with its line breaks kept (only surrounding blank space trimmed)."""
    if not isinstance(value, str):
        return None
    text = value.strip()
    return text if clean_text(text) is not None else None


def _interleave(leadsheet: str, normalise: bool) -> str:
    try:
        abc = interleave_abc(abc_normalise.normalise_abc(leadsheet) if normalise else leadsheet)
    except ConversionError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure of one lead sheet is reported, not fatal
        raise ConversionError(describe_exception(exc), stage="interleave") from exc
    if not abc.strip():
        raise ConversionError("interleaving produced no output", stage="interleave")
    return abc


def convert_piece(obj: dict, roundtrip: bool = True) -> tuple[str, dict[str, str], str]:
    """(interleaved ABC, {text type: text}, normalisation) of one record.

    ``normalisation`` is ``ROUNDTRIP`` or ``DIRECT`` (see the module docstring). Raises
    ConversionError with a reason when the lead sheet cannot be interleaved either way.
    """
    leadsheet = obj.get("leadsheet")
    if not isinstance(leadsheet, str) or not leadsheet.strip():
        raise ConversionError("no leadsheet", stage="read")
    roundtrip_failure = None
    abc = None
    normalisation = DIRECT
    if roundtrip:
        try:
            abc, normalisation = _interleave(leadsheet, normalise=True), ROUNDTRIP
        except ConversionError as exc:
            roundtrip_failure = exc
    if abc is None:
        try:
            abc = _interleave(leadsheet, normalise=False)
        except ConversionError as exc:
            if roundtrip_failure is None:
                raise
            raise ConversionError(f"{exc.reason} (MusicXML round trip: {roundtrip_failure.stage}: "
                                  f"{roundtrip_failure.reason})", stage=exc.stage) from exc
    texts = {t: v for t in TEXT_TYPES if (v := long_text(obj.get(t))) is not None}
    return abc, texts, normalisation


def _remove_outputs(output_dir: Path, pid: str) -> None:
    for path in [output_dir / "abc" / f"{pid}.abc"] + [output_dir / "text" / t / f"{pid}.txt" for t in TEXT_TYPES]:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def prepare(input_path: str | os.PathLike, output_dir: str | os.PathLike, progress: bool = True,
            roundtrip: bool = True) -> WikiMTSummary:
    """Convert every piece of the JSONL; see the module docstring for the layout.

    ``roundtrip=False`` interleaves the lead sheets as written, without the MusicXML round trip.
    """
    lines = read_lines(input_path)
    output_dir = Path(output_dir)
    summary = WikiMTSummary(pieces=len(lines))
    failures = summary.failures
    records: list[dict] = []
    seen: set[str] = set()
    width = max(4, len(str(len(lines) - 1)))

    for index, (number, line) in enumerate(tqdm(lines, desc="WikiMT-X", unit="piece", disable=not progress,
                                                dynamic_ncols=True)):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            failures.add(f"not valid JSON: {exc.msg}", line=number)
            continue
        if not isinstance(obj, dict):
            failures.add("not a JSON object", line=number)
            continue
        own_id = obj.get("id")
        pid = str(own_id).strip() if own_id is not None and str(own_id).strip() else f"{index:0{width}d}"
        title = obj.get("title") if isinstance(obj.get("title"), str) else None
        if not _SAFE_ID.match(pid):
            failures.add(f"id {pid!r} is not usable as a file name", line=number, title=title)
            continue
        if pid in seen:
            failures.add(f"duplicate id {pid!r}", line=number, title=title)
            continue
        seen.add(pid)
        try:
            abc, texts, normalisation = convert_piece(obj, roundtrip=roundtrip)
        except ConversionError as exc:
            failures.add(f"{exc.stage}: {exc.reason}", line=number, id=pid, title=title)
            _remove_outputs(output_dir, pid)  # never pair its texts with music from an earlier run
            continue
        atomic_write_text(output_dir / "abc" / f"{pid}.abc", abc)
        for text_type in TEXT_TYPES:
            target = output_dir / "text" / text_type / f"{pid}.txt"
            if text_type in texts:
                atomic_write_text(target, texts[text_type])
            else:
                summary.missing_text[text_type] += 1
                if target.exists():  # stale from an earlier run of a different file
                    target.unlink()
        record: dict = {"id": pid, "filepaths": [f"abc/{pid}.abc"], "normalisation": normalisation}
        if normalisation == DIRECT and roundtrip:
            summary.direct += 1
        for key in ("title", "artists", "genre"):
            value = text_value(obj.get(key))
            if value is not None:
                record[key] = value
        record.update(texts)
        records.append(record)
        summary.written += 1
    write_jsonl(output_dir / RECORDS_NAME, records)
    failures.write(output_dir / FAILURES_NAME)
    return summary
