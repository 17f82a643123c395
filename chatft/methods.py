"""Model setup per fine-tuning method: what gets trained and what `save_pretrained` writes.

- full: every parameter trained, the whole model saved.
- ptuning (P-Tuning v2): a peft prefix (per-layer key/value prefix) trained, the base frozen (optionally 4/8-bit);
  only the prefix is saved.
- lora: peft LoRA adapters trained, the base frozen; only the adapters are saved.
- qlora: LoRA on a 4-bit NF4 (double quant) or 8-bit bitsandbytes base.
"""

from __future__ import annotations

import json
import logging
import os
import types
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from chatft.fused_lora import fuse_lora_layers

if TYPE_CHECKING:
    import transformers

    from chatft.args import ModelArguments

logger = logging.getLogger(__name__)

HALF_DTYPES = (torch.float16, torch.bfloat16)
# P-Tuning v2: the whole prefix encoder (embedding, and the MLP with prefix_projection, which peft's own adapter
# file lacks: it holds the projected prefix), saved by chatft.training.trainer with every checkpoint
PREFIX_ENCODER_FILE = "prefix_encoder.safetensors"


# ----------------------------------------------------------------------------------------------------------------
# tokenizer


def load_tokenizer(model_args: ModelArguments) -> PreTrainedTokenizerBase:
    """The tokenizer from --tokenizer_name_or_path or the model folder; eos doubles as pad when there is no pad."""
    path = model_args.tokenizer_name_or_path or model_args.model_name_or_path
    what = "--tokenizer_name_or_path" if model_args.tokenizer_name_or_path else "--model_name_or_path"
    if not Path(path).is_dir():
        raise ValueError(f"{what} {path}: no such folder")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise ValueError(f"{what} {path}: cannot load a tokenizer from it ({_one_line(e)})") from e
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"{what} {path}: the tokenizer has neither a pad token nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
        _say(f"The tokenizer has no pad token; using its eos token {tokenizer.eos_token!r} as pad.")
    return tokenizer


# ----------------------------------------------------------------------------------------------------------------
# model


def load_model(
    model_args: ModelArguments, training_args: transformers.TrainingArguments, adapter: str | None = None
) -> PreTrainedModel:
    """Load the causal LM and set it up for training with model_args.method.

    Returns the plain model (full) or a peft `PeftModel` (ptuning, lora, qlora). Mutates training_args where the
    method requires it: gradient checkpointing is turned off for ptuning, and its kwargs get use_reentrant=False.
    adapter (lora, qlora): a saved LoRA adapter whose training goes on, instead of a new one.
    """
    method = model_args.method
    _check_model_dir(model_args.model_name_or_path)
    if model_args.ptuning_checkpoint and method != "ptuning":
        raise ValueError(f"--ptuning_checkpoint is only for --method ptuning, not --method {method}")
    if adapter and method not in ("lora", "qlora"):
        raise ValueError(f"--adapter {adapter} goes on training a LoRA adapter: use --method lora or qlora")
    prefix_checkpoint = (
        _read_prefix_checkpoint(model_args.ptuning_checkpoint) if model_args.ptuning_checkpoint else None
    )

    checkpointing = _checkpointing_requested(training_args)
    if checkpointing and method == "ptuning":
        _say(
            "Gradient checkpointing does not work with P-Tuning v2 (peft's prefix is a key/value cache, which "
            "checkpointing breaks); turning it off."
        )
        _set_checkpointing(training_args, False)
        checkpointing = False

    # full: fp32 master weights; --bf16/--fp16 compute runs under the Trainer's autocast, and DeepSpeed casts
    # the module itself (a half-precision model updated in place would lose small updates, or fail under fp16).
    dtype = torch.float32 if method == "full" else half_dtype(training_args) or torch.float32
    model = _from_pretrained(model_args, dtype)
    model.config.use_cache = False  # training: no KV cache (checkpointing also forbids it)

    quantized = model_args.quantization_bit is not None
    if method == "full":
        model.requires_grad_(True)
        if checkpointing:
            _enable_checkpointing(model, training_args)
    else:
        if quantized:
            from peft import prepare_model_for_kbit_training

            # Freezes the base and casts its non-quantized weights (norms, embeddings) to fp32. Checkpointing is
            # enabled just below with the training args' kwargs, as the Trainer will.
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        else:
            model.requires_grad_(False)
        if checkpointing:
            # Before peft wraps the model, so that peft sees it. Reentrant checkpointing needs the embeddings'
            # outputs to require grads: peft hooks that for non-quantized bases, transformers 5 in
            # activation_checkpointing_enable; done here too for quantized ones, as prepare_model_for_kbit_training
            # would.
            reentrant = _enable_checkpointing(model, training_args)
            if reentrant and quantized:
                model.enable_input_require_grads()
        if method == "ptuning":
            model = _add_prefix(model, model_args, prefix_checkpoint)
        elif adapter:
            model = _continue_lora(model, adapter)
        else:
            model = _add_lora(model, model_args)
        _upcast_trainable(model)
        _no_adapter_input_casts(model)
        if method in ("lora", "qlora") and model_args.fused_lora:
            fused = fuse_lora_layers(model)
            if fused and _is_main_process():
                print(
                    f"LoRA: {fused} layers train through one fused function each (--fused_lora)", flush=True
                )

    if _is_main_process():
        print(describe_trainable(model), flush=True)
    return model


def save_prefix_encoder(model: Any, folder: str | Path) -> None:
    """P-Tuning v2: the peft model's whole prefix encoder into folder/PREFIX_ENCODER_FILE."""
    from safetensors.torch import save_file

    encoder = model.prompt_encoder[model.active_adapter]
    state = {k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}
    save_file(state, str(Path(folder) / PREFIX_ENCODER_FILE))


def load_prefix_encoder(model: Any, folder: str | Path) -> None:
    """The inverse of save_prefix_encoder (RuntimeError when the shapes do not fit)."""
    from safetensors.torch import load_file

    model.prompt_encoder[model.active_adapter].load_state_dict(
        load_file(str(Path(folder) / PREFIX_ENCODER_FILE))
    )


def describe_trainable(model: torch.nn.Module) -> str:
    """'trainable params: 1,234 || all params: 5,678 || trainable%: 0.0217' (4-bit weights counted unpacked)."""
    trainable = total = 0
    for param in model.parameters():
        n = getattr(param, "ds_numel", 0) or param.numel()  # DeepSpeed ZeRO-3 leaves empty placeholders
        if param.__class__.__name__ == "Params4bit":
            n *= 2 * param.element_size()  # two 4-bit values per byte of storage
        total += n
        if param.requires_grad:
            trainable += n
    share = 100 * trainable / total if total else 0.0
    return f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {share:.4f}"


def half_dtype(training_args: transformers.TrainingArguments) -> torch.dtype | None:
    """torch.bfloat16 / torch.float16 for --bf16 / --fp16, else None."""
    if getattr(training_args, "bf16", False):
        return torch.bfloat16
    if getattr(training_args, "fp16", False):
        return torch.float16
    return None


# ----------------------------------------------------------------------------------------------------------------
# helpers


def _from_pretrained(model_args: ModelArguments, dtype: torch.dtype) -> PreTrainedModel:
    kwargs: dict[str, Any] = {"dtype": dtype}
    if model_args.attn_implementation:
        kwargs["attn_implementation"] = model_args.attn_implementation
    bits = model_args.quantization_bit
    if bits is None:
        try:
            return AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path, **kwargs)
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(
                f"--model_name_or_path {model_args.model_name_or_path}: cannot load the model ({_one_line(e)})"
            ) from e

    from transformers import BitsAndBytesConfig

    if bits == 4:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
    else:
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        # bitsandbytes logs this on every 8-bit matmul whose input is not fp16 (fp32 norms, bf16 autocast)
        _log_once("bitsandbytes.autograd._functions", "MatMul8bitLt: inputs will be cast")
    if torch.cuda.is_available() and "LOCAL_RANK" in os.environ:
        # Each process puts its own quantized copy on its own GPU (transformers would pick the current device).
        kwargs["device_map"] = {"": int(os.environ["LOCAL_RANK"])}
    try:
        return AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path, **kwargs)
    except Exception as e:  # bitsandbytes fails in many ways (no backend, no GPU, missing library)
        raise ValueError(
            f"--quantization_bit {bits}: bitsandbytes could not load {model_args.model_name_or_path} "
            f"({type(e).__name__}: {_one_line(e)})"
        ) from e


def _add_prefix(model: PreTrainedModel, model_args: ModelArguments, checkpoint: Any) -> PreTrainedModel:
    from peft import (
        PrefixTuningConfig,
        TaskType,
        load_peft_weights,
        set_peft_model_state_dict,
    )

    if checkpoint is None:
        config = PrefixTuningConfig(
            task_type=TaskType.CAUSAL_LM,
            num_virtual_tokens=model_args.pre_seq_len,
            prefix_projection=model_args.prefix_projection,
            encoder_hidden_size=model.config.hidden_size,
        )
        return _get_peft_model(model, config)

    # peft refuses PeftModel.from_pretrained(..., is_trainable=True) for prompt-learning adapters, so the saved
    # config is rebuilt as a trainable one and the saved prefix loaded into it.
    path = model_args.ptuning_checkpoint
    config = checkpoint
    config.inference_mode = False
    encoder_file = Path(path) / PREFIX_ENCODER_FILE
    if encoder_file.is_file():  # chatft's checkpoints hold the whole encoder: go on exactly from it
        peft_model = _get_peft_model(model, config)
        try:
            load_prefix_encoder(peft_model, path)
        except RuntimeError as e:
            raise ValueError(
                f"--ptuning_checkpoint {path}: its prefix does not fit this model ({_one_line(e)})"
            ) from e
        return peft_model
    if config.prefix_projection:
        # peft saves a projected prefix as its projection's output, without the MLP that made it: training goes on
        # from that prefix directly, which is the same function (the MLP is only a reparametrization).
        _say(
            f"--ptuning_checkpoint {path} was trained with prefix_projection, whose MLP peft does not save; "
            "continuing from the saved (projected) prefix without the projection."
        )
        config.prefix_projection = False
    if config.num_virtual_tokens != model_args.pre_seq_len:
        _say(
            f"--ptuning_checkpoint {path} has {config.num_virtual_tokens} prefix tokens; using that instead of "
            f"--pre_seq_len {model_args.pre_seq_len}."
        )
    peft_model = _get_peft_model(model, config)
    try:
        set_peft_model_state_dict(peft_model, load_peft_weights(path, device="cpu"))
    except (OSError, RuntimeError, KeyError, ValueError) as e:
        raise ValueError(
            f"--ptuning_checkpoint {path}: its prefix does not fit this model ({_one_line(e)})"
        ) from e
    return peft_model


def _add_lora(model: PreTrainedModel, model_args: ModelArguments) -> PreTrainedModel:
    from peft import LoraConfig, TaskType

    target = model_args.lora_target.strip()
    if target == "all-linear":
        target_modules: str | list[str] = "all-linear"
    else:
        target_modules = [name.strip() for name in target.split(",") if name.strip()]
        if not target_modules:
            raise ValueError("--lora_target is empty: give module names (q_proj,v_proj) or all-linear")
    config = LoraConfig(
        r=model_args.lora_rank,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        target_modules=target_modules,
        task_type=TaskType.CAUSAL_LM,
    )
    try:
        return _get_peft_model(model, config)
    except ValueError as e:  # e.g. "Target modules {'x'} not found in the base model"
        raise ValueError(f"--lora_target {model_args.lora_target}: {_one_line(e)}") from e


def _continue_lora(model: PreTrainedModel, path: str) -> PreTrainedModel:
    """A saved LoRA adapter on the model, trainable (its rank, alpha and targets are its own)."""
    from peft import PeftModel

    peft_type = _peft_type(path, "--adapter")
    if peft_type != "LORA":
        raise ValueError(f"--adapter {path}: not a LoRA adapter (peft_type is {peft_type!r})")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        try:
            return PeftModel.from_pretrained(model, path, is_trainable=True)
        except (OSError, RuntimeError, KeyError, ValueError) as e:
            raise ValueError(f"--adapter {path}: it does not fit this model ({_one_line(e)})") from e


def _get_peft_model(model: PreTrainedModel, config: Any) -> PreTrainedModel:
    from peft import get_peft_model

    with warnings.catch_warnings():
        # peft 0.21 reads `is_gradient_checkpointing`, deprecated in transformers 5 (-> is_activation_checkpointing)
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, config)


def _upcast_trainable(model: torch.nn.Module) -> None:
    """Trainable weights in fp32 over a half-precision base (peft already does so for its adapters)."""
    for param in model.parameters():
        if param.requires_grad and param.dtype in HALF_DTYPES:
            param.data = param.data.float()


def _no_adapter_input_casts(model: torch.nn.Module) -> None:
    """Under autocast, the adapter layers' inputs stay in half precision. peft casts each input to its adapter's
    fp32 weight dtype, and autocast casts it straight back for the matmul: two copies of every activation an
    adapter reads, and two more in the backward, for the same result (half -> fp32 -> half is exact; 6% of a
    LoRA step on the CPU, bench/RESULTS.md). Outside autocast (a generation, a caller's own forward) peft casts
    as before."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module._cast_input_dtype = types.MethodType(_cast_outside_autocast, module)


def _cast_outside_autocast(layer: Any, x: Any, dtype: torch.dtype) -> Any:
    if isinstance(x, torch.Tensor) and torch.is_autocast_enabled(x.device.type):
        return x
    return type(layer)._cast_input_dtype(layer, x, dtype)


def _checkpointing_requested(training_args: Any) -> bool:
    # transformers 5 renamed gradient_checkpointing (now a deprecated alias) to activation_checkpointing
    return bool(
        getattr(training_args, "activation_checkpointing", None) or training_args.gradient_checkpointing
    )


def _set_checkpointing(training_args: Any, value: bool) -> None:
    training_args.gradient_checkpointing = value
    if hasattr(training_args, "activation_checkpointing"):
        training_args.activation_checkpointing = value  # what the Trainer actually reads


def _enable_checkpointing(model: PreTrainedModel, training_args: Any) -> bool:
    """Turn on checkpointing the way the Trainer will (non-reentrant unless asked); returns use_reentrant."""
    field = (
        "activation_checkpointing_kwargs"
        if hasattr(training_args, "activation_checkpointing_kwargs")
        else None
    )
    kwargs = dict(getattr(training_args, field or "gradient_checkpointing_kwargs", None) or {})
    kwargs.setdefault("use_reentrant", False)
    # write back so that the Trainer, which enables it again, uses the same kwargs
    if field:
        setattr(training_args, field, dict(kwargs))
    training_args.gradient_checkpointing_kwargs = dict(kwargs)
    every_n_layers = kwargs.pop("every_n_layers", 1)
    offload = kwargs.pop("offload", False)
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(
            activation_checkpointing_kwargs=kwargs, every_n_layers=every_n_layers, offload=offload
        )
    else:  # transformers < 5.x
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return bool(kwargs["use_reentrant"])


def _check_model_dir(path: str) -> None:
    folder = Path(path)
    if not folder.is_dir():
        raise ValueError(f"--model_name_or_path {path}: no such folder")
    if not (folder / "config.json").is_file():
        raise ValueError(f"--model_name_or_path {path}: not a model folder (no config.json)")


def _read_prefix_checkpoint(path: str) -> Any:
    """The PrefixTuningConfig saved in a P-Tuning v2 checkpoint folder, or ValueError."""
    from peft import PeftConfig, PeftType

    peft_type = _peft_type(path, "--ptuning_checkpoint")
    if peft_type != PeftType.PREFIX_TUNING.value:
        raise ValueError(
            f"--ptuning_checkpoint {path}: not a P-Tuning v2 checkpoint (peft_type is {peft_type!r}, "
            f"expected {PeftType.PREFIX_TUNING.value!r})"
        )
    return PeftConfig.from_pretrained(path)


def _peft_type(path: str, flag: str) -> Any:
    """The peft_type in a peft adapter folder's adapter_config.json, or ValueError saying what is wrong."""
    config_file = Path(path) / "adapter_config.json"
    if not Path(path).is_dir():
        raise ValueError(f"{flag} {path}: no such folder")
    if not config_file.is_file():
        raise ValueError(f"{flag} {path}: not a peft adapter folder (no adapter_config.json)")
    try:
        return json.loads(config_file.read_text(encoding="utf-8")).get("peft_type")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise ValueError(f"{flag} {path}: unreadable adapter_config.json ({_one_line(e)})") from e


class _OnceFilter(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix
        self.seen = False

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.getMessage().startswith(self.prefix):
            return True
        if self.seen:
            return False
        self.seen = True
        return True


def _log_once(logger_name: str, prefix: str) -> None:
    """Let the messages of logger_name that start with prefix through only once."""
    source = logging.getLogger(logger_name)
    if not any(isinstance(f, _OnceFilter) and f.prefix == prefix for f in source.filters):
        source.addFilter(_OnceFilter(prefix))


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0


def _say(message: str) -> None:
    if _is_main_process():
        logger.warning(message)


def _one_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
