"""End-to-end checks of the default real model folder (SmolLM2-135M-Instruct converted from GGUF)."""

from __future__ import annotations

import json

import pytest

from chatft.demo_model import DEFAULT_MODEL_DIR, EXPECTED_CHATML, ensure_demo_model, ensure_gguf

pytestmark = pytest.mark.real_model

PROMPT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module", autouse=True)
def _offline():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        yield


@pytest.fixture(scope="module")
def model_dir(_offline):
    # scripts/run_tests.sh prepares it (scripts/get_demo_model.sh): a failure here is a failure, never a skip
    return ensure_demo_model(DEFAULT_MODEL_DIR)


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def model(model_dir):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(model_dir)
    m.eval()
    return m


def test_folder_is_plain_safetensors(model_dir):
    assert (model_dir / "config.json").is_file()
    assert (model_dir / "model.safetensors").is_file()
    assert not list(model_dir.glob("*.gguf"))
    assert "quantization_config" not in json.loads((model_dir / "config.json").read_text())


def test_special_token_ids(model_dir, tokenizer, model):
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == 2
    assert tokenizer.pad_token == "<|im_end|>" and tokenizer.pad_token_id == 2
    assert tokenizer.bos_token_id == 1
    for name in ("config.json", "generation_config.json"):
        data = json.loads((model_dir / name).read_text())
        assert data["eos_token_id"] == 2, name
        assert data["pad_token_id"] == 2, name
        assert data["bos_token_id"] == 1, name
    assert model.config.eos_token_id == 2 and model.config.pad_token_id == 2
    assert model.generation_config.eos_token_id == 2 and model.generation_config.pad_token_id == 2


def test_chat_template_is_chatml(tokenizer):
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text == EXPECTED_CHATML
    with_system = tokenizer.apply_chat_template(
        [
            {"role": "system", "content": "S"},
            {"role": "user", "content": "U"},
            {"role": "assistant", "content": "A"},
        ],
        tokenize=False,
    )
    assert (
        with_system
        == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\nA<|im_end|>\n"
    )


def test_tied_embeddings(model):
    assert model.config.tie_word_embeddings
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def test_greedy_generate_matches_gguf(model_dir, tokenizer, model):
    import torch
    from transformers import AutoModelForCausalLM

    gguf_path = ensure_gguf()  # cached by get_demo_model.sh
    ref = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    ref.eval()

    ids = tokenizer.apply_chat_template(
        PROMPT, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    kwargs = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 2}
    with torch.no_grad():
        out = model.generate(**ids, **kwargs)
        out_ref = ref.generate(**ids, **kwargs)
    new = out[0, ids["input_ids"].shape[1] :]
    assert len(new) > 0
    assert out.tolist() == out_ref.tolist()
    # Sanity: the model actually answers (not garbage from a broken conversion).
    assert "paris" in tokenizer.decode(new, skip_special_tokens=True).lower()
