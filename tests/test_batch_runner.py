"""The MIDI batch scripts end to end (real files, real processes): failure log, resume, sharding,
odd file names, --strict, and no leftover temporary files; and the runner surviving workers that die."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fileio import failure_log_path
from helpers import OFFICIAL, REPO_ROOT, load_script
from preprocess import batch

MIDI2MTF = REPO_ROOT / "preprocessing" / "midi" / "batch_midi2mtf.py"
MTF2MIDI = REPO_ROOT / "preprocessing" / "midi" / "batch_mtf2midi.py"
XML2ABC = REPO_ROOT / "preprocessing" / "abc" / "batch_xml2abc.py"
INTERLEAVE = REPO_ROOT / "preprocessing" / "abc" / "batch_interleaved_abc.py"
ABC2XML = REPO_ROOT / "preprocessing" / "abc" / "batch_abc2xml.py"
SCRIPTS = [MIDI2MTF, MTF2MIDI, XML2ABC, INTERLEAVE, ABC2XML, *sorted((REPO_ROOT / "preprocessing").glob("*.py"))]
MID_DIR = OFFICIAL / "inputs" / "mid"
MTF_DIR = OFFICIAL / "outputs" / "mtf"

# Relative input path -> official fixture it is a copy of. Names a shell would mangle on purpose.
GOOD_FILES = {
    "plain.mid": "m21test_test01.mid",
    "sub dir/it's $HOME [1] (x).MID": "edge_multitrack_8.mid",
    'quotes "double" & `tick`;rm -rf x.mid': "edge_sysex_pitchwheel_cc.mid",
    "ünïcødé/naïve fïlé.Midi": "m21write_demos_drum_sample.mid",
    "a.b.c.midi": "edge_type1_text_metas.mid",
    "nested/deeper/-leading-dash.mid": "m21test_test16.mid",
}
BAD_FILES = ["bad/empty.mid", "bad/random.mid", "bad/truncated.mid", "bad/huge.mid"]
# How long the converter below sleeps for hang.x; a timed-out worker must be cut off well before.
HANG_S = 60


def mtf_name(relative: str) -> str:
    return relative.rsplit(".", 1)[0] + ".mtf"


@pytest.fixture
def input_dir(tmp_path: Path, official_dir) -> Path:
    root = tmp_path / "in put"
    for relative, fixture in GOOD_FILES.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(MID_DIR / fixture, root / relative)
    (root / "bad").mkdir()
    (root / "bad/empty.mid").write_bytes(b"")
    shutil.copyfile(MID_DIR / "malformed_random.mid", root / "bad/random.mid")
    (root / "bad/truncated.mid").write_bytes((MID_DIR / "m21test_test06.mid").read_bytes()[:500])
    # Over the --max_mb limit the tests pass (0.05 MiB).
    (root / "bad/huge.mid").write_bytes((MID_DIR / "m21test_test01.mid").read_bytes() + bytes(80_000))
    (root / "notes.txt").write_text("not a MIDI file")
    (root / ".hidden.mid").write_bytes(b"")
    return root


def run_script(script: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(script), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONIOENCODING": "utf-8"})


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def script_arguments(script: Path, tmp_path: Path) -> list[str]:
    """Arguments that are valid for ``script`` (its required ones), so only the extra flag is wrong."""
    if script.parent.name in ("midi", "abc"):
        return [str(tmp_path), str(tmp_path / "out")]
    required = {"parse_midicaps.py": ["--input", "x.csv", "--midi_root", "m"], "prepare_wikimt.py": ["--input", "x"]}
    return required.get(script.name, [])


def leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and (p.name.startswith(".") or p.suffix != ".mtf")]


@pytest.mark.slow
@pytest.mark.parametrize("script", [MIDI2MTF, MTF2MIDI], ids=lambda p: p.name)
def test_help_from_another_directory(script, tmp_path):
    result = run_script(script, "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "--num_shards" in result.stdout and "--strict" in result.stdout


@pytest.mark.slow
def test_batch_logs_bad_files_converts_good_ones_and_resumes(input_dir, tmp_path):
    out, log = tmp_path / "out", tmp_path / "logs" / "errors.jsonl"
    args = [str(input_dir), str(out), "--m3_compatible", "--workers", "2", "--max_mb", "0.05",
            "--error_log", str(log), "--quiet"]
    first = run_script(MIDI2MTF, *args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert "6 converted, 0 skipped (already done), 4 failed" in first.stdout

    for relative, fixture in GOOD_FILES.items():
        assert (out / mtf_name(relative)).read_bytes() == (MTF_DIR / mtf_name(fixture)).read_bytes(), relative
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.mtf")) == sorted(map(mtf_name, GOOD_FILES))
    assert leftovers(out) == []

    records = read_log(log)
    assert sorted(Path(r["file"]).relative_to(input_dir).as_posix() for r in records) == sorted(BAD_FILES)
    for record in records:
        assert record["stage"] and record["reason"].strip(), record
    reasons = {Path(r["file"]).name: r["reason"] for r in records}
    assert "empty" in reasons["empty.mid"]
    assert "MThd" in reasons["random.mid"]
    assert "truncated" in reasons["truncated.mid"]
    assert "too large" in reasons["huge.mid"]

    # Resume: finished files are skipped, the failing ones are tried (and logged) again.
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.mtf")}
    second = run_script(MIDI2MTF, *args, cwd=tmp_path)
    assert second.returncode == 0
    assert "0 converted, 6 skipped (already done), 4 failed" in second.stdout
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.mtf")} == before
    assert len(read_log(log)) == 2 * len(BAD_FILES)

    # --strict: exit 1 while something fails, 0 once every file converts.
    assert run_script(MIDI2MTF, *args, "--strict", cwd=tmp_path).returncode == 1
    shutil.rmtree(input_dir / "bad")
    assert run_script(MIDI2MTF, *args, "--strict", cwd=tmp_path).returncode == 0


@pytest.mark.slow
@pytest.mark.parametrize(("script", "tool"), [(MIDI2MTF, "midi2mtf"), (MTF2MIDI, "mtf2midi"),
                                            (XML2ABC, "xml2abc"), (INTERLEAVE, "interleave"),
                                            (ABC2XML, "abc2xml")],
                         ids=lambda p: getattr(p, "name", p))
def test_default_failure_log_is_in_the_repository(script, tool, tmp_path):
    # The default is read from --help rather than by a run, which would write into the real logs/.
    result = run_script(script, "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert str(failure_log_path(tool)) == str(REPO_ROOT / "logs" / f"{tool}_failures.jsonl")
    # argparse wraps the help text and may cut a long path anywhere: compare without whitespace.
    assert str(failure_log_path(tool)) in "".join(result.stdout.split())


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_configuration_overrides_are_unknown_options(script, tmp_path):
    # No preprocessing script reads config.py, so --KEY=value must not be silently accepted.
    result = run_script(script, *script_arguments(script, tmp_path), "--LORA_R=4", cwd=tmp_path)
    assert result.returncode == 2
    assert "unrecognized arguments: --LORA_R=4" in result.stderr


def test_shards_partition_the_files(input_dir, tmp_path):
    script = load_script(MIDI2MTF)
    handled = []
    for shard in range(3):
        out, log = tmp_path / f"shard{shard}", tmp_path / f"shard{shard}.jsonl"
        status = script.main([str(input_dir), str(out), "--num_shards", "3", "--shard_index", str(shard),
                              "--workers", "1", "--max_mb", "0.05", "--error_log", str(log), "--quiet"])
        assert status == 0
        converted = [p.relative_to(out).as_posix() for p in out.rglob("*.mtf")] if out.exists() else []
        failed = [Path(r["file"]).relative_to(input_dir).as_posix() for r in read_log(log)] if log.exists() else []
        handled.append(set(converted) | {mtf_name(f) for f in failed})
    every_file = {mtf_name(f) for f in [*GOOD_FILES, *BAD_FILES]}
    assert sum(len(h) for h in handled) == len(every_file)  # no file in two shards
    assert set().union(*handled) == every_file  # and none left out
    assert handled[0] != handled[1]
    assert script.main([str(input_dir), str(tmp_path / "x"), "--num_shards", "3", "--shard_index", "3"]) == 2


def test_file_name_that_is_not_utf8(tmp_path):
    root = tmp_path / "in"
    root.mkdir()
    try:
        bad_name = root / os.fsdecode(b"caf\xe9 \xff.mid")
        bad_name.write_bytes((MID_DIR / "m21test_test05.mid").read_bytes())
        (root / os.fsdecode(b"broken \xfe.mid")).write_bytes(b"MThd")
    except (OSError, UnicodeError):
        pytest.skip("the file system refuses names that are not UTF-8")
    script = load_script(MIDI2MTF)
    log = tmp_path / "log.jsonl"
    assert script.main([str(root), str(tmp_path / "out"), "--m3_compatible", "--workers", "1",
                        "--error_log", str(log), "--quiet"]) == 0
    assert (tmp_path / "out" / os.fsdecode(b"caf\xe9 \xff.mtf")).read_bytes() == (MTF_DIR / "m21test_test05.mtf").read_bytes()
    (record,) = read_log(log)
    assert os.fsencode(record["file"]).endswith(b"broken \xfe.mid") and record["reason"].strip()


def test_mtf_to_midi_batch_round_trip(input_dir, tmp_path):
    midi2mtf, mtf2midi = load_script(MIDI2MTF), load_script(MTF2MIDI)
    common = ["--workers", "1", "--quiet", "--error_log", str(tmp_path / "log.jsonl")]
    assert midi2mtf.main([str(input_dir), str(tmp_path / "mtf1"), *common]) == 0
    (tmp_path / "mtf1" / "broken.MTF").write_text("not an MTF text", encoding="utf-8")
    assert mtf2midi.main([str(tmp_path / "mtf1"), str(tmp_path / "mid"), *common, "--strict"]) == 1
    assert mtf2midi.main([str(tmp_path / "mtf1"), str(tmp_path / "mid"), *common]) == 0
    assert midi2mtf.main([str(tmp_path / "mid"), str(tmp_path / "mtf2"), *common]) == 0
    first = {p.relative_to(tmp_path / "mtf1"): p.read_bytes() for p in (tmp_path / "mtf1").rglob("*.mtf")}
    second = {p.relative_to(tmp_path / "mtf2"): p.read_bytes() for p in (tmp_path / "mtf2").rglob("*.mtf")}
    assert len(second) == len(GOOD_FILES) + 1  # + bad/huge.mid: valid MIDI with trailing junk
    assert second == {k: v for k, v in first.items() if k.name != "broken.MTF"}
    assert "parse_mtf" in {r["stage"] for r in read_log(tmp_path / "log.jsonl")}


# A converter that takes its worker down for some files. Module level, so forked workers have it.
def _crashing_convert(path: Path) -> str:
    with open(path.parent.parent / "calls.log", "a", encoding="utf-8") as calls:
        calls.write(path.name + "\n")
    if path.name == "die.x":
        os._exit(3)
    if path.name == "kill.x":
        os.kill(os.getpid(), signal.SIGKILL)
    if path.name == "hang.x":
        # Stuck where the worker's own SIGALRM cannot interrupt it, like a loop in C code.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
        time.sleep(HANG_S)
    return path.read_text(encoding="utf-8").upper()


@pytest.fixture
def hang_guard():
    """A runner that hangs fails the test instead of hanging the test session."""
    def on_alarm(signum, frame):
        raise TimeoutError("run_batch hung")
    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(2 * HANG_S)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def run_crashing_batch(tmp_path: Path, names: list[str], workers: int, timeout: float = 0):
    root, out, log = tmp_path / "in", tmp_path / "out", tmp_path / "errors.jsonl"
    root.mkdir()
    for name in names:
        (root / name).write_text(f"content of {name}", encoding="utf-8")
    summary = batch.run_batch(root, out, _crashing_convert, extensions=[".x"], output_name=lambda p: p.with_suffix(".y"),
                              name="crash-test", workers=workers, error_log=log, timeout=timeout, progress=False)
    calls = (tmp_path / "calls.log").read_text(encoding="utf-8").split()
    return summary, out, read_log(log) if log.exists() else [], calls


@pytest.mark.slow
@pytest.mark.parametrize("workers", [2, 1])
def test_a_worker_that_dies_is_reported_and_the_batch_goes_on(tmp_path, hang_guard, workers):
    good = [f"file{i}.x" for i in range(8)]
    summary, out, records, calls = run_crashing_batch(tmp_path, ["die.x", *good, "kill.x"], workers)

    assert (summary.converted, summary.failed) == (len(good), 2)
    reasons = {Path(r["file"]).name: r["reason"] for r in records}
    assert set(reasons) == {"die.x", "kill.x"}
    assert "worker process died (exit code 3)" in reasons["die.x"]
    assert "worker process died (signal 9 (SIGKILL))" in reasons["kill.x"]
    assert all(r["stage"] == "worker" for r in records)
    assert [r["file"] for r in summary.failures.rows] == [r["file"] for r in records]
    for name in good:
        assert calls.count(name) == 1, name  # converted exactly once, even when sent to a worker that died
        assert (out / name).with_suffix(".y").read_text(encoding="utf-8") == f"CONTENT OF {name.upper()}"
    assert sorted(p.name for p in out.iterdir()) == sorted(Path(n).with_suffix(".y").name for n in good)
    # A worker's death may not be its file's fault (the OOM killer), so each bad file is tried twice.
    assert calls.count("die.x") == calls.count("kill.x") == 2


@pytest.mark.slow
def test_a_worker_stuck_past_its_alarm_is_killed(tmp_path, hang_guard, monkeypatch):
    monkeypatch.setattr(batch, "_KILL_GRACE_S", 0.5)
    summary, out, records, calls = run_crashing_batch(tmp_path, ["hang.x", "a.x", "b.x", "c.x"], 2, timeout=0.3)
    assert (summary.converted, summary.failed) == (3, 1)
    (record,) = records
    assert Path(record["file"]).name == "hang.x" and record["stage"] == "timeout"
    assert "timed out" in record["reason"] and "worker killed" in record["reason"]
    # Cut off by the timeout: killed before its converter returned, so it wrote nothing...
    assert sorted(p.name for p in out.iterdir()) == ["a.y", "b.y", "c.y"]
    waited = float(re.search(r"no result after (\d+) s", record["reason"]).group(1))
    assert waited < HANG_S  # ...long before the converter would have (the runner did not wait it out)
    assert sorted(calls) == ["a.x", "b.x", "c.x", "hang.x"]
