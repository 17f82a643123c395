"""chatft.loss: the loss at trained positions, LM head in chunks, equals the model's own loss and gradients."""

from __future__ import annotations

import pytest
import torch
from toy import tiny_llama
from transformers import LlamaForCausalLM

from chatft.loss import causal_lm_loss, chunked_cross_entropy, pad_rows, unsupported_reason

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

X = -100
VOCAB = 128


def tiny(tied: bool = True, **extra) -> LlamaForCausalLM:
    return tiny_llama(VOCAB, tie_word_embeddings=tied, use_cache=False, **extra)


def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (3, 12), generator=g)
    labels = ids.clone()
    labels[:, :4] = X  # prompts
    labels[2, 8:] = X  # padding of a shorter example
    mask = torch.ones_like(ids)
    mask[2, 8:] = 0
    return ids, labels, mask


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def reference(model, ids, labels, mask, num_items=None):
    model.zero_grad()
    kwargs = {} if num_items is None else {"num_items_in_batch": num_items}
    loss = model(input_ids=ids, attention_mask=mask, labels=labels, **kwargs).loss
    loss.backward()
    return loss.detach(), grads(model)


def ours(model, ids, labels, mask, num_items=None, **kwargs):
    model.zero_grad()
    loss, outputs = causal_lm_loss(
        model, {"input_ids": ids, "attention_mask": mask}, labels, num_items, **kwargs
    )
    loss.backward()
    return loss.detach(), grads(model), outputs


def assert_same(a, b):
    (loss_a, grads_a), (loss_b, grads_b) = a[:2], b[:2]
    torch.testing.assert_close(loss_a, loss_b, atol=1e-5, rtol=1e-5)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("chunk_size", [5, 1024])
@pytest.mark.parametrize("checkpoint_chunks", [False, True])
def test_full_model_loss_and_gradients(tied, chunk_size, checkpoint_chunks):
    model = tiny(tied)
    ids, labels, mask = batch()
    got = ours(model, ids, labels, mask, chunk_size=chunk_size, checkpoint_chunks=checkpoint_chunks)
    assert_same(got, reference(model, ids, labels, mask))
    assert got[2].logits.shape == (3, 0, VOCAB)  # the head never ran on the whole batch


def test_divides_by_num_items_in_batch():
    """Gradient accumulation: each micro-batch's sum is divided by the trained tokens of the whole step."""
    model = tiny()
    ids, labels, mask = batch()
    assert_same(ours(model, ids, labels, mask, 100, chunk_size=7), reference(model, ids, labels, mask, 100))
    assert_same(
        ours(model, ids, labels, mask, torch.tensor(100), chunk_size=7),
        reference(model, ids, labels, mask, torch.tensor(100)),
    )


def test_lora_gradients():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(
        tiny(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    )
    ids, labels, mask = batch()
    got = ours(model, ids, labels, mask, chunk_size=5)
    assert got[1] and all("lora_" in name for name in got[1])
    assert_same(got, reference(model, ids, labels, mask))


def test_prefix_tuning_loss_and_gradients():
    from peft import PrefixTuningConfig, TaskType, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(tiny(), PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=3))
    assert unsupported_reason(model) is None
    ids, labels, mask = batch()
    got = ours(model, ids, labels, mask, chunk_size=5)
    assert got[1] and all("prompt_encoder" in name for name in got[1])
    assert_same(got, reference(model, ids, labels, mask))


def test_no_grad_evaluation_gives_the_same_loss():
    model = tiny().eval()
    ids, labels, mask = batch()
    with torch.no_grad():
        loss, _ = causal_lm_loss(model, {"input_ids": ids, "attention_mask": mask}, labels, chunk_size=4)
        expected = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)


def test_chunked_cross_entropy_with_nothing_trained_keeps_the_graph():
    head = torch.nn.Linear(8, 16, bias=False)
    hidden = torch.zeros(0, 8, requires_grad=True)
    total = chunked_cross_entropy(head, hidden, torch.zeros(0, dtype=torch.long))
    total.backward()
    assert total.item() == 0.0


def test_bf16_autocast_matches_the_model_loss():
    model = tiny()
    ids, labels, mask = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = ours(model, ids, labels, mask, chunk_size=5)
        expected = reference(model, ids, labels, mask)
    torch.testing.assert_close(got[0], expected[0], atol=2e-2, rtol=1e-2)


def test_models_that_post_process_logits_are_refused():
    assert unsupported_reason(tiny()) is None
    model = tiny()
    model.config.final_logit_softcapping = 30.0
    assert "final_logit_softcapping" in unsupported_reason(model)


def test_trained_rows_are_padded_to_few_shapes():
    """The head sees a multiple of ROW_STEP rows (oneDNN keeps kernels per shape on the CPU); the pad rows are
    zeros with ignored targets. That the mean still divides by the real trained tokens is what the loss-equality
    tests above hold."""
    hidden, targets = pad_rows(torch.ones(3, 2), torch.tensor([5, 6, 7]), 4)
    assert hidden.tolist() == [[1, 1], [1, 1], [1, 1], [0, 0]] and targets.tolist() == [5, 6, 7, X]
    same = torch.ones(4, 2)
    assert pad_rows(same, torch.zeros(4), 4)[0] is same
