"""--stage grpo: the built-in rewards on literal completions, prompts rendered with the model's own template (literal
ids), a bad reward function located before any step, TRL's group advantages, a rising reward, resume after
SIGKILL."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from killed_run import run_killed
from toy import make_tokenizer, save_tiny_model

from chatft.data.templates import get_template
from chatft.grpo.prompts import prepare_prompts
from chatft.grpo.rewards import (
    accuracy,
    check_rewards,
    checked,
    final_answer,
    format,
    length_reward,
    load_reward,
    tool_call,
)
from chatft.training.plot import reward_keys
from chatft.training.stages import main

WEATHER = json.dumps(
    [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": {
                    "type": "object",
                    "properties": {"city": {"type": "string"}, "days": {"type": "integer"},
                                   "unit": {"enum": ["C", "F"]}},
                    "required": ["city"],
                },
            },
        }
    ]
)  # fmt: skip


@pytest.mark.parametrize(
    ("completion", "reference", "reward"),
    [
        ("so the sum is \\boxed{12}", "12", 1.0),
        ("\\boxed{11} no wait \\boxed{12}", "12", 1.0),  # the last boxed
        ("The answer is: 1,200.", "1200", 1.0),
        ("答案：42", "42", 1.0),
        ("work... #### 7", "#### 7", 1.0),  # GSM8K's form on both sides
        ("3 apples and 4 pears make 7", "7", 1.0),  # a numeric reference: the last number
        ("3 apples and 4 pears make 7 fruits in 2 bags", "7", 0.0),
        ("<think>maybe 6</think>It is 0.5", "1/2", 1.0),  # the reasoning is not the answer; fractions
        ("<think>it is 12</think>13", "12", 0.0),
        ("Paris.", "paris", 1.0),
        ("the capital is Paris", "Paris", 0.0),  # a text reference: the whole text
        ("anything", "", None),  # no reference: no opinion
    ],
)
def test_accuracy(completion, reference, reward):
    assert accuracy([""], [completion], reference=[reference]) == [reward]


def test_final_answer_rules():
    assert final_answer("x \\boxed{\\frac{1}{2}} y") == "\\frac{1}{2}"
    assert final_answer("Answer: 5\nbecause ...") == "5"
    assert final_answer("no number here", numeric=True) == ""


@pytest.mark.parametrize(
    ("completion", "reward"),
    [
        ("<think>3+4 is 7</think>7", 1.0),
        ("3+4 is 7</think>\n\n7", 1.0),  # the generation prompt opened the block
        ("<think></think>7", 0.0),  # no reasoning
        ("<think>3+4</think>  ", 0.0),  # no answer
        ("7", 0.0),
        ("<think>a</think>b</think>c", 0.0),
        ("<think>a<think>b</think>c", 0.0),
    ],
)
def test_format(completion, reward):
    assert format([""], [completion]) == [reward]


@pytest.mark.parametrize(
    ("completion", "reward"),
    [
        ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>', 1.0),
        ('<tool_call>{"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\", \\"days\\": 2}"}</tool_call>', 1.0),
        ('<think>call it</think><tool_call>{"name": "get_weather", "arguments": {"city": "Rome", "unit": "C"}}</tool_call>', 1.0),
        ('<tool_call>{"name": "get_time", "arguments": {"city": "Paris"}}</tool_call>', 0.0),  # not declared
        ('<tool_call>{"name": "get_weather", "arguments": {}}</tool_call>', 0.0),  # city is required
        ('<tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "days": "2"}}</tool_call>', 0.0),
        ('<tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "unit": "K"}}</tool_call>', 0.0),
        ('<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"</tool_call>', 0.0),  # not JSON
        ("It is sunny in Paris.", 0.0),
    ],
)  # fmt: skip
def test_tool_call(completion, reward):
    assert tool_call([""], [completion], tools=[WEATHER]) == [reward]
    assert tool_call([""], [completion], tools=[""]) == [None]  # the record declares no tools


def test_length_and_conversational_completions():
    length = length_reward(8)
    assert length([""] * 3, ["", "", ""], completion_ids=[[], [1, 2], [1] * 8]) == [0.0, -0.25, -1.0]
    assert accuracy([[]], [[{"role": "assistant", "content": "\\boxed{3}"}]], reference=["3"]) == [1.0]


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_user_rewards_are_loaded_and_bad_ones_located(tmp_path):
    good = write(
        tmp_path / "good.py",
        "def short(prompts, completions, **kw):\n    return [-len(c) for c in completions]\n",
    )
    assert load_reward(f"{good}:short", 8)([""], ["abc"]) == [-3]
    raising = write(tmp_path / "bad.py", "def boom(prompts, completions, reference, **kw):\n    return [1 / 0 for c in completions]\n"
                    "def short(prompts, completions, **kw):\n    return [1.0]\n"
                    "def text(prompts, completions, **kw):\n    return ['1'] * len(completions)\n")  # fmt: skip
    row = {"prompt": "p", "prompt_ids": [1], "reference": "7", "tools": "", "file": "d.jsonl", "record": 3}
    for name, message in (
        ("boom", "reward function boom raised ZeroDivisionError: division by zero (first sample on d.jsonl:3: "
                 "completion '7')"),
        ("short", "reward function short returned 1 values for 2 completions"),
        ("text", "reward function text returned '1': each reward must be a finite number or None"),
    ):  # fmt: skip
        with pytest.raises(ValueError) as e:
            check_rewards([checked(load_reward(f"{raising}:{name}", 8))], [row], 8)
        assert message in str(e.value)
    for spec, message in (("nope", "not a built-in"), (f"{tmp_path}/none.py:f", "no such file"),
                          (f"{good}:missing", "has no function missing")):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            load_reward(spec, 8)


def test_prompts_are_the_templates_own_rendering_with_the_answer_as_reference(tmp_path):
    tok = make_tokenizer()
    records = [
        {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "1+1?"},
                      {"role": "assistant", "content": "2"}]},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                      {"role": "user", "content": "2+2?"}]},  # no answer: a prompt without a reference
        {"messages": [{"role": "assistant", "content": "alone"}]},
    ]  # fmt: skip
    data = write(tmp_path / "p.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    prepared = prepare_prompts([data], "auto", tok, get_template(None, tok), None, log=lambda _: None)
    rows = prepared.dataset
    assert rows["reference"] == ["2", ""] and rows["record"] == [1, 2]
    for row, messages in zip(rows, (records[0]["messages"][:2], records[1]["messages"]), strict=True):
        expected = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert row["prompt"] == expected and expected.endswith("<|im_start|>assistant\n")
        assert row["prompt_ids"] == tok(expected, add_special_tokens=False)["input_ids"]
    # <|im_start|> system \n be brief <|im_end|> \n <|im_start|> user \n 1+1? <|im_end|> \n <|im_start|> assistant \n
    assert rows[0]["prompt_ids"] == [3, 16, 11, 0, 13, 0, 4, 11, 3, 17, 11, 0, 0, 0, 33, 4, 11, 3, 18, 11]
    assert [str(p) for p in prepared.problems] == [f"{data}:3: messages: needs at least one user message"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny model and 16 arithmetic prompts with their answers."""
    root = tmp_path_factory.mktemp("grpo")
    save_tiny_model(root / "m")
    records = [{"messages": [{"role": "user", "content": f"{a}+{b}="}, {"role": "assistant", "content": str(a + b)}]}
               for a in range(4) for b in range(4)]  # fmt: skip
    (root / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return root


def argv(setup, out, *extra) -> list[str]:
    return ["--stage", "grpo", "--model_name_or_path", str(setup / "m"), "--train_file", str(setup / "d.jsonl"),
            "--output_dir", str(out), "--report_to", "none", "--precision", "fp32", "--per_device_train_batch_size",
            "4", "--num_generations", "4", "--max_completion_length", "6", "--seed", "3", *extra]  # fmt: skip


def history(out: Path) -> list[dict]:
    return [h for h in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in h]


def test_a_bad_reward_function_stops_the_run_before_training(setup, tmp_path, capsys):
    assert main(argv(setup, tmp_path / "c", "--compile_layers")) == 2
    assert capsys.readouterr().err.startswith("error: --compile_layers is for --stage sft; --stage grpo runs")
    bad = write(tmp_path / "r.py", "def wrong(prompts, completions, **kw):\n    return 1.0\n")
    assert main(argv(setup, tmp_path / "o", "--reward_funcs", f"{bad}:wrong", "--max_steps", "2")) == 2
    err = capsys.readouterr().err
    assert (
        f"error: reward function wrong returned float, not a list of 2 floats (first sample on {setup}/d.jsonl:1"
        in err
    )
    assert not (tmp_path / "o" / "trainer_state.json").exists()


def test_group_advantages_are_trls(setup, tmp_path):
    """TRL's GRPO advantage of a completion: its reward less its group's mean, over the group's std (scale_rewards
    group); one prompt's 4 completions form a group. Checked on the completions of the run's first step."""
    from trl import GRPOTrainer

    seen = {}
    original = GRPOTrainer._generate_and_score_completions

    def spy(self, inputs):
        out = original(self, inputs)
        seen.setdefault("advantages", out["advantages"].clone())
        seen.setdefault("lengths", out["completion_mask"].sum(1).clone())
        seen.setdefault(
            "prompts",
            [
                row[mask.bool()].tolist()
                for row, mask in zip(out["prompt_ids"], out["prompt_mask"], strict=True)
            ],
        )
        seen.setdefault("texts", [x["prompt"] for x in inputs])
        return out

    GRPOTrainer._generate_and_score_completions = spy
    try:
        assert main(argv(setup, tmp_path / "o", "--reward_funcs", "length", "--max_steps", "1")) == 0
    finally:
        GRPOTrainer._generate_and_score_completions = original
    # generation started from chatft's ids of each prompt (chatft.grpo.prompts), not from TRL's own tokenization
    tok = make_tokenizer()
    assert seen["prompts"] == [tok(t, add_special_tokens=False)["input_ids"] for t in seen["texts"]]
    assert all(t.endswith("<|im_start|>assistant\n") for t in seen["texts"])
    rewards = -seen["lengths"].float() / 6
    expected = (rewards - rewards.mean()) / (rewards.std() + 1e-4)
    torch.testing.assert_close(seen["advantages"], expected, atol=1e-5, rtol=1e-4)


def test_a_few_steps_raise_a_deterministic_reward(setup, tmp_path):
    """The length reward (shorter is better) rises within a few steps: the model learns to end its answers."""
    out = tmp_path / "o"
    assert main(argv(setup, out, "--reward_funcs", "length", "--max_steps", "20", "--method", "full",
                     "--learning_rate", "5e-2", "--max_completion_length", "12", "--per_device_train_batch_size", "8",
                     "--num_generations", "8", "--save_strategy", "no")) == 0  # fmt: skip
    rewards = [h["rewards/length/mean"] for h in history(out)]
    assert len(rewards) == 20 and (out / "loss.png").is_file()
    state = json.loads((out / "trainer_state.json").read_text())
    assert ("rewards/length/mean", "length reward") in reward_keys(state["log_history"])  # drawn in loss.png
    assert sum(rewards[-5:]) / 5 > sum(rewards[:5]) / 5 + 0.2, rewards


def test_a_killed_run_resumes_to_the_same_losses_rewards_and_weights(setup, tmp_path):
    from safetensors.torch import load_file

    common = ["--reward_funcs", "length", "accuracy", "--max_steps", "6", "--save_steps", "3",
              "--learning_rate", "1e-2", "--method", "full", "--threads", "1"]  # fmt: skip
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert main(argv(setup, whole, *common)) == 0
    run_killed(4, argv(setup, killed, *common))
    assert sorted(p.name for p in killed.glob("checkpoint-*")) == ["checkpoint-3"]
    assert main(argv(setup, killed, *common, "--resume_from_checkpoint", "auto")) == 0
    a, b = history(whole), history(killed)
    assert [h["step"] for h in a] == [h["step"] for h in b] == list(range(1, 7))
    for key in ("loss", "reward", "rewards/length/mean", "completions/mean_length"):
        assert [h[key] for h in b] == pytest.approx([h[key] for h in a], abs=1e-6), key
    mine, theirs = load_file(whole / "model.safetensors"), load_file(killed / "model.safetensors")
    for k in mine:
        torch.testing.assert_close(theirs[k], mine[k], atol=1e-6, rtol=1e-5)


SPY = """import json, os

def spy(prompts, completions, completion_ids, trainer_state, **kw):
    rewards = [-float(len(ids)) for ids in completion_ids]
    if trainer_state.max_steps:  # not the check before training
        with open(os.environ["SPY"], "a") as f:
            f.write(json.dumps({"rank": int(os.environ.get("RANK", 0)), "step": trainer_state.global_step,
                                "rewards": rewards}) + "\\n")
    return rewards
"""


def test_two_processes_gather_the_rewards_of_a_group(setup, tmp_path):
    """torchrun, 2 CPU processes (gloo): a group of 4 completions of one prompt is generated 2 on each process;
    its advantages use the rewards of all 4 (TRL gathers them), so the logged reward_std is the spread of the 4."""
    import subprocess
    import sys

    from test_train import ROOT, free_port

    spy = write(tmp_path / "spy.py", SPY)
    out, log = tmp_path / "two", tmp_path / "spy.jsonl"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(ROOT / "finetune.py"), *argv(setup, out, "--reward_funcs", f"{spy}:spy", "--max_steps", "2",
                                             "--per_device_train_batch_size", "2", "--save_strategy", "no")]  # fmt: skip
    r = subprocess.run(
        cmd, capture_output=True, text=True, cwd=ROOT, timeout=600, env={**os.environ, "SPY": str(log)}
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    first = [c for c in calls if c["step"] == 0]
    assert sorted(c["rank"] for c in first) == [0, 1] and all(len(c["rewards"]) == 2 for c in first)
    group = torch.tensor([x for c in first for x in c["rewards"]])
    logged = history(out)[0]
    assert logged["reward"] == pytest.approx(group.mean().item(), abs=1e-4)
    assert logged["reward_std"] == pytest.approx(group.std().item(), abs=1e-4)


def test_sample_prompts_show_scored_rollouts_and_leave_training_as_it_was(setup, tmp_path):
    """--sample_prompts in GRPO: each sample prompt's rollouts (num_generations sampled completions) with the
    run's rewards against its reference, in samples.jsonl; sampling them draws from a generator of its own, so
    the run logs the losses and rewards of the same run without them."""
    samples = tmp_path / "s.jsonl"
    samples.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q},
                                                         {"role": "assistant", "content": a}]}) + "\n"
                               for q, a in (("1+1=", "2"), ("2+3=", "5"))))  # fmt: skip
    common = [
        "--reward_funcs",
        "accuracy",
        "length",
        "--max_steps",
        "2",
        "--save_steps",
        "1",
        "--logging_steps",
        "1",
    ]
    plain, sampled = tmp_path / "plain", tmp_path / "sampled"
    assert main(argv(setup, plain, *common)) == 0
    assert main(argv(setup, sampled, *common, "--sample_prompts", str(samples))) == 0
    rows = [json.loads(line) for line in (sampled / "samples.jsonl").read_text().splitlines()]
    assert [(r["step"], r["reference"]) for r in rows] == [(1, "2"), (1, "5"), (2, "2"), (2, "5")]
    for r in rows:
        assert len(r["rollouts"]) == 4  # --num_generations
        assert all(set(x["rewards"]) == {"accuracy", "length"} for x in r["rollouts"])
        assert all(
            x["rewards"]["accuracy"] in (0.0, 1.0) and -1 <= x["rewards"]["length"] <= 0
            for x in r["rollouts"]
        )
        totals = [sum(x["rewards"].values()) for x in r["rollouts"]]
        assert r["mean_reward"] == pytest.approx(sum(totals) / 4)
    assert len({x["completion"] for r in rows for x in r["rollouts"]}) > 1  # sampled, not greedy
    timeless = [
        [{k: v for k, v in h.items() if k != "step_time"} for h in history(o)] for o in (plain, sampled)
    ]
    assert timeless[0] == timeless[1] and timeless[0][1]["entropy"] != timeless[0][0]["entropy"]


# ---------------------------------------------------------------------------------------------- tool-using rollouts

TOOLS_MODULE = """import json, time
def get_weather(city, days=1, unit="C"):
    with open({calls!r}, "a") as f:
        f.write(json.dumps({{"city": city, "days": days}}) + "\\n")
    return {{"city": city, "sky": "sunny"}}
def slow(**kw):
    time.sleep(5)
"""


def test_tool_calls_run_and_their_results_are_never_trained(tmp_path_factory):
    """A rollout on Qwen2.5's layout (tests/families.py): the model calls get_weather (scripted generation), the
    --tool_module function runs with the call's arguments, the result comes back as the template renders a tool
    turn, and the model answers after it; the completion is call + result + answer, and TRL's tool_mask (from
    chatft's env_mask) leaves exactly the result's tokens out of the loss."""
    from families import make_tokenizer as family_tokenizer
    from families import save_family
    from trl import GRPOTrainer

    root = tmp_path_factory.mktemp("tools")
    model = save_family("qwen2.5", root / "m")
    record = {"messages": [{"role": "user", "content": "weather in Paris?"},
                           {"role": "assistant", "content": "sunny"}], "tools": json.loads(WEATHER)}  # fmt: skip
    (root / "d.jsonl").write_text(json.dumps(record) + "\n")
    calls = root / "calls.jsonl"
    (root / "tools.py").write_text(TOOLS_MODULE.format(calls=str(calls)))
    tok = family_tokenizer("qwen2.5")
    end = tok.convert_tokens_to_ids("<|im_end|>")
    call = tok('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
               add_special_tokens=False)["input_ids"] + [end]  # fmt: skip
    answer = tok("It is sunny.", add_special_tokens=False)["input_ids"] + [end]
    scripted, seen = [], {}

    def generate(self, prompt_ids, images, fields, n):
        scripted.append([list(p) for p in prompt_ids])
        return [list(call if len(scripted) == 1 else answer) for _ in prompt_ids], None

    original_generate, original_loss = GRPOTrainer._generate_single_turn, GRPOTrainer.compute_loss

    def loss(self, model, inputs, *args, **kwargs):
        seen.setdefault(
            "inputs", {k: inputs[k].clone() for k in ("completion_ids", "completion_mask", "tool_mask")}
        )
        return original_loss(self, model, inputs, *args, **kwargs)

    GRPOTrainer._generate_single_turn, GRPOTrainer.compute_loss = generate, loss
    try:
        assert main(["--stage", "grpo", "--model_name_or_path", str(model), "--train_file", str(root / "d.jsonl"),
                     "--output_dir", str(root / "o"), "--report_to", "none", "--precision", "fp32",
                     "--per_device_train_batch_size", "2", "--num_generations", "2", "--max_completion_length", "96",
                     "--max_steps", "1", "--save_strategy", "no", "--reward_funcs", "tool_call", "length",
                     "--tool_module", str(root / "tools.py")]) == 0  # fmt: skip
    finally:
        GRPOTrainer._generate_single_turn, GRPOTrainer.compute_loss = original_generate, original_loss
    assert [json.loads(line) for line in calls.read_text().splitlines()] == [{"city": "Paris", "days": 1}] * 2
    result = '{"city": "Paris", "sky": "sunny"}'
    suffix_text = (
        f"\n<|im_start|>user\n<tool_response>\n{result}\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
    )
    suffix = tok(suffix_text, add_special_tokens=False)["input_ids"]
    assert (
        len(scripted) == 2 and scripted[1][0] == scripted[0][0] + call + suffix
    )  # generation went on after it
    inputs = seen["inputs"]
    row = inputs["completion_ids"][0][inputs["completion_mask"][0].bool()].tolist()
    assert row == call + suffix + answer
    mask = inputs["tool_mask"][0][: len(row)].tolist()
    assert mask == [1] * len(call) + [0] * len(suffix) + [1] * len(answer)


def test_tool_calls_errors_are_shown_to_the_model_not_fatal(tmp_path):
    from chatft.grpo.tools import load_tool_module, run_call

    (tmp_path / "t.py").write_text(TOOLS_MODULE.format(calls=str(tmp_path / "c.jsonl")))
    functions = load_tool_module(str(tmp_path / "t.py"))
    assert sorted(functions) == ["get_weather", "slow"]

    def call(name, arguments):
        return {"function": {"name": name, "arguments": json.dumps(arguments)}}

    offered = {"get_weather", "slow"}
    assert (
        run_call(functions, offered, call("get_weather", {"city": "Rome"}), 5)
        == '{"city": "Rome", "sky": "sunny"}'
    )
    assert "is not among the tools" in run_call(functions, {"slow"}, call("get_weather", {"city": "Rome"}), 5)
    assert "TypeError" in run_call(functions, offered, call("get_weather", {"town": "Rome"}), 5)
    assert "TimeoutError: took longer than 0.2 s" in run_call(functions, offered, call("slow", {}), 0.2)


def test_a_declared_tool_without_a_function_stops_the_run(setup, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    record = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}],
              "tools": json.loads(WEATHER)}  # fmt: skip
    data.write_text(json.dumps(record) + "\n")
    (tmp_path / "t.py").write_text("def other(x):\n    return x\n")
    args = argv(setup, tmp_path / "o", "--tool_module", str(tmp_path / "t.py"), "--max_steps", "1")
    args[args.index("--train_file") + 1] = str(data)
    assert main(args) == 2
    assert f"error: {data}:1: tools: get_weather declared, but --tool_module" in capsys.readouterr().err
