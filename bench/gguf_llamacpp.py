"""The GGUF export in a real runtime: llama.cpp (through llama-cpp-python, built here from its PyPI source if it
is missing) against chatft, on the same prompts.

python bench/gguf_llamacpp.py [--adapter output/rz_lora] [--types f32 q8_0] [--reuse]

For the default model (SmolLM2-135M-Instruct) and, when given, a tuned adapter, each --type is exported with
scripts/export_gguf.py (verified as every export is), then for every prompt:
- the chat template: chatft's rendering vs llama-cpp-python's rendering of the GGUF's own template (Jinja2);
- the tokens: chatft's ids vs llama.cpp's tokenizer on the same text (counts, and identical or not);
- the answer: chatft's greedy ids (transformers, on the model read back from that same file) vs llama.cpp's
  greedy ids from the same prompt ids, stopping where llama.cpp's own end-of-generation tokens stop it.
Figures go to bench/RESULTS.md by hand; nothing is asserted (floating-point sums differ between the runtimes,
so a near tie can go either way and the answers part from there).
"""

from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LLAMA_CPP_PYTHON = (
    "llama-cpp-python==0.3.36"  # built from the sdist: pip --no-binary, nothing else downloaded
)
RUOZHIBA = ROOT.parent / "shared" / "data" / "ruozhiba_qa.json"


def ensure_llama_cpp() -> None:
    try:
        importlib.import_module("llama_cpp")
        return
    except ImportError:
        pass
    print(f"building {LLAMA_CPP_PYTHON} from its PyPI source (cmake + gcc) ...", flush=True)
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "pip", "install", "--no-binary", "llama-cpp-python", LLAMA_CPP_PYTHON]
    subprocess.run(cmd, check=True, env={**__import__("os").environ, "CMAKE_BUILD_PARALLEL_LEVEL": "2"})
    print(f"built and installed in {time.perf_counter() - start:.0f} s", flush=True)


def prompts(count_data: int = 4) -> list:
    from chatft.data.schema import Conversation, Message
    from chatft.export.verify import SAMPLE_CHATS, sample_conversations
    from chatft.export.verify import prompts as first_questions

    convs = first_questions(sample_conversations(), raw=False, count=len(SAMPLE_CHATS))
    if RUOZHIBA.is_file():
        records = json.loads(RUOZHIBA.read_text(encoding="utf-8"))
        for record in records[
            -count_data:
        ]:  # the quickstart trains on the first 70% (after a shuffle): tail ones
            question = record.get("instruction") or record.get("query") or record.get("prompt")
            if question:
                convs.append(Conversation([Message("user", question)]))
    return convs


def export_file(source: str, out: Path, file_type: str, reuse: bool) -> None:
    if reuse and out.is_file():
        print(f"reusing {out}")
        return
    from chatft.export.command import main

    if main([source, str(out), "--type", file_type, "--overwrite"]) != 0:
        raise SystemExit(f"export of {source} failed")


def compare(source_path: str, out: Path, max_new_tokens: int) -> dict:
    import llama_cpp
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    from chatft.export import first_difference
    from chatft.export import source as src
    from chatft.export.gguf import read_metadata
    from chatft.export.verify import load_back

    source = src.load_source(source_path, say=lambda _: None)
    model, _ = load_back(out)
    session = src.session_for(model, source.tokenizer, source.template, source.raw, source.stop_ids)
    metadata = read_metadata(out)
    llm = Llama(model_path=str(out), n_ctx=2048, n_threads=2, verbose=False, seed=0)
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    formatter = Jinja2ChatFormatter(
        metadata["tokenizer.chat_template"], source.tokenizer.eos_token, source.tokenizer.bos_token
    )
    rows = []
    for conv in prompts():
        text, ids = src.prompt(session, conv)
        messages = [{"role": m.role, "content": m.content} for m in conv.messages]
        llama_text = formatter(messages=messages).prompt
        llama_ids = llm.tokenize(
            text.encode(), add_bos=bool(metadata.get("tokenizer.ggml.add_bos_token")), special=True
        )
        t0 = time.perf_counter()
        ours = src.greedy(session, [ids], max_new_tokens)[0]
        t_ours = time.perf_counter() - t0
        theirs = []
        t0 = time.perf_counter()
        for token in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0):
            if llama_cpp.llama_vocab_is_eog(vocab, token) or len(theirs) == max_new_tokens:
                break
            theirs.append(token)
        t_theirs = time.perf_counter() - t0
        prefix = first_difference(ours, theirs)
        rows.append({
            "template_same": llama_text == text, "ids_same": llama_ids == ids, "tokens": (len(ids), len(llama_ids)),
            "answer_same": ours == theirs, "prefix": prefix, "length": max(len(ours), len(theirs)),
            "speed": (len(ours) / t_ours if t_ours else 0, len(theirs) / t_theirs if t_theirs else 0),
            "ours": source.tokenizer.decode(ours), "theirs": llm.detokenize(theirs).decode(errors="replace"),
        })  # fmt: skip
    eog = [bool(llama_cpp.llama_vocab_is_eog(vocab, i)) for i in source.stop_ids]
    return {"rows": rows, "eog": eog, "stops": source.tokenizer.convert_ids_to_tokens(source.stop_ids)}


def report(label: str, result: dict) -> None:
    rows = result["rows"]
    n = len(rows)
    same = sum(r["answer_same"] for r in rows)
    share = sum(r["prefix"] for r in rows) / max(1, sum(r["length"] for r in rows))
    ours_tok, theirs_tok = sum(r["tokens"][0] for r in rows), sum(r["tokens"][1] for r in rows)
    speed = [sum(r["speed"][i] for r in rows) / n for i in (0, 1)]
    print(f"\n{label}: {n} prompts")
    print(
        f"  chat template rendered by llama-cpp-python (Jinja2) = chatft's: {sum(r['template_same'] for r in rows)}/{n}"
    )
    print(
        f"  prompt tokens: chatft {ours_tok}, llama.cpp {theirs_tok}; identical ids {sum(r['ids_same'] for r in rows)}/{n}"
    )
    print(
        f"  stop tokens {', '.join(result['stops'])} are end-of-generation in llama.cpp: {all(result['eog'])}"
    )
    print(f"  greedy answers identical {same}/{n}; {share:.0%} of answer tokens before the first difference")
    print(
        f"  decoding speed (tokens/s, one prompt at a time): chatft {speed[0]:.1f}, llama.cpp {speed[1]:.1f}"
    )
    for r in rows:
        if not r["answer_same"]:
            print(
                f"  first differing answer, from token {r['prefix']}:\n    chatft:    {r['ours']!r}\n    llama.cpp: {r['theirs']!r}"
            )
            break


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(ROOT / "models" / "SmolLM2-135M-Instruct"))
    p.add_argument("--adapter", help="a tuned adapter to export and compare too (e.g. output/rz_lora)")
    p.add_argument("--types", nargs="+", default=["f32", "q8_0"])
    p.add_argument("--out_dir", default=str(ROOT / "output" / "gguf_bench"))
    p.add_argument("--max_new_tokens", type=int, default=48)
    p.add_argument("--reuse", action="store_true", help="use files already exported to --out_dir")
    p.add_argument("--no_base", dest="base", action="store_false", help="only the adapter")
    args = p.parse_args()
    ensure_llama_cpp()
    import torch

    torch.manual_seed(0)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sources = ([("base", args.model)] if args.base else []) + (
        [("tuned", args.adapter)] if args.adapter else []
    )
    for label, path in sources:
        for file_type in args.types:
            out = out_dir / f"{label}-{file_type}.gguf"
            export_file(path, out, file_type, args.reuse)
            report(f"{label} {Path(path).name} ({file_type})", compare(path, out, args.max_new_tokens))
    return 0


if __name__ == "__main__":
    sys.exit(main())
