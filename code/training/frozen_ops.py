"""Training-only kernels for the frozen base of a LoRA run: less kept for backward.

With the base frozen, backward through a base layer needs only the gradient with respect to its
input, never its weights, so most of what autograd keeps for a plain BERT layer is kept for
nothing but the GELU: its 4 × hidden pre-activation is the largest tensor a layer saves (a third of
the whole). ``frozen_base_kernels`` runs each symbolic BERT layer whose feed-forward block is frozen
through ``FrozenFeedForward`` instead: it keeps only the block's input (1 × hidden) and recomputes
the pre-activation in backward. The price is one more matmul beside the block's two input-gradient
matmuls (a sixth more linear work per layer; 5-11% of a step measured on CPU), for a quarter less
kept per layer. Its forward fuses the GELU into the first matmul (oneDNN on CPU), as extraction does.

Nothing here runs in extraction or evaluation: the patch is entered by the trainer's music encoder
only while autograd records, and each layer gets its class's forward back on exit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from fast_linears import onednn_linear_available
from patching import patched
from torch import nn
from transformers.models.bert.modeling_bert import BertLayer


def _fused_linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``gelu(linear(x))``: one oneDNN call on CPU in float32 (no pre-activation materialised),
    the plain two ops elsewhere."""
    if x.device.type == "cpu" and x.dtype == torch.float32 and onednn_linear_available():
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "gelu", [], "none")
    return F.gelu(F.linear(x, weight, bias))


class FrozenFeedForward(torch.autograd.Function):
    """``linear(gelu(linear(x, w1, b1)), w2, b2)`` with frozen weights (exact GELU).

    Saves only ``x``; backward recomputes ``linear(x, w1, b1)`` for the GELU's derivative and
    returns the gradient with respect to ``x`` alone (the weights get none: they do not train)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor,
                b2: torch.Tensor | None) -> torch.Tensor:
        if any(t is not None and t.requires_grad for t in (w1, b1, w2, b2)):
            raise ValueError("FrozenFeedForward computes no weight gradients: its weights must be frozen")
        ctx.save_for_backward(x, w1, b1, w2)
        return F.linear(_fused_linear_gelu(x, w1, b1), w2, b2)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, w1, b1, w2 = ctx.saved_tensors
        pre_activation = F.linear(x, w1, b1)
        grad_pre = torch.ops.aten.gelu_backward(grad.matmul(w2), pre_activation)
        del pre_activation  # the one 4 × hidden temporary, freed before the last matmul
        return grad_pre.matmul(w1), None, None, None, None


def _frozen(*layers: nn.Module) -> bool:
    return all(type(layer) is nn.Linear and not any(p.requires_grad for p in layer.parameters())
               for layer in layers)


def _has_frozen_feed_forward(layer: nn.Module) -> bool:
    """A BERT layer whose intermediate and output linears are plain, frozen ``nn.Linear`` (not
    adapter-wrapped, not trained) with the exact GELU between them, fed forward in one chunk.
    A gradient-checkpointed layer is left alone: its forward re-runs during backward, after the
    patch has ended, and must record the same ops as the first time."""
    if (not isinstance(layer, BertLayer) or layer.chunk_size_feed_forward
            or (layer.training and getattr(layer, "gradient_checkpointing", False))):
        return False
    act = layer.intermediate.intermediate_act_fn
    return (_frozen(layer.intermediate.dense, layer.output.dense)
            and getattr(act, "act", None) is F.gelu and type(act).__name__ == "GELUActivation")


def _feed_forward(layer: BertLayer):
    dense1, output = layer.intermediate.dense, layer.output

    def feed_forward_chunk(attention_output: torch.Tensor) -> torch.Tensor:
        hidden = FrozenFeedForward.apply(attention_output, dense1.weight, dense1.bias, output.dense.weight,
                                         output.dense.bias)
        # BertOutput.forward after its dense: dropout, residual, LayerNorm.
        return output.LayerNorm(output.dropout(hidden) + attention_output)

    return feed_forward_chunk


def frozen_feed_forward_layers(model: nn.Module) -> list[BertLayer]:
    """The BERT layers of ``model`` that ``frozen_base_kernels`` runs through ``FrozenFeedForward``."""
    return [module for module in model.modules() if _has_frozen_feed_forward(module)]


@contextlib.contextmanager
def frozen_base_kernels(model: nn.Module) -> Iterator[int]:
    """For the length of the block, every BERT layer of ``model`` with a frozen feed-forward block
    runs it through ``FrozenFeedForward`` (same values and input gradients within float rounding);
    yields how many layers were patched."""
    with contextlib.ExitStack() as stack:
        layers = frozen_feed_forward_layers(model)
        for layer in layers:
            stack.enter_context(patched(layer, feed_forward_chunk=_feed_forward(layer)))
        yield len(layers)
