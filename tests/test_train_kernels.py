"""The trainer's fused LoRA projections and kept embedding table (training.frozen_ops): the same
values and LoRA gradients as PEFT's plain path, applied only inside the trainer's music encoder, and
restored."""

from __future__ import annotations

import pytest
import torch
from helpers import TINY_MODEL_CONFIG, TINY_WEIGHTS, lora_core, music_batch, trainer_and_plain_path
from modeling import ModelConfig, load_clamp3
from training import frozen_ops
from training.frozen_ops import FrozenLoRAProjections, frozen_base_kernels, fused_projection_attentions
from training.model_setup import enable_checkpointing


def projection_inputs(dtype: torch.dtype, ranks=(3, 2, 4), seed: int = 0):
    """Three LoRA targets over one input: (x, bases, A's, B's), the second base without bias and
    each target with its own rank and scaling (PEFT's rank_pattern/alpha_pattern)."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=dtype)

    x = randn(2, 5, 12)
    bases = ((randn(12, 12) / 3, randn(12), 2.0), (randn(8, 12) / 3, None, 0.5), (randn(12, 12) / 3, randn(12), 1.25))
    a_weights = [randn(r, 12) / 2 for r in ranks]
    b_weights = [randn(base[0].shape[0], r) for base, r in zip(bases, ranks, strict=True)]
    return x, bases, a_weights, b_weights


def peft_projections(x, bases, a_weights, b_weights):
    """PEFT's vanilla LoRA forward without dropout: ``base(x) + B(A(x)) * scaling``."""
    F = torch.nn.functional
    return [F.linear(x, w, b) + F.linear(F.linear(x, a), bw) * s
            for (w, b, s), a, bw in zip(bases, a_weights, b_weights, strict=True)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_projections_equal_peft(dtype: torch.dtype) -> None:
    x, bases, a_weights, b_weights = projection_inputs(dtype)
    upstream = [torch.randn(2, 5, base[0].shape[0], generator=torch.Generator().manual_seed(i), dtype=dtype)
                for i, base in enumerate(bases)]
    results = []
    for fn in (lambda *t: FrozenLoRAProjections.apply(t[0], bases, *t[1:]),
               lambda *t: peft_projections(t[0], bases, t[1:4], t[4:])):
        leaves = [t.clone().requires_grad_(True) for t in (x, *a_weights, *b_weights)]
        outputs = fn(*leaves)
        torch.autograd.backward(outputs, upstream)
        results.append(([o.detach() for o in outputs], [leaf.grad for leaf in leaves]))
    tolerance = 1e-5 if dtype == torch.float32 else 1e-12
    for fused, plain in zip(results[0][0] + results[0][1], results[1][0] + results[1][1], strict=True):
        assert fused.shape == plain.shape
        assert torch.allclose(fused, plain, rtol=0, atol=tolerance)


def test_fused_projections_pass_gradcheck() -> None:
    x, bases, a_weights, b_weights = projection_inputs(torch.float64)
    leaves = [t.requires_grad_(True) for t in (x, *a_weights, *b_weights)]
    assert torch.autograd.gradcheck(lambda *t: FrozenLoRAProjections.apply(t[0], bases, *t[1:]), leaves)


def test_fused_projections_unused_output_and_frozen_input() -> None:
    """An output nobody uses gets no gradient (zeros), and an input that needs none gets none."""
    x, bases, a_weights, b_weights = projection_inputs(torch.float64)
    leaves = [t.requires_grad_(True) for t in (*a_weights, *b_weights)]
    outputs = FrozenLoRAProjections.apply(x, bases, *leaves)
    outputs[0].sum().backward()
    plain = [t.detach().clone().requires_grad_(True) for t in leaves]
    peft_projections(x, bases, plain[:3], plain[3:])[0].sum().backward()
    for fused, reference in zip(leaves, plain, strict=True):
        expected = reference.grad if reference.grad is not None else torch.zeros_like(reference)
        assert torch.allclose(fused.grad, expected, rtol=0, atol=1e-12)


def test_fused_projections_refuse_trainable_bases() -> None:
    x, bases, a_weights, b_weights = projection_inputs(torch.float32)
    bases = ((bases[0][0].requires_grad_(True), *bases[0][1:]), *bases[1:])
    with pytest.raises(ValueError, match="frozen"):
        FrozenLoRAProjections.apply(x, bases, *a_weights, *b_weights)


class CountCalls:
    """Counts ``FrozenLoRAProjections.apply`` calls while installed."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        original = FrozenLoRAProjections.apply

        def apply(*args):
            self.count += 1
            return original(*args)

        monkeypatch.setattr(FrozenLoRAProjections, "apply", apply)


def patched_attributes(core) -> list[str]:
    """Instance attributes the training patches set, if any are left."""
    left = []
    for attention in core.symbolic_model.base.encoder.layer:
        for name in frozen_ops._PROJECTIONS:
            if "forward" in vars(getattr(attention.attention.self, name)):
                left.append(name)
    if "embed_patches" in vars(core.symbolic_model):
        left.append("embed_patches")
    return left


def test_trainer_with_fused_projections_equals_peft(monkeypatch: pytest.MonkeyPatch) -> None:
    """LoRA dropout 0 (PEFT's nn.Identity): the trainer's music encoder runs q/k/v through
    ``FrozenLoRAProjections``; features and every LoRA gradient equal PEFT's path within 1e-5, no
    random numbers drawn, no more kept for backward, and nothing left patched afterwards."""
    calls = CountCalls(monkeypatch)

    def check(core) -> None:
        assert len(fused_projection_attentions(core.symbolic_model)) == 2

    def nothing_left_patched(core) -> None:
        assert patched_attributes(core) == []

    results = trainer_and_plain_path(music_batch([9, 5, 7]), dropout=0.0, symbolic_dropout=False,
                                     check_patched=check, after=nothing_left_patched)
    assert calls.count == 2  # one call per layer, with the patch only
    (features, grads, kept, rng), (plain_features, plain_grads, plain_kept, plain_rng) = results
    assert torch.allclose(features, plain_features, rtol=0, atol=1e-5)
    assert grads.keys() == plain_grads.keys() and any("lora_A" in n for n in grads)
    for name, grad in plain_grads.items():
        assert torch.allclose(grads[name], grad, rtol=0, atol=1e-5), name
    assert torch.equal(rng, plain_rng)
    assert kept < plain_kept  # the feed-forward blocks' saving; the projections keep no more


def test_fused_projections_only_inside_the_trainers_encoder(monkeypatch: pytest.MonkeyPatch) -> None:
    """The trainer's music encoder fuses the projections with gradient and in GradCache's first
    pass (no gradient) alike; the model's own forward (extraction, validation) never, and nothing
    stays patched after a call."""
    from training.model_setup import music_encoder, set_train_mode

    calls = CountCalls(monkeypatch)
    _, core = lora_core(dropout=0.0)
    set_train_mode(core, text_frozen=True, symbolic_dropout=False)
    encode = music_encoder(core, torch.device("cpu"), "fp32")
    batch = music_batch([6, 4])
    with torch.no_grad():
        plain = core.features("symbolic", batch["patches"], batch["patch_mask"])
        assert calls.count == 0
        first = encode(batch)
    assert calls.count == 2 and patched_attributes(core) == []
    second = encode(batch)
    assert calls.count == 4 and patched_attributes(core) == []
    assert torch.allclose(first, second.detach(), rtol=0, atol=1e-5)
    assert torch.allclose(first, plain, rtol=0, atol=1e-5)


def test_lora_dropout_keeps_peft_path() -> None:
    """With LoRA dropout on, PEFT draws one mask per target: the projections are not fused (the
    equality of that path is tests/test_train_memory.py's); in eval mode the dropout is inactive."""
    _, core = lora_core(dropout=0.1)
    from training.model_setup import set_train_mode

    set_train_mode(core, text_frozen=True, symbolic_dropout=False)
    assert fused_projection_attentions(core.symbolic_model) == []
    core.eval()
    assert len(fused_projection_attentions(core.symbolic_model)) == 2


def test_projections_left_alone_when_not_plain_lora() -> None:
    """Merged adapters, trainable bases, gradient-checkpointed layers and models without LoRA
    keep their own forwards."""
    model, core = lora_core(dropout=0.0)
    model.merge_adapter()
    assert fused_projection_attentions(core.symbolic_model) == []
    model.unmerge_adapter()
    assert len(fused_projection_attentions(core.symbolic_model)) == 2
    core.symbolic_model.base.encoder.layer[0].attention.self.key.base_layer.weight.requires_grad_(True)
    assert len(fused_projection_attentions(core.symbolic_model)) == 1

    _, core = lora_core(dropout=0.0)
    enable_checkpointing(core.symbolic_model.base)
    core.train()
    assert fused_projection_attentions(core.symbolic_model) == []

    full = load_clamp3(ModelConfig.from_json(TINY_MODEL_CONFIG), TINY_WEIGHTS)
    assert fused_projection_attentions(full.symbolic_model) == []


def test_a_projection_called_on_its_own_runs_its_own_forward() -> None:
    """Inside the patch, a key or value asked for without the query's call before it (or with
    another input) computes its own PEFT output."""
    _, core = lora_core(dropout=0.0)
    attention = core.symbolic_model.base.encoder.layer[0].attention.self
    x, other = torch.randn(2, 3, 32), torch.randn(2, 3, 32)
    expected = [attention.key(x), attention.value(other)]
    with frozen_base_kernels(core.symbolic_model):
        key = attention.key(x)
        attention.query(x)
        value = attention.value(other)
    for got, want in zip((key, value), expected, strict=True):
        assert torch.allclose(got, want, rtol=0, atol=1e-6)
    assert patched_attributes(core) == []


def test_kept_embedding_table_follows_the_weight() -> None:
    """The trainer's music encoder keeps the frozen patch embedding's transposed table from call
    to call; an in-place change of the weight makes a new one (same features as the plain path)."""
    from training.model_setup import music_encoder, set_train_mode

    _, core = lora_core(dropout=0.0)
    set_train_mode(core, text_frozen=True, symbolic_dropout=False)
    encode = music_encoder(core, torch.device("cpu"), "fp32")
    batch = music_batch([5, 3])
    for _ in range(2):
        for scale in (1.0, 1.5):
            with torch.no_grad():
                core.symbolic_model.patch_embedding.weight.mul_(scale)
            features = encode(batch)
            plain = core.features("symbolic", batch["patches"], batch["patch_mask"])
            assert torch.allclose(features, plain, rtol=0, atol=1e-5)
    assert patched_attributes(core) == []
