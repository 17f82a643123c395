"""The walkthroughs of docs/walkthroughs.md, run as written but reduced (few steps, few records) on the real model and data."""

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from chatft.demo_model import DEFAULT_MODEL_DIR
from chatft.metrics import score

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"

pytestmark = pytest.mark.real_model  # ../shared/data and the demo model are prepared: never skipped


def sh(cmd: str, **env: str) -> str:
    """Run a documented line in bash from the repo root; fail with its output if it fails."""
    r = subprocess.run(
        ["bash", "-c", cmd], cwd=ROOT, capture_output=True, text=True, timeout=900, env={**os.environ, **env}
    )
    assert r.returncode == 0, f"{cmd}\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    return r.stdout


def losses(out: Path) -> list[float]:
    state = json.loads((out / "trainer_state.json").read_text())
    return [e["loss"] for e in state["log_history"] if "loss" in e]


def test_advertisegen_ptuning_predict_and_score(tmp_path):
    data, dev, out = tmp_path / "ad.jsonl", tmp_path / "dev.jsonl", tmp_path / "pt"
    sh(f"python scripts/format_advertise_gen.py --path ../shared/data/AdvertiseGen/train.json --out {data}")
    sh(
        f"python scripts/format_advertise_gen.py --path ../shared/data/AdvertiseGen/dev.json --out {tmp_path / 'd'}"
    )
    sh(f"head -n 3 {tmp_path / 'd'} > {dev}")
    sh(
        "bash scripts/finetune_pt.sh",
        DATASET_PATH=str(data), OUTPUT_DIR=str(out), MAX_STEP="2", DEV_BATCH_SIZE="2", GRAD_ACCUMULATION_STEPS="1",
        PRE_SEQ_LEN="8", MAX_SOURCE_LEN="64", MAX_TARGET_LEN="32",
    )  # fmt: skip
    assert len(losses(out)) == 2 and (out / "adapter_model.safetensors").exists()
    pred = tmp_path / "pred.jsonl"
    stdout = sh(
        f"python inference.py --pt-checkpoint {out} --input_file {dev} --output_file {pred} --max_new_tokens 8 --eval"
    )
    rows = [json.loads(line) for line in pred.read_text().splitlines()]
    references = [json.loads(line)["response"] for line in dev.read_text().splitlines()]
    assert [r["reference"] for r in rows] == references
    assert all(isinstance(r["prediction"], str) and r["prediction"].strip() for r in rows)
    # the printed and saved scores are those of these predictions, as the metric module computes them
    expected = score([r["prediction"] for r in rows], references)
    saved = json.loads(Path(f"{pred}.metrics.json").read_text())
    assert saved["records"] == 3 and saved["scores"] == pytest.approx(expected)
    for name, value in expected.items():
        assert f"{name:<8} {value:8.4f}" in stdout


def test_tool_alpaca_multiturn_ptuning_then_chat(tmp_path):
    data, out = tmp_path / "tool.jsonl", tmp_path / "pt"
    r = subprocess.run(
        ["python", "scripts/format_tool_alpaca.py", "--path", "data/raw/tool_alpaca_sample.json", "--out", str(data)],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert r.returncode == 1 and "written 4, invalid 1" in r.stdout  # the broken sample instance is reported
    sh(
        "bash scripts/finetune_pt_multiturn.sh",
        DATASET_PATH=str(data), OUTPUT_DIR=str(out), MAX_STEP="2", DEV_BATCH_SIZE="2", GRAD_ACCUMULATION_STEPS="1",
        PRE_SEQ_LEN="8", MAX_SEQ_LEN="512",
    )  # fmt: skip
    assert len(losses(out)) == 2
    question = json.loads(data.read_text().splitlines()[0])["conversations"][0]["content"]
    tools = "data/tool_alpaca_tools.json"  # the README's tools file: the first sample record's own tools
    assert json.loads((ROOT / tools).read_text()) == json.loads(data.read_text().splitlines()[0])["tools"]
    answer = sh(
        f"python inference.py --pt-checkpoint {out} --tools {tools} --prompt {json.dumps(question)} "
        "--max_new_tokens 8"
    )
    assert answer.strip()


def test_ruozhiba_quickstart_reduced(tmp_path):
    stdout = sh(
        "bash scripts/quickstart.sh",
        WORK=str(tmp_path / "qs"), STEPS="2", BATCH="2", N_HELDOUT="2", MAX_NEW_TOKENS="8",
    )  # fmt: skip
    assert "read 1475" in stdout and "train 1033, test 442" in stdout
    assert "loss curve:" in stdout and (tmp_path / "qs" / "lora" / "loss.png").exists()
    assert len((tmp_path / "qs" / "tuned.jsonl").read_text().splitlines()) == 2
    # the Sanity Check reads on ruozhiba's Chinese: one line per character, never a lone byte
    check = stdout[stdout.index("Sanity Check >>>") : stdout.index("<<< Sanity Check")]
    assert re.search(r"'[\u4e00-\u9fff]': \d+, \d+(, \d+)? -> ", check) and "\ufffd" not in check
    samples = [
        json.loads(line) for line in (tmp_path / "qs" / "lora" / "samples.jsonl").read_text().splitlines()
    ]
    assert [s["step"] for s in samples] == [2, 2] and "sample answers at step 2:" in stdout


def test_xtuner_openai_messages_with_loss_flags(tmp_path):
    dump = tmp_path / "dump.jsonl"
    sh(f"python scripts/check_data.py --train_file data/openai_messages.jsonl --dump {dump}")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR)
    second = json.loads(dump.read_text().splitlines()[1])  # its first answer has "loss": false
    trained = tok.decode(
        [t for t, label in zip(second["input_ids"], second["labels"], strict=True) if label != -100]
    )
    assert (
        trained
        == "长城是中国古代修建的军事防御工程，东起山海关、西至嘉峪关，绵延数千公里，是世界文化遗产。<|im_end|>"
    )
    sh(
        "bash scripts/finetune_lora.sh",
        DATASET_PATH="data/openai_messages.jsonl", OUTPUT_DIR=str(tmp_path / "lora"), MAX_STEP="2",
        DEV_BATCH_SIZE="2", GRAD_ACCUMULATION_STEPS="1",
    )  # fmt: skip
    assert len(losses(tmp_path / "lora")) == 2


def test_preference_walkthrough_reduced(tmp_path):
    work = tmp_path / "pref"
    stdout = sh(
        "bash scripts/preference_walkthrough.sh",
        WORK=str(work), N_PAIRS="6", N_HELDOUT="4", N_TABLE="2", MAX_NEW_TOKENS="8", SFT_STEPS="2", DPO_STEPS="2",
    )  # fmt: skip
    pairs = [json.loads(line) for line in (work / "pairs.jsonl").read_text().splitlines()]
    base = [json.loads(line) for line in (work / "base_train.jsonl").read_text().splitlines()]
    assert len(base) == 6 and 0 < len(pairs) <= 6
    # chosen = the record's answer, rejected = the base model's own prediction of it
    by_reference = {b["reference"]: b["prediction"] for b in base}
    for p in pairs:
        assert p["rejected"]["content"] == by_reference[p["chosen"]["content"]]
    state = json.loads((work / "dpo" / "trainer_state.json").read_text())
    evals = [e for e in state["log_history"] if "eval_loss" in e]
    assert [e["step"] for e in evals] == [0, 2]  # held-out pairs before and after DPO
    assert state["global_step"] == 2 and all("eval_rewards/margins" in e for e in evals)
    dpo = json.loads((work / "scores_dpo.json").read_text())
    assert dpo["pairs"] == len((work / "heldout_pairs.jsonl").read_text().splitlines())
    assert 0 <= dpo["reward_accuracy"] <= 1 and "rewards (beta 0.1 x log-ratio to the reference)" in stdout
    assert len((work / "dpo_answers.jsonl").read_text().splitlines()) == 2
    assert "walkthrough took" in stdout


def test_grpo_walkthrough_reduced(tmp_path):
    work = tmp_path / "grpo"
    stdout = sh(
        "bash scripts/grpo_walkthrough.sh",
        WORK=str(work), N_TRAIN="16", N_HELDOUT="4", SFT_STEPS="3", GRPO_STEPS="2", GENERATIONS="4",
        MAX_NEW_TOKENS="12",
    )  # fmt: skip
    rewards = json.loads((work / "rewards.json").read_text())
    assert list(rewards) == [str(work / "sft_heldout.jsonl"), str(work / "grpo_heldout.jsonl")]
    assert all(0 <= r["accuracy"] <= 1 for r in rewards.values())
    state = json.loads((work / "grpo" / "trainer_state.json").read_text())
    steps = [e for e in state["log_history"] if "rewards/accuracy/mean" in e]
    assert [e["step"] for e in steps] == [1, 2]
    sft = [json.loads(line) for line in (work / "sft_heldout.jsonl").read_text().splitlines()]
    assert len(sft) == 4 and all(r["prediction"].startswith("Answer:") for r in sft)  # SFT taught the form
    assert "reference 'Answer: " in stdout and "done in" in stdout


def test_reasoning_walkthrough_reduced(tmp_path):
    # two short AdvertiseGen records as both train and dev: a few steps at a high learning rate learn them by heart,
    # so the reasoning adapter writes its think block on the dev records within a few tokens
    rows = [json.loads(line) for line in (SHARED / "AdvertiseGen" / "train.json").read_text().splitlines()]
    rows = sorted(rows, key=lambda r: len(r["content"]) + len(r["summary"]))[:2]
    data = tmp_path / "ag"
    data.mkdir()
    for name in ("train.json", "dev.json"):
        (data / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    work = tmp_path / "rw"
    stdout = sh(
        "bash scripts/reasoning_walkthrough.sh",
        DATA=str(data), WORK=str(work), STEPS="6", BATCH="2", LR="5e-3", N_DEV="2", MAX_NEW_TOKENS="6",
        THINK_TOKENS="24", THINKING_OFF="0",
    )  # fmt: skip
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(work / "model")
    assert "<think>" in tok.chat_template and "enable_thinking" in tok.chat_template
    reasoning = "要点：" + "、".join(dict.fromkeys(p.split("#", 1)[1] for p in rows[0]["content"].split("*")))

    def trained(dump: str) -> str:
        first = json.loads((work / dump).read_text().splitlines()[0])
        return tok.decode(
            [t for t, label in zip(first["input_ids"], first["labels"], strict=True) if label != -100]
        )

    # what the two runs train: the think block with the attributes, or the empty one, then the ad
    ad = rows[0]["summary"] + "<|im_end|>"
    assert trained("train_dump.jsonl") == f"<think>\n{reasoning}\n</think>\n\n{ad}"
    assert trained("train_plain_dump.jsonl") == f"<think>\n\n</think>\n\n{ad}"
    assert "train.jsonl, record 1, trained: '<think>\\n" + reasoning in stdout  # the walkthrough shows it
    for run in ("reasoning", "plain"):
        assert len(losses(work / run)) == 6
    assert losses(work / "reasoning")[-1] < losses(work / "reasoning")[0]

    # the reasoning adapter writes the attributes in its think block; the split keeps them out of the answer
    predicted = [json.loads(line) for line in (work / "reasoning.jsonl").read_text().splitlines()]
    assert len(predicted) == 2
    for row in predicted:
        assert row["prediction"].startswith(f"<think>\n{reasoning}\n</think>\n\n")
        assert row["reasoning"] == row["reference_reasoning"] == reasoning
        assert row["answer"] and "think>" not in row["answer"] and row["answer"] in row["prediction"]
    # the saved scores are the answers', not the whole predictions'
    references = [row["reference"] for row in predicted]
    answers = score([row["answer"] for row in predicted], references)
    saved = json.loads((work / "reasoning.jsonl.metrics.json").read_text())["scores"]
    assert saved == pytest.approx(answers)
    assert saved != pytest.approx(score([row["prediction"] for row in predicted], references))
    plain = [json.loads(line) for line in (work / "plain.jsonl").read_text().splitlines()]
    assert len(plain) == 2 and all(row["reasoning"] == "" and row["answer"] for row in plain)
    # predicted with thinking off: the prompt holds the empty block that run was trained to write
    assert all(row["prompt"].endswith("<think>\n\n</think>\n\n") for row in plain)

    figures = json.loads((work / "scores.json").read_text())
    assert list(figures) == ["base", "reasoning", "plain"]
    assert figures["reasoning"]["with_reasoning"] == 2 and figures["reasoning"]["reasoning_attributes"] == 1.0
    assert (
        figures["reasoning"]["reasoning_exact"] == 1.0 and figures["reasoning"]["listed_not_in_record"] == 0.0
    )
    assert figures["plain"]["with_reasoning"] == 0 and figures["base"]["scores"]
    assert "reasoning attrs" in stdout and "walkthrough took" in stdout
