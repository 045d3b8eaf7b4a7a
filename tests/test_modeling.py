"""Model layout and strict checkpoint loading."""

from __future__ import annotations

import ast

import pytest
import runconfig
import torch
from helpers import REPO_ROOT, SHARED_DIR, TINY_MODEL_CONFIG, TINY_WEIGHTS
from modeling import CheckpointMismatchError, CLaMP3Model, ModelConfig, load_clamp3


def official_keys() -> dict[str, tuple[int, ...]]:
    lines = (SHARED_DIR / "reference" / "official_state_dict_keys.txt").read_text().splitlines()
    rows = [line.split("\t") for line in lines if line and not line.startswith("#")]
    return {key: tuple(ast.literal_eval(shape)) for key, shape in rows}


def test_full_size_state_dict_equals_official_layout():
    with torch.device("meta"):
        model = CLaMP3Model(ModelConfig.from_constants(runconfig.default_config()))
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = official_keys()
    assert len(expected) == 605
    assert ours == expected
    assert sum(v.numel() for v in model.state_dict().values()) == 457_896_960


def test_tiny_checkpoint_loads_strictly_and_heads_come_from_config():
    model = load_clamp3(ModelConfig.from_json(TINY_MODEL_CONFIG), TINY_WEIGHTS)
    # hidden 32 // 64 would give 0 heads: the count must come from the model config
    assert model.symbolic_model.base.config.num_attention_heads == 2
    assert model.text_model.config.num_attention_heads == 2
    assert not model.training


def _save_state(tmp_path, state):
    path = tmp_path / "ckpt.pth"
    torch.save({"model": state, "epoch": 0}, path)
    return path


@pytest.mark.parametrize("change, expected", [
    ("missing", "missing keys (1):\n    symbolic_proj.bias"),
    ("extra", "unexpected keys (1):\n    logit_scale"),
    ("misshaped", "misshaped keys (1):\n    audio_proj.weight: checkpoint (32, 31) vs model (32, 32)"),
])
def test_mismatched_checkpoint_names_the_key(tmp_path, change, expected):
    state = torch.load(TINY_WEIGHTS, weights_only=True)["model"]
    if change == "missing":
        del state["symbolic_proj.bias"]
    elif change == "extra":
        state["logit_scale"] = torch.ones(())
    else:
        state["audio_proj.weight"] = state["audio_proj.weight"][:, :31].clone()
    path = _save_state(tmp_path, state)
    with pytest.raises(CheckpointMismatchError) as info:
        load_clamp3(ModelConfig.from_json(TINY_MODEL_CONFIG), path)
    assert expected in str(info.value)
    assert str(path) in str(info.value)


def test_missing_checkpoint_says_where_to_get_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="sander-wood/clamp3"):
        load_clamp3(ModelConfig.from_json(TINY_MODEL_CONFIG), tmp_path / "nope.pth")


def test_gathered_patch_embedding_equals_official_one_hot():
    model = load_clamp3(ModelConfig.from_json(TINY_MODEL_CONFIG), TINY_WEIGHTS)
    encoder = model.symbolic_model
    patches = torch.randint(0, 128, (3, 7, 64), generator=torch.Generator().manual_seed(0))
    fast = encoder.embed_patches(patches)
    encoder.use_one_hot = True
    official = encoder.embed_patches(patches)
    torch.testing.assert_close(fast, official, rtol=0, atol=1e-5)


def test_model_config_errors_are_clear(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"symbolic": {"hidden_size": 8}}')
    with pytest.raises(ValueError, match="missing keys"):
        ModelConfig.from_json(bad)
    with pytest.raises(FileNotFoundError, match="model config not found"):
        ModelConfig.from_json(tmp_path / "absent.json")


def test_model_config_path_is_used_as_given(tmp_path, monkeypatch):
    (tmp_path / "sizes.json").write_text(TINY_MODEL_CONFIG.read_text())
    monkeypatch.chdir(tmp_path)
    cfg = runconfig.default_config()
    assert ModelConfig.resolve(cfg, "sizes.json").projection_size == 32  # relative: the working directory
    assert ModelConfig.resolve(cfg).to_dict() == ModelConfig.from_constants(cfg).to_dict()
    with pytest.raises(ValueError, match="MODEL_CONFIG='sizes.json' is set but no model config path"):
        ModelConfig.resolve({**cfg, "MODEL_CONFIG": "sizes.json"})


def test_model_core_does_not_import_the_cli_layer():
    tree = ast.parse((REPO_ROOT / "code" / "modeling.py").read_text(encoding="utf-8"))
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not {"runconfig", "config"} & imported


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_the_padding_mask_broadcast_over_queries_gives_transformers_features(attn_implementation):
    """The towers get the padding mask as ``[B, 1, 1, L]`` (not transformers' materialised
    ``[B, 1, L, L]``): the same hidden states as the 2-D mask handed to transformers, padded or not."""
    from modeling import key_padding_mask

    model = load_clamp3(ModelConfig.from_json(TINY_MODEL_CONFIG), TINY_WEIGHTS, attn_implementation=attn_implementation)
    config = model.symbolic_model.base.config
    generator = torch.Generator().manual_seed(0)
    patches = torch.randint(0, 128, (3, 7, model.model_config.patch_size), generator=generator)
    for lengths in ([7, 4, 1], [7, 7, 7]):
        mask = (torch.arange(7)[None, :] < torch.tensor(lengths)[:, None]).long()
        prepared = key_padding_mask(mask, config, torch.float32)
        if min(lengths) == 7:
            assert prepared is None
        else:
            assert prepared.shape == (3, 1, 1, 7)
            assert prepared.dtype == (torch.bool if attn_implementation == "sdpa" else torch.float32)
        with torch.no_grad():
            ours = model.hidden_states("symbolic", patches, mask)
            theirs = model.symbolic_model.base(inputs_embeds=model.symbolic_model.embed_patches(patches),
                                               attention_mask=mask)["last_hidden_state"]
            ids = torch.where(mask.bool(), torch.randint(5, 100, mask.shape, generator=generator), 1)
            text_ours = model.hidden_states("text", ids, mask)
            text_theirs = model.text_model(input_ids=ids, attention_mask=mask)["last_hidden_state"]
        assert torch.allclose(ours, theirs, rtol=0, atol=1e-6)  # padded rows too
        assert torch.allclose(text_ours, text_theirs, rtol=0, atol=1e-6)
