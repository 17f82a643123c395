"""finetune.py --stage dpo|orpo|simpo|kto: preference tuning through TRL's trainers (trl pinned in
requirements.txt), on data read and encoded by chatft (chatft.preference.encode) instead of TRL's own tokenization.

| stage | TRL trainer            | loss                                      | reference model                       |
| dpo   | DPOTrainer             | DPO (--loss_type sigmoid; TRL's others)   | yes                                   |
| kto   | KTOTrainer             | KTO on labelled replies                   | yes                                   |
| orpo  | experimental ORPOTrainer | NLL of chosen + odds-ratio term (--beta = λ) | none                               |
| simpo | experimental CPOTrainer, loss_type simpo, cpo_alpha 0 | SimPO (--beta, --simpo_gamma) | none  |

The reference (dpo, kto): for a new LoRA/QLoRA adapter, the model itself with the adapter disabled (no second
copy in memory); when --adapter goes on training an SFT adapter, that adapter as loaded, kept by TRL as a frozen
copy named "ref" beside the trained one (adapter-sized; saved in the output's ref/ folder); for full training,
a second copy of --model_name_or_path, or with --precompute_ref_log_probs the model's own log-probabilities
computed once before training, and no copy.

What chatft changes in TRL's trainers (PreferenceTrainer): the data arrive encoded (TRL's tokenization is
skipped); the loss is the mean over the pairs (KTO: replies) of the whole optimizer step, however the step is
split into micro-batches (TRL averages each micro-batch, which weighs a short last micro-batch more); paired
stages group pairs of similar length into whole steps drawn from (seed, epoch) as SFT does; a QLoRA adapter stays
in float32 (TRL casts it to bfloat16), as chatft's SFT keeps it.

Defaults where TRL's configs differ from the Trainer's are chatft's, as for SFT: precision, micro-batches and
activation checkpointing chosen by chatft.machine (a pair counts as one row of both its sequences), learning rate
5e-5 (TRL: 1e-6, for full training of large models); simpo: loss_type simpo, cpo_alpha 0 (no NLL term), beta 2.0 as
in the SimPO paper. TRL's max_length is set to --max_seq_length (chatft's truncation already holds to it).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import os
import sys
import warnings
from dataclasses import field
from pathlib import Path

import datasets
import torch
from transformers import HfArgumentParser, set_seed

from chatft.args import RUN_ARGS_FILE, DataArguments, ModelArguments, PreferenceArguments
from chatft.data.check import position_warning
from chatft.data.formats import DataFileError
from chatft.data.templates import IGNORE_INDEX, TemplateError
from chatft.demo_model import DEFAULT_MODEL_DIR
from chatft.methods import _upcast_trainable, load_model, load_tokenizer
from chatft.plot import plot_loss
from chatft.preference import requested_stage
from chatft.preference.encode import (
    PreparedPreferences,
    check_target_length,
    prepare_preferences,
    report_lines,
)
from chatft.samples import base_model
from chatft.train import (
    SaveRunArgs,
    StepGroupedSampler,
    TrainArguments,
    data_refused,
    parse_args,
    plan_micro_batches,
    resolve_resume,
    start_process,
    write_run_args,
)

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # ORPO and CPO (SimPO) live in trl.experimental

# stage -> (module, trainer, config)
TRAINERS = {
    "dpo": ("trl", "DPOTrainer", "DPOConfig"),
    "kto": ("trl", "KTOTrainer", "KTOConfig"),
    "orpo": ("trl.experimental.orpo", "ORPOTrainer", "ORPOConfig"),
    "simpo": ("trl.experimental.cpo", "CPOTrainer", "CPOConfig"),
}
REFERENCE_FREE = ("orpo", "simpo")
# --help: the preference knobs, where the stage's config has them
PREFERENCE_HELP = ["adapter", "beta", "loss_type", "precompute_ref_log_probs", "simpo_gamma", "cpo_alpha",
                   "desirable_weight", "undesirable_weight", "label_smoothing"]  # fmt: skip
STAGE_DEFAULTS = {"simpo": {"loss_type": "simpo", "cpo_alpha": 0.0, "beta": 2.0}}


def trl_classes(stage: str) -> tuple[type, type]:
    module, trainer, config = TRAINERS[stage]
    loaded = importlib.import_module(module)
    return getattr(loaded, trainer), getattr(loaded, config)


@functools.cache
def stage_arguments(stage: str) -> type:
    """chatft's TrainArguments and the stage's TRL config in one dataclass: every TRL knob on the command line,
    chatft's defaults where the two differ (module docstring)."""
    _, config = trl_classes(stage)
    overrides = {
        "bf16": (
            bool | None,
            field(default=False, metadata={"help": "bf16 mixed precision (default: off)."}),
        ),
        "gradient_checkpointing": (bool | None, field(default=None, metadata={"help": "Deprecated alias."})),
        "learning_rate": (
            float,
            field(default=5e-5, metadata={"help": "The initial learning rate (AdamW)."}),
        ),
    }
    for name, value in STAGE_DEFAULTS.get(stage, {}).items():
        own = next(f for f in dataclasses.fields(config) if f.name == name)
        overrides[name] = (own.type, field(default=value, metadata=own.metadata))
    cls = dataclasses.make_dataclass(
        f"{stage.upper()}TrainArguments",
        [(name, kind, spec) for name, (kind, spec) in overrides.items()],
        bases=(TrainArguments, config),
    )
    cls.__module__ = __name__  # found again by __getattr__ below: the Trainer pickles its arguments
    return cls


def __getattr__(name: str) -> type:
    stage = name.removesuffix("TrainArguments").lower()
    if name.endswith("TrainArguments") and stage in TRAINERS:
        return stage_arguments(stage)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def make_parser(stage: str) -> HfArgumentParser:
    return HfArgumentParser((ModelArguments, DataArguments, PreferenceArguments, stage_arguments(stage)))


def parse_preference_args(argv: list[str], stage: str):
    parser = make_parser(stage)
    names = {a.dest for a in parser._actions}
    help_groups = {f"preference tuning (--stage {stage})": [n for n in PREFERENCE_HELP if n in names]}
    model_args, data_args, pref_args, training_args = parse_args(argv, parser, help_groups)
    if model_args.method == "ptuning":
        raise ValueError(
            f"--stage {stage} trains full, lora or qlora; a P-Tuning v2 prefix is not offered for preference tuning"
        )
    check_target_length(data_args.max_target_length)
    if data_args.packing:
        print("packing: off. Preference batches are padded (a pair's two sequences side by side).")
    training_args.max_length = data_args.max_seq_length  # already enforced by chatft's truncation
    return model_args, data_args, pref_args, training_args


# ---------------------------------------------------------------------------------------------------- start


def start_from(model_args: ModelArguments, pref_args: PreferenceArguments, log) -> None:
    """With --adapter: the base its adapter_config.json names (unless --model_name_or_path is given) and the
    tokenizer saved beside it; the chat template the start folder (adapter or model) was trained with, unless
    --template is given."""
    folder = pref_args.adapter
    if folder:
        config_file = Path(folder) / "adapter_config.json"
        if not config_file.is_file():
            raise ValueError(f"--adapter {folder}: not a peft adapter folder (no adapter_config.json)")
        base = json.loads(config_file.read_text(encoding="utf-8")).get("base_model_name_or_path")
        if model_args.model_name_or_path == str(DEFAULT_MODEL_DIR) and base and Path(base).is_dir():
            model_args.model_name_or_path = base
            log(f"base model: {base} (from {config_file})")
        if model_args.tokenizer_name_or_path is None and (Path(folder) / "tokenizer_config.json").is_file():
            model_args.tokenizer_name_or_path = folder
    run_args = Path(folder or model_args.model_name_or_path) / RUN_ARGS_FILE
    if model_args.template is None and run_args.is_file():
        trained = (json.loads(run_args.read_text(encoding="utf-8")).get("model") or {}).get("template")
        if trained:
            model_args.template = trained
            log(f"chat template: {trained} (as {run_args.parent} was trained)")


# ---------------------------------------------------------------------------------------------------- trainer


class PreferenceTrainer:
    """Mixed into the stage's TRL trainer (make_trainer); what it changes is in the module docstring."""

    loss_is_scaled_for_ga = True  # compute_loss divides by the examples of the whole step

    def __init__(self, *args, continuing: bool = False, lengths: list[int] | None = None, **kwargs):
        self.lengths = lengths
        super().__init__(*args, **kwargs)
        model = self.accelerator.unwrap_model(self.model)
        if not continuing and "ref" in getattr(model, "peft_config", {}):
            # TRL copies a PeftModel's adapter as the reference; a new adapter's reference is the base: disabled
            model.delete_adapter("ref")
        if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
            _upcast_trainable(model)

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        """DPO, KTO: the data are encoded by chatft.preference.encode. KTO's KL term takes each prompt with the
        reply of its neighbour in the batch, which TRL's own preparation adds (the same rotation, here)."""
        if getattr(self, "calculate_KL", False):

            def rotate(batch: dict) -> dict:
                return {"KL_completion_ids": batch["completion_ids"][-1:] + batch["completion_ids"][:-1]}

            dataset = dataset.map(rotate, batched=True, batch_size=args.per_device_train_batch_size)
        return dataset

    def tokenize_row(self, feature, model=None) -> dict:
        return {}  # ORPO, CPO: encoded by chatft (orpo_columns)

    @staticmethod
    def examples_in(inputs) -> int:
        if "chosen_input_ids" in inputs:  # ORPO, CPO
            return inputs["chosen_input_ids"].shape[0]
        if "label" in inputs:  # KTO
            return inputs["label"].shape[0]
        return inputs["input_ids"].shape[0] // 2  # DPO: chosen rows, then rejected rows

    def _get_num_items_in_batch(self, batch_samples, device):
        n = torch.tensor(sum(self.examples_in(b) for b in batch_samples), device=device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            n = self.accelerator.gather(n).sum()
        return n

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if num_items_in_batch is None:  # evaluation: TRL's mean over the batch
            return result
        loss, rest = result if return_outputs else (result, None)
        # TRL's mean over this micro-batch -> this micro-batch's share of the mean over the whole step
        loss = loss * (self.examples_in(inputs) / num_items_in_batch)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            loss = loss * self.accelerator.num_processes  # the gradients are averaged over processes
        return (loss, rest) if return_outputs else loss

    def _get_eval_sampler(self, eval_dataset):
        """Evaluation in order (the Trainer would group it by length too, and has no lengths of pairs)."""
        return None if eval_dataset is None else torch.utils.data.SequentialSampler(eval_dataset)

    def _get_train_sampler(self, train_dataset=None):
        if self.args.train_sampling_strategy != "group_by_length" or self.lengths is None:
            return super()._get_train_sampler(train_dataset)
        args = self.args
        return StepGroupedSampler(
            args.train_batch_size * args.gradient_accumulation_steps * args.world_size,
            lengths=self.lengths,
            seed=args.data_seed if args.data_seed is not None else args.seed,
        )


def make_trainer(stage: str, **kwargs):
    trainer, _ = trl_classes(stage)
    cls = type(f"Chat{trainer.__name__}", (PreferenceTrainer, trainer), {})
    return cls(**kwargs)


def training_columns(prepared: PreparedPreferences, stage: str) -> datasets.Dataset:
    """What the stage's trainer takes: DPO and KTO the encoded ids as they are; ORPO and CPO their older layout
    (prompt_*, chosen_*, rejected_* input_ids, attention_mask and labels, the prompt untrained)."""
    dataset = prepared.dataset.remove_columns(["file", "record"])
    if stage not in REFERENCE_FREE:
        return dataset

    def orpo_columns(row: dict) -> dict:
        prompt = row["prompt_ids"]
        out = {"prompt_input_ids": prompt, "prompt_attention_mask": [1] * len(prompt)}
        for side in ("chosen", "rejected"):
            reply = row[f"{side}_ids"]
            out[f"{side}_input_ids"] = prompt + reply
            out[f"{side}_attention_mask"] = [1] * (len(prompt) + len(reply))
            out[f"{side}_labels"] = [IGNORE_INDEX] * len(prompt) + reply
        return out

    return dataset.map(orpo_columns, remove_columns=dataset.column_names, desc="layout for TRL")


# ---------------------------------------------------------------------------------------------------- main


def load_split(name, files, stage, data_args, model_args, tokenizer, log) -> PreparedPreferences:
    log(f"--- {name} data ({'labelled replies' if stage == 'kto' else 'preference pairs'}) ---")
    prepared = prepare_preferences(
        files,
        data_args.train_format,
        tokenizer,
        model_args.template,
        data_args.max_seq_length,
        data_args.max_source_length,
        unpaired=stage == "kto",
        log=log,
    )
    for line in report_lines(prepared, tokenizer):
        log(line)
    return prepared


def plan_pairs(stage: str, model_args, data_args, training_args, log) -> None:
    """SFT's micro-batch planning (chatft.machine.plan_step) with a pair as one row of both its sequences; any
    split of a step trains the same (PreferenceTrainer.compute_loss). Not for KTO, whose KL term is estimated
    from the other replies of the same batch."""
    if stage == "kto":
        log("micro-batches: none (KTO estimates its KL term from the other replies of each batch)")
        return
    log(
        "micro-batches: a pair counts as one row of 2 x --max_seq_length tokens (its chosen and rejected replies)"
    )
    pairs = dataclasses.replace(data_args, max_seq_length=2 * data_args.max_seq_length)
    plan_micro_batches(model_args, pairs, training_args, log)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    stage = requested_stage(argv)
    # peft and TRL read is_gradient_checkpointing, deprecated in transformers 5 (-> is_activation_checkpointing)
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    try:
        model_args, data_args, pref_args, training_args = parse_preference_args(argv, stage)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    log = start_process(training_args)
    try:
        start_from(model_args, pref_args, log)
        tokenizer = load_tokenizer(model_args)
        with training_args.main_process_first(desc="preprocessing"):
            train = load_split("train", data_args.train_file, stage, data_args, model_args, tokenizer, log)
            evaluation = None
            if data_args.eval_file:
                evaluation = load_split(
                    "eval", data_args.eval_file, stage, data_args, model_args, tokenizer, log
                )
    except (DataFileError, TemplateError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    refusal = data_refused(data_args, train, evaluation)
    if refusal:
        print(f"error: {refusal}", file=sys.stderr)
        return 1
    if stage == "kto":
        training_args.train_sampling_strategy = (
            "sequential"  # TRL's KTO pairs each reply with its neighbour's
        )
    elif training_args.group_by_length and training_args.train_sampling_strategy == "random":
        training_args.train_sampling_strategy = "group_by_length"
    log(f"precision: {training_args.precision} ({training_args.precision_why})")
    plan_pairs(stage, model_args, data_args, training_args, log)
    if evaluation is not None and training_args.eval_strategy == "no":
        training_args.eval_strategy = "steps"
        training_args.eval_steps = training_args.eval_steps or training_args.save_steps
        log(f"--eval_file given: evaluating every {training_args.eval_steps} steps")

    set_seed(training_args.seed)  # before the model is built: LoRA weights are random
    try:
        resume = resolve_resume(training_args)
        model = load_model(model_args, training_args, adapter=pref_args.adapter)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    warning = position_warning(base_model(model).config, data_args.max_seq_length, train.stats.lengths)
    if warning:
        log(warning)
    log(describe_reference(stage, model_args, pref_args, training_args))
    run_args = {
        "model": dataclasses.asdict(model_args),
        "preference": dataclasses.asdict(pref_args),
        # formats: as SFT's run_args; train_format: what inference renders (input-output data: raw prompts)
        "data": dataclasses.asdict(data_args)
        | {"formats": train.formats, "closing_tokens": train.stats.closing_tokens}
        | raw_format(train),
        "training": training_args.to_dict(),
    }
    pairs = zip(train.stats.lengths[::2], train.stats.lengths[1::2], strict=True) if stage != "kto" else []
    lengths = [max(a, b) for a, b in pairs]  # what a pair puts into a padded batch
    trainer = make_trainer(
        stage,
        model=model,
        args=training_args,
        train_dataset=training_columns(train, stage),
        eval_dataset=training_columns(evaluation, stage) if evaluation else None,
        processing_class=tokenizer,
        callbacks=[SaveRunArgs(run_args)],
        continuing=bool(pref_args.adapter),
        lengths=None if stage == "kto" else lengths,
    )
    trainer.train(resume_from_checkpoint=resume)
    model.config.use_cache = True
    trainer.save_model(training_args.output_dir)
    if trainer.is_world_process_zero():
        write_run_args(Path(training_args.output_dir), run_args)
        trainer.save_state()
        png = plot_loss(trainer.state.log_history, Path(training_args.output_dir))
        log(f"model saved to {training_args.output_dir}" + (f"; loss curve: {png}" if png else ""))
    return 0


def raw_format(prepared: PreparedPreferences) -> dict:
    formats = set(prepared.formats.values())
    return {"train_format": "input-output"} if formats == {"input-output"} else {}


def describe_reference(stage: str, model_args: ModelArguments, pref_args, training_args) -> str:
    if stage in REFERENCE_FREE:
        return f"reference model: none ({stage} is reference-free)"
    if training_args.precompute_ref_log_probs:
        return "reference model: the starting model's log-probabilities, computed once before training"
    if pref_args.adapter:
        return f"reference model: the adapter {pref_args.adapter} as loaded (a frozen copy named ref)"
    if model_args.method in ("lora", "qlora"):
        return "reference model: the model with the adapter disabled (no second copy)"
    return f"reference model: a second copy of {model_args.model_name_or_path}"
