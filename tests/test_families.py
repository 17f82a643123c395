"""The model-family matrix: for every family of tests/families.py (a tiny model of the family's own architecture and
a tokenizer with its special tokens and documented turn layout), chatft's exactness end to end.

Per family: ids equal apply_chat_template; labels are exactly what the model generates after the generation
prompt, through the turn's closing token (literal expectations); a model trained on one conversation generates
that answer and stops at the family's end of turn; LoRA and P-Tuning v2 train and reload; a merged LoRA model
answers as base + adapter; a packed row's logits equal each example's alone (sliding windows and soft-capping
included); conversations a template renders differently once later turns follow are split, each turn trained in
the context it is generated in.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from families import CLOSERS, FAMILIES, SAMPLE_CONVERSATIONS, make_tokenizer, save_family, tiny_model

from chatft.collator import PackedCollator
from chatft.data.schema import Conversation, Message
from chatft.data.templates import IGNORE_INDEX, encode, encode_examples, get_template
from chatft.inference import cli, generation, loading, merge
from chatft.training.stages import main as train_main
from chatft.training.trainer import packed_attention

# peft 0.21 reads the deprecated `is_gradient_checkpointing` of transformers 5
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

X = IGNORE_INDEX

# What each family trains of SAMPLE_CONVERSATIONS[0] (user "hi", assistant "hello there"), [2] (an answer that
# ends in white space, "ok \n") and [3] (one that starts with spaces, "  hi there"): the tokens after the
# generation prompt through the closing token, written from each family's layout.
TRAINED = {
    "smollm2": (["hello", " ", "there", "<|im_end|>"], ["ok", " \n", "<|im_end|>"],
                ["\n  ", "hi", " ", "there", "<|im_end|>"]),
    "llama3": (["hello", " ", "there", "<|eot_id|>"], ["ok", "<|eot_id|>"],  # the template trims content
               ["hi", " ", "there", "<|eot_id|>"]),
    "qwen2.5": (["hello", "Ġthere", "<|im_end|>"], ["ok", "ĠĊ", "<|im_end|>"],
                ["Ġ", "Ġhi", "Ġthere", "<|im_end|>"]),
    # Qwen3 gives the final answer an (empty) think block: the model generates it after the prompt
    "qwen3": (["<think>", "\n\n", "</think>", "\n\n", "hello", " ", "there", "<|im_end|>"],
              ["<think>", "\n\n", "</think>", "\n\n", "ok", " \n", "<|im_end|>"],
              ["<think>", "\n\n", "</think>", "\n\n  ", "hi", " ", "there", "<|im_end|>"]),
    "gemma2": (["hello", " ", "there", "<end_of_turn>"], ["ok", "<end_of_turn>"],
               ["hi", " ", "there", "<end_of_turn>"]),
    "gemma3": (["hello", " ", "there", "<end_of_turn>"], ["ok", "<end_of_turn>"],
               ["hi", " ", "there", "<end_of_turn>"]),
    # Mistral: the answer starts with the space after [/INST]
    "mistral": ([" ", "hello", " ", "there", "</s>"], [" ", "ok", "</s>"], [" ", "hi", " ", "there", "</s>"]),
    # Phi-3: <|assistant|> swallows the white space after it (rstrip): the header stays untrained
    "phi3": (["hello", " ", "there", "<|end|>"], ["ok", " \n", "<|end|>"], ["hi", " ", "there", "<|end|>"]),
    # GLM-4: no closer of its own; the generation prompt is <|assistant|> alone, so the newline is the model's,
    # and an EOS is appended at the end of the conversation
    "glm4": (["\n", "hello", " ", "there", "<|endoftext|>"], ["\n", "ok", " \n", "<|endoftext|>"],
             ["\n  ", "hi", " ", "there", "<|endoftext|>"]),
    "zephyr": (["hello", " ", "there", "</s>"], ["ok", " \n", "</s>"], ["\n  ", "hi", " ", "there", "</s>"]),
}  # fmt: skip

# SAMPLE_CONVERSATIONS[1] (system, two exchanges) is one example per answer with these: Qwen3 drops the think
# block of the first answer once a user turn follows; Mistral v0.3 writes the system text only into a user turn
# that ends the conversation (so no rendering holds it and an answer: the answer follows its generation prompt).
SPLIT = {"qwen3": [1], "mistral": [1]}


def conversation(messages: list[dict]) -> Conversation:
    return Conversation([Message(m["role"], m["content"]) for m in messages])


def encoded(family: str, messages: list[dict]):
    tok = make_tokenizer(family)
    return tok, encode(conversation(messages), tok, get_template(None, tok))


def trained_tokens(tok, e) -> list[str]:
    return [
        tok.convert_ids_to_tokens(t) for t, label in zip(e.input_ids, e.labels, strict=True) if label != X
    ]


def test_the_matrix_covers_every_family():
    assert set(TRAINED) == set(FAMILIES)
    assert {"llama3", "qwen2.5", "qwen3", "gemma2", "gemma3", "mistral", "phi3", "glm4", "zephyr"} <= set(
        FAMILIES
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_ids_are_the_chat_templates_and_labels_what_the_model_generates(family):
    for i, messages in enumerate(SAMPLE_CONVERSATIONS):
        if i in SPLIT.get(family, []):
            each_answer_in_its_own_context(family, messages)
            continue
        tok, e = encoded(family, messages)
        rendered = tok.apply_chat_template(messages, tokenize=True, return_dict=False)
        appended = e.input_ids[len(rendered) :]  # an EOS where no closer of its own ends the conversation
        assert e.input_ids[: len(rendered)] == rendered and appended in ([], [tok.eos_token_id])
        # every trained turn ends with one of the family's closers, and trains it exactly once
        closers = tok.convert_ids_to_tokens(e.closers)
        assert closers and set(closers) <= set(CLOSERS[family])
        assert trained_tokens(tok, e).count(closers[-1]) == closers.count(closers[-1])
    for i, expected in zip((0, 2, 3), TRAINED[family], strict=True):
        tok, e = encoded(family, SAMPLE_CONVERSATIONS[i])
        assert trained_tokens(tok, e) == expected, i


def each_answer_in_its_own_context(family: str, messages: list[dict]) -> None:
    """One example per answer: the generation prompt before it untrained, then exactly what the template renders
    for that answer as the last message (Qwen3's empty think block included; Mistral's space after [/INST])."""
    tok = make_tokenizer(family)
    examples = encode_examples(conversation(messages), tok, get_template(None, tok))
    answers = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    assert [e.turns for e in examples] == [[n + 1] for n in range(len(answers))]
    for e, i in zip(examples, answers, strict=True):
        head = tok.apply_chat_template(messages[:i], add_generation_prompt=True, tokenize=False)
        upto = tok.apply_chat_template(messages[: i + 1], tokenize=False)
        own = upto if upto.startswith(head) else head + " " + messages[i]["content"] + tok.eos_token
        assert e.input_ids == tok(own, add_special_tokens=False)["input_ids"]
        trained = tok.decode([t for t, label in zip(e.input_ids, e.labels, strict=True) if label != X])
        assert head + trained == own.removesuffix("\n")  # ChatML's newline after <|im_end|> is not trained
    assert ("<think>" in tok.decode(examples[0].input_ids)) == (family == "qwen3")


# ---------------------------------------------------------------------------------------------------- training


ANSWERED = SAMPLE_CONVERSATIONS[0]  # user "hi", assistant "hello there"


def write_data(path: Path, copies: int) -> Path:
    path.write_text("".join(json.dumps({"messages": ANSWERED}) + "\n" for _ in range(copies)))
    return path


def train(base: Path, data: Path, out: Path, *extra: str) -> Path:
    argv = ["--model_name_or_path", str(base), "--train_file", str(data), "--output_dir", str(out),
            "--per_device_train_batch_size", "2", "--report_to", "none", "--seed", "0", "--logging_steps", "1",
            "--save_strategy", "no", "--dataloader_num_workers", "0", "--preprocessing_cache", "False",
            "--precision", "fp32", *extra]  # fmt: skip
    assert train_main(argv) == 0
    return out


def session(*flags: str):
    return loading.load_session(cli.make_parser().parse_args(list(flags)), say=lambda _m: None)


def greedy(s, max_new_tokens: int) -> list[int]:
    _, ids = generation.render_prompt(s, conversation(ANSWERED[:1]))
    return generation.generate(s, [ids], generation.GenerationOptions(max_new_tokens=max_new_tokens))[0]


@pytest.fixture(scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models gain nothing from threads on a busy 2-core machine
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_trained_model_says_its_answer_and_stops_at_its_end_of_turn(family, tmp_path, one_thread):
    """Full fine-tuning on one conversation until it is learnt: greedy decoding gives exactly the trained tokens
    and then stops, at the closer the template trains (which must be among the stop tokens)."""
    base = save_family(family, tmp_path / "base")
    out = train(base, write_data(tmp_path / "data.jsonl", 8), tmp_path / "full", "--method", "full",
                "--max_steps", "40", "--learning_rate", "3e-3", "--warmup_steps", "0")  # fmt: skip
    tok, e = encoded(family, ANSWERED)
    answer = [t for t, label in zip(e.input_ids, e.labels, strict=True) if label != X]
    s = session("--model", str(out))
    assert answer[-1] in s.stop_ids
    new = greedy(s, len(answer) + 8)
    assert new == answer[:-1], tok.convert_ids_to_tokens(new)


def prompt_logits(s) -> torch.Tensor:
    """The loaded model's logits over the rendered prompt of ANSWERED."""
    _, ids = generation.render_prompt(s, conversation(ANSWERED[:1]))
    with torch.no_grad():
        return s.model(input_ids=torch.tensor([ids])).logits[0].float()


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_and_ptuning_train_reload_and_merge(family, tmp_path, one_thread):
    """Each method trains (the reloaded model's logits moved away from the base's), and what it saved reloads to
    the same model from the final folder and from its checkpoint; the merged LoRA model equals base + adapter."""
    base = save_family(family, tmp_path / "base")
    data = write_data(tmp_path / "data.jsonl", 4)
    before = prompt_logits(session("--model", str(base)))
    lora = train(base, data, tmp_path / "lora", "--method", "lora", "--max_steps", "4", "--learning_rate", "3e-2",
                 "--save_strategy", "steps", "--save_steps", "4")  # fmt: skip
    adapter = session("--adapter", str(lora))
    tuned = prompt_logits(adapter)
    assert (tuned - before).abs().max() > 1e-2
    torch.testing.assert_close(prompt_logits(session("--adapter", str(lora / "checkpoint-4"))), tuned)
    merged = tmp_path / "merged"
    assert merge.merge_main([str(base), str(lora), str(merged)]) == 0
    merged_session = session("--model", str(merged))
    torch.testing.assert_close(prompt_logits(merged_session), tuned, atol=1e-4, rtol=1e-4)
    assert greedy(merged_session, 6) == greedy(adapter, 6)
    pt = train(base, data, tmp_path / "pt", "--method", "ptuning", "--pre_seq_len", "4", "--max_steps", "4",
               "--learning_rate", "1e-1", "--save_strategy", "steps", "--save_steps", "4")  # fmt: skip
    prefixed = prompt_logits(session("--pt-checkpoint", str(pt)))
    assert (prefixed - before).abs().max() > 1e-2
    torch.testing.assert_close(prompt_logits(session("--pt-checkpoint", str(pt / "checkpoint-4"))), prefixed)


# ---------------------------------------------------------------------------------------------------- packing


@pytest.mark.parametrize("family", FAMILIES)
def test_a_packed_row_gives_each_example_its_own_logits(family, one_thread):
    """Examples of 21, 13 and 6 tokens packed into one row, through the attention training uses: each one's
    logits equal its logits alone (the sliding-window families have a window of 8: rows longer than it;
    Gemma-2 soft-caps its attention logits, for which transformers picks eager attention)."""
    model = tiny_model(family).eval()
    alone = tiny_model(family).eval()  # the model's own attention, one example at a time
    tok = make_tokenizer(family)
    g = torch.Generator().manual_seed(0)
    examples = [
        torch.randint(len(tok.all_special_ids) + 8, len(tok), (n,), generator=g).tolist() for n in (21, 13, 6)
    ]
    attn = packed_attention(model, model.config._attn_implementation, lambda _m: None)
    row = {
        "input_ids": sum(examples, []),
        "labels": sum(examples, []),
        "seq_lens": [len(e) for e in examples],
    }
    batch = PackedCollator.for_backend(tok.pad_token_id or 0, attn)([row])
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "num_examples", "num_tokens")}
    with torch.no_grad():
        packed = model(**inputs, use_cache=False).logits[0]
        start = 0
        for ex in examples:
            own = alone(input_ids=torch.tensor([ex]), use_cache=False).logits[0]
            torch.testing.assert_close(packed[start : start + len(ex)], own, atol=1e-5, rtol=1e-4)
            start += len(ex)


@pytest.mark.parametrize("family", FAMILIES)
def test_labels_tokenize_as_the_tokenizer_call_does(family):
    """chatft.data.labels.token_offsets calls the Rust tokenizer directly where that gives what the tokenizer's call
    gives: on every family's renderings (special tokens, added tokens, byte-level BPE) it does, and with truncation
    set on the Rust tokenizer (which the call turns off) it goes through the call."""
    from chatft.data.labels import _direct, token_offsets

    tok = make_tokenizer(family)
    assert _direct(tok) is not None
    texts = [tok.apply_chat_template(m, tokenize=False) for m in SAMPLE_CONVERSATIONS]
    for text in texts:
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        assert token_offsets(tok, text) == (enc["input_ids"], [tuple(o) for o in enc["offset_mapping"]])
    tok.backend_tokenizer.enable_truncation(3)
    assert _direct(tok) is None
    enc = tok(texts[0], add_special_tokens=False, return_offsets_mapping=True)
    assert len(enc["input_ids"]) > 3
    assert token_offsets(tok, texts[0]) == (enc["input_ids"], enc["offset_mapping"])
