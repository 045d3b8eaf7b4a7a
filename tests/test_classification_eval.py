"""Classification on raw files with the tiny fixture model: classification/evaluate_cls.py (probe and
zero-shot, base against adapters, paired) and classification/zero_shot_cls.py (labels of a folder)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import runconfig
from embedder import Embedder, choose_models
from evaluation.cli import run_classification
from fileio import write_jsonl
from helpers import OFFICIAL, TINY_MODEL_CONFIG, TINY_WEIGHTS, load_script


def model_arguments(tmp_path: Path, tokenizer: Path, adapter_dirs: dict[str, Path]) -> list[str]:
    return ["--weights", str(TINY_WEIGHTS), "--model_config", str(TINY_MODEL_CONFIG), "--cache_dir",
            str(tmp_path / "cache"), f"--TEXT_MODEL_NAME={tokenizer}", "--EXTRACT_DEVICE=cpu",
            f"--LORA_ABC_ADAPTER_DIR={adapter_dirs['abc']}", f"--LORA_MTF_ADAPTER_DIR={adapter_dirs['mtf']}",
            "--EVAL_BOOTSTRAP=200"]


def labelled_sets(tmp_path: Path) -> tuple[Path, Path]:
    """Sheet music (interleaved ABC) labelled 'sheet' and MIDI text (MTF) labelled 'midi', split in two."""
    rows = []
    for sub, label in (("int_abc", "sheet"), ("mtf", "midi")):
        for path in sorted((OFFICIAL / "outputs" / sub).iterdir())[:16]:
            target = tmp_path / "music" / path.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, target)
            rows.append({"id": path.stem, "filepaths": [f"music/{path.name}"], "label": label})
    train, test = rows[0::2], rows[1::2]
    test.append({"id": "nothing", "filepaths": ["music/missing.abc"], "label": "sheet"})  # fails, is left out
    return write_jsonl(tmp_path / "train.jsonl", train), write_jsonl(tmp_path / "test.jsonl", test)


def test_evaluate_cls_probe_beats_chance_and_compares_systems(tmp_path, word_tokenizer, adapters, capsys):
    train, test = labelled_sets(tmp_path)
    output = tmp_path / "report.json"
    code = run_classification(["--train", str(train), "--test", str(test), "--min_count", "2", "--quiet",
                               "--output", str(output), "--error_log", str(tmp_path / "failures.jsonl"),
                               *model_arguments(tmp_path, word_tokenizer, adapters)])
    assert code == 0
    report = json.loads(output.read_text(encoding="utf-8"))
    assert set(report["systems"]) == {"baseline", "lora"} and sorted(report["labels"]) == ["midi", "sheet"]
    for system in report["systems"].values():
        assert system["probe"]["n"] == 16  # the missing file is named and left out, the rest classified
        assert system["probe"]["accuracy"] > 0.75  # chance is 0.5: the two formats are easy to tell apart
        assert len(system["zero_shot"]["predictions"]) == 16
        assert np.array(system["probe"]["confusion_matrix"]).sum() == 16
    assert set(report["comparison"]) == {"zero_shot", "probe"}
    assert report["comparison"]["probe"]["n"] == 16
    assert "missing.abc" in (tmp_path / "failures.jsonl").read_text(encoding="utf-8")
    summary = output.with_suffix(".txt").read_text(encoding="utf-8")
    assert "lora - baseline, probe" in summary


def test_evaluate_cls_setup_errors(tmp_path, word_tokenizer, adapters, capsys):
    train, test = labelled_sets(tmp_path)
    common = model_arguments(tmp_path, word_tokenizer, adapters)
    assert run_classification(["--train", str(train), "--test", str(tmp_path / "none.jsonl"), *common]) == 2
    assert "labelled set not found" in capsys.readouterr().err
    assert run_classification(["--train", str(train), "--test", str(test), "--labels", "sheet", *common]) == 2
    assert "fewer than two labels" in capsys.readouterr().err


def test_zero_shot_cls_labels_every_file_by_the_nearest_prompt(tmp_path, word_tokenizer, adapters):
    folder = tmp_path / "pieces"
    folder.mkdir()
    for index, path in enumerate(sorted((OFFICIAL / "outputs" / "int_abc").iterdir())[:4]):
        shutil.copy(path, folder / f"{'w1' if index % 2 else 'w2'}_{path.name}")
    shutil.copy(OFFICIAL / "inputs" / "mid" / "edge_multitrack_8.mid", folder / "w1_midi.mid")
    (folder / "w2_broken.mid").write_bytes(b"MThd")
    module = load_script("classification/zero_shot_cls.py")
    output = tmp_path / "labels.json"
    common = model_arguments(tmp_path, word_tokenizer, adapters)
    assert module.main([str(folder), str(output), "--labels", "w1,w2", "--template", "{label} w3",
                        "--label_from", "name", "--quiet", "--error_log", str(tmp_path / "f.jsonl"), *common]) == 0
    predicted = json.loads(output.read_text(encoding="utf-8"))
    assert len(predicted) == 5 and not any("broken" in name for name in predicted)
    # The same decision computed here from the features: argmax of the cosine to each prompt.
    cfg = runconfig.build_config(overrides={"MODEL_CONFIG": str(TINY_MODEL_CONFIG), "TEXT_MODEL_NAME":
                                            str(word_tokenizer), "LORA_ABC_ADAPTER_DIR": str(adapters["abc"]),
                                            "LORA_MTF_ADAPTER_DIR": str(adapters["mtf"]), "EXTRACT_DEVICE": "cpu"})
    embedder = Embedder(choose_models(cfg, weights=TINY_WEIGHTS), cache_dir=tmp_path / "cache")
    prompts = embedder.embed_texts(["w1 w3", "w2 w3"])
    prompts /= np.linalg.norm(prompts, axis=1, keepdims=True)
    for name, label in predicted.items():
        feature = embedder.embed_files([Path(name)])[0].feature[0]
        assert label == ("w1", "w2")[int(np.argmax(prompts @ (feature / np.linalg.norm(feature))))]
    report = json.loads((tmp_path / "labels.report.json").read_text(encoding="utf-8"))
    assert report["n"] == 5 and np.array(report["confusion_matrix"]).sum() == 5
    assert set(json.loads((tmp_path / "labels.scores.json").read_text())["scores"]) == set(predicted)


def test_zero_shot_beats_chance_after_a_short_adapter_training(tmp_path, word_tokenizer):
    """End to end: a tiny ABC adapter trained on pieces whose only text is their kind's word (w1:
    engraved scores, w2: folk tunes), then zero_shot_cls.py labels the pieces by the nearest prompt."""
    import train_clamp3_lora

    music = tmp_path / "music"
    music.mkdir()
    rows = []
    for sub, label in (("int_abc", "w1"), ("int_abc_from_abc_inputs", "w2")):
        for path in sorted((OFFICIAL / "outputs" / sub).glob("*.abc")):
            name = f"{label}_{path.name}"
            shutil.copy(path, music / name)
            rows.append({"id": name, "filepaths": [f"music/{name}"], "caption": label})
    write_jsonl(tmp_path / "train_abc.jsonl", rows)
    write_jsonl(tmp_path / "valid_abc.jsonl", rows[::4])
    settings = {"LORA_ABC_TRAIN_JSONL": str(tmp_path / "train_abc.jsonl"),
                "LORA_ABC_VALID_JSONL": str(tmp_path / "valid_abc.jsonl"), "TEXT_MODEL_NAME": str(word_tokenizer),
                "LORA_LOG_DIR": str(tmp_path / "run"), "LORA_ABC_ADAPTER_DIR": str(tmp_path / "adapter_abc"),
                "LORA_BATCH_SIZE": 2, "LORA_NUM_EPOCHS": 20, "LORA_LEARNING_RATE": 1e-2, "LORA_WARMUP_STEPS": 0,
                "LORA_R": 4, "NUM_WORKERS": 0, "TEXT_CACHE_DIR": str(tmp_path / "text_cache"), "LORA_PATIENCE": 0,
                "LOSS": "normalized", "LORA_ABC_MODULES_TO_SAVE": '["symbolic_proj"]', "TEXT_DROPOUT": False,
                "TRAIN_DEVICE": "cpu"}
    assert train_clamp3_lora.main(["--format", "abc", "--weights", str(TINY_WEIGHTS), "--model_config",
                                   str(TINY_MODEL_CONFIG), "--quiet",
                                   *(f"--{key}={value}" for key, value in settings.items())]) == 0
    module = load_script("classification/zero_shot_cls.py")
    common = ["--weights", str(TINY_WEIGHTS), "--model_config", str(TINY_MODEL_CONFIG), "--cache_dir",
              str(tmp_path / "cache"), f"--TEXT_MODEL_NAME={word_tokenizer}", "--EXTRACT_DEVICE=cpu",
              f"--LORA_ABC_ADAPTER_DIR={tmp_path / 'adapter_abc'}", "--quiet"]
    accuracy = {}
    for system, extra in (("adapter", []), ("base", ["--no_adapter"])):
        output = tmp_path / f"{system}.json"
        assert module.main([str(music), str(output), "--labels", "w1,w2", "--template", "{label}", "--label_from",
                            "name", *common, *extra]) == 0
        accuracy[system] = json.loads(output.with_name(f"{system}.report.json").read_text())["accuracy"]
    chance = max(len([r for r in rows if r["caption"] == label]) for label in ("w1", "w2")) / len(rows)
    assert accuracy["adapter"] > max(chance, accuracy["base"]) + 0.1, accuracy
