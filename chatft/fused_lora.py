"""LoRA's linear layer as one autograd function while training: the same y = x W^T + b + s (d A^T) B^T (d is x, or
dropout(x)) and the same gradients as peft's layer, with fewer passes over the activations.

peft computes the adapter as separate modules: d A^T, then B, then a multiply by the scaling and an add over the
whole [tokens, out] output, and autograd mirrors each in the backward (a multiply over the output's gradient and
an add over the input's). On a CPU these passes over the activations cost more than the rank-r products
themselves. Here the scaling multiplies the [tokens, r] product, the adapter's output is accumulated into the
base output by the matrix product itself (addmm_), and without dropout the input's two gradients likewise
(bench/RESULTS.md: the speed this gains).

Used for the plain case: one active adapter on a torch.nn.Linear base, no DoRA or other variant, no adapter bias,
a frozen base that DeepSpeed ZeRO-3 does not partition, while gradients are recorded. Anything else (generation,
merged or disabled adapters, mixed adapter batches) runs peft's own forward.
"""

from __future__ import annotations

import types
from typing import Any

import torch
from torch import nn


class LoraLinearFunction(torch.autograd.Function):
    """y = x W^T + b + scaling (d A^T) B^T in `dtype`, where d is x, or dropout(x) given as `dropped`; gradients
    for x, dropped, A and B (W and b are frozen)."""

    @staticmethod
    def forward(ctx, x, dropped, weight, bias, lora_a, lora_b, scaling: float, dtype: torch.dtype):
        rows = x.reshape(-1, x.shape[-1]).to(dtype)
        adapter_rows = rows if dropped is None else dropped.reshape(rows.shape).to(dtype)
        w, a, b = weight.to(dtype), lora_a.to(dtype), lora_b.to(dtype)
        # [tokens, r]: the scaling multiplies this product, not the [tokens, out] output
        down = torch.mm(adapter_rows, a.t()).mul_(scaling)
        out = torch.mm(rows, w.t())
        if bias is not None:
            out += bias.to(dtype)
        out.addmm_(down, b.t())
        ctx.save_for_backward(adapter_rows, w, a, b, down)
        ctx.scaling, ctx.x_shape, ctx.x_dtype = scaling, x.shape, x.dtype
        ctx.param_dtypes = (lora_a.dtype, lora_b.dtype)
        ctx.dropped = dropped is not None
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        adapter_rows, w, a, b, down = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1]).to(w.dtype)
        grad_b = torch.mm(g.t(), down)
        grad_down = torch.mm(g, b).mul_(ctx.scaling)
        grad_a = torch.mm(grad_down.t(), adapter_rows)
        grad_x = grad_dropped = None
        if ctx.dropped:
            if ctx.needs_input_grad[0]:
                grad_x = torch.mm(g, w).view(ctx.x_shape).to(ctx.x_dtype)
            if ctx.needs_input_grad[1]:
                grad_dropped = torch.mm(grad_down, a).view(ctx.x_shape).to(ctx.x_dtype)
        elif ctx.needs_input_grad[0]:  # both of x's gradients in one product and its accumulation
            grad_x = torch.mm(g, w).addmm_(grad_down, a).view(ctx.x_shape).to(ctx.x_dtype)
        a_dtype, b_dtype = ctx.param_dtypes
        return grad_x, grad_dropped, None, None, grad_a.to(a_dtype), grad_b.to(b_dtype), None, None


def fuse_lora_layers(model: nn.Module) -> int:
    """Give every peft LoRA Linear layer of model whose base is a torch.nn.Linear the fused training forward;
    returns how many. The layers stay peft's own (saving, merging and loading are unchanged)."""
    from peft.tuners.lora import layer as lora

    fused = 0
    for module in model.modules():
        if isinstance(module, lora.Linear) and type(module.base_layer) is nn.Linear:
            module.forward = types.MethodType(_fused_forward, module)
            fused += 1
    return fused


def _fused_forward(layer: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    adapter = _plain_adapter(layer, x, args, kwargs)
    if adapter is None:
        return type(layer).forward(layer, x, *args, **kwargs)
    base = layer.base_layer
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    dropout = layer.lora_dropout[adapter]
    dropped = None if isinstance(dropout, nn.Identity) else dropout(x)
    with torch.autocast(device, enabled=False):
        return LoraLinearFunction.apply(
            x,
            dropped,
            base.weight,
            base.bias,
            layer.lora_A[adapter].weight,
            layer.lora_B[adapter].weight,
            float(layer.scaling[adapter]),
            dtype,
        )


def _plain_adapter(layer: Any, x: torch.Tensor, args: tuple, kwargs: dict) -> str | None:
    """The one active adapter's name where the fused function computes exactly what peft would, else None."""
    if args or kwargs or not torch.is_grad_enabled() or layer.disable_adapters or layer.merged:
        return None
    active = layer.active_adapters
    if len(active) != 1 or active[0] not in layer.lora_A:
        return None
    name = active[0]
    base = layer.base_layer
    plain = (
        name not in layer.lora_variant
        and layer.lora_B[name].bias is None
        and not base.weight.requires_grad
        and (base.bias is None or not base.bias.requires_grad)
        and not hasattr(base.weight, "ds_id")  # ZeRO-3 gathers the weight in the base layer's own forward
        and x.is_floating_point()
    )
    return name if plain else None
