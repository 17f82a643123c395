"""finetune.py end to end on a tiny model built from a config and the toy tokenizer (CPU, seconds each)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from killed_run import run_killed
from safetensors.torch import load_file
from toy import CHATS, make_tokenizer, many_chats, openai_jsonl, save_tiny_model
from transformers import AutoModelForCausalLM

from chatft.training.command_line import parse_args
from chatft.training.stages import main
from chatft.training.step_plan import plan_micro_batches, sync_deepspeed_batch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("tiny")
    save_tiny_model(d)
    return str(d)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> str:
    f = tmp_path_factory.mktemp("data") / "chats.jsonl"
    f.write_text(openai_jsonl(CHATS))
    return str(f)


# exact comparisons hold in fp32; --precision auto would pick bf16 on a CPU that multiplies it faster
FP32 = ["--precision", "fp32"]


def run(tiny_model, data_file, out, *extra) -> int:
    argv = [
        "--model_name_or_path", tiny_model, "--train_file", data_file, "--output_dir", str(out),
        "--per_device_train_batch_size", "2", "--learning_rate", "1e-2", "--logging_steps", "1",
        "--report_to", "none", "--seed", "42", "--dataloader_num_workers", "0", *FP32, *extra,
    ]  # fmt: skip
    return main(argv)


def logged_losses(out) -> dict[int, float]:
    state = json.loads((Path(out) / "trainer_state.json").read_text())
    return {e["step"]: e["loss"] for e in state["log_history"] if "loss" in e}


def tensors(path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


@pytest.mark.parametrize(
    "method,extra",
    [
        ("full", []),
        ("lora", []),
        ("qlora", []),
        ("ptuning", ["--pre_seq_len", "4"]),
        ("ptuning", ["--pre_seq_len", "4", "--prefix_projection", "True"]),
    ],
)
def test_method_end_to_end(tiny_model, data_file, tmp_path, method, extra):
    out = tmp_path / "out"
    assert (
        run(tiny_model, data_file, out, "--method", method, "--max_steps", "3", "--save_steps", "2", *extra)
        == 0
    )
    losses = logged_losses(out)
    assert sorted(losses) == [1, 2, 3] and all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    for folder in (out, out / "checkpoint-2"):
        assert (folder / "run_args.json").exists() and (folder / "tokenizer.json").exists()
    assert (out / "loss.png").stat().st_size > 1000
    run_args = json.loads((out / "run_args.json").read_text())
    assert run_args["model"]["method"] == method

    base = tensors(Path(tiny_model) / "model.safetensors")
    if method == "full":
        trained = tensors(out / "model.safetensors")
        assert trained.keys() == base.keys()
        assert all(not torch.equal(trained[k], base[k]) for k in base if "norm" not in k)
        reloaded = AutoModelForCausalLM.from_pretrained(out)
        assert reloaded.config.use_cache
        assert json.loads((out / "checkpoint-2" / "config.json").read_text())["use_cache"] is True
        return
    # peft methods: the checkpoint is the adapter or prefix alone, far smaller than the base model
    assert not (out / "model.safetensors").exists()
    adapter = out / "adapter_model.safetensors"
    assert adapter.stat().st_size < (Path(tiny_model) / "model.safetensors").stat().st_size / 4
    final, earlier = tensors(adapter), tensors(out / "checkpoint-2" / "adapter_model.safetensors")
    assert final.keys() == earlier.keys() and all(not torch.equal(final[k], earlier[k]) for k in final)
    config = json.loads((out / "adapter_config.json").read_text())
    if method == "ptuning":
        assert config["peft_type"] == "PREFIX_TUNING" and config["num_virtual_tokens"] == 4
    else:
        assert config["peft_type"] == "LORA"
        assert all(not torch.equal(v, torch.zeros_like(v)) for k, v in final.items() if "lora_B" in k)

    from peft import PeftModel

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), out)
    ids = torch.tensor([[3, 17, 11, 20, 4]])
    assert torch.isfinite(model(input_ids=ids).logits).all()


@pytest.fixture(scope="module")
def many_file(tmp_path_factory) -> str:
    """24 chats of 16-80 tokens: with --max_seq_length 96, 10 packed rows of 2.4 examples (a batch of 10 examples
    is 4 rows: 3 steps an epoch, the last one filled with 2 empty rows), or 6 padded batches of 4, so 5 steps
    cross an epoch boundary either way."""
    f = tmp_path_factory.mktemp("many") / "many.jsonl"
    f.write_text(openai_jsonl(many_chats(24)))
    return str(f)


SPLITS = [("4", "1"), ("2", "2"), ("1", "4")]  # per-device batch x accumulation: one step of 4
# packed, the splits are of rows (--packed_batch_unit rows): counted in examples, every split of 4 examples becomes
# the same row a step (test_a_packed_batch_counts_examples; micro-batches of those rows: tests/test_machine.py)


@pytest.mark.parametrize("packing", ["True", "False"])
def test_any_split_of_a_step_logs_the_same_losses_and_trains_the_same_weights(
    tiny_model, many_file, tmp_path, capsys, packing
):
    common = ["--method", "full", "--max_steps", "5", "--max_seq_length", "96", "--packing", packing,
              "--packed_batch_unit", "rows", "--learning_rate", "1e-3", "--save_strategy", "no"]  # fmt: skip
    results = []
    for batch, accumulation in SPLITS:
        out = tmp_path / f"b{batch}x{accumulation}"
        argv = [
            *common,
            "--per_device_train_batch_size",
            batch,
            "--gradient_accumulation_steps",
            accumulation,
        ]
        assert run(tiny_model, many_file, out, *argv) == 0
        results.append((logged_losses(out), tensors(out / "model.safetensors")))
    log = capsys.readouterr().out
    if packing == "True":
        assert "packing: 24 examples into 10 rows" in log  # several rows; 5 steps of 4 cross an epoch
    (losses, weights), others = results[0], results[1:]
    assert sorted(losses) == [1, 2, 3, 4, 5] and len(set(losses.values())) == 5
    base = tensors(Path(tiny_model) / "model.safetensors")
    assert all(not torch.equal(weights[k], base[k]) for k in base if "norm" not in k)
    for other_losses, other_weights in others:
        assert other_losses == pytest.approx(losses, abs=1e-5)
        for k in weights:
            torch.testing.assert_close(other_weights[k], weights[k], atol=1e-5, rtol=1e-4)


# per method: extra arguments, with a batch that makes an epoch 3 steps of many_file (packed: 10 examples a step
# are 4 rows, 10 rows and 2 empty ones; P-Tuning pads: 24 examples in steps of 8), so a kill at step 5 resumes
# inside epoch 2
RESUMED = {
    "lora-dropout": ["--method", "lora", "--lora_dropout", "0.1", "--per_device_train_batch_size", "10"],
    "full": ["--method", "full", "--per_device_train_batch_size", "10"],
    "ptuning": ["--method", "ptuning", "--pre_seq_len", "4", "--per_device_train_batch_size", "8"],
    "ptuning-projection": ["--method", "ptuning", "--pre_seq_len", "4", "--prefix_projection", "True",
                           "--per_device_train_batch_size", "8"],
}  # fmt: skip


@pytest.mark.parametrize("method", list(RESUMED))
def test_a_killed_run_resumes_to_the_same_losses_and_weights(tiny_model, many_file, tmp_path, method):
    """A real training process SIGKILLed at step 5 (checkpoint-4 on disk, step 5 done but not saved) and resumed
    with --resume_from_checkpoint auto logs the same losses and ends with the same weights as an uninterrupted
    run: model, optimizer, scheduler, data order and random state (dropout) all restored, across an epoch."""
    common = [*RESUMED[method], "--max_steps", "8", "--save_steps", "4", "--max_seq_length", "96",
              "--learning_rate", "1e-2", "--warmup_steps", "2", "--threads", "1"]  # fmt: skip
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert run(tiny_model, many_file, whole, *common) == 0
    argv = ["--model_name_or_path", tiny_model, "--train_file", many_file, "--output_dir", str(killed),
            "--logging_steps", "1", "--report_to", "none", "--seed", "42", "--dataloader_num_workers", "0", *FP32,
            *common]  # fmt: skip
    run_killed(5, argv)
    assert sorted(p.name for p in killed.glob("checkpoint-*")) == ["checkpoint-4"]
    assert main([*argv, "--resume_from_checkpoint", "auto"]) == 0
    a, b = logged_losses(whole), logged_losses(killed)  # steps 1-4 come with the checkpoint's state
    assert sorted(a) == sorted(b) == list(range(1, 9))
    assert b == pytest.approx(a, abs=1e-5)
    name = "model.safetensors" if method == "full" else "adapter_model.safetensors"
    mine, theirs = tensors(whole / name), tensors(killed / name)
    assert mine.keys() == theirs.keys()
    for k in mine:
        torch.testing.assert_close(theirs[k], mine[k], atol=1e-5, rtol=1e-4)


def test_auto_resume_skips_a_checkpoint_left_half_written(tiny_model, data_file, tmp_path, capsys):
    out = tmp_path / "out"
    assert run(tiny_model, data_file, out, "--max_steps", "2", "--save_steps", "2") == 0
    (out / "checkpoint-3").mkdir()  # killed while saving: no trainer_state.json yet
    (out / "checkpoint-3" / "adapter_config.json").write_text("{")
    capsys.readouterr()
    assert (
        run(
            tiny_model,
            data_file,
            out,
            "--max_steps",
            "4",
            "--save_steps",
            "2",
            "--resume_from_checkpoint",
            "auto",
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert f"resuming from {out / 'checkpoint-2'}" in printed
    assert f"{out / 'checkpoint-3'} is incomplete (no trainer_state.json): skipped" in printed
    assert sorted(logged_losses(out)) == [1, 2, 3, 4]


def test_config_yaml_with_command_line_overriding(tiny_model, data_file, tmp_path):
    cfg = tmp_path / "run.yaml"
    out = tmp_path / "out"
    cfg.write_text(
        f"model_name_or_path: {tiny_model}\ntrain_file: [{data_file}]\nmethod: lora\nmax_steps: 5\n"
        f"output_dir: {out}\nreport_to: none\nsave_strategy: 'no'\nlogging_steps: 1\n"
    )
    assert main(["--config", str(cfg), "--max_steps", "2"]) == 0
    assert sorted(logged_losses(out)) == [1, 2]


def test_config_yaml_keeps_yaml_types_and_the_command_line_wins(tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        "train_file: a.json\nlearning_rate: 2e-4\ntemplate: null\nlr_scheduler_type: cosine_with_min_lr\n"
        "lr_scheduler_kwargs: {min_lr: 1.0e-5}\nmax_steps: 5\npacking: false\n"
    )
    model_args, data_args, training_args = parse_args([f"--config={cfg}", "--max_steps", "2"])
    assert data_args.train_file == ["a.json"]  # one file where a list is expected
    assert (
        training_args.learning_rate == 2e-4
    )  # PyYAML reads 2e-4 as a string: the argument's type converts it
    assert model_args.template is None  # null, not the string "None"
    assert training_args.lr_scheduler_kwargs == {"min_lr": 1e-5}
    assert training_args.max_steps == 2 and data_args.packing is False
    cfg.write_text("train_file: [a.json]\nlerning_rate: 1\n")
    assert main(["--config", str(cfg)]) == 2
    assert "unknown argument(s): lerning_rate" in capsys.readouterr().err
    cfg.write_text("- a\n- b\n")
    assert main(["--config", str(cfg)]) == 2
    assert "expected a mapping" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--max_seq_length", "0"], "--max_seq_length must be a positive number of tokens, not 0"),
        (["--max_target_length", "-3"], "--max_target_length must be a positive number of tokens, not -3"),
    ],
)
def test_bad_lengths_are_usage_errors(tmp_path, capsys, extra, message):
    assert main(["--train_file", "x.json", "--output_dir", str(tmp_path), *extra]) == 2
    assert message in capsys.readouterr().err


def test_a_length_above_the_models_positions_is_warned_about(tiny_model, data_file, tmp_path, capsys):
    assert run(tiny_model, data_file, tmp_path / "o", "--max_steps", "1", "--max_seq_length", "4096") == 0
    assert (
        "warning: --max_seq_length 4096 is above the model's max_position_embeddings 2048: 0 example(s) are "
        "longer than 2048 tokens" in capsys.readouterr().out
    )
    assert run(tiny_model, data_file, tmp_path / "p", "--max_steps", "1", "--max_seq_length", "2048") == 0
    assert "max_position_embeddings" not in capsys.readouterr().out


def test_a_plain_lora_run_prints_no_library_noise(tiny_model, data_file, tmp_path):
    """bitsandbytes (imported through peft) and DeepSpeed log warnings on import that ask nothing of the user."""
    cmd = [sys.executable, str(ROOT / "finetune.py"), "--model_name_or_path", tiny_model, "--train_file", data_file,
           "--output_dir", str(tmp_path / "o"), "--max_steps", "1", "--report_to", "none"]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    printed = r.stdout + r.stderr
    assert "model saved to" in printed  # the run's own lines are there
    for noise in ("gemm_4bit_forward", "kernels-community", "Setting accelerator to CPU"):
        assert noise not in printed
    help_text = subprocess.run(
        [sys.executable, str(ROOT / "finetune.py"), "--help"], capture_output=True, text=True
    )
    assert help_text.stdout.startswith("usage: finetune.py") and help_text.stderr == ""


def test_help_shows_chatfts_arguments_and_the_common_trainer_ones_and_help_all_everything(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    short = capsys.readouterr().out
    assert e.value.code == 0 and len(short.splitlines()) < 250
    for group in (
        "model and method:",
        "data:",
        "training: steps and batches:",
        "training: precision and memory:",
    ):
        assert group in short
    for name in ("--method", "--train_file", "--packing", "--learning_rate", "--per_device_train_batch_size",
                 "--deepspeed", "--resume_from_checkpoint", "--bf16", "--seed", "--output_dir", "--save_steps"):  # fmt: skip
        assert f"\n  {name} " in short, name
    assert "--fsdp" not in short and "--help_all" in short
    with pytest.raises(SystemExit):
        main(["--help_all"])
    everything = capsys.readouterr().out
    assert "--fsdp" in everything and len(everything.splitlines()) > 2 * len(short.splitlines())


def test_sample_prompts_are_answered_at_each_save_and_at_the_end(tiny_model, data_file, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hi\n\nhow are you?\n")
    out = tmp_path / "out"
    assert run(tiny_model, data_file, out, "--method", "full", "--max_steps", "20", "--save_steps", "10",
               "--learning_rate", "3e-3", "--sample_prompts", str(prompts), "--sample_max_new_tokens", "6",
               "--report_to", "tensorboard") == 0  # fmt: skip
    printed = capsys.readouterr().out
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [(r["step"], r["prompt"]) for r in rows] == [
        (10, "hi"),
        (10, "how are you?"),
        (20, "hi"),
        (20, "how are you?"),
    ]
    assert "sample answers at step 10:" in printed and "sample answers at step 20:" in printed
    # the answers are the saved model's own greedy answers (the last ones: the final weights)
    from chatft.data.schema import Conversation, Message
    from chatft.inference.cli import make_parser as infer_parser
    from chatft.inference.generation import GenerationOptions, decode, generate, render_prompt
    from chatft.inference.loading import load_session

    session = load_session(infer_parser().parse_args(["--model", str(out)]), say=lambda _m: None)
    for row in rows[2:]:
        ids = render_prompt(session, Conversation([Message("user", row["prompt"])]))[1]
        assert row["answer"] == decode(session, generate(session, [ids], GenerationOptions(6))[0])
    assert (
        rows[2]["answer"] != rows[0]["answer"] or rows[3]["answer"] != rows[1]["answer"]
    )  # training moved them
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = [EventAccumulator(str(p.parent)).Reload() for p in (out / "runs").rglob("events.out.*")]
    assert any("samples/text_summary" in e.Tags()["tensors"] for e in events)


def test_bad_sample_prompts_file_is_a_usage_error(tiny_model, data_file, tmp_path, capsys):
    empty = tmp_path / "p.txt"
    empty.write_text("\n")
    assert run(tiny_model, data_file, tmp_path / "o", "--sample_prompts", str(empty)) == 2
    assert f"--sample_prompts {empty}: no prompts in it" in capsys.readouterr().err


def test_invalid_data_stops_before_the_model_is_loaded(tmp_path, capsys):
    tokenizer_only = tmp_path / "tok"  # no weights: reaching the model load would fail differently
    make_tokenizer().save_pretrained(tokenizer_only)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{"messages": 3}\n')
    code = main(
        [
            "--model_name_or_path",
            str(tokenizer_only),
            "--train_file",
            str(bad),
            "--output_dir",
            str(tmp_path / "o"),
        ]
    )
    captured = capsys.readouterr()
    assert code == 1
    assert f"{bad}:1: messages: needs at least one assistant message" in captured.out
    assert f"{bad}:2: messages: must be a list" in captured.out
    assert "--skip_invalid_records" in captured.err
    assert "trainable params" not in captured.out


def test_an_invalid_eval_file_stops_training_too(data_file, tmp_path, capsys):
    tokenizer_only = tmp_path / "tok"  # no weights: reaching the model load would fail differently
    make_tokenizer().save_pretrained(tokenizer_only)
    bad = tmp_path / "bad_eval.jsonl"
    bad.write_text('{"messages": 3}\n')
    argv = ["--model_name_or_path", str(tokenizer_only), "--train_file", data_file, "--eval_file", str(bad),
            "--output_dir", str(tmp_path / "o")]  # fmt: skip
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert f"{bad}:1: messages: must be a list" in captured.out
    assert "--skip_invalid_records" in captured.err and "trainable params" not in captured.out


@pytest.mark.parametrize(
    "deepspeed,packing",
    [(None, "True"), (None, "False"), ("ds_zero2.json", "True"), ("ds_zero3.json", "True")],
    ids=["ddp-packed", "ddp-padded", "zero2", "zero3"],
)
def test_two_processes_of_half_the_batch_train_as_one_process_of_the_whole(
    tiny_model, many_file, tmp_path, deepspeed, packing
):
    """The loss is normalised over the trained tokens of the whole step on every process: the same logged losses
    and the same weights (ZeRO-3's gathered at save) as one process with the whole step. A step of 10 examples:
    packed, 4 rows (one process) or 2 rows on each of two; padded, 10 examples or 5 on each; 3 steps an epoch."""
    common = ["--method", "full", "--max_steps", "4", "--max_seq_length", "96", "--packing", packing,
              "--learning_rate", "1e-3", "--save_strategy", "no"]  # fmt: skip
    one = tmp_path / "one"
    assert run(tiny_model, many_file, one, *common, "--per_device_train_batch_size", "10") == 0
    two = tmp_path / "two"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
        str(ROOT / "finetune.py"), "--model_name_or_path", tiny_model, "--train_file", many_file,
        "--output_dir", str(two), "--per_device_train_batch_size", "5", "--logging_steps", "1", "--report_to", "none",
        "--seed", "42", "--dataloader_num_workers", "0", *FP32, *common,
    ]  # fmt: skip
    if deepspeed:
        cmd += ["--deepspeed", str(ROOT / "configs" / deepspeed)]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "[process 1] train data: read from the cache" in r.stdout  # prepared once, by process 0
    if packing == "True":
        assert "is 2 packed row(s) on each of 2 processes" in r.stdout + r.stderr
    losses = logged_losses(one)
    assert sorted(losses) == [1, 2, 3, 4] and len(set(losses.values())) == 4
    assert logged_losses(two) == pytest.approx(losses, abs=1e-5)
    mine = tensors(one / "model.safetensors")
    theirs = AutoModelForCausalLM.from_pretrained(two).state_dict()  # a plain folder, also from ZeRO-3
    base = tensors(Path(tiny_model) / "model.safetensors")
    assert any(not torch.equal(mine[k], base[k]) for k in base)
    for k in mine:
        torch.testing.assert_close(theirs[k], mine[k], atol=1e-5, rtol=1e-4)
    assert (two / "tokenizer.json").exists()


@pytest.mark.parametrize(
    "unit,rows,steps", [("examples", 1, 10), ("rows", 4, 3)]
)  # 24 examples in 10 rows: a step of 4 examples is 1 row (10 steps), of 4 rows 3 steps (2 empty rows)
def test_a_packed_batch_counts_examples_unless_asked_for_rows(
    tiny_model, many_file, tmp_path, capsys, unit, rows, steps
):
    argv = ["--method", "lora", "--num_train_epochs", "1", "--max_seq_length", "96", "--save_strategy", "no",
            "--per_device_train_batch_size", "4", "--packed_batch_unit", unit]  # fmt: skip
    assert run(tiny_model, many_file, tmp_path, *argv) == 0
    assert f"is {rows} packed row(s)" in capsys.readouterr().out
    history = json.loads((tmp_path / "trainer_state.json").read_text())["log_history"]
    logged = [e for e in history if "loss" in e]
    assert len(logged) == steps
    assert sum(e["examples_per_step"] for e in logged) == 24  # the epoch, each example once


def test_deepspeed_is_told_the_step_as_chatft_splits_it(tmp_path):
    """DeepSpeed's "auto" batch sizes are filled when the arguments are parsed; a packed step turned into rows and
    micro-batches changes them after that, and DeepSpeed must get the step as it runs."""
    argv = ["--train_file", "x.jsonl", "--output_dir", str(tmp_path), "--per_device_train_batch_size", "10",
            "--deepspeed", str(ROOT / "configs" / "ds_zero2.json")]  # fmt: skip
    _, _, args = parse_args(argv)
    config = args.hf_deepspeed_config.config
    assert config["train_micro_batch_size_per_gpu"] == 10 and config["gradient_accumulation_steps"] == 1
    args.per_device_train_batch_size, args.gradient_accumulation_steps = 2, 3
    sync_deepspeed_batch(args)
    assert config["train_micro_batch_size_per_gpu"] == 2 and config["gradient_accumulation_steps"] == 3
    assert config["train_batch_size"] == 6
    # the micro-batch plan, which SFT and preference training both run last, tells it itself
    model_args, data_args, args = parse_args([*argv, "--micro_batch_size", "2"])
    config = args.hf_deepspeed_config.config
    plan_micro_batches(model_args, data_args, args, lambda _msg: None)
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (2, 5)
    assert config["train_micro_batch_size_per_gpu"] == 2 and config["gradient_accumulation_steps"] == 5
    assert config["train_batch_size"] == 10


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_eval_loss_and_generation_metrics_at_each_evaluation(tiny_model, data_file, tmp_path):
    dev = tmp_path / "dev.jsonl"  # 3 records with an eval batch of 2: the last batch is short
    dev.write_text("".join(Path(data_file).read_text().splitlines(keepends=True)[:3]))
    out = tmp_path / "out"
    code = run(
        tiny_model, data_file, out, "--method", "full", "--max_steps", "30", "--eval_file", str(dev),
        "--eval_steps", "15", "--save_steps", "15", "--predict_with_generate", "True", "--generation_max_length", "4",
        "--per_device_eval_batch_size", "2", "--learning_rate", "3e-3",
    )  # fmt: skip
    assert code == 0
    state = json.loads((out / "trainer_state.json").read_text())
    evals = [e for e in state["log_history"] if "eval_loss" in e]
    scores = [e for e in state["log_history"] if "eval_rouge-1" in e]
    assert [e["step"] for e in evals] == [15, 30] and [e["step"] for e in scores] == [15, 30]
    # the scores at step 30 are those of the final model's greedy answers to the eval records, as inference.py
    # predicts and scores them
    pred = tmp_path / "pred.jsonl"
    r = subprocess.run(
        [sys.executable, str(ROOT / "inference.py"), "--model", str(out), "--input_file", str(dev),
         "--output_file", str(pred), "--max_new_tokens", "4", "--eval"],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    expected = json.loads(Path(f"{pred}.metrics.json").read_text())["scores"]
    assert {k: scores[1][f"eval_{k}"] for k in expected} == pytest.approx(expected)
    assert expected["rouge-1"] > 0  # some answer words learnt: the comparison is not of zeros
    config = json.loads((out / "checkpoint-15" / "run_args.json").read_text())
    assert config["data"]["formats"] == {data_file: "openai"}


def test_chat_template_kwargs_reach_the_training_data_and_are_saved(tmp_path, data_file):
    model = save_tiny_model(tmp_path / "m")
    tok = make_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.role == 'assistant' and style is defined %}"
        "{{ style }} {% endif %}{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% if style is defined %}{{ style }} {% endif %}"
        "{% endif %}"
    )
    tok.save_pretrained(model)
    tokens = {}
    for name, extra in (("plain", []), ("styled", ["--chat_template_kwargs", '{"style": "brief"}'])):
        out = tmp_path / name
        assert run(str(model), data_file, out, "--max_steps", "1", "--packing", "False", *extra) == 0
        state = json.loads((out / "trainer_state.json").read_text())
        tokens[name] = next(h["train_tokens"] for h in state["log_history"] if "train_tokens" in h)
        saved = json.loads((out / "run_args.json").read_text())["data"]["chat_template_kwargs"]
        assert saved == ({"style": "brief"} if extra else None)
    assert tokens["styled"] > tokens["plain"]
