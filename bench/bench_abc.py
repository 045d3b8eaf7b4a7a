"""ABC preprocessing speed, single process, with byte identity checked on every file.

(a) MusicXML -> standard ABC: ``preprocess.xml2abc.convert_file`` (in-process) against the official
    approach, one ``python xml2abc.py -d 8 -x <file>`` subprocess per file. The subprocess runs the
    vendored VERSION 143 script, rebuilt in a temporary folder from abctoolkit's bundled copy by
    undoing its one documented change (the ``!stemless!`` statement), so the bytes compared are the
    official ones. (The official script also goes through ``/bin/sh``; the baseline here does not,
    which only makes the baseline faster.) Files the official script cannot read (.mxl archives
    holding a .musicxml score) give no baseline output; they are counted as "extra".
(b) standard ABC -> interleaved ABC: ``preprocess.interleave.convert_file`` against the official
    per-file steps calling abctoolkit 0.0.4 (readlines, field removal, bar-number removal, quote
    clean-up, strip_empty_bars, the alignment check, rotate_abc), on the ABC written by (a).

Data: evenly spaced MusicXML files of music21's bundled corpus (default 100).

    python bench/bench_abc.py [--max_files N] [--repeats R]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from abctoolkit.check import check_alignment_unrotated
from abctoolkit.rotate import rotate_abc
from abctoolkit.utils import (
    Barlines,
    Quote_re,
    remove_bar_no_annotations,
    remove_information_field,
    strip_empty_bars,
)
from preprocess import interleave, xml2abc

DEFAULT_FILES = 100


def corpus_files(max_files: int | None = DEFAULT_FILES) -> list[Path]:
    """Evenly spaced MusicXML files of music21's corpus (sorted, so the same on every machine)."""
    import music21

    root = Path(music21.__file__).parent / "corpus"
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in xml2abc.XML_EXTENSIONS and p.is_file())
    if max_files and max_files < len(files):
        step = len(files) / max_files
        files = [files[int(i * step)] for i in range(max_files)]
    return files


def vendored_script(folder: Path) -> Path:
    """The official vendored xml2abc.py: abctoolkit's copy with its stemless change undone."""
    bundled = Path(xml2abc._x2a.__file__).read_text(encoding="latin-1")
    changed = "note.before += ['!stemless!']; abcOut.stemless = 0;"
    if bundled.count(changed) != 1:
        raise RuntimeError("abctoolkit's xml2abc.py is not the expected 0.0.4 copy")
    script = folder / "xml2abc.py"
    script.write_text(bundled.replace(changed, "note.before += ['s']; abcOut.stemless = 1;"), encoding="latin-1")
    return script


def official_xml2abc(script: Path, path: Path) -> str:
    """One interpreter per file, stdout decoded as UTF-8, exactly what the official script keeps."""
    result = subprocess.run([sys.executable, str(script), "-d", "8", "-x", str(path)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, check=False)
    return result.stdout.decode("utf-8")


def official_interleave(path: Path) -> str | None:
    """The official per-file steps with abctoolkit; None where the official script skips the file."""
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    lines = [line for line in lines if line.strip() != ""]
    lines = remove_information_field(abc_lines=lines, info_fields=["X:", "T:", "C:", "W:", "w:", "Z:", "%%MIDI"])
    try:
        lines = remove_bar_no_annotations(lines)
        for i, line in enumerate(lines):
            if not (re.search(r"^[A-Za-z]:", line) or line.startswith("%")):
                cleaned = line.replace('\\"', "")
                for quoted in re.findall(Quote_re, line):
                    if any(barline in quoted for barline in Barlines):
                        line = line.replace(quoted, "")
                        cleaned = line
                lines[i] = cleaned
        stripped, _ = strip_empty_bars(lines)
        if stripped is None:
            return None
        check_alignment_unrotated(stripped)
        return "".join(rotate_abc(stripped))
    except Exception:  # noqa: BLE001 - the official list wrapper skips the file
        return None


def _timed(convert, items: list, repeats: int) -> tuple[float, list]:
    best, outputs = float("inf"), []
    for _ in range(repeats):
        outputs = []
        start = time.perf_counter()
        for item in items:
            try:
                outputs.append(convert(item))
            except Exception:  # noqa: BLE001 - a rejected file is compared as "no output"
                outputs.append(None)
        best = min(best, time.perf_counter() - start)
    return best, outputs


def _rows(task: str, names: tuple[str, str], files: int, timings: tuple[float, float],
          outputs: tuple[list, list]) -> list[dict]:
    base_out, fast_out = outputs
    compared = [(b, f) for b, f in zip(base_out, fast_out, strict=True) if b]
    identical = sum(b == f for b, f in compared)
    extra = sum(1 for b, f in zip(base_out, fast_out, strict=True) if not b and f)
    rows = []
    for name, seconds, out in zip(names, timings, outputs, strict=True):
        rows.append({
            "task": task, "converter": name, "files": files, "converted": sum(1 for o in out if o),
            "seconds": seconds, "files_per_s": files / seconds, "speedup": timings[0] / seconds,
            "identical": identical, "compared": len(compared), "extra": extra,
        })
    return rows


def run(max_files: int | None = DEFAULT_FILES, repeats: int = 3) -> list[dict]:
    """Time both tasks on the same corpus files; two rows per task (official, this repository)."""
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # one core, subprocesses included
    files = corpus_files(max_files)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        script = vendored_script(tmp)
        # One pass for the subprocess baseline: it is the slow side and its time barely varies.
        base_s, base_abc = _timed(lambda p: official_xml2abc(script, p), files, 1)
        fast_s, fast_abc = _timed(xml2abc.convert_file, files, repeats)
        rows += _rows("MusicXML->ABC", ("official subprocess", "in-process"), len(files), (base_s, fast_s),
                      (base_abc, fast_abc))

        abc_dir = tmp / "abc"
        abc_dir.mkdir()
        abc_files = []
        for i, text in enumerate(fast_abc):
            if text:
                abc_files.append(abc_dir / f"{i:04d}.abc")
                abc_files[-1].write_text(text, encoding="utf-8")
        with contextlib.redirect_stdout(io.StringIO()):  # abctoolkit prints its warnings
            base_s, base_int = _timed(official_interleave, abc_files, repeats)
        fast_s, fast_int = _timed(interleave.convert_file, abc_files, repeats)
        rows += _rows("ABC->interleaved", ("official abctoolkit", "interleave_abc"), len(abc_files),
                      (base_s, fast_s), (base_int, fast_int))
    return rows


def _print_table(rows: list[dict]) -> None:
    header = (f"{'task':<17} {'converter':<20} {'files':>5} {'converted':>9} {'seconds':>8} {'files/s':>8} "
              f"{'speedup':>7} {'identical':>9} {'extra':>5}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['task']:<17} {r['converter']:<20} {r['files']:>5} {r['converted']:>9} {r['seconds']:>8.2f} "
              f"{r['files_per_s']:>8.1f} {r['speedup']:>6.1f}x {r['identical']:>4}/{r['compared']:<4} {r['extra']:>5}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max_files", type=int, default=DEFAULT_FILES, help="0 = all corpus MusicXML files")
    parser.add_argument("--repeats", type=int, default=3, help="best of R passes (in-process and interleaving)")
    args = parser.parse_args()
    results = run(args.max_files or None, args.repeats)
    _print_table(results)
    if any(r["identical"] != r["compared"] for r in results):
        raise SystemExit("outputs differ from the official ones")
