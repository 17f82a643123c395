"""The causal-LM loss computed only where a label is trained, with the LM head applied in chunks.

The model's own loss runs the LM head on every position of the batch and holds [batch, length, vocab] fp32 logits
(4 x 512 x 49,152 x 4 B = 384 MiB per copy for SmolLM2, several copies through the backward). Here:

1. The model runs its whole forward (through peft, DeepSpeed, autocast: nothing is bypassed), but a forward
   pre-hook on its output embedding keeps the final hidden states and hands the head an empty slice, so no logits
   are computed there.
2. The hidden states at positions whose shifted label is trained are gathered ([n_trained, hidden]).
3. The head runs over them in chunks of `chunk_size` rows; each chunk's cross-entropy is summed and its gradient
   with respect to the hidden states (and to the head's trainable weights, for full fine-tuning) is computed right
   away, so at most one chunk of logits is ever alive. Under DeepSpeed ZeRO-3, whose partitioned weights exist only
   inside a module's own call, each chunk is instead wrapped in activation checkpointing (the backward recomputes
   that chunk's logits through the module).
4. The sum is divided by `num_items_in_batch` (the trained tokens of the whole optimizer step, across gradient
   accumulation and processes, as the Trainer counts them), or by the batch's own trained-token count.

Equal to the model's own loss and gradients to float rounding (tests/test_loss.py).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from chatft.data.templates import IGNORE_INDEX
from chatft.inductor import compiled_cross_entropy, summed_cross_entropy

DEFAULT_CHUNK_SIZE = 256
# The trained positions are padded (with ignored targets) to a multiple of ROW_STEP rows, so the head sees a few
# shapes rather than one per count of trained tokens: on the CPU oneDNN keeps kernels and buffers for every shape
# of a bf16 matmul it has run (SmolLM2's head over 1-256 rows: RSS 0.39 GiB at one shape, 0.89 GiB after 400
# random ones). Elsewhere the padding costs at most ROW_STEP - 1 rows of the head.
ROW_STEP = 64


def unsupported_reason(model: torch.nn.Module) -> str | None:
    """Why the trained-positions loss cannot stand in for this model's own, or None when it can."""
    head = output_embeddings(model)
    if head is None:
        return "the model has no output embedding (LM head) to run separately"
    config = getattr(model, "config", None)
    for name in ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale"):
        if getattr(config, name, None) not in (None, 1, 1.0):
            return f"the model post-processes its logits ({name}), which this loss does not reproduce"
    peft_config = getattr(model, "peft_config", None)
    if peft_config:
        active = getattr(model, "active_adapter", "default")
        cfg = peft_config.get(active) if isinstance(peft_config, dict) else None
        peft_type = str(getattr(cfg, "peft_type", ""))
        if peft_type.endswith(("PROMPT_TUNING", "P_TUNING", "MULTITASK_PROMPT_TUNING", "CPT")):
            return "the peft method prepends virtual tokens to the input, so hidden states and labels do not align"
    return None


def output_embeddings(model: torch.nn.Module) -> torch.nn.Module | None:
    inner = getattr(model, "module", model)  # DeepSpeed engine / DDP
    get = getattr(inner, "get_output_embeddings", None)
    return get() if callable(get) else None


def causal_lm_loss(
    model: torch.nn.Module,
    inputs: dict[str, Any],
    labels: torch.Tensor,
    num_items_in_batch: torch.Tensor | int | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    checkpoint_chunks: bool | None = None,
    compiled: bool = False,
) -> tuple[torch.Tensor, Any]:
    """(loss, model outputs without logits) for `model(**inputs)` against `labels` (aligned with input_ids).

    checkpoint_chunks: None decides by itself (True only under DeepSpeed ZeRO-3). compiled: each chunk's
    log-softmax while training is TorchInductor's fused one (chatft.inductor, --compile_layers).
    """
    head = output_embeddings(model)
    if head is None:
        raise ValueError("the model has no output embedding (LM head)")
    captured: dict[str, torch.Tensor] = {}

    def keep_hidden(_module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("input")
        captured["hidden"] = hidden
        return (hidden[..., :0, :], *args[1:]), kwargs

    handle = head.register_forward_pre_hook(keep_hidden, with_kwargs=True)
    try:
        outputs = model(**inputs, use_cache=False)
    finally:
        handle.remove()
    hidden = captured.get("hidden")
    if hidden is None or hidden.shape[:2] != labels.shape:
        got = None if hidden is None else tuple(hidden.shape[:2])
        raise ValueError(
            f"the LM head saw hidden states of shape {got} for labels of shape {tuple(labels.shape)}; "
            "use --chunked_loss False for this model"
        )
    shift_labels = labels[..., 1:]
    trained = shift_labels != IGNORE_INDEX
    selected = hidden[..., :-1, :][trained]  # [n_trained, hidden]
    targets = shift_labels[trained]
    n_trained = targets.numel()
    selected, targets = pad_rows(selected, targets, ROW_STEP)
    if checkpoint_chunks is None:
        checkpoint_chunks = zero3_enabled()
    total = chunked_cross_entropy(head, selected, targets, chunk_size, checkpoint_chunks, compiled)
    if num_items_in_batch is None:
        num_items_in_batch = max(n_trained, 1)
    elif torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch, outputs


def pad_rows(hidden: torch.Tensor, targets: torch.Tensor, multiple: int) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden [n, h] and targets [n] padded to a multiple of `multiple` rows: zero rows with ignored targets,
    which add nothing to the loss or to any gradient."""
    pad = -hidden.shape[0] % multiple
    if not pad:
        return hidden, targets
    return F.pad(hidden, (0, 0, 0, pad)), F.pad(targets, (0, pad), value=IGNORE_INDEX)


def chunked_cross_entropy(
    head: torch.nn.Module,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    checkpoint_chunks: bool = False,
    compiled: bool = False,
) -> torch.Tensor:
    """sum over rows of cross_entropy(head(hidden[i]), targets[i]), fp32, one chunk of logits alive at a time;
    compiled (not with checkpoint_chunks): the gradients' log-softmax is TorchInductor's fused one."""
    chunk_size = max(1, int(chunk_size))
    params = tuple(p for p in head.parameters() if p.requires_grad)
    if not torch.is_grad_enabled() or not (hidden.requires_grad or params):
        with torch.no_grad():
            total = hidden.new_zeros((), dtype=torch.float32)
            for start in range(0, hidden.shape[0], chunk_size):
                total = total + _chunk_loss(
                    head, hidden[start : start + chunk_size], targets[start : start + chunk_size]
                )
            return total
    if checkpoint_chunks:
        from torch.utils.checkpoint import checkpoint

        total = hidden.new_zeros((), dtype=torch.float32)
        # at least one call of the head, even with nothing trained here (an empty row completing a step): ZeRO-3
        # gathers its weights inside that call on every process at once, and a process that skipped it would hang
        for start in range(0, max(hidden.shape[0], 1), chunk_size):
            part = checkpoint(
                _chunk_loss,
                head,
                hidden[start : start + chunk_size],
                targets[start : start + chunk_size],
                use_reentrant=False,
            )
            total = total + part
        return total
    # with no row (nothing trained in this micro-batch) too: the head's weights still get (zero) gradients
    logits_loss = compiled_cross_entropy() if compiled else summed_cross_entropy
    return _HeadCrossEntropy.apply(hidden, targets, head, chunk_size, logits_loss, *params)


def _chunk_loss(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return summed_cross_entropy(head(hidden), targets)


class _HeadCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of head(hidden); the gradients are computed chunk by chunk in the forward and only
    scaled in the backward, so no chunk's logits outlive it (a fused linear + cross-entropy, through the module)."""

    @staticmethod
    def forward(ctx, hidden, targets, head, chunk_size, logits_loss, *params):
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        # the weights' gradients add up over the chunks in fp32 (a bf16 model under DeepSpeed would round each sum)
        grad_params = [torch.zeros_like(p, dtype=torch.float32) for p in params]
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, hidden.shape[0], chunk_size):
            stop = start + chunk_size
            with torch.enable_grad():
                h = hidden[start:stop].detach().requires_grad_(grad_hidden is not None)
                loss = logits_loss(head(h), targets[start:stop])
                wrt = ([h] if grad_hidden is not None else []) + list(params)
                grads = torch.autograd.grad(loss, wrt)
            if grad_hidden is not None:
                grad_hidden[start:stop] = grads[0]
                grads = grads[1:]
            for acc, g in zip(grad_params, grads, strict=True):
                acc += g
            total += loss.detach()
        ctx.has_hidden_grad = grad_hidden is not None
        ctx.param_dtypes = [p.dtype for p in params]
        ctx.save_for_backward(*([grad_hidden] if grad_hidden is not None else []), *grad_params)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        saved = list(ctx.saved_tensors)
        grad_hidden = None
        if ctx.has_hidden_grad:
            g = saved.pop(0)
            grad_hidden = (g * grad_total).to(g.dtype)
        grad_params = [(g * grad_total).to(dtype) for g, dtype in zip(saved, ctx.param_dtypes, strict=True)]
        return (grad_hidden, None, None, None, None, *grad_params)


def zero3_enabled() -> bool:
    try:
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
    except ImportError:  # pragma: no cover
        return False
    return bool(is_deepspeed_zero3_enabled())
