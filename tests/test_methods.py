"""chatft.methods on a tiny Llama saved to a temporary folder: what each method trains, saves and reloads."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, TrainingArguments

from chatft import methods
from chatft.args import ModelArguments
from chatft.methods import describe_trainable, load_model, load_tokenizer, save_prefix_encoder

# peft 0.21 reads the deprecated `is_gradient_checkpointing` of transformers 5 in PeftModel.from_pretrained
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

VOCAB = 128
IDS = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
DESCRIBE = re.compile(r"^trainable params: [\d,]+ \|\| all params: [\d,]+ \|\| trainable%: \d+\.\d{4}$")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-llama")
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        tie_word_embeddings=True,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    tokenizer.save_pretrained(folder)
    return folder


def model_args(model_dir: Path, method: str, **kwargs) -> ModelArguments:
    defaults = {"pre_seq_len": 4, "lora_rank": 4, "lora_alpha": 8}
    return ModelArguments(model_name_or_path=str(model_dir), method=method, **{**defaults, **kwargs})


def training_args(tmp_path: Path, **kwargs) -> TrainingArguments:
    return TrainingArguments(output_dir=str(tmp_path / "run"), use_cpu=True, report_to=[], **kwargs)


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: param.detach().clone() for name, param in model.named_parameters()}


def train(model: torch.nn.Module, steps: int = 3) -> list[float]:
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for step in range(steps):
        ids = torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(100 + step))
        loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


@torch.no_grad()
def logits(model: torch.nn.Module) -> torch.Tensor:
    model.eval()
    return model(input_ids=IDS, attention_mask=torch.ones_like(IDS)).logits.float()


def assert_trained(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    assert trainable, "nothing is trainable"
    for name, param in model.named_parameters():
        changed = not torch.equal(before[name], param.detach())
        if name in trainable:
            assert changed, f"trainable {name} did not change"
        else:
            assert not changed, f"frozen {name} changed"


def bnb_base(model_dir: Path, bits: int) -> torch.nn.Module:
    from transformers import BitsAndBytesConfig

    if bits == 4:
        quant = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        )
    else:
        quant = BitsAndBytesConfig(load_in_8bit=True)
    return AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=quant, dtype=torch.float32)


def check_adapter_save(model, model_dir: Path, out: Path, fresh_base) -> dict:
    """Saves adapter/prefix-only files and reloads them on fresh_base: same logits. Returns adapter_config."""
    from peft import PeftModel

    expected = logits(model)
    model.save_pretrained(out)
    assert sorted(p.name for p in out.iterdir() if p.suffix in (".json", ".safetensors", ".bin")) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    assert (out / "adapter_model.safetensors").stat().st_size < (
        model_dir / "model.safetensors"
    ).stat().st_size / 4
    reloaded = PeftModel.from_pretrained(fresh_base, out)
    torch.testing.assert_close(logits(reloaded), expected, atol=1e-5, rtol=0)
    return json.loads((out / "adapter_config.json").read_text())


# ------------------------------------------------------------------------------------------------------------
# methods


def test_full(model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = load_model(model_args(model_dir, "full"), training_args(tmp_path))
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 1 and DESCRIBE.match(printed[0]), printed
    assert all(p.requires_grad for p in model.parameters())
    assert model.config.use_cache is False
    before = snapshot(model)
    losses = train(model)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert_trained(model, before)

    expected = logits(model)
    model.save_pretrained(tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    torch.testing.assert_close(logits(reloaded), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("projection", [False, True], ids=["plain", "projection"])
def test_ptuning(model_dir: Path, tmp_path: Path, projection: bool) -> None:
    model = load_model(
        model_args(model_dir, "ptuning", prefix_projection=projection), training_args(tmp_path)
    )
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(name.startswith("prompt_encoder.") for name in trainable)
    assert any("transform" in name for name in trainable) == projection
    # the prefix reaches attention although use_cache is off
    with model.disable_adapter():
        plain = logits(model)
    assert not torch.allclose(logits(model), plain)

    before = snapshot(model)
    losses = train(model)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert_trained(model, before)

    out = tmp_path / "prefix"
    fresh = AutoModelForCausalLM.from_pretrained(model_dir)
    config = check_adapter_save(model, model_dir, out, fresh)
    assert config["peft_type"] == "PREFIX_TUNING"
    assert config["num_virtual_tokens"] == 4
    assert config["prefix_projection"] is projection


@pytest.mark.parametrize("projection", [False, True], ids=["plain", "projection"])
def test_ptuning_checkpoint_continues(
    model_dir: Path, tmp_path: Path, projection: bool, caplog: pytest.LogCaptureFixture
) -> None:
    model = load_model(
        model_args(model_dir, "ptuning", prefix_projection=projection), training_args(tmp_path)
    )
    train(model, steps=1)
    expected = logits(model)
    model.save_pretrained(tmp_path / "ckpt")

    with caplog.at_level(logging.WARNING, logger="chatft.methods"):
        resumed = load_model(
            model_args(model_dir, "ptuning", pre_seq_len=8, ptuning_checkpoint=str(tmp_path / "ckpt")),
            training_args(tmp_path),
        )
    assert "4 prefix tokens" in caplog.text
    assert ("without the projection" in caplog.text) == projection
    torch.testing.assert_close(logits(resumed), expected, atol=1e-5, rtol=0)
    before = snapshot(resumed)
    train(resumed, steps=1)
    assert_trained(resumed, before)


def test_ptuning_checkpoint_written_by_chatft_keeps_its_projection(model_dir: Path, tmp_path: Path) -> None:
    # chatft's checkpoints also hold the whole prefix encoder: training goes on with the MLP itself
    model = load_model(model_args(model_dir, "ptuning", prefix_projection=True), training_args(tmp_path))
    train(model, steps=1)
    expected = logits(model)
    model.save_pretrained(tmp_path / "ckpt")
    save_prefix_encoder(model, tmp_path / "ckpt")
    resumed = load_model(
        model_args(model_dir, "ptuning", ptuning_checkpoint=str(tmp_path / "ckpt")), training_args(tmp_path)
    )
    trained = {n for n, p in resumed.named_parameters() if p.requires_grad}
    assert any(".transform." in n for n in trained) and any(".embedding." in n for n in trained)
    torch.testing.assert_close(logits(resumed), expected, atol=1e-5, rtol=0)
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(dict(resumed.named_parameters())[name], p)


def test_lora(model_dir: Path, tmp_path: Path) -> None:
    model = load_model(model_args(model_dir, "lora"), training_args(tmp_path))
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    # all-linear: every projection of every layer, never the (tied) head
    assert len(trainable) == 2 * 7 * 2 and all(".lora_" in name for name in trainable)
    before = snapshot(model)
    assert all(torch.isfinite(torch.tensor(train(model))))
    assert_trained(model, before)
    config = check_adapter_save(
        model, model_dir, tmp_path / "lora", AutoModelForCausalLM.from_pretrained(model_dir)
    )
    assert config["peft_type"] == "LORA" and config["r"] == 4


@pytest.mark.parametrize("fused", [True, False])
def test_lora_layers_train_fused_unless_asked_not_to(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], fused: bool
) -> None:
    from peft.tuners.lora import layer as lora

    model = load_model(model_args(model_dir, "lora", fused_lora=fused), training_args(tmp_path))
    layers = [m for m in model.modules() if isinstance(m, lora.Linear)]
    assert len(layers) == 2 * 7
    assert [("forward" in vars(m)) for m in layers] == [fused] * len(layers)  # chatft.fused_lora's, or peft's
    said = "LoRA: 14 layers train through one fused function each (--fused_lora)"
    assert (said in capsys.readouterr().out) == fused


def test_lora_target_list(model_dir: Path, tmp_path: Path) -> None:
    model = load_model(model_args(model_dir, "lora", lora_target="q_proj, v_proj"), training_args(tmp_path))
    trainable = {name.split(".")[-4] for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"q_proj", "v_proj"}
    with pytest.raises(ValueError, match="--lora_target nope"):
        load_model(model_args(model_dir, "lora", lora_target="nope"), training_args(tmp_path))


@pytest.mark.parametrize("bits", [4, 8])
def test_qlora(model_dir: Path, tmp_path: Path, bits: int, caplog: pytest.LogCaptureFixture) -> None:
    import bitsandbytes as bnb

    model = load_model(model_args(model_dir, "qlora", quantization_bit=bits), training_args(tmp_path))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    assert isinstance(layer, bnb.nn.Linear4bit if bits == 4 else bnb.nn.Linear8bitLt)
    assert all(".lora_" in name for name, p in model.named_parameters() if p.requires_grad)
    before = snapshot(model)
    assert all(torch.isfinite(torch.tensor(train(model))))
    assert_trained(model, before)
    check_adapter_save(model, model_dir, tmp_path / "qlora", bnb_base(model_dir, bits))
    assert caplog.text.count("MatMul8bitLt") <= 1  # bitsandbytes would log it on every 8-bit matmul


def test_ptuning_on_4bit_base(model_dir: Path, tmp_path: Path) -> None:
    model = load_model(model_args(model_dir, "ptuning", quantization_bit=4), training_args(tmp_path))
    assert all(name.startswith("prompt_encoder.") for name, p in model.named_parameters() if p.requires_grad)
    before = snapshot(model)
    assert all(torch.isfinite(torch.tensor(train(model))))
    assert_trained(model, before)
    check_adapter_save(model, model_dir, tmp_path / "prefix4", bnb_base(model_dir, 4))


# ------------------------------------------------------------------------------------------------------------
# precision and gradient checkpointing


@pytest.mark.parametrize("method", ["ptuning", "lora", "full"])
def test_bf16_base_keeps_trainable_weights_in_fp32(model_dir: Path, tmp_path: Path, method: str) -> None:
    model = load_model(model_args(model_dir, method), training_args(tmp_path, bf16=True))
    for name, param in model.named_parameters():
        if method == "full":
            assert param.dtype == torch.float32, name  # fp32 master weights; bf16 compute under autocast
        else:
            assert param.dtype == (torch.float32 if param.requires_grad else torch.bfloat16), name
    assert all(torch.isfinite(torch.tensor(train(model, steps=1))))


def copies_loss_and_grads(model: torch.nn.Module) -> tuple[int, float, list[torch.Tensor]]:
    """The dtype casts (aten._to_copy) of one forward and backward under bf16 autocast, its loss and the
    trainable weights' gradients."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        casts = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.casts += func is torch.ops.aten._to_copy.default
            return func(*args, **(kwargs or {}))

    model.zero_grad()
    with Count(), torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=IDS, labels=IDS).loss
        loss.backward()
    grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    return Count.casts, loss.item(), grads


def test_lora_under_bf16_feeds_its_adapters_without_casting_their_inputs(
    model_dir: Path, tmp_path: Path
) -> None:
    """peft casts an adapter's input to the adapter's fp32 weights, and autocast casts it straight back: chatft
    skips that under autocast, which drops those casts and computes exactly the same (outside autocast, peft's
    cast stays: test_bf16_base_keeps_trainable_weights_in_fp32 trains without it). Plain LoRA layers train through
    chatft.fused_lora instead; this is for the layers that keep peft's forward."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    model = load_model(model_args(model_dir, "lora"), training_args(tmp_path, bf16=True))
    adapters = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    for module in adapters:  # peft's forward: what layers keep where chatft.fused_lora does not apply
        vars(module).pop("forward")
    casts, loss, grads = copies_loss_and_grads(model)
    for module in adapters:
        vars(module).pop("_cast_input_dtype", None)  # peft's own
    peft_casts, peft_loss, peft_grads = copies_loss_and_grads(model)
    assert peft_casts - casts >= 3 * len(adapters)  # peft: the input to fp32 and back, and its gradient
    assert loss == peft_loss
    assert all(torch.equal(a, b) for a, b in zip(grads, peft_grads, strict=True))


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated:FutureWarning")
@pytest.mark.parametrize("name", ["gradient_checkpointing", "activation_checkpointing"])
def test_ptuning_turns_gradient_checkpointing_off(
    model_dir: Path, tmp_path: Path, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    args = training_args(tmp_path, **{name: True})
    with caplog.at_level(logging.WARNING, logger="chatft.methods"):
        model = load_model(model_args(model_dir, "ptuning"), args)
    assert caplog.text.count("turning it off") == 1
    assert args.gradient_checkpointing is False and args.activation_checkpointing is False
    assert not model.get_base_model().is_activation_checkpointing
    assert all(torch.isfinite(torch.tensor(train(model, steps=1))))


@pytest.mark.parametrize(
    ("method", "kwargs"),
    [("lora", None), ("full", None), ("qlora", {"use_reentrant": True})],
)
def test_gradient_checkpointing(model_dir: Path, tmp_path: Path, method: str, kwargs: dict | None) -> None:
    args = training_args(tmp_path, activation_checkpointing=True, activation_checkpointing_kwargs=kwargs)
    model = load_model(model_args(model_dir, method), args)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    assert base.is_activation_checkpointing
    expected_reentrant = bool(kwargs and kwargs["use_reentrant"])
    assert args.activation_checkpointing_kwargs["use_reentrant"] is expected_reentrant
    assert args.gradient_checkpointing_kwargs["use_reentrant"] is expected_reentrant
    before = snapshot(model)
    assert all(torch.isfinite(torch.tensor(train(model, steps=2))))
    assert_trained(model, before)  # with reentrant checkpointing only if the inputs require grads


# ------------------------------------------------------------------------------------------------------------
# tokenizer, describe_trainable, errors


def test_load_tokenizer_uses_eos_as_pad(model_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="chatft.methods"):
        tokenizer = load_tokenizer(model_args(model_dir, "lora"))
    assert tokenizer.pad_token == "</s>" and tokenizer.pad_token_id == 2
    assert caplog.text.count("no pad token") == 1
    assert tokenizer("w5 w7")["input_ids"][-2:] == [5, 7]


def test_load_tokenizer_errors(model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"^--tokenizer_name_or_path .*missing: no such folder$"):
        load_tokenizer(model_args(model_dir, "lora", tokenizer_name_or_path=str(tmp_path / "missing")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="cannot load a tokenizer"):
        load_tokenizer(model_args(model_dir, "lora", tokenizer_name_or_path=str(tmp_path / "empty")))


def test_describe_trainable() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(10, 10), torch.nn.Linear(10, 2))
    model[0].requires_grad_(False)
    assert describe_trainable(model) == "trainable params: 22 || all params: 132 || trainable%: 16.6667"


def test_model_folder_errors(model_dir: Path, tmp_path: Path) -> None:
    args = training_args(tmp_path)
    with pytest.raises(ValueError, match=r"^--model_name_or_path .*nowhere: no such folder$"):
        load_model(model_args(tmp_path / "nowhere", "lora"), args)
    (tmp_path / "no-config").mkdir()
    with pytest.raises(ValueError, match=r"not a model folder \(no config.json\)$"):
        load_model(model_args(tmp_path / "no-config", "full"), args)


def test_ptuning_checkpoint_errors(model_dir: Path, tmp_path: Path) -> None:
    args = training_args(tmp_path)
    lora = load_model(model_args(model_dir, "lora"), args)
    lora.save_pretrained(tmp_path / "lora")
    with pytest.raises(ValueError, match=r"not a P-Tuning v2 checkpoint \(peft_type is 'LORA'"):
        load_model(model_args(model_dir, "ptuning", ptuning_checkpoint=str(tmp_path / "lora")), args)
    (tmp_path / "plain").mkdir()
    with pytest.raises(ValueError, match=r"no adapter_config.json"):
        load_model(model_args(model_dir, "ptuning", ptuning_checkpoint=str(tmp_path / "plain")), args)
    with pytest.raises(ValueError, match=r"no such folder"):
        load_model(model_args(model_dir, "ptuning", ptuning_checkpoint=str(tmp_path / "gone")), args)
    with pytest.raises(ValueError, match=r"only for --method ptuning"):
        load_model(model_args(model_dir, "lora", ptuning_checkpoint=str(tmp_path / "lora")), args)


def test_bitsandbytes_failure_is_one_line(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class FailingAuto:
        @staticmethod
        def from_pretrained(*args, **kwargs):
            assert "quantization_config" in kwargs
            raise RuntimeError("No bitsandbytes backend for this device\nlong traceback text")

    monkeypatch.setattr(methods, "AutoModelForCausalLM", FailingAuto)
    with pytest.raises(ValueError) as info:
        load_model(model_args(model_dir, "qlora", quantization_bit=8), training_args(tmp_path))
    message = str(info.value)
    assert message.startswith("--quantization_bit 8: bitsandbytes could not load")
    assert "RuntimeError: No bitsandbytes backend for this device" in message and "\n" not in message
