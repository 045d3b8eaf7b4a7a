"""The trainer's memory-saving path for the frozen base (training.frozen_ops): the same values and
gradients as plain autograd, less kept for backward, and never used outside training."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    TINY_MODEL_CONFIG,
    TINY_WEIGHTS,
    lora_core,
    music_batch,
    saved_bytes,
    trainer_and_plain_path,
)
from modeling import ModelConfig, load_clamp3
from training.frozen_ops import FrozenFeedForward, frozen_base_kernels, frozen_feed_forward_layers


def feed_forward_inputs(dtype: torch.dtype, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 7, 16, generator=generator, dtype=dtype)
    w1, b1 = torch.randn(48, 16, generator=generator, dtype=dtype) / 4, torch.randn(48, generator=generator, dtype=dtype)
    w2, b2 = torch.randn(16, 48, generator=generator, dtype=dtype) / 7, torch.randn(16, generator=generator, dtype=dtype)
    return x, w1, b1, w2, b2


@pytest.mark.parametrize("keep_pre_activation", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_frozen_feed_forward_equals_plain_autograd(dtype: torch.dtype, keep_pre_activation: bool) -> None:
    x, w1, b1, w2, b2 = feed_forward_inputs(dtype)
    upstream = torch.randn(3, 7, 16, generator=torch.Generator().manual_seed(1), dtype=dtype)
    outputs, grads = [], []
    for fn in (lambda v: FrozenFeedForward.apply(v, w1, b1, w2, b2, keep_pre_activation),
               lambda v: F.linear(F.gelu(F.linear(v, w1, b1)), w2, b2)):
        leaf = x.clone().requires_grad_(True)
        out = fn(leaf)
        out.backward(upstream)
        outputs.append(out.detach())
        grads.append(leaf.grad)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-12
    assert torch.allclose(outputs[0], outputs[1], rtol=0, atol=tolerance)
    assert torch.allclose(grads[0], grads[1], rtol=0, atol=tolerance)


@pytest.mark.parametrize("keep_pre_activation", [False, True])
def test_frozen_feed_forward_passes_gradcheck(keep_pre_activation: bool) -> None:
    x, w1, b1, w2, b2 = feed_forward_inputs(torch.float64)
    assert torch.autograd.gradcheck(lambda v: FrozenFeedForward.apply(v, w1, b1, w2, b2, keep_pre_activation),
                                    (x.requires_grad_(True),))


def test_frozen_feed_forward_refuses_trainable_weights() -> None:
    x, w1, b1, w2, b2 = feed_forward_inputs(torch.float32)
    with pytest.raises(ValueError, match="frozen"):
        FrozenFeedForward.apply(x, w1.requires_grad_(True), b1, w2, b2)


@pytest.mark.parametrize("symbolic_dropout", [False, True])
def test_trainer_gradient_equals_the_plain_path_and_keeps_less(symbolic_dropout: bool) -> None:
    """The trainer's music encoder (frozen feed-forward blocks patched) against the model's own
    forward: the same features and LoRA gradients within 1e-5, dropout masks included (the
    patched layers draw them in the same order), and less memory kept for backward."""
    def check(core) -> None:
        assert len(frozen_feed_forward_layers(core.symbolic_model)) == 2

    results = trainer_and_plain_path(music_batch([9, 5, 7]), dropout=0.1, symbolic_dropout=symbolic_dropout,
                                     check_patched=check)  # padded, so the attention mask matters
    (features, grads, kept, rng), (plain_features, plain_grads, plain_kept, plain_rng) = results
    assert torch.allclose(features, plain_features, rtol=0, atol=1e-5)
    assert grads.keys() == plain_grads.keys() and grads
    for name, grad in plain_grads.items():
        assert torch.allclose(grads[name], grad, rtol=0, atol=1e-5), name
    assert torch.equal(rng, plain_rng)  # the same random numbers drawn
    # Per layer and patch the plain path keeps the 4 × hidden (here 64) GELU input, the patched one
    # its 1 × hidden (32) input instead: 2 layers × 3 × 9 patches × (64 - 32) float32 less.
    assert plain_kept - kept == 2 * 3 * 9 * (64 - 32) * 4


def test_short_batches_keep_pre_activations_within_the_longest_batchs_memory() -> None:
    """With a patch budget, a batch shorter than the longest the run can bring keeps feed-forward
    pre-activations instead of recomputing them, in as many layers as fit: never more kept for
    backward than the recomputing path keeps at the budget, none at the budget, both layers when
    short; the same features and LoRA gradients as the recomputing path."""
    from training.frozen_ops import pre_activation_layers
    from training.model_setup import music_encoder, set_train_mode

    rows, longest = 2, 12
    budget = rows * longest

    def run(lengths: list[int], patch_budget: int) -> tuple[torch.Tensor, dict, int]:
        model, core = lora_core(dropout=0.0)
        set_train_mode(core, text_frozen=True, symbolic_dropout=False)
        encode = functools.partial(music_encoder(core, torch.device("cpu"), "fp32", patch_budget=patch_budget),
                                   music_batch(lengths))
        features, kept = saved_bytes(encode, model)
        features.pow(2).sum().backward()
        return features.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}, kept

    _, at_budget = lora_core(dropout=0.0)
    layers = {length: pre_activation_layers(at_budget.symbolic_model, rows * length, budget)
              for length in range(1, longest + 1)}
    # 2 layers of 8 units, 1 more for each that keeps (intermediate = 2 × hidden).
    assert [layers[n] for n in (1, 10, 11, longest)] == [2, 2, 1, 0]
    _, _, longest_kept = run([longest, longest - 1], 0)  # padded, as the shorter ones are
    for length in (3, 10, 11, longest):
        features, grads, kept = run([length, length - 1], budget)
        plain_features, plain_grads, plain_kept = run([length, length - 1], 0)
        assert kept <= longest_kept, length
        # Each keeping layer holds the 2 × hidden pre-activation instead of its 1 × hidden input.
        assert kept - plain_kept == layers[length] * rows * length * 32 * 4, length
        assert torch.allclose(features, plain_features, rtol=0, atol=1e-6)
        assert grads.keys() == plain_grads.keys()
        for name, grad in plain_grads.items():
            assert torch.allclose(grads[name], grad, rtol=0, atol=1e-6), name


def test_the_patch_is_training_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the trainer's music encoder patches (with gradient, and in GradCache's first pass
    without, where the same arithmetic costs less than extraction's kernels); the model's own
    forward (validation, extraction) and full fine-tuning (trainable feed-forward weights) run
    unpatched; after a call every layer has its class's forward again."""
    from training.model_setup import music_encoder, set_train_mode

    model, core = lora_core(dropout=0.0)
    set_train_mode(core, text_frozen=True, symbolic_dropout=False)
    layers = frozen_feed_forward_layers(core.symbolic_model)
    batch = music_batch([6, 4])
    encode = music_encoder(core, torch.device("cpu"), "fp32")
    entered = []
    original = FrozenFeedForward.apply
    monkeypatch.setattr(FrozenFeedForward, "apply", lambda *args: entered.append(1) or original(*args))
    with torch.no_grad():
        first = encode(batch)
        assert len(entered) == 2  # both layers, in the first pass too
        core.features("symbolic", batch["patches"], batch["patch_mask"])
        assert len(entered) == 2  # the model's own forward: untouched
    second = encode(batch)
    assert torch.allclose(first, second.detach(), rtol=0, atol=1e-5)
    assert all("feed_forward_chunk" not in vars(layer) for layer in layers)
    with frozen_base_kernels(core.symbolic_model) as count:
        assert count == 2 and all("feed_forward_chunk" in vars(layer) for layer in layers)
    assert all("feed_forward_chunk" not in vars(layer) for layer in layers)

    full = load_clamp3(ModelConfig.from_json(TINY_MODEL_CONFIG), TINY_WEIGHTS)
    for name, parameter in full.named_parameters():
        parameter.requires_grad_(name.startswith("symbolic_model"))
    assert frozen_feed_forward_layers(full.symbolic_model) == []


def test_gradient_checkpointed_layers_keep_their_forward() -> None:
    from training.model_setup import enable_checkpointing, set_train_mode

    _, core = lora_core(dropout=0.0)
    enable_checkpointing(core.symbolic_model.base)
    set_train_mode(core, text_frozen=True, symbolic_dropout=True)
    assert frozen_feed_forward_layers(core.symbolic_model) == []


def test_gradient_checkpointing_applies_with_the_encoder_dropout_off() -> None:
    """GRADIENT_CHECKPOINTING with SYMBOLIC_DROPOUT=False: the encoder is in eval mode (no dropout), yet
    each layer is still recomputed in backward (transformers checkpoints only layers in training mode)."""
    import lora
    import runconfig
    from training.model_setup import enable_checkpointing, set_train_mode

    model = lora.add_adapter(load_clamp3(ModelConfig.from_json(TINY_MODEL_CONFIG), TINY_WEIGHTS),
                             runconfig.build_config(overrides={"LORA_R": 4, "LORA_DROPOUT": 0.0}), "abc")
    core = model.get_base_model()
    enable_checkpointing(core.symbolic_model.base)
    set_train_mode(core, text_frozen=True, symbolic_dropout=False)
    layers = core.symbolic_model.base.encoder.layer
    assert all(layer.training and not layer.attention.training for layer in layers)
    assert not any(m.training for m in core.symbolic_model.modules() if isinstance(m, torch.nn.Dropout))
    calls = []
    handle = layers[0].attention.register_forward_hook(lambda *_: calls.append(1))
    patches = torch.randint(0, 128, (2, 5, 64))
    features = core.features("symbolic", patches, torch.ones(2, 5, dtype=torch.long))
    assert len(calls) == 1
    features.sum().backward()
    handle.remove()
    assert len(calls) == 2  # recomputed in backward: checkpointed
