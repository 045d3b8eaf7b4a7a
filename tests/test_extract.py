"""Feature extraction against the official features, batched against one-at-a-time."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import extract_clamp3
import numpy as np
import pytest
import runconfig
import torch
from extraction import extract_config_path
from features import FeatureExtractor, segment_bounds, segment_weights
from fileio import find_files, with_extension
from helpers import OFFICIAL, REPO_ROOT, TINY_MODEL_CONFIG, TINY_WEIGHTS

TINY = ["--weights", str(TINY_WEIGHTS), "--model_config", str(TINY_MODEL_CONFIG)]
SUBDIRS = ("int_abc", "int_abc_from_abc_inputs", "mtf")


def run_extract(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO_ROOT / "code" / "extract_clamp3.py"), *args, "--quiet",
                           "--EXTRACT_DEVICE=cpu"],
                          capture_output=True, text=True, check=False)


@pytest.fixture(scope="module")
def official_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    for sub in SUBDIRS:
        shutil.copytree(OFFICIAL / "outputs" / sub, root / sub)
    return root


def test_segmentation_rules():
    assert segment_bounds(513, 512) == [(0, 512), (1, 513)]
    assert segment_weights(513, 512) == [512, 1]
    assert segment_bounds(1024, 512) == [(0, 512), (512, 1024)]
    assert segment_weights(1024, 512) == [512, 512]
    assert segment_bounds(30, 512) == [(0, 30)] and segment_weights(30, 512) == [30]


@pytest.mark.slow  # end to end through the CLI subprocess
def test_global_features_match_official(official_inputs, tmp_path, tiny_model):
    result = run_extract(str(official_inputs), str(tmp_path), "--get_global", *TINY)
    assert result.returncode == 0, result.stderr
    expected = sorted((OFFICIAL / "features" / "global").rglob("*.npy"))
    assert len(expected) == 62
    input_of = {with_extension(rel, ".npy"): rel for rel in find_files(official_inputs, [".abc", ".mtf"])}
    extractor = FeatureExtractor(tiny_model)
    segmented = 0
    for ref_path in expected:
        rel = ref_path.relative_to(OFFICIAL / "features" / "global")
        ours = np.load(tmp_path / rel)
        ref = np.load(ref_path)
        assert ours.shape == ref.shape == (1, 32) and ours.dtype == np.float32
        np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5, err_msg=str(ref_path))
        patches = extractor.symbolic_input((official_inputs / input_of[rel]).read_text(encoding="utf-8"))
        segmented += len(patches) > extractor.segment_lengths["symbolic"]
    assert segmented == 18  # the long pieces were among those compared


@pytest.mark.slow  # end to end through the CLI subprocess
def test_nonglobal_features_match_official(official_inputs, tmp_path):
    result = run_extract(str(official_inputs), str(tmp_path), *TINY)
    assert result.returncode == 0, result.stderr
    expected = sorted((OFFICIAL / "features" / "nonglobal").rglob("*.npy"))
    assert len(expected) == 8
    for ref_path in expected:
        ours = np.load(tmp_path / ref_path.relative_to(OFFICIAL / "features" / "nonglobal"))
        ref = np.load(ref_path)
        assert ours.shape == ref.shape
        np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5, err_msg=str(ref_path))
    means = json.loads((OFFICIAL / "features" / "nonglobal_mean.json").read_text())
    for key, mean in means.items():
        sub, name = key.split("/")[-2:]
        if sub not in SUBDIRS:
            continue
        ours = np.load(tmp_path / sub / (name.rsplit(".", 1)[0] + ".npy"))
        np.testing.assert_allclose(ours.astype(np.float64).mean(axis=1)[0], np.asarray(mean).reshape(-1),
                                   rtol=0, atol=1e-5, err_msg=key)


SEGMENT_LENGTHS = {"symbolic": 512, "text": 128, "audio": 128}  # PATCH_LENGTH, MAX_TEXT/AUDIO_LENGTH


def official_style(model, modality, x, get_global, pad):
    """The official loop: one segment per forward pass, padded to the full segment length."""
    seg_len = SEGMENT_LENGTHS[modality]
    parts = []
    for start, end in segment_bounds(len(x), seg_len):
        values = torch.full((1, seg_len, *x.shape[1:]), pad, dtype=x.dtype)
        mask = torch.zeros(1, seg_len, dtype=torch.long)
        values[0, : end - start] = x[start:end]
        mask[0, : end - start] = 1
        with torch.no_grad():
            out = model.features(modality, values, mask, get_global=get_global)
        parts.append(out[0] if get_global else out[0, : end - start])
    if get_global:
        w = torch.tensor(segment_weights(len(x), seg_len), dtype=torch.float32).unsqueeze(-1)
        return ((torch.stack(parts) * w).sum(0) / w.sum()).unsqueeze(0).numpy()
    remainder = len(x) % seg_len
    if remainder:
        parts[-1] = parts[-1][-remainder:]
    return torch.cat(parts).unsqueeze(0).numpy()


@pytest.mark.parametrize("tokens_per_batch", [512, 4096, 100_000])
def test_batched_equals_one_at_a_time(tiny_model, tokens_per_batch):
    extractor = FeatureExtractor(tiny_model, tokens_per_batch=tokens_per_batch)
    names = ["mtf/edge_exact_513_patches.mtf", "int_abc/weber_concertino_clarinet.abc",
             "mtf/m21test_test01.mtf", "int_abc/demos_chord_realization_exercise.abc",
             "int_abc_from_abc_inputs/josquin_adieuMesAmours_X1_n0_v1.abc"]
    inputs = [extractor.symbolic_input((OFFICIAL / "outputs" / n).read_text(encoding="utf-8")) for n in names]
    for get_global in (True, False):
        batched = extractor.extract("symbolic", inputs, get_global=get_global)
        for x, ours in zip(inputs, batched, strict=True):
            ref = official_style(tiny_model, "symbolic", x, get_global, 0)
            assert ours.shape == ref.shape
            np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5)


def test_audio_features_batched_equal_official_style(tiny_model):
    extractor = FeatureExtractor(tiny_model, tokens_per_batch=300)
    rng = np.random.default_rng(0)
    inputs = [extractor.audio_input(rng.normal(size=(n, 32)).astype(np.float32)) for n in (3, 200, 127)]
    assert inputs[0].shape == (5, 32) and not inputs[0][0].any() and not inputs[0][-1].any()
    for ours, x in zip(extractor.extract("audio", inputs), inputs, strict=True):
        np.testing.assert_allclose(ours, official_style(tiny_model, "audio", x, True, 0), rtol=0, atol=1e-5)


@pytest.mark.slow  # end to end through the CLI subprocess
def test_text_and_audio_files_through_the_cli(tmp_path, word_tokenizer, tiny_model):
    from transformers import AutoTokenizer

    inputs = tmp_path / "in"
    (inputs / "texts").mkdir(parents=True)
    long_text = "\n".join(" ".join(f"w{(i * 7 + j) % 200}" for j in range(40)) for i in range(6))
    (inputs / "texts" / "long.txt").write_text(long_text + "\n" + long_text.split("\n")[0], encoding="utf-8")
    (inputs / "texts" / "short.txt").write_text("w1 w2 w3\n\nw4", encoding="utf-8")
    np.save(inputs / "mert.npy", np.random.default_rng(1).normal(size=(1, 150, 32)).astype(np.float32))
    out = tmp_path / "out"
    result = run_extract(str(inputs), str(out), "--get_global", *TINY, f"--TEXT_MODEL_NAME={word_tokenizer}")
    assert result.returncode == 0, result.stderr
    extractor = FeatureExtractor(tiny_model, tokenizer=AutoTokenizer.from_pretrained(word_tokenizer))
    long_ids = extractor.text_input(long_text)
    assert len(long_ids) > 128  # segmented; the duplicated last line was dropped
    assert long_ids[0] == 0 and long_ids[-1] == 2 and (long_ids == 2).sum() == 6
    for name, x in [("texts/long.npy", long_ids),
                    ("texts/short.npy", extractor.text_input("w1 w2 w3\n\nw4"))]:
        np.testing.assert_allclose(np.load(out / name), official_style(tiny_model, "text", x, True, 1),
                                   rtol=0, atol=1e-5)
    audio = extractor.audio_input(np.load(inputs / "mert.npy"))
    np.testing.assert_allclose(np.load(out / "mert.npy"), official_style(tiny_model, "audio", audio, True, 0),
                               rtol=0, atol=1e-5)


@pytest.mark.slow  # end to end through the CLI subprocess
def test_bad_files_are_reported_and_skipped(tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    shutil.copy(OFFICIAL / "outputs" / "mtf" / "m21test_test01.mtf", inputs / "good piece $ [1].mtf")
    (inputs / "empty.abc").write_bytes(b"")
    (inputs / "latin1.abc").write_bytes("T:caf\xe9\nK:C\nabc|\n".encode("latin-1"))
    (inputs / "broken.npy").write_bytes(b"not an array")
    out, log = tmp_path / "out", tmp_path / "errors.jsonl"
    result = run_extract(str(inputs), str(out), "--get_global", *TINY, "--error_log", str(log))
    assert result.returncode == 0, result.stderr
    assert "1 extracted" in result.stdout and "3 failed" in result.stdout
    assert sorted(p.name for p in out.iterdir()) == ["good piece $ [1].npy"]  # features only
    saved = json.loads((tmp_path / "out.extract_config.json").read_text())
    assert saved["get_global"] is True and saved["weights"] == str(TINY_WEIGHTS)
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert {r["file"].rsplit("/", 1)[-1] for r in records} == {"empty.abc", "latin1.abc", "broken.npy"}
    assert all(r["reason"] for r in records)
    # resume: the finished file is skipped, the failures are retried (and fail again)
    again = run_extract(str(inputs), str(out), "--get_global", *TINY, "--error_log", str(log))
    assert "0 extracted, 1 skipped" in again.stdout
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*"))


def test_cli_rejects_unknown_config_key(tmp_path):
    result = run_extract(str(tmp_path), str(tmp_path / "o"), "--EXTRACT_DTYPEE=bfloat16")
    assert result.returncode == 2
    assert "unknown config key 'EXTRACT_DTYPEE'" in result.stderr and "EXTRACT_DTYPE" in result.stderr


def test_missing_tokenizer_and_bad_dtype_are_clear_errors(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "caption.txt").write_text("a calm piano piece", encoding="utf-8")
    result = run_extract(str(tmp_path / "in"), str(tmp_path / "out"), *TINY,
                         f"--TEXT_MODEL_NAME={tmp_path / 'no_tokenizer_here'}")
    assert result.returncode == 2
    assert "text tokenizer" in result.stderr and "TEXT_MODEL_NAME" in result.stderr
    assert "Traceback" not in result.stderr
    result = run_extract(str(tmp_path / "in"), str(tmp_path / "out"), *TINY, "--EXTRACT_DTYPE=bf16")
    assert result.returncode == 2 and "EXTRACT_DTYPE must be float32, bfloat16 or float16" in result.stderr


def test_missing_weights_fail_before_the_tokenizer_is_loaded(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "caption.txt").write_text("a calm piano piece", encoding="utf-8")
    result = run_extract(str(tmp_path / "in"), str(tmp_path / "out"), "--weights", str(tmp_path / "missing.pth"),
                         "--model_config", str(TINY_MODEL_CONFIG), f"--TEXT_MODEL_NAME={tmp_path / 'no_tokenizer'}")
    assert result.returncode == 2
    assert "checkpoint not found" in result.stderr and "--weights" in result.stderr
    assert "tokenizer" not in result.stderr and "Traceback" not in result.stderr  # the tokenizer was not tried
    assert not (tmp_path / "out.extract_config.json").exists()
    result = run_extract(str(tmp_path / "in"), str(tmp_path / "out"), *TINY[:2], "--model_config",
                         str(tmp_path / "no_sizes.json"), f"--TEXT_MODEL_NAME={tmp_path / 'no_tokenizer'}")
    assert result.returncode == 2 and "tokenizer" not in result.stderr  # the settings before the tokenizer too


def test_onednn_fast_path_matches_and_restores_the_model(tiny_model):
    extractor = FeatureExtractor(tiny_model)
    if not extractor.use_onednn:
        pytest.skip("oneDNN fused linear not available in this torch build")
    inputs = [extractor.symbolic_input((OFFICIAL / "outputs" / "mtf" / n).read_text(encoding="utf-8"))
              for n in ("m21test_test19.mtf", "m21test_test01.mtf")]
    hooked = tiny_model.symbolic_proj
    hook = hooked.forward  # an instance-level forward, as hook libraries install
    hooked.forward = hook
    try:
        fast = extractor.extract("symbolic", inputs)
        assert hooked.forward is hook
    finally:
        del hooked.forward
    assert not any("forward" in vars(m) for m in tiny_model.modules())  # class forwards are back
    extractor.use_onednn = False
    plain = extractor.extract("symbolic", inputs)
    for a, b in zip(fast, plain, strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)


def test_bfloat16_path_is_close_to_float32(tiny_model):
    extractor = FeatureExtractor(tiny_model)
    inputs = [extractor.symbolic_input((OFFICIAL / "outputs" / "mtf" / n).read_text(encoding="utf-8"))
              for n in ("m21test_test19.mtf", "m21test_test01.mtf")]
    reference = extractor.extract("symbolic", inputs)
    extractor.dtype = "bfloat16"
    low = extractor.extract("symbolic", inputs)
    assert not any("forward" in vars(m) for m in tiny_model.modules())
    for a, b in zip(low, reference, strict=True):
        a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
        assert a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) > 0.999


def test_from_config_takes_every_extraction_setting(tiny_model):
    cfg = runconfig.build_config(overrides={
        "EXTRACT_DTYPE": "bfloat16", "EXTRACT_TOKENS_PER_BATCH": 300, "EXTRACT_MAX_PADDING": 0.25,
        "EXTRACT_DEVICE": "cpu", "PATCH_LENGTH": 100, "MAX_TEXT_LENGTH": 1000, "MAX_AUDIO_LENGTH": 64})
    extractor = FeatureExtractor.from_config(tiny_model, cfg, tokenizer="a tokenizer")
    assert (extractor.dtype, extractor.tokens_per_batch, extractor.max_padding) == ("bfloat16", 300, 0.25)
    assert extractor.device == torch.device("cpu") and extractor.tokenizer == "a tokenizer"
    # text: 514 positions less the padding offset of 2 cap MAX_TEXT_LENGTH
    assert extractor.segment_lengths == {"symbolic": 100, "text": 512, "audio": 64}
    from_defaults = FeatureExtractor.from_config(tiny_model, runconfig.default_config(), device="cpu")
    plain = FeatureExtractor(tiny_model)
    assert from_defaults.segment_lengths == SEGMENT_LENGTHS
    for name in ("device", "dtype", "tokens_per_batch", "max_padding", "segment_lengths"):
        assert getattr(from_defaults, name) == getattr(plain, name), name  # the signature's defaults are config.py's
    with pytest.raises(ValueError, match="EXTRACT_DTYPE must be float32, bfloat16 or float16, not 'fp8'"):
        FeatureExtractor.from_config(tiny_model, {**cfg, "EXTRACT_DTYPE": "fp8"})


def test_feature_folder_config_goes_beside_the_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert extract_config_path("features/abc/") == tmp_path / "features" / "abc.extract_config.json"
    assert extract_config_path(".") == tmp_path.parent / f"{tmp_path.name}.extract_config.json"
    assert extract_clamp3.build_parser().parse_args(["in", "out"]).error_log == str(
        REPO_ROOT / "logs" / "extract_clamp3_failures.jsonl")


def test_cli_paths_typed_are_relative_to_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "in").mkdir()
    shutil.copy(OFFICIAL / "outputs" / "mtf" / "m21test_test01.mtf", tmp_path / "in")
    shutil.copy(TINY_MODEL_CONFIG, tmp_path / "sizes.json")
    shutil.copy(TINY_WEIGHTS, tmp_path / "tiny.pth")
    monkeypatch.chdir(tmp_path)
    argv = ["in", "out", "--get_global", "--weights", "tiny.pth", "--model_config", "sizes.json", "--quiet",
            "--MODEL_CONFIG=no/such/file.json", "--EXTRACT_DEVICE=cpu"]  # what is typed wins over the configuration
    assert extract_clamp3.main(argv) == 0
    assert np.load(tmp_path / "out" / "m21test_test01.npy").shape == (1, 32)
    saved = json.loads((tmp_path / "out.extract_config.json").read_text())
    assert saved["model_config"]["projection_size"] == 32 and Path(saved["weights"]).samefile("tiny.pth")
