"""Shared test fixtures: the official reference fixtures, the tiny model, an offline tokenizer, and
offline settings (set here with setdefault: a value the caller exported wins).

Devices: every test pins the device it means (``--TRAIN_DEVICE=cpu``, ``--EXTRACT_DEVICE=cpu``,
``device="cpu"``); ``auto`` would pick a GPU where there is one, in bf16. Tests that need a GPU
are marked ``gpu`` (tests/test_gpu.py): skipped without CUDA, run after every other test, so that
the guard below can tell on a CUDA machine whether an unmarked test allocated GPU memory in this
process (subprocesses such as torchrun jobs are pinned by their arguments)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from helpers import OFFICIAL, TINY_MODEL_CONFIG, TINY_WEIGHTS

# Tests never touch the network unless the caller exported these themselves.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")


def pytest_collection_modifyitems(config, items):
    """``gpu`` tests: skipped without CUDA; otherwise moved after every other test (CUDA stays
    uninitialised while the CPU tests run, and they fork worker processes freely)."""
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu:
        return
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU (marker gpu)")
        for item in gpu:
            item.add_marker(skip)
        return
    chosen = set(map(id, gpu))
    items[:] = [item for item in items if id(item) not in chosen] + gpu


@pytest.fixture(autouse=True)
def _no_gpu_unless_marked(request):
    """On a CUDA machine, fail a test not marked ``gpu`` that allocates GPU memory in this process:
    it resolved a device to ``auto`` (or named CUDA) where it should pin the CPU."""
    torch = sys.modules.get("torch")
    if request.node.get_closest_marker("gpu") or torch is None or not torch.cuda.is_available():
        yield
        return
    initialised = torch.cuda.is_initialized()
    before = torch.cuda.memory_allocated() if initialised else 0
    if initialised:
        torch.cuda.reset_peak_memory_stats()
    yield
    if torch.cuda.is_initialized() and torch.cuda.max_memory_allocated() > before:
        pytest.fail(f"{request.node.nodeid} allocated GPU memory without the gpu marker: pin its device "
                    "(--TRAIN_DEVICE=cpu, --EXTRACT_DEVICE=cpu, device='cpu') or mark it gpu", pytrace=False)


@pytest.fixture(scope="session")
def official_dir() -> Path:
    if not OFFICIAL.is_dir():
        pytest.fail(f"official fixtures not found at {OFFICIAL} (set CLAMP3_SHARED_DIR)")
    return OFFICIAL


@pytest.fixture(scope="module")
def tiny_model():
    """The official tiny fixture model (hidden 32, 2 layers per tower), loaded strictly, eval mode."""
    from modeling import ModelConfig, load_clamp3

    return load_clamp3(ModelConfig.from_json(TINY_MODEL_CONFIG), TINY_WEIGHTS, attn_implementation="sdpa")


@pytest.fixture(scope="session")
def word_tokenizer(tmp_path_factory) -> Path:
    """A folder holding a small XLM-R-like tokenizer built offline: ids 0-3 are <s>, <pad>, </s>,
    <unk>; the words ``w0`` ... ``w199`` are ids 4-203 (the tiny text tower has 1,000)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = [f"w{i}" for i in range(200)]
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, **{w: i + 4 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", sep_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>", cls_token="<s>")
    folder = tmp_path_factory.mktemp("tokenizer")
    fast.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def adapters(tmp_path_factory) -> dict[str, Path]:
    """One adapter per format on the tiny model, with non-zero LoRA B weights (a seed per format),
    so each changes the features of its format."""
    import formats
    import lora
    import runconfig
    import torch
    from modeling import ModelConfig, load_clamp3

    root = tmp_path_factory.mktemp("adapters")
    cfg = runconfig.build_config(overrides={"LORA_R": 4})
    folders = {}
    for seed, fmt in enumerate(formats.FORMATS):
        # seeded before the adapter is made: PEFT draws lora_A from the global generator, whose state
        # otherwise depends on which tests ran before this fixture
        torch.manual_seed(seed)
        model = lora.add_adapter(load_clamp3(ModelConfig.from_json(TINY_MODEL_CONFIG), TINY_WEIGHTS), cfg, fmt)
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "lora_B" in name:
                    parameter.normal_(std=0.5)
        folders[fmt] = root / f"lora_{fmt}_adapter"
        model.save_pretrained(str(folders[fmt]))
    return folders
