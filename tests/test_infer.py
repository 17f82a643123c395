"""inference.py (chatft.inference) and scripts/merge_adapter.py on a tiny Llama with the toy tokenizer, trained for a few
steps by finetune.py's main per method; real_model tests run the real SmolLM2-135M-Instruct on AdvertiseGen."""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from toy import byte_tokenizer, make_tokenizer, save_tiny_model

from chatft.data.schema import Conversation, Message
from chatft.demo_model import DEFAULT_MODEL_DIR
from chatft.inference import cli, evaluation, generation, loading, merge
from chatft.inference.cli import make_parser
from chatft.inference.generation import GenerationOptions, generate, render_prompt
from chatft.inference.loading import load_session
from chatft.training.stages import main as train_main

# peft 0.21 reads the deprecated `is_gradient_checkpointing` of transformers 5
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

ROOT = Path(__file__).resolve().parents[1]
ADVERTISE_DEV = ROOT.parent / "shared" / "data" / "AdvertiseGen" / "dev.json"
QA = [
    ("hi", "hello there !"),
    ("how are you ?", "fine thanks ."),
    ("weather Paris ?", "sunny ."),
    ("bye", "bye bye !"),
]
PROMPTS = [q for q, _ in QA]
HELLO_IDS = make_tokenizer()("hello there !")["input_ids"]
HELLO = make_tokenizer().decode(HELLO_IDS)  # "hello   there   !": the toy decoder joins tokens with spaces


def quiet(_message: str) -> None:
    pass


def openai_record(*turns: str, system: str | None = None) -> dict:
    messages = [{"role": "system", "content": system}] if system else []
    for i, text in enumerate(turns):
        messages.append({"role": "user" if i % 2 == 0 else "assistant", "content": text})
    return {"messages": messages}


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def tiny_model(folder: Path, hidden: int = 64, layers: int = 2) -> Path:
    return save_tiny_model(folder, hidden, layers, max_position_embeddings=256)


@pytest.fixture(scope="module", autouse=True)
def single_thread(one_thread):
    yield


PREFIX_LR = ["--learning_rate", "1e-1"]  # a prefix learns slower than LoRA or full weights
TRAINING = {  # extra finetune.py arguments per run
    "lora": ["--method", "lora"],
    "ptuning": ["--method", "ptuning", "--pre_seq_len", "4", *PREFIX_LR],
    "ptuning-proj": ["--method", "ptuning", "--pre_seq_len", "3", "--prefix_projection", "True", *PREFIX_LR],
    "full": ["--method", "full"],
}


@pytest.fixture(scope="module")
def runs(one_thread, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny base and one training output per method (each also holds its checkpoint-20)."""
    root = tmp_path_factory.mktemp("infer")
    base = tiny_model(root / "tiny")
    data = write_jsonl(root / "data.jsonl", [openai_record(q, a) for q, a in QA])
    out = {"base": base, "data": data, "root": root}
    for name, extra in TRAINING.items():
        folder = root / name
        argv = ["--model_name_or_path", str(base), "--train_file", str(data), "--output_dir", str(folder)]
        argv += ["--max_steps", "20", "--save_steps", "100", "--learning_rate", "1e-2", "--report_to", "none"]
        argv += ["--precision", "fp32"]  # the same on every CPU
        assert train_main(argv + extra) == 0
        assert (folder / "checkpoint-20" / "run_args.json").is_file()
        out[name] = folder
    return out


def greedy_ids(*flags: str) -> list[list[int]]:
    """Greedy new ids (cut before the stop token) for PROMPTS, each alone."""
    session = load_session(make_parser().parse_args(list(flags)), say=quiet)
    options = GenerationOptions(max_new_tokens=6)
    prompts = [render_prompt(session, Conversation([Message("user", q)]))[1] for q in PROMPTS]
    return [generate(session, [p], options)[0] for p in prompts]


# ---------------------------------------------------------------------------------------------------- loading


def test_each_checkpoint_kind_loads_and_its_reloaded_checkpoint_answers_the_same(runs):
    base = greedy_ids("--model", str(runs["base"]))
    assert all(base)  # the untrained model answers something (white space) before any stop token
    for name, flag in [("lora", "--adapter"), ("ptuning", "--pt-checkpoint"), ("ptuning-proj", "--pt-checkpoint"),
                       ("full", "--model")]:  # fmt: skip
        final = greedy_ids(flag, str(runs[name]))
        assert final == greedy_ids(flag, str(runs[name] / "checkpoint-20")), name
        assert final != base, name
    assert greedy_ids("--adapter", str(runs["lora"]))[0][:5] == HELLO_IDS  # it learnt its first answer


def test_ptuning_settings_come_from_the_checkpoint(runs, capsys):
    for name, tokens, projection in [("ptuning", 4, False), ("ptuning-proj", 3, True)]:
        rc = cli.main(["--pt-checkpoint", str(runs[name]), "--prompt", "hi", "--max_new_tokens", "2"])
        assert rc == 0
        err = capsys.readouterr().err
        assert f"base model: {runs['base']} (from {runs[name]}/adapter_config.json)" in err
        assert f"({tokens} prefix tokens, prefix_projection {projection})" in err


def test_prompt_mode_prints_the_answer(runs, capsys):
    assert cli.main(["--adapter", str(runs["lora"]), "--prompt", "hi", "--max_new_tokens", "6"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith(HELLO) and out.endswith("\n") and out.count("\n") == 1
    assert "loaded LoRA adapter" in err and "stops at <|im_end|>;" in err  # ChatML's one end of turn


@pytest.mark.real_model  # the default model folder is prepared by scripts/get_demo_model.sh
def test_default_model_is_announced():
    said = []
    ckpt = loading.resolve_checkpoint(None, say=said.append)
    assert ckpt.model_path == str(DEFAULT_MODEL_DIR) and ckpt.kind == "base"
    assert said == [f"--model not given: using the default model {DEFAULT_MODEL_DIR}"]


def test_template_and_tokenizer_default_to_the_checkpoints(runs, tmp_path):
    adapter = tmp_path / "adapter"
    shutil.copytree(runs["lora"], adapter)
    run_args = json.loads((adapter / "run_args.json").read_text())
    run_args["model"]["template"] = "chatglm3"
    (adapter / "run_args.json").write_text(json.dumps(run_args))
    session = load_session(make_parser().parse_args(["--adapter", str(adapter)]), say=quiet)
    assert session.template.name == "chatglm3"
    assert (
        render_prompt(session, Conversation([Message("user", "hi")]))[0]
        == "[gMASK]sop<|user|>\nhi<|assistant|>"
    )
    session = load_session(
        make_parser().parse_args(["--adapter", str(adapter), "--template", "tokenizer"]), say=quiet
    )
    assert session.template.chat_template is None  # the tokenizer's own (ChatML)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (adapter / name).unlink()
    ckpt = loading.resolve_checkpoint(None, adapter=str(adapter), say=quiet)
    assert ckpt.tokenizer_path == str(runs["base"])


def test_raw_prompts_for_a_checkpoint_trained_on_input_output_data(runs, tmp_path):
    data = write_jsonl(tmp_path / "io.jsonl", [{"prompt": "hi", "response": "hello"}])
    assert loading.trained_on_raw({"data": {"train_format": "auto", "train_file": [str(data)]}})
    assert loading.trained_on_raw({"data": {"train_format": "input-output", "train_file": []}})
    assert not loading.trained_on_raw({"data": {"train_format": "auto", "train_file": [str(runs["data"])]}})
    session = load_session(make_parser().parse_args(["--model", str(runs["base"]), "--raw"]), say=quiet)
    assert render_prompt(session, generation.conversation_for(session, [Message("user", "hi")], "ok")) == (
        "hi",
        [20],
    )


# ---------------------------------------------------------------------------------------------------- merge


def test_merged_lora_answers_as_the_adapter(runs, tmp_path):
    # a base whose generation config lists several ends (as Llama-3, Gemma, Phi-3 do): the merge keeps them
    base = tmp_path / "base"
    shutil.copytree(runs["base"], base)
    config = json.loads((base / "generation_config.json").read_text())
    (base / "generation_config.json").write_text(json.dumps(config | {"eos_token_id": [4, 10]}))
    out = tmp_path / "merged"
    assert merge.merge_main([str(base), str(runs["lora"]), str(out)]) == 0
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "chat_template.jinja",
                 "run_args.json"):  # fmt: skip
        assert (out / name).is_file(), name
    assert not (out / "adapter_config.json").exists()
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [4, 10]
    assert greedy_ids("--model", str(out)) == greedy_ids("--adapter", str(runs["lora"]), "--model", str(base))


def test_stop_tokens_are_the_models_own_the_tokenizers_and_the_templates_ends_of_turn():
    from transformers import GenerationConfig

    from chatft.data.templates import NATIVE_TEMPLATES, get_template

    tok = make_tokenizer()  # eos <|im_end|> (4)
    chatml = get_template(None, tok)
    assert loading.stop_token_ids(tok, chatml) == [4]
    # the model's own list first (Llama-3 lists <|end_of_text|>, <|eom_id|>, <|eot_id|>), none dropped
    assert loading.stop_token_ids(tok, chatml, GenerationConfig(eos_token_id=[2, 7, 4])) == [2, 7, 4]
    assert loading.stop_token_ids(tok, chatml, GenerationConfig(eos_token_id=9)) == [9, 4]
    glm = make_tokenizer(None)  # eos </s> (2); ChatGLM3 turns end at the next role token
    assert loading.stop_token_ids(glm, NATIVE_TEMPLATES["chatglm3"]) == [2, 8, 10]
    assert loading.stop_token_ids(glm, None) == [2]  # raw prompts: EOS
    trained = {"data": {"closing_tokens": {"<|assistant|>": 3, "nope": 1}}}  # what a run's data trained
    assert loading.stop_token_ids(glm, None, None, trained) == [2, 9]


def test_an_end_of_turn_token_of_the_models_generation_config_stops_its_answers(tmp_path):
    """load_session stops where the model's generation_config.json says too (Llama-3 lists several ends of turn),
    not only at the tokenizer's EOS and the template's ends of turn: the token the untrained model says first,
    listed there, cuts every answer before it."""
    model = tiny_model(tmp_path / "tiny")
    before = greedy_ids("--model", str(model))
    stop = before[0][0]
    config = json.loads((model / "generation_config.json").read_text())
    assert config["eos_token_id"] == 4 and stop != 4  # <|im_end|>, ChatML's end of turn and the toy EOS
    (model / "generation_config.json").write_text(json.dumps(config | {"eos_token_id": [4, stop]}))
    assert load_session(make_parser().parse_args(["--model", str(model)]), say=quiet).stop_ids == [4, stop]
    after = greedy_ids("--model", str(model))
    assert after[0] == [] and after == [a[: a.index(stop)] if stop in a else a for a in before]


def test_merge_of_a_ptuning_checkpoint_is_refused(runs, tmp_path, capsys):
    assert merge.merge_main([str(runs["base"]), str(runs["ptuning"]), str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "nothing to merge" in err and "--pt-checkpoint" in err
    assert len(err.splitlines()) == 1 and not (tmp_path / "m").exists()


# ---------------------------------------------------------------------------------------------------- batch prediction


def test_batch_prediction_writes_a_line_per_record_and_left_padding_changes_nothing(runs, tmp_path, capsys):
    chat = write_jsonl(
        tmp_path / "chat.jsonl",
        [openai_record("hi", "hello there !"), "{not json", openai_record("hi", "hello", "how are you ?", "fine thanks .",
         system="ok"), openai_record("weather Paris ?", "sunny .")],
    )  # fmt: skip
    raw = write_jsonl(tmp_path / "io.jsonl", [{"prompt": "how are you ?", "response": "fine"}])
    outputs = {}
    for size in (1, 3):
        out = tmp_path / f"pred{size}.jsonl"
        argv = [
            "--adapter",
            str(runs["lora"]),
            "--input_file",
            str(chat),
            str(raw),
            "--output_file",
            str(out),
        ]
        assert cli.main(argv + ["--batch_size", str(size), "--max_new_tokens", "6"]) == 0
        outputs[size] = [json.loads(line) for line in out.read_text().splitlines()]
        err = capsys.readouterr().err
        assert f"invalid record: {chat}:2: (json): invalid JSON" in err
        assert "4 prediction(s) written" in err and "1 invalid record(s) skipped" in err
    rows = outputs[3]
    assert [list(r) for r in rows] == [list(evaluation.PREDICTION_FIELDS)] * 4
    assert [(r["file"], r["record"]) for r in rows] == [
        (str(chat), 1),
        (str(chat), 3),
        (str(chat), 4),
        (str(raw), 1),
    ]
    assert rows[0]["prompt"] == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert rows[1]["prompt"].startswith("<|im_start|>system\nok<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n")
    assert rows[1]["prompt"].endswith("<|im_start|>user\nhow are you ?<|im_end|>\n<|im_start|>assistant\n")
    assert rows[3]["prompt"] == "how are you ?"  # input-output: raw text, no markup
    assert [r["reference"] for r in rows] == ["hello there !", "fine thanks .", "sunny .", "fine"]
    assert rows[0]["prediction"].startswith(HELLO)
    assert outputs[1] == outputs[3]


def test_a_repetition_penalty_reaches_greedy_decoding_and_a_bad_one_is_refused(runs, capsys):
    """The untrained base repeats one token of its prompt; penalized, its answers take none of their prompts'."""
    answers = {}
    for flags in ([], ["--repetition_penalty", "3"]):
        args = make_parser().parse_args(["--model", str(runs["base"]), "--max_new_tokens", "12", *flags])
        session, options = load_session(args, say=quiet), GenerationOptions.from_args(args)
        assert generation.generation_config(session, options).repetition_penalty == (3.0 if flags else None)
        prompts = [render_prompt(session, Conversation([Message("user", q)]))[1] for q in PROMPTS]
        answers[bool(flags)] = [(set(p), generate(session, [p], options)[0]) for p in prompts]
    assert all(len(set(a)) == 1 and a[0] in p for p, a in answers[False])
    assert all(not set(a) & p for p, a in answers[True])
    assert cli.main(["--model", str(runs["base"]), "--prompt", "hi", "--repetition_penalty", "0"]) == 2
    assert "--repetition_penalty must be positive (1.0: none), got 0.0" in capsys.readouterr().err


def test_ptuning_batches_with_left_padding_answer_as_one_at_a_time(runs, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [openai_record(q, a) for q, a in QA])
    for name in ("ptuning", "ptuning-proj"):
        predictions = []
        for size in ("1", "4"):
            out = tmp_path / f"{name}-{size}.jsonl"
            argv = ["--pt-checkpoint", str(runs[name]), "--input_file", str(data), "--output_file", str(out)]
            assert cli.main(argv + ["--batch_size", size, "--max_new_tokens", "6"]) == 0
            predictions.append([json.loads(line)["prediction"] for line in out.read_text().splitlines()])
        assert predictions[0] == predictions[1] and len(predictions[0]) == 4, name
        assert len(set(predictions[0])) > 1, name  # answers that depend on the prompt


def test_predict_then_eval_writes_the_scores(runs, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", [openai_record(q, a) for q, a in QA])
    out = tmp_path / "p.jsonl"
    argv = ["--adapter", str(runs["lora"]), "--input_file", str(data), "--output_file", str(out), "--eval"]
    assert cli.main(argv + ["--max_new_tokens", "6"]) == 0
    printed = capsys.readouterr().out
    assert all(
        re.search(rf"^  {name} +\d+\.\d{{4}}$", printed, re.M)
        for name in ("rouge-1", "rouge-2", "rouge-l", "bleu-4")
    )
    metrics = json.loads(Path(f"{out}.metrics.json").read_text())
    assert metrics["records"] == 4 and set(metrics["scores"]) == {"rouge-1", "rouge-2", "rouge-l", "bleu-4"}


def test_eval_and_compare_of_prediction_files(tmp_path, capsys):
    def row(i, ref, pred):
        return {
            "file": "d.jsonl",
            "record": i,
            "prompt": f"question {i} " + "x" * 300,
            "reference": ref,
            "prediction": pred,
        }

    base = write_jsonl(tmp_path / "base.jsonl", [row(1, "a b c d", "a b x d"), row(2, "hello", "bye")])
    tuned = write_jsonl(tmp_path / "tuned.jsonl", [row(1, "a b c d", "a b c d"), row(2, "hello", "hello")])
    assert cli.main(["--eval", "--predictions", str(base), "--metrics_file", str(tmp_path / "m.json")]) == 0
    assert "  rouge-1   37.5000" in capsys.readouterr().out  # (75 + 0) / 2
    assert json.loads((tmp_path / "m.json").read_text())["scores"]["rouge-2"] == pytest.approx(33.3333 / 2)

    assert cli.main(["--predictions", str(tuned), "--compare", str(base)]) == 0
    out = capsys.readouterr().out
    assert "[1] d.jsonl:1" in out and "[2] d.jsonl:2" in out
    assert re.search(r"  base +\| a b x d\n  tuned +\| a b c d", out)
    prompt_line = next(line for line in out.splitlines() if line.startswith("  prompt"))
    assert " … " in prompt_line and len(prompt_line) <= 100
    assert re.search(r"rouge-1 +37\.5000 +100\.0000 +\+62\.5000", out)
    saved = json.loads(Path(f"{tuned}.metrics.json").read_text())
    assert saved["scores"]["bleu-4"] == 100.0 and saved["base"]["scores"]["rouge-1"] == 37.5


def test_shorten_keeps_head_and_tail():
    assert evaluation.shorten("a\n b   c", 10) == "a b c"
    assert evaluation.shorten("0123456789" * 3, 13) == "01234 … 56789"
    # a CJK character takes two columns: 4 + 3 + 6
    assert evaluation.shorten("半裙的腰头是借用旗袍的领型为设计", 13) == "半裙 … 为设计"


# ---------------------------------------------------------------------------------------------------- chat


def test_chat_keeps_history_clears_it_and_exits(runs, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\nhow are you ?\nclear\nbye\nexit\nnever read\n"))
    argv = ["--adapter", str(runs["lora"]), "--show_prompt", "--max_new_tokens", "6", "--system", "ok"]
    assert cli.main(argv) == 0
    out, err = capsys.readouterr()
    prompts = re.findall(r"--- prompt ---\n(.*?)\n--- end of prompt ---", err, re.S)
    assert len(prompts) == 3
    first = re.search(r"Assistant: (.*?)( \[cut at 6 tokens\])?\n", out)  # 6 tokens: "hello there !" and more
    first_answer = first.group(1).strip()
    assert first_answer.startswith(HELLO)  # streamed
    assert prompts[1] == (
        f"<|im_start|>system\nok<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n{first_answer}"
        "<|im_end|>\n<|im_start|>user\nhow are you ?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert (
        prompts[2]
        == "<|im_start|>system\nok<|im_end|>\n<|im_start|>user\nbye<|im_end|>\n<|im_start|>assistant\n"
    )
    assert out.count("Assistant: ") == 3 and "(history cleared)" in out and "User: hi\n" in out


def test_tools_are_offered_in_prompt_mode_as_in_training(runs, tmp_path, capsys):
    tools = [{"name": "get_weather", "parameters": {"city": "string"}}]
    path = tmp_path / "tools.json"
    path.write_text(json.dumps(tools))
    argv = ["--adapter", str(runs["lora"]), "--show_prompt", "--max_new_tokens", "2", "--prompt", "hi"]
    assert cli.main([*argv, "--tools", str(path), "--system", "ok"]) == 0
    prompt = re.search(r"--- prompt ---\n(.*?)\n--- end of prompt ---", capsys.readouterr().err, re.S).group(
        1
    )
    tools_text = (
        "Answer the following questions as best as you can. You have access to the following tools:\n"
    )
    tools_text += json.dumps(tools, indent=4)
    assert prompt == (
        f"<|im_start|>system\nok\n\n{tools_text}<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
    for content, expected in [("{not json", "not JSON"), ("{}", "expected a non-empty JSON list")]:
        path.write_text(content)
        assert cli.main([*argv, "--tools", str(path)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: --tools ") and expected in err and "Traceback" not in err


def test_chat_ends_cleanly_at_end_of_input(runs, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n"))
    assert cli.main(["--model", str(runs["base"]), "--max_new_tokens", "2"]) == 0
    assert capsys.readouterr().out.count("Assistant: ") == 1


# ---------------------------------------------------------------------------------------------------- bad input


def _edited_copy(src: Path, dst: Path, **changes) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / "adapter_config.json").read_text())
    (dst / "adapter_config.json").write_text(json.dumps({**config, **changes}))
    return dst


def test_bad_checkpoints_are_one_error_line_and_exit_2(runs, tmp_path, capsys):
    other = tiny_model(tmp_path / "other", hidden=32)  # another base: shapes differ
    deeper = tiny_model(tmp_path / "deeper", layers=3)  # other bases whose shapes fit the adapter
    shallower = tiny_model(tmp_path / "shallower", layers=1)
    wrong_len = _edited_copy(runs["ptuning"], tmp_path / "wrong-len", num_virtual_tokens=6)
    lost_base = _edited_copy(runs["lora"], tmp_path / "lost", base_model_name_or_path=str(tmp_path / "gone"))
    bare_lora, bare_pt = (
        _edited_copy(runs["lora"], tmp_path / "l"),
        _edited_copy(runs["ptuning"], tmp_path / "p"),
    )
    for folder in (
        bare_lora,
        bare_pt,
    ):  # no run_args.json: the base it was trained on is unknown until loading
        (folder / "run_args.json").unlink()
    cases = {
        "missing folder": (["--adapter", str(tmp_path / "nope")], "no such folder"),
        "no adapter_config": (
            ["--adapter", str(runs["base"])],
            "not a peft checkpoint, no adapter_config.json",
        ),
        "lora as pt": (
            ["--pt-checkpoint", str(runs["lora"])],
            "is a LoRA adapter (peft_type LORA): load it with --adapter",
        ),
        "pt as lora": (["--adapter", str(runs["ptuning"])], "is a P-Tuning v2 checkpoint"),
        "adapter as model": (["--model", str(runs["lora"])], "is a peft checkpoint, not a model"),
        "missing model": (["--model", str(tmp_path / "nope")], "no such folder"),
        "base lost": (["--adapter", str(lost_base)], "its base model"),
        "other base": (["--model", str(other), "--adapter", str(runs["lora"])], "not the architecture"),
        "other depth": (
            ["--model", str(deeper), "--pt-checkpoint", str(runs["ptuning"])],
            "num_hidden_layers",
        ),
        "size mismatch": (["--model", str(other), "--adapter", str(bare_lora)], "does not fit"),
        "pt other width": (
            ["--model", str(other), "--pt-checkpoint", str(bare_pt)],
            "token_dim 32, this base needs 16",
        ),
        "pt deeper base": (
            ["--model", str(deeper), "--pt-checkpoint", str(bare_pt)],
            "num_layers 2, this base needs 3",
        ),
        "lora shallower base": (["--model", str(shallower), "--adapter", str(bare_lora)], "does not fit"),
        "wrong pre_seq_len": (
            ["--pt-checkpoint", str(runs["ptuning"]), "--pre_seq_len", "8"],
            "has 4 prefix tokens",
        ),
        "edited pre_seq_len": (["--pt-checkpoint", str(wrong_len)], "size mismatch"),
        "no predictions": (
            ["--eval", "--predictions", str(tmp_path / "nope.jsonl")],
            "no such predictions file",
        ),
    }
    for name, (argv, expected) in cases.items():
        assert (
            cli.main([*argv, "--prompt", "hi", "--max_new_tokens", "2"] if "--eval" not in argv else argv)
            == 2
        ), name
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and err.rstrip().endswith(errors[0]), (name, err)
        assert expected in errors[0] and "Traceback" not in err, (name, errors[0])


# ---------------------------------------------------------------------------------------------------- real model


@pytest.mark.real_model
def test_real_model_batch_prediction_and_eval_on_advertisegen(tmp_path):
    lines = ADVERTISE_DEV.read_text(encoding="utf-8").splitlines()[:4]
    data = tmp_path / "dev4.json"
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "pred.jsonl"
    cmd = [sys.executable, str(ROOT / "inference.py"), "--input_file", str(data), "--output_file", str(out)]
    cmd += ["--max_new_tokens", "16", "--batch_size", "4", "--eval"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"--model not given: using the default model {DEFAULT_MODEL_DIR}" in r.stderr
    assert "chat template: the tokenizer's own;" in r.stderr  # a plain base (no run_args.json)
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 4 and all(list(row) == list(evaluation.PREDICTION_FIELDS) for row in rows)
    records = [json.loads(line) for line in lines]
    assert [row["prompt"] for row in rows] == [rec["content"] for rec in records]  # input-output: raw prompts
    assert [row["reference"] for row in rows] == [rec["summary"] for rec in records]
    assert all(row["prediction"] for row in rows)
    for name in ("rouge-1", "rouge-2", "rouge-l", "bleu-4"):
        assert re.search(rf"^  {name} +\d+\.\d{{4}}$", r.stdout, re.M), r.stdout
    assert set(json.loads(Path(f"{out}.metrics.json").read_text())["scores"]) == {
        "rouge-1",
        "rouge-2",
        "rouge-l",
        "bleu-4",
    }


@pytest.mark.real_model
def test_real_model_chat_through_a_pipe():
    cmd = [sys.executable, str(ROOT / "inference.py"), "--max_new_tokens", "16", "--show_prompt"]
    r = subprocess.run(
        cmd, input="What is 2+2?\nAnd 3+3?\nexit\n", capture_output=True, text=True, cwd=ROOT, timeout=600
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("Assistant: ") == 2
    prompts = re.findall(r"--- prompt ---\n(.*?)\n--- end of prompt ---", r.stderr, re.S)
    assert "What is 2+2?" in prompts[1] and prompts[1].endswith("And 3+3?<|im_end|>\n<|im_start|>assistant\n")


# ---------------------------------------------------------------------------------------------------- cut answers


def test_streamed_pieces_never_hold_half_a_character():
    """A byte-level tokenizer splits 你 into 3 tokens: the pieces hold whole characters only."""
    tok = byte_tokenizer()
    text = "ok 你好，世界！"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == 3 + 6 * 3
    deltas = generation.TextDeltas(tok)
    pieces = [deltas.add([i]) for i in ids]
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)
    assert pieces[3:6] == ["", "", "你"]  # held back until its third byte came
    deltas = generation.TextDeltas(tok)
    assert deltas.add(ids[:5]) == "ok " and deltas.add([]) == ""  # cut after 2 bytes of 你: never sent


def test_chat_and_batch_prediction_cut_by_the_cap_end_on_a_whole_character(
    byte_models, tmp_path, capsys, monkeypatch
):
    tuned = str(byte_models["tuned"])  # answers 你好 with 你好，世界！ (18 byte tokens)
    monkeypatch.setattr(sys, "stdin", io.StringIO("你好\nhi\n"))
    assert cli.main(["--model", tuned, "--max_new_tokens", "5"]) == 0
    out = capsys.readouterr().out
    assert "Assistant: 你 [cut at 5 tokens]\n" in out and "\ufffd" not in out
    assert "Assistant: hello [cut at 5 tokens]\n" in out
    monkeypatch.setattr(sys, "stdin", io.StringIO("你好\n"))
    assert cli.main(["--model", tuned, "--max_new_tokens", "30"]) == 0
    assert "Assistant: 你好，世界！\n" in capsys.readouterr().out  # not cut: no note
    data = write_jsonl(
        tmp_path / "d.jsonl", [openai_record("你好", "你好，世界！"), openai_record("hi", "hello there!")]
    )
    out_file = tmp_path / "p.jsonl"
    argv = [
        "--model",
        tuned,
        "--input_file",
        str(data),
        "--output_file",
        str(out_file),
        "--max_new_tokens",
        "8",
    ]
    assert cli.main(argv) == 0
    predictions = [json.loads(line)["prediction"] for line in out_file.read_text().splitlines()]
    assert predictions == ["你好", "hello th"]


@pytest.mark.real_model
def test_real_tokenizer_pieces_and_cut_answers_hold_whole_characters():
    """SmolLM2's byte-level BPE splits CJK characters over tokens: every cut of an answer decodes to whole
    characters, streamed or not."""
    session = loading.load_tokenizer(str(DEFAULT_MODEL_DIR))
    text = "北京是中国的首都，龙年吉祥！🐉 ok"
    ids = session(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text) - 3  # several characters take more than one token
    split = 0
    for cut in range(1, len(ids) + 1):
        deltas = generation.TextDeltas(session)
        pieces = [deltas.add([i]) for i in ids[:cut]]
        streamed = "".join(pieces)
        assert "\ufffd" not in streamed and text.startswith(streamed), cut
        fake = loading.Session(None, session, None, True, [], "cpu")
        assert generation.decode(fake, ids[:cut]) == streamed.strip(), cut
        split += "\ufffd" in session.decode(ids[:cut])
    assert split >= 3  # the premise: many cuts fall inside a character


def test_chat_template_kwargs_come_from_the_command_line_else_from_the_checkpoint(tmp_path):
    folder = save_tiny_model(tmp_path / "m")
    tok = make_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% if style is defined %}{{ style }} {% endif %}"
        "{% endif %}"
    )
    tok.save_pretrained(folder)
    conv = Conversation([Message("user", "hi")])

    def prompt(*extra: str) -> str:
        session = load_session(make_parser().parse_args(["--model", str(folder), *extra]), say=lambda _: None)
        return render_prompt(session, conv)[0]

    assert prompt().endswith("assistant\n")
    assert prompt("--chat_template_kwargs", '{"style": "brief"}').endswith("assistant\nbrief ")
    (folder / "run_args.json").write_text(json.dumps({"data": {"chat_template_kwargs": {"style": "long"}}}))
    assert prompt().endswith("assistant\nlong ")
    assert prompt("--chat_template_kwargs", '{"style": "brief"}').endswith("assistant\nbrief ")
    with pytest.raises(loading.InferError, match="chat_template_kwargs"):
        prompt("--chat_template_kwargs", "[1]")
