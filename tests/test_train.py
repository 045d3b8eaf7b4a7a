"""The trainer end to end on the tiny model: what trains, what is saved, resume, ranks, bad data."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import torch
import train_clamp3_lora
from helpers import (
    TINY_MODEL_CONFIG,
    TINY_WEIGHTS,
    TRAINER_SCRIPT,
    adapter_weights,
    history,
    make_records,
    no_dropout_model_config,
    options,
    train_job,
)
from modeling import ModelConfig, load_clamp3
from peft import PeftModel
from training.checkpoint import list_checkpoints


@pytest.fixture
def abc_records(tmp_path):
    return make_records(tmp_path, "abc")


def test_lora_training_lowers_the_loss_and_touches_only_the_adapter(tmp_path, word_tokenizer, abc_records):
    base_state = torch.load(TINY_WEIGHTS, weights_only=True)["model"]
    args = options(tmp_path, word_tokenizer, LORA_NUM_EPOCHS=6, LORA_LEARNING_RATE=1e-2, LOSS="normalized",
                   LORA_ABC_MODULES_TO_SAVE=["symbolic_proj"], LORA_CHECKPOINT_STEPS=0)
    assert train_clamp3_lora.main(args) == 0
    entries = history(tmp_path)
    assert len(entries) == 6
    assert entries[-1]["train_loss"] < entries[0]["train_loss"] - 0.1
    assert all(0.0 < e["valid_mrr"] <= 1.0 and e["samples_per_s"] > 0 and e["logit_scale"] > 0 for e in entries)
    adapter = tmp_path / "adapter_abc"
    selection = json.loads((adapter / "selection.json").read_text())
    assert selection["valid_mrr"] == max(e["valid_mrr"] for e in entries) and selection["n_valid"] == 8

    # Only adapter tensors were optimised: the checkpoint's trainable state and the optimizer.
    checkpoint = torch.load(list_checkpoints(tmp_path / "run")[-1], weights_only=False)
    trainable = [k for k in checkpoint["trainable"] if k.startswith("model.")]
    assert trainable and all(".lora_" in k or ".modules_to_save." in k for k in trainable)
    optimised = sum(len(group["params"]) for group in checkpoint["optimizer"]["param_groups"])
    assert optimised == len(checkpoint["trainable"])  # adapter tensors + the temperature

    # The adapter loads onto a plain model with plain PEFT; every weight it does not adapt is the
    # stock one, bit for bit.
    reloaded = PeftModel.from_pretrained(load_clamp3(ModelConfig.from_json(TINY_MODEL_CONFIG), TINY_WEIGHTS),
                                         str(adapter))
    merged = reloaded.merge_and_unload().state_dict()
    adapted = [k for k in merged if "symbolic_model.base.encoder" in k and "attention.self" in k
               and k.endswith(".weight") or k.startswith("symbolic_proj.")]
    assert len(adapted) == 2 * 3 + 2
    for key in merged:
        if key not in adapted:
            assert torch.equal(merged[key], base_state[key]), key
    assert any(not torch.equal(merged[k], base_state[k]) for k in adapted)

    run = tmp_path / "run"
    saved = json.loads((run / "config.json").read_text())
    assert saved["config"]["LORA_R"] == 4 and len(saved["base_fingerprint"]) == 64
    assert "epoch 6" in (run / "ABC_training.log").read_text()


def test_a_fresh_run_refuses_a_used_run_folder_and_resume_latest_needs_a_checkpoint(tmp_path, word_tokenizer,
                                                                                   abc_records, capsys):
    (tmp_path / "run").mkdir()
    assert train_clamp3_lora.main(options(tmp_path, word_tokenizer) + ["--resume", "latest"]) == 2
    assert "--resume latest: no checkpoint in" in capsys.readouterr().err
    assert train_clamp3_lora.main(options(tmp_path, word_tokenizer, LORA_NUM_EPOCHS=1)) == 0
    assert train_clamp3_lora.main(options(tmp_path, word_tokenizer, LORA_NUM_EPOCHS=1)) == 2
    assert "already holds a training run" in capsys.readouterr().err
    assert train_clamp3_lora.main(options(tmp_path, word_tokenizer, LORA_NUM_EPOCHS=1) + ["--overwrite"]) == 0
    assert train_clamp3_lora.main(options(tmp_path, word_tokenizer, LORA_NUM_EPOCHS=1, LORA_R=2)
                                  + ["--resume", "latest"]) == 2
    assert "another configuration (LORA_R: 4 -> 2)" in capsys.readouterr().err
    assert train_clamp3_lora.main(options(tmp_path, word_tokenizer, LORA_INIT_WEIGHTS="pissa")
                                  + ["--overwrite"]) == 2
    assert "rewrites the base weights" in capsys.readouterr().err


def test_checkpoints_rotate_and_a_killed_run_resumes_bitwise(tmp_path, word_tokenizer):
    """One run trains uninterrupted; another is killed with SIGKILL once it has written a
    checkpoint, then resumed with --resume latest: the final adapters are bitwise equal."""
    make_records(tmp_path / "a", "abc")
    make_records(tmp_path / "b", "abc")
    common = {"LORA_NUM_EPOCHS": 3, "LORA_CHECKPOINT_STEPS": 1, "LORA_DROPOUT": 0.1, "GRAD_CACHE_MICRO_BATCH": 2}
    uninterrupted = options(tmp_path / "a", word_tokenizer, **common)
    assert train_clamp3_lora.main(uninterrupted) == 0
    assert len(list_checkpoints(tmp_path / "a" / "run")) == 3  # rotation keeps the newest 3

    killed_args = options(tmp_path / "b", word_tokenizer, **common)
    process = subprocess.Popen([sys.executable, str(TRAINER_SCRIPT), *killed_args], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while time.time() < deadline and not list_checkpoints(tmp_path / "b" / "run") and process.poll() is None:
        time.sleep(0.05)
    assert process.poll() is None, f"run ended before it could be killed: {process.stderr.read()}"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (tmp_path / "b" / "adapter_abc").exists() or len(history(tmp_path / "b")) < 3
    assert train_clamp3_lora.main(killed_args + ["--resume", "latest"]) == 0
    assert "resumed at epoch" in (tmp_path / "b" / "run" / "ABC_training.log").read_text()

    a, b = adapter_weights(tmp_path / "a" / "adapter_abc"), adapter_weights(tmp_path / "b" / "adapter_abc")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert [e["train_loss"] for e in history(tmp_path / "a")] == [e["train_loss"] for e in history(tmp_path / "b")]


def test_bad_records_are_logged_and_training_goes_on(tmp_path, word_tokenizer, abc_records):
    rows = [json.loads(line) for line in abc_records.read_text().splitlines()]
    (tmp_path / "music" / "empty.abc").write_text("")
    (tmp_path / "music" / "garbled.abc").write_bytes(b"\xff\xfe\x00\x81 not text")
    rows += [{"id": "missing", "filepaths": ["music/nowhere.abc"], "title": "w1"},
             {"id": "empty", "filepaths": ["music/empty.abc"], "title": "w2"},
             {"id": "garbled", "filepaths": ["music/garbled.abc"], "title": "w3"},
             {"id": "no_text", "filepaths": [rows[0]["filepaths"][0]]}]
    abc_records.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert train_clamp3_lora.main(options(tmp_path, word_tokenizer, LORA_NUM_EPOCHS=1)) == 0
    drops = [json.loads(line) for line in (tmp_path / "run" / "ABC_drops.jsonl").read_text().splitlines()]
    assert {d.get("id") for d in drops} == {"missing", "empty", "garbled", "no_text"}
    assert all(d["reason"] for d in drops)
    log = (tmp_path / "run" / "ABC_training.log").read_text()
    assert "left out 4" in log


@pytest.mark.parametrize("freeze_text", [True, False])
def test_full_mode_saves_an_official_checkpoint(tmp_path, word_tokenizer, freeze_text):
    make_records(tmp_path, "mtf")
    target = tmp_path / "full_{format}.pth"
    args = options(tmp_path, word_tokenizer, "mtf", TRAIN_MODE="full", LORA_NUM_EPOCHS=1,
                   FULL_WEIGHTS_PATH=str(target), FREEZE_TEXT=freeze_text, LORA_LEARNING_RATE=1e-3)
    assert train_clamp3_lora.main(args) == 0
    saved = tmp_path / "full_mtf.pth"
    model = load_clamp3(ModelConfig.from_json(TINY_MODEL_CONFIG), saved)  # strict
    base = torch.load(TINY_WEIGHTS, weights_only=True)["model"]
    state = model.state_dict()
    assert not torch.equal(state["symbolic_proj.weight"], base["symbolic_proj.weight"])
    assert not torch.equal(state["symbolic_model.patch_embedding.weight"],
                           base["symbolic_model.patch_embedding.weight"])
    assert torch.equal(state["text_proj.weight"], base["text_proj.weight"]) == freeze_text
    assert torch.equal(state["audio_proj.weight"], base["audio_proj.weight"])
    assert torch.equal(state["symbolic_model.base.pooler.dense.weight"], base["symbolic_model.base.pooler.dense.weight"])
    log = (tmp_path / "run" / "MTF_training.log").read_text()
    assert ("text features: cached" in log) == freeze_text  # a training text tower cannot use cached features


def test_both_formats_train_one_after_the_other_from_the_base(tmp_path, word_tokenizer):
    make_records(tmp_path, "abc")
    make_records(tmp_path, "mtf")
    args = options(tmp_path, word_tokenizer, "abc", LORA_NUM_EPOCHS=1)
    mtf = options(tmp_path, word_tokenizer, "mtf", LORA_NUM_EPOCHS=1)
    args = [a for a in args if a not in ("--format", "abc")] + [a for a in mtf if a.startswith("--LORA_MTF")]
    assert train_clamp3_lora.main(args + ["--format", "both"]) == 0
    for fmt in ("abc", "mtf"):
        assert (tmp_path / f"adapter_{fmt}" / "adapter_model.safetensors").is_file()
        assert len(history(tmp_path, fmt)) == 1
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["abc_step00000006.pt", "mtf_step00000005.pt"]
    # Each adapter starts from the base: the MTF adapter equals one trained alone.
    alone = tmp_path / "alone"
    make_records(alone, "mtf")
    assert train_clamp3_lora.main(options(alone, word_tokenizer, "mtf", LORA_NUM_EPOCHS=1)) == 0
    together, by_itself = adapter_weights(tmp_path / "adapter_mtf"), adapter_weights(alone / "adapter_mtf")
    assert all(torch.equal(together[k], by_itself[k]) for k in together)
    assert train_clamp3_lora.main(args + ["--format", "both", "--resume", "latest"]) == 0  # nothing left to do


def test_early_stopping_after_patience_epochs(tmp_path, word_tokenizer, abc_records):
    assert train_clamp3_lora.main(options(tmp_path, word_tokenizer, LORA_NUM_EPOCHS=5, LORA_PATIENCE=1,
                                          LORA_LEARNING_RATE=0.0)) == 0
    assert len(history(tmp_path)) == 2  # epoch 2 is no better than epoch 1 with a learning rate of 0
    assert "stopping early" in (tmp_path / "run" / "ABC_training.log").read_text()


def test_export_merged_writes_an_official_checkpoint(tmp_path, word_tokenizer, abc_records):
    out = tmp_path / "merged.pth"
    assert train_clamp3_lora.main(options(tmp_path, word_tokenizer, LORA_NUM_EPOCHS=1) + ["--export_merged", str(out)]) == 0
    merged = load_clamp3(ModelConfig.from_json(TINY_MODEL_CONFIG), out)
    adapted = PeftModel.from_pretrained(load_clamp3(ModelConfig.from_json(TINY_MODEL_CONFIG), TINY_WEIGHTS),
                                        str(tmp_path / "adapter_abc"))
    patches = torch.randint(0, 128, (2, 9, 64), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 9, dtype=torch.long)
    with torch.no_grad():
        expected = adapted.get_base_model().features("symbolic", patches, mask)
        assert torch.allclose(merged.features("symbolic", patches, mask), expected, rtol=0, atol=1e-5)


@pytest.mark.slow  # two torchrun jobs
def test_two_gloo_ranks_equal_one_process_with_modules_to_save_and_checkpointing(tmp_path, word_tokenizer):
    for name in ("one", "two"):
        make_records(tmp_path / name, "abc")
    model_config = no_dropout_model_config(tmp_path / "model.json")
    common = {"LORA_NUM_EPOCHS": 2, "LORA_DROPOUT": 0.0, "LORA_ABC_MODULES_TO_SAVE": ["symbolic_proj"],
              "GRADIENT_CHECKPOINTING": True, "LOSS": "normalized"}

    def args(name: str, batch: int) -> list[str]:
        listed = options(tmp_path / name, word_tokenizer, LORA_BATCH_SIZE=batch, **common)
        return [str(model_config) if a == str(TINY_MODEL_CONFIG) else a for a in listed]

    one = train_job(1, args("one", 4), launcher="torch.distributed.launch")
    assert one.returncode == 0, one.stderr[-3000:]
    two = train_job(2, args("two", 2))
    assert two.returncode == 0, two.stderr[-3000:]
    for a, b in zip(history(tmp_path / "one"), history(tmp_path / "two"), strict=True):
        for key in ("train_loss", "valid_loss", "valid_mrr"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), key
    a, b = adapter_weights(tmp_path / "one" / "adapter_abc"), adapter_weights(tmp_path / "two" / "adapter_abc")
    assert a.keys() == b.keys() and any("symbolic_proj" in k for k in a)
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=0, atol=1e-5), key


def test_wandb_offline_writes_into_the_run_folder(tmp_path, word_tokenizer, abc_records, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)  # the config's "offline" decides; no network
    assert train_clamp3_lora.main(options(tmp_path, word_tokenizer, LORA_NUM_EPOCHS=1, WANDB_ENABLED=True)) == 0
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))


def test_padding_to_the_longest_piece_changes_no_feature(tmp_path, tiny_model, word_tokenizer, abc_records):
    """Length bucketing pads each batch to its longest piece instead of 512: same features."""
    from fileio import DropLog
    from patchilizer import M3Patchilizer
    from training import data
    from training.text import LiveText
    from transformers import AutoTokenizer

    patchilizer = M3Patchilizer(64, 512)
    records = data.load_records(abc_records, "abc", patchilizer, DropLog("test"), progress=False)
    plan = data.plan_validation(records, 6, seed=0, bucketing=True)
    live = LiveText(AutoTokenizer.from_pretrained(word_tokenizer), 128)
    features = {}
    for pad_to_longest in (True, False):
        dataset = data.BatchDataset(records, plan, patchilizer, text=live, seed=0, epoch=0, train=False,
                                    pad_to_longest=pad_to_longest)
        with torch.no_grad():
            features[pad_to_longest] = [tiny_model.features("symbolic", dataset[k]["patches"], dataset[k]["patch_mask"])
                                        for k in range(len(dataset))]
        assert (dataset[0]["patches"].shape[1] < 512) == pad_to_longest
    for short, full in zip(features[True], features[False], strict=True):
        assert torch.allclose(short, full, rtol=0, atol=1e-5)



def test_grad_cache_micro_batches_cut_to_their_own_length_keep_the_gradient(tmp_path, abc_records):
    """The trainer's music encoder trims each GradCache micro-batch to its longest piece: the
    gradient is still the full batch's (dropout off, so both passes draw nothing)."""
    import lora
    import runconfig
    from fileio import DropLog
    from patchilizer import M3Patchilizer
    from training import data
    from training.loss import ContrastiveLoss, contrastive_step
    from training.model_setup import music_encoder, set_train_mode
    from training.text import LiveText, seeded_rng

    model_config = ModelConfig.from_json(no_dropout_model_config(tmp_path / "model.json"))
    patchilizer = M3Patchilizer(64, 512)
    records = data.load_records(abc_records, "abc", patchilizer, DropLog("test"), progress=False)
    plan = data.plan_epoch(records, 6, epoch=0, seed=0, bucketing=False)
    text_rows = torch.randn(6, 32, generator=torch.Generator().manual_seed(0))
    dataset = data.BatchDataset(records, plan, patchilizer, text=LiveText(None, 128), seed=0, epoch=0)
    batch = dataset._collate_patches([data.music_patches(records[p], patchilizer, seeded_rng(p), None)[0]
                                      for p in plan.batches[0]])
    lengths = batch["patch_mask"].sum(dim=1)
    assert lengths.min() < lengths.max()  # the micro-batches really are cut
    gradients = []
    for micro in (0, 2):
        torch.manual_seed(0)  # the same gaussian LoRA initialisation both times
        model = lora.add_adapter(load_clamp3(model_config, TINY_WEIGHTS),
                                 runconfig.build_config(overrides={"LORA_INIT_WEIGHTS": "gaussian", "LORA_DROPOUT": 0.0,
                                                                   "LORA_ABC_MODULES_TO_SAVE": ["symbolic_proj"]}), "abc")
        core = model.get_base_model()
        set_train_mode(core, text_frozen=True, symbolic_dropout=True)
        contrastive_step(batch, music_encoder(core, torch.device("cpu"), "fp32"), text_rows,
                         ContrastiveLoss("clamp3"), micro_batch=micro)
        gradients.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert gradients[0].keys() == gradients[1].keys() and gradients[0]
    for name, full in gradients[0].items():
        assert torch.allclose(gradients[1][name], full, rtol=1e-4, atol=1e-6), name


def test_without_symbolic_dropout_only_lora_dropout_stays_on(tmp_path):
    import lora
    import runconfig
    from training.model_setup import set_train_mode

    model = lora.add_adapter(load_clamp3(ModelConfig.from_json(TINY_MODEL_CONFIG), TINY_WEIGHTS),
                             runconfig.build_config(), "abc")
    core = model.get_base_model()
    set_train_mode(core, text_frozen=True, symbolic_dropout=False)
    dropping = {name for name, module in core.named_modules() if isinstance(module, torch.nn.Dropout) and module.training}
    assert dropping and all("lora_dropout" in name.split(".") for name in dropping)
    assert not core.symbolic_model.base.encoder.layer[0].attention.self.training  # its dropout_p is 0
    assert not core.text_model.training and not core.audio_model.training
    set_train_mode(core, text_frozen=True, symbolic_dropout=True)
    assert core.symbolic_model.base.encoder.layer[0].attention.self.training


def test_data_loader_workers_change_nothing(tmp_path, word_tokenizer):
    """Examples are seeded per record: 2 DataLoader workers train the same adapter as none."""
    for name in ("w0", "w2"):
        make_records(tmp_path / name, "abc")
    for name, workers in (("w0", 0), ("w2", 2)):
        args = options(tmp_path / name, word_tokenizer, LORA_NUM_EPOCHS=1, NUM_WORKERS=workers, LORA_DROPOUT=0.1)
        assert train_clamp3_lora.main(args) == 0
    a, b = adapter_weights(tmp_path / "w0" / "adapter_abc"), adapter_weights(tmp_path / "w2" / "adapter_abc")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow  # a torchrun job
def test_an_error_on_one_rank_ends_the_job_instead_of_hanging(tmp_path, word_tokenizer):
    """The records cannot be found (every rank loads them; the first rank to fail ends the job):
    the job must end with that error, in seconds, not wait for the process-group timeout."""
    args = options(tmp_path, word_tokenizer, LORA_BATCH_SIZE=2)  # no records written
    start = time.time()
    done = train_job(2, args, timeout=120)
    assert done.returncode != 0
    assert "training records not found" in done.stderr and "/2] failed" in done.stderr
    assert time.time() - start < 90


@pytest.mark.parametrize("micro_batch", [0, 2])
def test_full_mode_can_train_the_text_projection_over_cached_pooled_features(tmp_path, word_tokenizer, micro_batch):
    make_records(tmp_path, "abc")
    args = options(tmp_path, word_tokenizer, TRAIN_MODE="full", LORA_NUM_EPOCHS=1, TRAIN_TEXT_PROJ=True,
                   FULL_WEIGHTS_PATH=str(tmp_path / "full_{format}.pth"), LORA_LEARNING_RATE=1e-3,
                   GRAD_CACHE_MICRO_BATCH=micro_batch)
    assert train_clamp3_lora.main(args) == 0
    state = load_clamp3(ModelConfig.from_json(TINY_MODEL_CONFIG), tmp_path / "full_abc.pth").state_dict()
    base = torch.load(TINY_WEIGHTS, weights_only=True)["model"]
    assert not torch.equal(state["text_proj.weight"], base["text_proj.weight"])
    assert all(torch.equal(state[k], base[k]) for k in base if k.startswith("text_model."))
    assert "cached (pooled)" in (tmp_path / "run" / "ABC_training.log").read_text()


def test_records_too_uniform_for_a_batch_without_duplicates_are_a_clear_error(tmp_path, word_tokenizer,
                                                                              abc_records, capsys):
    """Two distinct texts cannot fill a batch of 4 without two equal ones: the run stops with the
    reason, instead of training nothing and reporting a loss of 0 (what it did before)."""
    rows = [json.loads(line) for line in abc_records.read_text().splitlines()]
    for i, row in enumerate(rows):
        row.update(title=f"w{i % 2}", genres=[], description="")
    abc_records.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    assert train_clamp3_lora.main(options(tmp_path, word_tokenizer, TEXT_DROPOUT=False)) == 2
    message = capsys.readouterr().err
    assert "no full batch of 4" in message and "2 distinct texts" in message and "NO_DUPLICATE_NEGATIVES" in message
    assert train_clamp3_lora.main(options(tmp_path, word_tokenizer, TEXT_DROPOUT=False, NO_DUPLICATE_NEGATIVES=False)
                                  + ["--overwrite"]) == 0
    assert all(entry["train_loss"] > 0 for entry in history(tmp_path))


def test_the_optimizer_is_fused_adamw_and_steps_as_the_plain_one() -> None:
    """The trainer's AdamW runs PyTorch's fused kernel on CPU, with weight decay on matrices only,
    and moves the parameters as the per-tensor implementation does (within float rounding)."""
    import lora
    import runconfig
    from training.loss import ContrastiveLoss
    from training.optimizer import build_optimizer, parameter_groups

    cfg = runconfig.build_config(overrides={"LORA_R": 4, "LORA_WEIGHT_DECAY": 0.1, "LORA_LEARNING_RATE": 1e-2})
    models = []
    for _ in range(2):
        torch.manual_seed(0)  # the same LoRA initialisation
        models.append(lora.add_adapter(load_clamp3(ModelConfig.from_json(TINY_MODEL_CONFIG), TINY_WEIGHTS), cfg, "abc"))
    loss_fns = [ContrastiveLoss("normalized") for _ in models]  # a trainable temperature: undecayed
    fused = build_optimizer(models[0], loss_fns[0], cfg, torch.device("cpu"))
    assert all(group["fused"] for group in fused.param_groups)
    assert [group["weight_decay"] for group in fused.param_groups] == [0.1, 0.0]
    assert all(p.ndim >= 2 for p in fused.param_groups[0]["params"])
    plain = torch.optim.AdamW(parameter_groups(models[1], loss_fns[1], 0.1), lr=1e-2, fused=False, foreach=False)
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        for model, loss_fn in zip(models, loss_fns, strict=True):
            for p in [*model.parameters(), *loss_fn.parameters()]:
                p.grad = None
        for pair in zip([p for p in models[0].parameters() if p.requires_grad] + list(loss_fns[0].parameters()),
                        [p for p in models[1].parameters() if p.requires_grad] + list(loss_fns[1].parameters()),
                        strict=True):
            grad = torch.randn(pair[0].shape, generator=generator)
            pair[0].grad, pair[1].grad = grad.clone(), grad.clone()
        fused.step()
        plain.step()
    moved = 0
    for a, b in zip([*models[0].parameters(), *loss_fns[0].parameters()],
                    [*models[1].parameters(), *loss_fns[1].parameters()], strict=True):
        assert torch.allclose(a, b, rtol=0, atol=1e-6)
        moved += a.requires_grad
    assert moved == sum(len(group["params"]) for group in fused.param_groups)


@pytest.mark.parametrize("micro_batch", [0, 2])
def test_training_steps_run_the_frozen_kernels_in_passes_of_the_micro_batch_within_the_patch_budget(
        tmp_path, word_tokenizer, abc_records, monkeypatch, micro_batch):
    """A default run's steps go through the frozen feed-forward kernels, in passes of the rows
    encoded at once (the batch of 4, or GradCache's micro-batches of 2), and each pass with gradient
    keeps pre-activations in as many layers as the memory of the longest such pass allows (budget:
    rows x 512 patches); passes without gradient keep none. Validation runs the model's own forward."""
    from helpers import lora_core
    from training.frozen_ops import FrozenFeedForward, pre_activation_layers

    calls = []
    original = FrozenFeedForward.apply

    def spy(x, *weights_and_keep):
        calls.append((tuple(x.shape[:2]), weights_and_keep[-1], torch.is_grad_enabled()))
        return original(x, *weights_and_keep)

    monkeypatch.setattr(FrozenFeedForward, "apply", spy)
    args = options(tmp_path, word_tokenizer, LORA_NUM_EPOCHS=1, LORA_MAX_STEPS=1, LORA_CHECKPOINT_STEPS=0,
                   GRAD_CACHE_MICRO_BATCH=micro_batch)
    assert train_clamp3_lora.main(args) == 0
    rows = micro_batch or 4
    layers = 2  # the tiny model's, each called once per pass
    passes = [calls[i : i + layers] for i in range(0, len(calls), layers)]
    assert passes and all(len({shape for shape, *_ in p}) == 1 for p in passes)
    assert {p[0][0][0] for p in passes} == {rows}  # the batch really was encoded in passes of that many rows
    with_grad = [p for p in passes if p[0][2]]
    # One step: 4 / rows passes with gradient (GradCache's first pass runs without, and its last
    # micro-batch is encoded once, with gradient).
    assert len(with_grad) == 4 // rows
    _, core = lora_core(dropout=0.0)
    for p in passes:
        (_, length), grad = p[0][0], p[0][2]
        expected = pre_activation_layers(core.symbolic_model, rows * length, rows * 512) if grad else 0
        assert [keep for _, keep, _ in p] == [False] * (layers - expected) + [True] * expected
    assert any(keep for _, keep, _ in calls)  # the budget left room: short pieces kept their pre-activations


def test_every_step_writes_a_log_line_with_loss_lr_throughput_and_data_time(tmp_path, word_tokenizer, abc_records):
    """With TRAIN_LOG_EVERY_STEPS=1 the run's log gets one line per optimizer step, as open_clip
    writes: epoch, step/steps, the step's loss (finite; the epoch's mean is their mean), the learning
    rate the schedule gave that step, samples/s and the time spent waiting for the data loader."""
    import math
    import re

    from training.optimizer import lr_factor

    args = options(tmp_path, word_tokenizer, LORA_NUM_EPOCHS=2, LORA_WARMUP_STEPS=2, LORA_MIN_LR_RATIO=0.1,
                   TRAIN_LOG_EVERY_STEPS=1, LORA_CHECKPOINT_STEPS=0)
    assert train_clamp3_lora.main(args) == 0
    line = re.compile(r"\[abc\] epoch (\d+) step (\d+)/(\d+): loss (\S+), lr (\S+), (\S+) samples/s, data (\S+) s$")
    steps = [m for text in (tmp_path / "run" / "ABC_training.log").read_text().splitlines()
             if (m := line.search(text))]
    per_epoch = (32 - 8) // 4
    total = 2 * per_epoch
    assert [int(m[2]) for m in steps] == list(range(1, total + 1))
    assert [int(m[1]) for m in steps] == [1] * per_epoch + [2] * per_epoch
    assert {int(m[3]) for m in steps} == {total}
    for m in steps:
        step, loss, lr, rate, waited = int(m[2]), float(m[4]), float(m[5]), float(m[6]), float(m[7])
        assert math.isfinite(loss) and loss > 0
        assert lr == pytest.approx(5e-3 * lr_factor(step - 1, 2, total, 0.1), rel=1e-4)
        assert rate > 0 and waited >= 0
    for epoch, entry in enumerate(history(tmp_path), start=1):
        losses = [float(m[4]) for m in steps if int(m[1]) == epoch]
        assert entry["train_loss"] == pytest.approx(sum(losses) / len(losses), abs=1e-4)
