"""Raw files -> features (rawfiles.py) and the raw-file tools clamp3_embd.py, clamp3_eval.py, clamp3_score.py,
on the tiny fixture model: official features from raw MusicXML and MIDI, the adapter of each format, the cache
(reused, invalidated by a change), folders kept in step with their inputs, bad files reported."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import lora
import numpy as np
import pytest
import rawfile_tools
import rawfiles
import runconfig
from embedder import Embedder, ModelsNotFoundError, choose_models
from fileio import DropLog
from helpers import OFFICIAL, REPO_ROOT, TINY_MODEL_CONFIG, TINY_WEIGHTS, load_script
from modeling import ModelConfig, load_clamp3

OFFICIAL_GLOBAL = OFFICIAL / "features" / "global"




def tiny_cfg(tokenizer: Path | None = None, **overrides) -> dict:
    values = {"MODEL_CONFIG": str(TINY_MODEL_CONFIG), "EXTRACT_DEVICE": "cpu", **overrides}
    if tokenizer is not None:
        values["TEXT_MODEL_NAME"] = str(tokenizer)
    return runconfig.build_config(overrides=values)


@pytest.fixture()
def mixed_folder(tmp_path: Path) -> Path:
    """.xml, .mxl, .abc (plain and interleaved), .mid, .mtf, .txt, and three files that must fail."""
    folder = tmp_path / "mixed"
    (folder / "sub").mkdir(parents=True)
    shutil.copy(OFFICIAL / "inputs" / "xml" / "bach_bwv67.4.xml", folder)
    shutil.copy(OFFICIAL / "inputs" / "xml" / "bach_bwv1.6.mxl", folder / "sub")
    shutil.copy(OFFICIAL / "inputs" / "abc" / "airdsAirs_book6_X1003_n2.abc", folder)
    shutil.copy(OFFICIAL / "outputs" / "int_abc" / "bach_bwv190.7-inst.abc", folder / "sub")
    shutil.copy(OFFICIAL / "inputs" / "mid" / "edge_multitrack_8.mid", folder)
    shutil.copy(OFFICIAL / "outputs" / "mtf" / "edge_empty_track.mtf", folder / "sub")
    (folder / "caption.txt").write_text("w1 w2 w3\n", encoding="utf-8")
    (folder / "broken.mid").write_bytes(b"MThd\x00")
    (folder / "empty.txt").write_text("  \n", encoding="utf-8")
    (folder / "song.wav").write_bytes(b"RIFF")
    return folder


def test_kind_of_each_extension_and_clear_refusals():
    assert [rawfiles.kind_of(f"x{ext}") for ext in (".txt", ".abc", ".XML", ".mxl", ".musicxml", ".mid", ".MIDI",
                                                    ".mtf", ".npy", ".wav", ".MP3", ".flac", ".ogg")] == [
        "text", "abc", "musicxml", "musicxml", "musicxml", "midi", "midi", "mtf", "mert", "audio", "audio", "audio",
        "audio"]
    assert rawfiles.format_of("a.mxl") == "abc" and rawfiles.format_of("a.mid") == "mtf"
    assert rawfiles.format_of("a.txt") is None and rawfiles.format_of("a.wav") is None
    with pytest.raises(rawfiles.RawFileError, match="convert it to .flac"):
        rawfiles.kind_of("song.m4a")
    with pytest.raises(rawfiles.RawFileError, match="caption"):
        rawfiles.kind_of("cover.png")
    with pytest.raises(rawfiles.RawFileError, match="unsupported file type '.pdf'"):
        rawfiles.kind_of("score.pdf")


def official_cases() -> list[tuple[Path, Path]]:
    """(raw input, official global feature of its conversion) for every case the official code embedded."""
    cases = []
    for folder, sub in (("xml", "int_abc"), ("mid", "mtf")):
        for path in sorted((OFFICIAL / "inputs" / folder).iterdir()):
            stem = path.name.rsplit(".", 1)[0]
            feature = OFFICIAL_GLOBAL / sub / f"{stem}.npy"
            if feature.is_file():
                cases.append((path, feature))
    return cases


def test_raw_musicxml_and_midi_give_the_official_features(tmp_path):
    cases = official_cases()
    assert len(cases) >= 40
    choice = choose_models(tiny_cfg(), weights=TINY_WEIGHTS, no_adapter=True)
    embedder = Embedder(choice, cache_dir=tmp_path / "cache")
    results = embedder.embed_files([path for path, _ in cases], drops=DropLog("test"))
    assert not any(isinstance(result, rawfiles.RawFileError) for result in results)
    for (path, feature), result in zip(cases, results, strict=True):
        official = np.load(feature)
        assert result.feature.shape == official.shape == (1, 32), path.name
        assert np.abs(result.feature - official).max() < 1e-5, path.name


def test_plain_abc_modes(tmp_path):
    plain = OFFICIAL / "inputs" / "abc" / "airdsAirs_book3_X0401_n0_v1.abc"
    official = (OFFICIAL / "outputs" / "int_abc_from_abc_inputs" / plain.name).read_text(encoding="utf-8")
    assert rawfiles.model_input_text(plain, abc_mode="interleave") == official
    assert not rawfiles.is_interleaved_abc(plain.read_text(encoding="utf-8"))
    assert rawfiles.is_interleaved_abc(official)
    normalised = rawfiles.model_input_text(plain)  # auto: plain ABC goes through the MusicXML round trip
    assert rawfiles.is_interleaved_abc(normalised) and "L:1/8" in normalised
    interleaved = tmp_path / "tune.abc"
    interleaved.write_text(official, encoding="utf-8")
    assert rawfiles.model_input_text(interleaved) == official  # already interleaved: read as it is


def test_each_format_goes_through_its_own_adapter(tmp_path, adapters, word_tokenizer, mixed_folder):
    cfg = tiny_cfg(word_tokenizer, LORA_ABC_ADAPTER_DIR=str(adapters["abc"]), LORA_MTF_ADAPTER_DIR=str(adapters["mtf"]))
    files = [mixed_folder / "bach_bwv67.4.xml", mixed_folder / "edge_multitrack_8.mid", mixed_folder / "caption.txt"]
    with_adapters = Embedder(choose_models(cfg, weights=TINY_WEIGHTS), cache_dir=tmp_path / "c")
    base = Embedder(choose_models(cfg, weights=TINY_WEIGHTS, no_adapter=True),
                             cache_dir=tmp_path / "c")
    adapted, plain = with_adapters.embed_files(files), base.embed_files(files)
    from features import FeatureExtractor

    for index, fmt in ((0, "abc"), (1, "mtf")):
        # The reference: the adapter loaded onto a fresh base with plain PEFT, as evaluate_lora.py does.
        reference_model = lora.load_adapter(load_clamp3(ModelConfig.from_json(TINY_MODEL_CONFIG), TINY_WEIGHTS),
                                            adapters[fmt]).get_base_model().eval()
        extractor = FeatureExtractor(reference_model, device="cpu")
        text = rawfiles.model_input_text(files[index])
        expected = extractor.extract("symbolic", [extractor.symbolic_input(text)])[0]
        assert np.abs(adapted[index].feature - expected).max() < 1e-6, fmt
        assert np.abs(adapted[index].feature - plain[index].feature).max() > 1e-3, fmt
        assert adapted[index].model_key != plain[index].model_key
    # Text goes through the base whatever the adapters: identical features and one model key.
    assert np.array_equal(adapted[2].feature, plain[2].feature)
    assert adapted[2].model_key == plain[2].model_key == base.model_key(None)
    assert with_adapters.model_key("abc") != with_adapters.model_key("mtf")
    assert "adapter" in "\n".join(with_adapters.choice.describe())


def test_cache_reused_and_invalidated_when_a_file_changes(tmp_path):
    source = tmp_path / "in"
    source.mkdir()
    shutil.copy(OFFICIAL / "inputs" / "xml" / "bach_bwv67.4.xml", source / "a.xml")
    shutil.copy(OFFICIAL / "inputs" / "mid" / "edge_multitrack_8.mid", source / "b.mid")
    choice = choose_models(tiny_cfg(), weights=TINY_WEIGHTS, no_adapter=True)
    first = Embedder(choice, cache_dir=tmp_path / "cache")
    before = first.embed_files([source / "a.xml", source / "b.mid"])
    assert first.summary.embedded == 2 and first.summary.cached == 0
    assert list((tmp_path / "cache" / "conversions").rglob("*.musicxml-v*.txt"))
    second = Embedder(choice, cache_dir=tmp_path / "cache")  # a new run: nothing is embedded again
    again = second.embed_files([source / "a.xml", source / "b.mid"])
    assert second.summary.cached == 2 and second.summary.embedded == 0
    assert all(np.array_equal(x.feature, y.feature) for x, y in zip(before, again, strict=True))
    # The same content under another name is the same feature, from the cache.
    shutil.copy(source / "a.xml", source / "copy.xml")
    assert second.embed_files([source / "copy.xml"])[0].cached
    # A changed file is converted and embedded again.
    shutil.copy(OFFICIAL / "inputs" / "xml" / "bach_bwv1.6.mxl", source / "a.xml")
    changed = second.embed_files([source / "a.xml"])[0]
    assert not changed.cached and changed.sha256 != before[0].sha256
    assert np.abs(changed.feature - before[0].feature).max() > 1e-4


def test_a_failed_conversion_is_named_remembered_and_the_rest_go_on(tmp_path, mixed_folder, word_tokenizer):
    choice = choose_models(tiny_cfg(word_tokenizer), weights=TINY_WEIGHTS, no_adapter=True)
    embedder = Embedder(choice, cache_dir=tmp_path / "cache")
    files = [mixed_folder / name for name in ("broken.mid", "edge_multitrack_8.mid", "empty.txt", "song.wav")]
    drops = DropLog("test")
    results = embedder.embed_files(files, drops=drops)
    failed = [isinstance(result, rawfiles.RawFileError) for result in results]
    assert failed == [True, False, True, True]
    assert results[0].path == str(files[0]) and results[0].reason
    reasons = {Path(row["file"]).name: row["reason"] for row in drops.rows}
    assert "MIDI" in reasons["broken.mid"] and "empty" in reasons["empty.txt"] and "MERT" in reasons["song.wav"]
    again = DropLog("again")
    embedder.embed_files(files[:1], drops=again)
    assert "remembered" in again.rows[0]["reason"]


def test_embed_folder_mirrors_updates_and_drops(tmp_path, mixed_folder, word_tokenizer):
    choice = choose_models(tiny_cfg(word_tokenizer), weights=TINY_WEIGHTS, no_adapter=True)
    out = tmp_path / "features"
    drops = DropLog("test")
    summary = rawfile_tools.embed_folder(Embedder(choice, cache_dir=tmp_path / "cache"), mixed_folder, out,
                                    get_global=True, drops=drops)
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.npy"))
    assert written == ["airdsAirs_book6_X1003_n2.npy", "bach_bwv67.4.npy", "caption.npy", "edge_multitrack_8.npy",
                       "sub/bach_bwv1.6.npy", "sub/bach_bwv190.7-inst.npy", "sub/edge_empty_track.npy"]
    assert summary.written == 7 and summary.failed == 3
    assert {Path(row["file"]).name for row in drops.rows} == {"broken.mid", "empty.txt", "song.wav"}
    assert all(np.load(out / rel).shape == (1, 32) for rel in written)
    manifest = json.loads(rawfile_tools.manifest_path(out).read_text(encoding="utf-8"))
    assert manifest["outputs"]["sub/bach_bwv1.6.npy"]["input"] == "sub/bach_bwv1.6.mxl"
    # Nothing changed: nothing rewritten. One input removed: its output goes; one changed: rewritten.
    (mixed_folder / "bach_bwv67.4.xml").unlink()
    shutil.copy(OFFICIAL / "inputs" / "mid" / "edge_exact_513_patches.mid", mixed_folder / "edge_multitrack_8.mid")
    again = rawfile_tools.embed_folder(Embedder(choice, cache_dir=tmp_path / "cache"), mixed_folder, out,
                                  get_global=True)
    assert (again.written, again.unchanged, again.removed) == (1, 5, 1)
    assert not (out / "bach_bwv67.4.npy").exists()


def test_two_inputs_with_one_output_name_are_reported(tmp_path):
    source = tmp_path / "in"
    source.mkdir()
    shutil.copy(OFFICIAL / "inputs" / "xml" / "bach_bwv67.4.xml", source / "piece.xml")
    shutil.copy(OFFICIAL / "inputs" / "mid" / "edge_multitrack_8.mid", source / "piece.mid")
    choice = choose_models(tiny_cfg(), weights=TINY_WEIGHTS, no_adapter=True)
    drops = DropLog("test")
    summary = rawfile_tools.embed_folder(Embedder(choice), source, tmp_path / "out", True, drops=drops)
    assert summary.written == 1 and summary.failed == 1
    assert "already made from piece.mid" in drops.rows[0]["reason"]


def test_models_not_found_and_the_demo_fallback(tmp_path, adapters):
    cfg = runconfig.build_config(overrides={"CLAMP3_WEIGHTS_PATH": str(tmp_path / "missing.pth")})
    with pytest.raises(ModelsNotFoundError, match="make demo"):
        choose_models(cfg, demo_roots=[tmp_path / "no-demo"])
    with pytest.raises(ModelsNotFoundError, match="--weights"):
        choose_models(cfg, weights=tmp_path / "typo.pth", demo_roots=[tmp_path / "no-demo"])
    demo = tmp_path / "demo"
    (demo / "adapters").mkdir(parents=True)
    shutil.copy(TINY_WEIGHTS, demo / "base_abc.pth")
    shutil.copy(TINY_MODEL_CONFIG, demo / "model_config.json")
    shutil.copytree(adapters["abc"], demo / "adapters" / "lora_abc_adapter")
    default_cfg = runconfig.build_config()
    choice = choose_models(default_cfg, demo_roots=[tmp_path / "no-demo", demo])
    assert choice.source == "demo" and choice.weights == demo / "base_abc.pth"
    assert choice.adapters == {"abc": demo / "adapters" / "lora_abc_adapter", "mtf": None}
    assert choice.cfg["TEXT_MODEL_NAME"] == str(demo / "text_tower")
    text = "\n".join(choice.describe())
    assert "embedded default" in text and "MTF (MIDI): base model" in text
    # A key the user set wins over the demo's value.
    mine = runconfig.build_config(overrides={"MAX_TEXT_LENGTH": 32})
    assert choose_models(mine, demo_roots=[demo]).cfg["MAX_TEXT_LENGTH"] == 32
    assert not choose_models(default_cfg, demo_roots=[demo], no_adapter=True).adapters["abc"]
    # Once the demo has trained the joint adapters (python -m demo --joint), the tools use them: sheet
    # music and MIDI were aligned with each other; adapter folders the user named still win.
    for fmt in ("abc", "mtf"):
        shutil.copytree(adapters[fmt], demo / "adapters" / f"joint_{fmt}_adapter")
    joint = choose_models(default_cfg, demo_roots=[demo])
    assert joint.adapters == {fmt: demo / "adapters" / f"joint_{fmt}_adapter" for fmt in ("abc", "mtf")}
    assert "joint adapters" in "\n".join(joint.describe())
    named = runconfig.build_config(overrides={"LORA_ABC_ADAPTER_DIR": str(adapters["abc"])})
    assert choose_models(named, demo_roots=[demo]).adapters["abc"] == adapters["abc"]


def script_arguments(tmp_path: Path, tokenizer: Path, adapters: dict[str, Path]) -> list[str]:
    return ["--weights", str(TINY_WEIGHTS), "--model_config", str(TINY_MODEL_CONFIG), "--cache_dir",
            str(tmp_path / "cache"), "--quiet", f"--TEXT_MODEL_NAME={tokenizer}", "--EXTRACT_DEVICE=cpu",
            f"--LORA_ABC_ADAPTER_DIR={adapters['abc']}", f"--LORA_MTF_ADAPTER_DIR={adapters['mtf']}"]


def test_clamp3_embd_script(tmp_path, mixed_folder, word_tokenizer, adapters, capsys):
    main = load_script(REPO_ROOT / "clamp3_embd.py").main
    out = tmp_path / "out"
    log = tmp_path / "failures.jsonl"
    common = script_arguments(tmp_path, word_tokenizer, adapters) + ["--error_log", str(log)]
    assert main([str(mixed_folder), str(out), "--get_global", *common]) == 0
    line = capsys.readouterr().out
    assert "7 written" in line and "3 failed" in line
    assert len(log.read_text(encoding="utf-8").splitlines()) == 3
    assert np.load(out / "sub" / "bach_bwv1.6.npy").shape == (1, 32)
    # Per-patch features without --get_global: (1, N, hidden).
    assert main([str(mixed_folder), str(tmp_path / "patches"), *common]) == 0
    assert np.load(tmp_path / "patches" / "caption.npy").shape[::2] == (1, 32)
    assert main([str(tmp_path / "nowhere"), str(out), *common]) == 2
    assert "input folder not found" in capsys.readouterr().err


def test_the_raw_file_tools_share_one_rule_for_empty_folders_and_failures(tmp_path, word_tokenizer, adapters,
                                                                         capsys):
    """A missing or empty folder is an error naming it (clamp3_eval.py used to name its cache folder);
    a folder none of whose files could be used is an error (they used to exit 0); --strict exits 1
    when any file failed; a killed run's half-written output is removed by the next run."""
    embd = load_script(REPO_ROOT / "clamp3_embd.py").main
    evaluate = load_script(REPO_ROOT / "clamp3_eval.py").main
    common = script_arguments(tmp_path, word_tokenizer, adapters) + ["--error_log", str(tmp_path / "log.jsonl")]
    empty, broken, mixed, out = (tmp_path / name for name in ("empty", "broken", "mixed", "out"))
    for folder in (empty, broken, mixed):
        folder.mkdir()
    (empty / "readme.md").write_text("not a file the tools read\n", encoding="utf-8")
    (broken / "bad.mid").write_bytes(b"MThd")
    shutil.copy(OFFICIAL / "outputs" / "int_abc" / "bach_bwv1.6.abc", mixed / "good.abc")
    (mixed / "bad.mid").write_bytes(b"MThd")

    assert embd([str(empty), str(out), *common]) == 2
    assert f"no file the raw-file tools read in the input folder {empty}" in capsys.readouterr().err
    assert evaluate([str(empty), str(mixed), *common]) == 2
    error = capsys.readouterr().err
    assert f"query folder {empty}" in error and "cache" not in error
    assert embd([str(broken), str(out), *common]) == 2
    assert f"none of the 1 files in the input folder {broken} could be used" in capsys.readouterr().err

    orphan = out / ".good.npy.abcd1234.tmp"  # what a killed atomic write leaves
    out.mkdir(exist_ok=True)
    orphan.write_bytes(b"half")
    assert embd([str(mixed), str(out), "--get_global", *common]) == 0
    assert (out / "good.npy").is_file() and not orphan.exists()
    assert embd([str(mixed), str(out), "--get_global", "--strict", *common]) == 1
    assert "1 of 2 files in the input folder" in capsys.readouterr().err
    assert evaluate([str(mixed), str(mixed), "--output_dir", str(tmp_path / "eval"), *common]) == 0
    assert evaluate([str(mixed), str(mixed), "--output_dir", str(tmp_path / "eval"), "--strict", *common]) == 1
    assert f"1 of 2 files in the query folder {mixed} failed (--strict)" in capsys.readouterr().err


def test_clamp3_eval_and_score_scripts_on_raw_folders(tmp_path, word_tokenizer, adapters, capsys):
    queries, references = tmp_path / "queries", tmp_path / "references"
    queries.mkdir()
    references.mkdir()
    pieces = {"one": OFFICIAL / "inputs" / "xml" / "bach_bwv67.4.xml",
              "two": OFFICIAL / "inputs" / "mid" / "edge_multitrack_8.mid",
              "three": OFFICIAL / "outputs" / "int_abc" / "bach_bwv190.7-inst.abc"}
    for number, (key, path) in enumerate(pieces.items()):
        shutil.copy(path, references / f"{key}{path.suffix}")
        (queries / f"{key}.txt").write_text(f"w{number} w{number + 10} w{number + 20}\n", encoding="utf-8")
    common = script_arguments(tmp_path, word_tokenizer, adapters)
    assert load_script(REPO_ROOT / "clamp3_eval.py").main([str(queries), str(references), "--output_dir", str(tmp_path), *common,
                                            "--json", str(tmp_path / "report.json")]) == 0
    ranks = [json.loads(line) for line in (tmp_path / "retrieval_ranks.jsonl").read_text().splitlines()]
    assert sorted(Path(row["query"]).stem for row in ranks) == ["one", "three", "two"]
    assert all(1 <= row["rank"] <= 3 for row in ranks)
    report = json.loads((tmp_path / "report.json").read_text(encoding="utf-8"))
    assert report["n_keys"] == 3
    assert load_script(REPO_ROOT / "clamp3_score.py").main([str(queries), str(references), "--group", "--output_dir",
                                             str(tmp_path), *common, "--json", str(tmp_path / "score.json")]) == 0
    score = json.loads((tmp_path / "score.json").read_text(encoding="utf-8"))
    assert score["mode"] == "group" and score["n_query_files"] == 3
    # A reference that fails to convert leaves its key unmatched: named, and the official exit status 1.
    (references / "two.mid").write_bytes(b"MThd")
    assert load_script(REPO_ROOT / "clamp3_eval.py").main([str(queries), str(references), "--output_dir", str(tmp_path),
                                            *common]) == 1


def test_mert_features_go_through_the_audio_tower(tmp_path):
    from features import FeatureExtractor

    width = ModelConfig.from_json(TINY_MODEL_CONFIG).audio["hidden_size"]
    mert = np.random.default_rng(0).standard_normal((1, 7, width)).astype(np.float32)
    np.save(tmp_path / "clip.npy", mert)
    choice = choose_models(tiny_cfg(), weights=TINY_WEIGHTS)
    result = Embedder(choice, cache_dir=tmp_path / "cache").embed_files([tmp_path / "clip.npy"])[0]
    assert result.modality == "audio" and result.format is None
    extractor = FeatureExtractor(load_clamp3(ModelConfig.from_json(TINY_MODEL_CONFIG), TINY_WEIGHTS), device="cpu")
    expected = extractor.extract("audio", [extractor.audio_input(mert)])[0]
    assert np.abs(result.feature - expected).max() < 1e-6


def test_a_relative_text_model_folder_is_found_from_any_working_directory(tmp_path, word_tokenizer, monkeypatch):
    """TEXT_MODEL_NAME is a configuration path, so relative to the repository root (it was read relative
    to the working directory, and every model script failed when run from elsewhere)."""
    from features import load_text_tokenizer

    folder = REPO_ROOT / "cache" / f"test-tokenizer-{tmp_path.name}"
    shutil.copytree(word_tokenizer, folder)
    try:
        monkeypatch.chdir(tmp_path)
        tokenizer = load_text_tokenizer(folder.relative_to(REPO_ROOT).as_posix())
        assert tokenizer("w1 w2")["input_ids"] == [0, 5, 6, 2]
    finally:
        shutil.rmtree(folder)
