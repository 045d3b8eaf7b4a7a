"""preprocessing/audio/extract_mert.py: a folder of audio to MERT .npy features (code/audio/folder.py), checked
against the official outputs; what gets no output is named and logged, and the exit status says so; resume,
shards, and several processes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import OFFICIAL, REPO_ROOT, load_script, torchrun

MERT = OFFICIAL / "mert"
SCRIPT = REPO_ROOT / "preprocessing" / "audio" / "extract_mert.py"
CASES = json.loads((MERT / "cases.json").read_text(encoding="utf-8"))["cases"] if MERT.is_dir() else []


def audio_folder(root: Path) -> Path:
    """The fixture inputs, one in a sub-folder with an upper-case extension, plus a file that is not audio and
    a second input with the same output name."""
    folder = root / "audio"
    (folder / "sub").mkdir(parents=True)
    for case in CASES:
        source = MERT / case["input"]
        if case["id"].startswith("s03"):
            shutil.copy(source, folder / "sub" / (source.stem + ".WAV"))
        else:
            shutil.copy(source, folder / source.name)
    (folder / "broken.mp3").write_bytes(b"ID3 not really an mp3")
    shutil.copy(MERT / "inputs" / "s09_sine_mono_48k_5p0s.flac", folder / "clash.flac")
    shutil.copy(MERT / "inputs" / "s01_sine_mono_16k_1p0s.wav", folder / "clash.wav")
    return folder


def arguments(folder: Path, out: Path, log: Path, *extra: str) -> list[str]:
    return [str(folder), str(out), "--model_path", str(MERT / "model"), "--EXTRACT_DEVICE=cpu", "--error_log",
            str(log), "--quiet", *extra]


def official_output(case: dict, level: str) -> np.ndarray:
    return np.load(MERT / case["expected"][level]["file"])


def test_folder_gives_the_official_mean_features_and_names_what_has_none(tmp_path, capsys):
    folder, out, log = audio_folder(tmp_path), tmp_path / "out", tmp_path / "failures.jsonl"
    script = load_script(SCRIPT)
    assert script.main(arguments(folder, out, log, "--mean_features", "--files_per_chunk", "3")) == 1
    for case in CASES:
        name = Path(case["input"]).stem + ".npy"
        target = out / "sub" / name if case["id"].startswith("s03") else out / name
        if case["expected"]["mean"] is None:
            assert target.is_file() == (case["format"] == "flac"), case["id"]  # FLAC accepted; s06 has none
            continue
        expected = official_output(case, "mean")
        got = np.load(target)
        assert got.shape == expected.shape and np.abs(got - expected).max() <= 1e-5, case["id"]
    rows = {Path(row["file"]).name: row for row in map(json.loads, log.read_text().splitlines())}
    assert set(rows) == {"s06_clicks_mono_16k_0p5s.wav", "broken.mp3", "clash.wav"}
    assert rows["s06_clicks_mono_16k_0p5s.wav"]["stage"] == "windows" and "0.50 s" in rows[
        "s06_clicks_mono_16k_0p5s.wav"]["reason"]
    assert rows["broken.mp3"]["stage"] == "decode"
    assert rows["clash.wav"]["stage"] == "name"  # clash.flac, first in order, has clash.npy
    printed = capsys.readouterr().out
    assert "9 extracted" in printed and "1 too short" in printed and "2 failed" in printed

    # A re-run skips what is done and reports again what has no output.
    assert script.main(arguments(folder, out, log, "--mean_features")) == 1
    assert "0 extracted, 9 skipped" in capsys.readouterr().out


def test_frames_without_mean_features_and_a_clean_folder_exits_0(tmp_path, capsys):
    folder = tmp_path / "clean"
    folder.mkdir()
    case = next(c for c in CASES if c["id"].startswith("s04"))
    shutil.copy(MERT / case["input"], folder)
    out = tmp_path / "out"
    assert load_script(SCRIPT).main(arguments(folder, out, tmp_path / "log.jsonl")) == 0
    got = np.load(out / (Path(case["input"]).stem + ".npy"))
    expected = official_output(case, "frames")
    assert got.shape == expected.shape == (3, 3, 32) and np.abs(got - expected).max() <= 1e-5
    assert not (tmp_path / "log.jsonl").exists()


def test_a_folder_without_audio_or_model_exits_2(tmp_path, capsys):
    script = load_script(SCRIPT)
    (tmp_path / "empty").mkdir()
    assert script.main(arguments(tmp_path / "empty", tmp_path / "out", tmp_path / "log.jsonl")) == 2
    assert script.main(arguments(tmp_path / "missing", tmp_path / "out", tmp_path / "log.jsonl")) == 2
    shutil.copy(MERT / "inputs" / "s01_sine_mono_16k_1p0s.wav", tmp_path / "empty")
    assert script.main([str(tmp_path / "empty"), str(tmp_path / "out"), f"--MERT_MODEL_PATH={tmp_path / 'none'}",
                        "--EXTRACT_DEVICE=cpu", "--quiet"]) == 2
    assert "Fix: --MERT_MODEL_PATH=DIR" in capsys.readouterr().err


def test_shards_cover_the_folder_once(tmp_path):
    folder = audio_folder(tmp_path)
    (folder / "clash.wav").unlink()  # shards are cut by path: two inputs of one output name may land in two
    script = load_script(SCRIPT)
    made = []
    for index in range(2):
        out = tmp_path / f"shard{index}"
        script.main(arguments(folder, out, tmp_path / "log.jsonl", "--num_shards", "2", "--shard_index", str(index)))
        made.append({p.relative_to(out) for p in out.rglob("*.npy")})
    assert not made[0] & made[1] and len(made[0] | made[1]) == 9


@pytest.mark.slow
def test_two_processes_write_what_one_writes(tmp_path):
    folder = audio_folder(tmp_path)
    one, two = tmp_path / "one", tmp_path / "two"
    assert load_script(SCRIPT).main(arguments(folder, one, tmp_path / "one.jsonl", "--files_per_chunk", "2")) == 1
    done = torchrun(SCRIPT, 2, arguments(folder, two, tmp_path / "two.jsonl", "--files_per_chunk", "2"))
    assert done.returncode == 1, done.stderr[-3000:]
    names = sorted(p.relative_to(one) for p in one.rglob("*.npy"))
    assert names == sorted(p.relative_to(two) for p in two.rglob("*.npy")) and len(names) == 9
    for name in names:
        assert np.abs(np.load(one / name) - np.load(two / name)).max() <= 1e-6
    assert len((tmp_path / "two.jsonl").read_text().splitlines()) == 3  # every rank's failures, merged


def test_extract_clamp3_reads_the_mean_features_and_names_the_audio_it_skips(tmp_path, capsys):
    """The chain the README gives: extract_mert.py --mean_features, then code/extract_clamp3.py on the .npy
    files (the audio tower of the tiny CLaMP 3 model, 32 wide like the tiny MERT model)."""
    from helpers import TINY_MODEL_CONFIG, TINY_WEIGHTS

    folder = tmp_path / "audio"
    folder.mkdir()
    case = next(c for c in CASES if c["id"].startswith("s04"))
    shutil.copy(MERT / case["input"], folder)
    mert = tmp_path / "mert"
    assert load_script(SCRIPT).main(arguments(folder, mert, tmp_path / "log.jsonl", "--mean_features")) == 0
    shutil.copy(MERT / case["input"], mert)  # an audio file among the features: named, not read
    out = tmp_path / "clamp3"
    assert load_script(REPO_ROOT / "code" / "extract_clamp3.py").main(
        [str(mert), str(out), "--get_global", "--weights", str(TINY_WEIGHTS), "--model_config", str(TINY_MODEL_CONFIG),
         "--EXTRACT_DEVICE=cpu", "--quiet", "--error_log", str(tmp_path / "x.jsonl")]) == 0
    assert np.load(out / (Path(case["input"]).stem + ".npy")).shape == (1, 32)
    assert "1 audio file(s)" in capsys.readouterr().err
