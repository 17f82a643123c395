"""Serving speed: tokens/s and latency (time to first token, total; p50 and p95) of `inference.py --serve` on the
default model at 1, 4 and 8 concurrent clients, and whether batching would pay on this machine.

The server runs as the README starts it, in its own process (`inference.py --serve`, greedy, batches of up to
--max-batch waiting requests); clients are the
official `openai` client, streaming, each in its own thread, every request a different question with the same
max_tokens. Tokens are the server's usage counts. Then, with the server gone, the same questions are generated
in-process one at a time and in left-padded batches (chatft.inference.generation.generate) to see what batching
would gain.

    python bench/serve.py                              # concurrency 1, 4, 8; 64 new tokens
    python bench/serve.py --threads 2                  # the server with two torch threads
    python bench/serve.py --max-batch 1 --batches ""   # one generation at a time
    python bench/serve.py --concurrency 1,2 --requests 4 --max-tokens 32

Timings are figures to read, never assertions; compare only ratios measured in one sitting on one machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

QUESTIONS = [
    "What is the capital of France?",
    "Give me three tips for learning a new language.",
    "Explain photosynthesis in simple words.",
    "Write a haiku about the sea.",
    "What is the difference between a list and a tuple in Python?",
    "How do I make a good cup of tea?",
    "Why is the sky blue?",
    "Name a few uses of a paperclip.",
    "只剩一个心脏了还能活吗？",
    "What should I pack for a weekend hike?",
    "Summarize the plot of Romeo and Juliet.",
    "How does a bicycle stay upright?",
    "Suggest a name for a friendly robot.",
    "What are prime numbers?",
    "Describe a sunset to someone who cannot see.",
    "How can I sleep better?",
]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def start_server(
    model: str | None, max_tokens: int, threads: int | None, max_batch: int
) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, str(ROOT / "inference.py"), "--serve", "--port", str(port)]
    cmd += ["--max_new_tokens", str(max_tokens), "--max_queue", "64"] + (["--model", model] if model else [])
    cmd += ["--threads", str(threads)] if threads else []
    cmd += ["--max_batch", str(max_batch)]
    server = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        try:
            with urllib.request.urlopen(url + "/health", timeout=5):
                return server, url
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the server did not start: {server.stderr.read()[-2000:]}") from None
            time.sleep(0.5)


def one_request(client, model: str, question: str, max_tokens: int) -> dict:
    start = time.perf_counter()
    first = None
    tokens = 0
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": question}],
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - start
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    total = time.perf_counter() - start
    return {"ttft": first if first is not None else total, "total": total, "tokens": tokens}


def run_level(url: str, model: str, concurrency: int, requests: int, max_tokens: int) -> dict:
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)
    questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(requests)]
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda q: one_request(client, model, q, max_tokens), questions))
    wall = time.perf_counter() - start
    tokens = sum(r["tokens"] for r in results)
    ttft = [r["ttft"] for r in results]
    total = [r["total"] for r in results]
    return {
        "concurrency": concurrency,
        "requests": requests,
        "tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "ttft_p50": statistics.median(ttft),
        "ttft_p95": percentile(ttft, 0.95),
        "total_p50": statistics.median(total),
        "total_p95": percentile(total, 0.95),
    }


def batching(model: str | None, max_tokens: int, sizes: list[int], threads: int | None) -> list[dict]:
    """Tokens/s of generate() over the same questions, one at a time vs in batches of each size."""
    import torch

    from chatft.data.schema import Conversation, Message
    from chatft.inference.cli import make_parser
    from chatft.inference.generation import GenerationOptions, generate, render_prompt
    from chatft.inference.loading import load_session

    session = load_session(make_parser().parse_args(["--model", model] if model else []), say=lambda _: None)
    prompts = [render_prompt(session, Conversation([Message("user", q)]))[1] for q in QUESTIONS[:8]]
    options = GenerationOptions(max_tokens)
    torch.set_num_threads(threads or 1)  # as the server runs
    generate(session, prompts[:1], options)  # warm up
    rows = []
    for size in sizes:
        start = time.perf_counter()
        tokens = 0
        for i in range(0, len(prompts), size):
            tokens += sum(len(ids) for ids in generate(session, prompts[i : i + size], options))
        wall = time.perf_counter() - start
        rows.append({"batch": size, "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall})
    return rows


def load_average() -> str:
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "?"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="model folder (default: the demo SmolLM2-135M-Instruct)")
    p.add_argument("--concurrency", default="1,4,8", help="client counts (default: 1,4,8)")
    p.add_argument("--requests", type=int, default=16, help="requests per level (default: 16)")
    p.add_argument("--max-tokens", type=int, default=64, help="max_tokens of each request (default: 64)")
    p.add_argument("--batches", default="1,4,8", help="batch sizes for the batching check ('' skips it)")
    p.add_argument("--threads", type=int, help="the server's --threads (default: its own, 1)")
    p.add_argument("--max-batch", type=int, default=8, help="the server's --max_batch (default: 8)")
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args(argv)
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, load {load_average()}")
    threads = args.threads or "1 (the --serve default)"
    print(f"# --threads {threads}, --max_batch {args.max_batch}, max_tokens {args.max_tokens}, greedy")
    server, url = start_server(args.model, args.max_tokens, args.threads, args.max_batch)
    try:
        with urllib.request.urlopen(url + "/health") as r:
            model = json.loads(r.read())["models"][0]
        run_level(url, model, 1, 1, 8)  # warm up
        levels = []
        print("| clients | requests | tokens | tokens/s | TTFT p50 | TTFT p95 | total p50 | total p95 |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for c in [int(x) for x in args.concurrency.split(",")]:
            row = run_level(url, model, c, max(args.requests, c), args.max_tokens)
            levels.append(row)
            print(
                f"| {c} | {row['requests']} | {row['tokens']} | {row['tokens_per_s']:.1f} | {row['ttft_p50']:.2f} s "
                f"| {row['ttft_p95']:.2f} s | {row['total_p50']:.2f} s | {row['total_p95']:.2f} s |",
                flush=True,
            )
    finally:
        server.terminate()
        server.wait(timeout=30)
    batch_rows = []
    if args.batches:
        batch_rows = batching(
            args.model, args.max_tokens, [int(x) for x in args.batches.split(",")], args.threads
        )
        print("\n| generate() batch | tokens | s | tokens/s | vs one at a time |")
        print("| --- | --- | --- | --- | --- |")
        for row in batch_rows:
            ratio = row["tokens_per_s"] / batch_rows[0]["tokens_per_s"]
            print(
                f"| {row['batch']} | {row['tokens']} | {row['wall_s']:.1f} | {row['tokens_per_s']:.1f} | {ratio:.2f}x |"
            )
    print(f"# load after: {load_average()}")
    if args.json:
        Path(args.json).write_text(json.dumps({"levels": levels, "batching": batch_rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
