"""On a CUDA GPU (marker ``gpu``; skipped without one): the trainer in each precision, extraction
against the CPU in float32, the frozen-base kernels on CUDA and beside autocast, and GradCache's
re-run with dropout drawn on the GPU. ``make gpu-check`` runs these and the official-size checks
of bench/gpu_check.py."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
import train_clamp3_lora
from features import FeatureExtractor
from helpers import OFFICIAL, history, lora_core, make_records, music_batch, options

pytestmark = pytest.mark.gpu

CUDA = torch.device("cuda")


def on_cuda(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: value.to(CUDA) for key, value in batch.items()}


def cuda_lora_core(dropout: float):
    """test_train_memory's tiny LoRA model with non-zero LoRA B weights (every LoRA weight then gets
    a gradient), on the GPU."""
    model, core = lora_core(dropout=dropout)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return model.to(CUDA), core


def lora_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_grads_close(got: dict, want: dict, rtol: float, atol: float) -> None:
    assert got.keys() == want.keys() and want
    for name, grad in want.items():
        torch.testing.assert_close(got[name], grad, rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize(("precision", "micro_batch"), [("fp32", 0), ("fp32", 2), ("bf16", 0), ("bf16", 2),
                                                        ("fp16", 0), ("fp16", 2)])
def test_trainer_on_cuda(tmp_path, word_tokenizer, precision, micro_batch):
    """The trainer end to end on the GPU (tiny model): the precision asked for (or fp16 where the
    GPU has no native bf16) is the one recorded, the loss is finite, an adapter is selected."""
    from training.precision import resolve_precision

    make_records(tmp_path, "abc")
    args = options(tmp_path, word_tokenizer, TRAIN_DEVICE="cuda", TRAIN_PRECISION=precision, LORA_NUM_EPOCHS=2,
                   GRAD_CACHE_MICRO_BATCH=micro_batch, LORA_CHECKPOINT_STEPS=0)
    assert train_clamp3_lora.main(args) == 0
    entries = history(tmp_path)
    assert len(entries) == 2
    assert all(math.isfinite(e["train_loss"]) and math.isfinite(e["valid_loss"]) for e in entries), entries
    assert all(0.0 < e["valid_mrr"] <= 1.0 and e["peak_memory_mb"] > 0 for e in entries)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["device"].startswith("cuda")
    assert saved["precision"]["effective"] == resolve_precision(precision, CUDA).name
    assert (tmp_path / "adapter_abc" / "adapter_model.safetensors").is_file()


def fixture_inputs(extractor: FeatureExtractor) -> list[torch.Tensor]:
    """The official fixtures' ABC and MTF pieces (18 longer than one segment)."""
    files = sorted(p for sub in ("int_abc", "int_abc_from_abc_inputs", "mtf")
                   for p in (OFFICIAL / "outputs" / sub).iterdir() if p.suffix in (".abc", ".mtf"))
    assert len(files) == 62
    return [extractor.symbolic_input(p.read_text(encoding="utf-8")) for p in files]


def test_extraction_on_cuda_matches_the_cpu(tiny_model, word_tokenizer):
    """Global features on the GPU: float32 within 1e-4 of the CPU's float32, bfloat16 and float16
    autocast at cosine >= 0.999 (symbolic, text and audio towers)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(word_tokenizer)
    cpu = FeatureExtractor(tiny_model, device="cpu", tokenizer=tokenizer)
    inputs = {"symbolic": fixture_inputs(cpu),
              "text": [cpu.text_input(" ".join(f"w{(i * 11 + j) % 200}" for j in range(5 + 9 * i)))
                       for i in range(12)],
              "audio": [cpu.audio_input(np.random.default_rng(i).normal(size=(1, 20 + 30 * i, 32)))
                        for i in range(6)]}
    gpu_model = copy.deepcopy(tiny_model).to(CUDA)
    for modality, pieces in inputs.items():
        reference = np.concatenate(cpu.extract(modality, pieces))
        for dtype in ("float32", "bfloat16", "float16"):
            extractor = FeatureExtractor(gpu_model, device=CUDA, dtype=dtype, tokenizer=tokenizer)
            ours = np.concatenate(extractor.extract(modality, pieces))
            assert ours.shape == reference.shape and ours.dtype == np.float32 and np.isfinite(ours).all()
            if dtype == "float32":
                np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-4, err_msg=modality)
            else:
                cosine = (ours * reference).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(reference, axis=1)
                assert cosine.min() >= 0.999, (modality, dtype, cosine.min())


def test_frozen_kernels_on_cuda_equal_plain_autograd():
    """The trainer's float32 music encoder (frozen feed-forward blocks, fused LoRA projections) on
    the GPU: the features and LoRA gradients of the model's own forward."""
    from training.model_setup import music_encoder, set_train_mode

    batch = on_cuda(music_batch([9, 5, 7]))
    results = []
    for trainer in (True, False):
        model, core = cuda_lora_core(dropout=0.0)
        set_train_mode(core, text_frozen=True, symbolic_dropout=False)
        if trainer:
            features = music_encoder(core, CUDA, "fp32")(batch)
        else:
            features = core.features("symbolic", batch["patches"], batch["patch_mask"])
        features.square().sum().backward()
        results.append((features.detach(), lora_grads(model)))
    (features, grads), (plain_features, plain_grads) = results
    torch.testing.assert_close(features, plain_features, rtol=0, atol=1e-5)
    assert any("lora_A" in name for name in grads)
    assert_grads_close(grads, plain_grads, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_autocast_steps_keep_clear_of_the_frozen_kernels(precision):
    """The frozen-base kernels are float32-only and refuse CUDA autocast; the trainer's encoder in
    bf16/fp16 runs the model's own forward instead: finite features and gradients close to
    float32's (cosine >= 0.99)."""
    from training.frozen_ops import frozen_base_kernels
    from training.model_setup import music_encoder, set_train_mode

    model, core = cuda_lora_core(dropout=0.0)
    set_train_mode(core, text_frozen=True, symbolic_dropout=False)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    with torch.autocast("cuda", dtype=dtype), pytest.raises(RuntimeError, match="float32"):
        with frozen_base_kernels(core.symbolic_model):
            pass

    batch = on_cuda(music_batch([9, 5, 7]))
    outputs = {}
    for name in ("fp32", precision):
        model.zero_grad(set_to_none=True)
        features = music_encoder(core, CUDA, name)(batch)
        features.float().square().sum().backward()
        outputs[name] = (features.detach().float(), lora_grads(model))
    features, grads = outputs[precision]
    reference, reference_grads = outputs["fp32"]
    assert torch.isfinite(features).all()
    assert torch.nn.functional.cosine_similarity(features, reference, dim=1).min() >= 0.99
    assert grads.keys() == reference_grads.keys() and grads
    for name, grad in grads.items():
        assert torch.isfinite(grad).all(), name
        cosine = torch.nn.functional.cosine_similarity(grad.flatten(), reference_grads[name].flatten(), dim=0)
        assert cosine >= 0.99, (name, float(cosine))


def test_grad_cache_rerun_on_cuda_draws_the_same_dropout():
    """Dropout drawn on the GPU (symbolic encoder and LoRA): GradCache's gradient equals plain
    autograd over the same micro-batches in the same order, so each re-run drew the masks of its
    first pass; other seeds give another gradient, so the comparison depends on the masks."""
    from training.loss import ContrastiveLoss, contrastive_step, split_batch
    from training.model_setup import music_encoder, set_train_mode

    batch = on_cuda(music_batch([9, 5, 7, 6, 8, 4], seed=1))
    text = torch.randn(6, 32, generator=torch.Generator().manual_seed(2)).to(CUDA)
    model, core = cuda_lora_core(dropout=0.1)
    set_train_mode(core, text_frozen=True, symbolic_dropout=True)
    encode = music_encoder(core, CUDA, "fp32")
    results = []
    for seed, cached in ((123, True), (123, False), (321, False)):
        model.zero_grad(set_to_none=True)
        loss_fn = ContrastiveLoss("normalized").to(CUDA)
        torch.manual_seed(seed)
        if cached:
            loss = contrastive_step(batch, encode, text, loss_fn, micro_batch=2)
        else:
            music = torch.cat([encode(chunk) for chunk in split_batch(batch, 2)])
            value = loss_fn(text, music)
            value.backward()
            loss = value.item()
        results.append((loss, lora_grads(model)))
    (cached_loss, cached), (loss, reference), (_, other) = results
    assert cached_loss == pytest.approx(loss, abs=1e-5)
    assert_grads_close(cached, reference, rtol=1e-4, atol=1e-6)
    assert max((other[name] - reference[name]).abs().max().item() for name in reference) > 1e-4
