"""Training-only kernels for the frozen base of a LoRA run: less kept for backward.

With the base frozen, backward through a base layer needs only the gradient with respect to its
input, never its weights, so most of what autograd keeps for a plain BERT layer is kept for
nothing but the GELU: its 4 × hidden pre-activation is the largest tensor a layer saves (a third of
the whole). ``frozen_base_kernels`` runs each symbolic BERT layer whose feed-forward block is frozen
through ``FrozenFeedForward`` instead: it keeps only the block's input (1 × hidden) and recomputes
the pre-activation in backward. The price is one more matmul beside the block's two input-gradient
matmuls (a sixth more linear work per layer; 5-11% of a step measured on CPU), for a quarter less
kept per layer. Its forward fuses the GELU into the first matmul (oneDNN on CPU), as extraction does.
That memory only matters for the longest batches: ``pre_activation_layers`` says in how many
layers a batch of fewer patches can keep the pre-activation instead (no recomputation) and still
keep no more than the recomputing path keeps for a batch at the budget (batch × patch length, the
longest any step can bring), so peak memory stays where the longest batch puts it.

Beside it, ``FrozenLoRAProjections`` runs a self-attention's query, key and value together when
they are PEFT LoRA layers over frozen plain linears: the three LoRA ``A`` products as one matmul,
each ``B`` product added into its base product in place (no separate LoRA output, scaling or sum),
and in backward one pass for the input gradient (three base matmuls and one LoRA matmul
accumulated into one buffer) instead of PEFT's nine small ops and the autograd sums between them.
It keeps what PEFT's path keeps (the input and the ``A`` products) and draws no random numbers, so
it applies only where LoRA dropout is inactive (p = 0, PEFT's ``nn.Identity``, or eval mode): with
dropout on, PEFT draws one mask per target on its own copy of the input, and that path stays.
A frozen gathered patch embedding keeps its transposed weight from step to step (the trainer
passes a cache) instead of copying the whole table on every forward.

Nothing here runs in extraction or evaluation: the patch is entered only by the trainer's music
encoder (its steps with gradient, and GradCache's first pass without), and each layer gets its
class's forward back on exit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from fast_linears import onednn_linear_available
from modeling import CHAR_VOCAB, M3PatchEncoder
from patching import patched
from peft.tuners.lora.layer import Linear as LoraLinear
from torch import nn
from transformers.models.bert.modeling_bert import BertLayer, BertSelfAttention

# The sibling projections of a BERT self-attention, in the order its forward calls them.
_PROJECTIONS = ("query", "key", "value")


def _fused_linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``gelu(linear(x))``: one oneDNN call on CPU in float32 (no pre-activation materialised),
    the plain two ops elsewhere."""
    if x.device.type == "cpu" and x.dtype == torch.float32 and onednn_linear_available():
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "gelu", [], "none")
    return F.gelu(F.linear(x, weight, bias))


def _refuse_autocast(x: torch.Tensor) -> None:
    """These kernels save and return tensors in the input's dtype and call matmuls directly:
    under autocast, forward would mix dtypes and backward fail on them. The trainer enters them
    only in float32 (``training.model_setup.music_encoder``); anyone else is stopped here."""
    if torch.is_autocast_enabled(x.device.type):
        raise RuntimeError("the frozen-base training kernels compute in float32 only and cannot run under "
                           f"autocast ({x.device.type}); run the layer's own forward under autocast instead")


class FrozenFeedForward(torch.autograd.Function):
    """``linear(gelu(linear(x, w1, b1)), w2, b2)`` with frozen weights (exact GELU).

    Saves only ``x``; backward recomputes ``linear(x, w1, b1)`` for the GELU's derivative and
    returns the gradient with respect to ``x`` alone (the weights get none: they do not train).
    With ``keep_pre_activation`` it saves that pre-activation instead of ``x`` (4 × hidden instead
    of 1 × hidden in BERT) and backward skips the recomputation."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor,
                b2: torch.Tensor | None, keep_pre_activation: bool = False) -> torch.Tensor:
        if any(t is not None and t.requires_grad for t in (w1, b1, w2, b2)):
            raise ValueError("FrozenFeedForward computes no weight gradients: its weights must be frozen")
        _refuse_autocast(x)
        ctx.keep_pre_activation = keep_pre_activation
        if keep_pre_activation:
            pre_activation = F.linear(x, w1, b1)
            ctx.save_for_backward(pre_activation, w1, w2)
            return F.linear(F.gelu(pre_activation), w2, b2)
        ctx.save_for_backward(x, w1, b1, w2)
        return F.linear(_fused_linear_gelu(x, w1, b1), w2, b2)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if ctx.keep_pre_activation:
            pre_activation, w1, w2 = ctx.saved_tensors
        else:
            x, w1, b1, w2 = ctx.saved_tensors
            pre_activation = F.linear(x, w1, b1)
        # The GELU's derivative written over the incoming gradient: a third 4 × hidden buffer
        # would be fresh memory, and its page faults cost as much as the GELU backward itself.
        grad_pre = grad.matmul(w2)
        torch.ops.aten.gelu_backward.grad_input(grad_pre, pre_activation, grad_input=grad_pre)
        del pre_activation  # the one 4 × hidden temporary, freed before the last matmul
        return grad_pre.matmul(w1), None, None, None, None, None


class FrozenLoRAProjections(torch.autograd.Function):
    """``base_i(x) + scaling_i * B_i(A_i(x))`` for several LoRA targets reading the same ``x``, with
    frozen bases (exactly PEFT's vanilla LoRA without dropout, up to float rounding).

    ``bases`` is a tuple of ``(weight, bias, scaling)`` per target (frozen: no gradient for them);
    the tensor arguments are the targets' ``A`` then ``B`` matrices. Saves ``x`` and the scaled
    ``A`` products, as PEFT's path keeps ``x`` and the unscaled ones."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, bases: tuple, *lora: torch.Tensor) -> tuple[torch.Tensor, ...]:
        count = len(bases)
        a_weights, b_weights = lora[:count], lora[count:]
        if any(t is not None and t.requires_grad for base in bases for t in base[:2]):
            raise ValueError("FrozenLoRAProjections computes no base gradients: the base layers must be frozen")
        _refuse_autocast(x)
        flat = x.reshape(-1, x.shape[-1])
        ranks = [a.shape[0] for a in a_weights]
        stacked_a = torch.cat(a_weights) if count > 1 else a_weights[0]
        # One matmul for every A product; the scaling goes on these few columns instead of on
        # the full-width LoRA outputs.
        low = flat.mm(stacked_a.t())
        blocks = low.split(ranks, dim=1)
        for block, (_, _, scaling) in zip(blocks, bases, strict=True):
            block.mul_(scaling)
        outputs = []
        for block, b_weight, (weight, bias, _) in zip(blocks, b_weights, bases, strict=True):
            out = flat.mm(weight.t()) if bias is None else torch.addmm(bias, flat, weight.t())
            outputs.append(out.addmm_(block, b_weight.t()).view(*x.shape[:-1], weight.shape[0]))
        ctx.save_for_backward(x, low, stacked_a, *b_weights)
        ctx.bases, ctx.ranks = bases, ranks
        return tuple(outputs)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor | None):
        x, low, stacked_a, *b_weights = ctx.saved_tensors
        bases, ranks = ctx.bases, ctx.ranks
        flat = x.reshape(-1, x.shape[-1])
        grads = [torch.zeros(flat.shape[0], base[0].shape[0], dtype=x.dtype, device=x.device) if g is None
                 else g.reshape(flat.shape[0], -1) for g, base in zip(grads, bases, strict=True)]
        b_grads = [g.t().mm(block) for g, block in zip(grads, low.split(ranks, dim=1), strict=True)]
        # The gradient reaching each A product, scaled: scaling_i * dY_i B_i, side by side.
        low_grad = torch.cat([g.mm(b) for g, b in zip(grads, b_weights, strict=True)], dim=1)
        for block, (_, _, scaling) in zip(low_grad.split(ranks, dim=1), bases, strict=True):
            block.mul_(scaling)
        a_grad = low_grad.t().mm(flat)
        x_grad = None
        if ctx.needs_input_grad[0]:
            x_grad = low_grad.mm(stacked_a)
            for g, (weight, _, _) in zip(grads, bases, strict=True):
                x_grad.addmm_(g, weight)
            x_grad = x_grad.view_as(x)
        return x_grad, None, *a_grad.split(ranks, dim=0), *b_grads


def _inactive_dropout(module: nn.Module) -> bool:
    return isinstance(module, nn.Identity) or (isinstance(module, nn.Dropout) and (module.p == 0 or not module.training))


def _plain_lora(layer: nn.Module) -> str | None:
    """The adapter name when ``layer`` is a PEFT LoRA linear that computes plain
    ``base(x) + scaling * B(A(x))``: one active vanilla adapter (no DoRA or other variant, no
    LoRA bias), unmerged, over a frozen plain ``nn.Linear``, its dropout inactive; else None."""
    if type(layer) is not LoraLinear or layer.merged or layer.disable_adapters or not _frozen(layer.base_layer):
        return None
    adapters = list(layer.active_adapters)
    if len(adapters) != 1 or adapters[0] not in layer.lora_A or adapters[0] in layer.lora_variant:
        return None
    name = adapters[0]
    a, b = layer.lora_A[name], layer.lora_B[name]
    if type(a) is not nn.Linear or type(b) is not nn.Linear or a.bias is not None or b.bias is not None:
        return None
    if layer.lora_bias.get(name) or not _inactive_dropout(layer.lora_dropout[name]):
        return None
    return name


def _fusable_projections(attention: nn.Module) -> bool:
    """A BERT self-attention whose query, key and value are all plain LoRA layers (``_plain_lora``)
    of the same dtype."""
    if not isinstance(attention, BertSelfAttention):
        return False
    layers = [getattr(attention, name, None) for name in _PROJECTIONS]
    if not all(layer is not None and _plain_lora(layer) for layer in layers):
        return False
    return len({p.dtype for layer in layers for p in layer.parameters()}) == 1


def _fused_projections(attention: BertSelfAttention) -> dict[nn.Module, object]:
    """New ``forward``s for the attention's query, key and value: the query's computes all three
    through ``FrozenLoRAProjections`` and holds the key's and value's results until they are
    asked for with the same input tensor (as ``BertSelfAttention.forward`` does, one after the
    other); any other call runs the layer's own forward."""
    layers = [getattr(attention, name) for name in _PROJECTIONS]
    originals = [layer.forward for layer in layers]
    pending: dict[str, object] = {}

    def tensors():
        bases, a_weights, b_weights = [], [], []
        for layer in layers:
            name = _plain_lora(layer)
            bases.append((layer.base_layer.weight, layer.base_layer.bias, float(layer.scaling[name])))
            a_weights.append(layer.lora_A[name].weight)
            b_weights.append(layer.lora_B[name].weight)
        return tuple(bases), a_weights + b_weights

    def first(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        pending.clear()
        if args or kwargs or x.dtype != layers[0].base_layer.weight.dtype:
            return originals[0](x, *args, **kwargs)
        bases, lora = tensors()
        outputs = FrozenLoRAProjections.apply(x, bases, *lora)
        pending.update(input=x, outputs=dict(enumerate(outputs)))
        return pending["outputs"].pop(0)

    def later(index: int):
        def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            outputs = pending.get("outputs", {})
            if args or kwargs or pending.get("input") is not x or index not in outputs:
                return originals[index](x, *args, **kwargs)
            output = outputs.pop(index)
            if not outputs:
                pending.clear()  # nothing held past the attention's forward
            return output
        return forward

    return {layers[0]: first, layers[1]: later(1), layers[2]: later(2)}


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


def _feed_forward(layer: BertLayer, keep_pre_activation: bool = False):
    dense1, output = layer.intermediate.dense, layer.output

    def feed_forward_chunk(attention_output: torch.Tensor) -> torch.Tensor:
        # Without gradient nothing is kept, and the fused kernel is the faster forward.
        keep = keep_pre_activation and torch.is_grad_enabled()
        hidden = FrozenFeedForward.apply(attention_output, dense1.weight, dense1.bias, output.dense.weight,
                                         output.dense.bias, keep)
        # BertOutput.forward after its dense: dropout, residual, LayerNorm.
        return output.LayerNorm(output.dropout(hidden) + attention_output)

    return feed_forward_chunk


def frozen_feed_forward_layers(model: nn.Module) -> list[BertLayer]:
    """The BERT layers of ``model`` that ``frozen_base_kernels`` runs through ``FrozenFeedForward``."""
    return [module for module in model.modules() if _has_frozen_feed_forward(module)]


# What the recomputing path keeps per patch of a LoRA BERT layer, in units of the hidden size:
# query, key, value and output of the fused attention (4), the two LayerNorm inputs (2), the
# LoRA projections' input (1) and the feed-forward block's input (1). Attention dropout keeps
# more (the probabilities), which leaves more room, never less.
_KEPT_PER_LAYER = 8


def pre_activation_layers(model: nn.Module, patches: int, budget: int) -> int:
    """In how many of ``model``'s frozen feed-forward blocks a batch of ``patches`` patches (batch ×
    length, padding included) can keep its pre-activation for backward instead of recomputing it,
    while all its layers together keep no more than the recomputing path keeps for ``budget``
    patches: each block that keeps adds ``intermediate / hidden - 1`` units to the 8 of a layer
    (``_KEPT_PER_LAYER``). 0 at or above the budget, every block below about 8/11 of it (BERT)."""
    layers = frozen_feed_forward_layers(model)
    if not layers or patches <= 0 or budget <= patches:
        return 0
    dense = layers[0].intermediate.dense
    extra = dense.out_features / dense.in_features - 1
    spare = _KEPT_PER_LAYER * len(layers) * (budget - patches) / patches
    return len(layers) if extra <= 0 else min(len(layers), int(spare / extra))


def _transposed(weight: torch.Tensor, cache: dict) -> torch.Tensor:
    """``weight.t().contiguous()``, kept in ``cache`` while the weight stays the same tensor with
    the same contents (its version counter counts in-place changes: a load, a merge)."""
    key = (id(weight), weight._version, weight.data_ptr(), weight.dtype, weight.device, tuple(weight.shape))
    if cache.get("key") != key:
        cache.clear()  # one table at a time: the previous one is stale
        cache.update(key=key, table=weight.detach().t().contiguous())
    return cache["table"]


def _has_frozen_gathered_embedding(encoder: nn.Module) -> bool:
    """An ``M3PatchEncoder`` that embeds by gathering (not one-hot, no adapter on the embedding)
    with a frozen plain weight."""
    return (isinstance(encoder, M3PatchEncoder) and not encoder.use_one_hot
            and type(encoder.patch_embedding) is nn.Linear and _frozen(encoder.patch_embedding))


def _embed_patches(encoder: M3PatchEncoder, cache: dict):
    def embed_patches(patches: torch.Tensor) -> torch.Tensor:
        # M3PatchEncoder.embed_patches's gathered sum, with its transposed table kept in ``cache``
        # across calls: for a frozen weight it is the same copy every step.
        weight, bias = encoder.patch_embedding.weight, encoder.patch_embedding.bias
        batch, length, slots = patches.shape
        offsets = torch.arange(slots, device=patches.device) * CHAR_VOCAB
        columns = (patches + offsets).reshape(batch * length, slots)
        summed = F.embedding_bag(columns, _transposed(weight, cache), mode="sum")
        return (summed + bias).reshape(batch, length, -1)

    return embed_patches


def _checkpointed(layer: nn.Module) -> bool:
    return layer.training and getattr(layer, "gradient_checkpointing", False)


def fused_projection_attentions(model: nn.Module) -> list[BertSelfAttention]:
    """The self-attentions of ``model`` whose query, key and value ``frozen_base_kernels`` runs
    through ``FrozenLoRAProjections``; none inside a gradient-checkpointed layer (its forward
    re-runs in backward, after the patch has ended, and must record the same ops)."""
    skipped = {id(m) for layer in model.modules() if isinstance(layer, BertLayer) and _checkpointed(layer)
               for m in layer.modules()}
    return [m for m in model.modules() if id(m) not in skipped and _fusable_projections(m)]


@contextlib.contextmanager
def frozen_base_kernels(model: nn.Module, embedding_cache: dict | None = None,
                        keep_pre_activations: int = 0) -> Iterator[int]:
    """For the length of the block, every BERT layer of ``model`` with a frozen feed-forward block
    runs it through ``FrozenFeedForward``, and every self-attention with plain LoRA query, key and
    value computes them through ``FrozenLoRAProjections`` (same values and gradients within float
    rounding); yields how many feed-forward blocks were patched. The last ``keep_pre_activations``
    of those blocks keep their pre-activation instead of recomputing it (``pre_activation_layers``
    says how many fit). With ``embedding_cache`` (a dict the caller keeps across calls: the
    trainer's music encoder) a frozen gathered patch embedding keeps its transposed weight there
    instead of copying it on every call (same values). Not under autocast (``_refuse_autocast``)."""
    for device_type in ("cpu", "cuda"):
        if torch.is_autocast_enabled(device_type):
            raise RuntimeError(f"frozen_base_kernels is float32-only: entered under {device_type} autocast")
    with contextlib.ExitStack() as stack:
        layers = frozen_feed_forward_layers(model)
        first_keeping = len(layers) - max(0, min(keep_pre_activations, len(layers)))
        for index, layer in enumerate(layers):
            forward = _feed_forward(layer, keep_pre_activation=index >= first_keeping)
            stack.enter_context(patched(layer, feed_forward_chunk=forward))
        for attention in fused_projection_attentions(model):
            for projection, forward in _fused_projections(attention).items():
                stack.enter_context(patched(projection, forward=forward))
        encoders = [m for m in model.modules() if _has_frozen_gathered_embedding(m)]
        if embedding_cache is not None and len(encoders) == 1:  # one cache holds one table
            stack.enter_context(patched(encoders[0], embed_patches=_embed_patches(encoders[0], embedding_cache)))
        yield len(layers)
