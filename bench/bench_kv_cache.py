#!/usr/bin/env python3
"""Benchmark for kvCache: what coming back to a model after a swap costs, with and without it.

Run by hand from the repository root (not part of the pytest suite), once llama-server is built
(`python tests/llama_server.py --build`)::

    python bench/bench_kv_cache.py [--rounds 5] [--tokens 800]

For each setting (kvCache on, off) it starts llama-swap (`python -m llama_swap`) on a free port
with two llama-server models in one swap group, both the tests' tiny random model with a
1024-token context. Each round: a conversation of about `--tokens` tokens to `alpha`, one short
request to `beta` (alpha is swapped out), then alpha again with the same conversation and one
more sentence, streamed. Reported per setting: the time from sending that last request to its
first streamed byte (swap back + restore + prefill), and the prompt tokens llama-server had to
evaluate (`timings.prompt_n`) against those it found cached (`timings.cache_n`).

The tiny model prefills fast, so the seconds here are small; the tokens show what a real model
is spared (prefill time scales with them).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]  # llama_swap from this checkout

from harness import free_port, running_llama_swap  # noqa: E402
from llama_server import binary, tiny_model  # noqa: E402


def config(model_file: Path, store: Path, kv_cache: bool) -> dict:
    base = f"{binary()} --host 127.0.0.1 --port ${{PORT}} -m {model_file} -c 1024 -np 1 --threads 2 --no-webui"
    alpha = {"cmd": base + (" --slot-save-path ${KV_CACHE_DIR}" if kv_cache else "")}
    if kv_cache:
        alpha["kvCache"] = True
    return {"healthCheckTimeout": 60, "startPort": free_port() + 1, "store": {"path": str(store)},
            "models": {"alpha": alpha, "beta": {"cmd": base}}}


async def completion(s: aiohttp.ClientSession, url: str, model: str, prompt: str) -> tuple[float, dict]:
    """Seconds to the first streamed byte, and the answer's timings."""
    began = time.monotonic()
    first, timings = None, {}
    async with s.post(url + "/completion", json={"model": model, "prompt": prompt, "n_predict": 4, "stream": True,
                                                 "ignore_eos": True, "cache_prompt": True}) as r:
        if r.status != 200:
            raise aiohttp.ClientError(f"{model}: {r.status} {await r.text()}")
        async for line in r.content:
            first = first or time.monotonic()
            if line.startswith(b"data: ") and b'"timings"' in line:
                timings = json.loads(line[6:]).get("timings", timings)
    return first - began, timings


async def rounds(url: str, count: int, tokens: int) -> list[tuple[float, dict]]:
    conversation = "The quick brown fox jumps over the lazy dog. " * (tokens // 11)  # ~11 tokens each
    results = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as s:
        for turn in range(count):
            await completion(s, url, "alpha", conversation)
            await completion(s, url, "beta", "hello")
            results.append(await completion(s, url, "alpha", conversation + f"Then it ran away, {turn}."))
    return results


def run(model_file: Path, kv_cache: bool, count: int, tokens: int) -> list[tuple[float, dict]]:
    with tempfile.TemporaryDirectory(prefix="bench-kv-store-") as store, \
            running_llama_swap(config(model_file, Path(store) / "activity.db", kv_cache), "bench-kv-") as (url, log):
        try:
            return asyncio.run(rounds(url, count, tokens))
        except aiohttp.ClientError:
            sys.stderr.write(log.read_text()[-3000:])
            raise


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=800, help="about this many tokens of conversation")
    args = parser.parse_args()
    if binary() is None:
        sys.exit("llama-server is not built: python tests/llama_server.py --build")
    with tempfile.TemporaryDirectory(prefix="bench-kv-model-") as scratch:
        model_file = tiny_model(Path(scratch) / "tiny-random-llama.gguf")
        print(f"# kvCache benchmark\n\n{args.rounds} rounds, a conversation of ~{args.tokens} tokens, "
              f"{os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d %H:%M')}\n")
        print("| kvCache | first byte after the swap back, median (min-max) | prompt tokens evaluated | "
              "found cached |")
        print("|---|---|---|---|")
        for kv_cache in (False, True):
            results = run(model_file, kv_cache, args.rounds, args.tokens)
            seconds = [r[0] * 1000 for r in results]
            evaluated = statistics.median(r[1].get("prompt_n", 0) for r in results)
            cached = statistics.median(r[1].get("cache_n", 0) for r in results)
            print(f"| {'on' if kv_cache else 'off'} | {statistics.median(seconds):.0f} ms "
                  f"({min(seconds):.0f}-{max(seconds):.0f}) | {evaluated:.0f} | {cached:.0f} |")


if __name__ == "__main__":
    main()
