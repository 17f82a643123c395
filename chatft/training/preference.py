"""The preference stage (finetune.py --stage dpo|orpo|simpo|kto): pairs (or KTO's labelled replies) in, a tuned
model or adapter out, through TRL's trainers (chatft.training.preference_trainer says what chatft changes in them).

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
"""

from __future__ import annotations

import dataclasses
import sys
import warnings

from chatft.args import ModelArguments
from chatft.methods import load_model, load_tokenizer
from chatft.preference.encode import (
    PreparedPreferences,
    check_target_length,
    prepare_preferences,
    report_lines,
)
from chatft.training.checkpoints import SaveRunArgs
from chatft.training.command_line import parse_args, requested_stage
from chatft.training.flow import (
    bad_input_stops,
    load_sets,
    run_stage,
    seeded_model,
    sft_only,
    start_from,
    train_and_save,
    warn_positions,
)
from chatft.training.preference_trainer import (
    PREFERENCE_HELP,
    REFERENCE_FREE,
    make_parser,
    make_trainer,
    training_columns,
)
from chatft.training.process import start_process
from chatft.training.samples import add_sample_answers, base_model, read_sample_prompts
from chatft.training.step_plan import plan_micro_batches, schedule_evaluation


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
    return run_stage(lambda: run_preference(argv, requested_stage(argv)))


def run_preference(argv: list[str], stage: str) -> int:
    # peft and TRL read is_gradient_checkpointing, deprecated in transformers 5 (-> is_activation_checkpointing)
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    with bad_input_stops():
        model_args, data_args, pref_args, training_args = parse_preference_args(argv, stage)
        sft_only(training_args, stage)
    log = start_process(training_args)
    with bad_input_stops():
        start_from(model_args, pref_args.adapter, log)
        tokenizer = load_tokenizer(model_args)

    def prepare(files: list[str]) -> PreparedPreferences:
        return prepare_preferences(
            files,
            data_args.train_format,
            tokenizer,
            model_args.template,
            data_args.max_seq_length,
            data_args.max_source_length,
            unpaired=stage == "kto",
            log=log,
            chat_template_kwargs=data_args.chat_template_kwargs,
        )

    what = " (labelled replies)" if stage == "kto" else " (preference pairs)"
    train, evaluation = load_sets(
        training_args, data_args, prepare, lambda prepared: report_lines(prepared, tokenizer), log, what
    )
    if stage == "kto":  # TRL's KTO pairs each reply with its neighbour's
        training_args.train_sampling_strategy = "sequential"
    elif training_args.group_by_length and training_args.train_sampling_strategy == "random":
        training_args.train_sampling_strategy = "group_by_length"
    log(f"precision: {training_args.precision} ({training_args.precision_why})")
    plan_pairs(stage, model_args, data_args, training_args, log)
    schedule_evaluation(evaluation is not None, training_args, log)

    resume, model = seeded_model(
        training_args, lambda: load_model(model_args, training_args, adapter=pref_args.adapter)
    )
    warn_positions(model, data_args.max_seq_length, train.stats.lengths, log)
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
    if training_args.sample_prompts:
        with bad_input_stops():
            samples = read_sample_prompts(training_args.sample_prompts, data_args.train_format)
        attention = base_model(model).config._attn_implementation
        add_sample_answers(trainer, samples, model_args, data_args, training_args, tokenizer, attention, log)
    train_and_save(trainer, model, training_args, run_args, resume, log)
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
