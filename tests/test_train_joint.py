"""The joint run (``--format both``, ``ALIGN_WEIGHT`` > 0) end to end on the tiny model: pieces and
their plans, the loss falling, adapters saved and loadable as a one-format run's, resume after
SIGKILL bitwise, GradCache, two gloo ranks equal to one process, settings it refuses."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import train_clamp3_lora
from fileio import DropLog
from helpers import (
    TINY_MODEL_CONFIG,
    TINY_WEIGHTS,
    TRAINER_SCRIPT,
    adapter_weights,
    history,
    joint_options,
    make_records,
    no_dropout_model_config,
    options,
    train_job,
)
from modeling import ModelConfig, load_clamp3
from patchilizer import M3Patchilizer
from peft import PeftModel
from training.checkpoint import list_checkpoints


def paired_records(root: Path) -> Path:
    for fmt in ("abc", "mtf"):
        make_records(root, fmt, paired=True)
    return root


def loaded(root: Path, split: str = "train") -> dict:
    from training.data import load_records

    return {fmt: load_records(root / f"{split}_{fmt}.jsonl", fmt, M3Patchilizer(), DropLog("t"), progress=False)
            for fmt in ("abc", "mtf")}


def test_pieces_join_the_formats_by_pair_id_and_each_batch_puts_its_pairs_first(tmp_path):
    from training.data import rows_of_rank
    from training.pairs import pair_records, plan_joint_epoch

    records = loaded(paired_records(tmp_path))
    pairing = pair_records(records)
    # Train records are 8..31 (ABC) and 8..29 (MTF); i % 4 == 3 has no pair_id.
    assert len(pairing.pairs) == 17 and pairing.alone("abc") == 7 and pairing.alone("mtf") == 5
    assert len(pairing.pieces) == 17 + 7 + 5
    for piece in pairing.pairs:
        assert records["abc"][piece.abc].pair_id == records["mtf"][piece.mtf].pair_id is not None
    plan = plan_joint_epoch(pairing, 6, epoch=0, seed=1)
    assert len(plan) == 29 // 6 and plan.pieces.left_over == 29 % 6
    seen = {"abc": [], "mtf": []}
    for batch, abc, mtf, pairs in zip(plan.pieces.batches, plan.formats["abc"].batches,
                                      plan.formats["mtf"].batches, plan.pairs, strict=True):
        pieces = [pairing.pieces[p] for p in batch]
        assert pairs == sum(p.paired for p in pieces) and len(abc) + len(mtf) == len(pieces) + pairs
        for row in range(pairs):  # row k of both formats is one pair
            assert records["abc"][abc[row]].pair_id == records["mtf"][mtf[row]].pair_id
        assert all(records["abc"][p].pair_id is None or p not in {q.abc for q in pairing.pairs} for p in abc[pairs:])
        seen["abc"] += abc
        seen["mtf"] += mtf
        # Two ranks' rows, concatenated, are the global batch in its order.
        for rows in (abc, mtf):
            assert rows_of_rank(rows, 0, 2) + rows_of_rank(rows, 1, 2) == rows
    assert len(set(seen["abc"])) == len(seen["abc"]) and len(set(seen["mtf"])) == len(seen["mtf"])
    assert plan_joint_epoch(pairing, 6, epoch=0, seed=1).formats["abc"].batches == plan.formats["abc"].batches
    assert plan_joint_epoch(pairing, 6, epoch=1, seed=1).pieces.batches != plan.pieces.batches


def test_the_joint_run_lowers_every_term_and_saves_two_loadable_adapters(tmp_path, word_tokenizer):
    paired_records(tmp_path)
    args = joint_options(tmp_path, word_tokenizer, LORA_NUM_EPOCHS=6, LORA_LEARNING_RATE=1e-2, LOSS="normalized",
                         LORA_ABC_MODULES_TO_SAVE=["symbolic_proj"], LORA_MTF_MODULES_TO_SAVE=["symbolic_proj"])
    assert train_clamp3_lora.main(args) == 0
    entries = history(tmp_path, "joint")
    assert len(entries) == 6
    first, last = entries[0], entries[-1]
    # The fixture pairs are unrelated pieces: the sheet<->MIDI term can only fit the training pairs,
    # so it is checked on them (the validation pairs tell nothing here; the demo's do).
    for key in ("train_loss", "train_loss_text_abc", "train_loss_text_mtf", "train_loss_abc_mtf"):
        assert last[key] < first[key] - 0.1, (key, [round(e[key], 4) for e in entries])
    for entry in entries:
        mean = (entry["valid_mrr_text_abc"] + entry["valid_mrr_text_mtf"] + entry["valid_mrr_abc_mtf"]) / 3
        assert entry["valid_mrr"] == pytest.approx(mean)
    for fmt in ("abc", "mtf"):
        folder = tmp_path / f"adapter_{fmt}"
        selection = json.loads((folder / "selection.json").read_text())
        assert selection["format"] == fmt and "ALIGN_SELECT_BY" in selection["selected_by"]
        assert selection["valid_mrr"] == max(e["valid_mrr"] for e in entries)
        weights = adapter_weights(folder)
        assert any("symbolic_proj" in k for k in weights) and any("lora_A" in k for k in weights)
        # Loadable as a one-format run's adapter: plain PEFT onto a plain model.
        PeftModel.from_pretrained(load_clamp3(ModelConfig.from_json(TINY_MODEL_CONFIG), TINY_WEIGHTS), str(folder))
    abc, mtf = adapter_weights(tmp_path / "adapter_abc"), adapter_weights(tmp_path / "adapter_mtf")
    assert abc.keys() == mtf.keys() and any(not torch.equal(abc[k], mtf[k]) for k in abc)
    log = (tmp_path / "run" / "JOINT_training.log").read_text()
    assert "training: 29 pieces: 17 pairs" in log and "sheet->MIDI" in log
    assert [p.name.split("_")[0] for p in list_checkpoints(tmp_path / "run")] == ["joint"] * 3


def test_the_joint_loss_masks_same_piece_negatives_and_leaves_out_terms_without_rows():
    """One process: the joint loss is its three contrastive terms over the rows it is given, the
    sheet<->MIDI term over the first ``pairs`` rows; a pair whose MIDI repeats another's is not a
    negative there; a format without rows drops its term."""
    from training.joint_loss import JointLoss
    from training.loss import ContrastiveLoss

    generator = torch.Generator().manual_seed(0)
    texts = {"abc": torch.randn(5, 8, generator=generator), "mtf": torch.randn(4, 8, generator=generator)}
    music = {"abc": torch.randn(5, 8, generator=generator), "mtf": torch.randn(4, 8, generator=generator)}
    keys = {fmt: {"text_keys": torch.arange(len(t)), "music_keys": torch.arange(len(t)) + 10}
            for fmt, t in texts.items()}
    keys["mtf"]["music_keys"][2] = keys["mtf"]["music_keys"][0]  # pairs 0 and 2: the same MIDI
    loss_fn = JointLoss("clamp3", 1.0, align_weight=0.5)
    total, terms = loss_fn(texts, music, 3, keys)
    plain = ContrastiveLoss("clamp3", 1.0, gather=False)
    expected = {fmt: plain(texts[fmt], music[fmt], **keys[fmt]) for fmt in texts}
    align = plain(music["abc"][:3], music["mtf"][:3], text_keys=keys["abc"]["music_keys"][:3],
                  music_keys=keys["mtf"]["music_keys"][:3])
    assert align != pytest.approx(float(plain(music["abc"][:3], music["mtf"][:3])))  # the mask matters
    assert terms == pytest.approx({"text_abc": float(expected["abc"]), "text_mtf": float(expected["mtf"]),
                                   "abc_mtf": float(align)})
    assert float(total) == pytest.approx(float(expected["abc"] + expected["mtf"] + 0.5 * align))
    empty = {"abc": texts["abc"], "mtf": torch.zeros(0, 8)}
    total, terms = loss_fn(empty, {"abc": music["abc"], "mtf": torch.zeros(0, 8)}, 0, None)
    assert set(terms) == {"text_abc"} and float(total) == pytest.approx(float(plain(texts["abc"], music["abc"])))


def test_a_joint_run_needs_both_formats_lora_and_pairs(tmp_path, word_tokenizer, capsys):
    make_records(tmp_path, "abc", paired=True)
    assert train_clamp3_lora.main(options(tmp_path, word_tokenizer, ALIGN_WEIGHT=1.0)) == 2
    assert "use --format both" in capsys.readouterr().err
    assert train_clamp3_lora.main(joint_options(tmp_path, word_tokenizer, TRAIN_MODE="full")) == 2
    assert "TRAIN_MODE must be 'lora'" in capsys.readouterr().err
    assert train_clamp3_lora.main(joint_options(tmp_path, word_tokenizer, ALIGN_SELECT_BY=["text_abc", "sheet"])) == 2
    assert "ALIGN_SELECT_BY must name" in capsys.readouterr().err
    # Selection by sheet->MIDI alone, in fp16 autocast with a gradient scaler and GradCache.
    make_records(tmp_path, "mtf", paired=True)
    args = joint_options(tmp_path, word_tokenizer, LORA_NUM_EPOCHS=1, ALIGN_SELECT_BY=["abc_mtf"],
                         TRAIN_PRECISION="fp16", GRAD_CACHE_MICRO_BATCH=2)
    assert train_clamp3_lora.main(args + ["--overwrite"]) == 0
    (entry,) = history(tmp_path, "joint")
    assert entry["valid_mrr"] == entry["valid_mrr_abc_mtf"] and entry["train_loss"] > 0
    assert json.loads((tmp_path / "adapter_mtf" / "selection.json").read_text())["selected_by"].endswith(
        "abc_mtf (ALIGN_SELECT_BY)")
    make_records(tmp_path, "mtf")  # no pair_id in the MTF records
    assert train_clamp3_lora.main(joint_options(tmp_path, word_tokenizer) + ["--overwrite"]) == 2
    assert "nothing to align" in capsys.readouterr().err


def test_a_killed_joint_run_resumes_bitwise_with_grad_cache(tmp_path, word_tokenizer):
    """One joint run trains uninterrupted; another is killed with SIGKILL once it has written a
    checkpoint, then resumed: both adapters and the history are bitwise equal (GradCache with
    micro-batches of 2, LoRA dropout on)."""
    common = {"LORA_NUM_EPOCHS": 2, "LORA_CHECKPOINT_STEPS": 1, "LORA_DROPOUT": 0.1, "GRAD_CACHE_MICRO_BATCH": 2,
              "LORA_MTF_MODULES_TO_SAVE": ["symbolic_proj"]}
    uninterrupted = joint_options(paired_records(tmp_path / "a"), word_tokenizer, **common)
    assert train_clamp3_lora.main(uninterrupted) == 0
    killed_args = joint_options(paired_records(tmp_path / "b"), word_tokenizer, **common)
    process = subprocess.Popen([sys.executable, str(TRAINER_SCRIPT), *killed_args], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while time.time() < deadline and not list_checkpoints(tmp_path / "b" / "run") and process.poll() is None:
        time.sleep(0.05)
    assert process.poll() is None, f"run ended before it could be killed: {process.stderr.read()}"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert train_clamp3_lora.main(killed_args + ["--resume", "latest"]) == 0
    assert "resumed at epoch" in (tmp_path / "b" / "run" / "JOINT_training.log").read_text()
    for fmt in ("abc", "mtf"):
        a, b = adapter_weights(tmp_path / "a" / f"adapter_{fmt}"), adapter_weights(tmp_path / "b" / f"adapter_{fmt}")
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), fmt
    timing = ("samples_per_s", "seconds", "peak_memory_mb")
    for entry_a, entry_b in zip(history(tmp_path / "a", "joint"), history(tmp_path / "b", "joint"), strict=True):
        assert {k: v for k, v in entry_a.items() if k not in timing} == {k: v for k, v in entry_b.items()
                                                                         if k not in timing}


def test_grad_cache_gives_the_joint_step_the_full_batch_gradient(tmp_path, word_tokenizer):
    """The joint step with micro-batches of 2 leaves the gradient one pass leaves (dropout off)."""
    import lora
    import runconfig
    from training.data import BatchDataset
    from training.joint_loss import JointLoss, joint_step
    from training.model_setup import music_encoder, set_train_mode
    from training.pairs import JointBatchDataset, pair_records, plan_joint_epoch
    from training.text import LiveText
    from transformers import AutoTokenizer

    records = loaded(paired_records(tmp_path))
    pairing = pair_records(records)
    plan = plan_joint_epoch(pairing, 8, epoch=0, seed=0, bucketing=False)
    model_config = ModelConfig.from_json(no_dropout_model_config(tmp_path / "model.json"))
    live = LiveText(AutoTokenizer.from_pretrained(word_tokenizer), 128)
    parts = {fmt: BatchDataset(records[fmt], plan.formats[fmt], M3Patchilizer(), text=live, seed=0,
                               epoch=0, augmentation=None) for fmt in ("abc", "mtf")}
    item = JointBatchDataset(parts, plan.pairs)[0]
    batches = {fmt: {k: v for k, v in item[fmt].items() if k in ("patches", "patch_mask")} for fmt in parts}
    assert item["pairs"] > 1 and all(b["patches"].shape[0] > 2 for b in batches.values())
    texts = {fmt: torch.randn(b["patches"].shape[0], 32, generator=torch.Generator().manual_seed(1))
             for fmt, b in batches.items()}
    keys = {fmt: {"text_keys": item[fmt]["text_keys"], "music_keys": item[fmt]["music_keys"]} for fmt in parts}
    results = []
    for micro in (0, 2):
        models, encoders = [], {}
        for fmt in ("abc", "mtf"):
            torch.manual_seed(0)
            cfg = runconfig.build_config(overrides={"LORA_INIT_WEIGHTS": "gaussian", "LORA_DROPOUT": 0.0,
                                                    f"LORA_{fmt.upper()}_MODULES_TO_SAVE": ["symbolic_proj"]})
            model = lora.add_adapter(load_clamp3(model_config, TINY_WEIGHTS), cfg, fmt)
            set_train_mode(model.get_base_model(), text_frozen=True, symbolic_dropout=True)
            encoders[fmt] = music_encoder(model.get_base_model(), torch.device("cpu"), "fp32")
            models.append(model)
        loss_fn = JointLoss("normalized", 1.0, align_weight=0.5)
        loss, terms = joint_step(batches, encoders, texts, loss_fn, item["pairs"], 32, keys=keys, micro_batch=micro)
        grads = {f"{i}.{n}": p.grad.clone() for i, m in enumerate(models) for n, p in m.named_parameters()
                 if p.grad is not None}
        grads.update({f"loss.{n}": p.grad.clone() for n, p in loss_fn.named_parameters()})
        results.append((loss, terms, grads))
    (loss0, terms0, grads0), (loss2, terms2, grads2) = results
    assert set(terms0) == {"text_abc", "text_mtf", "abc_mtf"} and loss0 == pytest.approx(loss2, abs=1e-6)
    assert loss0 == pytest.approx(terms0["text_abc"] + terms0["text_mtf"] + 0.5 * terms0["abc_mtf"], abs=1e-5)
    assert grads0.keys() == grads2.keys() and any(k.startswith("1.") for k in grads0)
    for name, grad in grads0.items():
        assert torch.allclose(grads2[name], grad, rtol=1e-4, atol=1e-6), name


@pytest.mark.slow  # two torchrun jobs
def test_two_gloo_ranks_equal_one_process_in_a_joint_run(tmp_path, word_tokenizer):
    model_config = no_dropout_model_config(tmp_path / "model.json")
    common = {"LORA_NUM_EPOCHS": 2, "LORA_DROPOUT": 0.0, "LORA_ABC_MODULES_TO_SAVE": ["symbolic_proj"],
              "LOSS": "normalized", "ALIGN_WEIGHT": 0.5}

    def args(name: str, batch: int, micro: int) -> list[str]:
        listed = joint_options(paired_records(tmp_path / name), word_tokenizer, LORA_BATCH_SIZE=batch,
                               GRAD_CACHE_MICRO_BATCH=micro, **common)
        return [str(model_config) if a == str(TINY_MODEL_CONFIG) else a for a in listed]

    # 3 pieces a rank with GradCache's micro-batches of 2, and 1 piece a rank (a rank then often
    # holds no row of a format, or no pair).
    for per_rank, micro in ((3, 2), (1, 0)):
        one, two = f"one{per_rank}", f"two{per_rank}"
        done = train_job(1, args(one, 2 * per_rank, micro))
        assert done.returncode == 0, done.stderr[-3000:]
        done = train_job(2, args(two, per_rank, micro))
        assert done.returncode == 0, done.stderr[-3000:]
        for a, b in zip(history(tmp_path / one, "joint"), history(tmp_path / two, "joint"), strict=True):
            assert a.keys() == b.keys()
            for key in a:
                if "loss" in key or "mrr" in key:
                    assert a[key] == pytest.approx(b[key], abs=1e-5), (per_rank, key)
        for fmt in ("abc", "mtf"):
            a, b = adapter_weights(tmp_path / one / f"adapter_{fmt}"), adapter_weights(tmp_path / two / f"adapter_{fmt}")
            assert a.keys() == b.keys()
            for key in a:
                assert torch.allclose(a[key], b[key], rtol=0, atol=1e-5), (per_rank, fmt, key)
