"""TRL's preference trainers (trl pinned in requirements.txt) as chatft runs them, on data read and encoded by
chatft (chatft.preference.encode) instead of TRL's own tokenization: the stage's arguments (chatft's and TRL's
config in one dataclass), the trainer mixin, and the columns each trainer takes.

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

import functools
import importlib
import os

import datasets
import torch
from transformers import HfArgumentParser

from chatft.args import DataArguments, ModelArguments, PreferenceArguments
from chatft.data.templates import IGNORE_INDEX
from chatft.methods import _upcast_trainable
from chatft.preference.encode import PreparedPreferences
from chatft.training.arguments import with_trl_config
from chatft.training.trainer import StepGroupedSampler

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
    """chatft's TrainArguments and the stage's TRL config in one dataclass (module docstring: the defaults)."""
    _, config = trl_classes(stage)
    defaults = {"learning_rate": 5e-5} | STAGE_DEFAULTS.get(stage, {})
    return with_trl_config(f"{stage.upper()}TrainArguments", config, __name__, defaults)


def __getattr__(name: str) -> type:
    stage = name.removesuffix("TrainArguments").lower()
    if name.endswith("TrainArguments") and stage in TRAINERS:
        return stage_arguments(stage)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def make_parser(stage: str) -> HfArgumentParser:
    return HfArgumentParser((ModelArguments, DataArguments, PreferenceArguments, stage_arguments(stage)))


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
