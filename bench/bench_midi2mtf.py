"""MIDI -> MTF speed: ``preprocess.midi_mtf.midi_to_mtf`` against the straightforward mido conversion.

The baseline is the official algorithm written the obvious way (``mido.MidiFile`` +
``merged_track`` + ``msg.dict()`` per message). Both run in this one process, pinned to one core
where the OS allows it, on the same files; every output of the fast converter is compared byte for
byte with the baseline's, and any difference is reported.

Data: the MIDI files shipped in the music21 wheel, plus music21 corpus scores rendered to MIDI once
and cached under ``data/bench/midi/`` (git-ignored; rendering stops after about 90 s).

    python bench/bench_midi2mtf.py [--max_files N] [--repeats R]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import mido
from preprocess.midi_mtf import M3_SKIPPED_META_TYPES, midi_to_mtf

REPO_ROOT = Path(__file__).resolve().parent.parent
CACHE_DIR = REPO_ROOT / "data" / "bench" / "midi"
RENDER_BUDGET_S = 90.0

# Larger multi-part movements first (they take seconds each), then short chorales.
_LARGE_SCORES = [
    "beethoven/opus18no1/movement1", "haydn/opus74no1/movement1", "mozart/k80/movement1",
    "mozart/k155/movement1", "schumann_robert/opus41no1/movement1", "bach/bwv1080/01",
    "corelli/opus3no1/1grave", "monteverdi/madrigal.3.1",
]
_CHORALE_COUNT = 120


def baseline_midi_to_mtf(path: str | os.PathLike, m3_compatible: bool) -> str:
    """The official conversion, written the straightforward way with mido."""
    mid = mido.MidiFile(path)
    lines = [f"ticks_per_beat {mid.ticks_per_beat}"]
    for msg in mid.merged_track:
        if m3_compatible and msg.type in M3_SKIPPED_META_TYPES:
            continue
        line = " ".join(str(value) for value in msg.dict().values())
        lines.append(line.encode("unicode_escape").decode("utf-8"))
    return "\n".join(lines)


def _render_corpus(cache_dir: Path, budget_s: float) -> None:
    """Write music21 corpus scores as MIDI into ``cache_dir`` until the time budget is spent."""
    from music21 import corpus

    cache_dir.mkdir(parents=True, exist_ok=True)
    names = list(_LARGE_SCORES)
    names += [str(p) for p in corpus.getComposer("bach")[:_CHORALE_COUNT]]
    start = time.perf_counter()
    for name in names:
        target = cache_dir / (Path(name).with_suffix("").as_posix().split("corpus/")[-1].replace("/", "_") + ".mid")
        if target.exists():
            continue
        if time.perf_counter() - start > budget_s:
            print(f"render budget of {budget_s:.0f} s spent; using what is cached")
            break
        try:
            score = corpus.parse(name)
            tmp = target.with_name(target.name + ".part")
            score.write("midi", fp=str(tmp))
            tmp.replace(target)
        except Exception as exc:  # noqa: BLE001 - a score music21 cannot render is just left out
            print(f"skipped {name}: {type(exc).__name__}: {exc}")
    (cache_dir / ".complete").touch()


def bench_files(max_files: int | None = None) -> list[Path]:
    """The benchmark's MIDI files (rendering the corpus part on first use)."""
    import music21

    if not (CACHE_DIR / ".complete").exists():
        _render_corpus(CACHE_DIR, RENDER_BUDGET_S)
    shipped = sorted(Path(music21.__file__).parent.rglob("*.mid"))
    files = shipped + sorted(CACHE_DIR.glob("*.mid"))
    return files[:max_files] if max_files else files


def _time_converter(convert, files: list[Path], m3_compatible: bool, repeats: int) -> tuple[float, list]:
    best = float("inf")
    outputs: list = []
    for _ in range(repeats):
        outputs = []
        start = time.perf_counter()
        for path in files:
            try:
                outputs.append(convert(path, m3_compatible))
            except Exception as exc:  # noqa: BLE001 - a rejected file must be rejected by both
                outputs.append(exc)
        best = min(best, time.perf_counter() - start)
    return best, outputs


def run(max_files: int | None = None, repeats: int = 3) -> list[dict]:
    """Time both converters on the same files, with and without ``m3_compatible``; one row each."""
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # one core
    files = bench_files(max_files)
    total_bytes = sum(p.stat().st_size for p in files)
    rows = []
    for m3_compatible in (True, False):
        base_s, base_out = _time_converter(baseline_midi_to_mtf, files, m3_compatible, repeats)
        fast_s, fast_out = _time_converter(midi_to_mtf, files, m3_compatible, repeats)
        identical = sum(
            (b == f) if isinstance(b, str) else not isinstance(f, str) for b, f in zip(base_out, fast_out, strict=True)
        )
        lines = sum(out.count("\n") + 1 for out in base_out if isinstance(out, str))
        for name, seconds in (("mido baseline", base_s), ("midi_mtf", fast_s)):
            rows.append({
                "converter": name, "m3_compatible": m3_compatible, "files": len(files),
                "mib": total_bytes / 2**20, "mtf_lines": lines, "seconds": seconds,
                "files_per_s": len(files) / seconds, "lines_per_s": lines / seconds,
                "speedup": base_s / seconds, "identical": identical,
            })
    return rows


def _print_table(rows: list[dict]) -> None:
    header = (f"{'converter':<14} {'m3':<5} {'files':>5} {'MiB':>6} {'MTF lines':>10} {'seconds':>8} "
              f"{'files/s':>8} {'lines/s':>9} {'speedup':>7} {'identical':>9}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['converter']:<14} {str(r['m3_compatible']):<5} {r['files']:>5} {r['mib']:>6.2f} "
              f"{r['mtf_lines']:>10} {r['seconds']:>8.3f} {r['files_per_s']:>8.1f} {r['lines_per_s']:>9.0f} "
              f"{r['speedup']:>6.1f}x {r['identical']:>5}/{r['files']}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max_files", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3, help="best of R timed passes")
    args = parser.parse_args()
    results = run(args.max_files, args.repeats)
    _print_table(results)
    if any(r["identical"] != r["files"] for r in results):
        raise SystemExit("outputs differ from the mido baseline")
