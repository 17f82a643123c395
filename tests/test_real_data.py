"""scripts/check_data.py on the real data in ../shared/data with the real SmolLM2-135M-Instruct tokenizer."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from chatft.demo_model import DEFAULT_MODEL_DIR

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
RUOZHIBA = SHARED / "ruozhiba_qa.json"
ADVERTISE = SHARED / "AdvertiseGen" / "train.json"

pytestmark = pytest.mark.real_model  # ../shared/data and the demo model are prepared: never skipped


def ruozhiba() -> list[dict]:
    return json.loads(RUOZHIBA.read_text(encoding="utf-8"))


def as_format(fmt: str, q: str, a: str) -> dict:
    return {
        "multi-turn": lambda: {
            "conversations": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        },
        "input-output": lambda: {"prompt": q, "response": a},
        "openai": lambda: {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]},
        "sharegpt": lambda: {"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]},
    }[fmt]()


def check_data(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "scripts" / "check_data.py"), "--model", str(DEFAULT_MODEL_DIR), *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)


def test_ruozhiba_alpaca_as_shipped_runs_clean():
    r = check_data("--train_file", str(RUOZHIBA), "--max_seq_length", "512")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "format alpaca (detected)" in r.stdout
    assert "records read: 1475, valid: 1475, invalid: 0" in r.stdout
    assert "Sanity Check >>>>>>>>>>>>>" in r.stdout


@pytest.mark.parametrize("fmt", ["multi-turn", "input-output", "openai", "sharegpt"])
def test_ruozhiba_converted_runs_clean(tmp_path, fmt):
    records = ruozhiba()[:300]
    f = tmp_path / "data.jsonl"
    f.write_text(
        "".join(
            json.dumps(as_format(fmt, r["instruction"], r["output"]), ensure_ascii=False) + "\n"
            for r in records
        )
    )
    r = check_data("--train_file", str(f), "--train_format", fmt)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "records read: 300, valid: 300, invalid: 0" in r.stdout


def test_advertisegen_runs_clean():
    r = check_data("--train_file", str(ADVERTISE))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "format input-output (detected)" in r.stdout
    assert "records read: 960, valid: 960, invalid: 0" in r.stdout


def test_multi_turn_dump_equals_apply_chat_template_token_for_token(tmp_path):
    from transformers import AutoTokenizer

    records = ruozhiba()[:400]
    convs = []
    for i in range(0, len(records), 2):  # two-turn conversations, a system prompt on every other one
        msgs = [{"role": "system", "content": "你是一个认真的助手。"}] if i % 4 == 0 else []
        for r in records[i : i + 2]:
            msgs += [
                {"role": "user", "content": r["instruction"]},
                {"role": "assistant", "content": r["output"]},
            ]
        convs.append(msgs)
    f = tmp_path / "multi.jsonl"
    f.write_text("".join(json.dumps({"conversations": c}, ensure_ascii=False) + "\n" for c in convs))
    dump = tmp_path / "dump.jsonl"
    r = check_data("--train_file", str(f), "--max_seq_length", "100000", "--dump", str(dump))
    assert r.returncode == 0, r.stdout + r.stderr
    rows = [json.loads(line) for line in dump.read_text().splitlines()]
    assert len(rows) == len(convs)
    tok = AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    for row, conv in zip(rows, convs, strict=True):
        assert row["input_ids"] == tok.apply_chat_template(conv, tokenize=True, return_dict=False)
        # exactly the assistant completions and their <|im_end|> are trained
        trained_text = tok.decode(
            [t for t, label in zip(row["input_ids"], row["labels"], strict=True) if label != -100]
        )
        answers = [m["content"] for m in conv if m["role"] == "assistant"]
        assert trained_text == "".join(a + "<|im_end|>" for a in answers)
        assert sum(
            1 for t, label in zip(row["input_ids"], row["labels"], strict=True) if label == im_end
        ) == len(answers)
