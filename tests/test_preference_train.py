"""finetune.py --stage dpo|orpo|simpo|kto end to end on a tiny model built from a config and the toy tokenizer
(CPU, seconds each): the reference model, the reward margin, accumulation and kill-and-resume as in SFT."""

import json
from pathlib import Path

import pytest
import torch
from killed_run import run_killed
from reasoning_templates import make_tokenizer as reasoning_tokenizer
from safetensors.torch import load_file
from toy import ids, make_tokenizer, many_chats, save_tiny_model, tiny_llama
from transformers import AutoModelForCausalLM

from chatft.args import ModelArguments
from chatft.methods import load_model
from chatft.preference.encode import prepare_preferences
from chatft.preference.score import batch_logps
from chatft.preference.score import main as score_main
from chatft.training.preference_trainer import make_trainer, stage_arguments, training_columns
from chatft.training.stages import main

ROOT = Path(__file__).resolve().parents[1]
# exact comparisons hold in fp32; --precision auto would pick bf16 on a CPU that multiplies it faster
FP32 = ["--precision", "fp32"]

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning"),
    pytest.mark.usefixtures("one_thread"),
]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("tiny")
    save_tiny_model(d)
    return str(d)


def pairs(n: int, seed: int = 1) -> list[dict]:
    """n pairs of toy chats: chosen = a chat's own answer, rejected = another chat's answer."""
    chats, others = many_chats(n, seed=seed), many_chats(n, seed=seed + 100)
    out = []
    for chat, other in zip(chats, others, strict=True):
        out.append(
            {
                "messages": [{"role": r, "content": c} for r, c in chat[:-1]],
                "chosen": {"role": "assistant", "content": chat[-1][1]},
                "rejected": {"role": "assistant", "content": other[-1][1]},
            }
        )
    return out


def write_pairs(path: Path, n: int) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in pairs(n)))
    return str(path)


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory) -> str:
    return write_pairs(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", 12)


def run(tiny_model, data_file, out, *extra) -> int:
    argv = [
        "--stage", "dpo", "--model_name_or_path", tiny_model, "--train_file", data_file, "--output_dir", str(out),
        "--per_device_train_batch_size", "4", "--learning_rate", "1e-2", "--logging_steps", "1",
        "--report_to", "none", "--seed", "42", "--dataloader_num_workers", "0", *FP32, *extra,
    ]  # fmt: skip
    return main(argv)


def history(out) -> list[dict]:
    return json.loads((Path(out) / "trainer_state.json").read_text())["log_history"]


def logged(out, key: str = "loss") -> dict[int, float]:
    return {e["step"]: e[key] for e in history(out) if key in e}


def test_a_new_adapters_reference_is_the_base_with_the_adapter_disabled(tiny_model, pairs_file, tmp_path):
    """The log-probabilities the DPO trainer takes as the reference equal those of the base model loaded on its
    own, while the adapter (moved away from zero here) gives others: no copy of the adapter stands in for it."""
    args = stage_arguments("dpo")(output_dir=str(tmp_path), report_to="none", per_device_train_batch_size=4)
    model = load_model(ModelArguments(model_name_or_path=tiny_model, stage="dpo"), args)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    tok = make_tokenizer()
    prepared = prepare_preferences([pairs_file], "auto", tok, None, log=lambda _m: None)
    trainer = make_trainer(
        "dpo", model=model, args=args, train_dataset=training_columns(prepared, "dpo"), processing_class=tok
    )
    assert list(model.peft_config) == ["default"]
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    ref_chosen, ref_rejected = trainer.compute_ref_log_probs(trainer.model, batch)
    base = batch_logps(AutoModelForCausalLM.from_pretrained(tiny_model), batch)
    torch.testing.assert_close(torch.cat([ref_chosen, ref_rejected]), base, atol=1e-4, rtol=1e-5)
    assert not torch.allclose(batch_logps(model, batch), base, atol=1e-2)


def test_a_few_dpo_steps_raise_the_reward_margin_and_accuracy(tiny_model, pairs_file, tmp_path):
    out = tmp_path / "out"
    code = run(tiny_model, pairs_file, out, "--max_steps", "12", "--eval_file", pairs_file, "--eval_steps", "12",
               "--eval_on_start", "True", "--save_strategy", "no", "--beta", "0.5",
               "--per_device_eval_batch_size", "12")  # fmt: skip
    assert code == 0
    evals = [e for e in history(out) if "eval_rewards/margins" in e]
    before, after = evals[0], evals[-1]
    assert before["step"] == 0 and after["step"] == 12
    # at the start the policy is its reference: every reward is 0
    assert before["eval_rewards/margins"] == 0 and before["eval_rewards/accuracies"] == 0
    assert after["eval_rewards/margins"] > 1.0 and after["eval_rewards/accuracies"] >= 0.75
    assert after["eval_loss"] < before["eval_loss"] - 0.2
    train = [e for e in history(out) if "loss" in e]
    assert all(
        k in train[0] for k in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")
    )
    assert (out / "loss.png").stat().st_size > 1000
    # score_pairs.py, against the base as the reference, gives TRL's figures (one eval batch: the same means)
    scores = tmp_path / "scores.json"
    argv = ["--pairs", pairs_file, "--adapter", str(out), "--reference_model", tiny_model, "--beta", "0.5"]
    assert score_main([*argv, "--output", str(scores)]) == 0
    figures = json.loads(scores.read_text())
    assert figures["reward_margin"] == pytest.approx(after["eval_rewards/margins"], abs=1e-4)
    assert figures["reward_accuracy"] == pytest.approx(after["eval_rewards/accuracies"])
    assert figures["logp_chosen"] == pytest.approx(after["eval_logps/chosen"], abs=1e-3)
    assert figures["pairs"] == 12 and figures["preference_accuracy"] > 0.5


@pytest.fixture(scope="module")
def eleven_pairs(tmp_path_factory) -> str:
    """11 pairs in steps of 4: every epoch ends with a step of 3, which a micro-batch of 2 splits as 2 + 1."""
    return write_pairs(tmp_path_factory.mktemp("eleven") / "pairs.jsonl", 11)


def test_any_split_of_a_step_logs_the_same_losses_and_trains_the_same_weights(
    tiny_model, eleven_pairs, tmp_path, capsys
):
    """A step of 4 pairs as 4 x 1 and 2 x 2 (--gradient_accumulation_steps) and 1 x 4 (chatft's --micro_batch_size
    split). Pinned by --micro_batch_size: left to it, the CPU planner would run every one of them as 1 x 4."""
    splits = [("4", "1", "4", "none, a step's 4 rows in one forward pass"),
              ("2", "2", "2", "none, a step's 2 rows in one forward pass"),
              ("4", "1", "1", "a step's 4 rows per process run as 4 forward passes of 1")]  # fmt: skip
    results = []
    for batch, accumulation, micro, planned in splits:
        out = tmp_path / f"b{batch}x{accumulation}m{micro}"
        argv = ["--max_steps", "5", "--save_strategy", "no", "--per_device_train_batch_size", batch,
                "--gradient_accumulation_steps", accumulation, "--micro_batch_size", micro]  # fmt: skip
        assert run(tiny_model, eleven_pairs, out, *argv) == 0
        assert f"micro-batches: {planned}" in capsys.readouterr().out
        state = json.loads((out / "trainer_state.json").read_text())
        assert state["train_batch_size"] == int(micro)  # the pairs of one forward pass, as it ran
        results.append((logged(out), load_file(str(out / "adapter_model.safetensors"))))
    (losses, weights), others = results[0], results[1:]
    assert sorted(losses) == [1, 2, 3, 4, 5] and len(set(losses.values())) == 5
    for other_losses, other_weights in others:
        assert other_losses == pytest.approx(losses, abs=1e-5)
        for k in weights:
            torch.testing.assert_close(other_weights[k], weights[k], atol=1e-5, rtol=1e-4)


def test_a_killed_dpo_run_resumes_to_the_same_losses_and_weights(tiny_model, pairs_file, tmp_path, capsys):
    """SIGKILLed at step 5 (checkpoint-4 on disk), resumed with --resume_from_checkpoint auto: the same losses and
    adapter as an uninterrupted run, across an epoch (12 pairs: 3 steps of 4)."""
    common = ["--max_steps", "8", "--save_steps", "4", "--warmup_steps", "2", "--threads", "1"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert run(tiny_model, pairs_file, whole, *common) == 0
    argv = ["--stage", "dpo", "--model_name_or_path", tiny_model, "--train_file", pairs_file, "--output_dir",
            str(killed), "--per_device_train_batch_size", "4", "--learning_rate", "1e-2", "--logging_steps", "1",
            "--report_to", "none", "--seed", "42", "--dataloader_num_workers", "0", *FP32, *common]  # fmt: skip
    run_killed(5, argv)
    assert sorted(p.name for p in killed.glob("checkpoint-*")) == ["checkpoint-4"]
    capsys.readouterr()
    assert main([*argv, "--resume_from_checkpoint", "auto"]) == 0
    printed = capsys.readouterr().out
    # it went on from step 4: only steps 5-8 were trained (and logged) by this run
    assert f"resuming from {killed / 'checkpoint-4'}" in printed and printed.count("'loss':") == 4
    a, b = logged(whole), logged(killed)
    assert sorted(a) == sorted(b) == list(range(1, 9))
    assert b == pytest.approx(a, abs=1e-5)
    assert logged(killed, "rewards/margins") == pytest.approx(logged(whole, "rewards/margins"), abs=1e-5)
    mine = load_file(str(whole / "adapter_model.safetensors"))
    theirs = load_file(str(killed / "adapter_model.safetensors"))
    for k in mine:
        torch.testing.assert_close(theirs[k], mine[k], atol=1e-5, rtol=1e-4)


def test_orpo_and_simpo_get_the_same_ids_in_trls_older_layout(tmp_path):
    record = {"messages": [{"role": "user", "content": "hi"}], "chosen": {"role": "assistant", "content": "hello"},
              "rejected": {"role": "assistant", "content": "bye"}}  # fmt: skip
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(record) + "\n")
    prepared = prepare_preferences([str(path)], "auto", make_tokenizer(), None, log=lambda _m: None)
    prompt = ids("<|im_start|>", "user", "\n", "hi", "<|im_end|>", "\n", "<|im_start|>", "assistant", "\n")
    X = -100
    assert training_columns(prepared, "simpo").to_list() == [{
        "prompt_input_ids": prompt, "prompt_attention_mask": [1] * 9,
        "chosen_input_ids": prompt + ids("hello", "<|im_end|>"), "chosen_attention_mask": [1] * 11,
        "chosen_labels": [X] * 9 + ids("hello", "<|im_end|>"),
        "rejected_input_ids": prompt + ids("bye", "<|im_end|>"), "rejected_attention_mask": [1] * 11,
        "rejected_labels": [X] * 9 + ids("bye", "<|im_end|>"),
    }]  # fmt: skip
    assert training_columns(prepared, "dpo").to_list() == [
        {
            "prompt_ids": prompt,
            "chosen_ids": ids("hello", "<|im_end|>"),
            "rejected_ids": ids("bye", "<|im_end|>"),
        }
    ]


@pytest.mark.parametrize(
    "stage,extra,reference",
    [
        ("kto", [], True),
        ("orpo", [], False),
        ("simpo", [], False),
        ("dpo", ["--method", "qlora"], True),
    ],
)
def test_each_stage_and_method_trains_and_saves(tiny_model, pairs_file, tmp_path, stage, extra, reference):
    out = tmp_path / "out"
    assert (
        run(tiny_model, pairs_file, out, "--stage", stage, "--max_steps", "3", "--save_steps", "2", *extra)
        == 0
    )
    assert sorted(logged(out)) == [1, 2, 3]
    margins = logged(out, "rewards/margins")
    assert sorted(margins) == [1, 2, 3]
    if reference:  # the first step's policy is its reference
        assert margins[1] == 0
    run_args = json.loads((out / "run_args.json").read_text())
    assert run_args["model"]["stage"] == stage and (out / "checkpoint-2" / "run_args.json").is_file()
    assert (out / "loss.png").is_file() and (out / "tokenizer.json").is_file()
    adapter = load_file(str(out / "adapter_model.safetensors"))
    assert all(v.dtype == torch.float32 for v in adapter.values())  # QLoRA's too (TRL would make it bfloat16)
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in adapter.items() if "lora_B" in k)


def test_full_training_with_a_reference_copy_or_precomputed_log_probs_is_the_same(
    tiny_model, pairs_file, tmp_path
):
    common = ["--method", "full", "--max_steps", "3", "--save_strategy", "no", "--learning_rate", "1e-3"]
    assert run(tiny_model, pairs_file, tmp_path / "copy", *common) == 0
    assert run(tiny_model, pairs_file, tmp_path / "pre", *common, "--precompute_ref_log_probs", "True") == 0
    assert logged(tmp_path / "pre") == pytest.approx(logged(tmp_path / "copy"), abs=1e-6)
    margins = logged(tmp_path / "copy", "rewards/margins")
    assert margins[1] == 0 and margins[3] != 0
    trained = load_file(str(tmp_path / "copy" / "model.safetensors"))
    base = load_file(str(Path(tiny_model) / "model.safetensors"))
    assert any(not torch.equal(trained[k], base[k]) for k in base)


def test_dpo_goes_on_training_an_sft_adapter_against_that_adapter(tiny_model, pairs_file, tmp_path, capsys):
    sft_data = tmp_path / "sft.jsonl"
    sft_data.write_text(
        "".join(
            json.dumps({"messages": [{"role": r, "content": c} for r, c in chat]}) + "\n"
            for chat in many_chats(8)
        )
    )
    sft = tmp_path / "sft"
    argv = ["--model_name_or_path", tiny_model, "--train_file", str(sft_data), "--output_dir", str(sft),
            "--max_steps", "3", "--learning_rate", "1e-2", "--report_to", "none", "--lora_rank", "4"]  # fmt: skip
    assert main(argv) == 0
    out = tmp_path / "dpo"
    argv = ["--stage", "dpo", "--adapter", str(sft), "--train_file", pairs_file, "--output_dir", str(out),
            "--max_steps", "3", "--per_device_train_batch_size", "4", "--learning_rate", "1e-2", "--logging_steps",
            "1", "--report_to", "none", "--save_strategy", "no", *FP32]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert f"base model: {tiny_model} (from {sft / 'adapter_config.json'})" in printed
    assert f"reference model: the adapter {sft} as loaded" in printed
    # the reference is the SFT adapter, not the base: the first step's margin is 0
    assert logged(out, "rewards/margins")[1] == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["base_model_name_or_path"] == tiny_model  # the SFT adapter's own
    start, ref = (
        load_file(str(sft / "adapter_model.safetensors")),
        load_file(str(out / "ref" / "adapter_model.safetensors")),
    )
    trained = load_file(str(out / "adapter_model.safetensors"))
    assert start.keys() == ref.keys() == trained.keys()
    assert all(torch.equal(start[k], ref[k]) for k in start)
    assert any(not torch.equal(start[k], trained[k]) for k in start)


def test_bad_input_is_one_error_line_or_located_records(tiny_model, pairs_file, tmp_path, capsys):
    tokenizer_only = tmp_path / "tok"  # no weights: reaching the model load would fail differently
    make_tokenizer().save_pretrained(tokenizer_only)
    bad = ROOT / "data" / "preference" / "bad_records.jsonl"
    assert run(str(tokenizer_only), str(bad), tmp_path / "o") == 1
    captured = capsys.readouterr()
    assert (
        f"{bad}:3: rejected: identical to chosen" in captured.out
        and f"{bad}:9: label: must be a bool" in captured.out
    )
    assert "--skip_invalid_records" in captured.err and "trainable params" not in captured.out
    kto_only = tmp_path / "kto.jsonl"
    kto_only.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                                  {"role": "assistant", "content": "ok"}], "label": True}) + "\n")  # fmt: skip
    assert run(str(tokenizer_only), str(kto_only), tmp_path / "o") == 1
    assert f"{kto_only}:1: rejected: missing: this stage needs pairs" in capsys.readouterr().out
    for extra, message in (
        (["--method", "ptuning"], "error: --stage dpo trains full, lora or qlora"),
        (["--max_target_length", "9"], "error: --max_target_length does not apply to preference data"),
        (
            ["--compile_layers"],
            "error: --compile_layers is for --stage sft; --stage dpo runs its layers eagerly",
        ),
        (
            ["--adapter", str(tmp_path / "nowhere")],
            f"error: --adapter {tmp_path / 'nowhere'}: not a peft adapter",
        ),
    ):
        assert run(tiny_model, pairs_file, tmp_path / "o", *extra) == 2
        err = capsys.readouterr().err
        assert err.startswith(message) and "Traceback" not in err
    with pytest.raises(SystemExit) as e:
        main(["--stage", "ppo", "--train_file", pairs_file])
    assert e.value.code == 2


def test_chat_template_kwargs_reach_the_pairs(tmp_path, capsys):
    tokenizer_only = tmp_path / "tok"  # no weights: the data is prepared and reported before the model loads
    reasoning_tokenizer("qwen3").save_pretrained(tokenizer_only)
    data = tmp_path / "p.json"
    data.write_text(
        json.dumps([{"instruction": "hi", "chosen": "<think>\nso\n</think>\n\nhello", "rejected": "ok"}])
    )
    kwargs = ["--chat_template_kwargs", '{"enable_thinking": false}']  # a prompt that closes the think block
    assert run(str(tokenizer_only), str(data), tmp_path / "o", *kwargs) == 1
    assert (
        f"{data}:1: (template): the chat template's generation prompt for turn 2 (chat_template_kwargs "
        in (capsys.readouterr().out)
    )


def test_pairs_with_reasoning_and_white_space_led_replies_train(tiny_model, tmp_path):
    """Pairs that were refused before the shared prompt ended at the last token both sequences share: a
    DeepSeek-R1-style reply with no reasoning joins the prompt's opened think block, and a reply starting with
    spaces joins ChatML's header (tests/test_preference_data.py has their ids)."""
    tok = reasoning_tokenizer("deepseek_r1")
    folder = tmp_path / "r1"
    special = {
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
    }
    tiny_llama(len(tok), **special).save_pretrained(folder)
    tok.save_pretrained(folder)
    thinking = [{"instruction": q, "chosen": f"<think>\nso say {a}\n</think>\n\n{a}", "rejected": "ok"}
                for q, a in [("hi", "hello"), ("bye", "bye"), ("how are you", "fine"), ("thanks", "ok !")]]  # fmt: skip
    spaced = [
        {"instruction": q, "chosen": f"  {a}", "rejected": "bye"}
        for q, a in [("hi", "hello"), ("weather", "sunny")]
    ]
    for model, records in ((str(folder), thinking), (tiny_model, spaced * 2)):
        data = tmp_path / "pairs.json"
        data.write_text(json.dumps(records))
        out = tmp_path / f"out-{len(records)}"
        assert run(model, str(data), out, "--max_steps", "2", "--save_strategy", "no") == 0
        assert sorted(logged(out)) == [1, 2]


def test_help_of_a_stage_shows_its_knobs(capsys):
    with pytest.raises(SystemExit):
        main(["--stage", "simpo", "--help"])
    text = capsys.readouterr().out
    assert "preference tuning (--stage simpo):" in text
    for name in ("--adapter", "--beta", "--simpo_gamma", "--cpo_alpha", "--loss_type"):
        assert f"\n  {name} " in text, name
    assert "(default: simpo)" in text and "(default: 0.0)" in text


def test_sample_prompts_are_answered_while_preference_tuning(tiny_model, pairs_file, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("hi\nhow are you?\n")
    out = tmp_path / "o"
    assert run(tiny_model, pairs_file, out, "--stage", "dpo", "--max_steps", "2", "--save_steps", "1",
               "--sample_prompts", str(prompts), "--sample_max_new_tokens", "4") == 0  # fmt: skip
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [(r["step"], r["prompt"]) for r in rows] == [
        (1, "hi"),
        (1, "how are you?"),
        (2, "hi"),
        (2, "how are you?"),
    ]
    assert "sample answers at step 2:" in capsys.readouterr().out
