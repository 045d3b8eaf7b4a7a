"""oneDNN linear kernels: the same outputs, every forward restored, PEFT LoRA layers handled."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from fast_linears import onednn_linear_available, onednn_linears
from features import FeatureExtractor
from helpers import OFFICIAL
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import Linear as LoraLinear
from torch import nn
from transformers import BertConfig
from transformers.models.bert.modeling_bert import BertIntermediate

pytestmark = pytest.mark.skipif(not onednn_linear_available(),
                                reason="oneDNN fused linear not available in this torch build")


def instance_forwards(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if "forward" in vars(m)]


def small_block() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 16), BertIntermediate(BertConfig(hidden_size=16, intermediate_size=32)),
                         nn.Linear(32, 8, bias=False)).eval()


def test_outputs_match_and_forwards_are_restored():
    block = small_block()
    hooked = block[2]
    hook = hooked.forward  # an instance forward, as hook libraries install
    hooked.forward = hook
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        plain = block(x)
        with onednn_linears(block):
            # the intermediate block runs dense + GELU as one fused kernel
            assert set(instance_forwards(block)) == {block[0], block[1], block[1].dense, hooked}
            fast = block(x)
    torch.testing.assert_close(fast, plain, rtol=0, atol=1e-5)
    assert hooked.forward is hook
    del hooked.forward
    assert instance_forwards(block) == []  # the class forwards show through again


def test_forwards_are_restored_after_an_error():
    block = small_block()
    with pytest.raises(RuntimeError, match="inside"), onednn_linears(block):
        raise RuntimeError("inside")
    assert instance_forwards(block) == []


def test_bfloat16_kernels_are_close_and_float16_is_refused():
    with pytest.raises(ValueError, match="float32 or bfloat16"), onednn_linears(small_block(), torch.float16):
        pass
    if not onednn_linear_available(torch.bfloat16):
        # Seen on an AMD EPYC without AVX-512: oneDNN cannot make the bfloat16 primitive. The
        # extractor then keeps the plain path (test_extract's bfloat16 test runs it).
        pytest.skip("this CPU has no oneDNN bfloat16 linear")
    block = small_block()
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        plain = block(x)
        with onednn_linears(block, torch.bfloat16):
            low = block(x)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), plain, rtol=0.05, atol=0.05)


def test_lora_wrapped_encoder_gives_the_same_features_with_and_without_onednn(tiny_model):
    model = copy.deepcopy(tiny_model)
    # init_lora_weights=False: lora_B is random, not zero, so the adapter changes the features
    get_peft_model(model.symbolic_model, LoraConfig(target_modules=["query", "key", "value"], r=4,
                                                    init_lora_weights=False))
    lora_layers = [m for m in model.modules() if isinstance(m, LoraLinear)]
    assert len(lora_layers) == 6 and not any(type(m) is nn.Linear for m in lora_layers)
    with onednn_linears(model):
        # the wrapper keeps its own forward; its parts reach the kernels one by one
        patched = set(instance_forwards(model))
        for lora in lora_layers:
            assert lora not in patched
            assert {lora.base_layer, lora.lora_A["default"], lora.lora_B["default"]} <= patched
    assert instance_forwards(model) == []

    extractor = FeatureExtractor(model)
    inputs = [extractor.symbolic_input((OFFICIAL / "outputs" / "mtf" / name).read_text(encoding="utf-8"))
              for name in ("m21test_test19.mtf", "m21test_test01.mtf")]
    fast = extractor.extract("symbolic", inputs)
    assert instance_forwards(model) == []
    extractor.use_onednn = False
    plain = extractor.extract("symbolic", inputs)
    base = FeatureExtractor(tiny_model).extract("symbolic", inputs)
    for with_kernels, without, unwrapped in zip(fast, plain, base, strict=True):
        np.testing.assert_allclose(with_kernels, without, rtol=0, atol=1e-5)
        assert np.abs(with_kernels - unwrapped).max() > 1e-3
