"""Generation while training: the model switched to generating and back, and --sample_prompts (XTuner's
evaluation_inputs): a few prompts answered greedily with the current weights at every evaluation and save and at
the end, printed and written to samples.jsonl (and to TensorBoard when it is on), so that a user watches the
answers change during a long run; in GRPO, each prompt's rollouts with their rewards (SampleRollouts).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from transformers import TrainerCallback
from transformers.integrations import TensorBoardCallback

from chatft.args import DataArguments, ModelArguments
from chatft.data.formats import load_conversations
from chatft.data.schema import Conversation, Message
from chatft.data.templates import Template, TemplateError, get_template
from chatft.inference.common import InferError
from chatft.inference.evaluation import generation_scores, shorten, split_last_answer
from chatft.inference.generation import GenerationOptions, decode, generate, render_prompt
from chatft.inference.loading import Session, stop_token_ids
from chatft.inference.reasoning import prompt_opens_think, split_reasoning
from chatft.loss import zero3_enabled

SAMPLES_FILE = "samples.jsonl"


def base_model(model):
    """The transformers model under a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@contextmanager
def generating(model, attention: str) -> Iterator[None]:
    """The model ready to generate (eval mode, the given attention: packing's own sdpa is for training rows),
    and as it was afterwards."""
    base = base_model(model)
    training_attention, training = base.config._attn_implementation, model.training
    base.set_attn_implementation(attention)
    model.eval()
    try:
        yield
    finally:
        base.set_attn_implementation(training_attention)
        model.train(training)


def read_sample_prompts(path: str, fmt: str = "auto") -> list[tuple[Conversation, str | None]]:
    """(prompt conversation, reference answer or None) per sample: a .txt file holds one user prompt per line; any
    training data file gives each record's conversation up to its last answer, that answer the reference."""
    file = Path(path)
    if file.suffix == ".txt":
        try:
            lines = file.read_text(encoding="utf-8-sig").splitlines()
        except OSError as e:
            raise InferError(f"--sample_prompts {path}: {e.strerror or e}") from e
        samples = [(Conversation([Message("user", line.strip())]), None) for line in lines if line.strip()]
    else:
        loaded = load_conversations([path], fmt, log=lambda _m: None)
        if loaded.problems:
            raise InferError(f"--sample_prompts: {loaded.problems[0]}")
        samples = [split_last_answer(conv) for _, _, conv in loaded.records]
    if not samples:
        raise InferError(f"--sample_prompts {path}: no prompts in it")
    return samples


class SampleAnswers(TrainerCallback):
    """Greedy answers to the sample prompts at every evaluation and save and at the end (once per step)."""

    def __init__(
        self,
        samples: list[tuple[Conversation, str | None]],
        tokenizer: Any,
        template: Template | None,
        attention: str,
        max_new_tokens: int,
        log: Callable[[str], None] = print,
    ) -> None:
        self.samples = samples
        self.tokenizer = tokenizer
        self.template = template
        self.attention = attention
        self.options = GenerationOptions(max_new_tokens)
        self.log = log
        self.done_at: int | None = None
        self.tensorboard: Callable[[], Any] = lambda: (
            None
        )  # the Trainer's TensorBoard writer, when it has one

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        self.answer(args, state, model)

    def on_save(self, args, state, control, model=None, **kwargs):
        self.answer(args, state, model)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.answer(args, state, model)

    def answer(self, args, state, model) -> None:
        if model is None or not state.is_world_process_zero or self.done_at == state.global_step:
            return
        self.done_at = state.global_step
        with generating(model, self.attention):
            rows = self.generate(model)
        self.log(f"sample answers at step {state.global_step}:")
        for i, row in enumerate(rows, start=1):
            self.log(self.line(i, row))
        with (Path(args.output_dir) / SAMPLES_FILE).open("a", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps({"step": state.global_step, **row}, ensure_ascii=False) + "\n")
        writer = self.tensorboard()
        if writer is not None:
            text = "\n\n".join(f"**{r['prompt']}**\n\n{r['answer']}" for r in rows)
            writer.add_text("samples", text, state.global_step)

    def line(self, i: int, row: dict) -> str:
        return f"  [{i}] {shorten(row['prompt'], 40)} -> {shorten(row['answer'], 100)}"

    def generate(self, model) -> list[dict]:
        stops = stop_token_ids(self.tokenizer, self.template, model.generation_config)
        session = Session(model, self.tokenizer, self.template, False, stops, str(model.device))
        prompts, ids, opened = [], [], []
        for conv, _ in self.samples:
            try:
                text, prompt_ids = render_prompt(session, conv)
            except TemplateError as e:
                raise InferError(f"--sample_prompts: {e}") from e
            prompts.append(conv.messages[-1].content)
            ids.append(prompt_ids)
            opened.append(prompt_opens_think(text))
        answers = generate(session, ids, self.options)  # one batch: a few prompts
        rows = []
        for p, a, is_open, (_, ref) in zip(prompts, answers, opened, self.samples, strict=True):
            # a reasoning model's thinking kept apart from its answer, as inference.py shows them
            reasoning, answer = split_reasoning(decode(session, a), is_open)
            rows.append({"prompt": p, "answer": answer, "reasoning": reasoning, "reference": ref})
        return rows


class SampleRollouts(SampleAnswers):
    """--stage grpo: each sample prompt's rollouts, `generations` completions sampled as training samples them
    (its temperature and top_p), each scored by the run's reward functions with the sample's reference; the log
    shows each prompt's mean reward and its best completion, samples.jsonl every rollout and its rewards. The
    sampling draws from a generator of its own (seed + step): training's random state is not touched, so a run
    with sample prompts trains as one without."""

    def __init__(self, *args: Any, rewards: list[Callable], generations: int, temperature: float,
                 top_p: float, seed: int, **kwargs: Any) -> None:  # fmt: skip
        super().__init__(*args, **kwargs)
        self.rewards = rewards
        self.generations = generations
        self.options = GenerationOptions(
            self.options.max_new_tokens, do_sample=True, temperature=temperature, top_p=top_p
        )
        self.seed = seed
        self.step = 0

    def answer(self, args, state, model) -> None:
        self.step = state.global_step
        super().answer(args, state, model)

    def generate(self, model) -> list[dict]:
        import torch

        from chatft.grpo.rewards import reward_name

        stops = stop_token_ids(self.tokenizer, self.template, model.generation_config)
        session = Session(model, self.tokenizer, self.template, False, stops, str(model.device))
        rows = []
        with torch.random.fork_rng(devices=[model.device] if model.device.type == "cuda" else []):
            torch.manual_seed(self.seed + self.step)
            for k, (conv, reference) in enumerate(self.samples):
                try:
                    text, prompt_ids = render_prompt(session, conv)
                except TemplateError as e:
                    raise InferError(f"--sample_prompts: {e}") from e
                n = self.generations
                generated = generate(session, [prompt_ids] * n, self.options)
                completions = [decode(session, ids) for ids in generated]
                columns = {"reference": [reference or ""] * n, "tools": [_tools_json(conv)] * n,
                           "completion_ids": generated, "file": ["--sample_prompts"] * n, "record": [k + 1] * n}  # fmt: skip
                scored = {
                    reward_name(f): f(prompts=[text] * n, completions=completions, **columns)
                    for f in self.rewards
                }
                rollouts = [
                    {"completion": c, "rewards": {name: values[i] for name, values in scored.items()}}
                    for i, c in enumerate(completions)
                ]
                totals = [sum(v for v in r["rewards"].values() if v is not None) for r in rollouts]
                best = max(range(n), key=totals.__getitem__)
                rows.append({"prompt": conv.messages[-1].content, "reference": reference, "rollouts": rollouts,
                             "mean_reward": sum(totals) / n, "answer": completions[best]})  # fmt: skip
        return rows

    def line(self, i: int, row: dict) -> str:
        return (
            f"  [{i}] {shorten(row['prompt'], 40)} -> mean reward {row['mean_reward']:.3f} over "
            f"{len(row['rollouts'])} rollouts; best: {shorten(row['answer'], 80)}"
        )


def _tools_json(conv: Conversation) -> str:
    return json.dumps(conv.tools, ensure_ascii=False) if conv.tools is not None else ""


def template_for(
    convs: list[Conversation], model_args: ModelArguments, data_args: DataArguments, tokenizer
) -> Template | None:
    """The template training renders with, where any of these conversations is a chat (raw prompts need none)."""
    chat = model_args.template is not None or any(not conv.raw for conv in convs)
    return get_template(model_args.template, tokenizer, data_args.chat_template_kwargs) if chat else None


def generation_eval_for(
    model_args: ModelArguments, data_args: DataArguments, training_args, tokenizer, attention: str
):
    """--predict_with_generate with --eval_file: a function scoring greedy answers to the eval records' last
    assistant turns (every record, whatever the batch size), rendered as in training."""
    if not (training_args.predict_with_generate and data_args.eval_file):
        return None
    records = load_conversations(data_args.eval_file, data_args.train_format, log=lambda _msg: None).records
    template = template_for([c for _, _, c in records], model_args, data_args, tokenizer)
    max_new_tokens = training_args.generation_max_length or 128

    def scores(model) -> dict[str, float]:
        with generating(model, attention):
            return generation_scores(
                model, tokenizer, template, records, max_new_tokens, training_args.per_device_eval_batch_size
            )

    return scores


def add_sample_answers(
    trainer, samples, model_args, data_args, training_args, tokenizer, attention: str, log, rewards=None
) -> None:
    """--sample_prompts: the SampleAnswers callback (SampleRollouts with the GRPO stage's reward functions),
    writing to the Trainer's TensorBoard when it has one."""
    if zero3_enabled():
        log("--sample_prompts: skipped under DeepSpeed ZeRO-3 (the weights are split over the processes)")
        return
    template = template_for([conv for conv, _ in samples], model_args, data_args, tokenizer)
    common = (samples, tokenizer, template, attention)
    if rewards is None:
        callback = SampleAnswers(*common, training_args.sample_max_new_tokens, log)
    else:
        callback = SampleRollouts(
            *common, training_args.max_completion_length, log, rewards=rewards,
            generations=training_args.num_generations, temperature=training_args.temperature,
            top_p=training_args.top_p, seed=training_args.seed,
        )  # fmt: skip

    def tensorboard():
        found = [c for c in trainer.callback_handler.callbacks if isinstance(c, TensorBoardCallback)]
        return getattr(found[0], "tb_writer", None) if found else None

    callback.tensorboard = tensorboard
    trainer.add_callback(callback)
    what = "answered" if rewards is None else f"given {training_args.num_generations} scored rollouts each"
    log(f"--sample_prompts: {len(samples)} prompt(s) {what} at every evaluation and save and at the end")
