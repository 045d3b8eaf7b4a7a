"""What the first real run needs from the trainer (issue 16): validation on any number of ranks,
one resolved precision (and the CPU kernels it selects), mixed precision and its scaler on CPU,
run folders a failed start does not trap, devices and RNG states on cluster layouts."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
import train_clamp3_lora
from helpers import (
    TINY_MODEL_CONFIG,
    adapter_weights,
    history,
    make_records,
    no_dropout_model_config,
    options,
    train_job,
)
from training import checkpoint as ckpt
from training import frozen_ops
from training.checkpoint import list_checkpoints
from training.distributed import cuda_index
from training.precision import PrecisionError, resolve_precision


@pytest.fixture
def abc_records(tmp_path):
    return make_records(tmp_path, "abc")


def saved_config(tmp_path) -> dict:
    return json.loads((tmp_path / "run" / "config.json").read_text())


# ------------------------------------------------------------------ validation on many ranks


@pytest.mark.slow  # two torchrun jobs
def test_validation_with_fewer_last_rows_than_ranks_equals_one_process(tmp_path, word_tokenizer):
    """9 validation records, a global batch of 8 on 2 ranks: the last batch has one row, so rank 1
    gets none. It used to crash encoding a [0, 0, P] batch; every record must count once, and the
    numbers must be those of one process."""
    for name in ("one", "two"):
        make_records(tmp_path / name, "abc", valid=9)
    model_config = no_dropout_model_config(tmp_path / "model.json")

    def args(name: str, batch: int) -> list[str]:
        listed = options(tmp_path / name, word_tokenizer, LORA_BATCH_SIZE=batch, LORA_NUM_EPOCHS=1,
                         LORA_DROPOUT=0.0, LOSS="normalized", TRAIN_DEVICE="cpu")
        return [str(model_config) if a == str(TINY_MODEL_CONFIG) else a for a in listed]

    one = train_job(1, args("one", 8))
    assert one.returncode == 0, one.stderr[-3000:]
    two = train_job(2, args("two", 4))
    assert two.returncode == 0, two.stderr[-3000:]
    (a,), (b,) = history(tmp_path / "one"), history(tmp_path / "two")
    assert a["valid_mrr"] == pytest.approx(b["valid_mrr"], abs=1e-6)
    assert a["valid_loss"] == pytest.approx(b["valid_loss"], abs=1e-5)
    selection = json.loads((tmp_path / "two" / "adapter_abc" / "selection.json").read_text())
    assert selection["n_valid"] == 9


# ------------------------------------------------------------------ precision


def test_precision_is_resolved_once_from_the_device() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert resolve_precision("auto", cpu).name == "fp32"
    assert resolve_precision("bf16", cpu).name == "bf16"  # asked for explicitly: CPU autocast
    assert resolve_precision("fp16", cpu).uses_scaler
    native = resolve_precision("auto", cuda, bf16_native=lambda: True)
    assert (native.name, native.uses_scaler, native.note) == ("bf16", False, "")
    # V100/T4: bf16 would be emulated; fp16 with the scaler instead, and the run says so.
    for requested in ("auto", "bf16"):
        older = resolve_precision(requested, cuda, bf16_native=lambda: False)
        assert older.name == "fp16" and older.uses_scaler and "no native bf16" in older.note
    assert resolve_precision("fp32", cuda, bf16_native=lambda: False).name == "fp32"
    with pytest.raises(PrecisionError, match="auto, bf16, fp16, fp32"):
        resolve_precision("fp8", cpu)


def test_an_unknown_precision_is_one_line_before_any_weight_is_read(tmp_path, word_tokenizer, abc_records,
                                                                     capsys):
    args = options(tmp_path, word_tokenizer, TRAIN_PRECISION="float16")
    args[args.index("--weights") + 1] = str(tmp_path / "no_such_weights.pth")
    assert train_clamp3_lora.main(args) == 2
    err = capsys.readouterr().err
    assert "TRAIN_PRECISION must be one of auto, bf16, fp16, fp32, not 'float16'" in err
    assert "base checkpoint not found" not in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


class KernelCalls:
    """How many times the trainer's frozen feed-forward kernel computed a forward."""

    def __init__(self, monkeypatch):
        self.count = 0
        original = frozen_ops.FrozenFeedForward.forward

        def counted(ctx, *args, **kwargs):
            self.count += 1
            return original(ctx, *args, **kwargs)

        monkeypatch.setattr(frozen_ops.FrozenFeedForward, "forward", staticmethod(counted))


def test_a_default_cpu_run_trains_through_the_frozen_base_kernels(tmp_path, word_tokenizer, abc_records,
                                                                    monkeypatch):
    calls = KernelCalls(monkeypatch)
    assert train_clamp3_lora.main(options(tmp_path, word_tokenizer, LORA_NUM_EPOCHS=1, TRAIN_DEVICE="cpu")) == 0
    steps = history(tmp_path)[-1]["step"]
    assert calls.count >= steps * 2  # the tiny symbolic encoder has two layers, each entered every step
    saved = saved_config(tmp_path)
    assert saved["config"]["TRAIN_PRECISION"] == "auto"
    assert saved["precision"] == {"requested": "auto", "effective": "fp32", "note": ""}
    assert saved["device"] == "cpu" and saved["device_name"] == "cpu"
    assert "precision: fp32 on cpu (TRAIN_PRECISION=auto)" in (tmp_path / "run" / "ABC_training.log").read_text()


def test_bf16_asked_for_on_cpu_trains_under_cpu_autocast(tmp_path, word_tokenizer, abc_records, monkeypatch):
    calls = KernelCalls(monkeypatch)
    assert train_clamp3_lora.main(options(tmp_path, word_tokenizer, LORA_NUM_EPOCHS=1, TRAIN_DEVICE="cpu",
                                          TRAIN_PRECISION="bf16", GRAD_CACHE_MICRO_BATCH=2)) == 0
    (entry,) = history(tmp_path)
    assert math.isfinite(entry["train_loss"]) and math.isfinite(entry["valid_loss"]) and entry["valid_mrr"] > 0
    assert calls.count == 0  # the kernels are float32-only: autocast takes the layers' own forward
    assert saved_config(tmp_path)["precision"]["effective"] == "bf16"


def test_fp16_on_cpu_runs_the_scaler_and_resumes_it_bitwise(tmp_path, word_tokenizer, abc_records):
    """fp16 autocast with torch.amp.GradScaler("cpu") under GradCache: the scaler's state is in
    every checkpoint, and a run resumed from a middle checkpoint ends bitwise equal to the whole run."""
    common = dict(LORA_NUM_EPOCHS=2, TRAIN_DEVICE="cpu", TRAIN_PRECISION="fp16", GRAD_CACHE_MICRO_BATCH=2,
                  LORA_CHECKPOINT_STEPS=1, LORA_KEEP_CHECKPOINTS=100, LORA_DROPOUT=0.1)
    whole = options(tmp_path, word_tokenizer, **common)
    assert train_clamp3_lora.main(whole) == 0
    checkpoints = list_checkpoints(tmp_path / "run")
    assert len(checkpoints) >= 4
    states = [ckpt.load_checkpoint(path) for path in checkpoints]
    assert all(state["scaler"] and state["scaler"]["scale"] > 0 for state in states)
    assert all(math.isfinite(e["train_loss"]) for e in history(tmp_path))

    middle = checkpoints[len(checkpoints) // 2 - 1]  # inside the first epoch
    resumed = options(tmp_path, word_tokenizer, **common, LORA_LOG_DIR=str(tmp_path / "resumed"),
                      LORA_ABC_ADAPTER_DIR=str(tmp_path / "adapter_resumed"))
    assert train_clamp3_lora.main(resumed + ["--resume", str(middle)]) == 0
    a, b = adapter_weights(tmp_path / "adapter_abc"), adapter_weights(tmp_path / "adapter_resumed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    final_whole = ckpt.load_checkpoint(list_checkpoints(tmp_path / "run")[-1])
    final_resumed = ckpt.load_checkpoint(list_checkpoints(tmp_path / "resumed")[-1])
    assert final_whole["scaler"] == final_resumed["scaler"]


def test_the_frozen_base_kernels_refuse_autocast(tiny_model) -> None:
    import lora
    import runconfig

    cfg = runconfig.build_config(overrides={"LORA_R": 4})
    adapted = lora.add_adapter(tiny_model, cfg, "abc").get_base_model()
    patches = torch.randint(0, 128, (2, 5, adapted.model_config.patch_size))
    mask = torch.ones(2, 5, dtype=torch.long)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(RuntimeError, match="float32-only"), frozen_ops.frozen_base_kernels(adapted.symbolic_model):
            pass
    with frozen_ops.frozen_base_kernels(adapted.symbolic_model) as patched:
        assert patched == 2
        with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(RuntimeError, match="float32 only"):
            adapted.features("symbolic", patches, mask)
        assert adapted.features("symbolic", patches, mask).dtype == torch.float32


# ------------------------------------------------------------------ run folders


def test_a_failed_first_start_does_not_trap_its_run_folder(tmp_path, word_tokenizer, abc_records, capsys):
    moved = tmp_path / "elsewhere.jsonl"
    shutil.move(abc_records, moved)
    assert train_clamp3_lora.main(options(tmp_path, word_tokenizer, LORA_NUM_EPOCHS=1)) == 2
    assert "training records not found" in capsys.readouterr().err
    assert (tmp_path / "run" / "config.json").is_file() and not list_checkpoints(tmp_path / "run")

    # Nothing to resume, and the message says what to do instead.
    assert train_clamp3_lora.main(options(tmp_path, word_tokenizer, LORA_NUM_EPOCHS=1) + ["--resume", "latest"]) == 2
    err = capsys.readouterr().err
    assert "no checkpoint in" in err and "Start it again without --resume (the folder is reused)" in err

    # The corrected start reuses the folder without --overwrite.
    shutil.move(moved, abc_records)
    assert train_clamp3_lora.main(options(tmp_path, word_tokenizer, LORA_NUM_EPOCHS=1)) == 0
    assert "reused: an earlier start there wrote no checkpoint" in (tmp_path / "run" / "ABC_training.log").read_text()
    # A folder that holds a checkpoint is still protected.
    assert train_clamp3_lora.main(options(tmp_path, word_tokenizer, LORA_NUM_EPOCHS=1)) == 2
    assert "already holds a training run" in capsys.readouterr().err


# ------------------------------------------------------------------ devices and RNG on clusters


def test_each_process_takes_its_local_rank_modulo_the_gpus_it_sees() -> None:
    assert [cuda_index(rank, 8) for rank in range(8)] == list(range(8))
    assert [cuda_index(rank, 1) for rank in range(4)] == [0, 0, 0, 0]  # SLURM: one GPU visible per task
    assert [cuda_index(rank, 2) for rank in range(4)] == [0, 1, 0, 1]
    with pytest.raises(RuntimeError, match="sees no GPU"):
        cuda_index(0, 0)


def test_a_checkpoint_holds_this_ranks_rng_states_only(tmp_path) -> None:
    state = ckpt.rng_state(torch.device("cpu"))
    assert set(state) == {"python", "numpy", "torch"}
    drawn = torch.rand(3)
    ckpt.set_rng_state(state, torch.device("cpu"))
    assert torch.equal(torch.rand(3), drawn)
    # A checkpoint written before the per-rank rule (every visible GPU's state) restores on CPU.
    legacy = {**state, "cuda": [torch.zeros(16, dtype=torch.uint8)] * 8}
    ckpt.set_rng_state(legacy, torch.device("cpu"))
    assert torch.equal(torch.rand(3), drawn)
