"""The family fixtures of tests/families.py: each template renders its family's documented layout, the
tokenizers cover the sample conversations, and tokenizer and tiny model round-trip through save_pretrained."""

import functools
import re

import pytest
import torch
from families import (
    CLOSERS,
    FAMILIES,
    REASONING_CONVERSATION,
    SAMPLE_CONVERSATIONS,
    SAMPLE_TOOLS,
    TOOL_CONVERSATION,
    TOOL_FAMILIES,
    assert_no_unk,
    make_tokenizer,
    save_family,
    tiny_model,
    unk_id,
)
from transformers import AutoModelForCausalLM, AutoTokenizer

PAIR = SAMPLE_CONVERSATIONS[0]  # user "hi", assistant "hello there"

# The rendering of PAIR, written from each family's documentation (not from the templates).
EXPECTED_PAIR = {
    "smollm2": "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello there<|im_end|>\n",
    "llama3": "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
    "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\nhello there<|eot_id|>",
    "qwen2.5": "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    "<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello there<|im_end|>\n",
    # the last assistant turn gets an (empty) think block, as Qwen3's own template renders it
    "qwen3": "<|im_start|>user\nhi<|im_end|>\n"
    "<|im_start|>assistant\n<think>\n\n</think>\n\nhello there<|im_end|>\n",
    "gemma2": "<bos><start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\nhello there<end_of_turn>\n",
    "gemma3": "<bos><start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\nhello there<end_of_turn>\n",
    "mistral": "<s>[INST] hi[/INST] hello there</s>",
    "phi3": "<|user|>\nhi<|end|>\n<|assistant|>\nhello there<|end|>\n<|endoftext|>",
    "glm4": "[gMASK]<sop><|user|>\nhi<|assistant|>\nhello there",
    "zephyr": "<|user|>\nhi</s>\n<|assistant|>\nhello there</s>\n",
}

# What the generation prompt for PAIR's answer ends with (the assistant header the model continues).
EXPECTED_HEADER = {
    "smollm2": "<|im_start|>assistant\n",
    "llama3": "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "qwen2.5": "<|im_start|>assistant\n",
    "qwen3": "<|im_start|>assistant\n",
    "gemma2": "<start_of_turn>model\n",
    "gemma3": "<start_of_turn>model\n",
    "mistral": "[INST] hi[/INST]",  # no header: the answer follows the user turn
    "phi3": "<|assistant|>\n",
    "glm4": "<|assistant|>",
    "zephyr": "<|assistant|>\n",
}

# bos, eos, pad, unk as each family's tokenizer_config has them.
EXPECTED_SPECIALS = {
    "smollm2": ("<|im_start|>", "<|im_end|>", "<|im_end|>", "<|endoftext|>"),
    "llama3": ("<|begin_of_text|>", "<|eot_id|>", None, None),
    "qwen2.5": (None, "<|im_end|>", "<|endoftext|>", None),
    "qwen3": (None, "<|im_end|>", "<|endoftext|>", None),
    "gemma2": ("<bos>", "<eos>", "<pad>", "<unk>"),
    "gemma3": ("<bos>", "<eos>", "<pad>", "<unk>"),
    "mistral": ("<s>", "</s>", None, "<unk>"),
    "phi3": ("<s>", "<|endoftext|>", "<|endoftext|>", "<unk>"),
    "glm4": (None, "<|endoftext|>", "<|endoftext|>", None),
    "zephyr": ("<s>", "</s>", "</s>", "<unk>"),
}

# generation_config.json's eos_token_id of the real instruct models, as tokens (a str: a single id there).
EXPECTED_GENERATION_EOS = {
    "smollm2": "<|im_end|>",
    "llama3": ["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"],
    "qwen2.5": ["<|im_end|>", "<|endoftext|>"],
    "qwen3": ["<|im_end|>", "<|endoftext|>"],
    "gemma2": ["<eos>", "<end_of_turn>"],
    "gemma3": ["<eos>", "<end_of_turn>"],
    "mistral": "</s>",
    "phi3": ["<|endoftext|>", "<|assistant|>", "<|end|>"],
    "glm4": ["<|endoftext|>", "<|user|>", "<|observation|>"],
    "zephyr": "</s>",
}

# Tokens encoding puts in front of text with add_special_tokens=True.
EXPECTED_PREFIX = {
    "llama3": ["<|begin_of_text|>"], "gemma2": ["<bos>"], "gemma3": ["<bos>"], "mistral": ["<s>"],
    "glm4": ["[gMASK]", "<sop>"], "zephyr": ["<s>"],
}  # fmt: skip

EXPECTED_MODEL_CLASS = {
    "smollm2": "LlamaForCausalLM", "llama3": "LlamaForCausalLM", "qwen2.5": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3": "Gemma3ForCausalLM",
    "mistral": "MistralForCausalLM", "phi3": "Phi3ForCausalLM", "glm4": "Glm4ForCausalLM",
    "zephyr": "MistralForCausalLM",
}  # fmt: skip

PHI3_RSTRIP = re.compile(r"(<\|(?:assistant|system|end|user)\|>)\s+")

tokenizer = functools.cache(make_tokenizer)


def render(family: str, messages: list, **kw) -> str:
    return tokenizer(family).apply_chat_template(messages, tokenize=False, **kw)


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_every_family_has_its_fixtures():
    assert list(EXPECTED_PAIR) == FAMILIES
    assert set(CLOSERS) == set(FAMILIES)


# --- templates ---


@pytest.mark.parametrize("family", FAMILIES)
def test_pair_renders_the_documented_layout(family):
    assert render(family, PAIR) == EXPECTED_PAIR[family]


@pytest.mark.parametrize("family", FAMILIES)
def test_generation_prompt_is_a_prefix_of_the_answered_conversation(family):
    prompt = render(family, PAIR[:1], add_generation_prompt=True)
    assert prompt.endswith(EXPECTED_HEADER[family])
    assert EXPECTED_PAIR[family].startswith(prompt)
    assert "hello there" in EXPECTED_PAIR[family][len(prompt) :]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("conv", range(len(SAMPLE_CONVERSATIONS)))
def test_samples_render_without_unknown_tokens(family, conv):
    tok = tokenizer(family)
    text = render(family, SAMPLE_CONVERSATIONS[conv])
    ids = assert_no_unk(tok, text)
    decoded = tok.decode(ids)
    # Phi-3's role tokens swallow the white space after them (rstrip), as in its real tokenizer
    assert decoded == (PHI3_RSTRIP.sub(r"\1", text) if family == "phi3" else text)


@pytest.mark.parametrize("family", FAMILIES)
def test_unknown_text_is_caught(family):
    tok = tokenizer(family)
    if unk_id(tok) is None:  # byte-level BPE: nothing is unknown, as in the real Qwen2.5 tokenizer
        assert family == "qwen2.5"
        assert tok.decode(assert_no_unk(tok, "zebra Ω")) == "zebra Ω"
        return
    with pytest.raises(AssertionError, match="zebra"):
        assert_no_unk(tok, "a zebra")


@pytest.mark.parametrize("family", FAMILIES)
def test_each_answer_is_closed_by_a_closer(family):
    conv = SAMPLE_CONVERSATIONS[1]
    text = render(family, conv)
    for answer in (m["content"] for m in conv if m["role"] == "assistant"):
        rest = text[text.index(answer) + len(answer) :]
        if family == "glm4" and rest == "":
            continue  # GLM-4's last answer has no closer: EOS ends it
        assert rest.startswith(CLOSERS[family]), rest


@pytest.mark.parametrize("family", FAMILIES)
def test_closers_are_special_tokens(family):
    tok = tokenizer(family)
    special = {t.content for t in tok.added_tokens_decoder.values() if t.special}
    assert set(CLOSERS[family]) <= special


@pytest.mark.parametrize("family", FAMILIES)
def test_native_tools_only_where_the_template_renders_them(family):
    # chatft tells a template with native tools by "tools" and "tool_calls" in its source
    template = tokenizer(family).chat_template
    assert ("tool_calls" in template and "tools" in template) == (family in TOOL_FAMILIES)


@pytest.mark.parametrize("family", TOOL_FAMILIES)
def test_tool_conversation_renders_without_unknown_tokens(family):
    text = render(family, TOOL_CONVERSATION, tools=SAMPLE_TOOLS)
    assert_no_unk(tokenizer(family), text)
    assert '"get_weather"' in text and "sunny in Paris." in text


def test_qwen_tool_call_and_response_hermes_style():
    for family in ("qwen2.5", "qwen3"):
        text = render(family, TOOL_CONVERSATION, tools=SAMPLE_TOOLS)
        assert "<tools>\n" + '{"type": "function", "function": {"name": "get_weather"' in text
        assert (
            '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
            "</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\nsunny\n</tool_response><|im_end|>\n"
        ) in text
    assert render("qwen2.5", TOOL_CONVERSATION, tools=SAMPLE_TOOLS).startswith(
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
        "\n\n# Tools\n\n"
    )
    assert render("qwen3", TOOL_CONVERSATION, tools=SAMPLE_TOOLS).startswith(
        "<|im_start|>system\n# Tools\n\n"
    )


def test_llama3_tools_go_to_the_first_user_message_and_results_to_ipython():
    text = render("llama3", TOOL_CONVERSATION, tools=SAMPLE_TOOLS)
    assert "<|end_header_id|>\n\nEnvironment: ipython\nCutting Knowledge Date" in text
    assert '"name": "get_weather",\n' in text  # the definitions, indented JSON, in the user message
    assert text.index("Given the following functions") < text.index("what is the weather in Paris?")
    assert (
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
        '{"name": "get_weather", "parameters": {"city": "Paris"}}'
        '<|eot_id|><|start_header_id|>ipython<|end_header_id|>\n\n"sunny"<|eot_id|>'
    ) in text


def test_qwen3_think_blocks():
    assert render("qwen3", REASONING_CONVERSATION) == (
        "<|im_start|>user\nhow are you?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nthe user asks how I am.\n</think>\n\nfine, thanks!<|im_end|>\n"
    )
    # an answer before the last query loses its think block; the last answer gets an empty one
    text = render("qwen3", SAMPLE_CONVERSATIONS[1])
    assert "<|im_start|>assistant\nfine, thanks!<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\nsunny in Paris.<|im_end|>\n")
    assert render("qwen3", PAIR[:1], add_generation_prompt=True, enable_thinking=False).endswith(
        "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )


def test_qwen3_think_tokens_are_added_but_not_special():
    added = {t.content: t.special for t in tokenizer("qwen3").added_tokens_decoder.values()}
    assert added["<think>"] is False and added["</think>"] is False and added["<|im_end|>"] is True


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_gemma_puts_the_system_text_in_the_first_user_turn_and_needs_alternation(family):
    assert render(family, SAMPLE_CONVERSATIONS[1]).startswith(
        "<bos><start_of_turn>user\nyou are a helpful assistant.\n\nhow are you?<end_of_turn>\n"
    )
    with pytest.raises(Exception, match="alternate"):
        render(family, [{"role": "user", "content": "hi"}, {"role": "user", "content": "hi"}])


def test_mistral_system_text_only_when_a_user_message_ends_the_conversation():
    conv = SAMPLE_CONVERSATIONS[1]
    prompt = render("mistral", conv[:-1], add_generation_prompt=True)
    assert prompt.endswith("[INST] you are a helpful assistant.\n\nwhat is the weather in Paris?[/INST]")
    assert "helpful" not in render("mistral", conv)  # once answered, the system text is gone
    with pytest.raises(Exception, match="alternate"):
        render("mistral", [{"role": "assistant", "content": "hi"}])


def test_phi3_appends_eos_only_without_generation_prompt():
    assert render("phi3", PAIR).endswith("<|end|>\n<|endoftext|>")
    assert not render("phi3", PAIR[:1], add_generation_prompt=True).endswith("<|endoftext|>")


def test_glm4_renders_system_messages_first_and_turns_without_closers():
    assert render("glm4", SAMPLE_CONVERSATIONS[1]) == (
        "[gMASK]<sop><|system|>\nyou are a helpful assistant."
        "<|user|>\nhow are you?<|assistant|>\nfine, thanks!"
        "<|user|>\nwhat is the weather in Paris?<|assistant|>\nsunny in Paris."
    )


def test_zephyr_role_markers_are_text_not_tokens():
    tok = tokenizer("zephyr")
    ids = tok(render("zephyr", PAIR), add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(ids)[:5] == ["<", "|", "user", "|", ">"]


def test_smollm2_own_system_replaces_the_default():
    assert render("smollm2", SAMPLE_CONVERSATIONS[1]).startswith(
        "<|im_start|>system\nyou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    )


# --- tokenizers ---


@pytest.mark.parametrize("family", FAMILIES)
def test_special_tokens_as_the_family_sets_them(family):
    tok = tokenizer(family)
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == EXPECTED_SPECIALS[family]
    ids = tok("hi")["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == [*EXPECTED_PREFIX.get(family, []), "hi"]


@pytest.mark.parametrize("family", FAMILIES)
def test_tokenizer_round_trips_through_save_pretrained(family, tmp_path):
    tok = tokenizer(family)
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.chat_template == tok.chat_template
    assert loaded.added_tokens_decoder == tok.added_tokens_decoder
    specials = (loaded.bos_token, loaded.eos_token, loaded.pad_token, loaded.unk_token)
    assert specials == EXPECTED_SPECIALS[family]
    for conv in SAMPLE_CONVERSATIONS:
        text = loaded.apply_chat_template(conv, tokenize=False)
        assert text == render(family, conv)
        assert loaded(text)["input_ids"] == tok(text)["input_ids"]


# --- models ---


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_model_is_seeded_and_runs_the_rendered_ids(family):
    tok, model = tokenizer(family), tiny_model(family)
    assert type(model).__name__ == EXPECTED_MODEL_CLASS[family]
    assert model.config.vocab_size == len(tok)
    assert (model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id) == (
        tok.bos_token_id, tok.eos_token_id, tok.pad_token_id,
    )  # fmt: skip
    assert same_weights(model, tiny_model(family)) and not same_weights(model, tiny_model(family, seed=1))
    ids = torch.tensor([tok(render(family, SAMPLE_CONVERSATIONS[1]), add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], len(tok)) and torch.isfinite(logits).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_generation_eos_is_the_family_list(family):
    tok, expected = tokenizer(family), EXPECTED_GENERATION_EOS[family]
    ids = tok.convert_tokens_to_ids(expected)
    assert tiny_model(family).generation_config.eos_token_id == ids


@pytest.mark.parametrize("family", ["gemma2", "gemma3", "mistral"])
def test_sliding_window_is_small_enough_to_cross(family):
    config = tiny_model(family).config
    assert config.sliding_window == 8
    if family.startswith("gemma"):
        assert set(config.layer_types) == {"sliding_attention", "full_attention"}


@pytest.mark.parametrize("family", FAMILIES)
def test_saved_family_loads_back_identically(family, tmp_path):
    folder = save_family(family, tmp_path / family)
    model, loaded = tiny_model(family), AutoModelForCausalLM.from_pretrained(folder)
    assert type(loaded) is type(model) and same_weights(loaded, model)
    assert loaded.generation_config.eos_token_id == model.generation_config.eos_token_id
    tok, loaded_tok = tokenizer(family), AutoTokenizer.from_pretrained(folder)
    text = render(family, SAMPLE_CONVERSATIONS[1])
    assert loaded_tok.chat_template == tok.chat_template
    assert loaded_tok(text)["input_ids"] == tok(text)["input_ids"]
