"""chatft.fused_lora: LoRA layers trained through one autograd function compute what peft's layers compute."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import layer as lora

from chatft.fused_lora import fuse_lora_layers
from tests.toy import tiny_llama

VOCAB = 96
IDS = torch.randint(3, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))


def lora_pair(dropout: float = 0.0, bias: bool = False) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The same LoRA model twice, B not zero (a trained adapter): peft's layers, and chatft's fused ones."""
    base = tiny_llama(VOCAB, hidden=64, layers=2, attention_bias=bias)
    base.requires_grad_(False)
    lora_config = LoraConfig(r=4, lora_alpha=12, lora_dropout=dropout, target_modules="all-linear")
    peft_model = get_peft_model(base, lora_config)
    torch.manual_seed(2)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)
    fused_model = copy.deepcopy(peft_model)
    assert fuse_lora_layers(fused_model) == 2 * 7  # q k v o gate up down in each layer
    return peft_model, fused_model


def loss_and_grads(model: torch.nn.Module, autocast: bool = False, seed: int = 3):
    """Loss, the LoRA weights' gradients and the gradient of the first layer's attention input (what its q, k and v
    projections read) of one forward and backward."""
    model.train()
    model.zero_grad()
    normed = {}

    def keep(_module, _inputs, output):
        output.retain_grad()
        normed["out"] = output

    hook = model.get_input_embeddings().register_forward_hook(lambda m, i, o: o.requires_grad_(True))
    keeper = model.base_model.model.model.layers[0].input_layernorm.register_forward_hook(keep)
    torch.manual_seed(seed)  # the same dropout masks in both models
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(input_ids=IDS, labels=IDS).loss
    loss.backward()
    hook.remove()
    keeper.remove()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    return loss.item(), grads, normed["out"].grad.clone()


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("bias", [False, True])
def test_fused_layers_train_as_peft_layers_do(dropout: float, bias: bool) -> None:
    peft_model, fused_model = lora_pair(dropout, bias)
    loss, grads, input_grad = loss_and_grads(peft_model)
    fused_loss, fused_grads, fused_input_grad = loss_and_grads(fused_model)
    assert fused_loss == pytest.approx(loss, rel=1e-6)
    assert grads.keys() == fused_grads.keys() and len(grads) == 2 * 2 * 7
    for name, grad in grads.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    torch.testing.assert_close(fused_input_grad, input_grad, rtol=1e-4, atol=1e-7)


def test_fused_layers_under_bf16_autocast_round_like_peft() -> None:
    peft_model, fused_model = lora_pair()
    for model in (peft_model, fused_model):
        model.base_model.model.to(torch.bfloat16)
        for param in model.parameters():
            if param.requires_grad:
                param.data = param.data.float()  # trainable weights in fp32, as chatft keeps them
    loss, grads, _ = loss_and_grads(peft_model, autocast=True)
    fused_loss, fused_grads, _ = loss_and_grads(fused_model, autocast=True)
    assert fused_loss == pytest.approx(loss, rel=1e-2)
    for name, grad in grads.items():
        assert fused_grads[name].dtype == torch.float32
        assert (
            torch.nn.functional.cosine_similarity(fused_grads[name].flatten(), grad.flatten(), dim=0) > 0.99
        ), name


def test_everything_but_training_runs_peft_forward() -> None:
    """Generation (no gradients), a disabled or merged adapter and two active adapters take peft's own forward:
    the same outputs bit for bit."""
    peft_model, fused_model = lora_pair()
    with torch.no_grad():
        assert torch.equal(fused_model(input_ids=IDS).logits, peft_model(input_ids=IDS).logits)
        with fused_model.disable_adapter(), peft_model.disable_adapter():
            assert torch.equal(fused_model(input_ids=IDS).logits, peft_model(input_ids=IDS).logits)
    layer = next(m for m in fused_model.modules() if isinstance(m, lora.Linear))
    x = torch.randn(3, layer.in_features, requires_grad=True)
    calls = []
    original = lora.Linear.forward

    def spy(self, *args, **kwargs):
        calls.append(self)
        return original(self, *args, **kwargs)

    lora.Linear.forward = spy
    try:
        layer(x)
        assert calls == []  # the fused function
        layer.merge()
        layer(x)
        layer.unmerge()
        assert calls == [layer]
    finally:
        lora.Linear.forward = original
