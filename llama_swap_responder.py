"""Fake inference server ("upstream") for llama-swap-py's demo mode and test-suite.

Run it as::

    python -m llama_swap_responder --port 8123 [options]

It mimics just enough of llama-server / an OpenAI-compatible server for the
proxy to start it, health-check it, relay requests to it and stop it.  Only
the standard library and aiohttp are used.

Contents, in order:
    1. Output        say(), warn(): lines flushed at once
    2. Command line  flags, sizes, the pid file and the fake GPU file
    3. State         what one server counts and records
    4. Echo          a request described for the "echo" key of a reply
    5. Replies       per-request controls, completions, embeddings, stream events
    6. HTTP          the handlers (health, info, echo, streams, websocket), the app
    7. Lifecycle     signals, the simulated load and crash, serving, main()

Options
-------
--port PORT              port to listen on (required)
--host HOST              address to bind (default 127.0.0.1)
--name NAME              model name reported in replies (default "responder")
--startup-delay S        sleep S seconds before binding the port, printing
                         "loading model..." every 0.1 s meanwhile
--load-progress STYLE    with --startup-delay: print how far the load has got
                         instead of "loading model...", spread evenly over the
                         delay and flushed as it goes. "dots": llama.cpp's
                         line "llm_load_tensors: loading model tensors", then
                         100 dots (one per percent), then a newline.
                         "percent": vLLM's tqdm bar, "\rLoading safetensors
                         checkpoint shards:  43% Completed | 3/7" for shards
                         0/7 to 7/7 (each update starts with \r), then a
                         newline
--healthy-after S        once listening, GET /health answers 503
                         {"status":"loading"} for S more seconds
--health-status CODE     status of GET /health once "healthy" (default 200;
                         e.g. 500 never becomes healthy)
--health-hang            GET /health never answers
--ignore-sigterm         print "ignoring SIGTERM" on SIGTERM and keep running
--sigterm-delay S        on SIGTERM print "SIGTERM received, exiting in S s",
                         keep serving for S seconds, then exit 0
--fork-grandchild        do not serve: spawn this script again (same args
                         minus this flag, same process group), print
                         "grandchild pid <pid>" and wait for it; on SIGTERM
                         exit at once WITHOUT forwarding it to the grandchild
--exit-after S           after S seconds (counted from process start) print
                         "error: failed to load model '<name>': out of memory
                         (simulated)" to stderr and exit 1
--pid-file PATH          append own pid and a newline to PATH at start
--chunks N               default number of streamed content chunks (5)
--chunk-delay S          default delay between streamed events (0.05)
--fake-vram SPEC         GPU memory this server pretends to hold once it has
                         loaded: "0:8GiB" or "0:4GiB,1:2GiB" (GPU index, size;
                         sizes as llama-swap reads them: 8GiB, 20GB, 512M or
                         bytes). After --startup-delay, before it listens, it
                         enters its pid with SPEC in --fake-vram-file
--fake-vram-file PATH    the fake GPU file llama-swap reads through
                         LLAMA_SWAP_FAKE_VRAM ({"gpus": [...], "processes":
                         {"<pid>": {"<gpu>": bytes, "until": unix time}}});
                         changed read-modify-write under an exclusive flock
                         on PATH.lock, and replaced whole, so neither another
                         responder nor llama-swap sees half of it
--sleep-delay S          POST /sleep takes S seconds to answer (default 0)
--wake-delay S           POST /wake_up takes S seconds to answer (default 0)
--sleep-status CODE      status POST /sleep answers with (default 200; anything
                         else: the server stays awake, as a sleep that failed)
--wake-status CODE       status POST /wake_up answers with (default 200; anything
                         else: the server stays asleep)
--sleep-vram SPEC        with --fake-vram: what it keeps of the fake GPU memory
                         while asleep, as --fake-vram (default: nothing)
--fake-vram-release S    on exit (SIGTERM, SIGINT, --exit-after) set the
                         entry's "until" to now + S: a driver slow to free
                         the memory (default 0: free at once). A crash
                         (responder_crash_after) leaves the entry as it was:
                         a dead pid's memory is free unless "until" says not

Without --ignore-sigterm / --sigterm-delay, SIGTERM prints
"SIGTERM received, shutting down" and exits 0 promptly.  SIGINT always does
that (so Ctrl-C works even with --ignore-sigterm).

HTTP endpoints
--------------
GET /health             see --healthy-after / --health-status / --health-hang
GET /                   small HTML page "responder NAME"
GET /_responder/events  JSON list of recorded events
                        ({"event", "path", "time"}; events are "request",
                        "stream_completed", "client_disconnected", "sleep",
                        "wake" and "request_while_asleep")
POST /sleep             vLLM's sleep: after --sleep-delay, the fake GPU memory
                        shrinks to --sleep-vram and model requests answer 503
                        until woken; {"asleep": true}. Already asleep: no change
POST /wake_up           after --wake-delay, the memory is held again and requests
                        are served; {"asleep": false}
GET /is_sleeping        {"is_sleeping": bool}, as vLLM answers
POST /v1/rerank         llama.cpp's reranker (also /rerank, /reranking and
                        /v1/reranking): a JSON body {"query": str, "documents":
                        [str, ...] (or "texts"), "top_n": int (optional)} is
                        answered {"model", "object": "list", "usage":
                        {"prompt_tokens", "total_tokens"}, "results": [{"index",
                        "relevance_score"}, ...], "echo"}. The score is the
                        share of the query's distinct words (case folded)
                        the document holds, 0 to 1; results best first (ties
                        in document order), cut to the first top_n. A body that
                        is not that: 400 {"error": {"code", "message", "type"}}.
                        responder_status and responder_sleep apply as to echo
GET /ws                 a websocket echo ("echo: <text>"; binary as it came)
GET /_responder/refuse  no upgrade, whatever is asked: status ?status= (default
                        403), header "X-Refused: yes", text "refused with <status>"
GET /_responder/info    {"name", "pid", "port", "requests", "health_checks"};
                        "requests" counts echo (catch-all) and rerank requests;
                        also "ready_at": time.time() at which /health starts
                        answering 200 (bind + --healthy-after), null before bind,
                        "asleep", "sleeps" and "wakes" (sleep calls answered
                        with success), and "streamed_bytes": bytes of "responder_bytes" filler
                        events whose write() returned, summed over the process
                        lifetime
anything else           the "echo" reply: an OpenAI-shaped completion (or
                        embeddings list for paths containing "embeddings")
                        with an extra "echo" key describing the request (a
                        body over 8 MiB is counted in "body_len", not read or
                        echoed: its "body" is "")
                        A JSON body with "stream": true gets an SSE stream.

Per-request controls (optional top-level keys of a JSON request body):
"responder_chunks" (int), "responder_delay" (float s between stream events),
"responder_status" (int HTTP status), "responder_sleep" (float s to sleep
before sending the response headers).
In a streaming request also:
"responder_crash_after" (int N): send N content events, each flushed, then the
whole process dies at once (exit status 1, no end of stream), like a server
that segfaults mid-generation;
"responder_crash_partial" (bool, with it): after the N events send half of an
event ('data: {"choi', no blank line) before dying;
"responder_bytes" (int N): instead of the usual events, stream N bytes of SSE
(rounded up to whole events of 16 KiB of filler, then [DONE]) as fast as the
reader takes them; see "streamed_bytes" in /_responder/info.
"""

from __future__ import annotations

import argparse
import asyncio
import email.parser
import email.policy
import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, NoReturn
from urllib.parse import parse_qs

import aiohttp
from aiohttp import web

CHUNK_ID = "chatcmpl-resp"
FILLER_EVENT_BYTES = 16 * 1024
HALF_EVENT = b'data: {"choi'
LOADING_TICK = 0.1
SHARDS = 7  # checkpoint shards the "percent" load pretends to read
SHUTDOWN_TIMEOUT = 0.5
MAX_BODY = 1024**3
RERANK_PATHS = ("/v1/rerank", "/rerank", "/reranking", "/v1/reranking")  # llama.cpp's names for it
# Size units as llama-swap's parse_size reads them: a bare K/M/G/T is binary.
SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1000, "kib": 1024, "m": 1024**2, "mb": 1000**2, "mib": 1024**2,
              "g": 1024**3, "gb": 1000**3, "gib": 1024**3, "t": 1024**4, "tb": 1000**4, "tib": 1024**4}


###############################################################################
# 1. Output ###################################################################
###############################################################################

# Lines flushed as they are written: llama-swap reads them while we run.


def say(message: str) -> None:
    print(message, flush=True)


def warn(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def write_now(text: str) -> None:
    """Text that does not end a line (progress), on screen at once all the same."""
    sys.stdout.write(text)
    sys.stdout.flush()


def make_line_buffered() -> None:
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(line_buffering=True)


###############################################################################
# 2. Command line #############################################################
###############################################################################

# The flags (see the module docstring), and the files they name: the pid file the tests
# read, and the fake GPU file llama-swap reads through LLAMA_SWAP_FAKE_VRAM.


def parse_size(text: str) -> int:
    """Bytes from `8GiB`, `20 GB`, `512M` or a plain number."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in SIZE_UNITS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (like 8GiB, 512MiB or a number of bytes)")
    return int(float(match.group(1)) * SIZE_UNITS[match.group(2).lower()])


def parse_vram_spec(spec: str) -> dict[str, int]:
    """`0:4GiB,1:2GiB` -> {"0": bytes, "1": bytes}, keyed as the fake GPU file keys GPUs."""
    held: dict[str, int] = {}
    for part in spec.split(","):
        gpu, colon, size = part.partition(":")
        if not colon or not gpu.strip().isdigit():
            raise argparse.ArgumentTypeError(f"{part!r} is not GPU:SIZE (like 0:8GiB)")
        held[str(int(gpu))] = parse_size(size)
    return held


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="fake inference server for tests")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--name", default="responder")
    parser.add_argument("--startup-delay", type=float, default=0.0)
    parser.add_argument("--load-progress", choices=("dots", "percent"), default=None)
    parser.add_argument("--healthy-after", type=float, default=0.0)
    parser.add_argument("--health-status", type=int, default=200)
    parser.add_argument("--health-hang", action="store_true")
    parser.add_argument("--ignore-sigterm", action="store_true")
    parser.add_argument("--sigterm-delay", type=float, default=None)
    parser.add_argument("--fork-grandchild", action="store_true")
    parser.add_argument("--exit-after", type=float, default=None)
    parser.add_argument("--pid-file", default=None)
    parser.add_argument("--chunks", type=int, default=5)
    parser.add_argument("--chunk-delay", type=float, default=0.05)
    parser.add_argument("--fake-vram", type=parse_vram_spec, default=None)
    parser.add_argument("--fake-vram-file", default=None)
    parser.add_argument("--fake-vram-release", type=float, default=0.0)
    parser.add_argument("--sleep-delay", type=float, default=0.0)
    parser.add_argument("--wake-delay", type=float, default=0.0)
    parser.add_argument("--sleep-status", type=int, default=200)
    parser.add_argument("--wake-status", type=int, default=200)
    parser.add_argument("--sleep-vram", type=parse_vram_spec, default={})
    args = parser.parse_args(argv)
    if args.fake_vram and not args.fake_vram_file:
        parser.error("--fake-vram needs --fake-vram-file")
    if args.sleep_vram and not args.fake_vram:
        parser.error("--sleep-vram needs --fake-vram")
    return args


# -- what others read: the pid file and the fake GPU file ---------------------

def append_pid(path: str | None) -> None:
    if path:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(f"{os.getpid()}\n")


def update_fake_vram(path: str, values: dict[str, float]) -> None:
    """Merge `values` into this process's entry of the fake GPU file. Other responders change
    the file too, so under an exclusive lock; llama-swap reads it without one, so it is
    replaced whole."""
    with open(path + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the lock file closes
        try:
            with open(path, encoding="utf-8") as fh:
                state = json.load(fh)
        except FileNotFoundError:
            state = {}
        state.setdefault("processes", {}).setdefault(str(os.getpid()), {}).update(values)
        scratch = f"{path}.{os.getpid()}.tmp"
        with open(scratch, "w", encoding="utf-8") as fh:
            json.dump(state, fh)
        os.replace(scratch, path)


def hold_fake_vram(args: argparse.Namespace) -> None:
    if args.fake_vram:
        update_fake_vram(args.fake_vram_file, args.fake_vram)


def hold_sleeping_vram(args: argparse.Namespace) -> None:
    """What a sleeping server keeps: --sleep-vram of each GPU --fake-vram names, else nothing."""
    if args.fake_vram:
        update_fake_vram(args.fake_vram_file, {gpu: args.sleep_vram.get(gpu, 0) for gpu in args.fake_vram})


def free_fake_vram(args: argparse.Namespace) -> None:
    """Our memory shown freed `--fake-vram-release` seconds from now: the entry stays, as a
    driver keeps showing a dead process's memory until it lets go."""
    if args.fake_vram:
        update_fake_vram(args.fake_vram_file, {"until": time.time() + args.fake_vram_release})


###############################################################################
# 3. State ####################################################################
###############################################################################

# One server's state, shared by its handlers: what it counts (/_responder/info) and
# records (/_responder/events), and the stop that ends it.


@dataclass
class State:
    args: argparse.Namespace
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    exit_code: int = 0
    listening_since: float | None = None
    events: list[dict[str, Any]] = field(default_factory=list)
    requests: int = 0
    health_checks: int = 0
    streamed_bytes: int = 0
    sigterm_pending: bool = False
    asleep: bool = False
    sleeps: int = 0
    wakes: int = 0

    def request_stop(self, code: int) -> None:
        if not self.stop.is_set():
            self.exit_code = code
            self.stop.set()

    def record(self, event: str, path: str) -> None:
        self.events.append({"event": event, "path": path, "time": time.time()})


STATE = web.AppKey("state", State)


###############################################################################
# 4. Echo #####################################################################
###############################################################################

# What a request looked like, as the "echo" key of the reply describes it.


def split_raw_path(raw_path: str) -> tuple[str, str]:
    path, _, query = raw_path.partition("?")
    return path, query


def last_value_headers(request: web.Request) -> dict[str, str]:
    headers: dict[str, str] = {}
    for key, value in request.headers.items():
        headers[key] = value
    return headers


def parse_json_object(body: bytes) -> dict[str, Any] | None:
    if not body:
        return None
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    return value if isinstance(value, dict) else None


def parse_multipart(content_type: str, body: bytes) -> list[tuple[str, str | None, bytes]]:
    """Return (field name, filename, payload) for each part of a multipart body."""
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode()
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
    if not message.is_multipart():
        return []
    parts = []
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if name is None:
            continue
        payload = part.get_payload(decode=True) or b""
        parts.append((str(name), part.get_filename(), payload))
    return parts


def describe_form(content_type: str, body: bytes) -> tuple[list[dict[str, str]] | None, str | None]:
    """Return (form_fields, model) for a multipart body; (None, None) otherwise."""
    if not content_type.lower().startswith("multipart/"):
        return None, None
    fields: list[dict[str, str]] = []
    model: str | None = None
    for name, filename, payload in parse_multipart(content_type, body):
        entry = {"name": name}
        if filename is not None:
            entry["filename"] = filename
        fields.append(entry)
        if name == "model" and filename is None and model is None:
            model = payload.decode("utf-8", errors="replace")
    return fields, model


def urlencoded_model(content_type: str, body: bytes) -> str | None:
    if not content_type.lower().startswith("application/x-www-form-urlencoded"):
        return None
    values = parse_qs(body.decode("utf-8", errors="replace")).get("model")
    return values[0] if values else None


def query_model(query: str) -> str | None:
    values = parse_qs(query).get("model")
    return values[0] if values else None


def find_model(
    json_body: dict[str, Any] | None,
    form_model: str | None,
    content_type: str,
    body: bytes,
    query: str,
) -> Any:
    if json_body is not None and "model" in json_body:
        return json_body["model"]
    if form_model is not None:
        return form_model
    return urlencoded_model(content_type, body) or query_model(query)


BIG_BODY = 8 * 1024 * 1024  # a bigger body is counted (body_len), not read: its echo has body ""


def build_echo(
    request: web.Request, body: bytes, json_body: dict[str, Any] | None
) -> dict[str, Any]:
    path, query = split_raw_path(request.raw_path)
    content_type = request.headers.get("Content-Type")
    readable = len(body) <= BIG_BODY
    form_fields, form_model = describe_form(content_type or "", body) if readable else (None, None)
    return {
        "method": request.method,
        "path": path,
        "query": query,
        "headers": last_value_headers(request),
        "body": body.decode("utf-8", errors="replace") if readable else "",
        "body_len": len(body),
        "content_type": content_type,
        "model": find_model(json_body, form_model, content_type or "", body, query),
        "form_fields": form_fields,
    }


###############################################################################
# 5. Replies ##################################################################
###############################################################################

# Per-request controls and the OpenAI-shaped bodies and stream events we answer with.


@dataclass
class Controls:
    stream: bool
    chunks: int
    delay: float
    status: int
    sleep: float
    crash_after: int | None
    crash_partial: bool
    stream_bytes: int


def read_controls(args: argparse.Namespace, json_body: dict[str, Any] | None) -> Controls:
    data = json_body or {}
    return Controls(
        stream=data.get("stream") is True,
        chunks=int(data.get("responder_chunks", args.chunks)),
        delay=float(data.get("responder_delay", args.chunk_delay)),
        status=int(data.get("responder_status", 200)),
        sleep=float(data.get("responder_sleep", 0.0)),
        crash_after=None if data.get("responder_crash_after") is None else int(data["responder_crash_after"]),
        crash_partial=data.get("responder_crash_partial") is True,
        stream_bytes=int(data.get("responder_bytes", 0)),
    )


def is_text_completion(path: str) -> bool:
    return "/completions" in path and "chat" not in path


def chat_completion(name: str, echo: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": CHUNK_ID,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": name,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": f"hello from {name}"},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10},
        "echo": echo,
    }


def embeddings(name: str, echo: dict[str, Any]) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2, 0.3]}],
        "model": name,
        "usage": {"prompt_tokens": 3, "total_tokens": 3},
        "echo": echo,
    }


WORD = re.compile(r"\w+")


def rerank_words(text: str) -> set[str]:
    return set(WORD.findall(text.casefold()))


def rerank(name: str, body: dict[str, Any] | None, echo: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """(status, reply) for a rerank request: llama.cpp's answer, scored by word overlap with the
    query, or its 400 error envelope for a body that is not a rerank request."""
    body = body or {}
    query, top_n = body.get("query"), body.get("top_n")
    documents = body.get("documents", body.get("texts"))
    problem = None
    if not isinstance(query, str):
        problem = '"query" must be a string'
    elif not isinstance(documents, list) or not documents or not all(isinstance(d, str) for d in documents):
        problem = '"documents" must be a non-empty array of strings'
    elif top_n is not None and (isinstance(top_n, bool) or not isinstance(top_n, int) or top_n < 0):
        problem = '"top_n" must be a non-negative integer'
    if problem:
        return 400, {"error": {"code": 400, "message": problem, "type": "invalid_request_error"}}
    wanted = rerank_words(query)
    scores = [round(len(wanted & rerank_words(d)) / len(wanted), 6) if wanted else 0.0 for d in documents]
    order = sorted(range(len(documents)), key=lambda i: -scores[i])  # stable: ties keep document order
    if top_n is not None:
        order = order[:top_n]
    tokens = len(WORD.findall(query)) + sum(len(WORD.findall(d)) for d in documents)
    return 200, {
        "model": name,
        "object": "list",
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        "results": [{"index": i, "relevance_score": scores[i]} for i in order],
        "echo": echo,
    }


def stream_chunk(name: str, path: str, choice: dict[str, Any]) -> dict[str, Any]:
    text = is_text_completion(path)
    return {
        "id": CHUNK_ID,
        "object": "text_completion" if text else "chat.completion.chunk",
        "created": int(time.time()),
        "model": name,
        "choices": [choice],
    }


def content_choice(path: str, index: int) -> dict[str, Any]:
    token = f"tok{index} "
    if is_text_completion(path):
        return {"index": 0, "text": token, "finish_reason": None}
    delta: dict[str, Any] = {"content": token}
    if index == 0:
        delta = {"role": "assistant", **delta}
    return {"index": 0, "delta": delta, "finish_reason": None}


def final_choice(path: str) -> dict[str, Any]:
    if is_text_completion(path):
        return {"index": 0, "text": "", "finish_reason": "stop"}
    return {"index": 0, "delta": {}, "finish_reason": "stop"}


def stream_events(name: str, echo: dict[str, Any], chunks: int) -> list[str]:
    """All `data:` payloads of one stream, in order (echo rides on the first)."""
    path = echo["path"]
    payloads: list[dict[str, Any]] = []
    for index in range(chunks):
        payloads.append(stream_chunk(name, path, content_choice(path, index)))
    final = stream_chunk(name, path, final_choice(path))
    prompt_tokens = len(echo["body"].split()) or 7
    final["usage"] = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": chunks,
        "total_tokens": prompt_tokens + chunks,
    }
    payloads.append(final)
    payloads[0]["echo"] = echo
    return [json.dumps(payload) for payload in payloads] + ["[DONE]"]


###############################################################################
# 6. HTTP #####################################################################
###############################################################################

# The endpoints of the module docstring; every other path gets the echo reply, streamed
# when the body asks for it.


async def handle_health(request: web.Request) -> web.Response:
    state = request.app[STATE]
    state.health_checks += 1
    if state.args.health_hang:
        await asyncio.Event().wait()
    since = state.listening_since or time.monotonic()
    if time.monotonic() - since < state.args.healthy_after:
        return web.json_response({"status": "loading"}, status=503)
    code = state.args.health_status
    body = {"status": "ok" if 200 <= code < 300 else "error"}
    return web.json_response(body, status=code)


async def handle_root(request: web.Request) -> web.Response:
    name = request.app[STATE].args.name
    html = f"<html><body>responder {name}</body></html>"
    return web.Response(text=html, content_type="text/html")


async def handle_events(request: web.Request) -> web.Response:
    return web.json_response(request.app[STATE].events)


async def handle_info(request: web.Request) -> web.Response:
    state = request.app[STATE]
    return web.json_response(
        {
            "name": state.args.name,
            "pid": os.getpid(),
            "port": state.args.port,
            "requests": state.requests,
            "health_checks": state.health_checks,
            "streamed_bytes": state.streamed_bytes,
            "asleep": state.asleep,
            "sleeps": state.sleeps,
            "wakes": state.wakes,
            # wall-clock moment /health turns 200: the bind moment (monotonic) moved to time.time()
            "ready_at": None if state.listening_since is None
            else time.time() - (time.monotonic() - state.listening_since) + state.args.healthy_after,
        }
    )


async def handle_refuse(request: web.Request) -> web.Response:
    status = int(request.query.get("status", "403"))
    return web.Response(status=status, text=f"refused with {status}", headers={"X-Refused": "yes"})


async def handle_sleep(request: web.Request) -> web.Response:
    state, args = request.app[STATE], request.app[STATE].args
    say(f"sleep requested ({request.query_string or 'no level'})")
    await asyncio.sleep(args.sleep_delay)
    if args.sleep_status != 200:
        return web.json_response({"error": "sleep failed (simulated)"}, status=args.sleep_status)
    if not state.asleep:
        hold_sleeping_vram(args)
        state.asleep, state.sleeps = True, state.sleeps + 1
        state.record("sleep", request.path)
        say("asleep")
    return web.json_response({"asleep": True})


async def handle_wake(request: web.Request) -> web.Response:
    state, args = request.app[STATE], request.app[STATE].args
    say("wake up requested")
    await asyncio.sleep(args.wake_delay)
    if args.wake_status != 200:
        return web.json_response({"error": "wake up failed (simulated)"}, status=args.wake_status)
    if state.asleep:
        hold_fake_vram(args)
        state.asleep, state.wakes = False, state.wakes + 1
        state.record("wake", request.path)
        say("awake")
    return web.json_response({"asleep": False})


async def handle_is_sleeping(request: web.Request) -> web.Response:
    return web.json_response({"is_sleeping": request.app[STATE].asleep})


def refused_asleep(request: web.Request) -> web.Response | None:
    """A request that reached a sleeping server (the proxy should have woken it): recorded, 503."""
    state = request.app[STATE]
    if not state.asleep:
        return None
    state.record("request_while_asleep", request.path)
    return web.json_response({"error": {"message": f"responder {state.args.name} is asleep"}}, status=503)


async def take_request(request: web.Request) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """Read, counted, recorded and said: (its body's JSON object, if small and one; its echo)."""
    state = request.app[STATE]
    state.requests += 1
    body = await request.read()
    json_body = parse_json_object(body) if len(body) <= BIG_BODY else None
    echo = build_echo(request, body, json_body)
    state.record("request", echo["path"])
    say(f"request {request.method} {request.raw_path}")
    return json_body, echo


async def handle_echo(request: web.Request) -> web.StreamResponse:
    if (refusal := refused_asleep(request)) is not None:
        return refusal
    state = request.app[STATE]
    json_body, echo = await take_request(request)
    controls = read_controls(state.args, json_body)
    if controls.sleep > 0:
        await asyncio.sleep(controls.sleep)
    if controls.stream:
        return await send_stream(request, state, echo, controls)
    name = state.args.name
    reply = embeddings(name, echo) if "embeddings" in echo["path"] else chat_completion(name, echo)
    return web.json_response(reply, status=controls.status)


async def handle_rerank(request: web.Request) -> web.Response:
    """POST /v1/rerank and its other names: see rerank()."""
    if (refusal := refused_asleep(request)) is not None:
        return refusal
    state = request.app[STATE]
    json_body, echo = await take_request(request)
    try:
        controls = read_controls(state.args, json_body)
    except (TypeError, ValueError):  # a control of the wrong type: a bad request, never a 500
        return web.json_response({"error": {"code": 400, "message": "unreadable responder_* control",
                                             "type": "invalid_request_error"}}, status=400)
    if controls.sleep > 0:
        await asyncio.sleep(controls.sleep)
    status, reply = rerank(state.args.name, json_body, echo)
    return web.json_response(reply, status=controls.status if status == 200 else status)


# -- streams ------------------------------------------------------------------

async def send_stream(
    request: web.Request, state: State, echo: dict[str, Any], controls: Controls
) -> web.StreamResponse:
    path = echo["path"]
    response = web.StreamResponse(
        status=controls.status,
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"},
    )
    response.enable_chunked_encoding()
    try:
        await response.prepare(request)
        if controls.stream_bytes > 0:
            await write_filler(response, state, controls.stream_bytes)
        elif controls.crash_after is not None:
            await crash_mid_stream(request, response, state, echo, controls)
        else:
            await write_events(response, stream_events(state.args.name, echo, controls.chunks), controls.delay)
        await response.write_eof()
    except ConnectionError:  # a reset, or aiohttp's "Connection lost" while write() drained
        note_disconnect(state, path)
        return response
    except asyncio.CancelledError:
        note_disconnect(state, path)
        raise
    state.record("stream_completed", path)
    return response


async def write_events(response: web.StreamResponse, events: list[str], delay: float) -> None:
    for index, data in enumerate(events):
        if index > 0 and delay > 0:
            await asyncio.sleep(delay)
        await response.write(f"data: {data}\n\n".encode())  # write() drains


def filler_event() -> bytes:
    head, tail = b'data: {"filler": "', b'"}\n\n'
    return head + b"x" * (FILLER_EVENT_BYTES - len(head) - len(tail)) + tail


async def write_filler(response: web.StreamResponse, state: State, total: int) -> None:
    """At least `total` bytes of events, each write() awaited, so a slow reader slows us down."""
    event = filler_event()
    sent = 0
    while sent < total:
        await response.write(event)
        sent += len(event)
        state.streamed_bytes += len(event)
    await response.write(b"data: [DONE]\n\n")


async def crash_mid_stream(
    request: web.Request, response: web.StreamResponse, state: State, echo: dict[str, Any], controls: Controls
) -> NoReturn:
    """Send the first `crash_after` content events (and half of one more), then die at once."""
    count = controls.crash_after or 0
    events = stream_events(state.args.name, echo, max(count, controls.chunks))[:count]
    await write_events(response, events, controls.delay)
    if controls.crash_partial:
        await response.write(HALF_EVENT)
    # write() may leave bytes in the transport's buffer; the crash must not eat what was "sent".
    while request.transport is not None and request.transport.get_write_buffer_size():
        await asyncio.sleep(0.01)
    say(f"crashing mid-stream after {count} events (simulated)")
    os._exit(1)


def note_disconnect(state: State, path: str) -> None:
    state.record("client_disconnected", path)
    say(f"client disconnected during stream on {path}")


# -- websocket and the application --------------------------------------------

async def handle_websocket(request: web.Request) -> web.WebSocketResponse:
    """GET /ws: a websocket that echoes text as "echo: <text>" and binary as it came."""
    ws = web.WebSocketResponse(protocols=("echo-protocol",))
    await ws.prepare(request)
    async for message in ws:
        if message.type == aiohttp.WSMsgType.TEXT:
            await ws.send_str(f"echo: {message.data}")
        elif message.type == aiohttp.WSMsgType.BINARY:
            await ws.send_bytes(message.data)
    return ws


def make_app(state: State) -> web.Application:
    app = web.Application(client_max_size=MAX_BODY)
    app[STATE] = state
    app.router.add_get("/health", handle_health)
    app.router.add_get("/", handle_root)
    app.router.add_get("/_responder/events", handle_events)
    app.router.add_get("/_responder/info", handle_info)
    app.router.add_get("/ws", handle_websocket)
    app.router.add_get("/_responder/refuse", handle_refuse)
    app.router.add_post("/sleep", handle_sleep)
    app.router.add_post("/wake_up", handle_wake)
    app.router.add_get("/is_sleeping", handle_is_sleeping)
    for path in RERANK_PATHS:
        app.router.add_post(path, handle_rerank)
    app.router.add_route("*", "/{tail:.*}", handle_echo)
    return app


###############################################################################
# 7. Lifecycle ################################################################
###############################################################################

# Signals, the simulated load and crash, serving, --fork-grandchild and main().


def install_signal_handlers(state: State) -> None:
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, on_sigterm, state)
    loop.add_signal_handler(signal.SIGINT, on_sigint, state)


def on_sigint(state: State) -> None:
    say("SIGINT received, shutting down")
    state.request_stop(0)


def on_sigterm(state: State) -> None:
    args = state.args
    if args.ignore_sigterm:
        say("ignoring SIGTERM")
    elif args.sigterm_delay is not None:
        if not state.sigterm_pending:
            state.sigterm_pending = True
            say(f"SIGTERM received, exiting in {args.sigterm_delay:g} s")
            asyncio.get_running_loop().call_later(args.sigterm_delay, state.request_stop, 0)
    else:
        say("SIGTERM received, shutting down")
        state.request_stop(0)


def simulate_crash(state: State) -> None:
    warn(f"error: failed to load model '{state.args.name}': out of memory (simulated)")
    state.request_stop(1)


# -- loading ------------------------------------------------------------------

async def wait_for_stop(state: State, timeout: float) -> bool:
    """Wait up to `timeout` seconds; True when a stop was requested meanwhile."""
    try:
        await asyncio.wait_for(state.stop.wait(), timeout)
    except asyncio.TimeoutError:  # TimeoutError itself only from 3.11
        return False
    return True


def load_progress_output(style: str) -> tuple[str, list[tuple[float, str]], str]:
    """What a loader of `style` prints: a head, then (share of the load done, text) steps, then an end."""
    if style == "dots":
        return "llm_load_tensors: loading model tensors\n", [(k / 100, ".") for k in range(1, 101)], "\n"
    shards = [(n / SHARDS,
               f"\rLoading safetensors checkpoint shards: {100 * n / SHARDS:3.0f}% Completed | {n}/{SHARDS}")
              for n in range(SHARDS + 1)]
    return "", shards, "\n"


async def load_with_progress(state: State) -> bool:
    """A slow load that says how far it has got (--load-progress); False when stopped before it finished."""
    head, steps, end = load_progress_output(state.args.load_progress)
    began = time.monotonic()
    write_now(head)
    for done, text in steps:
        if await wait_for_stop(state, max(0.0, began + done * state.args.startup_delay - time.monotonic())):
            return False
        write_now(text)
    write_now(end)
    return not state.stop.is_set()


async def load_model(state: State) -> bool:
    """Simulate a slow model load; False when stopped before it finished."""
    if state.args.load_progress and state.args.startup_delay > 0:
        return await load_with_progress(state)
    deadline = time.monotonic() + state.args.startup_delay
    while (remaining := deadline - time.monotonic()) > 0:
        say("loading model...")
        if await wait_for_stop(state, min(LOADING_TICK, remaining)):
            return False
    return not state.stop.is_set()


# -- serving ------------------------------------------------------------------

async def serve(args: argparse.Namespace) -> int:
    state = State(args)
    install_signal_handlers(state)
    if args.exit_after is not None:
        asyncio.get_running_loop().call_later(args.exit_after, simulate_crash, state)
    if not await load_model(state):
        return state.exit_code
    hold_fake_vram(args)
    try:
        return await listen(state)
    finally:
        free_fake_vram(args)


async def listen(state: State) -> int:
    """Serve until a stop is requested; the exit status."""
    args = state.args
    runner = web.AppRunner(make_app(state), shutdown_timeout=SHUTDOWN_TIMEOUT)
    await runner.setup()
    try:
        try:
            await web.TCPSite(runner, args.host, args.port).start()
        except OSError as exc:
            warn(f"error: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}")
            return 1
        state.listening_since = time.monotonic()
        say(f"responder {args.name} listening on http://{args.host}:{args.port}")
        await state.stop.wait()
    finally:
        await runner.cleanup()
    return state.exit_code


# -- --fork-grandchild --------------------------------------------------------

def grandchild_argv(argv: list[str]) -> list[str]:
    rest = [arg for arg in argv if arg != "--fork-grandchild"]
    return [sys.executable, os.path.abspath(__file__), *rest]


def exit_without_forwarding(signum: int, _frame: object) -> None:
    say(f"fork parent got signal {signum}, exiting without forwarding it")
    raise SystemExit(0)


def run_fork_parent(argv: list[str]) -> int:
    """Behave like `sh -c 'server & wait'`: start the real server, wait for it."""
    signal.signal(signal.SIGTERM, exit_without_forwarding)
    signal.signal(signal.SIGINT, exit_without_forwarding)
    child = subprocess.Popen(grandchild_argv(argv))
    say(f"grandchild pid {child.pid}")
    code = child.wait()
    return code if code >= 0 else 128 - code


# -- main ---------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    make_line_buffered()
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    append_pid(args.pid_file)
    say(f"responder {args.name} starting (pid {os.getpid()})")
    if args.fork_grandchild:
        return run_fork_parent(argv)
    return asyncio.run(serve(args))


if __name__ == "__main__":
    sys.exit(main())
