"""The Trainer as chatft runs it: the loss at trained positions (chatft.loss), packed rows guarded against
attending across examples, step statistics, length grouping that any split or resume keeps, the attention a
packed run uses, and P-Tuning v2's whole prefix encoder in every checkpoint."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

import datasets
import torch
from transformers import Trainer
from transformers.trainer_pt_utils import LengthGroupedSampler, get_length_grouped_indices

from chatft.collator import PackedCollator
from chatft.data.templates import IGNORE_INDEX
from chatft.loss import DEFAULT_CHUNK_SIZE, causal_lm_loss, unsupported_reason
from chatft.methods import PREFIX_ENCODER_FILE, load_prefix_encoder, save_prefix_encoder
from chatft.packing import expect_packed, install_isolation_guard, register_packed_sdpa
from chatft.training.samples import base_model


def packed_attention(model, attn_implementation: str, log, cuda: bool = False) -> str:
    """The attention a packed run uses when the model's is sdpa. On the CPU, chatft's packed sdpa: one causal sdpa
    call per example, no block-diagonal mask over the row (chatft.packing); its boundaries are read on the host,
    which suits the CPU. On a GPU, flash attention's varlen kernel where flash-attn is installed (the collator
    flattens the batch and passes cu_seqlens), else transformers' sdpa with the block-diagonal mask it builds from
    the position ids. Other attentions stay: eager and flex get a block mask, flash its varlen kernel."""
    if (attn_implementation or "sdpa") != "sdpa":
        return attn_implementation
    if cuda:
        if importlib.util.find_spec("flash_attn") is not None:
            base_model(model).set_attn_implementation("flash_attention_2")
            log("packing: flash attention 2, varlen over the flattened batch (no padding, no mask)")
            return "flash_attention_2"
        log("packing: torch sdpa with a block-diagonal mask built from the position ids (no flash-attn here)")
        return attn_implementation
    name = register_packed_sdpa()
    base_model(model).set_attn_implementation(name)
    log("packing: attention by torch sdpa, causal, once per example (no block mask over the row)")
    return name


class ChatTrainer(Trainer):
    """The Trainer with chatft.loss (loss at trained positions, LM head in chunks) and step statistics.

    Logged with the loss: examples_per_step, tokens_per_step (non-pad) and trained_tokens_per_step, summed over
    processes; at the end: train_examples, train_tokens, train_trained_tokens and their rates per second.
    """

    def __init__(
        self,
        *args,
        chunked_loss: bool = True,
        loss_chunk_size: int = DEFAULT_CHUNK_SIZE,
        generation_eval: Callable | None = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.generation_eval = generation_eval
        self.loss_chunk_size = loss_chunk_size
        self.compiled_loss = False  # chatft.inductor: the loss's log-softmax by TorchInductor
        # packed rows: every attention call must keep the examples apart (chatft.packing.expect_packed)
        self.packed = isinstance(self.data_collator, PackedCollator)
        if self.packed:
            install_isolation_guard(self.accelerator.unwrap_model(self.model))
        reason = unsupported_reason(self.accelerator.unwrap_model(self.model)) if chunked_loss else None
        if reason and self.is_world_process_zero():
            print(f"chunked loss: off, {reason}; using the model's own loss")
        self.chunked_loss = chunked_loss and reason is None
        if self.chunked_loss:
            # chatft.loss divides by num_items_in_batch itself: have the Trainer count it, and not rescale
            self.model_accepts_loss_kwargs = True
        # examples, tokens (non-pad), trained tokens, positions (with padding) since the last log / in all
        self._window = torch.zeros(4, dtype=torch.long)
        self._total = torch.zeros(4, dtype=torch.long)
        self._window_start = None

    def get_train_dataloader(self):
        """A stream that reads its own share of the data (chatft.training.stream) is not handed to accelerate,
        which would read it on the main process only and dispatch the batches (or read it all on each)."""
        dataset = self.train_dataset
        if getattr(dataset, "reads_own_share", False):
            return torch.utils.data.DataLoader(
                dataset, batch_size=self._train_batch_size, collate_fn=self.data_collator, num_workers=0
            )
        return super().get_train_dataloader()

    def _get_train_sampler(self, train_dataset=None):
        """Length grouping by StepGroupedSampler instead of the Trainer's (which groups per process and draws
        from the global random state)."""
        dataset = self.train_dataset if train_dataset is None else train_dataset
        args = self.args
        if args.train_sampling_strategy != "group_by_length" or not isinstance(dataset, datasets.Dataset):
            return super()._get_train_sampler(train_dataset)
        return StepGroupedSampler(
            args.train_batch_size * args.gradient_accumulation_steps * args.world_size,
            lengths=dataset[args.length_column_name],
            seed=args.data_seed if args.data_seed is not None else args.seed,
        )

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """P-Tuning v2: with the adapter (and with every checkpoint, which saves through here first), the whole
        prefix encoder: embedding, and with --prefix_projection the MLP, which an exact resume needs."""
        super().save_model(output_dir, _internal_call)
        model = self.accelerator.unwrap_model(self.model)
        if is_prefix_tuning(model) and self.args.should_save:
            save_prefix_encoder(model, output_dir or self.args.output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """P-Tuning v2: the whole prefix encoder (with --prefix_projection its MLP too, which peft's checkpoint
        lacks: it holds the projected prefix) from PREFIX_ENCODER_FILE; everything else as the Trainer does."""
        peft_model = self.accelerator.unwrap_model(model if model is not None else self.model)
        if not is_prefix_tuning(peft_model):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        path = Path(resume_from_checkpoint) / PREFIX_ENCODER_FILE
        if not path.is_file():
            raise ValueError(
                f"{resume_from_checkpoint} has no {PREFIX_ENCODER_FILE} (written by chatft with every P-Tuning "
                "checkpoint), so the prefix encoder cannot be restored exactly; continue from its prefix with "
                f"--ptuning_checkpoint {resume_from_checkpoint} instead (a new optimizer and schedule)"
            )
        load_prefix_encoder(peft_model, resume_from_checkpoint)

    def evaluate(self, *args, **kwargs) -> dict[str, float]:
        """The eval loss, and with --predict_with_generate the ROUGE/BLEU of greedy answers on the eval set."""
        metrics = super().evaluate(*args, **kwargs)
        if self.generation_eval is not None:
            scores = {f"eval_{k}": v for k, v in self.generation_eval(self.model).items()}
            self.log(scores)
            metrics.update(scores)
        return metrics

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        num_examples = inputs.pop("num_examples", None)
        num_tokens = inputs.pop("num_tokens", None)
        if model.training:
            self._count(inputs, num_examples, num_tokens)
        with expect_packed(inputs.get("position_ids") if self.packed else None):
            if not self.chunked_loss:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            labels = inputs.pop("labels")
            loss, outputs = causal_lm_loss(
                model, inputs, labels, num_items_in_batch, self.loss_chunk_size, compiled=self.compiled_loss
            )
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # num_items_in_batch counts every process's tokens, and the gradients are averaged over processes
            loss = loss * self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss

    def _count(self, inputs, num_examples, num_tokens) -> None:
        labels = inputs["labels"]
        if num_examples is None:
            num_examples = labels.shape[0]
            mask = inputs.get("attention_mask")
            num_tokens = mask.sum() if mask is not None else labels.numel()
        trained = (labels[..., 1:] != IGNORE_INDEX).sum()
        counts = [num_examples, num_tokens, trained, labels.numel()]
        counts = torch.stack([torch.as_tensor(x, device=labels.device).reshape(()) for x in counts])
        self._window = self._window.to(labels.device) + counts
        if self._window_start is None:
            self._window_start = self.state.global_step

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # every process calls log() at the same points of training, so the sums over processes are safe here
        if "loss" in logs and self._window_start is not None:
            steps = max(1, self.state.global_step - self._window_start)
            window = self._flush()
            for name, value in zip(("examples", "tokens", "trained_tokens"), window[:3], strict=True):
                logs[f"{name}_per_step"] = round(value / steps, 2)
        if "train_runtime" in logs:
            self._flush()  # steps after the last logged one
            runtime = logs["train_runtime"] or 1.0
            examples, tokens, trained, positions = self._total.tolist()
            for name, value in (("examples", examples), ("tokens", tokens), ("trained_tokens", trained)):
                logs[f"train_{name}"] = value
                logs[f"train_{name}_per_second"] = round(value / runtime, 3)
            logs["train_padding_share"] = round(1 - tokens / positions, 4) if positions else 0.0
            # the Trainer counts the samples of the steps it planned at the start: under --time_budget a
            # provisional billion; these are the steps run (batch rows per step)
            rows = self.args.train_batch_size * self.args.gradient_accumulation_steps * self.args.world_size
            logs["train_samples_per_second"] = round(self.state.global_step * rows / runtime, 3)
        super().log(logs, start_time)

    def _flush(self) -> list[int]:
        """The counts since the last flush, summed over processes, added to the totals."""
        window = self._window
        if self.accelerator.num_processes > 1:
            window = self.accelerator.reduce(window, reduction="sum")
        window = window.cpu()
        self._total += window
        self._window = torch.zeros_like(self._window)
        self._window_start = self.state.global_step
        return window.tolist()


class StepGroupedSampler(LengthGroupedSampler):
    """The Trainer's length grouping, with two changes that keep a run the same however it is split or resumed:
    groups of whole optimizer steps of all processes (batch x accumulation x processes), so every split of a step
    batches the same examples together; and an order drawn from (seed, epoch) alone, so a resumed run redraws
    the interrupted epoch's order exactly (the Trainer's draws from the global random state, which is elsewhere
    by then)."""

    def __init__(self, batch_size: int, lengths: list[int], seed: int) -> None:
        super().__init__(batch_size, lengths=lengths)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:  # the Trainer calls it at the start of every epoch
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(get_length_grouped_indices(self.lengths, self.batch_size, generator=generator))


def is_prefix_tuning(model) -> bool:
    config = getattr(model, "peft_config", {}).get(getattr(model, "active_adapter", "default"))
    return str(getattr(config, "peft_type", "")).endswith("PREFIX_TUNING")
