"""A transformers model and its tokenizer as one GGUF file, through the `gguf` package.

Only the glue is here: which gguf architecture a transformers config is, which tensor type each weight gets,
the Llama rotary permutation, and what of the tokenizer goes into the file. The `gguf` package does the rest:
GGUFWriter writes the file, TensorNameMap names the tensors, SpecialVocab reads the merges and the special
tokens, gguf.quants quantizes.

The conventions are llama.cpp's (its convert_hf_to_gguf.py): 1-D tensors and norms stay F32; q_proj/k_proj
of the Llama family are permuted for llama.cpp's rotary layout (transformers undoes it on load); a tied
output matrix is not written; the BPE pre-tokenizer is named from a hash of how the tokenizer splits a fixed
text, else from the shape of its pre-tokenizer.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from hashlib import sha256
from pathlib import Path
from typing import Any

import numpy as np

# transformers model_type -> gguf architecture (Mistral is the Llama graph in llama.cpp)
ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
SUPPORTED = "the Llama family (model_type llama: Llama 2/3, SmolLM2; mistral) and Qwen2/Qwen2.5 (qwen2)"

# --type -> (general.file_type, tensor type of the 2-D weights)
FILE_TYPES = {"f32": ("ALL_F32", "F32"), "f16": ("MOSTLY_F16", "F16"), "bf16": ("MOSTLY_BF16", "BF16"),
              "q8_0": ("MOSTLY_Q8_0", "Q8_0")}  # fmt: skip

# llama.cpp names a BPE pre-tokenizer by the sha256 of str(tokenizer.encode(PRE_TOKENIZER_PROBE)); these are
# the hashes its converter lists for the vocabularies of the supported families.
PRE_TOKENIZER_PROBE = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 33 333 "
    "3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на "
    "Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not sure I'll make "
    "it, 'D you like some tea? We'Ve a'lL"
)
PRE_TOKENIZER_HASHES = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5/2/2.5
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM, SmolLM2
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # Mistral Nemo
}
# Split regexes of pre-tokenizers llama.cpp and transformers' GGUF loader both know, by name.
LLAMA3_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
QWEN2_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
SPLIT_NAMES = {LLAMA3_SPLIT: "llama-bpe", QWEN2_SPLIT: "qwen2"}


class ExportError(ValueError):
    """Something that cannot be exported, explained in one line (the script prints `error: <it>`, exit 2)."""


@dataclass
class Tokens:
    """What of the tokenizer goes into the file, besides the vocabulary and merges gguf reads itself."""

    chat_template: str | list | None
    stop_ids: list[int]  # end-of-turn tokens: the first that is EOS becomes eos, the others eot, eom
    add_bos: bool


@dataclass
class Written:
    """What write_gguf put in the file: each exported weight's transformers name, gguf name and type."""

    path: Path
    tensors: dict[str, tuple[str, str]] = field(default_factory=dict)  # hf name -> (gguf name, type name)
    pre_tokenizer: str = ""
    n_merges: int = 0


def gguf_architecture(config: Any) -> str:
    """The gguf architecture of a transformers config, or ExportError naming what is supported."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        arch = ", ".join(getattr(config, "architectures", None) or []) or "?"
        raise ExportError(
            f"model_type {model_type!r} ({arch}) cannot be exported to GGUF; supported: {SUPPORTED}"
        )
    rope = _rope_parameters(config)
    rope_type = rope.get("rope_type") or rope.get("type") or "default"
    if rope_type != "default":
        raise ExportError(
            f"rope scaling {rope_type!r} is not exported (transformers' GGUF loader cannot read it back to verify "
            "the file); supported: plain rotary embeddings"
        )
    if getattr(config, "mlp_bias", False):
        raise ExportError("a Llama with MLP biases (mlp_bias true) has no llama.cpp form")
    return ARCHITECTURES[model_type]


def _rope_parameters(config: Any) -> dict:
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return dict(rope) if isinstance(rope, dict) else {}


def _rope_theta(config: Any) -> float:
    theta = _rope_parameters(config).get("rope_theta") or getattr(config, "rope_theta", None)
    if theta is None:
        raise ExportError("the config states no rope_theta")
    return float(theta)


# ---------------------------------------------------------------------------------------------------- tensors


def permute_for_llama_cpp(weight: np.ndarray, n_head: int) -> np.ndarray:
    """q_proj/k_proj rows from transformers' rotary layout (halves) to llama.cpp's (interleaved pairs)."""
    return (
        weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def tensor_type(gguf_name: str, array: np.ndarray, file_type: str) -> str:
    """llama.cpp's rule: 1-D tensors, norms and biases stay F32; the 2-D weights get the file's type, and a
    Q8_0 weight whose rows are not whole blocks of 32 falls back to F16."""
    import gguf

    if array.ndim <= 1 or gguf_name.endswith("_norm.weight") or not gguf_name.endswith(".weight"):
        return "F32"
    wanted = FILE_TYPES[file_type][1]
    if wanted == "Q8_0" and array.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0]:
        return "F16"
    return wanted


def export_tensors(model: Any, arch: str, file_type: str) -> Iterator[tuple[str, str, np.ndarray, str]]:
    """(transformers name, gguf name, float32 data as the file lays it out, tensor type) of every weight."""
    import gguf

    config = model.config
    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    names = gguf.get_tensor_name_map(arch_id, config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for name, tensor in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue  # llama.cpp uses token_embd when there is no output.weight
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ExportError(f"weight {name} has no place in a {arch} GGUF")
        data = tensor.detach().float().cpu().numpy()
        if arch == "llama" and name.endswith(("q_proj.weight", "q_proj.bias")):
            data = permute_for_llama_cpp(data, config.num_attention_heads)
        elif arch == "llama" and name.endswith(("k_proj.weight", "k_proj.bias")):
            data = permute_for_llama_cpp(data, config.num_key_value_heads or config.num_attention_heads)
        yield name, gguf_name, data, tensor_type(gguf_name, data, file_type)


def encode_tensor(data: np.ndarray, type_name: str) -> np.ndarray:
    import gguf

    return gguf.quants.quantize(data, gguf.GGMLQuantizationType[type_name])


def round_trip(data: np.ndarray, type_name: str) -> np.ndarray:
    """data as it reads back from the file: quantized to type_name and dequantized to float32."""
    import gguf

    qtype = gguf.GGMLQuantizationType[type_name]
    return (
        gguf.quants.dequantize(encode_tensor(data, type_name), qtype).astype(np.float32).reshape(data.shape)
    )


# ---------------------------------------------------------------------------------------------------- tokenizer


def backend_json(tokenizer: Any) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ExportError(
            "the tokenizer has no fast (tokenizers) backend; GGUF export needs its tokenizer.json"
        )
    return json.loads(backend.to_str())


def _components(node: dict | None, kind: str) -> list[dict]:
    if not node:
        return []
    return node.get(kind, [node]) if node.get("type") == "Sequence" else [node]


def check_byte_level_bpe(tokenizer: Any) -> dict:
    """The tokenizer.json, if the tokenizer is a byte-level BPE (Llama 3, Qwen2, SmolLM2); ExportError if not."""
    data = backend_json(tokenizer)
    model = data.get("model") or {}
    byte_level = any(
        p.get("type") == "ByteLevel" for p in _components(data.get("pre_tokenizer"), "pretokenizers")
    )
    if model.get("type") != "BPE" or not byte_level:
        kind = (
            "SentencePiece-style BPE (Llama 2, Mistral 7B)"
            if model.get("byte_fallback")
            else model.get("type")
        )
        raise ExportError(
            f"the tokenizer is {kind}; GGUF export writes byte-level BPE vocabularies (Llama 3, Qwen2, SmolLM2) only"
        )
    return data


def pre_tokenizer_name(tokenizer: Any, data: dict) -> str:
    """tokenizer.ggml.pre: llama.cpp's name for how this tokenizer splits text before BPE."""
    ids = tokenizer.encode(PRE_TOKENIZER_PROBE)
    known = PRE_TOKENIZER_HASHES.get(sha256(str(ids).encode()).hexdigest())
    if known:
        return known
    parts = _components(data.get("pre_tokenizer"), "pretokenizers")
    if len(parts) == 1 and parts[0].get("use_regex", True):
        return "gpt-2"  # ByteLevel's own regex is GPT-2's
    if len(parts) == 2 and parts[0].get("type") == "Split" and parts[1].get("type") == "ByteLevel":
        regex = (parts[0].get("pattern") or {}).get("Regex")
        if regex in SPLIT_NAMES and not parts[1].get("use_regex", True):
            return SPLIT_NAMES[regex]
    raise ExportError(
        "the tokenizer's pre-tokenizer is not one llama.cpp knows (GPT-2's, Llama 3's, Qwen2's or SmolLM's split); "
        f"its tokenizer.json has {json.dumps(data.get('pre_tokenizer'))[:200]}"
    )


def token_list(tokenizer: Any, vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens by id (padded with [PADi] up to the model's vocab_size) and their llama.cpp types."""
    import gguf

    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    if max(by_id) >= vocab_size:
        raise ExportError(f"the tokenizer has id {max(by_id)}, beyond the model's vocab_size {vocab_size}")
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            looks_special = by_id[i].startswith("<|") and by_id[i].endswith("|>")
            types.append(
                gguf.TokenType.CONTROL if added[i].special or looks_special else gguf.TokenType.USER_DEFINED
            )
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    return tokens, [int(t) for t in types]


def add_tokenizer(writer: Any, tokenizer: Any, vocab_size: int, tokens: Tokens) -> tuple[str, int]:
    """Vocabulary, merges, token types, special ids, add_bos, chat template; returns (pre name, merges)."""
    import gguf

    data = check_byte_level_bpe(tokenizer)
    pre = pre_tokenizer_name(tokenizer, data)
    token_texts, token_types = token_list(tokenizer, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(token_texts)
    writer.add_token_types(token_types)
    byte_level = [
        p for p in _components(data.get("pre_tokenizer"), "pretokenizers") if p.get("type") == "ByteLevel"
    ]
    writer.add_add_space_prefix(bool(byte_level[0].get("add_prefix_space", False)))
    quiet = logging.getLogger(
        "gguf"
    )  # its warnings on TemplateProcessing it cannot parse: add_bos is set below
    level, quiet.level = quiet.level, logging.ERROR
    try:
        with tempfile.TemporaryDirectory(prefix="chatft-gguf-vocab-") as folder:
            tokenizer.save_pretrained(folder)  # SpecialVocab reads merges and special tokens from the files
            special = gguf.SpecialVocab(
                folder, load_merges=True, special_token_types=("bos", "eos", "unk", "pad"), n_vocab=vocab_size
            )
    finally:
        quiet.level = level
    stops = [i for i in tokens.stop_ids if i is not None]
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id in stops else (stops[0] if stops else None)
    if eos is not None:
        special.special_token_ids["eos"] = eos
    for kind, token_id in zip(("eot", "eom"), [i for i in stops if i != eos], strict=False):
        special.special_token_ids[kind] = token_id
    special.add_special_token = {"bos": tokens.add_bos}
    special.chat_template = tokens.chat_template
    special.add_to_gguf(writer, quiet=True)
    if stops:
        writer.add_array("chatft.stop_token_ids", stops)
    return pre, len(special.merges)


# ---------------------------------------------------------------------------------------------------- the file


def add_architecture(writer: Any, config: Any, arch: str) -> None:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.num_key_value_heads or heads)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    if head_dim != config.hidden_size // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if arch == "llama":
        writer.add_vocab_size(config.vocab_size)
        writer.add_rope_dimension_count(head_dim)


def add_metadata(writer: Any, metadata: dict[str, Any]) -> None:
    """general.* through the writer's own setters where it has one, chatft.* as plain strings/numbers."""
    for key, value in metadata.items():
        if value is None:
            continue
        setter: Callable | None = getattr(writer, "add_" + key.removeprefix("general."), None)
        if key.startswith("general.") and setter is not None:
            setter(value)
        elif isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        elif isinstance(value, list):
            writer.add_array(key, value)
        else:
            writer.add_string(key, str(value))


def write_gguf(
    path: Path, model: Any, tokenizer: Any, tokens: Tokens, file_type: str, metadata: dict[str, Any]
) -> Written:
    """Write the model, its tokenizer and metadata to path (overwritten)."""
    import gguf

    arch = gguf_architecture(model.config)
    written = Written(Path(path))
    writer = gguf.GGUFWriter(str(path), arch)
    try:
        writer.add_type(gguf.GGUFType.MODEL)
        add_metadata(writer, metadata)
        add_architecture(writer, model.config, arch)
        writer.add_file_type(int(gguf.LlamaFileType[FILE_TYPES[file_type][0]]))
        written.pre_tokenizer, written.n_merges = add_tokenizer(
            writer, tokenizer, model.config.vocab_size, tokens
        )
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for name, gguf_name, data, type_name in export_tensors(model, arch, file_type):
            writer.add_tensor(
                gguf_name, encode_tensor(data, type_name), raw_dtype=gguf.GGMLQuantizationType[type_name]
            )
            written.tensors[name] = (gguf_name, type_name)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return written


def read_metadata(path: Path, string_arrays: tuple[str, ...] = ()) -> dict[str, Any]:
    """Every metadata key of a GGUF file with its value; arrays of strings are read as their length unless named
    in string_arrays (transformers' reader, many times faster than gguf.GGUFReader on a 49k vocabulary)."""
    from transformers.integrations.gguf.reader import read_gguf_metadata

    return read_gguf_metadata(str(path), string_arrays)[0]
