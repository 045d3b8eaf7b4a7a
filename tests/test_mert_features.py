"""MERT features from audio files (code/audio/) against the official fixtures in
``../shared/fixtures/official/mert``: the 24 kHz waveform, the per-window hidden states
(``frames``) and their ``--mean_features`` form (``mean``) of every case, within 1e-5 and with exact
shapes; no output exactly where the official code writes none, with the reason. The tiny model's
weights are random: these tests check the steps, not MERT-v1-95M itself."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from audio.decode import AudioDecodeError, decode_audio
from audio.mert_features import MertExtractor, load_waveform, mean_features
from audio.mert_model import MertModelError, load_mert, resolve_mert_folder
from audio.resample import resample, sinc_kernel
from audio.windows import TooShortError, window_bounds
from helpers import OFFICIAL

MERT = OFFICIAL / "mert"
TOLERANCE = 1e-5
CASES = json.loads((MERT / "cases.json").read_text(encoding="utf-8"))["cases"] if MERT.is_dir() else []
IDS = [case["id"] for case in CASES]


@pytest.fixture(scope="module")
def extractor() -> MertExtractor:
    return MertExtractor.load(str(MERT / "model"), device="cpu")


@pytest.fixture(scope="module")
def waveforms() -> dict[str, np.ndarray]:
    return {case["id"]: load_waveform(MERT / case["input"]) for case in CASES}


def test_every_case_is_here():
    assert len(CASES) == 9 and {case["format"] for case in CASES} == {"wav", "mp3", "flac"}


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_waveform_matches_the_official_loader(case, waveforms):
    expected = np.load(MERT / case["waveform_24k"]["file"])
    got = waveforms[case["id"]][None]
    assert got.dtype == np.float32 and got.shape == expected.shape == tuple(case["waveform_24k"]["shape"])
    assert np.abs(got - expected).max() <= TOLERANCE


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_frames_and_mean_match_the_official_outputs(case, extractor, waveforms):
    result = extractor.features([waveforms[case["id"]]])[0]
    expected = case["expected"]
    if not case["windows"]:  # s06: 0.5 s, no window left: no output, and the reason
        assert expected["frames"] is None and isinstance(result, TooShortError)
        assert "0.50 s" in str(result) and "at least 1 s" in str(result)
        return
    assert isinstance(result, np.ndarray) and result.dtype == np.float32
    windows = len(case["windows"])
    assert result.shape == (3, windows, 32)
    if expected["frames"] is None:  # s09: FLAC, which the official script does not collect; accepted here
        assert not case["collected_by_official_script"]
        return
    frames, mean = np.load(MERT / expected["frames"]["file"]), np.load(MERT / expected["mean"]["file"])
    assert result.shape == frames.shape and mean_features(result).shape == mean.shape == (1, windows, 32)
    assert np.abs(result - frames).max() <= TOLERANCE
    assert np.abs(mean_features(result) - mean).max() <= TOLERANCE


def test_windows_of_many_files_batched_equal_one_at_a_time(extractor, waveforms):
    together = extractor.features(list(waveforms.values()))
    for (name, waveform), batched in zip(waveforms.items(), together, strict=True):
        alone = extractor.features([waveform])[0]
        if isinstance(alone, TooShortError):
            assert isinstance(batched, TooShortError), name
            continue
        assert np.abs(batched - alone).max() < 1e-6, name


def test_window_rule():
    assert window_bounds(24000) == [(0, 24000)]  # exactly 1 s is kept
    assert window_bounds(134400) == [(0, 120000)]  # a 0.6 s tail is dropped
    assert window_bounds(144000) == [(0, 120000), (120000, 144000)]
    with pytest.raises(TooShortError, match=r"0\.50 s \(12000 samples"):
        window_bounds(12000)
    with pytest.raises(TooShortError):
        window_bounds(23999)


def test_mp3_encoder_delay_is_removed():
    samples, rate = decode_audio(MERT / "inputs" / "s08_chord_stereo_44k1_7p3s.mp3")
    assert rate == 44100 and samples.shape == (2, 321930) and samples.dtype == np.float32  # not 323712


def test_ogg_opus_decodes_aligned(tmp_path):
    """An OGG (Opus) copy of a WAV case: the encoder's pre-skip removed, so the waveform lines up
    with the WAV's (a shift of a few ms would leave a poor correlation at lag 0)."""
    import av

    source, rate = decode_audio(MERT / "inputs" / "s02_chord_stereo_44k1_5p0s.wav")
    target = tmp_path / "chord.ogg"
    with av.open(str(target), "w") as out:
        stream = out.add_stream("libopus", rate=48000, layout="stereo")
        resampled = resample(torch.from_numpy(source), rate, 48000).numpy()
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(resampled.T.reshape(1, -1)), format="flt",
                                           layout="stereo")
        frame.sample_rate = 48000
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    decoded, decoded_rate = decode_audio(target)
    assert decoded_rate == 48000 and abs(decoded.shape[1] - resampled.shape[1]) < 960
    n = min(decoded.shape[1], resampled.shape[1])
    assert np.corrcoef(decoded[0, :n], resampled[0, :n])[0, 1] > 0.95
    assert load_waveform(target).shape[0] == pytest.approx(120000, abs=480)


def test_undecodable_file_is_named(tmp_path):
    (tmp_path / "x.wav").write_bytes(b"RIFF0000WAVE")
    with pytest.raises(AudioDecodeError, match="cannot decode"):
        decode_audio(tmp_path / "x.wav")


def test_resampler_kernel_and_length():
    kernels, width = sinc_kernel(44100, 24000)  # reduced to 147 -> 80
    assert kernels.dtype == torch.float32 and kernels.shape == (80, 1, 2 * width + 147) and width == 12
    assert kernels.sum(dim=-1).sub(1).abs().max() < 1e-3  # every output phase passes a constant unchanged
    assert resample(torch.zeros(1, 1001), 16000, 24000).shape == (1, 1502)  # ceil(1001 * 3 / 2)
    x = torch.ones(1, 10)
    assert resample(x, 24000, 24000) is x


def test_old_weight_norm_names_load_the_same_model(tmp_path, extractor, waveforms):
    from safetensors.torch import load_file, save_file

    state = load_file(str(MERT / "model" / "model.safetensors"))
    renamed = {k.replace("parametrizations.weight.original0", "weight_g")
               .replace("parametrizations.weight.original1", "weight_v"): v for k, v in state.items()}
    folder = tmp_path / "old_names"
    folder.mkdir()
    shutil.copy(MERT / "model" / "config.json", folder)
    save_file(renamed, str(folder / "model.safetensors"))
    old = MertExtractor(load_mert(folder))
    waveform = waveforms["s03_noise_mono_48k_7p3s"]
    assert np.array_equal(old.features([waveform])[0], extractor.features([waveform])[0])
    del renamed["encoder.layers.1.attention.q_proj.weight"]
    save_file(renamed, str(folder / "model.safetensors"))
    with pytest.raises(MertModelError, match="missing .*q_proj"):
        load_mert(folder)


def test_a_missing_mert_model_says_how_to_fix_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name in (str(tmp_path / "nowhere"), "someone/not-cached-mert", ""):
        with pytest.raises(MertModelError) as info:
            resolve_mert_folder(name)
        message = str(info.value)
        assert "\n" not in message and "Fix: --MERT_MODEL_PATH=DIR" in message
    assert resolve_mert_folder(str(MERT / "model")) == MERT / "model"


def test_bfloat16_is_close(waveforms):
    bf16 = MertExtractor.load(str(MERT / "model"), dtype="bfloat16")
    fp32 = MertExtractor.load(str(MERT / "model"))
    waveform = waveforms["s02_chord_stereo_44k1_5p0s"]
    assert np.abs(bf16.features([waveform])[0] - fp32.features([waveform])[0]).max() < 0.2
    with pytest.raises(ValueError, match="MERT_DTYPE"):
        MertExtractor.load(str(MERT / "model"), dtype="float16")


def test_file_features_is_the_official_file(extractor):
    case = next(c for c in CASES if c["id"].startswith("s04"))
    got = extractor.file_features(MERT / case["input"], mean=True)
    assert np.abs(got - np.load(MERT / case["expected"]["mean"]["file"])).max() <= TOLERANCE
    with pytest.raises(TooShortError):
        extractor.file_features(MERT / "inputs" / "s06_clicks_mono_16k_0p5s.wav")



def test_a_folder_laid_out_as_mert_v1_95m_loads_and_a_cqt_model_is_refused(tmp_path, extractor, waveforms):
    """MERT-v1-95M's hub folder names its own model class (model_type mert_model, auto_map to remote code) and
    fields HuBERT lacks: they are read by field name, no remote code runs, and the features are the same."""
    config = json.loads((MERT / "model" / "config.json").read_text())
    folder = tmp_path / "MERT-v1-95M-like"
    folder.mkdir()
    hub_like = {**config, "model_type": "mert_model", "architectures": ["MERTModel"], "sample_rate": 24000,
                "auto_map": {"AutoConfig": "configuration_MERT.MERTConfig", "AutoModel": "modeling_MERT.MERTModel"},
                "conv_pos_batch_norm": False, "_name_or_path": "m-a-p/MERT-v1-95M"}
    (folder / "config.json").write_text(json.dumps(hub_like))
    shutil.copy(MERT / "model" / "model.safetensors", folder)
    waveform = waveforms["s08_chord_stereo_44k1_7p3s"]
    assert np.array_equal(MertExtractor(load_mert(folder)).features([waveform])[0], extractor.features([waveform])[0])
    (folder / "config.json").write_text(json.dumps({**hub_like, "feature_extractor_cqt": True}))
    with pytest.raises(MertModelError, match="feature_extractor_cqt"):
        load_mert(folder)
