#!/usr/bin/env python3
"""Benchmark against llama.cpp's real llama-server: what a swap and a stream cost through
llama-swap-py compared with talking to llama-server directly.

Run by hand from the repository root, after `python tests/llama_server.py --build`::

    python bench/bench_llama_server.py [--swaps 8] [--rounds 5] [--tokens 256]

Both models are the tests' tiny random-weight llama (tests/llama_server.py), so the figures
are about the proxy, not about inference:

1. Cold start, direct: spawn llama-server, poll /health every 10 ms until 200, send one
   /completion (n_predict 1); wall time from spawn to the answer.
2. Swap through llama-swap-py: alternate alpha and beta with the same /completion; wall time
   from sending the request to the answer (stopping the other server, starting this one,
   health, the request). The difference to (1) is what the proxy adds to a swap.
3. Streaming: /completion with stream, n_predict --tokens, ignore_eos, direct and through the
   proxy, interleaved; tokens per second of each.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]  # llama_swap from this checkout
from llama_server import binary, tiny_model  # noqa: E402

PY = sys.executable
COMPLETION = {"prompt": "Hello", "n_predict": 1, "ignore_eos": True}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_argv(model: Path, port: str) -> list[str]:
    return [str(binary()), "--host", "127.0.0.1", "--port", port, "-m", str(model), "-c", "1024",
            "-np", "1", "--threads", "2"]


async def direct_cold_start(session: aiohttp.ClientSession, model: Path) -> float:
    port = free_port()
    began = time.perf_counter()
    proc = subprocess.Popen(server_argv(model, str(port)), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while True:
            try:
                async with session.get(f"http://127.0.0.1:{port}/health") as r:
                    if r.status == 200:
                        break
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.01)
        async with session.post(f"http://127.0.0.1:{port}/completion", json=COMPLETION) as r:
            await r.read()
        return time.perf_counter() - began
    finally:
        proc.terminate()
        proc.wait()


async def stream_rate(session: aiohttp.ClientSession, url: str, body: dict) -> float:
    began, tokens = time.perf_counter(), 0
    async with session.post(url, json=body) as r:
        async for line in r.content:
            if line.startswith(b"data: {") and json.loads(line[6:]).get("content"):
                tokens += 1
    return tokens / (time.perf_counter() - began)


async def run(args: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="bench-llama-server-"))
    model = tiny_model(work / "tiny.gguf")
    port = free_port()
    cmd = " ".join(server_argv(model, "${PORT}"))
    (work / "config.yaml").write_text(json.dumps({"healthCheckTimeout": 60, "startPort": free_port(),
                                                  "models": {"alpha": {"cmd": cmd}, "beta": {"cmd": cmd}}}))
    proxy = subprocess.Popen([PY, "-m", "llama_swap", "--config", str(work / "config.yaml"),
                              "--listen", f"127.0.0.1:{port}"],
                             cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as s:
            while True:
                try:
                    async with s.get(url + "/health") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientError:
                    await asyncio.sleep(0.05)
            cold = [await direct_cold_start(s, model) for _ in range(args.swaps)]
            swaps = []
            for i in range(args.swaps + 1):
                began = time.perf_counter()
                async with s.post(url + "/completion", json={"model": ("alpha", "beta")[i % 2], **COMPLETION}) as r:
                    await r.read()
                if i:  # the first is a cold load, not a swap
                    swaps.append(time.perf_counter() - began)
            async with s.get(url + "/running") as r:
                [loaded] = (await r.json())["running"]  # streamed to directly and through us, no swap
            body = {"prompt": "Once upon a time", "n_predict": args.tokens, "ignore_eos": True, "stream": True}
            rates: dict[str, list[float]] = {"direct": [], "proxied": []}
            for _ in range(args.rounds):
                rates["direct"].append(await stream_rate(s, loaded["proxy"] + "/completion", body))
                rates["proxied"].append(await stream_rate(s, url + "/completion", {"model": loaded["model"], **body}))
    finally:
        proxy.terminate()
        proxy.wait(60)
    med = statistics.median
    print(f"llama-server {binary().parent.name}, tiny random llama, {args.swaps} swaps, {args.rounds} stream rounds\n")
    print("| figure | median | min | max |\n|---|---|---|---|")
    print(f"| cold start direct: spawn to first answer | {med(cold) * 1000:.0f} ms | {min(cold) * 1000:.0f} ms | "
          f"{max(cold) * 1000:.0f} ms |")
    print(f"| swap through llama-swap-py: request to answer | {med(swaps) * 1000:.0f} ms | "
          f"{min(swaps) * 1000:.0f} ms | {max(swaps) * 1000:.0f} ms |")
    print(f"| streamed tokens/s direct ({args.tokens} tokens) | {med(rates['direct']):.0f} | "
          f"{min(rates['direct']):.0f} | {max(rates['direct']):.0f} |")
    print(f"| streamed tokens/s through llama-swap-py | {med(rates['proxied']):.0f} | {min(rates['proxied']):.0f} | "
          f"{max(rates['proxied']):.0f} |")


def main() -> int:
    parser = argparse.ArgumentParser(description="llama-swap-py against llama-server")
    parser.add_argument("--swaps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=256)
    args = parser.parse_args()
    if binary() is None:
        print("llama-server is not built: python tests/llama_server.py --build", file=sys.stderr)
        return 1
    asyncio.run(run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
