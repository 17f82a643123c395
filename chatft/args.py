"""Argument groups for finetune.py, parsed with HfArgumentParser (command line, or --config run.yaml)."""

from __future__ import annotations

from dataclasses import dataclass, field

from chatft.demo_model import DEFAULT_MODEL_DIR

METHODS = ("full", "ptuning", "lora", "qlora")
# sft: supervised; dpo, orpo, simpo, kto: preference tuning (chatft.preference); grpo: online RL (chatft.grpo)
STAGES = ("sft", "dpo", "orpo", "simpo", "kto", "grpo")
RUN_ARGS_FILE = "run_args.json"  # a run's arguments, written beside every checkpoint and read by inference
FORMATS = ("auto", "multi-turn", "input-output", "openai", "alpaca", "sharegpt")


def check_lengths(max_seq_length: int, max_source_length: int | None, max_target_length: int | None) -> None:
    for name, value in (
        ("max_seq_length", max_seq_length),
        ("max_source_length", max_source_length),
        ("max_target_length", max_target_length),
    ):
        if value is not None and value < 1:
            raise ValueError(f"--{name} must be a positive number of tokens, not {value}")


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        default=str(DEFAULT_MODEL_DIR),
        metadata={
            "help": "Model folder (default: the demo SmolLM2-135M-Instruct from scripts/get_demo_model.sh)."
        },
    )
    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "Tokenizer folder; default: the model's own."}
    )
    method: str = field(default="lora", metadata={"help": "Fine-tuning method.", "choices": list(METHODS)})
    stage: str = field(
        default="sft",
        metadata={
            "help": "sft: supervised fine-tuning on conversations; dpo, orpo, simpo, kto: preference tuning on "
            "chosen/rejected replies (or KTO's labelled ones) through TRL (docs/preference.md); grpo: online RL "
            "with rewards a program checks (docs/grpo.md).",
            "choices": list(STAGES),
        },
    )
    template: str | None = field(
        default=None,
        metadata={
            "help": "Chat template: unset uses the tokenizer's own chat template; a native one by name "
            "(chatml, chatglm3) for tokenizers without one or with a broken one."
        },
    )
    pre_seq_len: int = field(
        default=128, metadata={"help": "P-Tuning v2: number of prefix tokens per layer."}
    )
    prefix_projection: bool = field(
        default=False, metadata={"help": "P-Tuning v2: reparametrize the prefix with a two-layer MLP."}
    )
    quantization_bit: int | None = field(
        default=None,
        metadata={"help": "Load the frozen base in 4-bit NF4 or 8-bit (bitsandbytes); qlora defaults to 4."},
    )
    ptuning_checkpoint: str | None = field(
        default=None, metadata={"help": "P-Tuning v2 checkpoint to continue training from."}
    )
    lora_rank: int = field(default=8, metadata={"help": "LoRA rank r."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha (scale = alpha / r)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout."})
    lora_target: str = field(
        default="all-linear",
        metadata={
            "help": "Comma-separated module names for LoRA, or all-linear (every linear layer but the head)."
        },
    )
    fused_lora: bool = field(
        default=True,
        metadata={"help": "LoRA layers train as one fused function each (chatft.fused_lora); False: peft's."},
    )
    attn_implementation: str | None = field(
        default=None,
        metadata={
            "help": "Attention backend: sdpa, eager, flash_attention_2, flex_attention; default: the model's own "
            "choice (sdpa where the architecture supports it, else eager: Gemma-2)."
        },
    )

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"--method must be one of {', '.join(METHODS)}, not {self.method!r}")
        if self.stage not in STAGES:
            raise ValueError(f"--stage must be one of {', '.join(STAGES)}, not {self.stage!r}")
        if self.quantization_bit not in (None, 4, 8):
            raise ValueError(f"--quantization_bit must be 4 or 8, not {self.quantization_bit}")
        if self.method == "qlora" and self.quantization_bit is None:
            self.quantization_bit = 4
        if self.method == "full" and self.quantization_bit is not None:
            raise ValueError(
                "--quantization_bit cannot be used with --method full (a quantized base cannot be trained)"
            )
        if self.method == "lora" and self.quantization_bit is not None:
            self.method = "qlora"


@dataclass
class DataArguments:
    train_file: list[str] = field(
        default_factory=list,
        metadata={"help": "Training data: one or more .json/.jsonl files or directories."},
    )
    train_format: str = field(
        default="auto", metadata={"help": "Input format of the data files.", "choices": list(FORMATS)}
    )
    eval_file: list[str] = field(default_factory=list, metadata={"help": "Evaluation data, same formats."})
    max_seq_length: int = field(
        default=2048, metadata={"help": "Longest example in tokens; later turns are dropped first, then cut."}
    )
    max_source_length: int | None = field(
        default=None, metadata={"help": "input-output format: cut the prompt to this many tokens."}
    )
    max_target_length: int | None = field(
        default=None,
        metadata={
            "help": "input-output format: cut the response to this many tokens, its EOS included when it fits "
            "(a cut response gets none)."
        },
    )
    chat_template_kwargs: dict | str | None = field(
        default=None,
        metadata={
            "help": "Extra variables for the chat template, as a JSON object, e.g. '{\"enable_thinking\": false}' "
            "(Qwen3-style templates: answers without reasoning, the empty think block given in the prompt). Given "
            "to every rendering of the data (and check_data.py's), part of the preprocessing cache key, saved "
            "with the run."
        },
    )
    preprocessing_num_workers: int | None = field(
        default=None,
        metadata={
            "help": "Processes that validate and tokenize (datasets.map num_proc). Default: the usable cores, one "
            "per 5,000 records at most."
        },
    )
    skip_invalid_records: bool = field(
        default=False, metadata={"help": "Skip invalid records (counted and listed) instead of stopping."}
    )
    packing: bool | None = field(
        default=None,
        metadata={
            "help": "Pack whole examples into rows of up to max_seq_length tokens (padding-free, each example "
            "attending only to itself). Default: on for full, lora and qlora; ptuning cannot pack and pads instead."
        },
    )
    packed_batch_unit: str = field(
        default="examples",
        metadata={
            "help": "What a packed run's per_device_train_batch_size counts. examples: batch x accumulation x "
            "processes examples a step, turned into whole packed rows per process from the data's examples per "
            "row, never more examples than asked (an epoch has at least as many steps as unpacked). rows: a batch "
            "item is a packed row (LLaMA-Factory's way; a step then holds several times the examples).",
            "choices": ["examples", "rows"],
        },
    )
    preprocessing_cache: bool = field(
        default=True,
        metadata={
            "help": "Keep the tokenized data on disk, keyed by the data files' content, the tokenizer, template, "
            "format and length settings; a later run with the same ones loads it instead of tokenizing."
        },
    )
    preprocessing_cache_dir: str | None = field(
        default=None,
        metadata={
            "help": "Folder of that cache (default: $CHATFT_CACHE, else ~/.cache/chatft/preprocessed)."
        },
    )
    overwrite_cache: bool = field(
        default=False, metadata={"help": "Tokenize afresh even when the cache has the data (and rewrite it)."}
    )
    streaming: bool = field(
        default=False,
        metadata={
            "help": "Tokenize and pack the data as training goes (files or fsspec URLs); needs --max_steps."
        },
    )
    buffer_size: int = field(default=16384, metadata={"help": "--streaming: records in the shuffle buffer."})
    data_shared_file_system: bool = field(
        default=False,
        metadata={
            "help": "The nodes share the cache's file system: one process of all prepares the data (default: one "
            "per node)."
        },
    )

    def __post_init__(self) -> None:
        if self.train_format not in FORMATS:
            raise ValueError(f"--train_format must be one of {', '.join(FORMATS)}, not {self.train_format!r}")
        check_lengths(self.max_seq_length, self.max_source_length, self.max_target_length)
        from chatft.data.templates import parse_chat_template_kwargs  # transformers: only once parsed

        # a dict from here on (None when empty): what the run saves and the data preparation takes
        self.chat_template_kwargs = parse_chat_template_kwargs(self.chat_template_kwargs) or None


@dataclass
class PreferenceArguments:
    """--stage dpo|orpo|simpo|kto only (chatft.preference); the losses' own knobs (--beta, --loss_type, ...) are
    TRL's config fields, on the same command line."""

    adapter: str | None = field(
        default=None,
        metadata={
            "help": "Start from this SFT LoRA/QLoRA adapter and go on training it (its base is the model unless "
            "--model_name_or_path says otherwise); the reference is the adapter as loaded. Without it: a new "
            "adapter (lora, qlora) or all weights (full) of --model_name_or_path, which may be a full SFT folder."
        },
    )


@dataclass
class GRPOArguments:
    """--stage grpo only (chatft.grpo); GRPO's own knobs (--num_generations, --max_completion_length, --beta,
    --temperature, --reward_weights, ...) are TRL's GRPOConfig fields, on the same command line."""

    reward_funcs: list[str] = field(
        default_factory=lambda: ["accuracy"],
        metadata={
            "help": "Reward functions: built-in accuracy, format, tool_call, length (docs/grpo.md says each rule), "
            "and path/to/file.py:function (TRL's signature: prompts, completions, **columns -> a float or None "
            "per completion). Default: accuracy.",
            "nargs": "+",
        },
    )
    adapter: str | None = field(
        default=None,
        metadata={
            "help": "Start from this SFT LoRA/QLoRA adapter and go on training it (as --stage dpo does)."
        },
    )
    max_prompt_length: int | None = field(
        default=None,
        metadata={
            "help": "Records whose rendered prompt is longer than this many tokens are skipped and counted."
        },
    )
    tool_module: str | None = field(
        default=None,
        metadata={
            "help": "A .py file whose functions implement the tools the records declare: rollouts run the model's "
            "tool calls and go on after their results (rendered by the template, never trained); at most "
            "--max_tool_calling_iterations rounds a rollout (docs/grpo.md)."
        },
    )
    tool_timeout: float = field(
        default=10.0,
        metadata={"help": "--tool_module: seconds a tool call may take; then its result is an error."},
    )
