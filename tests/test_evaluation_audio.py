"""The audio block of evaluate_baseline/evaluate_lora and compare_results: recordings of test pieces (rendered
here from the pieces' MIDI by a plain synthesiser) through the tiny MERT model and the tiny CLaMP 3 audio
tower, ranked against the pieces' sheet music and MIDI (pair_id) and against their texts. Both tiny models are
random: this checks the plumbing (rows, pairing, what can and cannot move with an adapter), not the numbers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from audio.synth import render_midi, write_wav
from helpers import OFFICIAL, TINY_MODEL_CONFIG, TINY_WEIGHTS

MERT = OFFICIAL / "mert"
PAIRED = ["bach_bwv190.7-inst", "demos_nested_tuplet_finale_test", "schumann_robert_opus41no1_movement2"]
MTF_ONLY = ["m21test_test01", "m21test_test05"]
ABC_ONLY = ["bach_bwv1.6", "bach_bwv67.4"]


def words(rng: np.random.Generator, n: int = 5) -> str:
    return " ".join(f"w{i}" for i in rng.integers(0, 200, n))


def write_sets(root: Path) -> Path:
    """test_abc.jsonl and test_mtf.jsonl (three pieces in both formats), and audio.jsonl: a recording of
    each MTF piece, rendered from its MIDI (one given as MERT .npy), with the piece's caption."""
    rng = np.random.default_rng(0)
    records: dict[str, list[dict]] = {"abc": [], "mtf": []}
    for fmt in ("abc", "mtf"):
        (root / fmt).mkdir(parents=True)
    for number, name in enumerate(PAIRED + ABC_ONLY):
        shutil.copyfile(OFFICIAL / "outputs" / "int_abc" / f"{name}.abc", root / "abc" / f"a{number}.abc")
        record = {"id": f"a{number}", "filepaths": [f"abc/a{number}.abc"], "texts": {"caption": words(rng)}}
        if name in PAIRED:
            record["pair_id"] = name
        records["abc"].append(record)
    audio_records = []
    (root / "audio").mkdir()
    for number, name in enumerate(PAIRED + MTF_ONLY):
        midi = OFFICIAL / "inputs" / "mid" / (f"m21write_{name}.mid" if name in PAIRED else f"{name}.mid")
        mtf = OFFICIAL / "outputs" / "mtf" / (midi.stem + ".mtf")
        shutil.copyfile(mtf, root / "mtf" / f"m{number}.mtf")
        caption = words(rng)
        record = {"id": f"m{number}", "filepaths": [f"mtf/m{number}.mtf"], "texts": {"caption": caption}}
        if name in PAIRED:
            record["pair_id"] = name
        records["mtf"].append(record)
        wav = write_wav(root / "audio" / f"r{number}.wav", render_midi(midi, rate=22050, max_seconds=6.0), 22050)
        audio_records.append({"id": f"r{number}", "filepaths": [f"audio/{wav.name}"], "texts": {"caption": caption},
                              **({"pair_id": name} if name in PAIRED else {})})
    for fmt, rows in records.items():
        (root / f"test_{fmt}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    # One recording as ready-made MERT features, the form preprocessing/audio/extract_mert.py --mean_features writes.
    from audio.mert_features import MertExtractor

    mert = MertExtractor.load(str(MERT / "model"))
    np.save(root / "audio" / "r1.npy", mert.file_features(root / "audio" / "r1.wav", mean=True))
    audio_records[1]["filepaths"] = ["audio/r1.npy"]
    audio = root / "audio.jsonl"
    audio.write_text("".join(json.dumps(r) + "\n" for r in audio_records), encoding="utf-8")
    return audio


@pytest.fixture(scope="module")
def chain(tmp_path_factory, word_tokenizer, adapters):
    from evaluation import cli

    root = tmp_path_factory.mktemp("audio_evaluation")
    audio = write_sets(root / "test")
    results = root / "results"
    settings = [f"--TEST_DATA_DIR={root / 'test'}", f"--RESULTS_DIR={results}", f"--TEXT_MODEL_NAME={word_tokenizer}",
                "--EVAL_BOOTSTRAP=100", "--EXTRACT_DEVICE=cpu", f"--LORA_ABC_ADAPTER_DIR={adapters['abc']}",
                f"--LORA_MTF_ADAPTER_DIR={adapters['mtf']}", f"--LORA_LOG_DIR={root / 'logs'}",
                f"--MERT_MODEL_PATH={MERT / 'model'}"]
    common = [f"--weights={TINY_WEIGHTS}", f"--model_config={TINY_MODEL_CONFIG}", *settings, "--quiet"]
    for system in ("baseline", "lora"):
        assert cli.run_evaluation(system, [*common, "--audio_test", str(audio)], system) == 0
    assert cli.run_comparison([*settings, "--no_plots"]) == 0
    return {"root": root, "results": results, "common": common, "settings": settings, "audio": audio}


def load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def test_each_report_has_the_audio_rows(chain):
    for system in ("baseline", "lora"):
        report = load(chain["results"] / f"evaluation_{system}_report.json")
        audio = report["audio"]
        assert audio["n_pieces"] == 5 and Path(audio["mert_model"]) == MERT / "model"
        caption = audio["fields"]["caption"]
        assert caption["n_pairs"] == 5 and caption["text_to_audio"]["n_queries"] == 5
        assert caption["text_to_audio"]["pool_size"] == 5 and "ci" in caption["audio_to_text"]
        assert set(audio["cross"]) == {"abc", "mtf"}
        for fmt, (to_audio, from_audio) in (("abc", ("sheet_to_audio", "audio_to_sheet")),
                                            ("mtf", ("midi_to_audio", "audio_to_midi"))):
            block = audio["cross"][fmt]
            assert block["n_pairs"] == 3 and block[to_audio]["pool_size"] == 3 and block[from_audio]["n_queries"] == 3
        assert any("audio" in note for note in report["notes"])
        rows = [json.loads(line) for line in (chain["results"] / f"evaluation_{system}_ranks.jsonl").open()]
        audio_rows = [row for row in rows if row["set"] == "audio"]
        assert {(row["field"], row["direction"]) for row in audio_rows} == {
            ("caption", "text_to_audio"), ("caption", "audio_to_text"), ("pair_id", "sheet_to_audio"),
            ("pair_id", "audio_to_sheet"), ("pair_id", "midi_to_audio"), ("pair_id", "audio_to_midi")}
        assert {row["query"] for row in audio_rows if row["direction"] == "sheet_to_audio"} == set(PAIRED)


def test_only_the_symbolic_side_of_the_audio_rows_moves_with_an_adapter(chain):
    base, adapted = (load(chain["results"] / f"evaluation_{s}_report.json")["audio"] for s in ("baseline", "lora"))
    assert base["fields"] == adapted["fields"]  # text and audio towers: the base's in both systems
    for fmt in ("abc", "mtf"):
        assert base["cross"][fmt]["pair_cosines"] != adapted["cross"][fmt]["pair_cosines"], fmt
    comparison = load(chain["results"] / "evaluation_comparison_report.json")
    rows = comparison["results"]["audio"]
    text = rows["caption"]["pair"]["text_to_audio"]["expected"]["mrr"]
    assert text["delta"] == 0 and text["verdict"] == "no significant difference"
    for direction in ("sheet_to_audio", "audio_to_sheet", "midi_to_audio", "audio_to_midi"):
        entry = rows["pair_id"]["pair"][direction]
        assert entry["n_queries"] == 3 and {"delta", "delta_ci", "p_value", "verdict"} <= set(entry["expected"]["mrr"])
    assert comparison["audio"]["pairs"] == {"abc": 3, "mtf": 3}
    summary = (chain["results"] / "evaluation_summary.txt").read_text(encoding="utf-8")
    assert "audio/recordings sheet to audio" in summary and "recordings (" in summary


def test_one_report_without_the_audio_block_is_not_paired(chain, tmp_path, capsys):
    from evaluation import cli

    out = tmp_path / "results"
    settings = [s for s in chain["settings"] if not s.startswith("--RESULTS_DIR")] + [f"--RESULTS_DIR={out}"]
    common = [s for s in chain["common"] if not s.startswith("--RESULTS_DIR")] + [f"--RESULTS_DIR={out}"]
    assert cli.run_evaluation("baseline", [*common, "--audio_test", str(chain["audio"])], "baseline") == 0
    assert cli.run_evaluation("lora", common, "lora") == 0
    assert cli.run_comparison([*settings, "--no_plots"]) == 2
    assert "only the baseline report has the audio block" in capsys.readouterr().err


def test_an_unusable_recording_is_an_error_naming_it(chain, tmp_path, capsys):
    from evaluation import cli

    short = tmp_path / "short.jsonl"
    shutil.copy(MERT / "inputs" / "s06_clicks_mono_16k_0p5s.wav", tmp_path / "short.wav")
    short.write_text(json.dumps({"id": "x", "filepaths": ["short.wav"], "pair_id": PAIRED[0]}) + "\n")
    assert cli.run_evaluation("baseline", [*chain["common"], f"--RESULTS_DIR={tmp_path}", "--audio_test",
                                           str(short)], "baseline") == 2
    error = capsys.readouterr().err
    assert "short.wav" in error and "too short" in error
    missing = tmp_path / "missing.jsonl"
    missing.write_text(json.dumps({"id": "x", "filepaths": ["gone.wav"]}) + "\n")
    assert cli.run_evaluation("baseline", [*chain["common"], "--audio_test", str(missing)], "baseline") == 2
    assert "file not found" in capsys.readouterr().err
    assert cli.run_evaluation("baseline", [*chain["common"], "--audio_test", str(chain["audio"]),
                                           f"--MERT_MODEL_PATH={tmp_path / 'no-mert'}"], "baseline") == 2
    assert "Fix: --MERT_MODEL_PATH=DIR" in capsys.readouterr().err


def test_the_synthesiser_renders_the_notes_of_a_midi_file(tmp_path):
    from audio.decode import decode_audio
    from audio.synth import midi_notes

    midi = OFFICIAL / "inputs" / "mid" / "m21test_test01.mid"
    notes = midi_notes(midi)
    assert notes and all(n.end > n.start for n in notes)
    samples = render_midi(midi, rate=16000)
    assert samples.dtype == np.float32 and abs(np.abs(samples).max() - 0.5) < 1e-6
    assert len(samples) == pytest.approx((max(n.end for n in notes) + 0.3) * 16000, abs=2)
    decoded, rate = decode_audio(write_wav(tmp_path / "x.wav", samples, 16000))
    assert rate == 16000 and decoded.shape == (1, len(samples)) and np.abs(decoded[0] - samples).max() < 1e-4
