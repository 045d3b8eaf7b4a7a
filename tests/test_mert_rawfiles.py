"""Audio files through the raw-file tools (embedder, clamp3_embd/search/eval/score, zero-shot classification):
the MERT step with the tiny fixture MERT model, then the tiny CLaMP 3 audio tower. An audio file gives the
feature of its official MERT features; too-short and broken files are named; a missing MERT model is one
line with the fix. Both tiny models are random: this checks the plumbing, not retrieval quality."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import rawfiles
import runconfig
from embedder import Embedder, choose_models
from fileio import DropLog
from helpers import OFFICIAL, REPO_ROOT, TINY_MODEL_CONFIG, TINY_WEIGHTS, load_script

MERT = OFFICIAL / "mert"
CASES = json.loads((MERT / "cases.json").read_text(encoding="utf-8"))["cases"] if MERT.is_dir() else []


def tiny_cfg(tokenizer: Path | None = None, **overrides) -> dict:
    values = {"MODEL_CONFIG": str(TINY_MODEL_CONFIG), "EXTRACT_DEVICE": "cpu", "MERT_MODEL_PATH": str(MERT / "model"),
              **overrides}
    if tokenizer is not None:
        values["TEXT_MODEL_NAME"] = str(tokenizer)
    return runconfig.build_config(overrides=values)


def official_mean(case: dict) -> np.ndarray:
    return np.load(MERT / case["expected"]["mean"]["file"])


@pytest.fixture()
def audio_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "audio"
    folder.mkdir()
    for case in CASES:
        shutil.copy(MERT / case["input"], folder)
    (folder / "broken.ogg").write_bytes(b"OggS but nothing else")
    return folder


def test_audio_files_give_the_features_of_their_official_mert_features(tmp_path, audio_folder):
    embedder = Embedder(choose_models(tiny_cfg(), weights=TINY_WEIGHTS), cache_dir=tmp_path / "cache")
    paths = sorted(audio_folder.iterdir())
    drops = DropLog("test")
    results = dict(zip((p.name for p in paths), embedder.embed_files(paths, drops=drops), strict=True))
    extractor = embedder.extractor(None)
    for case in CASES:
        result = results[Path(case["input"]).name]
        if case["id"].startswith("s06"):
            assert isinstance(result, rawfiles.RawFileError) and result.stage == "mert" and "0.50 s" in result.reason
            continue
        assert result.kind == "audio" and result.modality == "audio" and result.format is None
        assert result.feature.shape == (1, 32)
        if case["expected"]["mean"] is None:  # the FLAC case, which the official script does not collect
            continue
        expected = extractor.extract("audio", [extractor.audio_input(official_mean(case))])[0]
        assert np.abs(result.feature - expected).max() < 1e-5, case["id"]
    assert isinstance(results["broken.ogg"], rawfiles.RawFileError) and results["broken.ogg"].stage == "decode"
    assert {Path(row["file"]).name for row in drops.rows} == {"broken.ogg", "s06_clicks_mono_16k_0p5s.wav"}

    # Again: every MERT feature and every CLaMP 3 feature from the cache; the failures remembered.
    again = Embedder(choose_models(tiny_cfg(), weights=TINY_WEIGHTS), cache_dir=tmp_path / "cache")
    second = again.embed_files(paths)
    assert again.summary.cached == 8 and again.summary.embedded == 0 and again.summary.failed == 2
    assert all("remembered" in r.reason for r in second if isinstance(r, rawfiles.RawFileError))
    assert again._mert is not None  # loaded to name the cache; no file was decoded or run

    # The .npy of an audio file's MERT features has the same feature, from the same cache entry.
    case = next(c for c in CASES if c["id"].startswith("s04"))
    sha, mert = again.audio_inputs([MERT / case["input"]])[0]
    assert mert.shape == (1, 3, 32) and np.abs(mert - official_mean(case)).max() <= 1e-5
    npy = tmp_path / "s04.npy"
    np.save(npy, mert)
    from_npy = again.embed_files([npy])[0]
    audio_result = results[Path(case["input"]).name]
    assert from_npy.cached and np.array_equal(from_npy.feature, audio_result.feature)
    assert from_npy.model_key != audio_result.model_key and audio_result.model_key.startswith(from_npy.model_key)


def test_a_missing_mert_model_fails_the_audio_files_only(tmp_path, audio_folder):
    shutil.copy(OFFICIAL / "outputs" / "int_abc" / "bach_bwv1.6.abc", audio_folder)
    cfg = tiny_cfg(MERT_MODEL_PATH=str(tmp_path / "no-mert"))
    embedder = Embedder(choose_models(cfg, weights=TINY_WEIGHTS), cache_dir=tmp_path / "cache")
    paths = sorted(audio_folder.iterdir())
    results = embedder.embed_files(paths)
    by_name = dict(zip((p.name for p in paths), results, strict=True))
    assert not isinstance(by_name.pop("bach_bwv1.6.abc"), rawfiles.RawFileError)
    for result in by_name.values():
        assert isinstance(result, rawfiles.RawFileError) and "Fix: --MERT_MODEL_PATH=DIR" in result.reason
        assert "\n" not in result.reason


def test_a_mert_model_of_another_width_is_refused(tmp_path, audio_folder):
    config = json.loads((MERT / "model" / "config.json").read_text())
    from audio.mert_model import load_mert

    folder = tmp_path / "wide"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**config, "hidden_size": 64, "intermediate_size": 64}))
    import torch
    from transformers import HubertConfig, HubertModel

    fields = {k: v for k, v in config.items() if k not in ("model_type", "architectures")}
    torch.save(HubertModel(HubertConfig(**{**fields, "hidden_size": 64})).state_dict(), folder / "pytorch_model.bin")
    assert load_mert(folder).config.hidden_size == 64
    embedder = Embedder(choose_models(tiny_cfg(MERT_MODEL_PATH=str(folder)), weights=TINY_WEIGHTS))
    result = embedder.embed_files([audio_folder / "s02_chord_stereo_44k1_5p0s.wav"])[0]
    assert isinstance(result, rawfiles.RawFileError) and "64-wide" in result.reason and "32-wide" in result.reason


def common_arguments(tmp_path: Path, tokenizer: Path) -> list[str]:
    return ["--weights", str(TINY_WEIGHTS), "--model_config", str(TINY_MODEL_CONFIG), "--cache_dir",
            str(tmp_path / "cache"), "--quiet", f"--TEXT_MODEL_NAME={tokenizer}", "--EXTRACT_DEVICE=cpu",
            f"--MERT_MODEL_PATH={MERT / 'model'}", "--no_adapter", "--error_log", str(tmp_path / "log.jsonl")]


def test_clamp3_embd_writes_audio_features(tmp_path, audio_folder, word_tokenizer, capsys):
    main = load_script(REPO_ROOT / "clamp3_embd.py").main
    out = tmp_path / "out"
    assert main([str(audio_folder), str(out), "--get_global", *common_arguments(tmp_path, word_tokenizer)]) == 0
    assert "8 written" in capsys.readouterr().out
    assert sorted(p.name for p in out.glob("*.npy")) == sorted(
        Path(c["input"]).stem + ".npy" for c in CASES if not c["id"].startswith("s06"))
    manifest = json.loads((tmp_path / "out.embd_manifest.json").read_text())
    assert {record["kind"] for record in manifest["outputs"].values()} == {"audio"}
    assert main([str(audio_folder), str(tmp_path / "strict"), "--get_global", "--strict",
                 *common_arguments(tmp_path, word_tokenizer)]) == 1
    # A folder whose only audio is too short: nothing usable, exit 2.
    short = tmp_path / "short"
    short.mkdir()
    shutil.copy(MERT / "inputs" / "s06_clicks_mono_16k_0p5s.wav", short)
    assert main([str(short), str(tmp_path / "o2"), *common_arguments(tmp_path, word_tokenizer)]) == 2
    assert "none of the 1 files" in capsys.readouterr().err


@pytest.fixture()
def mixed_music(tmp_path: Path) -> Path:
    """Audio and sheet music in one folder: 'tune<i>' as a .wav/.mp3 and as an .abc."""
    folder = tmp_path / "music"
    folder.mkdir()
    abc = sorted((OFFICIAL / "outputs" / "int_abc").glob("*.abc"))[:3]
    audio = [MERT / "inputs" / "s02_chord_stereo_44k1_5p0s.wav", MERT / "inputs" / "s04_chords_stereo_22k05_12p0s.wav",
             MERT / "inputs" / "s08_chord_stereo_44k1_7p3s.mp3"]
    for number, (score, sound) in enumerate(zip(abc, audio, strict=True)):
        shutil.copy(score, folder / f"tune{number}.abc")
        shutil.copy(sound, folder / f"tune{number}{sound.suffix}")
    return folder


def test_search_text_to_audio_audio_to_audio_and_audio_to_sheet(tmp_path, mixed_music, word_tokenizer, capsys):
    main = load_script(REPO_ROOT / "clamp3_search.py").main
    common = common_arguments(tmp_path, word_tokenizer) + ["--index", str(tmp_path / "index")]

    def search(query: str, *extra: str) -> dict:
        assert main([query, str(mixed_music), "--json", *common, *extra]) == 0
        return json.loads(capsys.readouterr().out)

    text = search("w1 w2 w3")
    assert len(text["results"]) == 6 and {hit["kind"] for hit in text["results"]} == {"abc", "audio"}
    audio = search(str(mixed_music / "tune1.wav"))
    assert "tune1.wav" not in [hit["path"] for hit in audio["results"]] and len(audio["results"]) == 5
    to_sheet = search(str(mixed_music / "tune2.mp3"), "--format", "abc")
    assert {hit["kind"] for hit in to_sheet["results"]} == {"abc"}
    from_sheet = search(str(mixed_music / "tune0.abc"))
    assert any(hit["kind"] == "audio" for hit in from_sheet["results"])


def test_eval_score_and_zero_shot_on_audio(tmp_path, mixed_music, word_tokenizer, capsys):
    queries, references = tmp_path / "queries", tmp_path / "references"
    queries.mkdir()
    references.mkdir()
    for path in mixed_music.iterdir():
        shutil.copy(path, (queries if path.suffix != ".abc" else references) / path.name)
    common = common_arguments(tmp_path, word_tokenizer)
    assert load_script(REPO_ROOT / "clamp3_eval.py").main(
        [str(queries), str(references), "--output_dir", str(tmp_path / "eval"), "--json", str(tmp_path / "e.json"),
         *common]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["n_keys"] == 3
    assert load_script(REPO_ROOT / "clamp3_score.py").main(
        [str(queries), str(references), "--group", "--output_dir", str(tmp_path / "score"), "--json",
         str(tmp_path / "s.json"), *common]) == 0
    assert json.loads((tmp_path / "s.json").read_text())["n_query_files"] == 3
    output = tmp_path / "labels.json"
    assert load_script(REPO_ROOT / "classification" / "zero_shot_cls.py").main(
        [str(queries), str(output), "--labels", "w1,w2", *common]) == 0
    assert sorted(Path(name).name for name in json.loads(output.read_text())) == ["tune0.wav", "tune1.wav", "tune2.mp3"]


def test_audio_files_in_small_batches_give_the_same_features(tmp_path, audio_folder, monkeypatch):
    import embedder as embedder_module

    paths = sorted(audio_folder.iterdir())
    whole = Embedder(choose_models(tiny_cfg(), weights=TINY_WEIGHTS), cache_dir=tmp_path / "a").embed_files(paths)
    monkeypatch.setattr(embedder_module, "MERT_FILES_PER_BATCH", 3)
    parts = Embedder(choose_models(tiny_cfg(), weights=TINY_WEIGHTS), cache_dir=tmp_path / "b").embed_files(paths)
    for one, other in zip(whole, parts, strict=True):
        assert isinstance(one, rawfiles.RawFileError) == isinstance(other, rawfiles.RawFileError)
        if not isinstance(one, rawfiles.RawFileError):
            assert np.abs(one.feature - other.feature).max() < 1e-6
