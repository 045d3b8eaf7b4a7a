"""code/classify.py, code/feature_labels.py and classification/{train,inference}_cls.py on synthetic Gaussian clusters: the
official label rule and checkpoint layout, labels from files and folders, the report against brute
force, zero-shot, clear errors, and determinism. No model is loaded."""

from __future__ import annotations

import argparse
import json
import os

import classify
import feature_labels
import numpy as np
import pytest
import torch
from classify import CheckpointError, LinearProbe, ProbeConfig
from feature_labels import LabelError
from fileio import read_jsonl
from helpers import REPO_ROOT, load_script

CLASSIFICATION = REPO_ROOT / "classification"
DIM = 32
LABELS = ("folk", "jazz", "pop")
FAST = ["--num_epochs", "60", "--n_resamples", "200", "--quiet"]




train_cls = load_script(CLASSIFICATION / "train_cls.py")
inference_cls = load_script(CLASSIFICATION / "inference_cls.py")


def centres(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((len(LABELS), DIM)) * 3


def clusters(per_label: int = 20, seed: int = 0, noise_seed: int = 1) -> tuple[np.ndarray, list[str]]:
    """Items around the centres of ``seed``; ``noise_seed`` draws other items around the same centres."""
    rng = np.random.default_rng(noise_seed)
    x = np.concatenate([c + rng.standard_normal((per_label, DIM)) for c in centres(seed)]).astype(np.float32)
    return x, [label for label in LABELS for _ in range(per_label)]


def save(folder, relative: str, vector: np.ndarray) -> None:
    path = folder / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, np.asarray(vector, dtype=np.float32).reshape(1, -1))


def write_folder(folder, per_label: int = 20, noise_seed: int = 1, name=lambda label, n: f"{label}_{n}.npy"):
    x, labels = clusters(per_label, noise_seed=noise_seed)
    counters: dict[str, int] = {}
    for vector, label in zip(x, labels, strict=True):
        n = counters[label] = counters.get(label, -1) + 1
        save(folder, name(label, n), vector)
    return folder


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One training run through the script, shared by the tests that read its outputs."""
    root = tmp_path_factory.mktemp("trained")
    features = write_folder(root / "feats")
    out = root / "models"
    code = train_cls.main(["--train_folder", str(features), "--output", f"{out}/", *FAST])
    assert code == 0
    return root, features, out / "weights-feats.pth"


# ---------------------------------------------------------------------------------- train_cls.py

def test_training_beats_chance_and_writes_every_output(trained):
    _, _, weights = trained
    report = json.loads(weights.with_suffix(".report.json").read_text())
    assert report["set"] == "validation" and report["n"] == 12      # 20% of 20 per label, 3 labels
    assert report["accuracy"] > 0.9 and report["macro_f1"] > 0.9
    assert report["baselines"]["uniform"]["accuracy"] == pytest.approx(1 / 3)
    assert report["baselines"]["majority"]["accuracy"] == pytest.approx(1 / 3)
    low, high = report["interval"]["accuracy"]
    assert low <= report["accuracy"] <= high
    assert (weights.parent / "logs-feats.txt").read_text().startswith("epoch    1/60")
    summary = json.loads(weights.with_suffix(".summary.json").read_text())
    assert summary["training"]["n_train"] == 48 and summary["training"]["n_validation"] == 12
    assert summary["labels"] == list(LABELS)


def test_checkpoint_has_the_official_layout_and_loads_with_weights_only(trained):
    root, features, weights = trained
    checkpoint = torch.load(weights, map_location="cpu", weights_only=True)
    assert {"model", "labels", "input_size", "epoch", "best_epoch", "max_eval_acc"} <= set(checkpoint)
    assert set(checkpoint["model"]) == {"fc.weight", "fc.bias"}
    assert checkpoint["labels"] == {"folk": 0, "jazz": 1, "pop": 2}
    assert checkpoint["input_size"] == DIM
    assert checkpoint["model"]["fc.weight"].shape == (3, DIM)
    assert 1 <= checkpoint["best_epoch"] <= checkpoint["epoch"] <= 60

    # What an official-style loader does: a module with one Linear named fc, strict state dict, argmax.
    class Official(torch.nn.Module):
        def __init__(self, input_size: int, n: int):
            super().__init__()
            self.fc = torch.nn.Linear(input_size, n)

    model = Official(checkpoint["input_size"], len(checkpoint["labels"]))
    model.load_state_dict(checkpoint["model"])
    x, _ = clusters()
    index_to_label = {v: k for k, v in checkpoint["labels"].items()}
    with torch.no_grad():
        official = [index_to_label[int(i)] for i in model.fc(torch.from_numpy(x)).argmax(1)]
    assert LinearProbe.load(weights).predict(x) == official


def test_an_official_style_checkpoint_loads(tmp_path):
    # As the official trainer might save it: extra keys, an optimizer state, labels in any order.
    linear = torch.nn.Linear(DIM, 3)
    optimizer = torch.optim.AdamW(linear.parameters())
    linear(torch.zeros(1, DIM)).sum().backward()
    optimizer.step()
    checkpoint = {"model": {f"fc.{k}": v for k, v in linear.state_dict().items()},
                  "optimizer": optimizer.state_dict(), "labels": {"b": 1, "c": 2, "a": 0},
                  "input_size": DIM, "epoch": 7, "best_epoch": 5, "max_eval_acc": 0.5, "min_eval_loss": 1.0}
    torch.save(checkpoint, tmp_path / "official.pth")
    probe = LinearProbe.load(tmp_path / "official.pth")
    assert probe.labels == ["a", "b", "c"]
    x = np.random.default_rng(0).standard_normal((5, DIM)).astype(np.float32)
    with torch.no_grad():
        expected = linear(torch.from_numpy(x)).argmax(1).tolist()
    assert probe.predict(x) == [probe.labels[i] for i in expected]
    probe.save(tmp_path / "again.pth")
    again = torch.load(tmp_path / "again.pth", weights_only=True)
    assert again["best_epoch"] == 5 and again["min_eval_loss"] == 1.0


def test_checkpoint_errors_name_the_file(tmp_path):
    torch.save({"state": 1}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="other.pth.*not a classifier checkpoint"):
        LinearProbe.load(tmp_path / "other.pth")
    torch.save({"model": {"fc.weight": torch.zeros(2, 4), "fc.bias": torch.zeros(2)}, "labels": {"a": 0, "b": 1},
                "input_size": 5}, tmp_path / "shape.pth")
    with pytest.raises(CheckpointError, match="fc.weight has shape"):
        LinearProbe.load(tmp_path / "shape.pth")
    torch.save({"model": argparse.Namespace(a=1)}, tmp_path / "pickle.pth")    # not on the weights_only list
    with pytest.raises(CheckpointError, match="weights_only=True"):
        LinearProbe.load(tmp_path / "pickle.pth")


def test_one_label_only_is_a_clear_error(tmp_path, capsys):
    for n in range(4):
        save(tmp_path / "one", f"pop_{n}.npy", np.ones(DIM) * n)
    assert train_cls.main(["--train_folder", str(tmp_path / "one"), *FAST]) == 2
    err = capsys.readouterr().err
    assert "'pop'" in err and "at least two labels" in err and "pop_0.npy" in err


def test_a_corrupt_training_file_is_a_clear_error(tmp_path, capsys):
    features = write_folder(tmp_path / "feats", per_label=3)
    (features / "jazz_9.npy").write_bytes(b"not a numpy file")
    assert train_cls.main(["--train_folder", str(features), *FAST]) == 2
    assert "jazz_9.npy" in capsys.readouterr().err
    save(features, "jazz_9.npy", np.ones(DIM + 1))
    assert train_cls.main(["--train_folder", str(features), *FAST]) == 2
    err = capsys.readouterr().err
    assert "jazz_9.npy" in err and "dimension 33" in err


def test_eval_folder_of_another_dimension_or_unseen_label_is_an_error(tmp_path, capsys):
    train = write_folder(tmp_path / "train", per_label=3)
    save(tmp_path / "eval", "pop_0.npy", np.ones(DIM + 2))
    assert train_cls.main(["--train_folder", str(train), "--eval_folder", str(tmp_path / "eval"), *FAST]) == 2
    err = capsys.readouterr().err
    assert "pop_0.npy" in err and "dimension 34" in err
    save(tmp_path / "eval2", "rock_0.npy", np.ones(DIM))
    assert train_cls.main(["--train_folder", str(train), "--eval_folder", str(tmp_path / "eval2"), *FAST]) == 2
    assert "rock" in capsys.readouterr().err


def test_no_features_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert train_cls.main(["--train_folder", str(tmp_path / "empty")]) == 2
    assert "no .npy files" in capsys.readouterr().err


def test_eval_folder_and_default_output_name(tmp_path, monkeypatch):
    write_folder(tmp_path / "train", per_label=10)
    write_folder(tmp_path / "held", per_label=5, noise_seed=2)      # new items around the same centres
    monkeypatch.chdir(tmp_path)
    assert train_cls.main(["--train_folder", "train", "--eval_folder", "held", *FAST]) == 0
    assert (tmp_path / "weights-train.pth").is_file() and (tmp_path / "logs-train.txt").is_file()
    report = json.loads((tmp_path / "weights-train.report.json").read_text())
    assert report["n"] == 15 and report["accuracy"] > 0.9


def test_weights_path_rules(tmp_path):
    assert train_cls.weights_path(None, "data/feats/") == train_cls.Path("weights-feats.pth")
    assert train_cls.weights_path(str(tmp_path), "x") == tmp_path / "weights-x.pth"
    assert train_cls.weights_path("models", "x") == train_cls.Path("models/weights-x.pth")
    assert train_cls.weights_path("m/probe.pth", "x") == train_cls.Path("m/probe.pth")
    assert train_cls.log_path(train_cls.Path("m/probe.pth")) == train_cls.Path("m/logs-probe.txt")


def test_scripts_have_help(capsys):
    for script in (train_cls, inference_cls):
        with pytest.raises(SystemExit) as exit_info:
            script.main(["--help"])
        assert exit_info.value.code == 0
    assert "--balanced_training" in capsys.readouterr().out


# ------------------------------------------------------------------------------ inference_cls.py

def test_inference_labels_every_file_with_probabilities_and_report(trained, tmp_path, capsys):
    _, features, weights = trained
    output = tmp_path / "predictions.json"
    assert inference_cls.main([str(weights), str(features), str(output), "--probabilities",
                               "--label_from", "name", "--n_resamples", "100"]) == 0
    predictions = json.loads(output.read_text())
    files = sorted(features.glob("*.npy"))
    assert sorted(predictions) == sorted(os.path.join(str(features), f.name) for f in files)
    correct = sum(label == feature_labels.label_from_name(path) for path, label in predictions.items())
    assert correct / len(files) > 0.9
    probabilities = json.loads((tmp_path / "predictions.probabilities.json").read_text())
    for path, row in probabilities.items():
        assert sorted(row) == list(LABELS) and sum(row.values()) == pytest.approx(1, abs=1e-5)
        assert max(row, key=row.get) == predictions[path]
    report = json.loads((tmp_path / "predictions.report.json").read_text())
    assert report["n"] == 60 and np.sum(report["confusion_matrix"]) == 60
    assert "confusion matrix" in capsys.readouterr().out


def test_inference_skips_a_corrupt_file_and_predicts_the_rest(trained, tmp_path, capsys):
    _, features, weights = trained
    folder = tmp_path / "mixed"
    for name in ("folk_0.npy", "jazz_0.npy", "pop_0.npy"):
        save(folder, f"sub/{name}", np.load(features / name))
    (folder / "sub" / "bad_0.npy").write_bytes(b"garbage")
    save(folder, "wide_0.npy", np.ones(DIM + 1))
    output = tmp_path / "out.json"
    assert inference_cls.main([str(weights), str(folder), str(output)]) == 1
    err = capsys.readouterr().err
    assert "bad_0.npy" in err and "wide_0.npy" in err
    predictions = json.loads(output.read_text())
    assert predictions == {os.path.join(str(folder), "sub", n): n.split("_")[0]
                           for n in ("folk_0.npy", "jazz_0.npy", "pop_0.npy")}
    skipped = read_jsonl(tmp_path / "out.skipped.jsonl")
    assert sorted(os.path.basename(row["file"]) for row in skipped) == ["bad_0.npy", "wide_0.npy"]


def test_inference_errors_exit_2(trained, tmp_path, capsys):
    _, features, weights = trained
    (tmp_path / "bad.pth").write_bytes(b"nope")
    assert inference_cls.main([str(tmp_path / "bad.pth"), str(features), str(tmp_path / "o.json")]) == 2
    assert "bad.pth" in capsys.readouterr().err
    save(tmp_path / "wrong", "a_0.npy", np.ones(DIM + 1))
    assert inference_cls.main([str(weights), str(tmp_path / "wrong"), str(tmp_path / "o.json")]) == 2
    assert not (tmp_path / "o.json").exists()


# ----------------------------------------------------------------------------------------- labels

def test_label_rules():
    assert feature_labels.label_from_name("a/b/pop_rock_1.npy") == "pop"
    assert feature_labels.label_from_name("plain.npy") == "plain.npy"      # the official rule, verbatim
    assert feature_labels.label_from_folder("pop/sub/x.npy") == "pop"
    assert feature_labels.label_from_folder("x.npy") is None


def test_labels_from_a_csv_file(tmp_path):
    x, labels = clusters(per_label=10)
    folder = tmp_path / "feats"
    rows = ["path,label"]
    for i, (vector, label) in enumerate(zip(x, labels, strict=True)):
        save(folder, f"d{i % 2}/item{i}.npy", vector)
        rows.append(f"d{i % 2}/item{i}.abc,{label}")    # a source-file path: reduced to its key
    save(folder, "unlisted.npy", np.zeros(DIM))           # no label in the file: left out with a note
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "probe.pth"
    assert train_cls.main(["--train_folder", str(folder), "--labels", str(tmp_path / "labels.csv"),
                           "--output", str(out), *FAST]) == 0
    assert LinearProbe.load(out).labels == list(LABELS)
    assert json.loads(out.with_suffix(".report.json").read_text())["accuracy"] > 0.9
    predictions_file = tmp_path / "p.json"
    inference_cls.main([str(out), str(folder), str(predictions_file), "--labels", str(tmp_path / "labels.csv")])
    report = json.loads((tmp_path / "p.report.json").read_text())
    assert report["n"] == 30 and report["n_unlabelled"] == 1


def test_labels_from_a_jsonl_file_and_its_errors(tmp_path):
    path = tmp_path / "labels.jsonl"
    path.write_text('{"key": "a/x", "label": "pop"}\n\n{"path": "./y.1.npy", "label": 3}\n')
    assert feature_labels.read_label_file(path) == {"a/x": "pop", "y": "3"}
    path.write_text('{"key": "x", "label": "pop"}\n{"key": "x.npy", "label": "jazz"}\n')
    with pytest.raises(LabelError, match=r"labels.jsonl:2: key 'x'"):
        feature_labels.read_label_file(path)
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text("file,genre\nx,pop\n")
    with pytest.raises(LabelError, match="key \\(or path\\) and label"):
        feature_labels.read_label_file(csv_path)
    csv_path.write_text("key,label\nx,pop\ny,\n")
    with pytest.raises(LabelError, match="labels.csv:3"):
        feature_labels.read_label_file(csv_path)


def test_labels_from_folder_names(tmp_path):
    folder = write_folder(tmp_path / "feats", per_label=10, name=lambda label, n: f"{label}/piece-{n}_x.npy")
    out = tmp_path / "m" / "probe.pth"
    assert train_cls.main(["--train_folder", str(folder), "--label_from", "folder", "--output", str(out),
                           "--balanced_training", *FAST]) == 0
    assert LinearProbe.load(out).labels == list(LABELS)
    summary = json.loads(out.with_suffix(".summary.json").read_text())
    assert summary["training"]["config"]["balanced"] is True and summary["label_source"] == "folder"


# ------------------------------------------------------------------------------- probe and split

def test_split_is_stratified_seeded_and_keeps_singletons_in_training():
    labels = ["a"] * 10 + ["b"] * 5 + ["c"]
    train, val = feature_labels.split_train_validation(labels, 0.2, seed=3)
    assert sorted([labels[i] for i in val]) == ["a", "a", "b"]
    assert 15 in train and len(train) + len(val) == len(labels) and not set(train) & set(val)
    again = feature_labels.split_train_validation(labels, 0.2, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip((train, val), again, strict=True))
    assert len(feature_labels.split_train_validation(labels, 0.0)[1]) == 0


def test_training_is_deterministic_for_a_seed():
    x, labels = clusters(per_label=15)
    train, val = feature_labels.split_train_validation(labels, 0.2, seed=1)
    config = ProbeConfig(num_epochs=30, batch_size=8, seed=1)

    def run(seed: int) -> LinearProbe:
        return LinearProbe.fit(x[train], [labels[i] for i in train], ProbeConfig(**{**vars(config), "seed": seed}),
                               validation=(x[val], [labels[i] for i in val]))

    threads = torch.get_num_threads()
    first, second, other = run(1), run(1), run(2)
    assert torch.get_num_threads() == threads       # fit trains on one thread and restores the setting
    for key, value in first.checkpoint()["model"].items():
        assert torch.equal(value, second.checkpoint()["model"][key])
    assert not torch.equal(first.checkpoint()["model"]["fc.weight"], other.checkpoint()["model"]["fc.weight"])
    assert first.summary.history == second.summary.history


def test_early_stopping_keeps_the_best_epoch():
    x, labels = clusters(per_label=10)
    probe = LinearProbe.fit(x, labels, ProbeConfig(num_epochs=500, patience=5, batch_size=0),
                            validation=(x, labels))
    summary = probe.summary
    assert summary.stopped_early and summary.epochs_run < 500
    assert summary.epochs_run == summary.best_epoch + 5
    assert summary.max_eval_acc == max(row["eval_acc"] for row in summary.history)


# ----------------------------------------------------------------------------------- the report

def test_report_matches_a_brute_force_count():
    labels = ["a", "b", "c", "d"]                      # d never occurs: left out of the macro mean
    true = ["a", "a", "a", "b", "b", "c", "c", "c", "c", "a"]
    pred = ["a", "b", "a", "b", "c", "c", "a", "c", "b", "a"]
    report = classify.classification_report(true, pred, labels, n_resamples=200)
    cm = [[sum(t == row and p == col for t, p in zip(true, pred, strict=True)) for col in labels] for row in labels]
    assert report["confusion_matrix"] == cm
    f1s = []
    for label in "abc":
        tp = sum(t == p == label for t, p in zip(true, pred, strict=True))
        precision = tp / pred.count(label)
        recall = tp / true.count(label)
        f1s.append(2 * precision * recall / (precision + recall))
        assert report["per_label"][label]["f1"] == pytest.approx(f1s[-1])
        assert report["per_label"][label]["precision"] == pytest.approx(precision)
        assert report["per_label"][label]["support"] == true.count(label)
    assert report["per_label"]["d"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert report["macro_f1"] == pytest.approx(sum(f1s) / 3)
    assert report["accuracy"] == pytest.approx(0.6)
    majority = report["baselines"]["majority"]
    assert majority["label"] == "a" and majority["accuracy"] == pytest.approx(0.4)   # a, c tie at 4: first
    assert report["baselines"]["uniform"]["accuracy"] == 0.25
    low, high = report["interval"]["accuracy"]
    assert 0 <= low <= 0.6 <= high <= 1
    with pytest.raises(ValueError, match="'e'"):
        classify.classification_report(["a"], ["e"], labels)


# ----------------------------------------------------------------------------------- zero-shot

def test_zero_shot_with_the_cluster_centres_gets_every_item_right():
    x, labels = clusters(per_label=20)
    result = classify.zero_shot(x, centres(), list(LABELS))
    assert result.predicted == labels
    assert result.scores.shape == (60, 3) and np.all(np.abs(result.scores) <= 1 + 1e-6)
    assert classify.zero_shot(np.zeros(DIM), centres(), list(LABELS)).predicted == ["folk"]   # no NaN
    with pytest.raises(ValueError):
        classify.zero_shot(x, centres()[:, :5], list(LABELS))


def test_prompt_texts():
    assert classify.prompt_texts(["jazz", "folk"]) == ["a jazz", "a folk"]
    assert classify.prompt_texts(["jazz"], "music in the style of {label}.") == ["music in the style of jazz."]
    with pytest.raises(ValueError):
        classify.prompt_texts(["jazz"], "no field")
