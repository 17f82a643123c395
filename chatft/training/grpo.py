"""The GRPO stage (finetune.py --stage grpo): prompts in, a model or adapter tuned online on rewards a program
checks, through TRL's GRPOTrainer (trl pinned in requirements.txt).

What chatft changes in TRL's GRPO:
- prompts are rendered by chatft (chatft.grpo.prompts: the model's own template, tools as SFT renders them, the
  record's reference answer beside it) and handed to TRL already tokenized, so a rollout starts from exactly the
  ids SFT and inference use (TRL would otherwise tokenize the text again, adding a BOS on some tokenizers);
- generation stops at every end-of-turn token of the template (chatft.inference.loading.stop_token_ids), not only
  at EOS;
- reward functions are checked on a few records before the first step, and a reward function that raises during
  training stops the run with its name and the sample (chatft.grpo.rewards);
- the model is built by chatft (full, LoRA, QLoRA; from a base, a full SFT folder or an SFT adapter), seeded first.
Defaults that differ from TRL's GRPOConfig: num_generations 4, max_completion_length 128, learning_rate 1e-5,
logging_steps 1 (a small machine runs few steps; every step's rewards are worth seeing).
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Any

from transformers import HfArgumentParser

from chatft.args import DataArguments, GRPOArguments, ModelArguments
from chatft.data.templates import get_template
from chatft.grpo.prompts import PreparedPrompts, prepare_prompts
from chatft.grpo.rewards import RewardError, check_rewards, checked, load_reward
from chatft.grpo.tools import check_tool_module, load_tool_module, tool_rollouts
from chatft.inference.loading import stop_token_ids
from chatft.methods import load_model, load_tokenizer
from chatft.training.arguments import with_trl_config
from chatft.training.checkpoints import SaveRunArgs
from chatft.training.command_line import parse_args
from chatft.training.flow import (
    StageError,
    bad_input_stops,
    load_sets,
    run_stage,
    seeded_model,
    sft_only,
    start_from,
    train_and_save,
)
from chatft.training.process import start_process
from chatft.training.samples import add_sample_answers, base_model, read_sample_prompts
from chatft.training.step_plan import schedule_evaluation

DEFAULTS = {"num_generations": 4, "max_completion_length": 128, "learning_rate": 1e-5, "logging_steps": 1,
            "max_tool_calling_iterations": 4}  # fmt: skip
GRPO_HELP = ["reward_funcs", "reward_weights", "adapter", "num_generations", "max_completion_length",
             "max_prompt_length", "temperature", "beta", "loss_type", "steps_per_generation", "use_vllm",
             "tool_module", "tool_timeout", "max_tool_calling_iterations"]  # fmt: skip
CHECKED_RECORDS = 4  # records each reward function is tried on before training


@functools.cache
def grpo_arguments() -> type:
    from trl import GRPOConfig

    merged = with_trl_config("GRPOTrainArguments", GRPOConfig, __name__, DEFAULTS)
    # GRPOConfig's chat_template_kwargs is --chat_template_kwargs of DataArguments (one option; copied after parsing)
    kwargs = dataclasses.field(default=None, init=False)
    return dataclasses.make_dataclass(
        "GRPOTrainArguments",
        [("chat_template_kwargs", dict | None, kwargs)],
        bases=(merged,),
        namespace={"__module__": __name__},
    )


def __getattr__(name: str) -> type:
    if name == "GRPOTrainArguments":  # the Trainer pickles its arguments: found again here
        return grpo_arguments()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def make_parser() -> HfArgumentParser:
    return HfArgumentParser((ModelArguments, DataArguments, GRPOArguments, grpo_arguments()))


def chat_grpo_trainer(**kwargs: Any):
    """TRL's GRPOTrainer taking chatft's prompt ids (module docstring)."""
    from trl import GRPOTrainer

    class ChatGRPOTrainer(GRPOTrainer):
        def __init__(self, *args: Any, prompt_ids: dict[str, list[int]], **kw: Any) -> None:
            self.chatft_prompt_ids = prompt_ids
            super().__init__(*args, **kw)

        def _tokenize_prompts(self, prompts: list):
            return [list(self.chatft_prompt_ids[p]) for p in prompts], None, {}

        def _calculate_rewards(self, *args: Any, **kw: Any):
            try:
                return super()._calculate_rewards(*args, **kw)
            except RewardError as e:
                raise StageError(str(e), 1) from e

    return ChatGRPOTrainer(**kwargs)


def tool_rollouts_for(grpo_args, rounds, train, evaluation, tokenizer, template, prompt_ids, stops, log):
    """--tool_module: its functions, checked against the tools the prompts declare, as TRL's rollout_func."""
    if template is None:
        raise ValueError(
            "--tool_module: raw (input-output) prompts have no chat template to render tool results"
        )
    functions = load_tool_module(grpo_args.tool_module)
    sets = [train.dataset] + ([evaluation.dataset] if evaluation is not None else [])
    rows = [row for dataset in sets for row in dataset.select_columns(["tools", "file", "record"])]
    check_tool_module(functions, rows, grpo_args.tool_module)
    prompt_tools = {
        p: t for dataset in sets for p, t in zip(dataset["prompt"], dataset["tools"], strict=True)
    }
    log(
        f"tools: {', '.join(sorted(functions))} from {grpo_args.tool_module}; a rollout runs the model's calls and "
        f"goes on after their results (rendered by the template, not trained), {grpo_args.tool_timeout:g} s a call, "
        f"at most {rounds} round(s) of calls a rollout"
    )
    return tool_rollouts(
        functions, tokenizer, template, prompt_ids, prompt_tools, stops, grpo_args.tool_timeout
    )


def report(prepared: PreparedPrompts) -> list[str]:
    lines = [f"records: {prepared.records_read} read, {len(prepared.dataset)} prompts, "
             f"{len(prepared.problems)} not usable"]  # fmt: skip
    lines += [f"  {p}" for p in prepared.problems[:20]]
    if len(prepared.problems) > 20:
        lines.append(f"  ... and {len(prepared.problems) - 20} more")
    return lines


def main(argv: list[str] | None = None) -> int:
    return run_stage(lambda: run_grpo(argv))


def run_grpo(argv: list[str] | None) -> int:
    # peft and TRL read is_gradient_checkpointing, deprecated in transformers 5 (-> is_activation_checkpointing)
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    # --tool_module's rollouts go through TRL's rollout_func (pinned TRL; tests/test_grpo.py checks what it does)
    warnings.filterwarnings("ignore", message=".*'rollout_func', which is an experimental feature.*")
    parser = make_parser()
    with bad_input_stops():
        model_args, data_args, grpo_args, training_args = parse_args(
            argv,
            parser,
            {"GRPO (--stage grpo)": [n for n in GRPO_HELP if n in {a.dest for a in parser._actions}]},
        )
        if model_args.method == "ptuning":
            raise ValueError(
                "--stage grpo trains full, lora or qlora; a P-Tuning v2 prefix is not offered for it"
            )
        sft_only(training_args, "grpo")
    training_args.chat_template_kwargs = data_args.chat_template_kwargs or {}
    log = start_process(training_args)
    with bad_input_stops():
        start_from(model_args, grpo_args.adapter, log)
        tokenizer = load_tokenizer(model_args)
        chat = model_args.template is not None or getattr(tokenizer, "chat_template", None)
        template = (
            get_template(model_args.template, tokenizer, data_args.chat_template_kwargs) if chat else None
        )
        rewards = [
            checked(load_reward(s, training_args.max_completion_length)) for s in grpo_args.reward_funcs
        ]

    def prepare(files: list[str]) -> PreparedPrompts:
        fmt = data_args.train_format
        return prepare_prompts(files, fmt, tokenizer, template, grpo_args.max_prompt_length, log)

    train, evaluation = load_sets(training_args, data_args, prepare, report, log, " (prompts)")
    with bad_input_stops():
        rows = [train.dataset[i] for i in range(min(CHECKED_RECORDS, len(train.dataset)))]
        check_rewards(rewards, rows, training_args.max_completion_length)
    log(f"rewards: {', '.join(grpo_args.reward_funcs)} (each tried on {len(rows)} record(s) before training)")
    log(f"precision: {training_args.precision} ({training_args.precision_why})")
    log(
        f"rollouts: {training_args.num_generations} completions per prompt of up to "
        f"{training_args.max_completion_length} tokens, "
        + ("vLLM (--use_vllm)" if training_args.use_vllm else "transformers' generate with its KV cache")
    )
    schedule_evaluation(evaluation is not None, training_args, log)

    resume, model = seeded_model(
        training_args, lambda: load_model(model_args, training_args, adapter=grpo_args.adapter)
    )
    stops = stop_token_ids(tokenizer, template, model.generation_config)
    training_args.generation_kwargs = (training_args.generation_kwargs or {}) | {"eos_token_id": stops}
    run_args = {
        "model": dataclasses.asdict(model_args),
        "grpo": dataclasses.asdict(grpo_args),
        "data": dataclasses.asdict(data_args) | {"formats": train.formats},
        "training": training_args.to_dict(),
    }
    prompt_ids = dict(zip(train.dataset["prompt"], train.dataset["prompt_ids"], strict=True))
    if evaluation is not None:
        prompt_ids |= dict(zip(evaluation.dataset["prompt"], evaluation.dataset["prompt_ids"], strict=True))
    rollout = None
    if grpo_args.tool_module:
        with bad_input_stops():
            rounds = training_args.max_tool_calling_iterations
            rollout = tool_rollouts_for(
                grpo_args, rounds, train, evaluation, tokenizer, template, prompt_ids, stops, log
            )
    trainer = chat_grpo_trainer(
        model=model,
        reward_funcs=rewards,
        args=training_args,
        train_dataset=train.dataset,
        eval_dataset=evaluation.dataset if evaluation else None,
        processing_class=tokenizer,
        callbacks=[SaveRunArgs(run_args)],
        prompt_ids=prompt_ids,
        rollout_func=rollout,
    )
    if training_args.sample_prompts:
        with bad_input_stops():
            samples = read_sample_prompts(training_args.sample_prompts, data_args.train_format)
        attention = base_model(model).config._attn_implementation
        add_sample_answers(trainer, samples, model_args, data_args, training_args, tokenizer, attention, log,
                           rewards=rewards)  # fmt: skip
    train_and_save(trainer, model, training_args, run_args, resume, log)
    return 0
