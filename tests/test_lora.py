"""lora.py: adapters only on the symbolic side, exact base behaviour when fresh, PEFT round trips,
official keys after merging, and modules_to_save copies that the gathered patch embedding uses."""

from __future__ import annotations

import copy

import lora
import pytest
import runconfig
import torch
from helpers import TINY_MODEL_CONFIG, TINY_WEIGHTS
from modeling import CLaMP3Model, ModelConfig, load_clamp3
from peft import PeftModel


def tiny_base() -> CLaMP3Model:
    return load_clamp3(ModelConfig.from_json(TINY_MODEL_CONFIG), TINY_WEIGHTS)


def symbolic_features(model: torch.nn.Module, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    patches = torch.randint(0, 128, (3, 12, 64), generator=generator)
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, 7:] = 0
    core = model.get_base_model() if isinstance(model, PeftModel) else model
    with torch.no_grad():
        return core.features("symbolic", patches, mask)


def config(**overrides) -> dict:
    return runconfig.build_config(overrides=overrides)


def randomise_adapter(model: PeftModel, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)


def test_fresh_adapter_is_exactly_the_base_and_only_symbolic_parameters_train():
    base = tiny_base()
    expected = symbolic_features(base)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model = lora.add_adapter(copy.deepcopy(base), config(LORA_R=4), "abc").eval()
    assert torch.equal(symbolic_features(model), expected)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".symbolic_model." in n and ".lora_" in n for n in trainable)
    # r=4 on q/k/v of 2 layers of hidden 32: 2 x 3 x (4x32 + 32x4)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 2 * 3 * (4 * 32 + 32 * 4)
    core = model.get_base_model()
    for tower in ("text_model", "text_proj", "audio_model", "audio_proj"):
        for name, tensor in getattr(core, tower).state_dict().items():
            assert torch.equal(tensor, before[f"{tower}.{name}"]), f"{tower}.{name}"
        assert not any(p.requires_grad for p in getattr(core, tower).parameters())


def test_saved_adapter_reloads_with_plain_peft_and_merges_to_official_keys(tmp_path):
    model = lora.add_adapter(tiny_base(), config(LORA_R=4, LORA_ABC_MODULES_TO_SAVE=["symbolic_proj"]), "abc")
    randomise_adapter(model)
    model.eval()
    in_memory = symbolic_features(model)
    assert not torch.allclose(in_memory, symbolic_features(tiny_base()), atol=1e-4)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_config.json").is_file() and (tmp_path / "adapter_model.safetensors").is_file()

    reloaded = PeftModel.from_pretrained(tiny_base(), str(tmp_path)).eval()  # plain PEFT, no project code
    assert torch.allclose(symbolic_features(reloaded), in_memory, rtol=0, atol=1e-6)

    state = lora.merged_state_dict(model)
    assert list(state) == list(tiny_base().state_dict())  # the official key names, in order
    merged = CLaMP3Model(ModelConfig.from_json(TINY_MODEL_CONFIG))
    merged.load_state_dict(state, strict=True)
    assert torch.allclose(symbolic_features(merged.eval()), in_memory, rtol=0, atol=1e-5)
    assert torch.allclose(symbolic_features(model), in_memory, rtol=0, atol=1e-6)  # unmerged again

    unloaded = reloaded.merge_and_unload()
    assert sorted(unloaded.state_dict()) == sorted(tiny_base().state_dict())
    assert torch.allclose(symbolic_features(unloaded), in_memory, rtol=0, atol=1e-5)


def test_official_checkpoint_export_loads_strictly(tmp_path):
    model = lora.add_adapter(tiny_base(), config(LORA_R=4), "mtf")
    randomise_adapter(model)
    path = lora.save_official_checkpoint(lora.merged_state_dict(model), tmp_path / "merged.pth", {"epoch": 3})
    reloaded = load_clamp3(ModelConfig.from_json(TINY_MODEL_CONFIG), path)
    assert torch.allclose(symbolic_features(reloaded), symbolic_features(model.eval()), rtol=0, atol=1e-5)
    assert torch.load(path, weights_only=True)["epoch"] == 3


def test_trained_patch_embedding_copy_is_the_one_used():
    """modules_to_save puts a trainable copy beside the original; the gathered patch embedding
    reads ``.weight`` directly, so it must read the copy (and the original once disabled)."""
    base = tiny_base()
    model = lora.add_adapter(base, config(LORA_R=4, LORA_MTF_MODULES_TO_SAVE=["patch_embedding"]), "mtf").eval()
    reference = symbolic_features(model)
    wrapper = model.get_base_model().symbolic_model.patch_embedding
    with torch.no_grad():  # random, not constant: LayerNorm would remove a constant shift
        weight = wrapper.modules_to_save["default"].weight
        weight.add_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(3)) * 0.05)
    changed = symbolic_features(model)
    assert not torch.allclose(changed, reference, atol=1e-4)
    with model.disable_adapter():
        assert torch.allclose(symbolic_features(model), reference, rtol=0, atol=1e-6)
    # And the gradient reaches the copy through the gathered path.
    core = model.get_base_model()
    patches = torch.randint(0, 128, (2, 5, 64))
    core.features("symbolic", patches, torch.ones(2, 5, dtype=torch.long)).sum().backward()
    assert wrapper.modules_to_save["default"].weight.grad is not None
    assert wrapper.original_module.weight.grad is None


def test_lora_on_the_patch_embedding_itself_is_not_bypassed():
    model = lora.add_adapter(tiny_base(), config(LORA_R=4, LORA_TARGET_MODULES=["patch_embedding"]), "abc")
    randomise_adapter(model)
    one_hot = copy.deepcopy(model.get_base_model())
    one_hot.symbolic_model.use_one_hot = True
    assert torch.allclose(symbolic_features(model.eval()), symbolic_features(one_hot.eval()), rtol=0, atol=1e-5)
    assert not torch.allclose(symbolic_features(model), symbolic_features(tiny_base()), atol=1e-4)


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora", "loftq"])
def test_base_rewriting_initialisations_are_refused(init):
    with pytest.raises(lora.AdapterConfigError, match="rewrites the base weights"):
        lora.lora_config(config(LORA_INIT_WEIGHTS=init), "abc")


def test_modules_to_save_outside_the_symbolic_side_are_refused():
    with pytest.raises(lora.AdapterConfigError, match="outside the symbolic"):
        lora.add_adapter(tiny_base(), config(LORA_ABC_MODULES_TO_SAVE=["text_proj"]), "abc")
    with pytest.raises(lora.AdapterConfigError, match="no module named"):
        lora.add_adapter(tiny_base(), config(LORA_ABC_MODULES_TO_SAVE=["nonexistent"]), "abc")


def test_rslora_and_dora_pass_through():
    peft_config = lora.lora_config(config(LORA_USE_RSLORA=True, LORA_USE_DORA=True), "abc")
    assert peft_config.use_rslora and peft_config.use_dora
    model = lora.add_adapter(tiny_base(), config(LORA_R=4, LORA_USE_DORA=True), "abc").eval()
    assert torch.allclose(symbolic_features(model), symbolic_features(tiny_base()), rtol=0, atol=1e-5)
