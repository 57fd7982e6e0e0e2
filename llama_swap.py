"""llama-swap-py: many local AI models behind one address.

A client sends an OpenAI- or Anthropic-style request; we read its `model`, start the
upstream server configured for it (llama-server, vLLM, whisper, ...), stop whatever must
make room, wait until it is healthy and relay the request and its streamed answer
untouched. A drop-in for the Go llama-swap: same config file, same endpoints, same JSON.

Contents, in dependency order (each section opens with its concept and rules):
    1. Helpers            Go's formats of values, durations and times; sizes; Named enums; secrets masked
    2. Config: shapes     Config, ModelConfig, ApiKey, Routing, ...: plain data; ConfigError
    3. Config: the file   YAML -> Config in three passes: files, macros, values
    4. Config: models     each model's keys, its command checked, its aliases
    5. Config: routing    groups, matrix DSL, vram router, priorities; peers, selectors, profiles
    6. Logging            ProxyLog: history rings, live readers, stdout that never blocks us
    7. Process groups     GroupRecord and its watcher: no model server outlives us
    8. KV cache           llama-server slots saved before a stop, restored after a start
    9. Model processes    ModelProcess: spawn, health, load progress, sleep, wake, stop; Learnt
   10. GPUs               Nvml, the one NVML reader (opened here); FakeVram for tests
   11. Swap policy        which models must stop (or sleep) for a target, and why (pure)
   12. Scheduler          the one owner of swap decisions: decide(), then grant, join, queue, swap
   13. Virtual models     profiles' pins and selectors: names that stand for other models
   14. Request bodies     finding and rewriting `model` without decoding the rest; BodyReader
   15. In-flight          Exchange and InFlight: one request on its way, cancellable
   16. Relay              our HTTP/1.1 client (Connections); bytes from upstream to client, chunk by
                          chunk; websockets; peers
   17. Activity: answers  tokens, speeds and errors read from a finished answer
   18. Activity: store    ActivityStore (SQLite), captures, Activity (the row written)
   19. Performance        /proc and GPU samples (PerformanceMonitor), /api/hardware
   20. Metrics            /metrics in Prometheus text
   21. API answers        OpenAI error envelopes, model records, key scopes, origin/host checks
   22. Events             /api/events fan-out; the timeline's last hour; the stream sent while a model loads
   23. Runtime            Runtime: wiring, background Tasks, configure(), GPU watching
   24. Reload             ConfigSource, reload(), --watch-config and SIGHUP
   25. HTTP               Server: route table, middlewares, handlers, the hot path
   26. CLI                flags, serve() (bind, start, wait, shut down), main()

How a request travels: the middlewares (access log, CORS, clean path, watch, errors, guard,
keys) hand it to Server.handle_model, which reads the body (BodyReader), finds its model
(request_model, off the event loop for big bodies), resolves pins and selectors
(VirtualModels), rewrites the body for the upstream (Server.for_upstream), and asks the
Scheduler for the model (Scheduler.lease: granted at once, joined to a start, or queued for a
swap decided by the SwapPolicy). Once granted, Server.relay_local relays it (relay: bytes as
they come) and the lease's end releases the model. After the answer, the `watch` middleware
hands the Exchange to Metrics and Activity, which writes its row off the event loop.
"""

from __future__ import annotations

__version__ = "0.1.0"
__license__ = "MIT"

import argparse
import asyncio
import base64
import bisect
import codecs
import collections
import concurrent.futures
import contextlib
import contextvars
import ctypes
import dataclasses
import datetime
import decimal
import difflib
import enum
import errno
import fnmatch
import functools
import gzip
import hashlib
import hmac
import html
import http
import importlib.resources
import ipaddress
import itertools
import json
import logging
import math
import os
import pathlib
import platform
import posixpath
import random
import re
import shlex
import shutil
import signal
import socket
import sqlite3
import ssl
import statistics
import sys
import sysconfig
import threading
import time
import urllib.parse
import urllib.request
import weakref
import zlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable, Iterable, Iterator, Literal, Mapping, Protocol, Sequence

import multidict
import yaml
from yarl import URL


@contextlib.contextmanager
def system_certificates_unloaded() -> Iterator[None]:
    """aiohttp fills two TLS contexts with the system's CA certificates as it is imported: a
    fifth of the time from exec to listening and 2 MiB, spent at every start for contexts this
    proxy never uses (tls_client_context verifies https upstreams and peers, loaded at first
    need). A session left with aiohttp's default context would fail its https handshakes: it
    fails closed."""
    load = ssl.SSLContext.set_default_verify_paths
    ssl.SSLContext.set_default_verify_paths = lambda context: None
    try:
        yield
    finally:
        ssl.SSLContext.set_default_verify_paths = load


with system_certificates_unloaded():
    import aiohttp  # noqa: E402
    from aiohttp import web  # noqa: E402

# A deadline for the awaits in its block, without the task that asyncio.wait_for makes before
# Python 3.12: a task and two turns of the event loop for every request relayed under a
# responseHeader timeout (a peer's is 60 s unless set).
if sys.version_info >= (3, 11):
    from asyncio import timeout as time_limit  # noqa: E402
else:  # the same context manager, from a package aiohttp needs on 3.10
    from async_timeout import timeout as time_limit  # noqa: E402

###############################################################################
# 1. Helpers ##################################################################
###############################################################################

# Small things used everywhere: Go's ways of writing values, durations and times (the JSON,
# logs and metrics the original's users parse), sizes, and reading a small file whole.


class Named(str, enum.Enum):
    """An enum whose members are plain strings wherever they go: JSON, logs, f-strings, dict keys."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


def go_format(value: Any) -> str:
    """A scalar as Go's %v prints it: true/false lower-case, floats in their shortest form."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        text = repr(value)
        return re.sub(r"e([+-]?)(\d+)$", lambda m: f"e{m.group(1) or '+'}{int(m.group(2)):02d}", text)
    return str(value)


def go_duration(seconds: float) -> str:
    """Seconds as Go's time.Duration prints them: 15s, 2m0s, 1h0m0s, 1.5s, 250ms."""
    if seconds < 1:
        return f"{seconds * 1000:g}ms"
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    text = f"{secs:.9g}s"
    if hours or minutes:
        text = f"{int(minutes)}m{text}"
    if hours:
        text = f"{int(hours)}h{text}"
    return text


GO_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_go_duration(text: str) -> float:
    """`5s`, `1m30s`, `250ms` -> seconds; ValueError for anything else (a bare number included)."""
    parts = re.findall(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)", text)
    if not text or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"invalid duration {text!r} (expected a value such as 5s, 1m30s or 250ms)")
    return sum(float(n) * GO_DURATION_UNITS[u] for n, u in parts)


def go_float(value: float) -> int | float:
    """A float64 as Go's encoder writes it: whole numbers without ".0" (10, not 10.0)."""
    number = float(value)
    return int(number) if number.is_integer() else number


def go_json(value: Any) -> str:
    """Compact JSON as Go's encoder writes it: <, > and & escaped, other text kept as UTF-8."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _go_zone(t: datetime.datetime) -> str:
    """Go's `Z07:00`: Z for UTC, else the offset with a colon."""
    offset = t.strftime("%z")
    return "Z" if offset in ("+0000", "") else f"{offset[:3]}:{offset[3:]}"


def _fraction(t: datetime.datetime, digits: int, trim: bool = False) -> str:
    text = f"{t.microsecond:06d}000"[:digits]
    return ("." + text.rstrip("0")) if trim and text.rstrip("0") else "" if trim else "." + text


def go_time(moment: datetime.datetime, fraction: bool = True) -> str:
    """RFC 3339 as Go writes a time.Time in JSON: the fraction without trailing zeros, Z for UTC."""
    fraction_text = _fraction(moment, 9, trim=True) if fraction else ""
    return moment.strftime("%Y-%m-%dT%H:%M:%S") + fraction_text + _go_zone(moment)


def go_timestamp(seconds: float, fraction: bool = True) -> str:
    """Unix seconds in local time, as Go writes a time.Time in JSON."""
    return go_time(datetime.datetime.fromtimestamp(seconds).astimezone(), fraction)


_RFC3339 = re.compile(r"([0-9]{4})-([0-9]{2})-([0-9]{2})T([0-9]{2}):([0-9]{2}):([0-9]{2})"
                      r"(?:\.([0-9]+))?(Z|[+-][0-9]{2}:[0-9]{2})")


def parse_rfc3339(text: str) -> datetime.datetime:
    """An `after=` query value read as Go's time.Parse(time.RFC3339) reads it: upper-case T and
    Z, an optional fraction of any length, an offset of ±hh:mm. ValueError otherwise (→ 400)."""
    match = _RFC3339.fullmatch(text)
    if not match:
        raise ValueError(f"not an RFC 3339 timestamp: {text!r}")
    year, month, day, hour, minute, second = (int(part) for part in match.groups()[:6])
    microsecond = int((match[7] or "0")[:6].ljust(6, "0"))  # Go keeps nanoseconds; we can keep micro
    return datetime.datetime(year, month, day, hour, minute, second, microsecond, _zone(match[8]))


def _zone(text: str) -> datetime.timezone:
    if text == "Z":
        return datetime.timezone.utc
    hours, minutes = int(text[1:3]), int(text[4:6])
    if minutes >= 60:
        raise ValueError(f"time zone offset out of range: {text}")
    offset = datetime.timedelta(hours=hours, minutes=minutes)
    return datetime.timezone(-offset if text[0] == "-" else offset)  # ValueError from 24:00 on


def local_now() -> datetime.datetime:
    """The current time, timezone-aware in the local zone (Go stamps samples with time.Now())."""
    return datetime.datetime.now().astimezone()


# Python's reason phrases where they differ from Go's http.StatusText, which the rows mirror.
GO_STATUS_TEXT = {413: "Request Entity Too Large", 414: "Request URI Too Long",
                  416: "Requested Range Not Satisfiable", 418: "I'm a teapot",
                  422: "Unprocessable Entity"}


def status_line(status: int) -> str:
    """`502 Bad Gateway` with Go's reason phrases; `HTTP 599` for codes without one."""
    try:
        phrase = GO_STATUS_TEXT.get(status) or http.HTTPStatus(status).phrase
    except ValueError:
        return f"HTTP {status}"
    return f"{status} {phrase}"


MIB = 1048576  # the spec's "MB": sizes are kept in whole MiB and exported as MiB * 1048576 bytes


def format_bytes(size: float) -> str:
    return f"{size / 1024**3:.1f}GiB"


def read_text(path: str) -> str:
    """A /proc or /sys file's text, or "" where there is none (not Linux) or it cannot be read."""
    try:
        with open(path, encoding="utf-8", errors="replace") as file:
            return file.read()
    except OSError:
        return ""


# A flag or variable whose name says it holds a secret: its value is not shown on a model's
# page, nor in the output a failed start shows.
SECRET_WORD = r"(?:keys?|tokens?|secrets?|passw(?:or)?d|passphrase|auth\w*|credentials?)"
SECRET_NAME = rf"(?:[\w.]*[-_.])?{SECRET_WORD}(?:[-_.][\w.-]*)?"
SECRET_IN_COMMAND = re.compile(rf"(?i)((?<![\w-])-{{1,2}}{SECRET_NAME}(?:=|\s+)|(?<![\w-])[a-z_]{SECRET_NAME}=)"
                               r"(?!-)(\"[^\"]*\"|'[^']*'|\S+)")


def masked_command(command: str) -> str:
    """A command with the values of its secret-looking flags and variables shown as [REDACTED]."""
    return SECRET_IN_COMMAND.sub(r"\1[REDACTED]", command)


def masked_env(env: Iterable[str]) -> list[str]:
    return [f"{name}=[REDACTED]" if sep and re.fullmatch(SECRET_NAME, name, re.I) else
            f"{name}{sep}{value}" for name, sep, value in (item.partition("=") for item in env)]


###############################################################################
# 2. Config: the shapes #######################################################
###############################################################################

# What a config file says, as plain data: Config and the classes it is made of, and the
# errors that name the file, the key and the model. Nothing here reads files or YAML.

DEFAULT_START_PORT = 5800
DEFAULT_MAX_REQUEST_BODY_MB = 256  # base64 images and audio fit; a runaway client does not
DEFAULT_QUEUE_TIMEOUT_MS = 300_000  # a request waits this long at most for its model: queue, swap and load
DEFAULT_STALLED_CLIENT_TIMEOUT = 300  # seconds: a reader paused in a debugger or a slow link survive it
DEFAULT_HEALTH_CHECK_TIMEOUT = 120
MIN_HEALTH_CHECK_TIMEOUT = 15
DEFAULT_UNLOAD_TIMEOUT = 10
DEFAULT_CONCURRENCY_LIMIT = 10
DEFAULT_KV_CACHE_MB = 8192  # per model: a few long conversations of a mid-size model
DEFAULT_KV_SAVE_TIMEOUT = 30  # seconds a stop may wait for the slots to be saved
DEFAULT_PROXY = "http://localhost:${PORT}"
DEFAULT_IGNORE_PATHS = (r".*\.(js|json|css|png|gif|jpg|jpeg|ico|txt)$",)
DEFAULT_SESSION_HEADERS = ("X-Session-ID", "X-Litellm-Session-Id")
DEFAULT_GROUP = "(default)"
RESERVED_MACROS = ("PID", "PORT", "MODEL_ID", "KV_CACHE_DIR")
MODALITIES = ("text", "audio", "image")
LOG_TO_STDOUT = ("proxy", "upstream", "both", "none")
LOG_TIME_FORMATS = ("ansic", "unixdate", "rubydate", "rfc822", "rfc822z", "rfc850", "rfc1123", "rfc1123z",
                    "rfc3339", "rfc3339nano", "kitchen", "stamp", "stampmilli", "stampmicro", "stampnano")
SELECTOR_STRATEGIES = ("warm", "pin", "spillover")
# Maps whose children name things: two config files may not both define the same child.
IDENTITY_MAPS = ("models", "groups", "profiles", "selectors", "peers", "matrix",
                 "routing.router.settings.groups", "routing.router.settings.matrix")

ENV_MACRO = re.compile(r"\$\{env\.([a-zA-Z_][a-zA-Z0-9_]*)\}")
MACRO = re.compile(r"\$\{([a-zA-Z0-9_-]+)\}")
ANY_MACRO = re.compile(r"\$\{([^}]*)\}")


class ConfigError(Exception):
    """Config problems worded for the user, one per line: which key, of which model, is wrong
    and why."""

    def __init__(self, *messages: str):
        super().__init__("\n".join(messages))
        self.messages = list(messages)

    def within(self, where: str) -> ConfigError:
        """The same errors, each naming the file (or directory) they were found in."""
        return ConfigError(*(f"{where}: {message}" for message in self.messages))


class ConfigErrors:
    """The errors of one pass over the config, gathered so that a file with several mistakes
    shows them all at once. A pass runs only on what passed the one before it, so an error is
    never the echo of another."""

    def __init__(self) -> None:
        self.messages: list[str] = []

    @contextlib.contextmanager
    def gather(self) -> Iterator[None]:
        try:
            yield
        except ConfigError as e:
            self.messages += e.messages

    def check(self) -> None:
        """End of a pass: raise what it found."""
        if self.messages:
            raise ConfigError(*self.messages)


@dataclass(frozen=True)
class Group:
    """Models that share swap rules."""

    name: str
    members: frozenset[str]
    swap: bool = True  # members replace each other
    exclusive: bool = True  # loading a member unloads other groups
    persistent: bool = False  # never unloaded by another group


@dataclass
class Capabilities:
    """What a model takes and gives, shown in /v1/models."""

    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    tools: bool = False
    reranker: bool = False
    context: int = 0

    def empty(self) -> bool:
        return not (self.inputs or self.outputs or self.tools or self.reranker or self.context)


@dataclass
class Filters:
    """Request rewrites for one model or peer."""

    strip_params: list[str] = field(default_factory=list)  # sorted, without `model`
    set_params: dict[str, Any] = field(default_factory=dict)
    set_params_by_id: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class Timeouts:
    """Seconds allowed for the upstream connection; 0 means no limit."""

    connect: int = 30
    keepalive: int = 30
    response_header: int = 0
    tls_handshake: int = 10
    expect_continue: int = 1
    idle_conn: int = 90


@dataclass
class ModelConfig:
    """One entry under `models:`, after macro expansion and defaults."""

    id: str
    cmd: str  # comment lines removed, newlines kept: what /running shows
    cmd_stop: str = ""
    proxy: str = ""
    check_endpoint: str = "/health"
    env: list[str] = field(default_factory=list)
    aliases: list[str] = field(default_factory=list)
    use_model_name: str = ""
    unlisted: bool = False
    name: str = ""
    description: str = ""
    ttl: int = 0
    unload_timeout: int = DEFAULT_UNLOAD_TIMEOUT
    health_check_timeout: int = DEFAULT_HEALTH_CHECK_TIMEOUT  # always the global value
    concurrency_limit: int = DEFAULT_CONCURRENCY_LIMIT
    send_loading_state: bool = False
    metadata: dict[str, Any] = field(default_factory=dict)
    capabilities: Capabilities = field(default_factory=Capabilities)
    filters: Filters = field(default_factory=Filters)
    timeouts: Timeouts = field(default_factory=Timeouts)
    ignore_websockets: bool = False
    vram: dict[int | None, int] = field(default_factory=dict)  # GPU -> bytes (None: all GPUs, split evenly)
    kv_cache: KvCache | None = None
    sleep: Sleep | None = None
    protected: bool = False  # ours: requests never make it stop or sleep (an admin, its TTL or a reload may)
    problem: str = ""  # why it cannot start, where the original would load the file anyway; "" when it can


@dataclass
class KvCache:
    """kvCache: a llama-server's slots saved before it stops and restored after it starts."""

    max_disk_mb: int = DEFAULT_KV_CACHE_MB  # all of the model's saved slots together
    save_timeout: int = DEFAULT_KV_SAVE_TIMEOUT
    directory: str = ""  # ${KV_CACHE_DIR}: ours, one per model and launch settings


@dataclass(frozen=True)
class HttpCall:
    """A call sent to a model's own server, written in the config as `POST /sleep?level=1`."""

    method: str
    path: str  # with its query, as sent

    def __str__(self) -> str:
        return f"{self.method} {self.path}"


@dataclass(frozen=True)
class Sleep:
    """sleep: the calls that put a model's server to sleep (its GPU memory released, its process
    kept) and wake it again, used instead of a stop where the server has them (vLLM)."""

    sleep: HttpCall
    wake: HttpCall


@dataclass
class PeerConfig:
    """Another llama-swap (or any OpenAI-style server) whose models we forward to."""

    id: str
    proxy: str
    models: list[str]
    api_key: str = ""
    filters: Filters = field(default_factory=Filters)
    timeouts: Timeouts = field(default_factory=lambda: Timeouts(response_header=60))


@dataclass
class Matrix:
    """The matrix DSL: named sets of models that may run together."""

    vars: dict[str, str]
    sets: dict[str, str]  # name -> DSL text, in definition order
    evict_costs: dict[str, int]  # model ID -> cost
    combinations: dict[str, list[frozenset[str]]]  # set name -> its model sets, in solver order


class Router(Named):
    """routing.router.use: which rules decide what stops so that a model may run."""

    GROUP = "group"
    MATRIX = "matrix"
    VRAM = "vram"


@dataclass
class Routing:
    """Which swap rules apply (groups or matrix) and the scheduler's priorities."""

    router: Router = Router.GROUP
    groups: list[Group] = field(default_factory=list)
    matrix: Matrix | None = None
    priority: dict[str, int] = field(default_factory=dict)
    max_wait: float = 10.0  # seconds a request may be kept waiting while loaded models serve others
    min_residency: float = 0.0  # seconds a model just loaded is not swapped out (within max_wait)
    queue_timeout: float = DEFAULT_QUEUE_TIMEOUT_MS / 1000  # seconds a request may wait for its model (0: forever)
    vram_reserve: dict[int | None, int] = field(default_factory=dict)  # GPU -> bytes kept free (None: every GPU)
    vram_release_wait: float = 30.0  # seconds to wait for evicted models' memory to show free


@dataclass
class Profile:
    id: str
    description: str
    pins: dict[str, str]  # pin name -> target ("" = disabled)


class SwapRight(Named):
    """What a key's requests may do to the models that run (apiKeys' `swap`)."""

    EVICT = "evict"  # stop (or put to sleep) other models to start theirs: today's meaning
    QUEUE = "queue"  # wait until their model runs or can start without stopping anything
    RESIDENT = "resident"  # only a model that is ready now; otherwise 503 at once


@dataclass(frozen=True)
class ApiKey:
    """One entry of apiKeys or adminKeys. A plain string is a key with every right; a mapping
    may scope it. `name` is how logs, activity and metrics show it: never the key itself."""

    key: str = field(repr=False)
    name: str
    models: tuple[str, ...] = ()  # names or globs over model ids and aliases; none: every model
    swap: SwapRight = SwapRight.EVICT
    priority: int = 0  # added to the model's fifo priority for this key's requests
    concurrency: int = 0  # at most this many of its requests admitted at once; 0: no limit
    path: str = ""  # where the config has it: apiKeys[1]

    @property
    def restricted(self) -> bool:
        """Scoped to some models or kept from swapping: such a key may not change the server's state."""
        return bool(self.models) or self.swap is not SwapRight.EVICT

    def allows(self, *names: str) -> bool:
        """Whether the key may use a model known by any of these names."""
        return not self.models or any(fnmatch.fnmatchcase(name, glob) for glob in self.models for name in names if name)


@dataclass
class Selector:
    """A virtual model ID that picks one of its targets per request."""

    id: str
    strategy: str
    targets: list[str]
    name: str = ""
    description: str = ""
    unlisted: bool = False
    metadata: dict[str, Any] = field(default_factory=dict)
    spillover: int = 1


@dataclass
class Config:
    """The whole configuration: models by ID plus the global settings they share."""

    models: dict[str, ModelConfig]
    health_check_timeout: int = DEFAULT_HEALTH_CHECK_TIMEOUT
    aliases: dict[str, str] = field(default_factory=dict)  # alias -> model ID
    ignore_paths: list[re.Pattern] = field(default_factory=list)
    log_level: str = "info"
    log_to_stdout: str = "proxy"
    log_time_format: str = ""
    global_ttl: int = 0
    unload_timeout: int = DEFAULT_UNLOAD_TIMEOUT
    kv_cache_root: str = ""  # where the models' ${KV_CACHE_DIR}s are
    include_aliases_in_list: bool = False
    send_loading_state: bool = False
    metrics_max_in_memory: int = 1000
    max_request_body_mb: int = DEFAULT_MAX_REQUEST_BODY_MB  # ours: bodies past it get a 413
    stalled_client_timeout: int = DEFAULT_STALLED_CLIENT_TIMEOUT  # ours: seconds a client may take no bytes
    capture_buffer_mb: int = 5
    store_path: str | None = None
    session_headers: list[str] = field(default_factory=lambda: list(DEFAULT_SESSION_HEADERS))
    performance_disabled: bool = False
    performance_every: float = 5.0
    preload: list[str] = field(default_factory=list)
    api_keys: list[ApiKey] = field(default_factory=list)
    admin_keys: list[ApiKey] = field(default_factory=list)
    allowed_origins: list[str] = field(default_factory=list)  # ours: their host[:port], lower-case
    peers: dict[str, PeerConfig] = field(default_factory=dict)
    routing: Routing = field(default_factory=Routing)
    profiles: dict[str, Profile] = field(default_factory=dict)
    selectors: dict[str, Selector] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)  # unknown keys and ignored values
    start_port: int = DEFAULT_START_PORT
    ports: dict[str, int] = field(default_factory=dict)  # model ID -> the port its ${PORT} stands for

    def real_model_id(self, name: str) -> str | None:
        """The model ID a requested name means: an ID first, then an alias."""
        if name in self.models:
            return name
        return self.aliases.get(name)

    @functools.cached_property
    def peer_routes(self) -> dict[str, tuple[str, str]]:
        """Requested name -> (peer ID, the peer's model ID): every FQN, and unambiguous bare names."""
        routes = {f"{p.id}/{m}": (p.id, m) for p in self.peers.values() for m in p.models}
        bare: dict[str, list[tuple[str, str]]] = {}
        for peer in self.peers.values():
            for m in peer.models:
                bare.setdefault(m, []).append((peer.id, m))
        for name, owners in bare.items():
            if len(owners) == 1 and name not in routes:
                routes[name] = owners[0]
        return routes

    @functools.cached_property
    def longest_name(self) -> int:
        """The length of the longest name a request can give: model ID, alias or peer route."""
        return max(map(len, itertools.chain(self.models, self.aliases, self.peer_routes)), default=0)

    def notes(self) -> list[str]:
        """What to warn of when this config is taken into use: unknown keys, ignored values, and
        models that cannot start."""
        broken = [f"{m.problem} ({m.id} cannot start until this is fixed)" for m in self.models.values() if m.problem]
        return self.warnings + broken

    def resolves(self, name: str) -> bool:
        """Whether a name reaches a model: local ID, alias, peer FQN or unique bare peer name."""
        return self.real_model_id(name) is not None or name in self.peer_routes


class ConfigReader:
    """Typed access to one YAML mapping; every error names the key's full path.

    It remembers which keys were asked for, so keys nobody asked for can be reported as
    unknown (with the closest known key) once the whole file has been read.
    """

    def __init__(self, data: Any, path: str, readers: list | None = None):
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path or 'config'}: must be a mapping, got {_yaml_kind(data)}")
        self.data = {str(k): v for k, v in data.items()}
        self.path = path
        self.asked: set[str] = set()
        self.readers = readers if readers is not None else []
        self.readers.append(self)
        self._children: dict[str, ConfigReader] = {}

    def key_path(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def error(self, key: str, message: str) -> ConfigError:
        return ConfigError(f"{self.key_path(key)}: {message}")

    def raw(self, key: str, default: Any = None) -> Any:
        self.asked.add(key)
        value = self.data.get(key)
        return default if value is None else value

    def _fail(self, key: str, expected: str) -> ConfigError:
        value = self.data[key]
        return self.error(key, f"expected {expected}, got {_yaml_kind(value)} {value!r}")

    def string(self, key: str, default: str = "") -> str:
        value = self.raw(key)
        if value is None:
            return default
        if isinstance(value, (dict, list)):
            raise self._fail(key, "a string")
        return go_format(value)

    def integer(self, key: str, default: int = 0) -> int:
        value = self.raw(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._fail(key, "an integer")
        return value

    def boolean(self, key: str, default: bool = False) -> bool:
        value = self.raw(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self._fail(key, "true or false")
        return value

    def string_list(self, key: str) -> list[str]:
        value = self.raw(key)
        if value is None:
            return []
        if not isinstance(value, list) or any(isinstance(v, (dict, list)) or v is None for v in value):
            raise self._fail(key, "a list of strings")
        return [go_format(v) for v in value]

    def free_mapping(self, key: str) -> dict[str, Any]:
        """A mapping whose keys are the user's own (metadata, setParams): taken as it is."""
        value = self.raw(key)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self._fail(key, "a mapping")
        return {str(k): v for k, v in value.items()}

    def mapping(self, key: str) -> ConfigReader:
        self.asked.add(key)
        if key not in self._children:
            self._children[key] = ConfigReader(self.data.get(key), self.key_path(key), self.readers)
        return self._children[key]

    def children(self) -> list[tuple[str, ConfigReader]]:
        """The entries of a map that names things (peers, groups, selectors), each as a reader."""
        return [(name, self.mapping(name)) for name in self.data]

    def unknown_key_warnings(self) -> list[str]:
        warnings = []
        for reader in self.readers:
            for key in reader.data:
                if key in reader.asked:
                    continue
                close = difflib.get_close_matches(key, sorted(reader.asked), n=1, cutoff=0.75)
                hint = f", did you mean '{close[0]}'?" if close else " (ignored)"
                warnings.append(f"{reader.key_path(key)}: unknown key{hint}")
        return warnings


###############################################################################
# 3. Config: reading the file #################################################
###############################################################################

# From YAML text to Config in the original's three passes (macros and ports, types, values).
# Every error of a pass is gathered before it stops, so one run names them all.


def _yaml_kind(value: Any) -> str:
    kinds = {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
             float: "a number"}
    return "nothing" if value is None else kinds.get(type(value), type(value).__name__)


# -- loading files ------------------------------------------------------------

def load_config(path: str | None = None, config_dir: str | None = None, previous: Config | None = None) -> Config:
    """Read, merge, expand and validate the config sources; ConfigError names the file and key."""
    doc = merge_documents(read_sources(path, config_dir))
    where = path or config_dir
    try:
        return build_config(doc, previous)
    except ConfigError as e:
        raise e.within(where) from None


def read_sources(path: str | None, config_dir: str | None) -> list[tuple[str, dict]]:
    """(file, YAML document) for --config and then each *.yml/*.yaml of --config-dir, by path."""
    files = [path] if path else []
    if config_dir:
        try:
            names = sorted(os.path.join(config_dir, n) for n in os.listdir(config_dir) if n.endswith((".yml", ".yaml")))
        except OSError as e:
            raise ConfigError(f"--config-dir {config_dir}: {e.strerror}") from None
        names = [n for n in names if os.path.isfile(n)]
        if path and any(os.path.abspath(n) == os.path.abspath(path) for n in names):
            raise ConfigError(f"--config path {path} is also present in --config-dir {config_dir}; remove it from one")
        files += names
    if not files:
        raise ConfigError("no configuration sources found" if config_dir else
                          "at least one of --config or --config-dir must be provided")
    documents = []
    for name in files:
        try:
            with open(name, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise ConfigError(f"{name}: cannot read config file: {e.strerror}") from None
        try:
            doc = parse_yaml(text)
        except ConfigError as e:
            raise e.within(name) from None
        if doc is not None:
            documents.append((name, doc))
    return documents


class YamlLoader(yaml.SafeLoader):
    """YAML as the original reads it: only true/false are booleans (yes, no, on, off stay words)."""


YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
YamlLoader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                 list("tTfF"))


def parse_yaml(text: str) -> dict | None:
    """One source file: ${env.NAME} substituted in the text, then YAML; None when empty."""
    try:
        doc = yaml.load(substitute_env_macros(text), Loader=YamlLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(e, "problem", None) or str(e).replace("\n", " ")
        raise ConfigError(f"invalid YAML{where}: {problem}") from None
    if doc is not None and not isinstance(doc, dict):
        raise ConfigError("top-level YAML must be a mapping")
    return doc


def merge_documents(documents: list[tuple[str, dict]]) -> dict:
    """Later files add to earlier ones: maps merge, lists concatenate, scalars must agree."""
    merged: dict = {}
    for name, doc in documents:
        merged = _merge(merged, doc, "", name)
    return merged


def _merge(a: Any, b: Any, path: str, source: str) -> Any:
    if a is None:
        return b
    if b is None:
        return a
    if isinstance(a, dict) and isinstance(b, dict):
        out = dict(a)
        for key, value in b.items():
            child = f"{path}.{key}" if path else str(key)
            if key in out and path in IDENTITY_MAPS:
                raise ConfigError(f'duplicate {path} "{key}" found in {source} '
                                  '(already defined in another config source)')
            out[key] = _merge(out[key], value, child, source) if key in out else value
        return out
    if isinstance(a, list) and isinstance(b, list):
        return a + b
    if isinstance(a, (dict, list)) or isinstance(b, (dict, list)):
        raise ConfigError(f'conflict at "{path}": incompatible YAML node kinds ({_yaml_kind(a)} vs {_yaml_kind(b)}) '
                          f'introduced by {source}')
    if a != b or type(a) is not type(b):
        raise ConfigError(f'conflict at "{path}": {source} sets a different value than a previous source')
    return a


def parse_config(text: str) -> Config:
    """Config from the YAML text of one file."""
    return build_config(parse_yaml(text) or {})


def substitute_env_macros(text: str) -> str:
    """${env.NAME} replaced in the raw YAML text, escaped for double-quoted scalars."""

    def value(match: re.Match) -> str:
        name = match.group(1)
        if name not in os.environ:
            raise ConfigError(f"environment variable '{name}' is not set")
        env_value = os.environ[name]
        if any(c in env_value for c in "\r\n\0"):
            raise ConfigError(f"environment variable '{name}' contains newlines or null bytes which are not allowed "
                              "in YAML substitution")
        return env_value.replace("\\", "\\\\").replace('"', '\\"')

    used = env_names_outside_comments(text)
    return ENV_MACRO.sub(lambda m: value(m) if used is None or m.group(1) in used else m.group(0), text)


def env_names_outside_comments(text: str) -> set[str] | None:
    """The ${env.NAME} names the YAML itself holds (comments do not count), or None when the text
    only parses after substitution (a macro inside a flow list, say): then every name counts."""
    try:
        doc = yaml.load(text, Loader=YamlLoader)
    except yaml.YAMLError:
        return None
    names: set[str] = set()
    stack = [doc]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, str):
            names.update(ENV_MACRO.findall(item))
    return names


# -- macros -------------------------------------------------------------------

def read_macros(node: ConfigReader) -> list[tuple[str, Any]]:
    """An ordered macro list; names and values checked as the original does."""
    macros = []
    for name, value in node.data.items():
        if len(name) >= 64:
            raise node.error(name, f"macro name '{name}' exceeds maximum length of 63 characters")
        if not re.fullmatch(r"[a-zA-Z0-9_-]+", name):
            raise node.error(name, f"macro name '{name}' contains invalid characters, "
                                   "must match pattern ^[a-zA-Z0-9_-]+$")
        if value is None or isinstance(value, (dict, list)):
            raise node.error(name, f"macro '{name}' has invalid type {_yaml_kind(value)}, "
                                   "must be a scalar type (string, int, float, or bool)")
        if isinstance(value, str) and "${" + name + "}" in value:
            raise node.error(name, f"macro '{name}' contains self-reference")
        if name in RESERVED_MACROS:
            raise node.error(name, f"macro name '{name}' is reserved")
        macros.append((name, value))
    node.asked.update(node.data)  # macro names are the user's own, never unknown keys
    return macros


def expand_macros(value: Any, macros: list[tuple[str, Any]]) -> Any:
    """Macros applied last-declared first, through strings, lists and map values (never keys).

    A string that is exactly `${name}` takes the macro's typed value (so `port: ${PORT}` is an int).
    """
    for name, macro_value in reversed(macros):
        value = _expand_one(value, "${" + name + "}", macro_value)
    return value


def _expand_one(value: Any, ref: str, macro_value: Any) -> Any:
    if isinstance(value, str):
        if value == ref:
            return macro_value
        return value.replace(ref, go_format(macro_value)) if ref in value else value
    if isinstance(value, list):
        return [_expand_one(v, ref, macro_value) for v in value]
    if isinstance(value, dict):
        return {k: _expand_one(v, ref, macro_value) for k, v in value.items()}
    return value


def leftover_macros(value: Any, path: str) -> Iterable[tuple[str, str]]:
    """(key path, macro name) for every `${...}` still in a value after expansion."""
    if isinstance(value, str):
        for match in ANY_MACRO.finditer(value):
            yield path, match.group(1)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from leftover_macros(item, f"{path}[{i}]")
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from leftover_macros(item, f"{path}.{key}")


def check_no_leftover_macros(value: Any, path: str, in_model: bool = False, allow: Iterable[str] = ()) -> None:
    for where, name in leftover_macros(value, path):
        if name.startswith("env."):
            raise ConfigError(f"{where}: environment variable '{name[4:]}' not set")
        if name in allow:
            continue
        if in_model and name in ("PORT", "MODEL_ID"):
            raise ConfigError(f"{where}: macro '${{{name}}}' should have been substituted "
                              "(${PORT} is only set when cmd uses it)")
        if in_model and name == "PID":
            raise ConfigError(f"{where}: ${{PID}} is only available in cmdStop")
        raise ConfigError(f"{where}: unknown macro '${{{name}}}'")


# Macros filled in after the first pass: ${PID} when cmdStop runs, ${KV_CACHE_DIR} once the
# store's place (and so the cache's) is known.
LATE_MACROS = {"cmdStop": ("PID",), "cmd": ("KV_CACHE_DIR",), "env": ("KV_CACHE_DIR",)}


@functools.cache
def responder_command() -> str:
    """`${RESPONDER}` (ours; a macro of the user's by that name wins): the demo responder shipped
    with llama-swap-py, as a command for the Python and the files this llama-swap runs from, so
    a config that uses it starts its models however llama-swap-py was installed (a checkout, a
    wheel under pipx, the .pyz)."""
    home = os.path.dirname(os.path.abspath(__file__))  # a directory, or the .pyz itself
    return shlex.join(["env", f"PYTHONPATH={home}", sys.executable or "python3", "-m", "llama_swap_responder"])


def strip_comment_lines(command: str) -> str:
    return "\n".join(line for line in command.split("\n") if not line.strip().startswith("#"))


# -- the whole file -----------------------------------------------------------

TOP_LEVEL_KEYS = (
    "healthCheckTimeout", "logRequests", "logLevel", "logTimeFormat", "logToStdout", "metricsMaxInMemory",
    "captureBuffer", "maxRequestBodyMB", "stalledClientTimeout", "store", "ui", "performance", "globalTTL",
    "unloadTimeout", "startPort", "macros", "models",
    "profiles", "selectors", "routing", "groups", "matrix", "hooks", "sendLoadingState", "includeAliasesInList",
    "apiKeys", "adminKeys", "allowedOrigins", "peers", "upstream",
)


def build_config(doc: dict, previous: Config | None = None) -> Config:
    """The config in the original's three passes: macros and ports, then types, then values
    and cross-references. Each pass reports every error it finds, in the order the original
    checks, so its first line is the error the original would report. `previous`: the config a
    reload replaces, whose models keep their ports."""
    readers: list[ConfigReader] = []
    errors = ConfigErrors()
    global_macros = read_macros(ConfigReader(doc.get("macros"), "macros", readers))  # nothing expands without them
    expanded = {k: v if k in ("models", "macros") else expand_macros(v, global_macros) for k, v in doc.items()}
    top = ConfigReader(expanded, "", readers)
    top.asked.add("macros")
    config = Config(models={})
    models = expand_models(top, global_macros, readers, config, previous, errors)
    # Unknown top-level keys (a block of YAML anchors, say) are not checked for macros, as in the original.
    for key in TOP_LEVEL_KEYS:
        if key not in ("models", "macros"):
            with errors.gather():
                check_no_leftover_macros(top.data.get(key), key)
    for model_id, (data, _macros) in models.items():
        for key, value in data.items():
            with errors.gather():
                check_no_leftover_macros(value, f"models.{model_id}.{key}", in_model=True,
                                         allow=LATE_MACROS.get(key, ()))
    errors.check()

    with errors.gather():
        read_globals(top, config)
    nodes = {model_id: ConfigReader(data, f"models.{model_id}", readers) for model_id, (data, _) in models.items()}
    for model_id, node in nodes.items():
        with errors.gather():
            config.models[model_id] = read_model(model_id, node, config)
    peers = {}
    with errors.gather():
        for peer_id, node in top.mapping("peers").children():
            with errors.gather():
                peers[peer_id] = read_peer(peer_id, node)
    with errors.gather():
        check_profiles_are_mappings(top.mapping("profiles").data)
    errors.check()

    check_values(top, config, nodes, peers, errors)
    errors.check()
    top.raw("logRequests")  # accepted and unused, as in the original
    config.warnings = top.unknown_key_warnings() + config.warnings
    return config


def check_values(top: ConfigReader, config: Config, nodes: Mapping[str, ConfigReader], peers: dict[str, PeerConfig],
                 errors: ConfigErrors) -> None:
    """The third pass: values and cross-references, in the original's order. Names that
    selectors and profiles refer to are checked only once what they name was read cleanly."""
    check_globals(top, config, errors)
    with errors.gather():
        config.aliases = collect_aliases(config.models)
    for model_id, model in config.models.items():
        with errors.gather():
            check_model(model, nodes[model_id])
            check_kv_cache(model, nodes[model_id], config.kv_cache_root)
            register_set_params_aliases(model, config)
    names_read = len(errors.messages)
    with errors.gather():
        config.routing = read_routing(top, config)
    with errors.gather():
        config.preload = read_preload(top, config)
    with errors.gather():
        config.api_keys = read_keys(top, "apiKeys")
    with errors.gather():
        config.admin_keys = read_keys(top, "adminKeys")
    with errors.gather():
        config.allowed_origins = read_origins(top)
    config.peers = peers
    selectors = top.mapping("selectors")
    profiles = top.data.get("profiles") or {}
    pin_names = {str(pin) for p in profiles.values() if isinstance(p, dict) for pin in (p.get("pins") or {})}
    with errors.gather():
        check_peer_namespace(config, set(selectors.data), pin_names)
    if len(errors.messages) > names_read:
        return
    for selector_id, node in selectors.children():
        with errors.gather():
            config.selectors[selector_id] = read_selector(selector_id, node, config, set(selectors.data))
    if len(errors.messages) == names_read:
        with errors.gather():
            config.profiles = read_profiles(top.mapping("profiles"), config)
        with errors.gather():
            check_keys_config(config)


def expand_models(top: ConfigReader, global_macros: list, readers: list, config: Config,
                  previous: Config | None, errors: ConfigErrors) -> dict[str, tuple[dict, list]]:
    """Every model's data with its macros and ${PORT} applied, in model-ID order.

    On a reload (`previous` given, same startPort) a model keeps the port it had and a new one
    takes the lowest free port, so adding a model never moves the others (and restarts them)."""
    start = top.data.get("startPort")
    if not isinstance(start, int) or isinstance(start, bool):
        start = DEFAULT_START_PORT  # a bad value is reported later
    raw_models = top.free_mapping("models")
    kept = {m: port for m, port in previous.ports.items() if m in raw_models} \
        if previous is not None and previous.start_port == start else {}
    free = (port for port in itertools.count(start) if port not in kept.values())
    port = next(free)
    models = {}
    for model_id, raw in sorted(raw_models.items(), key=lambda e: e[0].encode()):
        with errors.gather():
            data, macros, uses_port = expand_model(model_id, raw, global_macros, kept.get(model_id, port), readers)
            if uses_port:
                config.ports[model_id] = kept.get(model_id, port)
                port = port if model_id in kept else next(free)
            models[model_id] = (data, macros)
    config.start_port = start
    return models


def read_globals(top: ConfigReader, config: Config) -> None:
    """Types and defaults of the global keys; their values are checked by check_globals."""
    config.health_check_timeout = max(top.integer("healthCheckTimeout", DEFAULT_HEALTH_CHECK_TIMEOUT),
                                      MIN_HEALTH_CHECK_TIMEOUT)
    performance = top.mapping("performance")
    config.performance_disabled = performance.boolean("disabled")
    performance.string("every")
    config.global_ttl = top.integer("globalTTL", 0)
    config.unload_timeout = top.integer("unloadTimeout", DEFAULT_UNLOAD_TIMEOUT)
    top.integer("startPort", DEFAULT_START_PORT)
    patterns = top.mapping("upstream").string_list("ignorePaths") or list(DEFAULT_IGNORE_PATHS)
    config.ignore_paths = []
    for pattern in patterns:
        try:
            config.ignore_paths.append(re.compile(pattern))
        except re.error as e:
            raise ConfigError(f'upstream.ignorePaths: invalid regular expression "{pattern}": {e}') from None
    config.log_to_stdout = top.string("logToStdout", "proxy")
    level = top.string("logLevel", "info").strip().lower()
    config.log_level = level if level in ("debug", "info", "warn", "error") else "info"
    if level != config.log_level:
        config.warnings.append(f"logLevel: {level!r} is not one of debug, info, warn, error; using info")
    time_format = top.string("logTimeFormat").strip().lower()
    config.log_time_format = time_format if time_format in LOG_TIME_FORMATS else ""
    if time_format and not config.log_time_format:
        config.warnings.append(f"logTimeFormat: {time_format!r} is not a known format; log lines get no timestamp")
    config.metrics_max_in_memory = top.integer("metricsMaxInMemory", 1000)
    if config.metrics_max_in_memory <= 0:
        config.metrics_max_in_memory = 1000
    config.capture_buffer_mb = top.integer("captureBuffer", 5)
    config.max_request_body_mb = top.integer("maxRequestBodyMB", DEFAULT_MAX_REQUEST_BODY_MB)
    config.stalled_client_timeout = top.integer("stalledClientTimeout", DEFAULT_STALLED_CLIENT_TIMEOUT)
    config.include_aliases_in_list = top.boolean("includeAliasesInList")
    config.send_loading_state = top.boolean("sendLoadingState")
    headers = top.mapping("ui").mapping("activity")
    if "session_id" in headers.data:
        config.session_headers = dedupe_case_insensitive(h.strip() for h in headers.string_list("session_id"))
    else:
        headers.asked.add("session_id")


def check_globals(top: ConfigReader, config: Config, errors: ConfigErrors) -> None:
    """The global values, each on its own, so that every bad one is reported."""
    with errors.gather():
        config.performance_every = read_performance_every(top.mapping("performance"))
    bounds = (("maxRequestBodyMB", config.max_request_body_mb < 1,
               f"must be at least 1, got {config.max_request_body_mb}"),
              ("stalledClientTimeout", config.stalled_client_timeout < 0, "must be >= 0 (0: never)"),
              ("startPort", top.integer("startPort", DEFAULT_START_PORT) < 1, "must be greater than 1"),
              ("globalTTL", config.global_ttl < 0, "must be >= 0"),
              ("unloadTimeout", config.unload_timeout < 0, "must be >= 0"))
    errors.messages += [str(top.error(key, message)) for key, bad, message in bounds if bad]
    config.unload_timeout = config.unload_timeout or DEFAULT_UNLOAD_TIMEOUT
    with errors.gather():
        config.store_path = read_store_path(top)
    config.kv_cache_root = kv_cache_root(config.store_path)
    if config.log_to_stdout not in LOG_TO_STDOUT:
        errors.messages.append(str(top.error("logToStdout", f"must be one of: {', '.join(LOG_TO_STDOUT)}")))
    for model in config.models.values():  # model defaults that come from globals
        model.ttl = max(config.global_ttl, 0) if model.ttl == -1 else model.ttl  # a bad globalTTL is reported once
        model.unload_timeout = model.unload_timeout or config.unload_timeout


def read_performance_every(performance: ConfigReader) -> float:
    every = performance.string("every", "5s")
    try:
        seconds = parse_go_duration(every)
    except ValueError as e:
        raise performance.error("every", str(e)) from None
    if seconds < 5:
        raise performance.error("every", f"must be at least 5s, got {go_duration(seconds)}")
    return seconds


def dedupe_case_insensitive(names: Iterable[str]) -> list[str]:
    seen, out = set(), []
    for name in names:
        if name and name.lower() not in seen:
            seen.add(name.lower())
            out.append(name)
    return out


def read_store_path(top: ConfigReader) -> str | None:
    if top.raw("store") is None:  # absent or empty: the store lives in memory
        return None
    path = top.mapping("store").string("path").strip()
    if not path:
        raise ConfigError("store.path: must not be empty")
    if os.path.exists(path):
        if os.path.isdir(path):
            raise ConfigError(f"store.path: {path} is a directory, not a file")
        if not os.access(path, os.W_OK):
            raise ConfigError(f"store.path: {path} is not writable")
    else:
        parent = os.path.dirname(os.path.abspath(path))
        if not os.access(parent, os.W_OK):
            raise ConfigError(f"store.path: directory {parent} is not writable")
    return path


###############################################################################
# 4. Config: models ###########################################################
###############################################################################

# Each model's keys: macros applied, sizes and capabilities read, filters and timeouts, its
# command checked, its aliases registered. Each reader checks its own part and names the key.


def expand_model(model_id: str, raw: Any, global_macros: list, port: int, readers: list) -> tuple[dict, list, int]:
    """One model's data with local macros, ${MODEL_ID} and ${PORT} applied; whether it used the port."""
    path = f"models.{model_id}"
    if raw is None or not isinstance(raw, dict):
        raise ConfigError(f"{path}: must be a mapping, got {_yaml_kind(raw)}")
    local_macros = read_macros(ConfigReader(raw.get("macros"), f"{path}.macros", readers))
    local = dict(local_macros)
    macros = [("RESPONDER", responder_command()), ("MODEL_ID", model_id)]
    macros += [(n, local.get(n, v)) for n, v in global_macros]
    macros += [(n, v) for n, v in local_macros if n not in dict(global_macros)]
    data = {str(k): v for k, v in raw.items() if k != "macros"}
    for key in ("cmd", "cmdStop"):
        if isinstance(data.get(key), str):
            data[key] = strip_comment_lines(data[key])
    if data.get("proxy") is None:
        data["proxy"] = DEFAULT_PROXY
    data = expand_macros(data, macros)
    cmd_text = data.get("cmd") if isinstance(data.get("cmd"), str) else ""
    uses_port = "${PORT}" in cmd_text
    if isinstance(data.get("proxy"), str) and "${PORT}" in data["proxy"] and not uses_port:
        raise ConfigError(f"{path}.proxy: uses ${{PORT}} but cmd does not - "
                          "${PORT} is only available when used in cmd")
    if uses_port:
        macros = macros + [("PORT", port)]
        data = expand_macros(data, [("PORT", port)])
    by_id = data.get("filters", {}).get("setParamsByID") if isinstance(data.get("filters"), dict) else None
    if isinstance(by_id, dict):
        data["filters"] = dict(data["filters"], setParamsByID=expand_keys(by_id, macros, model_id))
    return data, macros, int(uses_port)


def read_model(model_id: str, node: ConfigReader, config: Config) -> ModelConfig:
    """Types and defaults of one model's keys; values are checked by check_model."""
    node.asked.add("macros")
    model = ModelConfig(
        id=model_id,
        cmd=node.string("cmd"),
        cmd_stop=node.string("cmdStop"),
        proxy=node.string("proxy").strip(),
        check_endpoint=node.string("checkEndpoint", "/health").strip() or "/health",
        env=node.string_list("env"),
        aliases=node.string_list("aliases"),
        use_model_name=node.string("useModelName"),
        unlisted=node.boolean("unlisted"),
        name=node.string("name"),
        description=node.string("description"),
        ttl=node.integer("ttl", -1),
        unload_timeout=node.integer("unloadTimeout", 0),
        health_check_timeout=config.health_check_timeout,  # the global value always wins, as in the original
        concurrency_limit=node.integer("concurrencyLimit", 0),
        send_loading_state=node.boolean("sendLoadingState", config.send_loading_state),
        metadata=node.free_mapping("metadata"),
        capabilities=read_capabilities(node.mapping("capabilities")),
        filters=read_filters(node.mapping("filters")),
        timeouts=read_timeouts(node.mapping("timeouts"), Timeouts()),
        ignore_websockets=node.mapping("compat").boolean("ignoreWebsockets"),
        vram=read_sizes(node, "vram"),
        kv_cache=read_kv_cache(node),
        sleep=read_sleep(node),
        protected=node.boolean("protected"),
    )
    node.raw("healthCheckTimeout")
    if model.concurrency_limit <= 0:
        model.concurrency_limit = DEFAULT_CONCURRENCY_LIMIT
    if model_id == "comfyui_auto":  # its UI opens many sockets at once
        model.concurrency_limit = max(model.concurrency_limit, 50)
        model.ignore_websockets = True
    return model


def expand_keys(by_id: dict, macros: list[tuple[str, Any]], model_id: str) -> dict:
    """setParamsByID keys name requests, so unlike other keys they take macros."""
    out: dict[str, Any] = {}
    for key, value in by_id.items():
        expanded = go_format(expand_macros(str(key), macros))
        leftover = ANY_MACRO.search(expanded)
        if leftover:
            raise ConfigError(f"models.{model_id}.filters.setParamsByID: unknown macro "
                              f"'${{{leftover.group(1)}}}' found in key {key!r}")
        if expanded in out:
            first = next(k for k in by_id if go_format(expand_macros(str(k), macros)) == expanded)
            raise ConfigError(f'models.{model_id}.filters.setParamsByID: keys "{first}" and "{key}" '
                              'resolve to the same value')
        out[expanded] = value
    return out


SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1000, "kib": 1024, "m": 1024**2, "mb": 1000**2, "mib": 1024**2,
              "g": 1024**3, "gb": 1000**3, "gib": 1024**3, "t": 1024**4, "tb": 1000**4, "tib": 1024**4}


def parse_size(value: Any) -> int | None:
    """Bytes from `20GiB`, `20 GB`, `512M` (a bare K/M/G/T is binary) or a plain number; None if
    it is none of those."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return int(value) if math.isfinite(value) and value >= 0 else None
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(value))
    if not match or match.group(2).lower() not in SIZE_UNITS:
        return None
    return int(float(match.group(1)) * SIZE_UNITS[match.group(2).lower()])


def read_sizes(node: ConfigReader, key: str) -> dict[int | None, int]:
    """A size for every GPU (`20GiB`: None -> bytes) or per GPU index (`{0: 10GiB, 1: 8GiB}`)."""
    value = node.raw(key)
    if value is None:
        return {}
    entries = value.items() if isinstance(value, dict) else [(None, value)]
    sizes: dict[int | None, int] = {}
    for gpu, size in entries:
        if isinstance(gpu, str) and gpu.isdigit():  # {"0": 10GiB}, as JSON would write it
            gpu = int(gpu)
        if gpu is not None and (isinstance(gpu, bool) or not isinstance(gpu, int) or gpu < 0):
            raise node.error(key, f"GPU index {gpu!r} is not a number >= 0")
        parsed = parse_size(size)
        if parsed is None:
            raise node.error(key, f"{size!r} is not a size (like 20GiB, 512MiB or a number of bytes)")
        sizes[gpu] = parsed
    return sizes


def read_kv_cache(node: ConfigReader) -> KvCache | None:
    """kvCache: true, or a mapping of its settings; absent or false: none."""
    value = node.raw("kvCache")
    if value is None or value is False:
        return None
    if value is True:
        return KvCache()
    if not isinstance(value, dict):
        raise node.error("kvCache", f"expected true, false or a mapping, got {_yaml_kind(value)} {value!r}")
    settings = node.mapping("kvCache")
    return KvCache(settings.integer("maxDiskMB", DEFAULT_KV_CACHE_MB),
                   settings.integer("saveTimeout", DEFAULT_KV_SAVE_TIMEOUT))


HTTP_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")


def read_sleep(node: ConfigReader) -> Sleep | None:
    """sleep: {sleep: "POST /sleep?level=1", wake: "POST /wake_up"}; absent: the model stops."""
    value = node.raw("sleep")
    if value is None:
        return None
    if not isinstance(value, dict):
        raise node.error("sleep", f"expected a mapping with the keys sleep and wake "
                                  f'(e.g. {{sleep: "POST /sleep?level=1", wake: "POST /wake_up"}}), '
                                  f"got {_yaml_kind(value)} {value!r}")
    calls = node.mapping("sleep")
    return Sleep(read_http_call(calls, "sleep"), read_http_call(calls, "wake"))


def read_http_call(node: ConfigReader, key: str) -> HttpCall:
    """`METHOD /path?query` (the method may be left out: POST)."""
    text = node.string(key).strip()
    match = re.fullmatch(r"(?:([A-Za-z]+)\s+)?(/\S*)", text)
    if not text or match is None or (match[1] or "POST").upper() not in HTTP_METHODS:
        example = {"sleep": "POST /sleep?level=1", "wake": "POST /wake_up"}[key]
        raise node.error(key, f'expected "METHOD /path" such as "{example}", got {text!r}'
                              if text else f'missing: the call that does it, such as "{example}"')
    return HttpCall((match[1] or "POST").upper(), match[2])


def kv_cache_root(store_path: str | None) -> str:
    """Beside the store when it is a file, else under the user's cache directory."""
    if store_path:
        return os.path.join(os.path.dirname(os.path.abspath(store_path)), "kv-cache")
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "llama-swap-py", "kv-cache")


def kv_cache_model_dir(root: str, model_id: str) -> str:
    """The directory of one model's caches: its ID made safe for a file name, and a hash of it
    so that two IDs that read alike never share one."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", model_id)[:64]
    return os.path.join(root, f"{safe}-{hashlib.sha256(model_id.encode()).hexdigest()[:8]}")


def check_kv_cache(model: ModelConfig, node: ConfigReader, root: str) -> None:
    """kvCache needs llama-server told where to save (--slot-save-path ${KV_CACHE_DIR}); the
    directory is then filled in: one per model and launch settings, so that a model whose cmd,
    env or proxy changed never restores a cache made by other settings."""
    uses = [key for key, text in (("cmd", model.cmd), ("env", " ".join(model.env))) if "${KV_CACHE_DIR}" in text]
    if model.kv_cache is None:
        if uses:
            raise node.error(uses[0], "${KV_CACHE_DIR} is only set for a model with kvCache: true")
        return
    if model.kv_cache.max_disk_mb < 1:
        raise ConfigError(f"models.{model.id}.kvCache.maxDiskMB: must be at least 1, got {model.kv_cache.max_disk_mb}")
    if model.kv_cache.save_timeout < 1:
        raise ConfigError(f"models.{model.id}.kvCache.saveTimeout: must be at least 1 (seconds), "
                          f"got {model.kv_cache.save_timeout}")
    if "--slot-save-path" not in model.cmd or "${KV_CACHE_DIR}" not in model.cmd:
        raise node.error("kvCache", "cmd must pass --slot-save-path ${KV_CACHE_DIR} to llama-server "
                                    "(the directory llama-swap keeps this model's saved slots in)")
    launch = json.dumps([model.cmd, model.env, model.proxy])
    directory = os.path.join(kv_cache_model_dir(root, model.id), hashlib.sha256(launch.encode()).hexdigest()[:16])
    model.kv_cache.directory = directory
    model.cmd = model.cmd.replace("${KV_CACHE_DIR}", shlex.quote(directory))
    model.env = [entry.replace("${KV_CACHE_DIR}", directory) for entry in model.env]


def read_capabilities(node: ConfigReader) -> Capabilities:
    return Capabilities(node.string_list("in"), node.string_list("out"), node.boolean("tools"),
                        node.boolean("reranker"), node.integer("context"))


def read_filters(node: ConfigReader) -> Filters:
    text = node.string("stripParams") or node.string("strip_params")
    strip = sorted({p.strip() for p in text.split(",") if p.strip() and json_path_keys(p.strip())[0] != "model"})
    by_id = node.free_mapping("setParamsByID")
    for key, value in by_id.items():
        if not isinstance(value, dict):
            raise node.error(f"setParamsByID.{key}", f"expected a mapping of parameters, got {_yaml_kind(value)}")
    return Filters(strip, node.free_mapping("setParams"), by_id)


def read_timeouts(node: ConfigReader, defaults: Timeouts) -> Timeouts:
    timeouts = Timeouts(
        node.integer("connect", defaults.connect), node.integer("keepalive", defaults.keepalive),
        node.integer("responseHeader", defaults.response_header), node.integer("tlsHandshake", defaults.tls_handshake),
        node.integer("expectContinue", defaults.expect_continue), node.integer("idleConn", defaults.idle_conn))
    for key, value in vars(timeouts).items():
        if value < 0:
            raise ConfigError(f"{node.path}: {key} must be >= 0, got {value}")
    return timeouts


def check_model(model: ModelConfig, node: ConfigReader) -> None:
    """Value checks for one model, in the original's order; each error names models.<id>.<key>.

    What the original finds only when it starts the model (a cmd that is only comments, an env
    entry without `=`, a proxy that is not an http URL) does not refuse the file: the model is
    loaded broken, a warning says why, and its requests fail with that until it is fixed."""
    if model.ttl < 0:
        raise node.error("ttl", f"invalid TTL value {model.ttl}")
    if model.unload_timeout < 0:
        raise node.error("unloadTimeout", f"invalid unloadTimeout value {model.unload_timeout}")
    caps = node.mapping("capabilities")
    for key, values in (("in", model.capabilities.inputs), ("out", model.capabilities.outputs)):
        for value in values:
            if value not in MODALITIES:
                raise caps.error(key, f'invalid modality "{value}", must be one of: {", ".join(MODALITIES)}')
    if model.capabilities.context < 0:
        raise caps.error("context", "must be >= 0")
    model.problem = "; ".join(launch_problems(model, node))


def launch_problems(model: ModelConfig, node: ConfigReader) -> Iterator[str]:
    if not valid_http_url(model.proxy):
        yield str(node.error("proxy", f"invalid proxy URL {model.proxy!r} (expected http://host:port)"))
    try:
        split_command(model.cmd)
    except ValueError:
        yield str(node.error("cmd", "is required (the command that starts the model's server)"))
    for entry in model.env:
        if "=" not in entry:
            yield str(node.error("env", f"entry {entry!r} must look like KEY=VALUE"))


def valid_http_url(text: str) -> bool:
    try:
        url = URL(text)
        return url.scheme in ("http", "https") and bool(url.host) and url.port is not None
    except ValueError:
        return False


def collect_aliases(models: Mapping[str, ModelConfig]) -> dict[str, str]:
    """alias -> model ID for the explicit aliases; an alias may name one model only."""
    aliases: dict[str, str] = {}
    for model in models.values():
        for alias in model.aliases:
            if alias in aliases:
                raise ConfigError(f"models.{model.id}.aliases: duplicate alias {alias!r} "
                                  f"(already used by model {aliases[alias]})")
            aliases[alias] = model.id
    return aliases


def register_set_params_aliases(model: ModelConfig, config: Config) -> None:
    """Each setParamsByID key names a way to request the model, so it becomes an alias."""
    for key in model.filters.set_params_by_id:
        if key == model.id or config.aliases.get(key) == model.id:
            continue
        if key in config.models:
            raise ConfigError(f"models.{model.id}.filters.setParamsByID: key '{key}' "
                              "conflicts with an existing model ID")
        if key in config.aliases:
            raise ConfigError(f"models.{model.id}.filters.setParamsByID: duplicate alias '{key}', "
                              f"already used by model {config.aliases[key]}")
        config.aliases[key] = model.id
        model.aliases.append(key)



###############################################################################
# 5. Config: routing, peers, selectors, profiles ##############################
###############################################################################

# The swap rules (groups, the matrix DSL, the vram router and the fifo priorities), and what
# stands beside the models: peers, selectors and profiles, none shadowing another's name.


def read_routing(top: ConfigReader, config: Config) -> Routing:
    """groups or matrix, legacy top-level or under routing.router, and the fifo priorities."""
    routing_node = top.mapping("routing")
    router = routing_node.mapping("router")
    settings = router.mapping("settings")
    use = router.string("use")
    legacy_groups, legacy_matrix = top.data.get("groups"), top.data.get("matrix")
    top.asked.update(("groups", "matrix"))
    new_style = use or settings.data.get("groups") or "matrix" in settings.data
    if (legacy_groups or legacy_matrix is not None) and new_style:
        raise ConfigError("routing: config uses both the legacy top-level 'matrix'/'groups' keys and the new "
                          "'routing.router' block; please migrate the top-level keys into 'routing.router' "
                          "and remove them")
    if legacy_groups and legacy_matrix is not None:
        raise ConfigError("config cannot use both 'groups' and 'matrix'")
    routing = Routing()
    if legacy_matrix is not None:
        routing.router, routing.matrix = Router.MATRIX, read_matrix(top.mapping("matrix"), config)
    elif use == "matrix":
        if "matrix" not in settings.data:
            raise ConfigError("routing.router.use is 'matrix' but routing.router.settings.matrix is not set")
        routing.router, routing.matrix = Router.MATRIX, read_matrix(settings.mapping("matrix"), config)
    elif use in ("", "group"):
        groups_node = top.mapping("groups") if legacy_groups else settings.mapping("groups")
        routing.groups = read_groups(groups_node, config)
        settings.asked.add("matrix")
    elif use == "vram":
        routing.router = Router.VRAM
        vram = settings.mapping("vram")
        routing.vram_reserve = read_sizes(vram, "reserve")
        routing.vram_release_wait = vram.integer("releaseWait", 30)
        if routing.vram_release_wait < 0:
            raise vram.error("releaseWait", "must be >= 0")
    else:
        raise router.error("use", f'unknown router "{use}" (valid: group, matrix, vram)')
    scheduler = routing_node.mapping("scheduler")
    if scheduler.string("use", "fifo") != "fifo":
        raise scheduler.error("use", f'unknown scheduler "{scheduler.string("use")}" (valid: fifo)')
    fifo = scheduler.mapping("settings").mapping("fifo")
    for key in ("maxWaitMs", "minResidencyMs", "queueTimeoutMs"):
        if fifo.integer(key) < 0:
            raise fifo.error(key, "must be >= 0")
    routing.max_wait = fifo.integer("maxWaitMs", 10000) / 1000
    routing.min_residency = fifo.integer("minResidencyMs", 0) / 1000
    routing.queue_timeout = fifo.integer("queueTimeoutMs", DEFAULT_QUEUE_TIMEOUT_MS) / 1000
    priorities = fifo.mapping("priority")
    for name in priorities.data:
        if config.real_model_id(name) is None:
            raise ConfigError(f'routing.scheduler.settings.fifo.priority references unknown model "{name}"')
        # Keyed by the real model ID, so a priority given to an alias works (the original ignores it).
        routing.priority[config.real_model_id(name)] = priorities.integer(name)
    return routing


def read_groups(node: ConfigReader, config: Config) -> list[Group]:
    groups, owner = [], {}
    for name, group in node.children():
        members = group.string_list("members")
        for member in members:
            if members.count(member) > 1:
                raise group.error("members", f"duplicate model member {member} found in group: {name}")
            if member in owner:
                raise group.error("members", f"model member {member} is used in multiple groups: "
                                             f"{owner[member]} and {name}")
            if member not in config.models:
                raise group.error("members", f'no model config for "{member}"')
            owner[member] = name
        groups.append(Group(name, frozenset(members), group.boolean("swap", True), group.boolean("exclusive", True),
                            group.boolean("persistent")))
    rest = frozenset(m for m in config.models if m not in owner)
    return [Group(DEFAULT_GROUP, rest)] + groups


def read_matrix(node: ConfigReader, config: Config) -> Matrix:
    """vars, sets and evict_costs, with every set parsed and expanded."""
    try:
        return _read_matrix(node, config)
    except ConfigError as e:
        raise e.within(node.path) from None


def _read_matrix(node: ConfigReader, config: Config) -> Matrix:
    variables = {k: str(v) for k, v in node.free_mapping("vars").items()}
    for key, model in variables.items():
        if not re.fullmatch(r"[a-zA-Z0-9.-]{1,32}", key):
            raise ConfigError(f'var key "{key}" must contain only alphanumeric, \'-\' or \'.\' characters '
                              'and be 1-32 characters long')
        if model not in config.models:
            raise ConfigError(f'var key "{key}" references unknown model "{model}"')
    costs = {}
    for key, cost in node.free_mapping("evict_costs").items():
        if isinstance(cost, bool) or not isinstance(cost, int) or cost <= 0:
            raise ConfigError(f'evict_cost for "{key}" must be a positive integer, got {cost}')
        model = variables.get(key, key)
        if model not in config.models:
            raise ConfigError(f'evict_costs: unknown var or model "{key}"')
        costs[model] = cost
    sets = {k: str(v) for k, v in node.free_mapping("sets").items()}
    if not sets:
        raise ConfigError("matrix must define at least one set")
    parsed = {name: parse_matrix_dsl(name, dsl) for name, dsl in sets.items()}
    combinations: dict[str, list[frozenset[str]]] = {}

    def expand(name: str, trail: tuple[str, ...]) -> list[frozenset[str]]:
        if name in trail:
            raise ConfigError(f'circular reference detected involving set "{name}"')
        if name not in combinations:
            combinations[name] = _expand_dsl(parsed[name], name, trail + (name,), variables, config, parsed, expand)
        return combinations[name]

    for name in sets:
        expand(name, ())
    return Matrix(variables, sets, costs, combinations)


def parse_matrix_dsl(set_name: str, text: str) -> tuple:
    """A set's DSL as a tree: ("model", name) | ("ref", set) | ("or", [...]) | ("and", [...])."""
    tokens = []
    i = 0
    while i < len(text):
        c = text[i]
        if c.isspace():
            i += 1
        elif c in "&|()":
            tokens.append((c, c, i))
            i += 1
        elif c == "+" or _is_ident_char(c):
            start = i + 1 if c == "+" else i
            j = start
            while j < len(text) and _is_ident_char(text[j]):
                j += 1
            if j == start:
                raise ConfigError(f'set "{set_name}": tokenize: expected set name after \'+\' at position {i}')
            tokens.append(("ref" if c == "+" else "ident", text[start:j], i))
            i = j
        else:
            raise ConfigError(f"set \"{set_name}\": tokenize: unexpected character '{c}' at position {i}")
    if not tokens:
        raise ConfigError(f'set "{set_name}": empty DSL expression')
    pos = 0

    def peek() -> str | None:
        return tokens[pos][0] if pos < len(tokens) else None

    def parse_chain(operator: str, kind: str, parse_item: Callable[[], tuple]) -> tuple:
        nonlocal pos
        items = [parse_item()]
        while peek() == operator:
            pos += 1
            items.append(parse_item())
        return items[0] if len(items) == 1 else (kind, items)

    def parse_or() -> tuple:  # `&` binds tighter than `|`
        return parse_chain("|", "or", lambda: parse_chain("&", "and", parse_atom))

    def parse_atom() -> tuple:
        nonlocal pos
        if pos >= len(tokens):
            raise ConfigError(f'set "{set_name}": parse: unexpected end of expression')
        kind, value, _ = tokens[pos]
        pos += 1
        if kind == "ident":
            return ("model", value)
        if kind == "ref":
            return ("ref", value)
        if kind == "(":
            inner = parse_or()
            if peek() != ")":
                raise ConfigError(f'set "{set_name}": parse: missing closing parenthesis')
            pos += 1
            return inner
        raise ConfigError(f'set "{set_name}": parse: unexpected token "{value}"')

    tree = parse_or()
    if pos < len(tokens):
        raise ConfigError(f'set "{set_name}": parse: unexpected token "{tokens[pos][1]}" after expression')
    return tree


def _is_ident_char(c: str) -> bool:
    return c.isalnum() or c in "_-."


def _expand_dsl(tree: tuple, set_name: str, trail: tuple, variables: dict, config: Config, parsed: dict,
                expand) -> list[frozenset[str]]:
    """The model sets a DSL tree allows: `|` joins the alternatives, `&` combines every pair."""
    kind, value = tree
    if kind == "model":
        model = variables.get(value, value)
        if model not in config.models:
            raise ConfigError(f'set "{set_name}": unknown var or model "{value}"')
        return [frozenset({model})]
    if kind == "ref":
        if value not in parsed:
            raise ConfigError(f'set "{set_name}" references undefined set "{value}"')
        return expand(value, trail)
    parts = [_expand_dsl(item, set_name, trail, variables, config, parsed, expand) for item in value]
    if kind == "or":
        return list(dict.fromkeys(c for part in parts for c in part))
    combos = [frozenset()]
    for part in parts:
        combos = list(dict.fromkeys(a | b for a in combos for b in part))
    return combos


def read_preload(top: ConfigReader, config: Config) -> list[str]:
    """hooks.on_startup.preload as model IDs; names that are not local models are dropped, with a warning."""
    names = [n.strip() for n in top.mapping("hooks").mapping("on_startup").string_list("preload") if n.strip()]
    preload = []
    for name in names:
        model = config.real_model_id(name)
        if model is None:
            config.warnings.append(f"hooks.on_startup.preload: {name!r} is not a local model or alias; "
                                   "it is not preloaded")
        elif model not in preload:
            preload.append(model)
    return preload


def read_origins(top: ConfigReader) -> list[str]:
    """allowedOrigins: `scheme://host[:port]` of the web pages that may change things here
    besides our own, each kept as its `host[:port]`, lower-case."""
    origins = []
    for i, origin in enumerate(top.string_list("allowedOrigins")):
        url = urllib.parse.urlsplit(origin.strip())
        if url.scheme not in ("http", "https") or not url.netloc or url.path not in ("", "/") or url.query:
            raise top.error(f"allowedOrigins[{i}]",
                            f"{origin!r} is no web origin (expected like https://llm.example.com)")
        origins.append(url.netloc.lower())
    return origins


def read_keys(top: ConfigReader, key: str) -> list[ApiKey]:
    """apiKeys or adminKeys: each a string (a key with every right) or, ours, a mapping with the
    key and its name, and for apiKeys its scope (models, swap, priority, concurrency)."""
    entries = top.raw(key)
    if entries is None:
        return []
    if not isinstance(entries, list):
        raise top.error(key, f"expected a list of keys, got {_yaml_kind(entries)}")
    keys = []
    for i, entry in enumerate(entries):
        path = f"{key}[{i}]"
        if isinstance(entry, dict):
            keys.append(read_key_mapping(ConfigReader(entry, path, top.readers), path, admin=key == "adminKeys"))
        elif entry is None or isinstance(entry, (list, bool)):
            raise ConfigError(f"{path}: expected a key (a string) or a mapping with `key`, got {_yaml_kind(entry)}")
        else:
            keys.append(ApiKey(check_key_text(go_format(entry), path, key), path, path=path))
    return keys


def check_key_text(text: str, path: str, section: str) -> str:
    if not text:
        raise ConfigError(f"{path}: empty api key found in {section}")
    if " " in text:
        raise ConfigError(f"{path}: api key cannot contain spaces")
    return text


def read_key_mapping(node: ConfigReader, path: str, admin: bool) -> ApiKey:
    key = check_key_text(node.string("key"), f"{path}.key", path.partition("[")[0])
    name = node.string("name").strip() or path
    if admin:
        return ApiKey(key, name, path=path)
    swap = node.string("swap", "evict").strip().lower()
    if swap not in {right.value for right in SwapRight}:
        raise node.error("swap", f"expected evict, queue or resident, got {swap!r}")
    concurrency = node.integer("concurrency")
    if concurrency < 0:
        raise node.error("concurrency", f"must be 0 (no limit) or more, got {concurrency}")
    return ApiKey(key, name, tuple(node.string_list("models")), SwapRight(swap), node.integer("priority"), concurrency,
                  path)


def check_keys_config(config: Config) -> None:
    """No key twice and no name twice (the name is what tells keys apart in logs and metrics);
    a model a key names without a glob exists."""
    by_key: dict[str, ApiKey] = {}
    by_name: dict[str, str] = {}
    known = set(config.models) | set(config.aliases) | set(config.peer_routes) | set(config.selectors)
    for entry in config.api_keys:  # (a key in adminKeys too is an admin key, as it always was)
        first = by_key.setdefault(entry.key, entry)
        scope = (entry.models, entry.swap, entry.priority, entry.concurrency)
        if first is not entry and (scope != (first.models, first.swap, first.priority, first.concurrency)
                                   or first.name != first.path or entry.name != entry.path):
            raise ConfigError(f"{entry.path}: the same key as {first.path}, which makes its name and scope ambiguous")
    for entry in [*config.api_keys, *config.admin_keys]:
        if entry.name in by_name and by_name[entry.name] != entry.path:
            raise ConfigError(f"{entry.path}.name: {entry.name!r} is already the name of {by_name[entry.name]}")
        by_name[entry.name] = entry.path
        for name in entry.models:
            if not any(c in name for c in "*?[") and name not in known:
                close = difflib.get_close_matches(name, sorted(known), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ConfigError(f"{entry.path}.models: {name!r} is no model, alias, selector or peer model{hint}")


# -- peers, selectors, profiles -----------------------------------------------

def read_peer(peer_id: str, node: ConfigReader) -> PeerConfig:
    proxy = node.string("proxy").strip()
    if not proxy:
        raise node.error("proxy", "proxy is required")
    if not valid_http_url(proxy):
        raise node.error("proxy", f"invalid peer proxy URL ({proxy}): expected http(s)://host[:port][/path]")
    models = list(dict.fromkeys(node.string_list("models")))
    if not models:
        raise node.error("models", "peer models can not be empty")
    return PeerConfig(peer_id, proxy, models, node.string("apiKey"), read_filters(node.mapping("filters")),
                      read_timeouts(node.mapping("timeouts"), Timeouts(response_header=60)))


def check_peer_namespace(config: Config, selector_ids: set[str], pin_names: set[str]) -> None:
    """Peer names may not be ambiguous or shadow local names, selectors or profile pins."""
    owners: dict[str, str] = {}
    for peer in config.peers.values():
        for model in peer.models:
            fqn = f"{peer.id}/{model}"
            if fqn in owners and owners[fqn] != peer.id:
                raise ConfigError(f'peers: peer model name "{fqn}" is ambiguous between peers "{owners[fqn]}" '
                                  f'and "{peer.id}"')
            owners[fqn] = peer.id
            if fqn in config.models:
                raise ConfigError(f'peers.{peer.id}: model ID "{fqn}" conflicts with fully qualified peer model name')
            if fqn in config.aliases:
                raise ConfigError(f'peers.{peer.id}: model {config.aliases[fqn]} alias "{fqn}" conflicts with '
                                  'fully qualified peer model name')
            if fqn in selector_ids:
                raise ConfigError(f'peers.{peer.id}: selector "{fqn}" conflicts with fully qualified peer model name')
            if fqn in pin_names:
                raise ConfigError(f'peers.{peer.id}: profile pin "{fqn}" conflicts with fully qualified '
                                  'peer model name')


def read_selector(selector_id: str, node: ConfigReader, config: Config, selector_ids: set[str]) -> Selector:
    path = node.path
    if not selector_id.strip():
        raise ConfigError("selectors: selector names cannot be empty")
    if selector_id in config.models:
        raise ConfigError(f'{path}: name conflicts with model ID "{selector_id}"')
    if selector_id in config.aliases:
        raise ConfigError(f'{path}: name conflicts with model alias "{selector_id}"')
    if selector_id in config.peer_routes:
        raise ConfigError(f'{path}: name conflicts with peer model "{selector_id}"')
    strategy = node.string("strategy")
    if not strategy:
        raise ConfigError(f"{path}.strategy is required")
    if strategy not in SELECTOR_STRATEGIES:
        raise ConfigError(f'{path}.strategy: unknown strategy "{strategy}" (valid: warm, pin, spillover)')
    targets = node.string_list("targets")
    if not targets:
        raise ConfigError(f"{path}.targets must contain at least one entry")
    for i, target in enumerate(targets):
        if target in selector_ids:
            raise ConfigError(f'{path}.targets[{i}] references selector "{target}"; selector chaining is not supported')
        if not config.resolves(target):
            raise ConfigError(f'{path}.targets[{i}] references unknown model "{target}"')
        if strategy == "warm" and config.real_model_id(target) is None:
            raise ConfigError(f'{path}.targets[{i}] must resolve to a local model for strategy "warm"')
    spillover = node.mapping("settings").integer("spillover", 1)
    if spillover < 1:
        raise ConfigError(f"{path}.settings.spillover must be >= 1")
    if strategy == "spillover":
        check_spillover_targets(path, targets, config)
    return Selector(selector_id, strategy, targets, node.string("name"), node.string("description"),
                    node.boolean("unlisted"), node.free_mapping("metadata"), spillover)


def check_spillover_targets(path: str, targets: list[str], config: Config) -> None:
    """Spillover sends requests to several targets at once, so the local ones must be able to run together."""
    peers = config.peer_routes
    resolved = [config.real_model_id(t) or ("/".join(peers[t]) if t in peers else t) for t in targets]
    for name in resolved:
        if resolved.count(name) > 1:
            raise ConfigError(f'{path}.targets contains duplicate resolved model "{name}"')
    local = [m for m in resolved if m in config.models]
    if len(local) < 2:
        return
    if config.routing.router is Router.MATRIX:
        if not any(set(local) <= combo for combos in config.routing.matrix.combinations.values() for combo in combos):
            raise ConfigError(f"{path}.targets must all appear together in one expanded matrix set")
        return
    if config.routing.router is Router.VRAM:
        return  # whether they fit together is known only once they are measured
    group_of = {m: g for g in config.routing.groups for m in g.members}
    named = [group_of[m] for m in local]
    if any(g.name == DEFAULT_GROUP for g in named) and len(config.routing.groups) > 1:
        stray = next(t for t, m in zip(targets, resolved) if m in local and group_of[m].name == DEFAULT_GROUP)
        raise ConfigError(f'{path} target "{stray}" is not in a routing group')
    if len({g.name for g in named}) > 1:
        raise ConfigError(f"{path} spillover targets must share one routing group")
    if named[0].swap:
        raise ConfigError(f"{path} spillover targets must share a group with swap: false")


def check_profiles_are_mappings(profiles: dict) -> None:
    for name, value in profiles.items():
        if not isinstance(value, dict):
            raise ConfigError(f"profiles.{name}: profile must be a mapping with description and pins; "
                              "the legacy list syntax is no longer supported")


def read_profiles(node: ConfigReader, config: Config) -> dict[str, Profile]:
    profiles = {}
    for name, value in node.data.items():
        node.asked.add(name)
        if not name.strip():
            raise ConfigError("profiles: profile names cannot be empty")
        profile = node.mapping(name)
        pins_node = profile.mapping("pins")
        if not pins_node.data:
            raise ConfigError(f"profiles.{name}.pins must contain at least one entry")
        pins = {}
        for pin, target in pins_node.data.items():
            pins_node.asked.add(pin)
            if not pin.strip():
                raise ConfigError(f"profiles.{name}.pins: pin names cannot be empty")
            target = "" if target is None else go_format(target)
            if target and not (config.resolves(target) or target in config.selectors):
                raise ConfigError(f'profiles.{name}.pins.{pin} references unknown model "{target}"')
            pins[pin] = target
        profiles[name] = Profile(name, profile.string("description"), pins)
    return profiles


def split_command(command: str) -> list[str]:
    """argv from a multi-line cmd, POSIX-shell style but without a shell.

    Comment lines go, a trailing backslash joins lines, quotes group words. Unlike shlex, a
    carriage return is an ordinary character and an unterminated quote runs to the end.
    """
    lines = []
    for line in command.split("\n"):
        trimmed = line.strip()
        if trimmed.startswith("#"):
            continue
        lines.append(trimmed[:-1] + " " if trimmed.endswith("\\") else line)
    text = "\n".join(lines)
    args: list[str] = []
    word: list[str] | None = None
    i, quote = 0, ""
    while i < len(text):
        c = text[i]
        if quote == "'":
            if c == "'":
                quote = ""
            else:
                word.append(c)
        elif quote == '"':
            if c == '"':
                quote = ""
            elif c == "\\" and i + 1 < len(text) and text[i + 1] in '$`"\\\n':
                i += 1
                if text[i] != "\n":
                    word.append(text[i])
            else:
                word.append(c)
        elif c in " \t\n":
            if word is not None:
                args.append("".join(word))
                word = None
        else:
            word = [] if word is None else word
            if c in "'\"":
                quote = c
            elif c == "\\" and i + 1 < len(text):
                i += 1
                if text[i] != "\n":
                    word.append(text[i])
            else:
                word.append(c)
        i += 1
    if word is not None:
        args.append("".join(word))
    if not args:
        raise ValueError("empty command")
    return args


###############################################################################
# 6. Logging ##################################################################
###############################################################################

# Two logs (the proxy's and the upstreams' output), each with a ring of recent history and
# live readers. Readers and stdout are byte-bounded: a slow one loses lines, never stalls us.

LOG_HISTORY_BYTES = 100 * 1024
STDOUT_BACKLOG = 4 * 1024 * 1024  # log output held for a stdout that is slow to read; more is dropped
LOG_READER_BACKLOG = 1024 * 1024  # the same for each /logs/stream reader
LEVELS = {"debug": 10, "info": 20, "warn": 30, "error": 40}


class LogRing:
    """The last `capacity` bytes written, oldest dropped first."""

    def __init__(self, capacity: int = LOG_HISTORY_BYTES):
        self.capacity = capacity
        self._buf = bytearray()
        self.written = 0  # bytes ever written: a mark for "what came after this point"

    def write(self, data: bytes) -> None:
        self._buf += data
        self.written += len(data)
        # Trim in batches so a stream of small writes does not move 100 KiB each time.
        if len(self._buf) > 2 * self.capacity:
            del self._buf[: len(self._buf) - self.capacity]

    def history(self) -> bytes:
        return bytes(self._buf[-self.capacity:])

    def tail_lines(self, count: int, since: int = 0) -> list[str]:
        """The last `count` non-blank lines, of what was written after the mark `since`."""
        history = self.history()
        text = history[max(0, len(history) - (self.written - since)):].decode("utf-8", "replace")
        return [line for line in text.splitlines() if line.strip()][-count:]


# logTimeFormat names -> Go's layouts written with Python; `_2` is a space-padded day.
LOG_TIME_LAYOUTS: dict[str, Callable[[datetime.datetime], str]] = {
    "ansic": lambda t: t.strftime(f"%a %b {t.day:2d} %H:%M:%S %Y"),
    "unixdate": lambda t: t.strftime(f"%a %b {t.day:2d} %H:%M:%S %Z %Y"),
    "rubydate": lambda t: t.strftime("%a %b %d %H:%M:%S %z %Y"),
    "rfc822": lambda t: t.strftime("%d %b %y %H:%M %Z"),
    "rfc822z": lambda t: t.strftime("%d %b %y %H:%M %z"),
    "rfc850": lambda t: t.strftime("%A, %d-%b-%y %H:%M:%S %Z"),
    "rfc1123": lambda t: t.strftime("%a, %d %b %Y %H:%M:%S %Z"),
    "rfc1123z": lambda t: t.strftime("%a, %d %b %Y %H:%M:%S %z"),
    "rfc3339": lambda t: go_time(t, fraction=False),
    "rfc3339nano": go_time,
    "kitchen": lambda t: f"{t.hour % 12 or 12}:{t.minute:02d}{'AM' if t.hour < 12 else 'PM'}",
    "stamp": lambda t: t.strftime(f"%b {t.day:2d} %H:%M:%S"),
    "stampmilli": lambda t: t.strftime(f"%b {t.day:2d} %H:%M:%S") + _fraction(t, 3),
    "stampmicro": lambda t: t.strftime(f"%b {t.day:2d} %H:%M:%S") + _fraction(t, 6),
    "stampnano": lambda t: t.strftime(f"%b {t.day:2d} %H:%M:%S") + _fraction(t, 9),
}


class LogStream:
    """One live reader of a log (or of events): chunks wait here until it takes them. It is
    never waited for: past `limit` bytes waiting, a log reader loses new chunks and is told how
    many bytes it missed before the next chunk it gets; an event watcher (`resync`) is dropped
    instead (`hang_up` ends its connection at once, even while a write to it hangs), because a
    missed event leaves it wrong: it reconnects and gets the state anew."""

    def __init__(self, limit: int, resync: bool = False):
        self.limit = limit
        self.resync = resync
        self.chunks: collections.deque[bytes] = collections.deque()
        self.size = 0  # bytes waiting
        self.dropped = 0
        self.closed = False
        self.hang_up: Callable[[], None] = lambda: None
        self._ready = asyncio.Event()

    def offer(self, data: bytes) -> None:
        if self.closed:
            return
        # Once dropping, it drops until the reader has taken half of what waits: what follows a
        # gap is then news, not a line that happened to fit.
        if self.size + len(data) > self.limit or (self.dropped and self.size > self.limit // 2):
            if self.resync:
                self.close()
                self.hang_up()
            self.dropped += len(data)
            return
        if self.dropped:
            self._add(f"\n\u2014 {self.dropped} bytes dropped \u2014\n".encode())
        self.dropped = 0
        self._add(data)
        self._ready.set()

    def _add(self, data: bytes) -> None:
        self.chunks.append(data)
        self.size += len(data)

    def close(self) -> None:
        self.closed = True
        self._ready.set()

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while True:
            await self._ready.wait()
            self._ready.clear()
            while self.chunks:
                chunk = self.chunks.popleft()
                self.size -= len(chunk)
                yield chunk
            if self.closed:
                return


class LogMonitor:
    """A log source: it keeps 100 KiB of history, hands each chunk to its live readers
    without waiting for them, and passes it on downstream (another monitor, or stdout)."""

    def __init__(self, downstream: Callable[[bytes], None] | None = None):
        self.history = LogRing()
        self.downstream = downstream
        self.listeners: set[Callable[[bytes], None]] = set()

    def write(self, data: bytes) -> None:
        self.history.write(data)
        for listener in list(self.listeners):
            listener(data)
        if self.downstream:
            self.downstream(data)

    @contextlib.contextmanager
    def reading(self, limit: int = LOG_READER_BACKLOG) -> Iterator[LogStream]:
        """A live reader for as long as the block runs."""
        stream = LogStream(limit)
        self.listeners.add(stream.offer)
        try:
            yield stream
        finally:
            self.listeners.discard(stream.offer)


_UNPRINTABLE = re.compile("[\x00-\x1f\x7f\x85\u2028\u2029\ud800-\udfff]")  # surrogates: undecodable bytes


def printable(text: str) -> str:
    """Client-sent text (a path, a model name, a header) made safe for one log line: control
    characters escaped, so nobody can start a forged line of our log or move its cursor."""
    return _UNPRINTABLE.sub(lambda m: repr(m.group())[1:-1], text)


class Stdout:
    """Our stdout, written by a thread of its own, so that a reader that stops reading (a stuck
    pipe under systemd or docker) never stops the event loop: what it has not taken waits here,
    up to `limit` bytes; past that, new output is dropped, and once it reads again it is told
    how much it missed. The thread is a daemon: a pipe nobody reads never holds up the exit."""

    def __init__(self, fd: int = 1, limit: int = STDOUT_BACKLOG):
        self.fd, self.limit = fd, limit
        self.pending: collections.deque[bytes] = collections.deque()
        self.size = self.dropped = 0
        self.broken = False
        self.lock = threading.Condition()
        self.thread: threading.Thread | None = None

    def write(self, data: bytes) -> None:
        with self.lock:
            if self.broken:
                return
            if self.size + len(data) > self.limit:
                self.dropped += len(data)
                return
            if self.dropped:
                note = f"[WARN] {self.dropped} bytes of log output were dropped: stdout was not being read\n".encode()
                self.pending.append(note)
                self.size, self.dropped = self.size + len(note), 0
            self.pending.append(data)
            self.size += len(data)
            if self.thread is None:
                self.thread = threading.Thread(target=self._drain, name="llama-swap-stdout", daemon=True)
                self.thread.start()
            self.lock.notify()

    def _drain(self) -> None:
        while True:
            with self.lock:
                while not self.pending:
                    self.lock.wait()
                data = b"".join(self.pending)  # what came meanwhile goes out in one write
                self.pending.clear()
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(self.fd, view):]
            except OSError:  # closed or gone: nobody will read it
                with self.lock:
                    self.broken = True
                    self.pending.clear()
                    self.lock.notify_all()
                return
            with self.lock:
                self.size -= len(data)
                self.lock.notify_all()

    def flush(self, timeout: float) -> None:
        """Wait (a while) until what was written is out: at exit."""
        deadline = time.monotonic() + timeout
        with self.lock:
            while self.size and not self.broken and (left := deadline - time.monotonic()) > 0:
                self.lock.wait(left)


STDOUT = Stdout()


class ProxyLog:
    """llama-swap's own log, `[LEVEL] message` lines, and the monitors every log goes through:
    `proxy` (ours), `upstream` (all model servers' output) and `mux` (what /logs shows and
    stdout prints), wired by logToStdout."""

    def __init__(self, level: str = "info", to_stdout: str = "proxy", time_format: str = "",
                 stdout: Callable[[bytes], None] | None = STDOUT.write):
        self.level = LEVELS.get(level, LEVELS["info"])
        self.time_format = time_format
        self.mux = LogMonitor(stdout if to_stdout != "none" else None)
        self.proxy = LogMonitor(self.mux.write if to_stdout in ("proxy", "both") else None)
        self.upstream = LogMonitor(self.mux.write if to_stdout in ("upstream", "both") else None)

    def configure(self, config: Config) -> None:
        self.level = LEVELS[config.log_level]
        self.time_format = config.log_time_format

    def log(self, level: str, message: str) -> None:
        if LEVELS[level] < self.level:
            return
        stamp = ""
        if self.time_format:
            stamp = LOG_TIME_LAYOUTS[self.time_format](datetime.datetime.now().astimezone()) + " "
        self.proxy.write(f"{stamp}[{level.upper()}] {message}\n".encode(errors="backslashreplace"))

    def debug(self, message: str) -> None:
        self.log("debug", message)

    def info(self, message: str) -> None:
        self.log("info", message)

    def warn(self, message: str) -> None:
        self.log("warn", message)

    def error(self, message: str) -> None:
        self.log("error", message)


def malformed_reason(error: BaseException | None) -> str | None:
    """One printable line saying how a request broke HTTP (framing, limits, a body that does not
    decode), from aiohttp's error or the error behind it; None for any other error."""
    while error is not None and not isinstance(error, aiohttp.http_exceptions.HttpProcessingError):
        error = error.__cause__ or error.__context__
    if error is None:
        return None
    # aiohttp's message may quote the offending line over several lines, with a caret
    reason = " ".join(line.strip() for line in str(error.message).splitlines() if line.strip(" ^"))
    return printable(f"{error.code} {reason}")


class ProtocolLog(logging.Handler):
    """What aiohttp's server says about a request that never reached a handler, in our log.

    A malformed request (bad framing, a header past the limits, Content-Length beside
    Transfer-Encoding) is a client's fault: one warning line, not a traceback. Anything else
    aiohttp reports is a fault of ours, logged with its traceback."""

    def __init__(self, log: ProxyLog):
        super().__init__()
        self.proxy_log = log

    @classmethod
    def logger(cls, log: ProxyLog) -> logging.Logger:
        logger = logging.Logger("llama_swap.http", logging.DEBUG)  # our own, not in logging's tree
        logger.addHandler(cls(log))
        return logger

    def emit(self, record: logging.LogRecord) -> None:
        reason = malformed_reason(record.exc_info[1]) if record.exc_info else None
        if reason is not None:
            level = "debug" if record.levelno <= logging.DEBUG else "warn"
            client = printable(str(record.args[0])) if record.args else "a client"
            self.proxy_log.log(level, f"refused a malformed request from {client}: {reason}")
        elif record.levelno > logging.DEBUG:
            trace = "\n" + logging.Formatter().formatException(record.exc_info) if record.exc_info else ""
            self.proxy_log.error(printable(record.getMessage()) + trace)


###############################################################################
# 7. Process groups ###########################################################
###############################################################################

# Every model server runs in a process group of its own, so that a stop reaches whatever its
# command started. The groups are recorded in a file and told to a watcher process, so that
# none is left running when we die, however we die.


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's, and alive
        return True
    return True


def live_processes() -> Iterator[tuple[int, int]]:
    """(pid, process group) of every live (non-zombie) process, from /proc (Linux; none elsewhere)."""
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else ():
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # Fields after the command name (which may hold spaces): state ppid pgrp ...
        fields = stat[stat.rfind(b")") + 2:].split()
        if len(fields) > 2 and fields[0] != b"Z":
            yield int(entry), int(fields[2])


def process_group_alive(pgid: int) -> bool:
    """Whether any live (non-zombie) process is still in the group."""
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    if not os.path.isdir("/proc/self"):
        return True
    # The group exists; look closer, since unreaped zombies keep a group alive forever.
    return any(group == pgid for _pid, group in live_processes())


def signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


PR_SET_PDEATHSIG = 1


@functools.cache
def _prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def die_with_parent() -> Callable[[], None] | None:
    """What a model server runs between fork and exec, on Linux: from then on the kernel
    SIGKILLs it the moment llama-swap dies, however it dies (SIGKILL, the OOM killer), so no
    server is left holding VRAM. Everything is looked up before the fork; the child only makes
    system calls. Its own children are not covered: GroupRecord takes care of those."""
    prctl, parent = _prctl(), os.getpid()
    if prctl is None:
        return None

    def in_child() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # we died before the request took effect
            os.kill(os.getpid(), signal.SIGKILL)
    return in_child


def process_start_time(pid: int) -> str | None:
    """When a process started (clock ticks since boot, from /proc), with the boot it belongs
    to: what tells our old process apart from a stranger that got its number."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        return None
    return f"{boot}:{stat[stat.rfind(b')') + 2:].split()[19].decode()}"


# The watcher: a tiny process of its own (own session, so a terminal's Ctrl-C and a service
# manager's SIGTERM are ours to handle, not its) that holds the read end of a pipe only we write
# to. We tell it each process group we start ("+pgid") and stop ("-pgid"); when the pipe breaks,
# because we died however we died, it SIGKILLs the groups still listed and exits. A wrapper's
# children (a script, `sh -c` without exec, docker's client), which PR_SET_PDEATHSIG does not
# reach, go within moments of us instead of at the next start. Stdlib only, run with -S -E.
WATCHER_SOURCE = """\
import os, signal, sys
for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
    signal.signal(sig, signal.SIG_IGN)
groups = set()
for line in sys.stdin:
    try:
        pgid = int(line)
    except ValueError:
        continue
    if pgid > 0:
        groups.add(pgid)
    else:
        groups.discard(-pgid)
for pgid in groups:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except OSError:
        pass
"""


class GroupRecord:
    """The process groups of the model servers we run, watched two ways so that none outlives
    us: a watcher process stops them the moment we die, and a file keyed by our listen address
    lets the next start on that address stop them if the watcher died with us. The file names
    its owner; only a record whose owner is gone is acted on."""

    def __init__(self, path: str | None):
        self.path = path
        self.groups: dict[str, str] = {}  # pgid -> start time of its leader
        self.owner = f"{os.getpid()}:{process_start_time(os.getpid()) or ''}"
        self.watcher: asyncio.subprocess.Process | None = None
        self.settled = asyncio.Event()  # leftovers of a killed run are gone: models may start
        if path is None:
            self.settled.set()

    def add(self, pgid: int) -> None:
        self.groups[str(pgid)] = process_start_time(pgid) or ""
        self._tell_watcher(f"+{pgid}\n")
        self._save()

    def remove(self, pgid: int) -> None:
        if self.groups.pop(str(pgid), None) is not None:
            self._tell_watcher(f"-{pgid}\n")
            self._save()

    def _tell_watcher(self, line: str) -> None:
        if self.watcher is not None and self.watcher.returncode is None:
            with contextlib.suppress(ConnectionError, RuntimeError):
                self.watcher.stdin.write(line.encode())

    def _save(self) -> None:
        if not self.path:
            return
        with contextlib.suppress(OSError):  # a read-only home loses the record, not a model
            if not self.groups:  # nothing of ours runs: no file left behind for this address
                with contextlib.suppress(FileNotFoundError):
                    os.remove(self.path)
                return
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            with open(self.path + ".tmp", "w") as f:
                json.dump({"owner": self.owner, "groups": self.groups}, f)
            os.replace(self.path + ".tmp", self.path)

    async def watch(self, log: ProxyLog) -> None:
        """Start the watcher (once we own our address, before any model starts)."""
        if not sys.executable:
            log.warn("no Python interpreter path known: model servers' children may outlive a killed llama-swap")
            return
        try:
            self.watcher = await asyncio.create_subprocess_exec(
                sys.executable, "-S", "-E", "-c", WATCHER_SOURCE, "llama-swap-watcher", stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL, start_new_session=True)
        except OSError as e:
            log.warn(f"cannot start the watcher process ({e.strerror or e}): "
                     "model servers' children may outlive a killed llama-swap")

    async def close(self) -> None:
        """After every model has stopped: the watcher finds nothing listed and exits."""
        if self.watcher is not None:
            self.watcher.stdin.close()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.watcher.wait(), 5.0)
            if self.watcher.returncode is None:
                self.watcher.kill()
                await self.watcher.wait()

    async def stop_leftovers(self, log: ProxyLog) -> None:
        """SIGKILL the groups a killed run of ours on this address left behind, wait (a little)
        until they are gone so their ports and memory are free, and forget them. Called once we
        listen on the address, so a run that still owns it can only be a dead one."""
        try:
            left = await asyncio.to_thread(self._read)
            owner = left.get("owner") if isinstance(left.get("owner"), str) else ""
            pid = owner.partition(":")[0]
            if pid.isdigit() and int(pid) != os.getpid() and owner == f"{pid}:{process_start_time(int(pid)) or ''}":
                log.warn(f"the process-group record {self.path} belongs to a live llama-swap (pid {pid}); "
                         "leaving its models alone")
                self.path = None  # and keeping none of ours there
                return
            groups = left.get("groups") if "owner" in left else left  # the format before owners were named
            for pgid, started in (groups.items() if isinstance(groups, dict) else ()):
                if str(pgid).isdigit() and isinstance(started, str):
                    await self._stop_leftover(int(pgid), started, log)
            self._save()
        finally:
            self.settled.set()

    def _read(self) -> dict:
        try:
            with open(self.path) as f:
                found = json.load(f)
        except (OSError, ValueError):
            return {}
        return found if isinstance(found, dict) else {}

    async def _stop_leftover(self, pgid: int, started: str, log: ProxyLog) -> None:
        leader = process_start_time(pgid)
        # Ours if its leader is the very process we started, or if the leader is gone and the
        # group lives on (a new group under the same number would have its leader alive).
        if await asyncio.to_thread(process_group_alive, pgid) and (leader == started or (leader is None and started)):
            log.warn(f"stopping process group {pgid}, left running by a llama-swap that was killed")
            signal_group(pgid, signal.SIGKILL)
            for _ in range(100):
                if not await asyncio.to_thread(process_group_alive, pgid):
                    break
                await asyncio.sleep(0.05)


###############################################################################
# 8. KV cache #################################################################
###############################################################################

# kvCache: a llama-server's slots (the KV cache of each conversation it holds) are saved to
# files before it stops, and restored after its next start before any request reaches it, so
# that coming back to a model after a swap does not mean reading the whole conversation again.
# Saving is bounded by saveTimeout and never holds up a swap longer; a file that does not
# restore is dropped; the files of a model stay within maxDiskMB, oldest removed first.

KV_SAVED_ON = ("swap", "ttl", "unload", "reload")  # stop reasons worth a save (not a crash or shutdown)


@dataclass
class SlotTransfer:
    """One slot saved or restored, as llama-server reports it."""

    slot: int
    tokens: int
    size: int  # bytes written or read
    ms: float


def slot_file(slot: int) -> str:
    return f"slot-{slot}.bin"


async def slots_holding_tokens(session: aiohttp.ClientSession, base_url: str) -> list[int]:
    """The IDs of the slots that hold a conversation (GET /slots)."""
    async with session.get(base_url + "/slots") as answer:
        answer.raise_for_status()
        slots = await answer.json(content_type=None)
    return [int(s["id"]) for s in slots if isinstance(s, dict) and int(s.get("n_prompt_tokens") or 0) > 0]


async def slot_action(session: aiohttp.ClientSession, base_url: str, slot: int, action: str) -> SlotTransfer:
    """POST /slots/{id}?action=save|restore with the slot's file name; an error answer raises."""
    async with session.post(f"{base_url}/slots/{slot}", params={"action": action},
                            json={"filename": slot_file(slot)}) as answer:
        reply = await answer.json(content_type=None)
        if answer.status != 200 or not isinstance(reply, dict):
            message = reply.get("error", {}).get("message") if isinstance(reply, dict) else None
            raise aiohttp.ClientResponseError(answer.request_info, (), status=answer.status,
                                              message=str(message or reply)[:300])
    saved = action == "save"
    timings = reply.get("timings") or {}
    return SlotTransfer(slot, int(reply.get("n_saved" if saved else "n_restored") or 0),
                        int(reply.get("n_written" if saved else "n_read") or 0),
                        float(timings.get("save_ms" if saved else "restore_ms") or 0.0))


def saved_slots(directory: str) -> list[int]:
    """The slots with a file in `directory`, newest file first."""
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    found = []
    for name in names:
        if m := re.fullmatch(r"slot-(\d+)\.bin", name):
            with contextlib.suppress(OSError):  # removed meanwhile
                found.append((os.path.getmtime(os.path.join(directory, name)), int(m.group(1))))
    return [slot for _, slot in sorted(found, reverse=True)]


def prune_kv_files(model_dir: str, budget: int) -> list[str]:
    """Files of one model (all its launch settings) removed, oldest first, until the rest fit
    `budget` bytes; returns those removed. Blocking: call it in a worker thread."""
    files = []
    for folder, _dirs, names in os.walk(model_dir):
        for name in names:
            path = os.path.join(folder, name)
            with contextlib.suppress(OSError):
                stat = os.stat(path)
                files.append((stat.st_mtime, stat.st_size, path))
    total = sum(size for _, size, _ in files)
    removed = []
    for _, size, path in sorted(files):
        if total <= budget:
            break
        with contextlib.suppress(OSError):
            os.remove(path)
            removed.append(path)
            total -= size
    return removed


def remove_other_models_kv(root: str, model_dirs: set[str]) -> list[str]:
    """At start: the caches of models no longer in the config are removed. Blocking."""
    try:
        names = os.listdir(root)
    except OSError:
        return []
    gone = [os.path.join(root, n) for n in names if os.path.join(root, n) not in model_dirs]
    for path in gone:
        shutil.rmtree(path, ignore_errors=True)
    return gone


###############################################################################
# 9. Model processes ##########################################################
###############################################################################

# ModelProcess: one model's server through its states (stopped -> starting -> ready ->
# stopping -> stopped; with `sleep`, also ready -> sleeping -> waking -> ready). It spawns,
# polls health, reads load progress, puts to sleep, wakes and stops the group; it decides
# nothing about which model runs: the scheduler does.

class State(Named):
    """Where a model's server is in its life; /running and the UI show these words."""

    STOPPED = "stopped"
    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"
    SLEEPING = "sleeping"  # its process lives, its GPU memory is given back (sleep: its calls)
    WAKING = "waking"


STOPPED, STARTING, READY, STOPPING, SLEEPING, WAKING = State
ABORTED_START_GRACE = 5.0
MIN_PROBE_GAP = 0.025  # seconds between health probes at the least, however much the upstream prints
START_ERROR_TAIL_LINES = 8


class StartError(Exception):
    """A model could not be made ready; the message is what the client is told."""


class SleepError(Exception):
    """A sleep or wake call the server did not answer with success in time."""


def health_poll_interval(elapsed: float) -> float:
    """Pause between health probes: 10 ms at first, ~0.5% of the wait so far, at most 250 ms.

    Output from the upstream and its exit also wake the poller at once (see ModelProcess), so
    readiness announced in the log is seen within a probe's round trip.
    """
    return min(max(0.01, elapsed * 0.005), 0.25)


PORT_RELEASE_WAIT = 2.0  # seconds a port being let go of (a server still exiting) may take


def loopback_address(proxy: str) -> tuple[str, int] | None:
    """Host and port of a proxy URL on this machine; None for another host."""
    url = URL(proxy)
    host = url.host or ""
    try:
        local = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        local = False
    return (host, url.port) if local and url.port else None


async def port_answers(host: str, port: int) -> bool:
    """Whether something accepts connections on host:port now."""
    try:
        _reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 2.0)
    except (OSError, asyncio.TimeoutError):
        return False
    writer.close()
    return True


def port_holder(port: int) -> str:
    """' (pid N, name)' of the process listening on a TCP port, from /proc; '' if unknown
    (not Linux, or a process of another user)."""
    sockets = {f"socket:[{fields[9]}]"
               for table in ("/proc/net/tcp", "/proc/net/tcp6")
               for fields in (line.split() for line in read_text(table).splitlines()[1:])
               if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port}  # 0A: LISTEN
    for pid in filter(str.isdigit, os.listdir("/proc") if sockets else ()):
        with contextlib.suppress(OSError):
            if any(os.readlink(f"/proc/{pid}/fd/{fd}") in sockets for fd in os.listdir(f"/proc/{pid}/fd")):
                return f" (pid {pid}, {read_text(f'/proc/{pid}/comm').strip()})"
    return ""


def environment_proxy(base_url: str) -> str | None:
    """The proxy Go's HTTP client would take for base_url: HTTP_PROXY or HTTPS_PROXY unless
    NO_PROXY lists the host; never for localhost or a loopback address."""
    host = URL(base_url).host or ""
    if loopback_address(base_url) is not None or host == "localhost":
        return None
    proxies = urllib.request.getproxies_environment()
    if not proxies or urllib.request.proxy_bypass_environment(host, proxies):
        return None
    return proxies.get(URL(base_url).scheme)


def own_connections(timeouts: Timeouts, base_url: str) -> Connections | None:
    """Our own kept-alive connections to a plain-http upstream reached directly; None for https,
    through a proxy or with credentials in the URL, which aiohttp's client handles."""
    if not base_url.startswith("http:") or URL(base_url).user is not None or environment_proxy(base_url) is not None:
        return None
    return Connections(base_url, timeouts)


def upstream_session(timeouts: Timeouts, base_url: str) -> aiohttp.ClientSession:
    """A pooled session to one upstream, under its `timeouts` (0 means no limit), through
    the proxy the environment names for it. No connection limit: the scheduler, not the pool,
    decides how many requests run at once. No cookie jar: an upstream's Set-Cookie is for the
    client that got it, and a jar would send it upstream with every other client's requests."""
    https = base_url.startswith("https:")
    connect = None
    if timeouts.connect:  # aiohttp's connect budget includes the TLS handshake
        connect = timeouts.connect + (timeouts.tls_handshake if https else 0)
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=timeouts.idle_conn or None,
                                     ssl=tls_client_context() if https else True,
                                     socket_factory=functools.partial(keepalive_socket, timeouts.keepalive))
    return aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar(), auto_decompress=False,
                                 proxy=environment_proxy(base_url),
                                 timeout=aiohttp.ClientTimeout(total=None, sock_connect=connect),
                                 raise_for_status=keep_websocket_refusal)


@functools.cache
def tls_client_context() -> ssl.SSLContext:
    """What verifies https upstreams and peers: the system's CA certificates (or SSL_CERT_FILE's),
    read once, when first needed (Runtime reads them ahead, in a thread, for a config that names
    https URLs)."""
    return ssl.create_default_context()


def names_https(config: Config) -> bool:
    return any(url.startswith("https:") for url in [*(m.proxy for m in config.models.values()),
                                                    *(p.proxy for p in config.peers.values())])


def keepalive_socket(period: int, addr_info: tuple) -> socket.socket:
    """A TCP socket that probes an idle peer every `period` seconds, so a dead upstream host is
    noticed during a long silent generation instead of hanging the request forever."""
    family, kind, proto, _name, _address = addr_info
    sock = socket.socket(family, kind, proto)
    if period > 0:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for option in ("TCP_KEEPIDLE", "TCP_KEEPINTVL"):
            if hasattr(socket, option):  # Linux; macOS has only TCP_KEEPALIVE
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), period)
    return sock


@dataclass(frozen=True)
class Upstream:
    """Where a request goes: a pooled session, the server's base URL, how long to wait for the
    response headers (None: no limit) and how the log names it; for a plain-http server reached
    without a proxy, our own kept-alive connections too, which relay() then uses."""

    session: aiohttp.ClientSession
    base_url: str
    header_timeout: float | None
    label: str
    connections: Connections | None = None

    def url(self, path_qs: str) -> URL:
        """The upstream URL for a raw (still percent-encoded) path and query."""
        return URL(self.base_url.rstrip("/") + path_qs, encoded=True)


@dataclass
class Run:
    """One spawned server: its process, its output pipe, the HTTP session (and our own
    connections, where they serve) to it and the tasks that watch it."""

    proc: asyncio.subprocess.Process
    session: aiohttp.ClientSession
    connections: Connections | None
    output_mark: int  # where this run's output starts in the model's LogRing
    pipe: asyncio.ReadTransport | None = None
    reader: asyncio.Task | None = None
    tasks: set[asyncio.Task] = field(default_factory=set)

    def own(self, coro) -> asyncio.Task:
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def close(self) -> None:
        """After the process group is gone: finish reading its output, close pipe and session."""
        others = self.tasks - {asyncio.current_task()}
        if others:
            _done, pending = await asyncio.wait(others, timeout=1.0)
            for task in pending:
                task.cancel()
        if self.pipe:
            self.pipe.close()
        if self.connections is not None:
            self.connections.close()
        await self.session.close()


LOAD_HISTORY = 10  # load durations kept per model, for its ETA


class LoadProgress:
    """How far a model server's load has got (0..1), from what it prints, where it says so:
    llama.cpp's progress dots (a line of them after `load_tensors`, one per percent), the state
    lines llama-server prints as a router's child, and `NN%` on a line about loading (vLLM's
    checkpoint shards, downloads). None until one of them is seen."""

    MARKERS = (b"load_tensors", b"llama_model_load")  # llm_load_tensors too
    PERCENT = re.compile(rb"(?i)(?:load|shard)\D*?(\d{1,3}(?:\.\d+)?)\s?%")
    CHILD_STATE = b"cmd_child_to_router:state:"

    def __init__(self) -> None:
        self.value: float | None = None
        self._armed = False  # a loader line was seen: a line of dots now counts
        self._line = b""  # the line being printed, up to 4 KiB

    def feed(self, chunk: bytes) -> None:
        """Only the newest lines say where the load is: a chatty loader's output (a hundred MB
        of it, some print) is searched in C, never split into lines here."""
        text = self._line + chunk
        if not self._armed and any(marker in text for marker in self.MARKERS):
            self._armed = True
        end = max(text.rfind(b"\n"), text.rfind(b"\r"))
        if end >= 0:
            first = min(i for i in (text.find(b"\n"), text.find(b"\r")) if i >= 0)
            self._read(text[:first], complete=True)  # the line that was being printed, finished
            if (state := text.rfind(self.CHILD_STATE, 0, end)) >= 0:
                self._read(text[state:text.find(b"\n", state)], complete=True)
            self._read(text[max(text.rfind(b"\n", 0, end), text.rfind(b"\r", 0, end)) + 1:end], complete=True)
        self._line = text[end + 1:][-4096:]
        self._read(self._line, complete=False)

    def _read(self, line: bytes, complete: bool) -> None:
        if self._armed and line and not line.strip(b"."):
            self._set(len(line) / 100)
        elif line.startswith(self.CHILD_STATE):
            if complete:  # JSON: only whole
                with contextlib.suppress(ValueError, TypeError, AttributeError, KeyError):
                    self._set(float(json.loads(line[len(self.CHILD_STATE):])["payload"]["value"]))
        elif match := self.PERCENT.search(line):  # tqdm's latest update has no line end yet
            self._set(float(match.group(1)) / 100)

    def _set(self, value: float) -> None:
        if math.isfinite(value):
            self.value = min(max(value, 0.0), 1.0)


def load_eta(elapsed: float, progress: float | None, past: Sequence[float]) -> float | None:
    """Seconds a load has left: from its own progress once it says enough, else from how long
    its past loads took (their median). None when nothing is known or it runs late."""
    if progress is not None and progress >= 0.05:
        return elapsed * (1 - progress) / progress
    usual = statistics.median_high(past) if past else None
    return usual - elapsed if usual is not None and usual > elapsed else None


# How a stop is announced in the log, by its reason (the metrics' label).
STOP_REASONS = {"swap": "swapped out to make room", "unload": "unloaded on request",
                "reload": "changed or removed by a config reload", "shutdown": "llama-swap is shutting down"}
STOPPED_BECAUSE = {**STOP_REASONS, "ttl": "its TTL passed", "crash": "its server exited by itself"}
SLEEP_REASONS = {"swap": "to make room", "ttl": "its TTL passed"}


class Learnt:
    """What the proxy learns of each model by running it: how long its loads took (its ETA and
    its swap cost) and the GPU memory its server held once ready (the vram router's measure).
    One object, owned by the Runtime; `changed` hears of each model whose figures change, so
    that the store keeps them for the next run."""

    def __init__(self, changed: Callable[[str], None] = lambda model: None):
        self.load_times: dict[str, collections.deque[float]] = {}  # seconds, past starts
        self.wake_times: dict[str, collections.deque[float]] = {}  # seconds, past wakes (sleep)
        self.vram: dict[str, dict[int, int]] = {}  # GPU -> bytes, the peak of a run once it was ready
        self.vram_asleep: dict[str, dict[int, int]] = {}  # GPU -> bytes a sleeping server keeps
        self.changed = changed

    def loads(self, model: str) -> collections.deque[float]:
        return self.load_times.setdefault(model, collections.deque(maxlen=LOAD_HISTORY))

    def loaded(self, model: str, seconds: float) -> None:
        self.loads(model).append(seconds)
        self.changed(model)

    def wakes(self, model: str) -> collections.deque[float]:
        return self.wake_times.setdefault(model, collections.deque(maxlen=LOAD_HISTORY))

    def measured(self, model: str, vram: Mapping[int, int]) -> None:
        if self.vram.get(model) != vram:
            self.vram[model] = dict(vram)
            self.changed(model)

    def measured_asleep(self, model: str, vram: Mapping[int, int]) -> None:
        if self.vram_asleep.get(model) != vram:
            self.vram_asleep[model] = dict(vram)
            self.changed(model)

    def forget_vram(self, model: str) -> None:
        """Its launch settings changed (a reload): what was measured no longer holds."""
        self.vram.pop(model, None)
        self.vram_asleep.pop(model, None)

    def figures(self, model: str) -> dict[str, Any]:
        """As the store keeps them."""
        figures: dict[str, Any] = {"load_times": list(self.loads(model))}
        for key, known in (("vram", self.vram), ("vram_asleep", self.vram_asleep)):
            figures[key] = {str(g): b for g, b in known.get(model, {}).items()}
        return figures

    def recall(self, saved: Mapping[str, Mapping[str, Any]]) -> None:
        """What earlier runs learnt (the store's rows), where this run has learnt nothing yet."""
        for model, figures in saved.items():
            with contextlib.suppress(ValueError, TypeError, AttributeError):  # a row from elsewhere
                load_times = [float(t) for t in figures.get("load_times", [])]
                vram = {int(g): int(b) for g, b in figures.get("vram", {}).items()}
                vram_asleep = {int(g): int(b) for g, b in figures.get("vram_asleep", {}).items()}
                if not self.loads(model):
                    self.loads(model).extend(load_times)
                if vram:
                    self.vram.setdefault(model, vram)
                if vram_asleep:
                    self.vram_asleep.setdefault(model, vram_asleep)


class ModelProcess:
    """One model's upstream server and its lifecycle: stopped -> starting -> ready -> stopping.

    The server runs in its own process group, so stopping it stops its children too. Output
    (stdout and stderr together) is kept in `output`. `start()` and `stop()` may be called by
    many tasks at once: a second start joins the first, a start during a stop waits for it,
    a stop during a start aborts it. Each run gets its own pooled HTTP session, closed with it,
    so no connection ever outlives the server it was opened to.
    """

    def __init__(self, model: ModelConfig, log: ProxyLog, on_change: Callable[[ModelProcess], None],
                 groups: GroupRecord | None = None, learnt: Learnt | None = None,
                 on_kv: Callable[[str, str, SlotTransfer], None] = lambda model, action, transfer: None):
        self.model = model
        self.log = log
        self.on_change = on_change
        self.on_kv = on_kv  # a slot saved or restored (kvCache)
        self.groups = groups or GroupRecord(None)
        self.state: State = STOPPED
        self.stop_reason = ""  # why the current run is ending: the first stop request names it
        self.sleep_reason = ""  # why it was last put to sleep (swap, ttl)
        self.output = LogMonitor(log.upstream.write)  # kept across restarts, as the original does
        self._run: Run | None = None
        self._starting: asyncio.Task | None = None
        self._loading: asyncio.Task | None = None  # spawn and health check: what an abort cancels
        self._stopping: asyncio.Task | None = None
        self._sleeping: asyncio.Task | None = None  # the sleep call, and the stop if it fails
        self._wake = asyncio.Event()
        self.load_began = 0.0  # monotonic time of the current start
        self.load_progress = LoadProgress()
        self.learnt = learnt or Learnt()
        self.ready_since = 0.0  # monotonic time it last became ready
        self.failure: dict[str, Any] | None = None  # why its last start failed, until the next attempt

    @property
    def load_times(self) -> collections.deque[float]:
        """Seconds its past starts took (the newest last), as learnt."""
        return self.learnt.loads(self.model.id)

    @property
    def wake_times(self) -> collections.deque[float]:
        """Seconds its past wakes took (sleep), as learnt in this run."""
        return self.learnt.wakes(self.model.id)

    @property
    def group(self) -> int | None:
        """The process group of the server while one runs."""
        return self._run.proc.pid if self._run is not None and self.state != STOPPED else None

    def load_status(self) -> dict[str, Any] | None:
        """While starting: seconds so far, progress (0..1, where the server prints it) and the
        seconds it probably has left; None otherwise."""
        if self.state != STARTING:
            return None
        elapsed = time.monotonic() - self.load_began
        progress = self.load_progress.value
        eta = load_eta(elapsed, progress, self.load_times)
        return {"elapsed_s": round(elapsed, 1), "progress": None if progress is None else round(progress, 3),
                "eta_s": None if eta is None else round(eta, 1)}

    @property
    def upstream(self) -> Upstream | None:
        """The way to the server while it is ready; None otherwise."""
        if self.state != READY or self._run is None or self._run.session.closed:
            return None
        header_timeout = self.model.timeouts.response_header or None
        return Upstream(self._run.session, self.model.proxy, header_timeout, f"<{self.model.id}>",
                        self._run.connections)

    def _set_state(self, state: State) -> None:
        if state != self.state:
            self.state = state
            self.on_change(self)

    @property
    def state_reason(self) -> str:
        """Why it is in its state, in words, where that says something: why it sleeps or stops,
        or why its start failed."""
        if self.state == SLEEPING:
            return SLEEP_REASONS.get(self.sleep_reason, self.sleep_reason)
        if self.state not in (STOPPING, STOPPED):
            return ""
        if self.failure is not None:
            return f"its start failed: {self.failure['error']}"
        return STOPPED_BECAUSE.get(self.stop_reason, self.stop_reason)

    @property
    def asleep(self) -> bool:
        """Sleeping, its sleep call answered: it holds only what a sleeping server keeps."""
        return self.state == SLEEPING and self._sleeping is not None and self._sleeping.done()

    async def start(self) -> None:
        """Make the model ready (a sleeping one is woken), or raise StartError saying why it is not."""
        if self.state == STOPPING:
            await asyncio.shield(self._stopping)
        if self.state == SLEEPING:
            await asyncio.shield(self._sleeping)  # a sleep under way is answered first
        if self.state == SLEEPING:
            self._starting = asyncio.create_task(self._run_wake())
            self._set_state(WAKING)
        if self.state == STOPPED:
            loading = self._new_load()
            self._starting = asyncio.create_task(self._run_start(loading))
            self._set_state(STARTING)
        if self.state in (STARTING, WAKING):
            await asyncio.shield(self._starting)

    def _new_load(self) -> asyncio.Task:
        self.stop_reason, self.failure = "", None
        self.load_began, self.load_progress = time.monotonic(), LoadProgress()
        self._loading = asyncio.create_task(self._load())
        return self._loading

    async def stop(self, timeout: float, reason: str) -> None:
        """Stop the server and its process group: graceful for `timeout` seconds, then SIGKILL.
        `reason` (swap, ttl, unload, reload, shutdown) is what the metrics count the stop as."""
        self.stop_reason = self.stop_reason or reason
        while self.state != STOPPED:
            if self.state == STARTING:
                if not self._loading.done():
                    self._say_stop("start aborted")
                self._loading.cancel()  # too late if loading just finished: then it is READY next time round
                with contextlib.suppress(StartError):
                    await asyncio.shield(self._starting)
            elif self.state == READY or self.asleep:
                self.begin_stop(timeout, reason)
            elif self.state == SLEEPING:
                await asyncio.shield(self._sleeping)
            elif self.state == WAKING:
                with contextlib.suppress(StartError):
                    await asyncio.shield(self._starting)
            else:
                await asyncio.shield(self._stopping)

    def begin_stop(self, timeout: float, reason: str) -> asyncio.Task:
        """Start stopping a ready (or sleeping) server now: from this moment it is STOPPING, so no
        new request can be handed to it (the scheduler decides synchronously, before any task runs)."""
        self.stop_reason = self.stop_reason or reason
        self._say_stop("stopping")
        self._stopping = asyncio.create_task(self._run_stop(timeout, save=self.state == READY))
        self._set_state(STOPPING)
        return self._stopping

    # -- sleep and wake (sleep: its calls) ------------------------------------

    async def sleep(self, timeout: float, reason: str) -> bool:
        """Put the server to sleep (one waking is woken first); whether it now sleeps. A sleep
        call that fails or takes longer than `timeout` stops the server instead."""
        if self.state == WAKING:
            with contextlib.suppress(StartError):
                await asyncio.shield(self._starting)
        if self.state == READY:
            self.begin_sleep(timeout, reason)
        if self.state == SLEEPING:
            await asyncio.shield(self._sleeping)
        return self.state == SLEEPING

    def begin_sleep(self, timeout: float, reason: str) -> asyncio.Task:
        """Begin putting a ready server to sleep: from this moment it is SLEEPING and takes no
        request (as begin_stop)."""
        self.sleep_reason = reason
        self._sleeping = asyncio.create_task(self._run_sleep(timeout, reason))
        self._set_state(SLEEPING)
        return self._sleeping

    async def _run_sleep(self, timeout: float, reason: str) -> None:
        began = time.monotonic()
        try:
            await self._call(self.model.sleep.sleep, timeout)
        except SleepError as e:
            self.log.warn(f"<{self.model.id}> could not go to sleep ({e}); stopping it instead")
            self.stop_reason = reason
            self._say_stop("stopping")
            self._stopping = asyncio.current_task()  # a stop() meanwhile waits for this one
            self._set_state(STOPPING)
            await self._run_stop(timeout, save=True)
            return
        self.log.info(f"<{self.model.id}> asleep ({SLEEP_REASONS.get(reason, reason)}), "
                      f"{self.model.sleep.sleep} took {time.monotonic() - began:.2f}s")

    async def _run_wake(self) -> None:
        """Wake the sleeping server; where it does not wake, stop it and start it anew."""
        began = time.monotonic()
        try:
            if self.model.sleep is None:
                raise SleepError("a reload removed its sleep settings")
            await self._call(self.model.sleep.wake, self.model.health_check_timeout)
        except SleepError as e:
            self.log.warn(f"<{self.model.id}> could not wake ({e}); starting it anew")
            await self._terminate(ABORTED_START_GRACE)
            loading = self._new_load()
            self._set_state(STARTING)
            await self._run_start(loading)
            return
        self.ready_since = time.monotonic()
        self.wake_times.append(self.ready_since - began)
        self.log.info(f"<{self.model.id}> awake, woken in {self.wake_times[-1]:.2f}s")
        self._set_state(READY)

    async def _call(self, call: HttpCall, timeout: float) -> None:
        """Send the server one of its sleep calls; SleepError unless it answers 2xx within `timeout`."""
        base = self.model.proxy.rstrip("/")
        try:
            async with upstream_session(self.model.timeouts, base) as session:
                async with session.request(call.method, URL(base + call.path, encoded=True),
                                           timeout=aiohttp.ClientTimeout(total=timeout)) as answer:
                    if answer.status >= 300:
                        said = (await answer.content.read(200)).decode(errors="replace").strip()
                        raise SleepError(f"{call} answered {answer.status}{': ' + said if said else ''}")
        except asyncio.TimeoutError:
            raise SleepError(f"{call} was not answered within {go_duration(timeout)}") from None
        except (aiohttp.ClientError, OSError) as e:
            raise SleepError(f"{call}: {error_text(e)}") from None

    def _say_stop(self, what: str) -> None:
        if because := STOP_REASONS.get(self.stop_reason):  # a TTL stop has the original's own line
            self.log.info(f"<{self.model.id}> {what}: {because}")

    def kill_now(self) -> None:
        """SIGKILL the whole group at once: for a forced exit, where nothing may be left behind."""
        if self._run and self.state != STOPPED:
            signal_group(self._run.proc.pid, signal.SIGKILL)

    async def _run_start(self, loading: asyncio.Task) -> None:
        try:
            await loading
        except asyncio.CancelledError:
            error = StartError("aborted")
        except StartError as e:
            error = self._failed(e)
        except Exception as e:  # whatever went wrong, the client is told and nothing is left behind
            error = self._failed(StartError(f"{type(e).__name__}: {e}"))
        else:
            self.ready_since = time.monotonic()
            self.learnt.loaded(self.model.id, self.ready_since - self.load_began)
            self.log.info(f"<{self.model.id}> ready, loaded in {self.load_times[-1]:.2f}s")
            self._set_state(READY)
            return
        await self._terminate(ABORTED_START_GRACE)
        self._set_state(STOPPED)
        raise error

    def _failed(self, error: StartError) -> StartError:
        """A start that failed (not one a stop aborted): shown with the model until the next attempt."""
        self.failure = {"error": str(error), "at": go_timestamp(time.time())}
        return error

    async def _load(self) -> None:
        await self.groups.settled.wait()  # a killed run's servers may still hold our port or memory
        await self._claim_port()
        if self.model.kv_cache:  # llama-server refuses a --slot-save-path that is not a directory
            await asyncio.to_thread(os.makedirs, self.model.kv_cache.directory, exist_ok=True)
        await self._spawn()
        await self._wait_healthy()
        if self.model.kv_cache:
            await self._restore_slots(self.model.kv_cache)

    async def _restore_slots(self, settings: KvCache) -> None:
        """After a healthy start, before any request: the slots the last run saved, back in. One
        that does not restore is logged and its file dropped; the start goes on."""
        base = self.model.proxy.rstrip("/")
        async with upstream_session(self.model.timeouts, base) as session:
            for slot in await asyncio.to_thread(saved_slots, settings.directory):
                try:
                    done = await asyncio.wait_for(slot_action(session, base, slot, "restore"), settings.save_timeout)
                except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, TypeError) as e:
                    self.log.warn(f"<{self.model.id}> KV cache: slot {slot} did not restore "
                                  f"({error_text(e)}); its file is dropped")
                    with contextlib.suppress(OSError):
                        os.remove(os.path.join(settings.directory, slot_file(slot)))
                    continue
                self._kv_done("restore", done)

    async def _save_slots(self, settings: KvCache) -> None:
        """Before a stop: every slot that holds a conversation saved, within saveTimeout in all. A
        failure or a server too slow is logged and the stop goes on; then the model's files are
        kept within maxDiskMB. A session of its own: the run's may hold connections that
        llama-server has closed after a stream."""
        base = self.model.proxy.rstrip("/")

        async def save_all() -> None:
            async with upstream_session(self.model.timeouts, base) as session:
                for slot in await slots_holding_tokens(session, base):
                    self._kv_done("save", await slot_action(session, base, slot, "save"))
        try:
            await asyncio.wait_for(save_all(), settings.save_timeout)
        except asyncio.TimeoutError:
            self.log.warn(f"<{self.model.id}> KV cache: saving took longer than {settings.save_timeout}s "
                          "(kvCache.saveTimeout); stopping it anyway")
        except (aiohttp.ClientError, ValueError, KeyError, TypeError) as e:
            self.log.warn(f"<{self.model.id}> KV cache: could not save ({error_text(e)}); stopping it anyway")
        removed = await asyncio.to_thread(prune_kv_files, os.path.dirname(settings.directory),
                                          settings.max_disk_mb * MIB)
        if removed:
            self.log.info(f"<{self.model.id}> KV cache: {len(removed)} oldest file(s) removed to stay within "
                          f"{settings.max_disk_mb} MB (kvCache.maxDiskMB)")

    def _kv_done(self, action: str, transfer: SlotTransfer) -> None:
        what = "saved" if action == "save" else "restored"
        self.log.info(f"<{self.model.id}> KV cache: {what} slot {transfer.slot}, {transfer.tokens} tokens, "
                      f"{format_bytes(transfer.size)} in {transfer.ms:.0f} ms")
        self.on_kv(self.model.id, action, transfer)

    async def _claim_port(self) -> None:
        """A server on this machine needs its port free: whatever else answers there would pass
        our health check and be sent the requests. A port being let go of gets a moment."""
        address = loopback_address(self.model.proxy)
        if address is None:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + PORT_RELEASE_WAIT
        while await port_answers(*address):
            if loop.time() >= deadline:
                holder = await asyncio.to_thread(port_holder, address[1])
                raise StartError(f"port {address[1]} is already in use by another process{holder}, "
                                 f"so {self.model.id} cannot start there (proxy {self.model.proxy})")
            await asyncio.sleep(0.1)

    def _environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(entry.split("=", 1) for entry in self.model.env)
        return env

    async def _spawn(self) -> None:
        self._run = None
        argv = split_command(self.model.cmd)
        self.log.debug(f"<{self.model.id}> Executing start command: {' '.join(argv)}, env: {', '.join(self.model.env)}")
        # Output goes to a pipe of our own, not asyncio's: asyncio would not report the exit
        # while a grandchild still holds its stdout.
        read_fd, write_fd = os.pipe()
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=write_fd, stderr=write_fd,
                env=self._environment(), start_new_session=True, preexec_fn=die_with_parent())
        except (OSError, ValueError) as e:
            os.close(read_fd)
            reason = getattr(e, "strerror", None) or e
            raise StartError(f"failed to start command '{masked_command(' '.join(argv))}': {reason}") from None
        finally:
            os.close(write_fd)
        self.groups.add(proc.pid)
        session = upstream_session(self.model.timeouts, self.model.proxy)
        connections = own_connections(self.model.timeouts, self.model.proxy)
        self._run = run = Run(proc, session, connections, self.output.history.written)
        reader = asyncio.StreamReader()
        run.pipe, _ = await asyncio.get_running_loop().connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(read_fd, "rb", 0))
        self._wake.clear()
        run.reader = run.own(self._read_output(reader))
        run.own(self._watch_exit(run))

    async def _read_output(self, reader: asyncio.StreamReader) -> None:
        while chunk := await reader.read(65536):
            self.output.write(chunk)
            if self.state == STARTING:
                before = self.load_progress.value
                self.load_progress.feed(chunk)
                self._say_progress(before)
            self._wake.set()

    def _say_progress(self, before: float | None) -> None:
        """A line when a load's progress is first known, and at each further quarter."""
        now = self.load_progress.value
        if now is None or now >= 1 or (before is not None and int(now * 4) <= int(before * 4)):
            return
        status = self.load_status() or {}
        eta = f", about {math.ceil(status['eta_s'])}s left" if status.get("eta_s") is not None else ""
        self.log.info(f"<{self.model.id}> loading: {now:.0%}{eta}")

    async def _watch_exit(self, run: Run) -> None:
        code = await run.proc.wait()
        self._wake.set()
        if (self.state == READY or self.asleep) and run is self._run:
            while_asleep = " while asleep" if self.state == SLEEPING else ""
            self.log.warn(f"<{self.model.id}> upstream process exited unexpectedly{while_asleep} (exit status {code})")
            self.stop_reason = "crash"
            self._set_state(STOPPED)
            signal_group(run.proc.pid, signal.SIGKILL)  # leftovers of a crashed server still hold memory
            await run.close()
            self.groups.remove(run.proc.pid)

    async def _wait_healthy(self) -> None:
        endpoint = self.model.check_endpoint
        if endpoint.lower() == "none":
            return
        path = URL(endpoint).path_qs if "://" in endpoint else endpoint
        url = URL(self.model.proxy.rstrip("/") + path, encoded=True)
        proc = self._run.proc
        loop = asyncio.get_running_loop()
        began = loop.time()
        deadline = began + self.model.health_check_timeout
        while True:
            if proc.returncode is not None:
                raise StartError(await self._premature_exit_message(proc.returncode))
            remaining = deadline - loop.time()
            self._wake.clear()  # output or an exit during the probe then cuts the pause short
            if await self._probe(url, min(5.0, max(remaining, 0.05))):
                self.log.info(f"<{self.model.id}> Health check passed on {url}")
                return
            if proc.returncode is not None:
                raise StartError(await self._premature_exit_message(proc.returncode))
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise StartError(f"health check timed out after {go_duration(self.model.health_check_timeout)}"
                                 f"{self._output_tail()}")
            pause = min(health_poll_interval(loop.time() - began), remaining)
            # A chatty loader wakes us on every line: probe no more often than MIN_PROBE_GAP then.
            await asyncio.sleep(min(MIN_PROBE_GAP, pause))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(0.0, pause - MIN_PROBE_GAP))

    async def _probe(self, url: URL, timeout: float) -> bool:
        try:
            async with self._run.session.get(url, timeout=aiohttp.ClientTimeout(total=timeout)) as response:
                return response.status == 200
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            return False

    async def _premature_exit_message(self, code: int) -> str:
        # The exit can be seen before the last output is read: give the reader a moment to finish.
        await asyncio.wait({self._run.reader}, timeout=1.0)
        return f"upstream command exited prematurely with exit status {code}{self._output_tail()}"

    def _output_tail(self) -> str:
        """The last lines this run printed, to end a start error with: usually the reason. They
        may echo the command line, so a key in them is masked (the error reaches clients)."""
        lines = self.output.history.tail_lines(START_ERROR_TAIL_LINES, since=self._run.output_mark)
        return ("; last output:\n" + masked_command("\n".join(lines))) if lines else " (it printed nothing)"

    async def _run_stop(self, timeout: float, save: bool) -> None:
        """`save`: the server is awake, so its KV cache can be saved (kvCache)."""
        try:
            if save and self.model.kv_cache and self.stop_reason in KV_SAVED_ON:
                await self._save_slots(self.model.kv_cache)
            await self._terminate(timeout)
        finally:
            self._set_state(STOPPED)

    async def _terminate(self, timeout: float) -> None:
        """Ask the group to stop (cmdStop or SIGTERM); SIGKILL it if it is not gone within `timeout`."""
        run = self._run
        if run is None:
            return
        try:
            await asyncio.wait_for(self._stop_gracefully(run.proc), timeout)
        except asyncio.TimeoutError:
            self.log.info(f"<{self.model.id}> did not stop within {go_duration(timeout)}, "
                          "sending SIGKILL to its process group")
            signal_group(run.proc.pid, signal.SIGKILL)
            await self._group_gone(run.proc)
        await run.close()
        self.groups.remove(run.proc.pid)

    async def _stop_gracefully(self, proc: asyncio.subprocess.Process) -> None:
        if proc.returncode is None or process_group_alive(proc.pid):
            await self._send_stop_signal(proc)
        await self._group_gone(proc)

    async def _send_stop_signal(self, proc: asyncio.subprocess.Process) -> None:
        if not self.model.cmd_stop.strip():
            signal_group(proc.pid, signal.SIGTERM)
            return
        stopper = None
        try:
            argv = split_command(self.model.cmd_stop.replace("${PID}", str(proc.pid)))
            stopper = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL, env=self._environment(), start_new_session=True)
            code = await stopper.wait()
            if code != 0:
                self.log.warn(f"[{self.model.id}] stop signal failed: cmdStop exited with status {code}")
        except (OSError, ValueError) as e:
            self.log.warn(f"[{self.model.id}] stop signal failed: {e}; sending SIGTERM instead")
            signal_group(proc.pid, signal.SIGTERM)
        finally:
            if stopper and stopper.returncode is None:  # out of time: the stop command goes too
                signal_group(stopper.pid, signal.SIGKILL)

    async def _group_gone(self, proc: asyncio.subprocess.Process) -> None:
        await proc.wait()
        pause = 0.01
        while await asyncio.to_thread(process_group_alive, proc.pid):
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.25)


def launch_settings(model: ModelConfig) -> tuple:
    """What a server was started with: while this is unchanged, a reload keeps it running."""
    return model.cmd, tuple(model.env), model.proxy, model.check_endpoint, model.cmd_stop



###############################################################################
# 10. GPUs ####################################################################
###############################################################################

# Everything read through NVML, in one place: memory for the vram router, samples for
# /api/performance and /metrics, the devices for /api/hardware. NVML is opened and closed in
# worker threads, never on the event loop; no NVIDIA GPU (or no driver) means no readings.


@dataclass(frozen=True)
class GpuMemory:
    index: int
    total: int  # bytes
    used: int  # bytes, by anyone


class VramSource(Protocol):
    """Where the vram router reads GPU memory. Calls may block on the driver: make them in a
    worker thread."""

    def memory(self) -> list[GpuMemory]: ...

    def usage(self) -> dict[int, dict[int, int]]: ...  # pid -> GPU index -> bytes

    def close(self) -> None: ...


@dataclass(frozen=True)
class GpuStat:
    """One reading of one GPU. A value the device cannot report is 0, as in Go.

    mem_util_pct is VRAM fill (used / total * 100), not NVML's memory-controller activity:
    that is what Go computes for every source and what the UI shows as "VRAM".
    """

    timestamp: datetime.datetime
    id: int
    name: str
    uuid: str = ""
    temp_c: int = 0
    vram_temp_c: int = 0
    gpu_util_pct: float = 0.0
    mem_util_pct: float = 0.0
    mem_used_mb: int = 0
    mem_total_mb: int = 0
    fan_speed_pct: float = 0.0
    power_draw_w: float = 0.0


class GpuProvider(Protocol):
    """A source of GPU readings. sample() may block on the driver: call it in a worker thread."""

    def sample(self) -> list[GpuStat]: ...

    def close(self) -> None: ...


def init_nvml() -> Any | None:
    """The pynvml module with NVML initialised, or None where the `nvidia-ml-py` package, the
    driver's library or the driver itself is missing. Each success needs one nvmlShutdown()."""
    try:
        import pynvml  # installed with us; a copy of us without it runs as on a machine without GPUs
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except (pynvml.NVMLError, OSError):
        return None
    return pynvml


def shutdown_nvml(nvml: Any) -> None:
    with contextlib.suppress(nvml.NVMLError):
        nvml.nvmlShutdown()


def nvml_read(nvml: Any, query: Callable[..., Any], *args: Any, default: Any = 0) -> Any:
    """One NVML query, or `default` where the device does not support it (NotSupported: a fan on
    a passively cooled card) or the driver refuses; one missing value never loses the sample."""
    try:
        return query(*args)
    except nvml.NVMLError:
        return default


@dataclass(frozen=True)
class NvmlDevice:
    index: int
    handle: Any
    name: str
    uuid: str


# c_nvmlValue_t's union members, indexed by NVML_VALUE_TYPE_* (0 = double ... 6 = unsigned short).
NVML_VALUE_MEMBERS = ("dVal", "uiVal", "ulVal", "ullVal", "sllVal", "siVal", "usVal")

NVML_ARCHITECTURES = {2: "Kepler", 3: "Maxwell", 4: "Pascal", 5: "Volta", 6: "Turing", 7: "Ampere",
                      8: "Ada Lovelace", 9: "Hopper", 10: "Blackwell", 13: "Rubin"}


class Nvml:
    """The one NVML reader: the vram router's memory and usage (a VramSource), the samples of
    /api/performance and /metrics (a GpuProvider), the devices of /api/hardware.

    Devices are listed once (handles, names and UUIDs do not change while the driver is
    loaded), each under NVML's own index: a GPU we may not read is skipped and the others keep
    their numbers, so GPU 1 is the same GPU everywhere. Takes over an initialised NVML (see
    init_nvml) and shuts it down on close(), which waits for a read still under way.
    """

    def __init__(self, nvml: Any):
        self.nvml = nvml
        self._open = True
        self._lock = threading.Lock()
        self.devices: list[NvmlDevice] = []
        for index in range(nvml.nvmlDeviceGetCount()):
            handle = nvml_read(nvml, nvml.nvmlDeviceGetHandleByIndex, index, default=None)
            if handle is None:  # e.g. no permission for this one GPU: show the others
                continue
            name = nvml_read(nvml, nvml.nvmlDeviceGetName, handle, default="")
            uuid = nvml_read(nvml, nvml.nvmlDeviceGetUUID, handle, default="")
            self.devices.append(NvmlDevice(index, handle, name, uuid))

    def _read(self, query: Callable[..., Any], *args: Any, default: Any = 0) -> Any:
        return nvml_read(self.nvml, query, *args, default=default)

    # -- the vram router's view

    def memory(self) -> list[GpuMemory]:
        with self._lock:
            if not self._open:
                return []
            memories = [(d.index, self._read(self.nvml.nvmlDeviceGetMemoryInfo, d.handle, default=None))
                        for d in self.devices]
        return [GpuMemory(i, m.total, m.used) for i, m in memories if m is not None]

    def usage(self) -> dict[int, dict[int, int]]:
        nvml, held = self.nvml, collections.defaultdict(Counter)
        with self._lock:
            for device in self.devices if self._open else ():
                for query in (nvml.nvmlDeviceGetComputeRunningProcesses, nvml.nvmlDeviceGetGraphicsRunningProcesses):
                    for process in self._read(query, device.handle, default=[]):
                        held[process.pid][device.index] += process.usedGpuMemory or 0  # None where the driver hides it
        return {pid: dict(gpus) for pid, gpus in held.items()}

    # -- samples for /api/performance and /metrics

    def sample(self) -> list[GpuStat]:
        timestamp = local_now()
        with self._lock:
            return [self._stat(device, timestamp) for device in self.devices] if self._open else []

    def _stat(self, device: NvmlDevice, timestamp: datetime.datetime) -> GpuStat:
        nvml, handle = self.nvml, device.handle
        memory = self._read(nvml.nvmlDeviceGetMemoryInfo, handle, default=None)
        used_mb, total_mb = (memory.used // MIB, memory.total // MIB) if memory else (0, 0)
        rates = self._read(nvml.nvmlDeviceGetUtilizationRates, handle, default=None)
        return GpuStat(
            timestamp=timestamp,
            id=device.index,
            name=device.name,
            uuid=device.uuid,
            temp_c=int(self._read(nvml.nvmlDeviceGetTemperature, handle, nvml.NVML_TEMPERATURE_GPU)),
            vram_temp_c=self._memory_temperature(handle),
            gpu_util_pct=float(rates.gpu) if rates else 0.0,
            mem_util_pct=used_mb / total_mb * 100 if total_mb else 0.0,
            mem_used_mb=used_mb,
            mem_total_mb=total_mb,
            fan_speed_pct=float(self._read(nvml.nvmlDeviceGetFanSpeed, handle)),
            power_draw_w=self._read(nvml.nvmlDeviceGetPowerUsage, handle) / 1000,  # mW
        )

    def _memory_temperature(self, handle: Any) -> int:
        """NVML's memory-temperature field, which only boards with HBM report (A100, H100, ...);
        GDDR boards answer NotSupported and read 0, as in Go."""
        nvml = self.nvml
        values = self._read(nvml.nvmlDeviceGetFieldValues, handle, [nvml.NVML_FI_DEV_MEMORY_TEMP], default=None)
        # A field query succeeds as a whole even when the field itself is unsupported.
        if not values or values[0].nvmlReturn != nvml.NVML_SUCCESS or values[0].valueType >= len(NVML_VALUE_MEMBERS):
            return 0
        return int(getattr(values[0].value, NVML_VALUE_MEMBERS[values[0].valueType]))

    # -- the devices for /api/hardware

    def accelerators(self) -> list[dict[str, Any]]:
        with self._lock:
            if not self._open:
                return []
            driver = self._read(self.nvml.nvmlSystemGetDriverVersion, default=None)
            return [self._accelerator(device, driver) for device in self.devices]

    def _accelerator(self, device: NvmlDevice, driver: str | None) -> dict[str, Any]:
        nvml, handle = self.nvml, device.handle
        memory = self._read(nvml.nvmlDeviceGetMemoryInfo, handle, default=None)
        power_limit_mw = self._read(nvml.nvmlDeviceGetEnforcedPowerLimit, handle)
        return {
            "index": device.index,
            "kind": "gpu",
            "vendor": "NVIDIA",
            "model": device.name or None,
            "architecture": NVML_ARCHITECTURES.get(self._read(nvml.nvmlDeviceGetArchitecture, handle, default=None)),
            # Unified-memory boards (GB10, Jetson) report no framebuffer: size unknown.
            "memory": {"kind": "dedicated", "capacity_bytes": memory.total if memory and memory.total else None},
            "driver": {"name": "NVIDIA", "version": driver} if driver else None,
            "power_limit_watts": go_float(power_limit_mw / 1000) if power_limit_mw else None,
        }

    def close(self) -> None:
        with self._lock:
            if self._open:
                self._open = False
                shutdown_nvml(self.nvml)


def open_nvml() -> Nvml | None:
    """NVML when a driver and at least one GPU are there, else None (the GPU readings are then
    simply absent). Never raises for a missing package, library, driver or GPU."""
    nvml = init_nvml()
    if nvml is None:
        return None
    try:
        reader = Nvml(nvml)
    except nvml.NVMLError:
        shutdown_nvml(nvml)
        return None
    if not reader.devices:
        reader.close()
        return None
    return reader


def nvml_accelerators() -> list[dict[str, Any]]:
    """The NVIDIA GPUs NVML lists, for a look at the hardware; [] without NVML."""
    reader = open_nvml()
    if reader is None:
        return []
    try:
        return reader.accelerators()
    finally:
        reader.close()


class FakeVram:
    """GPUs described in a JSON file, for tests and for trying the router without a GPU (the
    `LLAMA_SWAP_FAKE_VRAM` environment variable names it): `{"gpus": [{"total": bytes, "used":
    bytes others hold}], "processes": {"<pid>": {"<gpu>": bytes, "until": unix time}}}`. A
    process's memory counts while it lives, and after it died until `until` (a driver that is
    slow to free it), as NVML would show it."""

    def __init__(self, path: str):
        self.path = path

    def _read(self) -> tuple[list[dict], dict[int, dict[int, int]], dict[int, dict[int, int]]]:
        """The GPUs, the memory of live processes, and of dead ones not yet freed."""
        try:
            with open(self.path) as f:
                state = json.load(f)
            gpus, processes = list(state.get("gpus", [])), dict(state.get("processes", {}))
        except (OSError, ValueError, AttributeError, TypeError):
            return [], {}, {}
        live, lingering = {}, {}
        for pid, held in processes.items():
            with contextlib.suppress(ValueError, TypeError, AttributeError):  # an entry we cannot read
                gpu_bytes = {int(gpu): int(size) for gpu, size in held.items() if gpu != "until"}
                if pid_alive(int(pid)):
                    live[int(pid)] = gpu_bytes
                elif float(held.get("until", 0)) > time.time():
                    lingering[int(pid)] = gpu_bytes
        return gpus, live, lingering

    def memory(self) -> list[GpuMemory]:
        gpus, live, lingering = self._read()
        held = Counter()
        for gpu_bytes in itertools.chain(live.values(), lingering.values()):
            held.update(gpu_bytes)
        return [GpuMemory(i, int(g.get("total", 0)), int(g.get("used", 0)) + held[i]) for i, g in enumerate(gpus)]

    def usage(self) -> dict[int, dict[int, int]]:
        return self._read()[1]

    def close(self) -> None:
        pass


def open_vram_source() -> VramSource | None:
    """The fake GPUs when LLAMA_SWAP_FAKE_VRAM names a file, else NVML; None without a GPU."""
    if path := os.environ.get("LLAMA_SWAP_FAKE_VRAM"):
        return FakeVram(path)
    return open_nvml()


###############################################################################
# 11. Swap policy #############################################################
###############################################################################

# Which running models must stop so that a target may run, as pure functions of plain data:
# groups, the matrix's cheapest set of evictions, or (the vram router) what must go for the
# target to fit in the GPUs' free memory. A model that can sleep (`sleep`) sleeps instead of
# stopping; a sleeping one is not running for groups and the matrix, while the vram router
# counts what it still holds and stops sleeping models first when room is short.


class SwapPolicy:
    """Which running models must stop so that a target may run. `running` lists the models that
    are awake (hold or are about to hold resources), cheapest to stop first (idle before busy,
    least recently used first); `asleep` the sleeping ones, least recently used first."""

    name = ""

    def evictions(self, target: str, running: Sequence[str], asleep: Sequence[str] = ()) -> frozenset[str]:
        """The models that must make room: sleep where they can, else stop."""
        raise NotImplementedError

    def sleepers(self, target: str, running: Sequence[str], asleep: Sequence[str], evict: frozenset[str],
                 can_sleep: Callable[[str], bool]) -> frozenset[str]:
        """Which of `evict` go to sleep rather than stop: each awake one that can."""
        return frozenset(m for m in evict if m in running and can_sleep(m))

    def reasons(self, target: str, running: Sequence[str], asleep: Sequence[str],
                evict: frozenset[str]) -> dict[str, str]:
        """Why each of `evict` must make room for the target, in words."""
        return {m: f"the {self.name} router" for m in evict}

    def explain(self, target: str, running: Sequence[str], asleep: Sequence[str] = ()) -> str:
        """A log line about the swap about to happen; "" for none."""
        return ""

    async def before_start(self, target: str, still_wanted: Callable[[], bool]) -> None:
        """Once the evicted models are stopped, before the target starts (while still wanted)."""


class GroupPolicy(SwapPolicy):
    """Groups: a pure function of plain data."""

    name = "group"

    def __init__(self, groups: Iterable[Group]):
        self.group_of = {member: group for group in groups for member in group.members}

    def evictions(self, target: str, running: Sequence[str], asleep: Sequence[str] = ()) -> frozenset[str]:
        group = self.group_of[target]
        evict = set()
        for model in running:
            if model == target:
                continue
            other = self.group_of.get(model)  # None: removed by a reload and on its way out
            if other is None or (other is group and group.swap) or \
                    (other is not group and group.exclusive and not other.persistent):
                evict.add(model)
        return frozenset(evict)

    def reasons(self, target: str, running: Sequence[str], asleep: Sequence[str],
                evict: frozenset[str]) -> dict[str, str]:
        group = self.group_of[target]
        said = {}
        for model in evict:
            other = self.group_of.get(model)
            said[model] = ("removed from the config" if other is None else
                           "one model at a time (no groups configured)" if group.name == DEFAULT_GROUP else
                           f"group {group.name} runs one member at a time" if other is group else
                           f"group {group.name} is exclusive")
        return said


class MatrixPolicy(SwapPolicy):
    """The matrix router's rule: keep the allowed set that is cheapest to reach.

    Every set the DSL allows that contains the target is a candidate; its cost is what it would
    evict (evict_costs, default 1 per model). The cheapest wins, the first defined on a tie. A
    model in no set runs alone.
    """

    name = "matrix"

    def __init__(self, matrix: Matrix):
        self.matrix = matrix

    def choose(self, target: str, running: frozenset[str]) -> tuple[str, frozenset[str], int] | None:
        """(set name, models it allows, eviction cost) of the cheapest allowed set holding the target."""
        best = None
        for name, combos in self.matrix.combinations.items():
            for combo in combos:
                if target in combo:
                    cost = sum(self.matrix.evict_costs.get(m, 1) for m in running - combo)
                    if best is None or cost < best[2]:
                        best = (name, combo, cost)
        return best

    def evictions(self, target: str, running: Sequence[str], asleep: Sequence[str] = ()) -> frozenset[str]:
        running = frozenset(running)
        if target in running:
            return frozenset()
        choice = self.choose(target, running)
        return running - choice[1] if choice else running

    def reasons(self, target: str, running: Sequence[str], asleep: Sequence[str],
                evict: frozenset[str]) -> dict[str, str]:
        choice = self.choose(target, frozenset(running) - {target})
        if choice is None:
            return {m: f"matrix: {target} is in no set, so it runs alone" for m in evict}
        name, _combo, cost = choice
        return {m: f"matrix set {name} ({self.matrix.sets[name]}, cost {cost}) leaves it out" for m in evict}

    def explain(self, target: str, running: Sequence[str], asleep: Sequence[str] = ()) -> str:
        """The one info line per real swap."""
        running = frozenset(running) - {target}
        if not running:
            return f"matrix: model={target} starting (no models running)"
        choice = self.choose(target, running)
        if choice is None:
            return f"matrix: model={target} is in no set, runs alone: evict=[{' '.join(sorted(running))}]"
        name, combo, cost = choice
        if not running - combo:
            return ""  # joins what runs, stops nothing: not a swap worth a line
        return (f'matrix: model={target} set={name} dsl="{self.matrix.sets[name]}" '
                f"evict=[{' '.join(sorted(running - combo))}] target=[{' '.join(sorted(combo))}] cost={cost}")


# -- the vram router: models load while they fit ------------------------------

def spread(sizes: Mapping[int | None, int], gpus: Iterable[int]) -> dict[int, int]:
    """Per-GPU bytes from a config size: a size for all GPUs (key None) is split evenly."""
    gpus = list(gpus)
    per_gpu = {gpu: size for gpu, size in sizes.items() if gpu is not None}
    if None in sizes and gpus:
        for gpu in gpus:
            per_gpu[gpu] = per_gpu.get(gpu, 0) + sizes[None] // len(gpus)
    return per_gpu


Footprint = Mapping[int, int]  # GPU -> bytes


def footprint_text(footprint: Footprint) -> str:
    return " ".join(f"{gpu}:{format_bytes(size)}" for gpu, size in sorted(footprint.items()))


def vram_plan(need: Footprint | None, running: Sequence[tuple[str, Footprint | None, Footprint | None]],
              budget: Mapping[int, int], asleep: Sequence[tuple[str, Footprint]] = ()
              ) -> tuple[frozenset[str], frozenset[str]]:
    """Which models to put to sleep and which to stop, (sleep, stop), so that a model needing
    `need` (bytes per GPU) fits every GPU's budget. `running`: (model, footprint, what it keeps
    asleep or None if it cannot sleep), cheapest to stop first; `asleep`: (model, what it keeps).
    Sleeping models stop first, then the running ones, in order, sleep (or stop) while a GPU they
    hold memory on is still short of room; if that is not enough, those just put to sleep stop
    too. A footprint not known (None), a GPU not there, or no GPU known at all fits nowhere:
    then the model runs alone, as in a group."""
    if need is None or not budget or any(size and gpu not in budget for gpu, size in need.items()):
        return frozenset(), frozenset(name for name, *_ in running) | frozenset(name for name, _ in asleep)
    held = {name: dict(footprint) for name, footprint in asleep}
    held.update((name, dict(footprint)) for name, footprint, _ in running if footprint is not None)
    sleep, stop = set(), {name for name, footprint, _ in running if footprint is None}

    def holds_short_gpu(name: str) -> bool:
        short = {gpu for gpu, free in budget.items()
                 if need.get(gpu, 0) + sum(h.get(gpu, 0) for h in held.values()) > free}
        return any(held[name].get(gpu, 0) for gpu in short)

    order = [(name, None) for name, _ in asleep] + [(name, kept) for name, fp, kept in running if fp is not None]
    for name, kept in order:
        if holds_short_gpu(name):
            if kept is None:
                stop.add(name)
                del held[name]
            else:
                sleep.add(name)
                held[name] = dict(kept)
    for name in [name for name, _ in order if name in sleep]:
        if holds_short_gpu(name):  # sleeping is not enough: it stops too
            sleep.remove(name)
            stop.add(name)
            del held[name]
    return frozenset(sleep), frozenset(stop)


@dataclass
class VramReading:
    """One look at the GPUs: devices, and what each of our running models' groups holds."""

    gpus: dict[int, GpuMemory]
    held: dict[str, dict[int, int]]  # model -> GPU -> bytes


RELEASE_SLACK = 256 * 1024**2  # bytes others' use may drift while we wait for memory to be freed
VRAM_READ_TIMEOUT = 5.0  # seconds a reading of the GPUs may take


def largest(a: Mapping[int, int], b: Mapping[int, int]) -> dict[int, int]:
    """Per GPU, the larger of two footprints."""
    return {gpu: max(a.get(gpu, 0), b.get(gpu, 0)) for gpu in {*a, *b}}


class VramBook:
    """What the vram router knows: each GPU's size and what others hold of it, and each model's
    footprint per GPU, measured from the memory its process group holds while it runs (the
    largest seen in its latest run; kept after it stops), else its `vram` hint."""

    def __init__(self, source: VramSource | None, reserve: Mapping[int | None, int],
                 hints: Mapping[str, Mapping[int | None, int]], release_wait: float = 30.0,
                 learnt: Learnt | None = None):
        self.source = source
        self.reserve = dict(reserve)
        self.hints = dict(hints)
        self.release_wait = release_wait  # seconds a stopped server's memory may take to show free
        self.gpus: dict[int, GpuMemory] = {}
        self.others: dict[int, int] = {}  # GPU -> bytes held by processes not ours
        self.learnt = learnt or Learnt()  # where each model's measure is kept: the peak of a run once ready
        self.peaks: dict[str, dict[int, int]] = {}  # the largest reading of each model's latest run
        self.runs: dict[str, int] = {}  # model -> the process group of its latest run
        self.starting: set[str] = set()  # models still loading at the latest reading
        self.asleep: set[str] = set()  # models sleeping at the latest reading
        self.sleepers: frozenset[str] = frozenset()  # models that can sleep (sleep: its calls)
        self.last_stop = -math.inf  # when a server of ours last stopped (monotonic)

    @classmethod
    def of(cls, config: Config, learnt: Learnt | None = None) -> VramBook:
        book = cls(None, {}, {}, learnt=learnt)
        book.configure(config)
        return book

    def configure(self, config: Config) -> None:
        """The settings of a (re)loaded config; what was measured is kept."""
        self.reserve = dict(config.routing.vram_reserve)
        self.hints = {m: c.vram for m, c in config.models.items()}
        self.release_wait = config.routing.vram_release_wait
        self.sleepers = frozenset(m for m, c in config.models.items() if c.sleep)

    @property
    def measured(self) -> Mapping[str, dict[int, int]]:
        return self.learnt.vram

    def stopped(self) -> None:
        """A server of ours stopped: for a while, memory it leaves behind is not counted as others'."""
        self.last_stop = time.monotonic()

    def need(self, model: str) -> dict[int, int] | None:
        """Bytes per GPU: as measured, else as hinted; while it loads, at least what it holds."""
        known = self.measured.get(model) or (spread(self.hints[model], self.gpus) if self.hints.get(model) else None)
        if model in self.starting and model in self.peaks:  # a loading server holds less than it will
            return largest(known or {}, self.peaks[model]) if known is not None else None
        return known

    def kept_asleep(self, model: str) -> dict[int, int]:
        """Bytes per GPU the model's server keeps while it sleeps, as measured (none before its
        first sleep was seen)."""
        return self.learnt.vram_asleep.get(model, {})

    def forget(self, model: str) -> None:
        """Its launch settings changed (a reload): what was measured no longer holds."""
        self.learnt.forget_vram(model)
        for known in (self.peaks, self.runs):
            known.pop(model, None)

    def budget(self) -> dict[int, int]:
        """Bytes per GPU our models may hold: its size, less the reserve and what others hold."""
        reserve = spread(self.reserve, self.gpus)
        return {i: max(0, g.total - reserve.get(i, 0) - self.others.get(i, 0)) for i, g in self.gpus.items()}

    def read(self, groups: Mapping[str, int]) -> VramReading | None:
        """Blocking: the GPUs now and what each running model's group (model -> pgid) holds."""
        source = self.source  # the event loop may close and drop it meanwhile
        if source is None:
            return None
        devices, usage = source.memory(), source.usage()
        model_of = {pgid: model for model, pgid in groups.items()}
        held = {model: Counter() for model in groups}
        for pid, gpu_bytes in usage.items():
            with contextlib.suppress(OSError):  # gone since, or not ours to see
                if (model := model_of.get(os.getpgid(pid))) is not None:
                    held[model].update(gpu_bytes)
        return VramReading({d.index: d for d in devices}, {m: dict(c) for m, c in held.items()})

    def apply(self, reading: VramReading, groups: Mapping[str, int], starting: Iterable[str],
              asleep: Iterable[str] = ()) -> None:
        """Take a reading in (on the event loop, so decisions never see half of one). A run's
        peak becomes the model's measurement once it is ready: a loading server has not yet
        allocated all it will. What a sleeping server holds is what it keeps asleep."""
        self.gpus, self.starting, self.asleep = reading.gpus, set(starting), set(asleep)
        ours = Counter()
        for model, held in reading.held.items():
            ours.update(held)
            if model in self.asleep:
                self.learnt.measured_asleep(model, held)
                continue
            if not held:
                continue  # nothing measurable (yet): keep what is known
            if self.runs.get(model) != groups[model]:  # a new run
                self.peaks[model], self.runs[model] = {}, groups[model]
            self.peaks[model] = largest(self.peaks[model], held)
            if model not in self.starting:
                self.learnt.measured(model, self.peaks[model])
        others = {i: max(0, g.used - ours[i]) for i, g in self.gpus.items()}
        if time.monotonic() - self.last_stop < self.release_wait:  # a rise may be our stopped server's memory
            others = {i: min(used, self.others.get(i, used)) for i, used in others.items()}
        self.others = others

    async def reading(self, groups: Mapping[str, int]) -> VramReading | None:
        """A reading, or None without a source or when the driver does not answer in time (a
        hung GPU must not hang the swaps)."""
        try:
            return await asyncio.wait_for(asyncio.to_thread(self.read, groups), VRAM_READ_TIMEOUT)
        except asyncio.TimeoutError:
            return None

    async def refresh(self, groups: Mapping[str, int], starting: Iterable[str],
                      asleep: Callable[[], Iterable[str]] = tuple) -> None:
        """`asleep`: the models sleeping once the reading is in (a wake meanwhile is no sleep)."""
        if (reading := await self.reading(groups)) is not None:
            self.apply(reading, groups, starting, asleep())

    async def wait_free(self, need: Mapping[int, int] | None, timeout: float, groups: Callable[[], Mapping[str, int]],
                        still_wanted: Callable[[], bool]) -> bool:
        """Until the GPUs show `need` free beyond the reserve, or (`need` not known, or more than
        a GPU could ever give) until they hold no more than our running models and what others
        held before our last stop; at most `timeout` seconds, and only while the start is still
        wanted. Whether it came free."""
        deadline = time.monotonic() + timeout
        while still_wanted():
            reading = await self.reading(groups())
            if reading is None:
                return True
            reserve = spread(self.reserve, reading.gpus)
            if need is not None and all(need.get(i, 0) <= g.total - reserve.get(i, 0) for i, g in reading.gpus.items()):
                free = all(g.total - g.used - reserve.get(i, 0) >= need.get(i, 0) for i, g in reading.gpus.items())
            else:
                ours = Counter()
                for held in reading.held.values():
                    ours.update(held)
                free = all(g.used - ours[i] <= self.others.get(i, 0) + RELEASE_SLACK for i, g in reading.gpus.items())
            if free:
                return True
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.25)
        return True


class VramPolicy(SwapPolicy):
    """The vram router (ours): a model loads while it fits each GPU's budget; otherwise the
    idle models least recently used are stopped until it does (a busy one only if that is not
    enough, and then the scheduler waits for it to finish). Footprints are measured, not
    guessed; a model never measured and without a `vram` hint runs alone."""

    name = "vram"

    def __init__(self, book: VramBook, groups: Callable[[], Mapping[str, int]], log: ProxyLog):
        self.book = book
        self.groups = groups  # model -> process group of every running model
        self.log = log

    def plan(self, target: str, running: Sequence[str], asleep: Sequence[str]) -> tuple[frozenset[str], frozenset[str]]:
        """(sleep, stop): see vram_plan. A sleeping target's own memory counts as its own."""
        if target in running:
            return frozenset(), frozenset()
        book = self.book
        awake = [(m, book.need(m), book.kept_asleep(m) if m in book.sleepers else None) for m in running]
        sleeping = [(m, book.kept_asleep(m)) for m in asleep if m != target]
        return vram_plan(book.need(target), awake, book.budget(), sleeping)

    def evictions(self, target: str, running: Sequence[str], asleep: Sequence[str] = ()) -> frozenset[str]:
        sleep, stop = self.plan(target, running, asleep)
        return sleep | stop

    def sleepers(self, target: str, running: Sequence[str], asleep: Sequence[str], evict: frozenset[str],
                 can_sleep: Callable[[str], bool]) -> frozenset[str]:
        return self.plan(target, running, asleep)[0] & evict

    def reasons(self, target: str, running: Sequence[str], asleep: Sequence[str],
                evict: frozenset[str]) -> dict[str, str]:
        need, budget = self.book.need(target), self.book.budget()
        if need is None:
            return {m: f"vram: {target} has no measured or hinted size, so it runs alone" for m in evict}
        said = {}
        for model in evict:
            held = self.book.kept_asleep(model) if model in asleep else self.book.need(model)
            said[model] = f"vram: {target} needs [{footprint_text(need)}] of budget [{footprint_text(budget)}], " \
                          f"{model} holds [{footprint_text(held) if held else 'unknown'}]"
        return said

    def explain(self, target: str, running: Sequence[str], asleep: Sequence[str] = ()) -> str:
        """Called once the swap is decided, when the target counts as running: left out here."""
        others = [m for m in running if m != target]
        need = self.book.need(target)
        needs = footprint_text(need) if need else "unknown"
        sleep, stop = self.plan(target, others, asleep)
        line = f"vram: model={target} needs [{needs}] evict=[{' '.join(m for m in [*asleep, *others] if m in stop)}]"
        return line + (f" sleep=[{' '.join(m for m in others if m in sleep)}]" if sleep else "")

    async def before_start(self, target: str, still_wanted: Callable[[], bool]) -> None:
        """Wait until the GPUs show room for the target, or (its need not known) until the memory
        of the models just stopped shows free: a driver can take seconds to free it."""
        if self.book.source is None or not self.book.gpus:
            return
        need = self.book.need(target)
        if need is not None and target in self.book.asleep:  # what it keeps asleep is its own already
            kept = self.book.kept_asleep(target)
            need = {gpu: max(0, size - kept.get(gpu, 0)) for gpu, size in need.items()}
        wait = self.book.release_wait
        if not await self.book.wait_free(need, wait, self.groups, still_wanted):
            self.log.warn(f"vram: memory for {target} still not free after {go_duration(wait)}; starting it anyway")


def swap_policy(config: Config) -> GroupPolicy | MatrixPolicy:
    """The rule-based routers; the vram router needs the Server's book of measurements."""
    if config.routing.router is Router.MATRIX:
        return MatrixPolicy(config.routing.matrix)
    return GroupPolicy(config.routing.groups)


###############################################################################
# 12. Scheduler ###############################################################
###############################################################################

# The one owner of swap decisions. Requests ask for a model; the scheduler grants it at once,
# lets it join a start in progress, or queues it and decides a swap. Decisions are synchronous
# methods (no await inside one); the slow work (starting, stopping) runs in owned tasks that
# report back through pump().


class SchedulerError(Exception):
    """A request could not be served by its model; the text goes into the 500 envelope."""


class ConcurrencyLimited(SchedulerError):
    """The model already has `concurrencyLimit` requests queued, waiting or being served."""


class Unavailable(SchedulerError):
    """A request not served now, answered with 503 and a Retry-After of `retry_after` seconds."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class QueueTimeout(Unavailable):
    """A request waited `queueTimeoutMs` for its model without getting it."""


class NotResident(Unavailable):
    """A key with `swap: resident` asked for a model that is not ready now."""


class Ticket:
    """One request waiting for its model. Its future is resolved by a grant or an error. `why`
    names the request (`POST /v1/chat/completions from 10.0.0.7`, `preload`), for the log line
    of a start it causes; `key` the name of its API key ("" for none), `swap` what that key's
    requests may do to the models that run."""

    __slots__ = ("model", "priority", "why", "future", "since", "key", "swap", "caused")

    def __init__(self, model: str, priority: int = 0, why: str = "a request", since: float | None = None,
                 key: str = "", swap: SwapRight = SwapRight.EVICT,
                 caused: Callable[[SwapRecord], None] = lambda record: None):
        self.model = model
        self.priority = priority
        self.why = why
        self.future: asyncio.Future = asyncio.get_running_loop().create_future()
        self.since = time.monotonic() if since is None else since
        self.key = key
        self.swap = swap
        self.caused = caused  # told of the swap this request causes

    def waiting(self) -> bool:
        return not self.future.done()


@dataclass
class Decision:
    """What the scheduler would do with a request now: refuse it, make it wait, grant it, let it
    join a start under way, or swap (stop `evict`, putting `sleep` to sleep instead, for `reasons`)."""

    action: Literal["refuse", "wait", "grant", "join", "swap"]
    why: str = ""  # for a refusal or a wait, in words
    error: SchedulerError | None = None
    evict: frozenset[str] = frozenset()
    sleep: frozenset[str] = frozenset()
    reasons: dict[str, str] = field(default_factory=dict)  # evicted model -> why it must make room
    hold: float = 0.0  # seconds a wait for models in steady use lasts


@dataclass
class SwapRecord:
    """One decision that started, woke or stopped models, as GET /api/swaps and the `swap`
    event show it. `stops`: model -> (stop | sleep, why)."""

    id: int
    time: float  # unix seconds
    kind: str  # swap, ttl, unload, reload
    model: str  # started or woken; "" where models only stop
    wake: bool
    stops: dict[str, tuple[str, str]]
    key: str = ""  # the name of the API key of the request that caused it
    request: str = ""  # the request that caused it
    expected_s: float | None = None  # its load (or wake) time, from past ones
    duration_s: float | None = None
    result: str = "pending"  # pending, ok, failed: <why>, abandoned

    def as_json(self) -> dict[str, Any]:
        return {"id": self.id, "time": go_timestamp(self.time), "kind": self.kind, "model": self.model,
                "action": "wake" if self.wake else "start" if self.model else "stop",
                "stops": [{"model": m, "action": action, "why": why} for m, (action, why) in self.stops.items()],
                "key": self.key, "request": self.request, "expected_s": self.expected_s,
                "duration_s": self.duration_s, "result": self.result}


@dataclass
class Swap:
    """A swap in progress: stop `evict` (those in `sleep` sleep instead), then start (or wake)
    `target`, then grant its waiters."""

    target: str
    evict: frozenset[str]
    waiters: list[Ticket]
    sleep: frozenset[str] = frozenset()
    task: asyncio.Task | None = None
    record: SwapRecord | None = None  # what /api/swaps and the swap event say of it
    abandoned: bool = False  # unloaded, removed or shut down meanwhile: do not start the target


def making_room(record: SwapRecord) -> str:
    """The middle of a swap's log line: what it puts to sleep and stops, and why."""
    sleep = sorted(m for m, (action, _) in record.stops.items() if action == "sleep")
    stop = sorted(m for m, (action, _) in record.stops.items() if action == "stop")
    parts = [f"{verb} {', '.join(models)}" for verb, models in (("putting", sleep), ("stopping", stop)) if models]
    if sleep:
        parts[0] += " to sleep"
    why = "; ".join(f"{m}: {reason}" for m, (_, reason) in record.stops.items() if reason)
    return (f", {' and '.join(parts)} to make room" + (f" ({why})" if why else "")) if parts else ""


def expected(record: SwapRecord) -> str:
    if record.expected_s is None:
        return ""
    return f"; {'a wake' if record.wake else 'a load'} takes about {record.expected_s:.1f}s"


class Scheduler:
    """The one owner of swap state.

    Decisions are synchronous methods, so nothing interleaves with them; the slow work (stopping
    and starting servers) runs in owned Swap tasks that report back through `_finish_swap`.
    Requests for a ready model go straight through; requests for a model being started join
    that start; anything that would stop a model still serving requests waits in the queue,
    which is re-read in order whenever something changes, so A B A B arriving cold run A A B B.

    Against thrashing (agents alternating two models): a swap waits while a model it would stop
    was loaded less than `min_residency` ago, or is in steady use: asked for more often than its
    swap cost (its load time), and idle for less than its usual gap between requests, so it is
    likely wanted again before a reload would pay off. No request is kept waiting that way past `max_wait`: a
    request queued that long stops new requests from being given to the models it needs
    stopped, so they drain and it gets its turn.
    """

    def __init__(self, processes: dict[str, ModelProcess], policy: SwapPolicy, log: ProxyLog,
                 priority: Mapping[str, int] | None = None, max_wait: float = 10.0, min_residency: float = 0.0,
                 queue_timeout: float = 0.0,
                 on_grant: Callable[[str, float, str], None] = lambda model, waited, key: None,
                 on_refuse: Callable[[str], None] = lambda model: None,
                 on_swap: Callable[[SwapRecord], None] = lambda record: None,
                 on_count: Callable[[str, int, int], None] = lambda model, serving, waiting: None,
                 new_process: Callable[[ModelConfig], ModelProcess] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.processes = processes  # changed here alone: models come with configure(), go when retired
        self.models = {m: p.model for m, p in processes.items()}  # the config's models, retiring ones not among them
        self.new_process = new_process
        self.clock = clock  # monotonic seconds; tests drive their own
        self.policy = policy
        self.priority = dict(priority or {})  # model -> fifo priority; higher is served first
        self.max_wait, self.min_residency = max_wait, min_residency
        self.queue_timeout = queue_timeout  # seconds a request may wait in all (0: forever)
        self.arrivals: dict[str, collections.deque[float]] = {}  # model -> its last requests' arrival times
        self.wake: asyncio.TimerHandle | None = None  # the pump after a held swap's wait
        self.log = log
        self.reserved: Counter[str] = Counter()  # admitted and not finished: queued, waiting or served
        self.in_flight: Counter[str] = Counter()  # being served: such a model is never stopped
        self.last_use: dict[str, float] = {}  # when a request for the model last began or ended
        self.stops: set[asyncio.Task] = set()  # TTL unloads
        self.swaps: dict[str, Swap] = {}
        self.queue: list[Ticket] = []
        self.closed_reason = ""
        self.draining: dict[str, ModelConfig | None] = {}  # model -> config it gets once stopped (None: removed)
        self.retiring: dict[str, asyncio.Task] = {}
        self.unloads: set[asyncio.Task] = set()
        self.ttl_task: asyncio.Task | None = None
        # What the metrics hear of: a grant with its wait in seconds, a request refused with 429;
        # and each swap decision, when it is made and when it is done. The timeline hears of
        # each change of a model's requests being served and waiting.
        self.on_grant, self.on_refuse, self.on_swap, self.on_count = on_grant, on_refuse, on_swap, on_count
        self.swap_ids = itertools.count(1)

    # -- a request's way in: admitted, a ticket, granted (it awaits only its ticket) ----------

    @contextlib.asynccontextmanager
    async def lease(self, model: str, why: str = "a request", key: ApiKey | None = None,
                    watch: Callable[[Ticket], None] | None = None) -> AsyncIterator[ModelProcess]:
        """The model's process, ready and counted as serving until the block ends. `watch` is
        handed the request's ticket (its place in the queue, the swap it causes)."""
        with self.admitted(model):
            ticket = self.ticket(model, why, key)
            if watch is not None:
                watch(ticket)
            async with self.granted(ticket) as process:
                yield process

    @contextlib.contextmanager
    def admitted(self, model: str) -> Iterator[None]:
        """Admission, before anything else (and before any stream): a model that already has
        `concurrencyLimit` requests queued, waiting or served refuses this one (ConcurrencyLimited)."""
        if self.closed_reason:
            raise SchedulerError(self.closed_reason)
        if model in self.processes and self.reserved[model] >= self.processes[model].model.concurrency_limit:
            self.on_refuse(model)
            raise ConcurrencyLimited("Too many requests")
        self.reserved[model] += 1
        self.arrivals.setdefault(model, collections.deque(maxlen=9)).append(self.clock())
        self._counted(model)
        try:
            yield
        finally:
            self.reserved[model] -= 1
            self._counted(model)

    def _counted(self, model: str) -> None:
        self.on_count(model, self.in_flight[model], self.reserved[model] - self.in_flight[model])

    def ticket(self, model: str, why: str = "a request", key: ApiKey | None = None) -> Ticket:
        """A request's place in line: the model's priority plus its key's."""
        ticket = Ticket(model, self.priority.get(model, 0), why, self.clock())
        if key is not None:
            ticket.priority += key.priority
            ticket.key, ticket.swap = key.name, key.swap
        return ticket

    @contextlib.asynccontextmanager
    async def granted(self, ticket: Ticket) -> AsyncIterator[ModelProcess]:
        """The ticket's model, ready and counted as serving until the block ends."""
        await self._acquire(ticket)
        try:
            yield self.processes[ticket.model]
        finally:
            self._release(ticket.model)

    async def _acquire(self, ticket: Ticket) -> None:
        if not self._place(ticket):
            self._enqueue(ticket)
        try:
            if ticket.future.done() or not self.queue_timeout:  # granted (or refused) at once: no timer
                await ticket.future
            else:
                await asyncio.wait_for(asyncio.shield(ticket.future), self.queue_timeout)
        except asyncio.TimeoutError:
            self._withdraw(ticket)
            raise QueueTimeout(f"{ticket.model} was not ready for this request within "
                               f"{go_duration(self.queue_timeout)} (queueTimeoutMs); it may still be loading: "
                               "try again", self.retry_after(ticket.model)) from None
        except asyncio.CancelledError:
            self._withdraw(ticket)
            raise

    # -- decisions: synchronous, so nothing interleaves with one --------------

    def _enqueue(self, ticket: Ticket) -> None:
        """Behind every queued request of the same or higher priority."""
        at = next((i for i, t in enumerate(self.queue) if t.priority < ticket.priority), len(self.queue))
        self.queue.insert(at, ticket)

    def position(self, ticket: Ticket) -> int:
        """1-based place of a waiting request in the queue; 0 once it is no longer queued."""
        return self.queue.index(ticket) + 1 if ticket in self.queue else 0

    def _release(self, model: str) -> None:
        self.in_flight[model] -= 1
        self.last_use[model] = self.clock()
        self._counted(model)
        if self.in_flight[model] == 0:
            self.pump()

    def _withdraw(self, ticket: Ticket) -> None:
        """The client went away: forget its ticket; give back a grant it can no longer use."""
        if ticket.future.done() and not ticket.future.cancelled() and ticket.future.exception() is None:
            self._release(ticket.model)
        if ticket in self.queue:
            self.queue.remove(ticket)
            self.pump()  # it may have held newer requests back (max_wait)
        swap = self.swaps.get(ticket.model)
        if swap and ticket in swap.waiters:
            swap.waiters.remove(ticket)

    def running(self) -> list[str]:
        """Models that hold or are about to hold resources (awake processes and swap targets),
        cheapest to stop first: idle before busy, least recently used first, protected last."""
        models = {m for m, p in self.processes.items() if p.state not in (STOPPED, SLEEPING)} | set(self.swaps)
        return sorted(models, key=lambda m: (self._protected(m), self.in_flight[m] > 0 or m in self.swaps,
                                             self.last_use.get(m, 0.0)))

    def _protected(self, model: str) -> bool:
        return model in self.processes and self.processes[model].model.protected

    def retry_after(self, model: str) -> int:
        """Seconds a client refused for now might wait before it tries again: the model's usual
        load time, else 10."""
        loads = self.processes[model].load_times if model in self.processes else ()
        return max(1, math.ceil(statistics.median_high(loads))) if loads else 10

    def asleep(self) -> list[str]:
        """Sleeping models not being woken, least recently used first."""
        models = [m for m, p in self.processes.items() if p.state == SLEEPING and m not in self.swaps]
        return sorted(models, key=lambda m: self.last_use.get(m, 0.0))

    def _can_sleep(self, model: str) -> bool:
        return self.processes[model].model.sleep is not None

    def pump(self) -> None:
        """Re-read the queue front to back after anything changed."""
        self._retire_idle()
        queue, self.queue = self.queue, []
        for ticket in queue:
            if ticket.waiting() and not self._place(ticket):
                self.queue.append(ticket)
        self.queue = [t for t in self.queue if t.waiting()]

    def _pump_in(self, delay: float) -> None:
        """Re-read the queue in `delay` seconds, when a held swap's wait is over (the earliest
        of such moments wins)."""
        loop = asyncio.get_running_loop()
        if self.wake is None or loop.time() + delay < self.wake.when():
            if self.wake:
                self.wake.cancel()
            self.wake = loop.call_later(delay, self._woken)

    def _place(self, ticket: Ticket) -> bool:
        """Grant, join a swap or start one; False means it must wait in the queue."""
        decision = self.decide(ticket)
        if decision.action == "refuse":
            ticket.future.set_exception(decision.error)
        elif decision.action == "grant":
            self._grant(ticket)
        elif decision.action == "join":
            self.swaps[ticket.model].waiters.append(ticket)
        elif decision.action == "swap":
            self._begin_swap(ticket, decision)
        else:
            if decision.hold:
                self._pump_in(decision.hold)
            return False
        return True

    def decide(self, ticket: Ticket) -> Decision:
        """What serving this request would take now; changes nothing (so /api/plan asks it too)."""
        model = ticket.model
        if (refusal := self._refusal(ticket)) is not None:
            return Decision("refuse", str(refusal), refusal)
        if self._wanted_gone(ticket):  # even a start under way takes no more: the bound is kept
            return Decision("wait", f"a request that waited {go_duration(self.max_wait)} needs {model} stopped; "
                                    "it finishes what it serves first")
        if model in self.swaps and not self.swaps[model].abandoned:
            return Decision("join", "its start is under way")
        if model in self.swaps or model in self.draining or self._port_still_held(model):
            return Decision("wait", "its server restarts with new settings once the old one is gone")
        running, asleep = self.running(), self.asleep()
        evict = self.policy.evictions(model, running, asleep)
        being_evicted = any(model in swap.evict for swap in self.swaps.values())
        if self.processes[model].state == READY and not evict and not being_evicted:
            return Decision("grant")
        if being_evicted or any(s.target in evict or s.evict & evict for s in self.swaps.values()):
            return Decision("wait", "another swap is under way", evict=evict)
        if busy := sorted(m for m in evict if self.in_flight[m]):
            return Decision("wait", f"{', '.join(busy)} must finish serving first", evict=evict)
        if evict and not self._may_evict(ticket, evict):
            return Decision("wait", self._kept_from_evicting(ticket, evict), evict=evict)
        sleep = self.policy.sleepers(model, running, asleep, evict, self._can_sleep)
        reasons = self.policy.reasons(model, running, asleep, evict)
        if hold := self._hold(ticket, evict, sleep):
            return Decision("wait", f"held {hold:.1f}s: a model it would stop is in steady use", None, evict, sleep,
                            reasons, hold)
        return Decision("swap", "", None, evict, sleep, reasons)

    def _kept_from_evicting(self, ticket: Ticket, evict: frozenset[str]) -> str:
        if protected := sorted(m for m in evict if self._protected(m)):
            return f"it would stop {', '.join(protected)}, which is protected"
        return f"API key {ticket.key!r} may not stop models (swap: {ticket.swap})"

    def _begin_swap(self, ticket: Ticket, decision: Decision) -> None:
        model = ticket.model
        waking = self.processes[model].state == SLEEPING
        record = SwapRecord(next(self.swap_ids), time.time(), "swap", model, waking,
                            {m: ("sleep" if m in decision.sleep else "stop", decision.reasons.get(m, ""))
                             for m in sorted(decision.evict)},
                            ticket.key, ticket.why, self.expected_load(model))
        swap = Swap(model, decision.evict, [ticket], decision.sleep, record=record)
        self.swaps[model] = swap
        if explanation := self.policy.explain(model, self.running(), self.asleep()):
            self.log.info(explanation)
        by = f" (key {ticket.key})" if ticket.key else ""
        self.log.info(f"<{model}> {'waking' if waking else 'starting'} for {ticket.why}{by}{making_room(record)}"
                      f"{expected(record)}")
        self.on_swap(record)
        ticket.caused(record)
        swap.task = asyncio.create_task(self._run_swap(swap))

    def plan(self, model: str, key: ApiKey | None = None) -> dict[str, Any]:
        """GET /api/plan: what a request for `model` (with `key`) would take now, as decide() says."""
        ticket = self.ticket(model, "a plan", key)
        decision = self.decide(ticket)
        process = self.processes[model]
        action = decision.action
        if action == "swap":
            action = "wake" if process.state == SLEEPING else "swap" if decision.evict else "start"
        answer: dict[str, Any] = {
            "model": model, "state": process.state, "action": {"grant": "serve", "wait": "queue"}.get(action, action),
            "reason": decision.why,
            "stops": [{"model": m, "action": "sleep" if m in decision.sleep else "stop",
                       "why": decision.reasons.get(m, "")} for m in sorted(decision.evict)],
            "queue_position": None, "expected_wait_s": None}
        if action == "wait":
            answer["queue_position"] = 1 + sum(1 for t in self.queue if t.waiting() and t.priority >= ticket.priority)
        if action == "grant":
            answer["expected_wait_s"] = 0.0
        elif action == "join":
            status = process.load_status() or {}
            answer["expected_wait_s"] = status.get("eta_s", self.expected_load(model))
        elif action in ("swap", "start", "wake") and (load := self.expected_load(model)) is not None:
            answer["expected_wait_s"] = load
        elif action == "wait" and decision.hold and (load := self.expected_load(model)) is not None:
            answer["expected_wait_s"] = round(decision.hold + load, 2)
        return answer

    def expected_load(self, model: str) -> float | None:
        """Seconds a start (or, for a sleeping model, a wake) usually takes, as measured; None before the first."""
        process = self.processes[model]
        past = process.wake_times if process.state == SLEEPING and process.wake_times else process.load_times
        return round(statistics.median_high(past), 2) if past else None

    def _refusal(self, ticket: Ticket) -> SchedulerError | None:
        """Why a request cannot be served at all, or not now for its key; None when it may wait."""
        model = ticket.model
        if model not in self.processes:  # removed by a reload while this request was read
            return SchedulerError("model was removed from the config by a reload")
        if problem := self.processes[model].model.problem:  # nothing is stopped for a start that cannot be
            return SchedulerError(f"model {model} cannot start until its config is fixed: {problem}")
        if ticket.swap is SwapRight.RESIDENT and not self._serves_now(ticket):
            return NotResident(f"{model} is not loaded, and API key {ticket.key!r} may only use models that are "
                               "(swap: resident)", self.retry_after(model))
        return None

    def _serves_now(self, ticket: Ticket) -> bool:
        """Whether the ticket would be granted at once, nothing started, woken or stopped for it."""
        model = ticket.model
        return (self.processes[model].state == READY and model not in self.draining
                and not any(model in swap.evict for swap in self.swaps.values())
                and not self.policy.evictions(model, self.running(), self.asleep()) and not self._wanted_gone(ticket))

    def _may_evict(self, ticket: Ticket, evict: frozenset[str]) -> bool:
        """A key with `swap: queue` or `resident` stops nothing, and no request stops a protected model."""
        return ticket.swap is SwapRight.EVICT and not any(self._protected(m) for m in evict)

    def _wanted_gone(self, ticket: Ticket) -> bool:
        """Whether a request queued ahead of this one (same or higher priority) for max_wait or
        longer needs its model stopped: from then on the model takes no new requests, so it drains
        (never a protected model, and never for a request that may not evict)."""
        if not self.queue or self._protected(ticket.model):
            return False
        now, running, asleep, model = self.clock(), self.running(), self.asleep(), ticket.model
        return any(t.model != model and t.waiting() and t.priority >= ticket.priority and now - t.since >= self.max_wait
                   and t.swap is SwapRight.EVICT and model in self.policy.evictions(t.model, running, asleep)
                   for t in self.queue)

    def _hold(self, ticket: Ticket, evict: frozenset[str], sleep: frozenset[str]) -> float:
        """Seconds the swap for `ticket` should still wait before stopping `evict` (putting
        `sleep` to sleep: then getting it back costs a wake, where one was seen); 0 for none."""
        now = self.clock()
        until = now
        for model in evict:
            process = self.processes[model]
            if process.state != READY:
                continue
            until = max(until, process.ready_since + self.min_residency)
            gap = self.usual_gap(model)
            past = process.wake_times if model in sleep and process.wake_times else process.load_times
            cost = statistics.median_high(past) if past else None
            if gap is not None and cost is not None and gap < cost:  # asked for more often than a reload takes
                until = max(until, self.last_use.get(model, 0.0) + gap)
        return max(0.0, min(until, ticket.since + self.max_wait) - now)

    def usual_gap(self, model: str) -> float | None:
        """The median time between the model's recent requests; None before its third."""
        arrivals = list(self.arrivals.get(model, ()))
        return statistics.median_high(b - a for a, b in zip(arrivals, arrivals[1:])) if len(arrivals) >= 3 else None

    def _woken(self) -> None:
        self.wake = None
        self.pump()

    def _grant(self, ticket: Ticket) -> None:
        self.in_flight[ticket.model] += 1
        self.last_use[ticket.model] = now = self.clock()
        self._counted(ticket.model)
        ticket.future.set_result(None)
        self.on_grant(ticket.model, now - ticket.since, ticket.key)

    def _finish_swap(self, swap: Swap, error: str) -> None:
        del self.swaps[swap.target]
        if (record := swap.record) is not None:
            record.duration_s = round(time.time() - record.time, 2)
            ready = swap.target in self.processes and self.processes[swap.target].state == READY
            record.result = f"failed: {error}" if error else "ok" if ready else "abandoned"
            self.on_swap(record)
        waiters = [t for t in swap.waiters if t.waiting()]
        if error:
            for ticket in waiters:
                ticket.future.set_exception(SchedulerError(error))
        elif swap.target in self.processes and self.processes[swap.target].state == READY:
            for ticket in waiters:
                self._grant(ticket)
        else:  # abandoned before it started: its requests go back to the front of the queue
            self.queue[:0] = waiters
        self.pump()

    def _fail_waiting(self, message: str, models: Iterable[str]) -> None:
        models = set(models)
        for swap in self.swaps.values():
            if swap.target in models:
                swap.abandoned = True
                for ticket in swap.waiters:
                    if ticket.waiting():
                        ticket.future.set_exception(SchedulerError(message))
                swap.waiters.clear()
        for ticket in self.queue:
            if ticket.model in models and ticket.waiting():
                ticket.future.set_exception(SchedulerError(message))
        self.queue = [t for t in self.queue if t.waiting()]

    def configure(self, config: Config, policy: SwapPolicy) -> tuple[dict[str, list[str]], list[str]]:
        """A reload's config: its rules and its models. A model whose launch settings did not
        change keeps its server; changed and removed ones are retired; new ones get a process.
        Returns the models added, removed, changed and kept, and those that will start anew."""
        self.policy = policy
        self.priority = dict(config.routing.priority)
        self.max_wait, self.min_residency = config.routing.max_wait, config.routing.min_residency
        self.queue_timeout = config.routing.queue_timeout
        changes: dict[str, list[str]] = {"added": [], "removed": [], "changed": [], "kept": []}
        retire: dict[str, ModelConfig | None] = {}
        for model_id in sorted(set(self.models) | set(config.models), key=str.encode):
            before, after = self.models.get(model_id), config.models.get(model_id)
            if after is None:
                changes["removed"].append(model_id)
                retire[model_id] = None
            elif model_id not in self.processes:
                changes["added"].append(model_id)
                self.processes[model_id] = self.new_process(after)
            elif before is None or model_id in self.draining or launch_settings(before) != launch_settings(after):
                # (a server still being retired by an earlier reload restarts with the newest settings)
                changes["added" if before is None else "changed"].append(model_id)
                retire[model_id] = after
            else:
                changes["kept"].append(model_id)
                self.processes[model_id].model = after
        self.models = dict(config.models)
        self.retire(retire)
        return changes, [m for m, c in retire.items() if c is not None]

    def retire(self, changes: Mapping[str, ModelConfig | None]) -> None:
        """After a reload: these models changed how they launch (or left the config). Their
        requests in flight finish on the old server; then it stops, and the next request starts
        the new one. Requests still waiting for a removed model are told it is gone."""
        if running := [m for m in changes if self.processes[m].state != STOPPED]:
            self._record_stops("reload", {m: ("stop", "removed by a config reload" if changes[m] is None else
                                              "its launch settings changed in a config reload") for m in running})
        for model, next_config in changes.items():
            self.draining[model] = next_config
            swap = self.swaps.get(model)
            if swap:  # a start with the old settings is aborted; its requests wait for the new ones
                swap.abandoned = True
                self.queue[:0] = swap.waiters
                swap.waiters = []
        removed = [m for m, c in changes.items() if c is None]
        self._fail_waiting("model was removed from the config by a reload", removed)
        self.pump()

    def _retire_idle(self) -> None:
        for model in self.draining:
            if not self.in_flight[model] and model not in self.retiring:
                self.retiring[model] = asyncio.create_task(self._retire(model))

    def _port_still_held(self, model: str) -> bool:
        """A model that moved to the port of a server being retired must wait for that server."""
        if not self.draining:
            return False
        address = URL(self.processes[model].model.proxy).origin()
        return any(self.processes[m].state != STOPPED and URL(self.processes[m].model.proxy).origin() == address
                   for m in self.draining if m != model)

    def ttl_remaining(self, model: str) -> float | None:
        """Seconds until an idle ready model is unloaded for its TTL; None without TTL or while busy."""
        process = self.processes[model]
        if process.model.ttl <= 0 or process.state != READY or self.in_flight[model]:
            return None
        idle = self.clock() - self.last_use.get(model, self.clock())
        return round(max(0.0, process.model.ttl - idle), 1)

    def _unload_idle(self) -> None:
        """Stop each ready model that served nothing for its `ttl` seconds: a request in
        flight, however long, keeps it loaded; the idle clock starts when the last one ends."""
        now = self.clock()
        for model, process in self.processes.items():
            ttl = process.model.ttl
            if ttl <= 0 or process.state != READY or self.in_flight[model] or model in self.draining:
                continue
            if any(model in swap.evict for swap in self.swaps.values()):
                continue
            if now - self.last_use.setdefault(model, now) > ttl:
                action = "sleep" if process.model.sleep else "stop"
                self._record_stops("ttl", {model: (action, f"idle for its ttl of {ttl}s")})
                if process.model.sleep:
                    self.log.info(f"<{model}> going to sleep, TTL of {ttl}s reached")
                    task = process.begin_sleep(process.model.unload_timeout, "ttl")
                else:
                    self.log.info(f"<{model}> Unloading model, TTL of {ttl}s reached")
                    task = process.begin_stop(process.model.unload_timeout, "ttl")
                self.stops.add(task)
                task.add_done_callback(self.stops.discard)

    # -- slow work and lifecycle: owned tasks that report back through pump() --------------

    async def _run_swap(self, swap: Swap) -> None:
        error = ""
        try:
            await asyncio.gather(*(self._make_room(m, m in swap.sleep) for m in swap.evict))
            if not swap.abandoned:
                await self.policy.before_start(swap.target, lambda: not swap.abandoned)
            if not swap.abandoned:
                await self.processes[swap.target].start()
        except StartError as e:
            error = str(e)
            self.log.warn(f"{self.policy.name}: starting {swap.target} failed: {e}")
        except asyncio.CancelledError:
            error = "aborted"
            raise
        except Exception as e:  # a bug must fail the waiting requests, not grant them
            error = f"{type(e).__name__}: {e}"
            self.log.error(f"{self.policy.name}: starting {swap.target} failed unexpectedly: {error}")
        finally:
            self._finish_swap(swap, error)

    async def _make_room(self, model: str, sleep: bool) -> None:
        process = self.processes[model]
        timeout = process.model.health_check_timeout
        if not (sleep and await process.sleep(timeout, "swap")):
            await process.stop(timeout, "swap")

    def _record_stops(self, kind: str, stops: dict[str, tuple[str, str]], who: str = "") -> None:
        """A decision that only stops (or puts to sleep): a TTL, an unload, a reload."""
        self.on_swap(SwapRecord(next(self.swap_ids), time.time(), kind, "", False, stops, request=who,
                                result="ok"))

    async def unload(self, models: Iterable[str], who: str = "") -> None:
        """Stop these models now; requests waiting for them are told it was unloaded. The work
        runs in its own task, so a client that hangs up does not leave it half done."""
        models = [m for m in models if m in self.processes]
        if running := [m for m in models if self.processes[m].state != STOPPED]:
            self._record_stops("unload", {m: ("stop", "unloaded by an admin action") for m in running}, who)
        self._fail_waiting(f"{self.policy.name}: model unloaded", models)
        task = asyncio.create_task(self._stop_models(models))
        self.unloads.add(task)
        task.add_done_callback(self.unloads.discard)
        await asyncio.shield(task)

    async def _stop_models(self, models: list[str]) -> None:
        # Models sharing a timeout stop together; shorter timeouts go first.
        by_timeout: dict[float, list[str]] = {}
        for m in models:
            by_timeout.setdefault(self.processes[m].model.unload_timeout, []).append(m)
        try:
            for timeout in sorted(by_timeout):
                await asyncio.gather(*(self.processes[m].stop(timeout, "unload") for m in by_timeout[timeout]))
        finally:
            self.pump()

    async def _retire(self, model: str) -> None:
        process = self.processes[model]
        try:
            await process.stop(process.model.unload_timeout, "reload")
        finally:
            next_config = self.draining.pop(model)
            del self.retiring[model]
            if next_config is None:
                del self.processes[model]
            else:
                process.model = next_config
            self.pump()

    def start(self) -> None:
        """Begin unloading models whose TTL has run out."""
        self.ttl_task = asyncio.create_task(self._unload_idle_every_second())

    async def _unload_idle_every_second(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self._unload_idle()

    def close(self) -> None:
        """Refuse new requests and fail every waiting one: the server is shutting down."""
        if self.ttl_task:
            self.ttl_task.cancel()
        if self.wake:
            self.wake.cancel()
            self.wake = None
        self.closed_reason = f"{self.policy.name} is shutting down"
        self._fail_waiting(self.closed_reason, self.processes)

    async def shutdown(self) -> None:
        """Stop every model, starting or running, all at once, each given its own unloadTimeout
        (the time its cmdStop may take, say); wait for swap tasks."""
        self.close()
        longest = max((p.model.unload_timeout for p in self.processes.values()), default=0)
        stops = [p.stop(p.model.unload_timeout, "shutdown") for p in self.processes.values()]
        try:
            await asyncio.wait_for(asyncio.gather(*stops), longest + 1)
        except asyncio.TimeoutError:
            # An eviction begun before shutdown may have a longer graceful window (healthCheckTimeout).
            self.log.warn("upstreams still running at the end of the shutdown budget, killing them")
            self.kill_all()
            await asyncio.gather(*(p.stop(0, "shutdown") for p in self.processes.values()))
        tasks = [s.task for s in self.swaps.values() if s.task]
        tasks += [*self.retiring.values(), *self.unloads, *self.stops]
        if tasks:
            await asyncio.wait(tasks)

    def kill_all(self) -> None:
        for process in self.processes.values():
            process.kill_now()


###############################################################################
# 13. Virtual models ##########################################################
###############################################################################

# Names that stand for other models: a profile's pins and selectors that pick a target per
# request (warm, pin, spillover).


class SelectorError(Exception):
    """No target of a selector can take the request (answered with 503)."""


class VirtualModels:
    """Names that stand for other models: the active profile's pins and selectors.

    No profile is active at start or after a reload. Spillover selectors count the requests
    each target is serving, to send the next one where there is room.
    """

    def __init__(self, config: Config, processes: Mapping[str, ModelProcess]):
        self.config = config
        self.processes = processes
        self.active: str | None = None
        self.reservations: Counter[tuple[str, str]] = Counter()
        self.turns: Counter[str] = Counter()  # round-robin among equally loaded spillover targets

    def pinned(self, name: str) -> str:
        """The active profile's target for a pin name ("" for a disabled pin); other names as they are."""
        if self.active is None:
            return name
        return self.config.profiles[self.active].pins.get(name, name)

    def pinned_path(self, raw_tail: str) -> str:
        """/upstream/<pin>/rest -> /upstream/<target>/rest, the longest matching pin first."""
        if self.active is None:
            return raw_tail
        for pin in sorted(self.config.profiles[self.active].pins, key=len, reverse=True):
            if raw_tail == pin or raw_tail.startswith(pin + "/"):
                return self.pinned(pin) + raw_tail[len(pin):] if self.pinned(pin) else ""
        return raw_tail

    @contextlib.contextmanager
    def selecting(self, name: str) -> Iterator[str]:
        """The target a selector picks for this request (or the name itself), reserved until the block ends."""
        selector = self.config.selectors.get(name)
        if selector is None:
            yield name
            return
        target = self._choose(selector)
        key = (selector.id, target)
        self.reservations[key] += 1
        try:
            yield target
        finally:
            self.reservations[key] -= 1

    def _state(self, target: str) -> str:
        model = self.config.real_model_id(target)
        return self.processes[model].state if model in self.processes else ""

    def _choose(self, selector: Selector) -> str:
        if selector.strategy == "pin":
            return selector.targets[0]
        if selector.strategy == "warm":
            for wanted in (READY, STARTING, WAKING, SLEEPING):  # a sleeping server wakes faster than a start
                for target in selector.targets:
                    if self._state(target) == wanted:
                        return target
            return selector.targets[0]
        return self._spill(selector)

    def _spill(self, selector: Selector) -> str:
        """Fill active targets up to `spillover` requests each, then wake a cold one."""
        active, cold = [], []
        for target in selector.targets:
            state, reserved = self._state(target), self.reservations[(selector.id, target)]
            if state == STOPPING:
                continue
            (active if state in (READY, STARTING, WAKING) or reserved > 0 else cold).append(target)
        if not active:
            if not cold:
                raise SelectorError(f'selector "{selector.id}" has no available spillover targets')
            return cold[0]
        least = min(self.reservations[(selector.id, t)] for t in active)
        if least >= selector.spillover and cold:
            return cold[0]
        candidates = [t for t in active if self.reservations[(selector.id, t)] == least]
        self.turns[selector.id] += 1
        return candidates[self.turns[selector.id] % len(candidates)]


###############################################################################
# 14. Request bodies ##########################################################
###############################################################################

# Finding and rewriting `model` in a body without decoding the rest. Every scan is linear and
# made of bounded C calls; bodies over 64 KiB are read in a worker thread.

_JSON_WS = re.compile(r"[ \t\n\r]*")
_FORM_NAME = re.compile(rb'(?im)^content-disposition:[^\r\n]*?;\s*name="?([^";\r\n]*)"?')

# Reading JSON structure without decoding it. Strings are skipped with find (or, full of escapes,
# a regex a window at a time), containers nested in a value with a regex that swallows text,
# whole strings and whole innermost containers in one call, so realistic JSON is walked at C
# speed. Every C call is bounded (SCAN_WINDOW), so a worker thread reading a body of tens of MB
# never holds the GIL long, and the event loop keeps its turns.
SCAN_WINDOW = 1 << 16
_BRACKETS = re.compile(r'["{}\[\]]')
_STRUCTURE = re.compile(r'["{}\[\],]')
_STRING_BODY = re.compile(r'[^"\\]*(?:\\.[^"\\]*)*')
_FLAT_STRING = r'"[^"\\]*(?:\\.[^"\\]*)*"'
_INSIDE = re.compile(  # text, strings and innermost containers: what needs no counting
    rf'(?:[^"\[\]{{}}]+|{_FLAT_STRING}|\[(?:[^"\[\]{{}}]|{_FLAT_STRING})*\]|\{{(?:[^"\[\]{{}}]|{_FLAT_STRING})*\}})*')
LONGEST_KEY = 4096  # a key longer than this (as written) names nothing a config can name


def as_text(body: bytes) -> str:
    """A body as text, bytes that are no UTF-8 kept (as surrogates), decoded a window at a time:
    one decode of tens of MB would hold the GIL long enough to stall the event loop."""
    if len(body) <= SCAN_WINDOW * 16:
        return body.decode("utf-8", "surrogateescape")
    decoder = codecs.getincrementaldecoder("utf-8")("surrogateescape")
    view = memoryview(body)
    pieces = [decoder.decode(view[at:at + SCAN_WINDOW * 16]) for at in range(0, len(body), SCAN_WINDOW * 16)]
    return "".join(pieces) + decoder.decode(b"", final=True)


def as_bytes(text: str) -> bytes:
    """as_text undone, a window at a time."""
    step = SCAN_WINDOW * 16
    return b"".join(text[at:at + step].encode("utf-8", "surrogateescape") for at in range(0, len(text), step))


def _next_of(text: str, pos: int, pattern: re.Pattern) -> int:
    """Where the next character `pattern` matches is, searched a window at a time; -1 if none."""
    n = len(text)
    while pos < n:
        if match := pattern.search(text, pos, min(n, pos + SCAN_WINDOW)):
            return match.start()
        pos += SCAN_WINDOW
    return -1


def _string_end(text: str, start: int) -> int:
    """Just past the string that opens at `start`; an unterminated one runs to the end."""
    at, n = start + 1, len(text)
    quote = text.find('"', at)
    if quote < 0:
        return n
    if text.find("\\", at, quote) < 0:
        return quote + 1
    while at < n:
        end = _STRING_BODY.match(text, at, min(n, at + SCAN_WINDOW)).end()
        if end < n and text[end] == '"':
            return end + 1
        if end == at:  # a backslash with nothing after it
            return n
        at = end
    return n


def _container_end(text: str, start: int) -> int:
    """Just past the object or array that opens at `start` (the end, when it is cut short)."""
    depth, pos, n = 0, start, len(text)
    while pos < n:
        c = text[pos]
        if c in "[{":
            depth, pos = depth + 1, pos + 1
        elif c in "]}":
            depth, pos = depth - 1, pos + 1
            if depth == 0:
                return pos
        elif c == '"':
            pos = _string_end(text, pos)
        pos = _INSIDE.match(text, pos, min(n, pos + SCAN_WINDOW)).end() if pos < n else pos
    return n


def _value_end(text: str, start: int) -> int:
    """Just past the JSON value at `start`: a string, a container, or a scalar up to the next
    comma or bracket (its trailing blanks left out)."""
    if text.startswith('"', start):
        return _string_end(text, start)
    if text.startswith(("{", "["), start):
        return _container_end(text, start)
    delimiter = _next_of(text, start, _STRUCTURE)
    return _end_of_value(text, len(text) if delimiter < 0 else delimiter)


def _end_of_value(text: str, delimiter: int) -> int:
    end = delimiter
    while end > 0 and text[end - 1] in " \t\r\n":
        end -= 1
    return end


def _key(text: str, start: int, end: int) -> str | None:
    """The key a string token spells, when it could be one we look for."""
    return _json_string(text[start:end]) if end - start <= LONGEST_KEY else None


def _json_string(lexeme: str) -> str | None:
    try:
        return json.loads(lexeme)
    except ValueError:
        return None


def json_member_span(text: str, key: str, start: int = 0) -> tuple[int, int] | None:
    """Where the value of a key of the JSON object at `start` sits in the text, or None.

    Values on the way are skipped, never decoded (so a 20 MB `messages` array before `model`
    costs one scan), and a body broken after `model` still yields it, as the original's lenient
    reader does.
    """
    pos = _JSON_WS.match(text, start).end()
    if not text.startswith("{", pos):
        return None
    pos += 1
    while (pos := _next_of(text, pos, _BRACKETS)) >= 0:
        if text[pos] in "}]":
            return None
        if text[pos] in "{[":
            pos = _container_end(text, pos)
            continue
        end = _string_end(text, pos)
        colon = _JSON_WS.match(text, end).end()
        if text.startswith(":", colon) and _key(text, pos, end) == key:
            value_start = _JSON_WS.match(text, colon + 1).end()
            return value_start, _value_end(text, value_start)
        pos = end
    return None


MAX_MODEL_TEXT = 4096  # a `model` value longer than this names no model


def json_model(body: bytes) -> str:
    text = as_text(body)
    span = json_member_span(text, "model")
    if span is None or span[1] - span[0] > MAX_MODEL_TEXT:
        return ""
    raw = text[span[0]:span[1]]
    try:
        value = json.loads(raw)
    except ValueError:
        return ""
    return value if isinstance(value, str) else "" if value is None else raw


def replace_json_model(body: bytes, model: str) -> bytes:
    """The body with only its top-level `model` changed; every other byte kept."""
    return json_edit(body, lambda text: json_set(text, "model", model))


def json_edit(body: bytes, edit: Callable[[str], str]) -> bytes:
    """Edit a JSON body as text, so that bytes nobody touches come back exactly as they were."""
    return as_bytes(edit(as_text(body)))


def splice(text: str, edits: Iterable[tuple[int, int, str]]) -> str:
    """The text with every edit (start, end, replacement) made at once: one copy of the text
    however many edits there are. Edits may not overlap."""
    pieces, at = [], 0
    for start, end, replacement in sorted(edits, key=lambda edit: edit[:2]):
        pieces += [text[at:start], replacement]
        at = end
    pieces.append(text[at:])
    return "".join(pieces)


@dataclass
class JsonMember:
    key: str | None  # None for an array element, or a key too long to be one we look for
    start: int  # where the member begins: its key, or the element itself
    value_start: int
    value_end: int


JsonContainer = tuple[str, list[JsonMember], int]  # opening bracket, members, closing bracket position


def json_container(text: str, start: int) -> JsonContainer | None:
    """The object or array at `start`: its opening bracket, members and closing bracket position;
    None when it is none, or broken. Values are delimited, never decoded, so a huge value costs
    one scan and a string the strict decoder would refuse is no obstacle."""
    pos = _JSON_WS.match(text, start).end()
    opener = text[pos:pos + 1]
    if opener not in ("{", "["):
        return None
    closer = "}" if opener == "{" else "]"
    members: list[JsonMember] = []
    pos += 1
    while True:
        pos = _JSON_WS.match(text, pos).end()
        if text.startswith(closer, pos):  # also after a trailing comma, which we let pass
            return opener, members, pos
        member_start, key = pos, None
        if opener == "{":
            if not text.startswith('"', pos):
                return None
            end = _string_end(text, pos)
            key = _key(text, pos, end)
            colon = _JSON_WS.match(text, end).end()
            if not text.startswith(":", colon) or (key is None and end - pos <= LONGEST_KEY):
                return None  # no key here, or one that is no JSON string
            pos = _JSON_WS.match(text, colon + 1).end()
        value_end = _value_end(text, pos)
        members.append(JsonMember(key, member_start, pos, value_end))
        pos = _JSON_WS.match(text, value_end).end()
        if text.startswith(",", pos):
            pos += 1
        elif not text.startswith(closer, pos):
            return None


def json_path_keys(path: str) -> list[str]:
    """sjson's path syntax: keys split on `.`, and `\\` makes the next character literal (`a\\.b`)."""
    keys, key, escaped = [], "", False
    for c in path:
        if escaped or c not in ".\\":
            key, escaped = key + c, False
        elif c == "\\":
            escaped = True
        else:
            keys.append(key)
            key = ""
    return keys + [key]


def _json_holders(text: str, keys: list[str]) -> list[JsonContainer]:
    """Each object or array that holds the last key of the path, through every copy of a
    duplicated parent (a server may read any copy), in text order. They never overlap."""
    found = [top] if (top := json_container(text, 0)) else []
    for key in keys[:-1]:
        found = [f for container in found for i in _json_matches(container, key)
                 if (f := json_container(text, container[1][i].value_start))]
    return found


def _json_matches(found: JsonContainer, key: str) -> list[int]:
    """Indexes of the members a key names: every copy of an object key, or one array index
    (`-1` is the last element)."""
    opener, members, _close = found
    if opener == "{":
        return [i for i, m in enumerate(members) if m.key == key]
    index = len(members) - 1 if key == "-1" else int(key) if key.isdigit() else -1
    return [index] if 0 <= index < len(members) else []


def json_set(text: str, path: str, value: Any) -> str:
    """Set a path like sjson: replace the value (every copy of a duplicated key: the server may
    read any), or add the member and its missing parents; in an array, an index past the end
    (or `-1`) appends, padding with nulls. One scan of each container, one copy of the text."""
    encoded = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    keys = json_path_keys(path)
    for depth in range(len(keys), 0, -1):  # the deepest containers that exist
        if holders := _json_holders(text, keys[:depth]):
            return splice(text, [edit for found in holders
                                 for edit in _set_edits(found, keys[depth - 1], keys[depth:], encoded)])
    return text


def _set_edits(found: JsonContainer, key: str, missing: list[str], encoded: str) -> list[tuple[int, int, str]]:
    """The edits that set `key` in one container to `encoded`, wrapped in objects for `missing` keys."""
    opener, members, close = found
    matches = [] if opener == "[" and key == "-1" else _json_matches(found, key)  # -1 appends
    nested = encoded
    for inner in reversed(missing):
        nested = "{" + json.dumps(inner, ensure_ascii=False) + ":" + nested + "}"
    if matches:  # the value itself, or a parent that is not a container, which sjson replaces
        return [(members[m].value_start, members[m].value_end, nested) for m in matches]
    if opener == "{":
        addition = json.dumps(key, ensure_ascii=False) + ":" + nested
    elif key == "-1" or key.isdigit():
        addition = ",".join(["null"] * max(0, int(key) - len(members)) + [nested]) if key.isdigit() else nested
    else:
        return []  # a name where an array is: nothing to set
    return [(close, close, ("," if members else "") + addition)]


def json_delete(text: str, path: str) -> str:
    """Remove a path and one comma next to it, in every copy; the rest of the text stays as it
    was. One scan of each container, one copy of the text."""
    keys = json_path_keys(path)
    return splice(text, [edit for found in _json_holders(text, keys)
                         for edit in _delete_edits(found[1], _json_matches(found, keys[-1]))])


def _delete_edits(members: list[JsonMember], doomed: list[int]) -> list[tuple[int, int, str]]:
    """The edits that remove the members at these (ascending) indexes, each run of them with
    one comma beside it: the one after it, or before it at the end."""
    edits = []
    for _, run in itertools.groupby(enumerate(doomed), lambda pair: pair[1] - pair[0]):
        indexes = [index for _, index in run]
        first, last = indexes[0], indexes[-1]
        if last + 1 < len(members):
            edits.append((members[first].start, members[last + 1].start, ""))
        elif first > 0:
            edits.append((members[first - 1].value_end, members[last].value_end, ""))
        else:
            edits.append((members[first].start, members[last].value_end, ""))
    return edits


def apply_filters(body: bytes, filters: Filters, requested: str) -> bytes:
    """stripParams, then setParams, then setParamsByID[requested]; `model` is never touched."""
    by_id = filters.set_params_by_id.get(requested, {})
    if not (filters.strip_params or filters.set_params or by_id):
        return body

    def edit(text: str) -> str:
        for path in filters.strip_params:
            text = json_delete(text, path)
        for params in (filters.set_params, by_id):
            for key in sorted(params):
                if json_path_keys(key)[0] != "model":  # the request's model is never a filter's business
                    text = json_set(text, key, params[key])
        return text

    return json_edit(body, edit)


def multipart_field_span(body: bytes, content_type: str, name: str) -> tuple[int, int] | None:
    """Where a form field's value sits in a multipart body, or None."""
    boundary = content_type_param(content_type, "boundary")
    if not boundary:
        return None
    delimiter = b"--" + boundary.encode("utf-8", "surrogateescape")  # the header's very bytes
    if not (body.startswith(delimiter + b"--") or b"\r\n" + delimiter + b"--" in body):
        return None  # a form cut short: the original's form parser refuses it, so no model
    pos = body.find(delimiter)
    while pos != -1:
        start = pos + len(delimiter)
        if body.startswith(b"--", start):
            return None
        head_end = body.find(b"\r\n\r\n", start)
        end = body.find(b"\r\n" + delimiter, head_end + 4) if head_end != -1 else -1
        if end == -1:
            return None
        match = _FORM_NAME.search(body, start, min(head_end, start + MAX_PART_HEAD))
        if match and match.group(1).decode("latin-1") == name:
            return head_end + 4, end
        pos = end + 2
    return None


MAX_PART_HEAD = 16 * 1024  # a part's headers are read this far for its name
INLINE_BODY = 64 * 1024  # a body up to this size is read on the event loop: its worst case is a few ms
BODY_THREADS = 2  # worker threads that read bigger bodies (a queue forms behind them, not on the loop)
FORM_LIMIT = 10 * 1024 * 1024  # a url-encoded form is read for its model up to this size, as the original does


class BodyError(Exception):
    """A request body we will not read, with the status and words the client gets."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def form_model(body: bytes) -> str:
    """The first `model` of a url-encoded form, found without splitting the form into pairs."""
    if len(body) > FORM_LIMIT:
        raise BodyError(413, f"a url-encoded form body is read for its model up to 10 MB, and this one is "
                             f"{len(body) / 1024 / 1024:.1f} MB: send JSON or multipart/form-data")
    at = -1
    while (at := body.find(b"model=", at + 1)) >= 0:
        if at == 0 or body[at - 1:at] == b"&":
            end = body.find(b"&", at)
            return urllib.parse.unquote_plus(body[at + 6:end if end >= 0 else len(body)].decode("utf-8", "replace"))
    return ""


def content_type_param(content_type: str, param: str) -> str:
    """A parameter of a Content-Type; "" if missing or badly quoted."""
    for part in content_type.split(";")[1:]:
        key, _, value = part.strip().partition("=")
        if key.strip().lower() == param:
            value = value.strip()
            if value.startswith('"') != (len(value) > 1 and value.endswith('"')):
                return ""
            return value.strip('"')
    return ""


DECODED_CODINGS = frozenset({"gzip", "x-gzip", "deflate"})  # request codings we inflate (and forward inflated)
INFLATE_STEP = 1 << 20  # bytes of output per zlib call: the GIL goes back between them
INFLATE_RATIO = 100  # past INFLATE_FREE, a body that inflates to more than this many times its size is a bomb
INFLATE_FREE = 16 << 20  # what any body may inflate to (a repetitive prompt compresses a few hundred times)


def inflate(body: bytes, coding: str, limit: int) -> bytes:
    """A gzip or deflate request body, inflated a MiB at a time and refused (413) as soon as it
    passes `limit` bytes or INFLATE_RATIO times its own size, before it takes that memory."""
    cap = min(limit, max(INFLATE_FREE, INFLATE_RATIO * len(body)))
    if coding == "deflate":  # zlib-wrapped as the RFC says, or the raw stream many clients send
        wbits = zlib.MAX_WBITS if len(body) > 1 and body[0] & 0x0F == 8 and (body[0] << 8 | body[1]) % 31 == 0 \
            else -zlib.MAX_WBITS
    else:
        wbits = 16 + zlib.MAX_WBITS
    out, rest = bytearray(), body
    try:
        while rest:  # a gzip body may hold several members, one after another
            inflater, data = zlib.decompressobj(wbits), rest
            while not inflater.eof:
                piece = inflater.decompress(data, INFLATE_STEP)
                if not piece and len(inflater.unconsumed_tail) == len(data):
                    raise zlib.error("the compressed data ends early")
                data = inflater.unconsumed_tail
                out += piece
                if len(out) > cap:
                    raise BodyError(413, f"request body too large: inflated it passes the limit of "
                                         f"{limit // 1024 // 1024} MB (maxRequestBodyMB)" if cap == limit else
                                         f"request body refused: it inflates to more than {INFLATE_RATIO} times its "
                                         "size (a compression bomb, by its ratio)")
            rest = inflater.unused_data if wbits > zlib.MAX_WBITS else b""
    except zlib.error as e:
        raise BodyError(400, f"cannot read the request body: it says Content-Encoding {coding} "
                             f"but is not ({e})") from None
    return bytes(out)


def request_model(method: str, content_type: str, query_model: str, body: bytes) -> str:
    """The requested model name, read where the original reads it. Plain data in and
    out, so that a worker thread can read a big body."""
    if method in ("GET", "HEAD"):
        return query_model
    if "application/json" in content_type:
        return json_model(body)
    if "multipart/form-data" in content_type:
        span = multipart_field_span(body, content_type, "model")
        return query_model or (body[span[0]:span[1]].decode("utf-8", "replace") if span else "")
    return form_model(body) or query_model


def with_query_model(path_qs: str, model: str) -> str:
    """A GET's path with its `?model=` replaced."""
    path, _, query = path_qs.partition("?")
    pairs = [(k, model if k == "model" else v) for k, v in urllib.parse.parse_qsl(query, keep_blank_values=True)]
    return f"{path}?{urllib.parse.urlencode(sorted(pairs))}"


def upstream_body(content_type: str, body: bytes, model: str | None, filters: Filters, requested: str) -> bytes:
    """The body as the upstream gets it: its model set to `model` where it was read (JSON or
    multipart; None leaves it as sent), then the filters (JSON only)."""
    if model is not None:
        body = rewrite_model(content_type, body, model)
    if "application/json" in content_type:
        body = apply_filters(body, filters, requested)
    return body


def rewrite_model(content_type: str, body: bytes, model: str) -> bytes:
    """The body with its model field set to `model` (JSON and multipart bodies)."""
    if "application/json" in content_type and body.strip():
        return replace_json_model(body, model)
    if "multipart/form-data" in content_type:
        span = multipart_field_span(body, content_type, "model")
        if span:
            return body[: span[0]] + model.encode() + body[span[1]:]
    return body


class BodyReader:
    """Request bodies read without stalling the event loop: whole (aiohttp holds a body to its
    limit as it arrives), inflated when they came gzip or deflate, and any work on one big
    enough to matter done in a worker thread of its own."""

    def __init__(self) -> None:
        self.threads = concurrent.futures.ThreadPoolExecutor(BODY_THREADS, thread_name_prefix="llama-swap-body")

    async def read(self, request: web.Request, limit: int) -> bytes:
        """The body as the client meant it; inflated, it may not pass `limit` bytes either."""
        body = await request.read()
        coding = request.headers.get("Content-Encoding", "").strip().lower()
        if coding in ("", "identity"):
            return body
        if coding not in DECODED_CODINGS:
            raise BodyError(415, f"request bodies with Content-Encoding {coding!r} are not read: send gzip, deflate "
                                 "or none")
        return await self.off_loop(body, inflate, body, coding, limit)

    async def off_loop(self, body: bytes, function: Callable[..., Any], *args: Any) -> Any:
        """function(*args), in a worker thread when `body` is big enough that reading it could
        keep the event loop from every other client (a small one costs less than the hand-off)."""
        if len(body) <= INLINE_BODY:
            return function(*args)
        return await asyncio.get_running_loop().run_in_executor(self.threads, function, *args)

    def close(self) -> None:
        self.threads.shutdown(wait=False, cancel_futures=True)


###############################################################################
# 15. In-flight requests ######################################################
###############################################################################

# Exchange: one request on its way, from arrival to its last byte, listed by /api/inflight and
# cancellable from the UI.

EXCHANGE = web.RequestKey("exchange", "Exchange")  # where the relay reports what it sent
API_KEY = web.RequestKey("api_key", "ApiKey | None")  # the entry of apiKeys or adminKeys the request came with
COPY_LIMIT = 64 * 1024 * 1024
SENSITIVE_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie", "set-cookie", "x-api-key"})


def request_label(request: web.BaseRequest) -> str:
    """`POST /v1/chat/completions from 10.0.0.7`: a request as a log line names it."""
    return printable(f"{request.method} {request.path[:200]} from {client_ip(request)[:64]}")


def client_ip(request: web.BaseRequest) -> str:
    forwarded = request.headers.get("X-Forwarded-For", "")
    if forwarded:
        return forwarded.split(",")[0].strip()
    return request.headers.get("X-Real-IP") or request.remote or ""


@functools.lru_cache(maxsize=256)  # the same few names in every request: 15 -> 4 us per snapshot
def canonical_header(name: str) -> str:
    """Go's spelling of a header name: x-api-key -> X-Api-Key."""
    return "-".join(part[:1].upper() + part[1:].lower() for part in name.split("-"))


LONGEST_SHOWN_HEADER = 1024  # a value past this is shown cut, with its length: 128 headers of 32 KiB stay small


def header_snapshot(headers: Mapping[str, str]) -> dict[str, str]:
    """The first value of each header under its canonical name; credentials never shown. Host
    is not a header to Go, which keeps it apart. Bytes that are not UTF-8 show as U+FFFD, as
    Go's JSON encoder shows them."""
    snapshot: dict[str, str] = {}
    for key, value in headers.items():
        if key.lower() != "host":
            if len(value) > LONGEST_SHOWN_HEADER:
                value = f"{value[:LONGEST_SHOWN_HEADER]}... ({len(value)} characters)"
            text = value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
            snapshot.setdefault(canonical_header(key), "[REDACTED]" if key.lower() in SENSITIVE_HEADERS else text)
    return snapshot


class RequestCancelled(Exception):
    """Someone cancelled this request with POST /api/inflight/{id}/cancel."""

    def __init__(self, exchange: Exchange):
        super().__init__(f"request {exchange.id} was cancelled")
        self.exchange = exchange


@dataclass
class Exchange:
    """One model request on its way through, from the moment its model is known."""

    id: str
    model: str
    path: str
    method: str
    headers: Mapping[str, str]  # the request's, as it came (read-only)
    remote_ip: str
    metadata: dict[str, str]
    task: asyncio.Task
    on_change: Callable[[Exchange, bool], None]  # (exchange, announce at once)
    request_body: bytes = b""  # as forwarded
    began: float = field(default_factory=time.time)  # for the timestamp; durations use `clock`
    clock: float = field(default_factory=time.monotonic)
    response: web.StreamResponse | None = None
    response_bytes: int = 0
    first_byte_after: float | None = None  # seconds from `began` to the first body byte sent
    copy: bytearray | None = None  # the response body, kept while it fits COPY_LIMIT (activity, captures)
    cancelled: bool = False
    failure: tuple[int, str] | None = None  # (status, message) of an error told inside a stream begun as a 200
    announced_at: float = 0.0  # when watchers last heard of it (byte counts are throttled)
    trailing: asyncio.TimerHandle | None = None
    key: str = ""  # the name of its API key
    swap: SwapRecord | None = None  # the swap this request caused, if it did
    ticket: Ticket | None = None  # its place in line while it waits for its model
    position: Callable[[Ticket], int] | None = None  # the scheduler's: its place in the queue

    @functools.cached_property
    def request_headers(self) -> dict[str, str]:
        """As the in-flight entry and the capture show them: made when first asked for, which
        for most requests (nobody watching, no capture) is never."""
        return header_snapshot(self.headers)

    def waiting_on(self, ticket: Ticket, position: Callable[[Ticket], int]) -> None:
        """Its ticket, for the in-flight entry's phase; told again once it is granted."""
        self.ticket, self.position = ticket, position
        ticket.caused = self.caused
        ticket.future.add_done_callback(lambda _: self.on_change(self, True))
        # Once the scheduler has placed it (synchronously, right after this): queued or
        # waiting for a start, watchers hear so at once.
        asyncio.get_running_loop().call_soon(self._placed)

    def _placed(self) -> None:
        if self.ticket is not None and self.ticket.waiting():
            self.on_change(self, True)

    def caused(self, record: SwapRecord) -> None:
        self.swap = record

    def phase(self) -> dict[str, Any]:
        """Ours: where the request is: queued (and where), loading (its model starting for it),
        waiting (for the first byte) or answering."""
        if self.response is not None or self.response_bytes:
            return {"phase": "answering"}
        if self.ticket is not None and self.ticket.waiting():
            place = self.position(self.ticket) if self.position else 0
            return {"phase": "queued", "queue_position": place} if place else {"phase": "loading"}
        return {"phase": "waiting"}

    def responding(self, response: web.StreamResponse) -> None:
        self.response = response
        self.on_change(self, True)

    def sent(self, chunk: bytes) -> None:
        if self.first_byte_after is None:
            self.first_byte_after = time.monotonic() - self.clock
        self.response_bytes += len(chunk)
        if self.copy is not None:
            if len(self.copy) + len(chunk) <= COPY_LIMIT:
                self.copy += chunk
            else:  # too big to parse or keep: the activity row gets no tokens, no capture is made
                self.copy = None
        self.on_change(self, False)

    def record(self) -> dict[str, Any]:
        """The in-flight entry of the original's API."""
        record = {
            "id": self.id, "timestamp": go_timestamp(self.began), "model": self.model, "req_path": self.path,
            "method": self.method, "req_headers": self.request_headers, "remote_ip": self.remote_ip,
            "resp_headers": header_snapshot(self.response.headers) if self.response is not None else {},
            "resp_bytes": self.response_bytes, "elapsed_ms": int((time.monotonic() - self.clock) * 1000),
            **self.phase(),
        }
        if self.metadata:
            record["metadata"] = self.metadata
        return record


class InFlight:
    """Every model request being served or waiting, and the way to cancel one. Watchers hear
    of each one as it comes, answers and goes, of its byte count at most every 0.25 s."""

    THROTTLE = 0.25

    def __init__(self, announce: Callable[[dict[str, Any]], None] = lambda event: None,
                 watched: Callable[[], bool] = lambda: False):
        self.exchanges: dict[str, Exchange] = {}
        self.announce = announce
        self.watched = watched  # nobody watching: no entry is rendered (a new watcher gets a snapshot)
        self._ids = itertools.count(1)

    @contextlib.contextmanager
    def track(self, request: web.Request, model: str, path_qs: str, body: bytes,
              metadata: dict[str, str] | None = None) -> Iterator[Exchange]:
        """Listed while the block runs; a cancel turns into RequestCancelled at its end. The
        answer to a POST is copied as it is relayed, for its activity row and capture."""
        exchange = Exchange(str(next(self._ids)), model, path_qs.partition("?")[0], request.method,
                            request.headers, client_ip(request), metadata or {},
                            asyncio.current_task(), self._changed, body,
                            copy=bytearray() if request.method == "POST" else None,
                            key=key.name if (key := request.get(API_KEY)) else "")
        self.exchanges[exchange.id] = request[EXCHANGE] = exchange
        self._upsert(exchange)
        try:
            yield exchange
        except asyncio.CancelledError:
            if not exchange.cancelled:
                raise  # the client left, or we are shutting down
            if hasattr(exchange.task, "uncancel"):
                exchange.task.uncancel()
            raise RequestCancelled(exchange) from None
        finally:
            del self.exchanges[exchange.id]
            exchange.ticket = None  # (it refers back to the exchange: freed now, not by a later gc pass)
            if exchange.trailing:
                exchange.trailing.cancel()
            self.announce({"operation": "remove", "id": exchange.id})

    def waiting_moved(self) -> None:
        """Models changed state: the requests still waiting may have moved in the queue."""
        for exchange in self.exchanges.values():
            if exchange.ticket is not None and exchange.ticket.waiting():
                self._upsert(exchange)

    def _upsert(self, exchange: Exchange) -> None:
        exchange.trailing = None
        exchange.announced_at = time.monotonic()
        if self.watched():
            self.announce({"operation": "upsert", "request": exchange.record()})

    def _changed(self, exchange: Exchange, urgent: bool) -> None:
        if not self.watched():  # a watcher that comes later starts from a snapshot
            return
        wait = exchange.announced_at + self.THROTTLE - time.monotonic()
        if urgent or wait <= 0:
            if exchange.trailing:
                exchange.trailing.cancel()
            self._upsert(exchange)
        elif exchange.trailing is None:  # the last count is announced too, a little later
            exchange.trailing = asyncio.get_running_loop().call_later(wait, self._upsert, exchange)

    def snapshot(self) -> dict[str, Any]:
        """What a watcher gets first (`requests` left out when there are none, as Go omits it)."""
        records = self.records()
        return {"operation": "snapshot", "requests": records} if records else {"operation": "snapshot"}

    def cancel(self, exchange_id: str) -> Exchange | None:
        """Cancel a request as if its client had gone: it leaves the queue, or its upstream
        request is aborted. None if there is no such request."""
        exchange = self.exchanges.get(exchange_id)
        if exchange is not None and not exchange.cancelled:
            exchange.cancelled = True
            exchange.task.cancel()
        return exchange

    def records(self) -> list[dict[str, Any]]:
        ordered = sorted(self.exchanges.values(), key=lambda e: (e.began, int(e.id)))
        return [e.record() for e in ordered]


###############################################################################
# 16. Relay ###################################################################
###############################################################################

# Bytes from upstream to client, chunk by chunk, never parsed: HTTP answers, streams and
# websockets. Errors of the upstream are told in the OpenAI error format.

HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "trailers", "transfer-encoding", "upgrade",
})


def header_tokens(headers: multidict.CIMultiDict, name: str) -> list[str]:
    """The comma-separated tokens of every `name` header, lower case, in order."""
    return [t.strip().lower() for value in headers.getall(name, ()) for t in value.split(",") if t.strip()]


def end_to_end_headers(headers: multidict.CIMultiDict) -> list[tuple[str, str]]:
    """Headers without hop-by-hop ones (and those the Connection header names) or Content-Length.

    `Expect: 100-continue` goes too: we answered it and hold the whole body, so an upstream
    that never sends 100 cannot make us wait (Go waits `timeouts.expectContinue` instead).
    """
    drop = HOP_BY_HOP.union(header_tokens(headers, "Connection"), ("content-length", "expect"))
    return [(k, v) for k, v in headers.items() if k.lower() not in drop]


class Failure(Named):
    """What went wrong with an upstream."""

    UNREACHABLE = "unreachable"  # no connection, or it broke before the answer's headers
    TIMED_OUT = "timed out"  # no answer's headers within timeouts.responseHeader
    BAD_UPGRADE = "bad upgrade"  # a websocket upgrade answered neither with 101 nor with a refusal
    CUT_SHORT = "cut short"  # the answer broke off while it was relayed into a stream already sent
    NOT_READY = "not ready"  # its server stopped between the grant and the request


class UpstreamError(Exception):
    """The upstream could not be reached or gave no usable answer; `kind` says which."""

    status = 502

    def __init__(self, kind: Failure, message: str):
        super().__init__(message)
        self.kind = kind


def request_headers(request: web.BaseRequest) -> list[tuple[str, str]]:
    """The client's end-to-end headers. A body that came gzip or deflate was inflated as we
    read it, so its Content-Encoding goes (we forward what we read). An answer we copy
    for its activity row may only come gzip or deflate (which we can read back): other
    encodings leave Accept-Encoding."""
    headers = [(k, v) for k, v in end_to_end_headers(request.headers)
               if k.lower() != "content-encoding" or v.lower() not in DECODED_CODINGS]
    exchange = request.get(EXCHANGE)
    if exchange is None or exchange.copy is None:
        return headers
    return [(k, readable_codings(v) if k.lower() == "accept-encoding" else v) for k, v in headers]


def readable_codings(accept_encoding: str) -> str:
    """The codings of an Accept-Encoding list that we can decompress: gzip and deflate."""
    codings = [c.strip() for c in accept_encoding.split(",")]
    return ", ".join(c for c in codings if c.split(";")[0].strip().lower() in ("gzip", "deflate"))


def forwarded_headers(request: web.BaseRequest) -> list[tuple[str, str]]:
    """For a local upstream: the client's headers (Host too), X-Forwarded-For extended."""
    prior = request.headers.get("X-Forwarded-For")
    headers = [(k, v) for k, v in request_headers(request) if k.lower() != "x-forwarded-for"]
    headers.append(("X-Forwarded-For", f"{prior}, {request.remote}" if prior else request.remote or ""))
    return headers


def peer_headers(request: web.BaseRequest, peer: PeerConfig) -> list[tuple[str, str]]:
    """For a peer: Host is the peer's; its apiKey, when set, replaces the client's credentials."""
    drop = {"host"} | ({"authorization", "x-api-key"} if peer.api_key else set())
    headers = [(k, v) for k, v in request_headers(request) if k.lower() not in drop]
    if peer.api_key:
        headers += [("Authorization", f"Bearer {peer.api_key}"), ("x-api-key", peer.api_key)]
    return headers


def unsent_default_headers(request: web.BaseRequest) -> list[str]:
    """Headers aiohttp would add by itself, which the upstream must not see if the client sent none."""
    return [h for h in ("User-Agent", "Accept-Encoding", "Accept", "Content-Type") if h not in request.headers]


STREAMING = web.RequestKey("streaming", "CountedResponse")  # the answer, once its headers are sent


class CountedResponse(web.StreamResponse):
    """A streamed answer that counts the body bytes it wrote, so a stream the client cut short
    is still logged with its status and size. Each one is listed in `live` with the moment a
    write to its client began to wait (0 while none waits), for the stalled-client watch."""

    live: weakref.WeakSet[CountedResponse] = weakref.WeakSet()
    written = 0
    tail = b""  # the last bytes written: whether a broken-off stream ended between two events
    waiting_since = 0.0
    transport: asyncio.Transport | None = None
    label = ""  # the request, as a log line names it

    async def prepare(self, request: web.BaseRequest) -> Any:
        if not self.prepared:  # (aiohttp calls it again once the handler has returned it)
            request[STREAMING] = self
            self.transport, self.label = request.transport, request_label(request)
            self.live.add(self)
        return await super().prepare(request)

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        self.waiting_since = time.monotonic()
        try:
            await super().write(data)
        finally:
            self.waiting_since = 0.0
        self.written += len(data)
        self.tail = (self.tail + bytes(data[-4:]))[-4:]

    def between_events(self) -> bool:
        """An event stream whose every event so far is complete."""
        ended = not self.tail or self.tail.endswith((b"\n\n", b"\r\n\r\n", b"\r\r"))
        return ended and self.content_type == "text/event-stream"


SEND_STEP = 1 << 20


class SlicedBody(aiohttp.payload.BytesPayload):
    """A request body sent upstream a MiB at a time, the transport drained between slices, so
    that the event loop never copies tens of MB into a socket buffer in one go."""

    async def write_with_length(self, writer: aiohttp.abc.AbstractStreamWriter, content_length: int | None) -> None:
        view = memoryview(self._value)[:content_length]
        for at in range(0, len(view), SEND_STEP):
            await writer.write(view[at:at + SEND_STEP])

    async def write(self, writer: aiohttp.abc.AbstractStreamWriter) -> None:
        await self.write_with_length(writer, None)


# Plain-http upstreams (the servers we start, http peers) get their requests from a small
# HTTP/1.1 client of our own: the request leaves in one write, and the answer's bytes go to the
# relay as they arrive, de-chunked. aiohttp's client, kept for https, proxies, websockets and our
# own checks, costs about a tenth of a millisecond more per request: request and response
# objects, a task per request body, its stream reader.

MAX_ANSWER_HEAD = 1 << 20  # an answer's status line and headers
MAX_CHUNK_LINE = 4096  # a chunk's size line, extensions included
ANSWER_HIGH_WATER = 1 << 18  # answer bytes the relay has not taken yet before the upstream is paused
BODILESS_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "CONNECT"})  # no Content-Length: 0 for these


class BadAnswer(Exception):
    """What an upstream sent is not an HTTP/1.x answer; the message says where it went wrong."""


class Dropped(Exception):
    """The connection closed (or failed) before an answer's head had arrived."""


@dataclass
class Answer:
    """An upstream's answer, its head read, its body still to come. Shaped as aiohttp's
    ClientResponse is, as far as the relay reads one: status, reason, headers, and
    `content.iter_any()` for the body. Leaving its `async with` gives the connection back
    for another request if the body was read to its end, and closes it otherwise."""

    status: int
    reason: str
    headers: multidict.CIMultiDict
    content: UpstreamConnection

    async def __aenter__(self) -> Answer:
        return self

    async def __aexit__(self, *exc_info) -> None:
        self.content.release()


# In an answer's head, once its CRLFs are LFs: control characters other than tab and LF (a CR
# left is a bare one).
HEAD_CONTROL = re.compile(rb"[\x00-\x08\x0b-\x1f\x7f]")
HEADER_NAME = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def parse_answer_head(head: bytes) -> tuple[int, str, multidict.CIMultiDict, bool]:
    """Status, reason, headers and whether the answer is HTTP/1.1, from its head (CRLF or bare
    LF line ends, without the blank line). Folded header lines are joined, as Go joins them."""
    text = head.replace(b"\r\n", b"\n")
    text = text[:-1] if text.endswith(b"\r") else text
    control = HEAD_CONTROL.search(text)
    if control:
        raise BadAnswer(f"a control character {control[0]!r} in the head")
    lines = text.split(b"\n")
    version, _, rest = lines[0].partition(b" ")
    code, _, reason = rest.partition(b" ")
    if version not in (b"HTTP/1.1", b"HTTP/1.0") or len(code) != 3 or not code.isdigit():
        raise BadAnswer(f"malformed status line {printable(lines[0][:100].decode('latin-1'))!r}")
    if b"\n " in text or b"\n\t" in text:
        lines = unfolded(lines)
    fields = [line.partition(b":") for line in lines[1:]]
    for name, colon, _value in fields:
        if not colon or not HEADER_NAME.fullmatch(name):
            line = name + colon + _value
            raise BadAnswer(f"malformed header line {printable(line[:100].decode('latin-1'))!r}")
    headers = multidict.CIMultiDict([(name.decode("latin-1"), value.strip(b" \t").decode("utf-8", "surrogateescape"))
                                     for name, _colon, value in fields])
    return int(code), reason.decode("utf-8", "replace"), headers, version == b"HTTP/1.1"


def unfolded(lines: list[bytes]) -> list[bytes]:
    """Header lines with each continuation line (one that starts with a space or tab) joined to
    the line before it by one space."""
    joined = lines[:2]
    for line in lines[2:]:
        if line[:1] in (b" ", b"\t"):
            joined[-1] = joined[-1].rstrip(b" \t") + b" " + line.strip(b" \t")
        else:
            joined.append(line)
    return joined


class Body(Named):
    """How the rest of an answer is framed, or where the connection stands."""

    IDLE = "idle"  # no request on it; bytes that arrive now make it untrustworthy
    HEAD = "head"  # waiting for an answer's status line and headers
    LENGTH = "length"  # Content-Length bytes, `remaining` of them still to come
    CHUNK_SIZE = "chunk size"  # a chunk's size line
    CHUNK_DATA = "chunk data"  # `remaining` bytes of a chunk
    CHUNK_END = "chunk end"  # the CRLF after a chunk's data
    TRAILERS = "trailers"  # trailer lines after the last chunk, up to a blank line
    UNTIL_CLOSE = "until close"  # everything until the upstream closes the connection


class UpstreamConnection(asyncio.Protocol):
    """One kept-alive HTTP/1.1 connection to an upstream. It sends a request, reads the
    answer's head, and queues its body for one reader, de-chunked; while the reader is more than
    ANSWER_HIGH_WATER behind, the upstream is not read from (TCP pushes back on it)."""

    def __init__(self, pool: Connections) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.reused = False  # it carried an answer before this request
        self.answered = False  # a byte of an answer arrived: the request got there, never resend it
        self.reusable = True  # nothing yet says this connection cannot carry another request
        self.state = Body.IDLE
        self.idle_since = 0.0
        self._method = ""
        self._unparsed = bytearray()  # a head, size line or trailer not yet whole
        self._scanned = 0  # bytes of an incomplete head already searched for its end
        self._remaining = 0
        self._head: asyncio.Future[Answer] | None = None
        self._chunks: collections.deque[bytes] = collections.deque()
        self._queued = 0  # bytes in _chunks
        self._paused = False  # reading from the upstream paused: the reader is behind
        self._readable: asyncio.Future[None] | None = None
        self._finished = False  # the body ended
        self._error: Exception | None = None  # the body broke off
        self._write_paused = False  # the transport holds more than it wants: wait before writing more
        self._sender: asyncio.Future[None] | None = None  # wakes a big body's sender: drained, answered, lost

    # -- the request ---------------------------------------------------------------------

    async def exchange(self, method: str, head: bytes, body: bytes) -> Answer:
        """Send one request; the answer, once its head is read. Raises Dropped or BadAnswer."""
        if self.transport.is_closing():
            raise Dropped("the upstream closed the connection before it answered")
        self._method, self.state, self.answered = method, Body.HEAD, False
        self._finished, self._error, self._queued = False, None, 0
        self._head = asyncio.get_running_loop().create_future()
        if len(body) <= SEND_STEP:
            self.transport.write(head + body)
        else:  # a MiB at a time, drained between slices: no copy of tens of MB into the socket buffer
            self.transport.write(head)
            view = memoryview(body)
            for at in range(0, len(view), SEND_STEP):
                await self._drain()
                if self._head.done() or self.transport.is_closing():
                    # It answered (a 413?) before taking the whole body, or dropped: _head says which.
                    self.reusable = False
                    break
                self.transport.write(view[at:at + SEND_STEP])
        return await self._head

    async def _drain(self) -> None:
        """Until the upstream has taken what was written, or its answer has come (or failed)."""
        while self._write_paused and not self._head.done() and not self.transport.is_closing():
            self._sender = asyncio.get_running_loop().create_future()
            await self._sender

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake_sender()

    def _wake_sender(self) -> None:
        if self._sender is not None and not self._sender.done():
            self._sender.set_result(None)

    # -- the answer, as bytes arrive ---------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.answered = True
        if self.state is Body.LENGTH and not self._unparsed:  # the common case: body bytes, no framing
            self._take_length(data)
            return
        self._unparsed += data
        try:
            self._parse()
        except BadAnswer as e:
            self._fail(e)

    def _parse(self) -> None:
        unparsed = self._unparsed
        while unparsed:
            state = self.state
            if state is Body.HEAD:
                end, blank = self._head_end()
                if end > MAX_ANSWER_HEAD or (end < 0 and len(unparsed) > MAX_ANSWER_HEAD):
                    raise BadAnswer(f"an answer's head over {MAX_ANSWER_HEAD} bytes")
                if end < 0:
                    return
                head = bytes(unparsed[:end])
                del unparsed[:end + blank]
                self._scanned = 0
                self._read_head(head)
            elif state is Body.LENGTH:
                data = bytes(unparsed)
                unparsed.clear()
                self._take_length(data)
            elif state is Body.CHUNK_SIZE or state is Body.TRAILERS:
                line = self._line()
                if line is None:
                    return
                if state is Body.TRAILERS:
                    if not line:
                        self._end()
                    continue
                size = line.split(b";", 1)[0].strip()
                if not 0 < len(size) <= 16 or size.strip(b"0123456789abcdefABCDEF"):
                    raise BadAnswer(f"malformed chunk size {printable(size[:40].decode('latin-1'))!r}")
                self._remaining = int(size, 16)
                self.state = Body.CHUNK_DATA if self._remaining else Body.TRAILERS
            elif state is Body.CHUNK_DATA:
                data = bytes(unparsed[:self._remaining])
                del unparsed[:len(data)]
                self._remaining -= len(data)
                if not self._remaining:
                    self.state = Body.CHUNK_END
                self._queue(data)
            elif state is Body.CHUNK_END:
                line = self._line()
                if line is None:
                    return
                if line:
                    raise BadAnswer("a chunk longer than its size")
                self.state = Body.CHUNK_SIZE
            elif state is Body.UNTIL_CLOSE:
                self._queue(bytes(unparsed))
                unparsed.clear()
            else:  # bytes nobody asked for: whatever they are, the connection is out of step
                unparsed.clear()
                self.reusable = False
                self.transport.close()

    def _head_end(self) -> tuple[int, int]:
        """Where the head ends (its blank line: CRLF or a bare LF) and the blank line's length;
        -1 until it has arrived. Each byte is searched once, however the head is split."""
        start = max(self._scanned - 2, 0)
        self._scanned = len(self._unparsed)
        crlf, lf = self._unparsed.find(b"\n\r\n", start), self._unparsed.find(b"\n\n", start)
        if crlf >= 0 and (lf < 0 or crlf < lf):
            return crlf, 3
        return lf, 2

    def _line(self) -> bytes | None:
        """The next line of chunk framing, without its line end; None until it is whole."""
        end = self._unparsed.find(b"\n")
        if end > MAX_CHUNK_LINE or (end < 0 and len(self._unparsed) > MAX_CHUNK_LINE):
            raise BadAnswer(f"a chunk size or trailer line over {MAX_CHUNK_LINE} bytes")
        if end < 0:
            return None
        line = bytes(self._unparsed[:end])
        del self._unparsed[:end + 1]
        return line[:-1] if line.endswith(b"\r") else line

    def _read_head(self, head: bytes) -> None:
        status, reason, headers, http11 = parse_answer_head(head)
        if 100 <= status < 200 and status != 101:
            return  # an interim answer (100 Continue, 103 Early Hints): the real one follows
        connection = header_tokens(headers, "Connection")
        self.reusable = self.reusable and ("keep-alive" in connection if not http11 else "close" not in connection)
        self.state = self._framing(status, headers)
        if self.state is Body.UNTIL_CLOSE:
            self.reusable = False
        if self._head is not None and not self._head.done():
            self._head.set_result(Answer(status, reason, headers, self))
            self._wake_sender()
        if self.state is Body.LENGTH and not self._remaining:
            self._end()

    def _framing(self, status: int, headers: multidict.CIMultiDict) -> Body:
        """How the body is framed (HTTP/1.1's rules, in its order); _remaining for a length."""
        if "Transfer-Encoding" in headers:
            # A Content-Length beside it is wrong and not passed on; the connection is not trusted
            # for another answer (one server's framing against another's is how smuggling works).
            if headers.popall("Content-Length", None):
                self.reusable = False
            chunked = header_tokens(headers, "Transfer-Encoding")[-1:] == ["chunked"]
            framing = Body.CHUNK_SIZE if chunked else Body.UNTIL_CLOSE
        else:
            length = self._content_length(headers)
            self._remaining = length or 0
            framing = Body.UNTIL_CLOSE if length is None else Body.LENGTH
        if self._method == "HEAD" or status in (204, 304):
            self._remaining = 0
            return Body.LENGTH
        return framing

    @staticmethod
    def _content_length(headers: multidict.CIMultiDict) -> int | None:
        lengths = {value.strip() for value in headers.getall("Content-Length", ())}
        if not lengths:
            return None
        length = lengths.pop()
        if lengths or not length.isdigit() or not length.isascii() or len(length) > 18:
            raise BadAnswer(f"invalid Content-Length {headers.getall('Content-Length')}")
        return int(length)

    def _take_length(self, data: bytes) -> None:
        if len(data) > self._remaining:  # more than the answer said it had: out of step
            data = data[:self._remaining]
            self.reusable = False
        self._remaining -= len(data)
        self._queue(data)
        if not self._remaining:
            self._end()

    def _queue(self, data: bytes) -> None:
        if data:
            self._chunks.append(data)
            self._queued += len(data)
            if self._queued > ANSWER_HIGH_WATER and not self._paused:
                self._paused = True
                self.transport.pause_reading()
            self._wake()

    def _end(self) -> None:
        self.state, self._finished = Body.IDLE, True
        if self._unparsed:  # bytes after the answer's end
            self.reusable = False
        self._wake()

    def _fail(self, error: Exception) -> None:
        """Before the head: the request fails. In the body: the reader gets what came, then a
        ClientPayloadError, which the relay takes as an upstream that broke off. Either way the
        answer is over and the connection is dropped."""
        self.reusable = False
        if self._head is not None and not self._head.done():
            self._head.set_exception(error)
            self._wake_sender()
        elif not self._finished and self._error is None:
            if isinstance(error, BadAnswer):
                error = aiohttp.ClientPayloadError(f"malformed answer: {error}")
            elif not isinstance(error, aiohttp.ClientPayloadError):
                error = aiohttp.ClientPayloadError(str(error))
            self._error = error
            self._wake()
        self.state = Body.IDLE
        if self.transport is not None:
            self.transport.abort()

    def _wake(self) -> None:
        if self._readable is not None and not self._readable.done():
            self._readable.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self.reusable = False
        self.pool.forget(self)
        self._wake_sender()
        if self.state is Body.UNTIL_CLOSE and exc is None:
            self._end()
        elif self.state is Body.HEAD:
            self._fail(Dropped(f"the upstream closed the connection before it answered"
                               f"{f': {error_text(exc)}' if exc else ''}"))
        elif self.state is not Body.IDLE:
            self._fail(aiohttp.ClientPayloadError(f"the upstream closed the connection in the middle of the answer"
                                                  f"{f': {error_text(exc)}' if exc else ''}"))

    # -- the body, for its one reader ------------------------------------------------------

    async def iter_any(self) -> AsyncIterator[bytes]:
        """The body's bytes as they come, each time all there are."""
        while True:
            while not self._chunks:
                if self._finished:
                    return
                if self._error is not None:
                    raise self._error
                self._readable = asyncio.get_running_loop().create_future()
                await self._readable
            data = self._chunks.popleft() if len(self._chunks) == 1 else b"".join(self._chunks)
            self._chunks.clear()
            self._queued = 0
            if self._paused:
                self._paused = False
                self.transport.resume_reading()
            yield data

    def release(self) -> None:
        """Back to the pool if the answer was read to its end and nothing spoke against it;
        closed otherwise (a reader that left early, a broken or out-of-step answer, a request
        not wholly handed to the system, answered before the upstream took it)."""
        if (self._finished and not self._chunks and self.reusable and not self.transport.is_closing()
                and not self.transport.get_write_buffer_size()):
            self.reused = True
            self.pool.keep(self)
        else:
            self.close()

    def drop(self, why: str) -> None:
        """Closed from outside (its server stopped, or we shut down): a request waiting for its
        answer fails with `why`, a body being read breaks off with it."""
        self._fail(Dropped(why))

    def close(self) -> None:
        """Its request's own end, at once: what is still buffered for the upstream (a request
        body it stopped taking) is dropped, not waited on."""
        self.reusable = False
        if self._head is not None and not self._head.done():
            self._head.cancel()  # its request was given up; nobody will ask how it ended
        if self.transport is not None:
            self.transport.abort()


CONNECTIONS_CLOSED = "the connection was closed: the server stopped, or llama-swap is shutting down"


class Connections:
    """The kept-alive connections to one plain-http upstream, most recently used first, each
    closed after `timeouts.idle_conn` seconds unused (0: kept). No limit on their number: the
    scheduler decides how many requests an upstream gets at once."""

    def __init__(self, base_url: str, timeouts: Timeouts) -> None:
        url = URL(base_url)
        self.host, self.port = url.raw_host or "", url.port or 80
        self.prefix = url.raw_path.rstrip("/")
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.address = f"{host}:{self.port}"
        self.host_header = host if self.port == 80 else self.address
        self.timeouts = timeouts
        self.idle: list[UpstreamConnection] = []
        self.open: set[UpstreamConnection] = set()
        self.closed = False
        self._sweep: asyncio.TimerHandle | None = None

    async def send(self, method: str, path_qs: str, headers: list[tuple[str, str]], body: bytes) -> Answer:
        """The answer to a request, its head read.

        llama-server closes a kept-alive connection right after a streamed answer while it says
        keep-alive, so the next request on it finds it gone before any answer. Such a request
        (a kept-alive connection, not one byte of answer) is sent once more, on a fresh
        connection, whatever its method: the server cannot have answered it, though unlike Go's
        transport (which resends only requests it knows went unread, or idempotent ones) we
        cannot tell whether it read it."""
        head = request_head(method, self.prefix + path_qs, self.host_header, headers, body)
        connection = self._take() or await self._connect()
        try:
            return await self._exchange(connection, method, head, body)
        except Dropped as e:
            if not connection.reused or connection.answered:
                raise UpstreamError(Failure.UNREACHABLE, str(e)) from None
        try:
            return await self._exchange(await self._connect(), method, head, body)
        except Dropped as e:
            raise UpstreamError(Failure.UNREACHABLE, str(e)) from None

    @staticmethod
    async def _exchange(connection: UpstreamConnection, method: str, head: bytes, body: bytes) -> Answer:
        try:
            return await connection.exchange(method, head, body)
        except BadAnswer as e:
            connection.close()
            raise UpstreamError(Failure.UNREACHABLE, f"malformed answer: {e}") from None
        except BaseException:  # dropped, cancelled (the client left, the header timeout): unusable
            connection.close()
            raise

    def _take(self) -> UpstreamConnection | None:
        while self.idle:
            connection = self.idle.pop()
            if not connection.transport.is_closing():
                return connection
        return None

    async def _connect(self) -> UpstreamConnection:
        """A new connection; none once the pool is closed (even one closed while it was made)."""
        if self.closed:
            raise UpstreamError(Failure.UNREACHABLE, CONNECTIONS_CLOSED)
        loop = asyncio.get_running_loop()
        try:
            async with time_limit(self.timeouts.connect or None):
                infos = await self._addresses()
                for number, info in enumerate(infos):
                    sock = keepalive_socket(self.timeouts.keepalive, info)
                    try:
                        sock.setblocking(False)
                        await loop.sock_connect(sock, info[4])
                    except OSError:
                        sock.close()
                        if number == len(infos) - 1:
                            raise
                        continue
                    except BaseException:
                        sock.close()
                        raise
                    _transport, connection = await loop.create_connection(lambda: UpstreamConnection(self), sock=sock)
                    if self.closed:
                        connection.close()
                        raise UpstreamError(Failure.UNREACHABLE, CONNECTIONS_CLOSED)
                    self.open.add(connection)
                    return connection
        except asyncio.TimeoutError:
            raise UpstreamError(Failure.UNREACHABLE, f"dial tcp {self.address}: i/o timeout") from None
        except socket.gaierror as e:
            reason = "no such host" if e.errno == socket.EAI_NONAME else (e.strerror or error_text(e)).lower()
            raise UpstreamError(Failure.UNREACHABLE, f"dial tcp: lookup {self.host}: {reason}") from None
        except OSError as e:
            reason = os.strerror(e.errno).lower() if e.errno else error_text(e)
            raise UpstreamError(Failure.UNREACHABLE, f"dial tcp {self.address}: connect: {reason}") from None
        raise UpstreamError(Failure.UNREACHABLE, f"dial tcp {self.address}: no address")

    async def _addresses(self) -> list[tuple]:
        try:  # an IP address needs no lookup, and so no turn in the executor's threads
            return socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST)
        except socket.gaierror:
            return await asyncio.get_running_loop().getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)

    def keep(self, connection: UpstreamConnection) -> None:
        if self.closed:
            connection.close()
            return
        connection.idle_since = time.monotonic()
        self.idle.append(connection)
        if self.timeouts.idle_conn and self._sweep is None:
            self._sweep = asyncio.get_running_loop().call_later(self.timeouts.idle_conn, self._close_idle)

    def _close_idle(self) -> None:
        """Close the connections unused for idle_conn seconds; come back for the next to expire."""
        self._sweep = None
        expired = time.monotonic() - self.timeouts.idle_conn
        for connection in [c for c in self.idle if c.idle_since <= expired]:
            self.idle.remove(connection)
            connection.close()
        if self.idle:
            wait = min(c.idle_since for c in self.idle) - expired
            self._sweep = asyncio.get_running_loop().call_later(max(wait, 0.05), self._close_idle)

    def forget(self, connection: UpstreamConnection) -> None:
        self.open.discard(connection)
        with contextlib.suppress(ValueError):
            self.idle.remove(connection)

    def close(self) -> None:
        """Close every connection: a request waiting for its answer fails (a 502), a body being
        relayed breaks off, as when the server goes."""
        self.closed = True
        if self._sweep is not None:
            self._sweep.cancel()
        for connection in list(self.open):
            connection.drop(CONNECTIONS_CLOSED)


def request_head(method: str, target: str, host: str, headers: list[tuple[str, str]], body: bytes) -> bytes:
    """A request's line and headers as they go on the wire: the upstream's Host first unless the
    client sent one, the headers in their order, and a Content-Length where aiohttp would put one.
    Text that would end a line early is refused, not sent."""
    lines = [f"{method} {target} HTTP/1.1"]
    if not any(name.lower() == "host" for name, _ in headers):
        lines.append(f"Host: {host}")
    lines += [f"{name}: {value}" for name, value in headers]
    if body or method not in BODILESS_METHODS:
        lines.append(f"Content-Length: {len(body)}")
    text = "\r\n".join(lines)
    if not text.count("\n") == text.count("\r") == len(lines) - 1 or " " in target:
        raise UpstreamError(Failure.UNREACHABLE, "a request line or header with a line break or a space in its "
                                                 "path cannot be sent")
    return (text + "\r\n\r\n").encode("utf-8", "surrogateescape")


async def send_upstream(request: web.Request, upstream: Upstream, path_qs: str, body: bytes,
                        headers: list[tuple[str, str]]) -> Answer | aiohttp.ClientResponse:
    """The upstream's answer with its headers read, its body still to come."""
    try:
        async with time_limit(upstream.header_timeout):
            if upstream.connections is not None:
                return await upstream.connections.send(request.method, path_qs, headers, body)
            return await send_by_session(request, upstream, path_qs, body, headers)
    except asyncio.TimeoutError:
        raise UpstreamError(Failure.TIMED_OUT,
                            f"timeout awaiting response headers after {go_duration(upstream.header_timeout)}") from None


# As with our own connections: llama-server closes a connection right after a streamed answer
# while it says keep-alive, so the next request on that pooled connection finds it gone before
# anything was answered, and is sent again on another.
STALE_CONNECTION_RETRIES = 2


async def send_by_session(request: web.Request, upstream: Upstream, path_qs: str, body: bytes,
                          headers: list[tuple[str, str]]) -> aiohttp.ClientResponse:
    """send_upstream through aiohttp's client: https, or through a proxy."""
    for attempt in range(STALE_CONNECTION_RETRIES + 1):
        data = SlicedBody(body) if len(body) > SEND_STEP else body or None
        try:
            return await upstream.session.request(request.method, upstream.url(path_qs), headers=headers, data=data,
                                                  allow_redirects=False,
                                                  skip_auto_headers=unsent_default_headers(request))
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as e:
            # A fresh connection that fails (ClientConnectorError) and the last try are final.
            if attempt < STALE_CONNECTION_RETRIES and not isinstance(e, aiohttp.ClientConnectorError):
                continue
            raise UpstreamError(Failure.UNREACHABLE, error_text(e)) from None
        except aiohttp.ClientError as e:
            raise UpstreamError(Failure.UNREACHABLE, error_text(e)) from None
    raise AssertionError("the last attempt returns or raises")


async def relay(request: web.Request, upstream: Upstream, path_qs: str, body: bytes,
                headers: list[tuple[str, str]], log: ProxyLog) -> web.StreamResponse:
    """Send the request upstream and copy the answer back as it arrives: status, headers, bytes.

    Every chunk is written (and flushed) the moment it is read; nothing is parsed. If the client
    goes away, the handler is cancelled and leaving this block closes the upstream connection.
    """
    async with await send_upstream(request, upstream, path_qs, body, headers) as answer:
        response = CountedResponse(status=answer.status, reason=answer.reason)
        for key, value in end_to_end_headers(answer.headers):
            response.headers.add(key, value)
        if "content-length" in answer.headers:
            response.content_length = int(answer.headers["Content-Length"])
        if "text/event-stream" in answer.headers.get("Content-Type", ""):
            response.headers["X-Accel-Buffering"] = "no"
        elif response.content_length is not None:
            # An answer of known length: its headers wait for its first bytes and leave with them,
            # one send and one wake of the client instead of two (Go's server buffers them too).
            # A stream's headers go at once: they tell its client the answer has begun.
            response._send_headers_immediately = False
        await response.prepare(request)
        exchange = request.get(EXCHANGE)
        if exchange is not None:
            exchange.responding(response)
        try:
            await copy_body(answer, response, exchange)
            await response.write_eof()
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            if request.transport is None or request.transport.is_closing():
                return response  # the client left; leaving the block closes the upstream request
            log.info(f"{upstream.label} recovered from upstream disconnection during streaming: {error_text(e)}")
            if not response.between_events() or response.content_length is not None:
                # Headers still held back go out first: a client that got no answer at all may
                # take it for a request never received, and send it again (a peer in front does).
                with contextlib.suppress(ConnectionError):
                    await response.write(b"")
                request.transport.close()  # a cut stream must look cut to the client, not complete
                return response
            what = "stopped sending" if isinstance(e, asyncio.TimeoutError) else "closed the connection"
            message = f"upstream {upstream.label.rstrip(':')} {what} in the middle of the stream"
            if exchange is not None:
                exchange.failure = (502, message)
            with contextlib.suppress(ConnectionError):  # the client may leave meanwhile
                await response.write(stream_error_event(request.path, message))
                await response.write_eof()
        return response


def stream_error_event(path: str, message: str, code: str = "upstream_disconnected") -> bytes:
    """The last event of a stream that cannot go on (its upstream broke off, its model failed to
    start), as its clients' SDKs understand an error event (Anthropic's for /v1/messages,
    OpenAI's otherwise), so they raise an error instead of taking a short answer for a whole one."""
    if path.startswith("/v1/messages"):
        event = {"type": "error", "error": {"type": "api_error", "message": message}}
        return b"event: error\ndata: " + json.dumps(event).encode() + b"\n\n"
    envelope = {"src": "llama-swap", "error": {"message": message, "type": "server_error", "param": None, "code": code}}
    return b"data: " + json.dumps(envelope).encode() + b"\n\n"


class PeerSessions:
    """One pooled session (and our own connections, where they serve) per peer setting, kept
    across reloads that leave the peer as it was."""

    def __init__(self) -> None:
        self.upstreams: dict[tuple[str, Timeouts], tuple[aiohttp.ClientSession, Connections | None]] = {}

    def upstream(self, peer: PeerConfig) -> Upstream:
        key = (peer.proxy, peer.timeouts)
        if key not in self.upstreams:
            self.upstreams[key] = (upstream_session(peer.timeouts, peer.proxy),
                                   own_connections(peer.timeouts, peer.proxy))
        session, connections = self.upstreams[key]
        return Upstream(session, peer.proxy, peer.timeouts.response_header or None, f"peer {peer.id}:", connections)

    async def close(self) -> None:
        for _session, connections in self.upstreams.values():
            if connections is not None:
                connections.close()
        await asyncio.gather(*(session.close() for session, _connections in self.upstreams.values()))


def is_websocket(request: web.BaseRequest) -> bool:
    """An upgrade to a websocket (comma lists and any case accepted)."""
    return "upgrade" in header_tokens(request.headers, "Connection") and \
        "websocket" in header_tokens(request.headers, "Upgrade")


# An upstream that answers a websocket upgrade with anything but 101 has said what the client
# must hear (a 401, a 404, a page). aiohttp closes such an answer inside ws_connect before we see
# it, so the session's response check (which runs there, in our task) keeps it for us: the
# context variable says which request wants it kept.
websocket_refusal: contextvars.ContextVar[dict | None] = contextvars.ContextVar("websocket_refusal", default=None)
REFUSAL_BODY_LIMIT = 1 << 20  # a refusal is a short text; more than this is cut
REFUSAL_READ_TIMEOUT = 10.0


async def keep_websocket_refusal(answer: aiohttp.ClientResponse) -> None:
    """An upstream session's response check: for every other request, nothing."""
    kept = websocket_refusal.get()
    if kept is None or answer.status == 101:
        return
    body = bytearray()

    async def read() -> None:
        async for chunk in answer.content.iter_any():
            body.extend(chunk)
            if len(body) >= REFUSAL_BODY_LIMIT:
                return
    with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
        await asyncio.wait_for(read(), REFUSAL_READ_TIMEOUT)
    kept.update(status=answer.status, reason=answer.reason, headers=answer.headers.copy(),
                body=bytes(body[:REFUSAL_BODY_LIMIT]))


async def relay_websocket(request: web.Request, upstream: Upstream, path_qs: str,
                          headers: list[tuple[str, str]], largest: int, live: weakref.WeakSet) -> web.StreamResponse:
    """A websocket to the upstream, and every message relayed both ways until one side closes.
    A message is relayed once whole, so one past `largest` bytes (either way) closes the
    socket with 1009 instead of growing without bound. An upstream that refuses the upgrade
    is answered for: its status, headers and body. `live` lists the sockets open, for a
    shutdown to close."""
    protocols = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()]
    headers = [(k, v) for k, v in headers if not k.lower().startswith("sec-websocket-")]
    refusal: dict[str, Any] = {}
    marker = websocket_refusal.set(refusal)
    try:
        upstream_ws = await upstream.session.ws_connect(upstream.url(path_qs), headers=headers, protocols=protocols,
                                                        max_msg_size=largest)
    except aiohttp.WSServerHandshakeError as e:
        if refusal:
            return refused_upgrade(refusal)
        raise UpstreamError(Failure.BAD_UPGRADE,
                            f"answered the websocket upgrade wrongly: {e.status} {e.message}") from None
    except (aiohttp.ClientError, asyncio.TimeoutError) as e:
        raise UpstreamError(Failure.UNREACHABLE, error_text(e)) from None
    finally:
        websocket_refusal.reset(marker)
    client = web.WebSocketResponse(protocols=[upstream_ws.protocol] if upstream_ws.protocol else (),
                                   max_msg_size=largest)
    live.add(client)
    try:
        await client.prepare(request)
        pumps = [asyncio.create_task(pump_messages(client, upstream_ws)),
                 asyncio.create_task(pump_messages(upstream_ws, client))]
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in pumps:
                task.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
    finally:
        live.discard(client)
        await upstream_ws.close()
        if client.prepared:
            await client.close()
    return client


def refused_upgrade(refusal: Mapping[str, Any]) -> web.Response:
    return web.Response(status=refusal["status"], reason=refusal["reason"], body=refusal["body"],
                        headers=multidict.CIMultiDict(end_to_end_headers(refusal["headers"])))


async def pump_messages(source, sink) -> None:
    async for message in source:
        if message.type == aiohttp.WSMsgType.TEXT:
            await sink.send_str(message.data)
        elif message.type == aiohttp.WSMsgType.BINARY:
            await sink.send_bytes(message.data)


async def copy_body(upstream: aiohttp.ClientResponse, response: web.StreamResponse, exchange: Exchange | None) -> None:
    async for chunk in upstream.content.iter_any():
        await response.write(chunk)
        if exchange is not None:
            exchange.sent(chunk)


async def relay_into(response: web.StreamResponse, request: web.Request, upstream: Upstream, path_qs: str,
                     body: bytes, headers: list[tuple[str, str]]) -> None:
    """Only the upstream's body, into a response already under way (the loading stream's)."""
    async with await send_upstream(request, upstream, path_qs, body, headers) as answer:
        try:
            await copy_body(answer, response, request.get(EXCHANGE))
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            raise UpstreamError(Failure.CUT_SHORT, error_text(e)) from None


def error_text(error: BaseException) -> str:
    return str(error) or type(error).__name__


###############################################################################
# 17. Activity: what an answer says ###########################################
###############################################################################

# Reading a finished answer for its tokens, speeds and error message, as the original's
# activity rows record them: streamed events, JSON bodies, compressed or not.

# Messages are stored and shown verbatim; longer ones are cut here.
MAX_ERROR_MESSAGE = 500
# Where an error text may sit in a failed response, first non-empty string wins.
ERROR_MESSAGE_PATHS = ("error.message", "error", "message", "detail")
# Where a usage object may sit in one streamed event: OpenAI chat and completions, the
# Responses API (`response.completed`), Anthropic's `message_start`.
STREAM_USAGE_PATHS = ("usage", "response.usage", "message.usage")
INPUT_TOKEN_PATHS = ("prompt_tokens", "input_tokens")
OUTPUT_TOKEN_PATHS = ("completion_tokens", "output_tokens")
CACHED_TOKEN_PATHS = ("cache_read_input_tokens", "input_tokens_details.cached_tokens",
                      "prompt_tokens_details.cached_tokens")
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
_MISSING = object()

@dataclass(frozen=True)
class Tokens:
    """The "tokens" object of an activity row.

    `Tokens()`, every field 0, is the row written when nothing could be read: a failed
    request, an empty or undecodable body, a body without usage data. A response that was
    read uses -1 for what the upstream did not say (no cache count, no speeds, no
    speculative decoding), so the UI can tell "unknown" from "zero".
    """

    cache_tokens: int = 0
    draft_tokens: int = 0
    draft_acc_tokens: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    prompt_per_second: float = 0.0
    tokens_per_second: float = 0.0

    def as_json(self) -> dict[str, int | float]:
        return {"cache_tokens": self.cache_tokens, "draft_tokens": self.draft_tokens,
                "draft_acc_tokens": self.draft_acc_tokens, "input_tokens": self.input_tokens,
                "output_tokens": self.output_tokens,
                "prompt_per_second": go_float(self.prompt_per_second),
                "tokens_per_second": go_float(self.tokens_per_second)}


class DecompressionError(Exception):
    """A response said it was gzip or deflate but its bytes would not inflate."""


def measure_response(path: str, status: int, headers: Mapping[str, str], body: bytes,
                     wall_ms: int) -> tuple[Tokens, int, str]:
    """(tokens, duration_ms, error_msg) of one finished response, as the original's activity rows record them.

    `path` is the request path as forwarded, `body` the full (possibly compressed) copy of
    what the client got, `wall_ms` the time since the request arrived. The duration is the
    wall time unless llama-server reports a longer one.
    """
    encoding = header_value(headers, "Content-Encoding")
    if status != 200:
        try:
            body = decompress(encoding, body)
        except DecompressionError as exc:
            return Tokens(), wall_ms, f"response decode failed: {exc}"
        return Tokens(), wall_ms, error_message(status, body)
    if not body:
        return Tokens(), wall_ms, ""
    try:
        body = decompress(encoding, body)
    except DecompressionError as exc:
        return Tokens(), wall_ms, f"response decompression failed: {exc}"
    if "text/event-stream" in header_value(headers, "Content-Type").lower():
        readings = _read_stream(body)
    else:
        readings = _read_json(path, body)
    if readings is None:
        return Tokens(), wall_ms, ""
    tokens, duration_ms = readings.tokens(wall_ms)
    return tokens, duration_ms, ""


def header_value(headers: Mapping[str, str], name: str) -> str:
    """The first value of a header, whatever its case; "" when absent. Works for plain
    dicts as well as aiohttp's case-insensitive multidicts."""
    wanted = name.lower()
    return next((value for key, value in headers.items() if key.lower() == wanted), "")


def decompress(content_encoding: str, body: bytes) -> bytes:
    """The body as the upstream meant it. Only gzip and deflate are inflated: those are the
    only encodings the metered routes let clients ask for; anything else is kept."""
    encoding = content_encoding.strip().lower()
    if not body or encoding not in ("gzip", "deflate"):
        return body
    try:
        if encoding == "gzip":
            return gzip.decompress(body)
        return _inflate(body)
    except (OSError, EOFError, zlib.error) as exc:
        raise DecompressionError(str(exc)) from exc


def _inflate(body: bytes) -> bytes:
    """HTTP's deflate is zlib-wrapped by the RFC, but some servers send a raw stream."""
    try:
        return zlib.decompress(body)
    except zlib.error:
        return zlib.decompress(body, -zlib.MAX_WBITS)


def error_message(status: int, body: bytes) -> str:
    """What went wrong, for a non-200 row: the upstream's own words when its body says so,
    else the status line."""
    document = _loads_bounded(body, ERROR_MESSAGE_PATHS)
    for path in ERROR_MESSAGE_PATHS:
        text = _lookup(document, path)
        if isinstance(text, str) and text:
            if len(text) > MAX_ERROR_MESSAGE:
                return text[:MAX_ERROR_MESSAGE] + "..."
            return text
    return status_line(status)


@dataclass
class _Readings:
    """What one response said about itself, before it becomes a row's `Tokens`."""

    input_tokens: int = 0
    output_tokens: int = 0
    cache_tokens: int = -1
    timings: dict | None = None
    metrics: dict | None = None

    def tokens(self, wall_ms: int) -> tuple[Tokens, int]:
        """Tokens and duration (as the original's `buildMetrics` reads them). llama-server's own timings beat the
        usage counts, and vLLM's metrics beat both for speeds and drafts."""
        input_tokens, output_tokens, cached = self.input_tokens, self.output_tokens, self.cache_tokens
        draft, accepted = -1, -1
        prompt_speed, gen_speed = -1.0, -1.0
        duration_ms = wall_ms
        if self.timings is not None:
            timings = self.timings
            input_tokens = _as_int(timings.get("prompt_n"))
            output_tokens = _as_int(timings.get("predicted_n"))
            prompt_speed = _as_float(timings.get("prompt_per_second"))
            gen_speed = _as_float(timings.get("predicted_per_second"))
            upstream_ms = _as_float(timings.get("prompt_ms")) + _as_float(timings.get("predicted_ms"))
            duration_ms = max(wall_ms, _as_int(upstream_ms))
            if "cache_n" in timings:
                cached = _as_int(timings["cache_n"])
            if "draft_n" in timings and "draft_n_accepted" in timings:
                draft, accepted = _as_int(timings["draft_n"]), _as_int(timings["draft_n_accepted"])
        if self.metrics is not None:
            speculative = self.metrics.get("speculative_decoding")
            if (isinstance(speculative, dict) and "num_draft_tokens" in speculative
                    and "num_accepted_draft_tokens" in speculative):
                draft = _as_int(speculative["num_draft_tokens"])
                accepted = _as_int(speculative["num_accepted_draft_tokens"])
            first_token_seconds = _as_float(self.metrics.get("time_to_first_token_ms")) / 1000
            if first_token_seconds > 0:
                # vLLM gives no prompt speed; cached tokens were not processed, so leave them out.
                prompt_speed = _finite((input_tokens - max(cached, 0)) / first_token_seconds, prompt_speed)
            inter_token_ms = _as_float(self.metrics.get("mean_itl_ms"))
            if inter_token_ms > 0:
                gen_speed = _finite(1000 / inter_token_ms, gen_speed)
        tokens = Tokens(cache_tokens=cached, draft_tokens=draft, draft_acc_tokens=accepted,
                        input_tokens=input_tokens, output_tokens=output_tokens,
                        prompt_per_second=prompt_speed, tokens_per_second=gen_speed)
        return tokens, duration_ms


def _read_json(path: str, body: bytes) -> _Readings | None:
    """A whole JSON answer; None when it is not JSON or says nothing about tokens."""
    document = _loads_bounded(body, ("usage", "timings", "metrics"))
    if isinstance(document, list) and path.startswith("/infill"):
        # llama-server's /infill answers with an array; the last element carries the timings.
        last = document[-1] if document else None
        timings = last.get("timings") if isinstance(last, dict) else None
        return _Readings(timings=timings) if isinstance(timings, dict) else None
    if not isinstance(document, dict):
        return None
    usage, timings, metrics = (_object_at(document, key) for key in ("usage", "timings", "metrics"))
    if usage is None and timings is None and metrics is None:
        return None
    readings = _Readings(timings=timings, metrics=metrics)
    if usage is not None:
        readings.input_tokens, readings.output_tokens, readings.cache_tokens = _usage_counts(usage)
    return readings


def _read_stream(body: bytes) -> _Readings | None:
    """A server-sent event stream; None when no event carried usage, timings or metrics.

    Upstreams spread usage over several events (Anthropic sends input tokens at the start
    and output tokens at the end), so a count replaces the running one only when it is
    positive; a cache count may be 0.
    """
    readings, found = _Readings(), False
    for line in body.split(b"\n"):
        line = line.strip()
        if not line.startswith(b"data:"):
            continue
        data = line[len(b"data:"):].strip()
        if not data or data == b"[DONE]":
            continue
        event = _loads_bounded(data, (*STREAM_USAGE_PATHS, "timings", "metrics"))
        if not isinstance(event, dict):
            continue
        for path in STREAM_USAGE_PATHS:
            usage = _object_at(event, path)
            if usage is None:
                continue
            found = True
            input_tokens, output_tokens, cached = _usage_counts(usage)
            if input_tokens > 0:
                readings.input_tokens = input_tokens
            if output_tokens > 0:
                readings.output_tokens = output_tokens
            if cached >= 0:
                readings.cache_tokens = cached
        timings, metrics = _object_at(event, "timings"), _object_at(event, "metrics")
        if timings is not None:
            readings.timings, found = timings, True
        if metrics is not None:
            readings.metrics, found = metrics, True
    return readings if found else None


def _usage_counts(usage: dict) -> tuple[int, int, int]:
    """(input, output, cached) of a usage object in any dialect; cached is -1 when absent."""
    return (_as_int(_first_present(usage, INPUT_TOKEN_PATHS, 0)),
            _as_int(_first_present(usage, OUTPUT_TOKEN_PATHS, 0)),
            _as_int(_first_present(usage, CACHED_TOKEN_PATHS, -1)))


def _first_present(document: dict, paths: Sequence[str], default: Any) -> Any:
    """The value at the first path that exists, even if it is 0: the first name wins."""
    for path in paths:
        value = _lookup(document, path)
        if value is not _MISSING:
            return value
    return default


def _lookup(document: Any, path: str) -> Any:
    """The value at a dotted path of nested objects, or _MISSING."""
    for key in path.split("."):
        if not isinstance(document, dict) or key not in document:
            return _MISSING
        document = document[key]
    return document


def _object_at(document: dict, path: str) -> dict | None:
    """The object at a path; `"usage": null`, which OpenAI streams in every chunk, is none."""
    value = _lookup(document, path)
    return value if isinstance(value, dict) else None


BIG_JSON = 1 << 20  # past this, json.loads would hold the GIL long enough to stall the event loop


def _loads_bounded(data: bytes, paths: Sequence[str]) -> Any:
    """The JSON document; for a big one, only the values at `paths`, in a document of their own
    (the rest is skipped, not parsed). None when it is not JSON."""
    if len(data) <= BIG_JSON:
        return _loads_or_none(data)
    text = as_text(data)
    if not text.lstrip().startswith("{"):
        return None
    document: dict[str, Any] = {}
    for path in paths:
        keys, start, span = path.split("."), 0, None
        for key in keys:
            if (span := json_member_span(text, key, start)) is None:
                break
            start = span[0]
        if span is not None and span[1] - span[0] <= BIG_JSON:
            value = _loads_or_none(text[span[0]:span[1]].encode("utf-8", "surrogateescape"))
            holder = document
            for key in keys[:-1]:
                holder = holder.setdefault(key, {})
            if isinstance(holder, dict):
                holder[keys[-1]] = value
    return document


def _loads_or_none(data: bytes) -> Any:
    """Parsed JSON, or None. NaN and Infinity are refused, as Go's decoder refuses them."""
    try:
        return json.loads(data, parse_constant=_refuse_constant)
    except ValueError:
        return None


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _as_int(value: Any) -> int:
    """A JSON number as a stored integer: floats truncated, clamped to SQLite's range,
    anything else 0 (what Go's gjson reads from a missing or odd field)."""
    if isinstance(value, float):
        value = int(value) if math.isfinite(value) else 0
    if not isinstance(value, int):
        return 0
    return min(max(value, INT64_MIN), INT64_MAX)


def _as_float(value: Any) -> float:
    """A JSON number as a float; 0 for anything else. Python reads 1e400 as infinity, which
    JSON cannot carry back to the UI, so that is 0 too."""
    number = float(value) if isinstance(value, (int, float)) else 0.0
    return number if math.isfinite(number) else 0.0


def _finite(speed: float, fallback: float) -> float:
    """A computed speed, unless absurd timings made it overflow to infinity."""
    return speed if math.isfinite(speed) else fallback


# -- speed histograms ---------------------------------------------------------

def histogram(values: Sequence[float]) -> dict | None:
    """Bins and percentiles of speeds for `/api/metrics/stats`; None when empty.

    The bin count grows with the number of values (Sturges' rule) within 5..20; the
    largest value falls in the last bin rather than one of its own.
    """
    if not values:
        return None
    ordered = sorted(values)
    low, high = ordered[0], ordered[-1]
    if low == high:
        bins, bin_size = [len(ordered)], 0.0
    else:
        count = min(max(math.ceil(math.log2(len(ordered))) + 1, 5), 20)
        bin_size = (high - low) / count
        bins = [0] * count
        for value in ordered:
            bins[min(math.floor((value - low) / bin_size), count - 1)] += 1
    return {"bins": bins, "min": go_float(low), "max": go_float(high), "binSize": go_float(bin_size),
            "p50": go_float(percentile(ordered, 50)), "p95": go_float(percentile(ordered, 95)),
            "p99": go_float(percentile(ordered, 99))}


def percentile(ordered: Sequence[float], p: float) -> float:
    """The p-th percentile of sorted values, interpolated between the two nearest ranks."""
    rank = p / 100 * (len(ordered) - 1)
    lower, upper = math.floor(rank), math.ceil(rank)
    return ordered[lower] + (ordered[upper] - ordered[lower]) * (rank - lower)


###############################################################################
# 18. Activity: the store and captures ########################################
###############################################################################

# The activity rows in SQLite (the original's own schema, so its database can be read),
# what we learnt of each model across restarts, and captured request/response bodies.

# `sort` parameter -> column. Only these fixed names ever reach the SQL text.
SORT_COLUMNS = {"id": "id", "time": "ts_created", "model": "model_id", "key": "key_name", "req_path": "req_path",
                "resp_status_code": "resp_status_code", "resp_content_type": "resp_content_type",
                "cached": "cache_tokens", "prompt": "input_tokens", "generated": "output_tokens",
                "drafted": "draft_tokens", "prompt_speed": "prompt_per_second",
                "gen_speed": "tokens_per_second", "duration": "duration_ms"}
DEFAULT_LIMIT = 25
MAX_LIMIT = 999

# The original's own schema (its goose migration 00001, text for text) and goose's record of it
# as applied, so that either program opens a store the other created and reads its rows.
SCHEMA = """
CREATE TABLE IF NOT EXISTS activity (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts_created INTEGER NOT NULL,
    model_id TEXT NOT NULL,
    req_path TEXT NOT NULL DEFAULT '',
    resp_content_type TEXT NOT NULL DEFAULT '',
    resp_status_code INTEGER NOT NULL DEFAULT 0,
    cache_tokens INTEGER NOT NULL DEFAULT 0,
    draft_tokens INTEGER NOT NULL DEFAULT 0,
    draft_acc_tokens INTEGER NOT NULL DEFAULT 0,
    input_tokens INTEGER NOT NULL DEFAULT 0,
    output_tokens INTEGER NOT NULL DEFAULT 0,
    prompt_per_second REAL NOT NULL DEFAULT 0,
    tokens_per_second REAL NOT NULL DEFAULT 0,
    duration_ms INTEGER NOT NULL DEFAULT 0,
    error_msg TEXT NOT NULL DEFAULT '',
    metadata_json TEXT NOT NULL DEFAULT ''
);

CREATE INDEX IF NOT EXISTS idx_activity_created_id
    ON activity (ts_created DESC, id DESC);

CREATE INDEX IF NOT EXISTS idx_activity_model_created_id
    ON activity (model_id, ts_created DESC, id DESC);

CREATE TABLE IF NOT EXISTS goose_db_version (
		id INTEGER PRIMARY KEY AUTOINCREMENT,
		version_id INTEGER NOT NULL,
		is_applied INTEGER NOT NULL,
		tstamp TIMESTAMP DEFAULT (datetime('now'))
	);

INSERT INTO goose_db_version (version_id, is_applied)
    SELECT version, 1 FROM (SELECT 0 AS version UNION ALL SELECT 1) WHERE NOT EXISTS (SELECT 1 FROM goose_db_version);

-- Rows an earlier llama-swap-py left without an error or metadata: text the original can read.
UPDATE activity SET error_msg = '' WHERE error_msg IS NULL;
UPDATE activity SET metadata_json = '' WHERE metadata_json IS NULL;
"""
# Ours: what the scheduler learnt of each model (load times, measured VRAM), kept across restarts.
FIGURES_SCHEMA = "CREATE TABLE IF NOT EXISTS model_figures (model_id TEXT PRIMARY KEY, figures_json TEXT NOT NULL)"
INSERT_COLUMNS = ("ts_created, model_id, req_path, resp_content_type, resp_status_code, "
                  "cache_tokens, draft_tokens, draft_acc_tokens, input_tokens, output_tokens, "
                  "prompt_per_second, tokens_per_second, duration_ms, error_msg, metadata_json")
# Ours, beside the original's table, which stays exactly its own (so the original opens the file
# as it made it): the name of each row's API key. A store made before gains the table, empty.
KEYS_SCHEMA = ("CREATE TABLE IF NOT EXISTS activity_key "
               "(activity_id INTEGER PRIMARY KEY, key_name TEXT NOT NULL)")
ROWS = "activity LEFT JOIN activity_key ON activity_id = id"  # every row, with its key's name where it has one
ROW_COLUMNS = "id, " + INSERT_COLUMNS + ", COALESCE(key_name, '')"

_INTEGER = re.compile(r"[+-]?\d+", re.ASCII)
_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)


class QueryError(Exception):
    """A bad query parameter; the message is the 400 envelope's text."""


GROUP_COLUMNS = {"": "", "key": "key_name", "model": "model_id"}


@dataclass(frozen=True)
class ActivityQuery:
    """`GET /api/metrics/activity` parameters, checked. Times are Unix seconds; bounds are
    inclusive; `sort_column` is always one of SORT_COLUMNS' values."""

    models: tuple[str, ...] = ()
    keys: tuple[str, ...] = ()  # ours: API key names
    start: int | None = None
    end: int | None = None
    min_id: int | None = None
    max_id: int | None = None
    limit: int = DEFAULT_LIMIT
    page: int = 1
    sort_column: str = "id"
    descending: bool = True
    group: str = ""  # ours: "key" or "model": totals per value instead of rows

    @classmethod
    def parse(cls, params: Mapping[str, Any]) -> ActivityQuery:
        """Read the query string, raising QueryError with the spec's message. An
        empty value counts as absent; of a repeated single-valued parameter the first wins."""
        models = tuple(value for value in _values(params, "model") if value)
        keys = tuple(value for value in _values(params, "key") if value)
        start = _parse_time(_first(params, "start"), "start")
        end = _parse_time(_first(params, "end"), "end")
        if start is not None and end is not None and start > end:
            raise QueryError("start must be before end")
        min_id = _parse_id(_first(params, "min_id"), "min_id")
        max_id = _parse_id(_first(params, "max_id"), "max_id")
        if min_id is not None and max_id is not None and min_id > max_id:
            raise QueryError("min_id must be <= max_id")
        limit = DEFAULT_LIMIT
        if text := _first(params, "limit"):
            limit = _parse_int(text)
            if limit is None:
                raise QueryError("invalid limit")
            if not 1 <= limit <= MAX_LIMIT:
                raise QueryError(f"limit must be between 1 and {MAX_LIMIT}")
        page = 1
        if text := _first(params, "page"):
            page = _parse_int(text)
            if page is None or page < 1:
                raise QueryError("page must be >= 1")
        sort = _first(params, "sort") or "id"
        if sort not in SORT_COLUMNS:
            raise QueryError("invalid sort column")
        order = (_first(params, "order") or "desc").lower()
        if order not in ("asc", "desc"):
            raise QueryError("order must be asc or desc")
        group = _first(params, "group")
        if group not in GROUP_COLUMNS:
            raise QueryError("group must be key or model")
        return cls(group=GROUP_COLUMNS[group], models=models, keys=keys, start=_unix_seconds(start),
                   end=_unix_seconds(end), min_id=min_id, max_id=max_id, limit=limit, page=page,
                   sort_column=SORT_COLUMNS[sort], descending=order == "desc")

    def where(self) -> tuple[str, list[Any]]:
        """The WHERE clause (or "") and its parameters."""
        clauses: list[str] = []
        args: list[Any] = []
        for column, values in (("model_id", self.models), ("key_name", self.keys)):
            if values:
                clauses.append(f"{column} IN ({', '.join('?' * len(values))})")
                args.extend(values)
        for clause, value in (("ts_created >= ?", self.start), ("ts_created <= ?", self.end),
                              ("id >= ?", self.min_id), ("id <= ?", self.max_id)):
            if value is not None:
                clauses.append(clause)
                args.append(value)
        return (" WHERE " + " AND ".join(clauses) if clauses else ""), args

    def order_by(self) -> str:
        """Rows with equal sort values stay in id order, so pages do not overlap."""
        direction = "DESC" if self.descending else "ASC"
        if self.sort_column == "id":
            return f" ORDER BY id {direction}"
        return f" ORDER BY {self.sort_column} {direction}, id {direction}"


class ActivityStore:
    """One row per metered request, in SQLite.

    Without a path the rows live in memory and only the newest `max_in_memory` are kept;
    with a path they go to that file (WAL, waiting up to 5 s for a lock), are never pruned
    and outlive restarts. Calls are synchronous and meant for one worker thread at a time,
    which need not be the thread that opened the store.
    """

    def __init__(self, path: str | None, max_in_memory: int):
        self.path = path or None
        self.max_in_memory = max_in_memory
        self._db = sqlite3.connect(path or ":memory:", check_same_thread=False, isolation_level=None)
        if self.path is not None:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA busy_timeout=5000")
        self._db.executescript(SCHEMA)
        self._db.execute(KEYS_SCHEMA)
        self._db.execute(FIGURES_SCHEMA)
        self.last_id = 0

    def close(self) -> None:
        self._db.close()

    def save_figures(self, model: str, figures: Mapping[str, Any]) -> None:
        self._db.execute("INSERT OR REPLACE INTO model_figures VALUES (?, ?)", (model, json.dumps(figures)))

    def figures(self) -> dict[str, dict[str, Any]]:
        """Each model's figures as saved; a row that does not parse is skipped."""
        found = {}
        for model, text in self._db.execute("SELECT model_id, figures_json FROM model_figures"):
            with contextlib.suppress(ValueError):
                found[model] = json.loads(text)
        return found

    def add(self, *, model: str, req_path: str, resp_content_type: str, resp_status_code: int,
            tokens: Tokens, duration_ms: int, error_msg: str = "",
            metadata: Mapping[str, str] | None = None, ts_created: int | None = None, key: str = "") -> int:
        """Store one request and return its id (ids start at 1 and are never reused).
        `ts_created` is Unix seconds, now by default; `key` the name of its API key."""
        cursor = self._db.execute(
            f"INSERT INTO activity ({INSERT_COLUMNS})"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (int(time.time()) if ts_created is None else ts_created, model, req_path,
             resp_content_type, resp_status_code, tokens.cache_tokens, tokens.draft_tokens,
             tokens.draft_acc_tokens, tokens.input_tokens, tokens.output_tokens,
             tokens.prompt_per_second, tokens.tokens_per_second, duration_ms, error_msg,
             json.dumps(dict(metadata)) if metadata else ""))
        row_id = self.last_id = cursor.lastrowid
        if key:
            self._db.execute("INSERT OR REPLACE INTO activity_key VALUES (?, ?)", (row_id, key))
        if not self._db.in_transaction:
            self._prune()
        return row_id

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """The rows added in the block go in one transaction: one commit (one sync of a file)
        for them all, and the in-memory store pruned once. An error in the block rolls them all
        back; so does SQLite itself after some (a full disk), which the commit then reports."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
            self._prune()
            self._db.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:  # (SQLite rolls back by itself after some errors)
                self._db.execute("ROLLBACK")
            raise

    def _prune(self) -> None:
        if self.path is None:
            for table, column in (("activity", "id"), ("activity_key", "activity_id")):
                self._db.execute(f"DELETE FROM {table} WHERE {column} <= ?", (self.last_id - self.max_in_memory,))

    def row(self, row_id: int, has_capture: Callable[[int], bool] | None = None) -> dict | None:
        """One row as the API renders it (for the `activity` event), or None if gone."""
        found = self._db.execute(f"SELECT {ROW_COLUMNS} FROM {ROWS} WHERE id = ?", (row_id,)).fetchone()
        return None if found is None else _render_row(found, has_capture)

    def query(self, params: Mapping[str, Any],
              has_capture: Callable[[int], bool] | None = None) -> dict:
        """The body of `GET /api/metrics/activity` for a query string given as a multidict
        (aiohttp's `request.query`) or a mapping of name -> list of values. Raises
        QueryError for a bad parameter."""
        query = ActivityQuery.parse(params)
        where, args = query.where()
        if query.group:
            return self.totals(query.group, where, args)
        total = self._db.execute(f"SELECT COUNT(*) FROM {ROWS}{where}", args).fetchone()[0]
        # A page far past the end must not overflow SQLite's OFFSET; it is empty anyway.
        offset = min((query.page - 1) * query.limit, INT64_MAX)
        found = self._db.execute(f"SELECT {ROW_COLUMNS} FROM {ROWS}{where}{query.order_by()}"
                                 " LIMIT ? OFFSET ?", [*args, query.limit, offset]).fetchall()
        return {"data": [_render_row(row, has_capture) for row in found], "page": query.page,
                "limit": query.limit, "total": total,
                "total_pages": (total + query.limit - 1) // query.limit}

    def totals(self, column: str, where: str, args: list[Any]) -> dict:
        """Per key (or model) of the rows a query selects: requests, tokens, time, errors, swaps caused."""
        found = self._db.execute(
            f"SELECT COALESCE({column}, ''), COUNT(*), COALESCE(SUM(input_tokens), 0), COALESCE(SUM(output_tokens), 0),"
            " COALESCE(SUM(duration_ms), 0), SUM(resp_status_code >= 400), SUM(metadata_json LIKE '%\"swap_id\"%')"
            f" FROM {ROWS}{where} GROUP BY 1 ORDER BY COUNT(*) DESC, 1", args).fetchall()
        name = "key" if column == "key_name" else "model"
        return {"groups": [{name: value, "requests": requests, "input_tokens": input_tokens,
                            "output_tokens": output_tokens, "duration_ms": duration_ms, "errors": errors,
                            "swaps": swaps} for value, requests, input_tokens, output_tokens, duration_ms, errors, swaps
                           in found]}

    def stats(self, model: str | None = None) -> dict:
        """The body of `GET /api/metrics/stats`, over one model's rows or all of them."""
        where, args = (" WHERE model_id = ?", [model]) if model else ("", [])
        requests, input_tokens, output_tokens, cache_tokens = self._db.execute(
            "SELECT COUNT(*), COALESCE(SUM(input_tokens), 0), COALESCE(SUM(output_tokens), 0),"
            " COALESCE(SUM(CASE WHEN cache_tokens > 0 THEN cache_tokens ELSE 0 END), 0)"
            f" FROM activity{where}", args).fetchone()
        return {"total_requests": requests, "total_input_tokens": input_tokens,
                "total_output_tokens": output_tokens, "total_cache_tokens": cache_tokens,
                "prompt_histogram": histogram(self._speeds("prompt_per_second", where, args)),
                "gen_histogram": histogram(self._speeds("tokens_per_second", where, args))}

    def _speeds(self, column: str, where: str, args: list[Any]) -> list[float]:
        """Known speeds only: -1 (unknown) and 0 (nothing read) would flatten the histogram."""
        condition = f"{where} AND {column} > 0" if where else f" WHERE {column} > 0"
        return [speed for (speed,) in self._db.execute(f"SELECT {column} FROM activity{condition}", args)]


def _render_row(row: Sequence[Any], has_capture: Callable[[int], bool] | None) -> dict:
    (row_id, ts_created, model, req_path, content_type, status, cached, draft, accepted,
     input_tokens, output_tokens, prompt_speed, gen_speed, duration_ms, error_msg, metadata_json, key) = row
    tokens = Tokens(cache_tokens=cached, draft_tokens=draft, draft_acc_tokens=accepted,
                    input_tokens=input_tokens, output_tokens=output_tokens,
                    prompt_per_second=float(prompt_speed), tokens_per_second=float(gen_speed))
    rendered = {"id": row_id, "timestamp": go_timestamp(ts_created, fraction=False), "model": model,
                "req_path": req_path, "resp_content_type": content_type, "resp_status_code": status,
                "tokens": tokens.as_json(), "duration_ms": duration_ms,
                "has_capture": bool(has_capture and has_capture(row_id))}
    if error_msg:
        rendered["error_msg"] = error_msg
    if key:
        rendered["key"] = key
    metadata = _loads_or_none(metadata_json.encode()) if metadata_json else None
    if isinstance(metadata, dict) and metadata:
        rendered["metadata"] = metadata
    return rendered


def _values(params: Mapping[str, Any], name: str) -> list[str]:
    """Every value of a query parameter, from a multidict or a mapping of name -> list."""
    getall = getattr(params, "getall", None)
    if getall is not None:
        return list(getall(name, []))
    values = params.get(name, [])
    return [values] if isinstance(values, str) else list(values)


def _first(params: Mapping[str, Any], name: str) -> str:
    values = _values(params, name)
    return values[0] if values else ""


def _parse_time(text: str, name: str) -> datetime.datetime | None:
    """An RFC 3339 timestamp as Go's time.RFC3339 accepts it; None when absent."""
    if not text:
        return None
    try:
        return parse_rfc3339(text)
    except ValueError:
        raise QueryError(f"invalid '{name}' timestamp, use RFC3339 format") from None


def _unix_seconds(moment: datetime.datetime | None) -> int | None:
    """Whole seconds, rounded down as Go's Time.Unix does, to match the stored resolution."""
    return None if moment is None else (moment - _EPOCH) // datetime.timedelta(seconds=1)


def _parse_id(text: str, name: str) -> int | None:
    if not text:
        return None
    value = _parse_int(text)
    if value is None or value < 1:
        raise QueryError(f"{name} must be >= 1")
    return value


def _parse_int(text: str) -> int | None:
    """A decimal int64 as Go's strconv.Atoi reads it; None when it is not one."""
    if not _INTEGER.fullmatch(text):
        return None
    value = int(text)
    return value if INT64_MIN <= value <= INT64_MAX else None


# -- captures -----------------------------------------------------------------

# Paths whose bodies are not kept: audio and images are big and say little.
NO_REQUEST_BODY = frozenset({"/v1/audio/voices", "/v1/audio/transcriptions", "/v1/images/edits", "/sdapi/v1/img2img"})
NO_RESPONSE_BODY = frozenset({"/v1/audio/speech", "/v1/images/generations", "/sdapi/v1/txt2img",
                              "/v1/images/edits", "/sdapi/v1/img2img"})


# A capture is taken only of bodies this small (and within the buffer), so that encoding it,
# here and when it is read back, never holds the GIL long enough to stall the event loop.
BIGGEST_CAPTURE = 16 << 20


@dataclass(frozen=True)
class Capture:
    """A request and its answer as recorded: what /api/captures/{id} shows, not yet in JSON."""

    path: str
    request_headers: dict[str, str]
    request_body: bytes | None  # None: a path whose bodies are not kept
    response_headers: dict[str, str]
    response_body: bytes | None  # None: not kept, or the answer failed


class Captures:
    """Recorded requests and their answers, the oldest dropped once they pass `capacity` bytes;
    one bigger than the whole buffer is not kept at all. Each is kept as one string of bytes,
    its bodies as they are: the JSON of /api/captures/{id}, bodies in base64, is made when one
    is read, not for every request. One over COMPRESS_ABOVE bytes is compressed; a smaller one
    is not: compressing it would take about as long as the rest of its row's recording, to
    save a few hundred bytes at most."""

    COMPRESS_ABOVE = 4096

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.entries: collections.OrderedDict[int, tuple[bool, bytes]] = collections.OrderedDict()
        self.size = 0

    def add(self, capture_id: int, capture: Capture) -> None:
        lengths = [None if body is None else len(body) for body in (capture.request_body, capture.response_body)]
        heads = json.dumps([capture.path, capture.request_headers, capture.response_headers, *lengths])
        # JSON has no raw newline, so the first one ends the heads and the bodies follow it.
        data = b"".join((heads.encode(), b"\n", capture.request_body or b"", capture.response_body or b""))
        compressed = len(data) > self.COMPRESS_ABOVE
        if compressed:
            data = zlib.compress(data, 1)  # the fastest level: a capture is made per request
        if len(data) > self.capacity:
            return
        self.entries[capture_id] = (compressed, data)
        self.size += len(data)
        while self.size > self.capacity:
            self.size -= len(self.entries.popitem(last=False)[1][1])

    def get(self, capture_id: int) -> dict[str, Any] | None:
        entry = self.entries.get(capture_id)
        if entry is None:
            return None
        compressed, data = entry
        data = zlib.decompress(data) if compressed else data
        end = data.index(b"\n")
        path, request_headers, response_headers, request_length, response_length = json.loads(data[:end])
        bodies = memoryview(data)[end + 1:]
        request_body = None if request_length is None else base64.b64encode(bodies[:request_length]).decode()
        response_body = None if response_length is None else base64.b64encode(bodies[request_length or 0:]).decode()
        return {"id": capture_id, "req_path": path, "req_headers": request_headers, "req_body": request_body,
                "resp_headers": response_headers, "resp_body": response_body}

    def __contains__(self, capture_id: int) -> bool:
        return capture_id in self.entries


def make_capture(exchange: Exchange, status: int, headers: Mapping[str, str], body: bytes) -> Capture | None:
    """What /api/captures/{id} will show: none of a failed answer's body, credentials redacted,
    the answer decompressed (so without its Content-Encoding)."""
    if status == 200 and not body:
        return None
    response_body = None
    if status == 200 and exchange.path not in NO_RESPONSE_BODY:
        try:
            response_body = decompress(header_value(headers, "Content-Encoding"), body)
        except DecompressionError:
            return None
    request_body = None if exchange.path in NO_REQUEST_BODY else exchange.request_body
    response_headers = {k: v for k, v in header_snapshot(headers).items() if k != "Content-Encoding"}
    return Capture(exchange.path, exchange.request_headers, request_body, response_headers, response_body)


# -- the activity log ---------------------------------------------------------

class Activity:
    """Activity rows and captures, made from each finished model request in one worker thread,
    so reading a big answer or writing to disk never holds up the event loop. The store and
    the captures are only ever touched from that thread. Answers are handed over in batches,
    LINGER seconds after the first of a batch: one hand-off (a thread switch, the costly part
    of a small request's row) for all the requests that ended meanwhile."""

    BACKLOG = 64  # answers waiting for the worker; past this, rows are written without reading the answer
    LINGER = 0.05

    def __init__(self, config: Config, log: ProxyLog, on_recorded: Callable[[int, str, Tokens, str], None]):
        self.worker = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="llama-swap-activity")
        self.log = log
        self.store = ActivityStore(config.store_path, config.metrics_max_in_memory)
        self.captures = Captures(config.capture_buffer_mb * 1024 * 1024)
        self.on_recorded = on_recorded
        self.waiting: list[tuple[Exchange, int, dict[str, str], bytes | bytearray, int]] = []  # not handed over yet
        self.writing = 0  # handed over, not recorded yet
        self.handing: asyncio.TimerHandle | None = None

    def configure(self, config: Config) -> None:
        """After a reload (the store's file is kept until a restart)."""
        self.worker.submit(self._configure, config.metrics_max_in_memory, config.capture_buffer_mb * 1024 * 1024)

    def _configure(self, max_in_memory: int, capture_bytes: int) -> None:
        self.store.max_in_memory = max_in_memory
        self.captures.capacity = capture_bytes

    def backlog(self) -> int:
        """Answers not recorded yet."""
        return len(self.waiting) + self.writing

    def record(self, exchange: Exchange, status: int, headers: Mapping[str, str], body: bytes | bytearray,
               wall_ms: int) -> None:
        if self.backlog() >= self.BACKLOG:  # memory stays bounded: the row, without tokens or capture
            body = b""
        self.waiting.append((exchange, status, dict(headers), body, wall_ms))
        if self.handing is None:
            self.handing = asyncio.get_running_loop().call_later(self.LINGER, self._hand_over)

    def _hand_over(self) -> None:
        self.handing = None
        batch, self.waiting = self.waiting, []
        try:
            future = asyncio.get_running_loop().run_in_executor(self.worker, self._record_all, batch)
        except RuntimeError:  # closed: requests that end during shutdown are not recorded
            return
        self.writing += len(batch)
        future.add_done_callback(functools.partial(self._recorded, len(batch)))

    def _record_all(self, batch: list[tuple[Any, ...]]) -> list[tuple[int, str, Tokens, str] | Exception]:
        """The batch's rows, read from the answers first and then written in one transaction,
        whole or not at all (a store shared by other servers is locked for the inserts alone);
        then the captures of the rows that are in, under the ids they got."""
        rows: list[dict[str, Any] | Exception] = []
        for exchange, status, headers, body, wall_ms in batch:
            try:
                rows.append(self._row(exchange, status, headers, body, wall_ms))
            except Exception as e:  # one answer that cannot be read loses no other
                rows.append(e)
        try:
            with self.store.batch():
                ids = [self.store.add(**row) if isinstance(row, dict) else 0 for row in rows]
        except Exception as e:  # none of them is in, and ids handed out here will be handed out again
            return [e] * len(batch)
        results: list[tuple[int, str, Tokens, str] | Exception] = []
        for (exchange, status, headers, body, _), row, row_id in zip(batch, rows, ids):
            if isinstance(row, Exception):
                results.append(row)
                continue
            raw = len(exchange.request_body) + len(body)
            if raw <= min(self.captures.capacity, BIGGEST_CAPTURE) and \
                    (capture := make_capture(exchange, status, headers, body)):
                self.captures.add(row_id, capture)
            results.append((row_id, exchange.model, row["tokens"], exchange.key))
        return results

    @staticmethod
    def _row(exchange: Exchange, status: int, headers: dict[str, str], body: bytes, wall_ms: int) -> dict[str, Any]:
        tokens, duration_ms, error = measure_response(exchange.path, status, headers, body, wall_ms)
        error = exchange.failure[1] if exchange.failure else error
        metadata = exchange.metadata
        if (swap := exchange.swap) is not None:  # it caused a swap: which, and how long that took
            metadata = {**metadata, "swap_id": str(swap.id), "swap_seconds": f"{swap.duration_s or 0:.2f}",
                        "swap_stopped": ",".join(swap.stops)}
        return dict(model=exchange.model, req_path=exchange.path, resp_status_code=status,
                    resp_content_type=header_value(headers, "Content-Type"), tokens=tokens, duration_ms=duration_ms,
                    error_msg=error, metadata=metadata, ts_created=int(exchange.began), key=exchange.key)

    def _recorded(self, count: int, future: asyncio.Future) -> None:
        self.writing -= count
        if future.cancelled():
            return
        for result in future.result():
            if isinstance(result, Exception):
                self.log.warn(f"activity: a request could not be recorded: {error_text(result)}")
            else:
                self.on_recorded(*result)

    def remember(self, model: str, figures: Mapping[str, Any]) -> None:
        """Save a model's figures (load times, measured VRAM) in the store, in the worker thread."""
        try:
            future = asyncio.get_running_loop().run_in_executor(self.worker, self.store.save_figures, model,
                                                                dict(figures))
        except RuntimeError:  # closed: a start that ends during shutdown is not worth keeping
            return
        future.add_done_callback(lambda f: f.cancelled() or f.exception() is None or self.log.warn(
            f"store: figures of {model} could not be saved: {error_text(f.exception())}"))

    async def call(self, function: Callable[..., Any], *args: Any) -> Any:
        """Run a store or capture lookup in the worker thread."""
        return await asyncio.get_running_loop().run_in_executor(self.worker, function, *args)

    def has_capture(self, capture_id: int) -> bool:
        return capture_id in self.captures

    async def close(self) -> None:
        """Rows still being written are finished (at most BACKLOG); then the store is closed."""
        if self.handing is not None:
            self.handing.cancel()
            self._hand_over()
        await self.call(self.store.close)
        self.worker.shutdown(wait=False)


###############################################################################
# 19. Performance and hardware ################################################
###############################################################################

# /api/performance: system samples from /proc and GPU samples, kept for HISTORY_SECONDS;
# /api/hardware: what this machine is, looked at once at start.


def sample_json(sample: Any) -> dict[str, Any]:
    """A sample as Go writes it: fields in order, times in RFC 3339, whole floats without ".0"."""
    def value(v: Any) -> Any:
        if isinstance(v, datetime.datetime):
            return go_time(v)
        if isinstance(v, float):
            return go_float(v)
        if isinstance(v, tuple):
            return [value(item) for item in v]
        return sample_json(v) if dataclasses.is_dataclass(v) else v
    return {f.name: value(getattr(sample, f.name)) for f in dataclasses.fields(sample)}


@dataclass(frozen=True)
class NetIOStat:
    """Bytes through one network interface since boot (kernel counters, never reset by us)."""

    name: str
    bytes_recv: int
    bytes_sent: int


@dataclass(frozen=True)
class SysStat:
    """One sample of the host: per-core CPU %, memory and swap in whole MiB, load, network.

    The memory figures mean what they mean in Go llama-swap (gopsutil): used = MemTotal -
    MemAvailable, free = MemFree. Page cache is in neither, so used + free < total.
    """

    timestamp: datetime.datetime
    cpu_util_per_core: tuple[float, ...] = ()
    mem_total_mb: int = 0
    mem_used_mb: int = 0
    mem_free_mb: int = 0
    swap_total_mb: int = 0
    swap_used_mb: int = 0
    load_avg_1: float = 0.0
    load_avg_5: float = 0.0
    load_avg_15: float = 0.0
    net_io: tuple[NetIOStat, ...] = ()


# Per core ("cpu0", "cpu1", ...): (busy, total) jiffies since boot. Keyed by name so a core
# going offline between two samples does not shift the others.
CpuTimes = dict[str, tuple[int, int]]


def parse_cpu_times(proc_stat: str) -> CpuTimes:
    """The per-core lines of /proc/stat; the aggregate `cpu` line is not a core."""
    times: CpuTimes = {}
    for line in proc_stat.splitlines():
        fields = line.split()
        if not fields or not fields[0].startswith("cpu") or not fields[0][3:].isdigit():
            continue
        # user nice system idle iowait irq softirq steal; guest and guest_nice follow but are
        # already counted in user and nice.
        jiffies = [int(value) for value in fields[1:9]]
        idle = sum(jiffies[3:5])  # idle + iowait: waiting on a disk is not work
        times[fields[0]] = (sum(jiffies) - idle, sum(jiffies))
    return times


def cpu_percent_per_core(previous: CpuTimes | None, current: CpuTimes) -> list[float]:
    """Busy % of each core between two samples, 0-100. A core absent from `previous` (the very
    first sample, a core just brought online) is measured since boot."""
    percents = []
    for core, (busy, total) in current.items():
        busy_before, total_before = (previous or {}).get(core, (0, 0))
        busy_delta, total_delta = busy - busy_before, total - total_before
        percents.append(0.0 if busy_delta <= 0 or total_delta <= 0 else min(100.0, busy_delta / total_delta * 100))
    return percents


def parse_meminfo(text: str) -> dict[str, int]:
    """/proc/meminfo as {field: kB}."""
    values = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        number = rest.split()[:1]
        if number and number[0].isdigit():
            values[key.strip()] = int(number[0])
    return values


def memory_fields(meminfo: Mapping[str, int]) -> dict[str, int]:
    """The SysStat memory and swap fields, in whole MiB, from /proc/meminfo's kB."""
    total = meminfo.get("MemTotal", 0)
    available = meminfo.get("MemAvailable")
    if available is None:  # kernels before 3.14 do not estimate it; this is gopsutil's fallback
        available = meminfo.get("MemFree", 0) + meminfo.get("Buffers", 0) + meminfo.get("Cached", 0)
    swap_total = meminfo.get("SwapTotal", 0)
    return {
        "mem_total_mb": total // 1024,
        "mem_used_mb": max(0, total - available) // 1024,
        "mem_free_mb": meminfo.get("MemFree", 0) // 1024,
        "swap_total_mb": swap_total // 1024,
        "swap_used_mb": max(0, swap_total - meminfo.get("SwapFree", 0)) // 1024,
    }


def parse_loadavg(text: str) -> tuple[float, float, float]:
    """The 1, 5 and 15 minute load averages from /proc/loadavg; zeros when unreadable."""
    try:
        one, five, fifteen = (float(value) for value in text.split()[:3])
    except ValueError:
        return 0.0, 0.0, 0.0
    return one, five, fifteen


def parse_net_dev(text: str) -> list[NetIOStat]:
    """Byte counters per interface from /proc/net/dev, in its order; loopback `lo` is left out."""
    stats = []
    for line in text.splitlines()[2:]:  # two header lines
        name, colon, counters = line.partition(":")
        fields = counters.split()
        if colon and name.strip() != "lo" and len(fields) >= 9:
            stats.append(NetIOStat(name.strip(), int(fields[0]), int(fields[8])))
    return stats


def read_cpu_times() -> CpuTimes:
    return parse_cpu_times(read_text("/proc/stat"))


def read_load_average() -> tuple[float, float, float]:
    text = read_text("/proc/loadavg")
    if text:
        return parse_loadavg(text)
    try:
        return os.getloadavg()  # macOS and the BSDs have no /proc but do have this
    except (AttributeError, OSError):  # Windows has neither
        return 0.0, 0.0, 0.0


def read_system_stats(previous_cpu_times: CpuTimes | None = None) -> tuple[SysStat, CpuTimes]:
    """A SysStat now, and the CPU times to pass back next time.

    CPU % covers the interval since `previous_cpu_times`; without them it is the average since
    boot. Where a /proc file is missing (not Linux) its fields stay zero or empty; this never
    raises for that. Blocking file reads: run it in a worker thread.
    """
    cpu_times = read_cpu_times()
    load_1, load_5, load_15 = read_load_average()
    stat = SysStat(
        timestamp=local_now(),
        cpu_util_per_core=tuple(cpu_percent_per_core(previous_cpu_times, cpu_times)),
        **memory_fields(parse_meminfo(read_text("/proc/meminfo"))),
        load_avg_1=load_1,
        load_avg_5=load_5,
        load_avg_15=load_15,
        net_io=tuple(parse_net_dev(read_text("/proc/net/dev"))),
    )
    return stat, cpu_times


# -- the monitor --------------------------------------------------------------

HISTORY_SECONDS = 3600  # the ring holds one hour of samples, as in Go


class PerformanceMonitor:
    """The last hour of system and GPU samples.

    Two rings of 3600 / every entries: one SysStat per tick, and one tuple of GpuStat per tick
    (all GPUs read at that instant, so the history is one hour however many GPUs there are).
    record() adds, snapshot() and latest() read; all three are plain synchronous calls made on
    the event loop, so they need no lock. run() is the sampling loop: the server wraps it in a
    task it owns and cancels on shutdown; the server also opens and closes the GPU provider.
    """

    def __init__(self, every: float = 5.0, gpu: GpuProvider | None = None):
        self.every = every
        self.gpu = gpu
        capacity = max(1, int(HISTORY_SECONDS // every))
        self.sys_samples: collections.deque[SysStat] = collections.deque(maxlen=capacity)
        self.gpu_samples: collections.deque[tuple[GpuStat, ...]] = collections.deque(maxlen=capacity)

    def record(self, sys_stat: SysStat, gpu_stats: Sequence[GpuStat] = ()) -> None:
        self.sys_samples.append(sys_stat)
        if gpu_stats:
            self.gpu_samples.append(tuple(gpu_stats))

    def snapshot(self, after: datetime.datetime | None = None) -> dict[str, Any]:
        """The /api/performance body. With `after` (timezone-aware), only samples strictly later.
        Without it an empty list is null, as Go encodes a nil slice; keys in Go's map order."""
        sys_stats = [sample_json(s) for s in self.sys_samples if after is None or s.timestamp > after]
        gpu_stats = [sample_json(g) for sample in self.gpu_samples for g in sample
                     if after is None or g.timestamp > after]
        empty = None if after is None else []
        return {"enabled": True, "gpu_stats": gpu_stats or empty, "sys_stats": sys_stats or empty}

    def latest(self) -> tuple[SysStat | None, list[GpuStat]]:
        """The newest system sample and the newest reading of each GPU: what /metrics shows."""
        sys_stat = self.sys_samples[-1] if self.sys_samples else None
        return sys_stat, latest_per_gpu(g for sample in self.gpu_samples for g in sample)

    async def run(self) -> None:
        """Sample every `every` seconds until cancelled, the first time one interval from now.

        The reads run in worker threads so a slow /proc or GPU driver never stalls the event
        loop. Ticks keep a fixed schedule; ticks missed while the machine slept are skipped
        rather than taken in a burst. The readers do not raise for missing files or unsupported
        GPU fields, so an exception here is a bug: it ends the task, for its owner to log.
        """
        loop = asyncio.get_running_loop()
        # A baseline, so the first sample's CPU % covers one interval rather than all uptime.
        cpu_times = await asyncio.to_thread(read_cpu_times)
        next_tick = loop.time()
        while True:
            next_tick = max(next_tick + self.every, loop.time())
            await asyncio.sleep(next_tick - loop.time())
            sys_stat, cpu_times = await asyncio.to_thread(read_system_stats, cpu_times)
            gpu_stats = await asyncio.to_thread(self.gpu.sample) if self.gpu else []
            self.record(sys_stat, gpu_stats)


def latest_per_gpu(stats: Iterable[GpuStat]) -> list[GpuStat]:
    """The newest reading of each GPU id, sorted by id (on equal timestamps the first one wins)."""
    latest: dict[int, GpuStat] = {}
    for stat in stats:
        if stat.id not in latest or stat.timestamp > latest[stat.id].timestamp:
            latest[stat.id] = stat
    return [latest[gpu_id] for gpu_id in sorted(latest)]


# -- /api/hardware ------------------------------------------------------------

class HardwareUnavailable(Exception):
    """Detection failed (the memory size is unknown); /api/hardware answers
    Envelope(503, `hardware detection unavailable`)."""


# platform.machine() spellings (Linux, macOS, Windows) -> schema v1 names.
ARCHITECTURES = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "arm64", "arm64": "arm64",
                 "armv7l": "armv7", "armv7": "armv7", "ppc64le": "ppc64le", "riscv64": "riscv64", "s390x": "s390x"}
OS_FAMILIES = {"linux": "linux", "darwin": "macos", "windows": "windows", "freebsd": "freebsd"}


def hardware_snapshot(detector_version: str) -> dict[str, Any]:
    """The /api/hardware body (schema v1), best effort: what cannot be found out is null.

    Reads /proc, /etc/os-release and, where present, NVML (the only accelerator source: AMD and
    Intel GPUs are not listed). Meant to be taken once at startup; NVML start-up can take a
    moment on a many-GPU host, so call it in a worker thread. Raises HardwareUnavailable when
    not even the memory size is known.
    """
    capacity = memory_capacity()
    if not capacity:
        raise HardwareUnavailable("system memory size unknown")
    cpuinfo = parse_cpuinfo(read_text("/proc/cpuinfo"))
    return {
        "schema_version": 1,
        "captured_at": go_time(datetime.datetime.now(datetime.timezone.utc)),
        "capture": {"scope": "inference_host", "method": "detected",
                    "detector": {"name": "llama-swap", "version": detector_version}},
        "architecture": describe_architecture(platform.machine()),
        "operating_system": describe_operating_system(platform.system(), platform.release(),
                                                      read_text("/etc/os-release")),
        "environment": describe_environment(platform.release(), cpuinfo),
        "cpu": describe_cpu(cpuinfo, os.cpu_count()),
        "memory": {"capacity_bytes": capacity},
        "accelerators": nvml_accelerators(),
    }


def describe_architecture(machine: str) -> dict[str, Any]:
    name = ARCHITECTURES.get(machine.lower(), "other")
    return {"name": name, "raw_name": machine if machine != name else None}


def parse_os_release(text: str) -> dict[str, str]:
    values = {}
    for line in text.splitlines():
        key, equals, value = line.partition("=")
        if equals and not key.startswith("#"):
            values[key.strip()] = value.strip().strip("\"'")
    return values


def describe_operating_system(system: str, kernel: str, os_release: str) -> dict[str, Any]:
    """Family, name and version (os-release ID and VERSION_ID on Linux, as gopsutil gives Go)."""
    family = OS_FAMILIES.get(system.lower(), "other")
    if family == "linux":
        release = parse_os_release(os_release)
        name, version = release.get("ID"), release.get("VERSION_ID")
    elif family == "macos":
        name, version = "macOS", platform.mac_ver()[0]
    elif family == "windows":
        name, version = "Windows", platform.version()
    else:  # the BSDs and the rest: the kernel release is the OS version
        name, version = system, kernel
    described = {"family": family, "name": name or None, "version": version or None, "kernel": kernel or None}
    if family == "other":
        described["raw_family"] = system  # the schema asks for the raw value behind "other"
    return described


def parse_cpuinfo(text: str) -> list[dict[str, str]]:
    """/proc/cpuinfo as one {field: value} per processor block."""
    blocks = [{}]
    for line in text.splitlines():
        key, colon, value = line.partition(":")
        if colon:
            blocks[-1][key.strip()] = value.strip()
        elif blocks[-1]:
            blocks.append({})
    return [block for block in blocks if block]


def describe_environment(kernel: str, cpuinfo: list[dict[str, str]]) -> dict[str, Any]:
    """WSL, a container, a virtual machine, or unknown. We do not claim "native": without
    systemd-detect-virt a bare-metal host cannot be told reliably from some containers."""
    kind, name = "unknown", None
    if "microsoft" in kernel.lower() or "wsl" in kernel.lower():
        kind, name = "wsl", "WSL"
    elif os.path.exists("/.dockerenv"):
        kind, name = "container", "Docker"
    elif os.path.exists("/run/.containerenv"):
        kind, name = "container", "Podman"
    elif any("hypervisor" in block.get("flags", "").split() for block in cpuinfo):
        kind = "virtual_machine"  # x86 CPUs set this flag for every guest
    return {"kind": kind, "name": name, "version": None}


def describe_cpu(cpuinfo: list[dict[str, str]], logical_threads: int | None) -> dict[str, Any]:
    def first(key: str) -> str | None:
        return next((block[key] for block in cpuinfo if block.get(key)), None)

    sockets = {block["physical id"] for block in cpuinfo if "physical id" in block}
    cores = {(block.get("physical id"), block["core id"]) for block in cpuinfo if "core id" in block}
    # More cores than threads would be a misread: the schema forbids it, so leave it unknown.
    physical_cores = len(cores) if cores and (not logical_threads or len(cores) <= logical_threads) else None
    return {
        "vendor": first("vendor_id"),
        "model": first("model name") or first("Model"),  # "Model" is how ARM boards name it
        "socket_count": len(sockets) or None,
        "physical_core_count": physical_cores,
        "logical_thread_count": logical_threads or None,
    }


def memory_capacity() -> int:
    """Bytes of memory this process may use: physical memory, or a smaller cgroup limit."""
    physical = parse_meminfo(read_text("/proc/meminfo")).get("MemTotal", 0) * 1024
    if not physical:
        with contextlib.suppress(AttributeError, ValueError, OSError):  # no sysconf on Windows
            physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    limits = [int(text) for text in (read_text("/sys/fs/cgroup/memory.max").strip(),
                                     read_text("/sys/fs/cgroup/memory/memory.limit_in_bytes").strip())
              if text.isdigit() and int(text) > 0]
    return min([physical, *limits]) if physical else 0


###############################################################################
# 20. Metrics #################################################################
###############################################################################

# /metrics in Prometheus text: the proxy's own counters and histograms, the system and GPU
# samples, byte-identical to the original where it has the same family.

PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

MetricKind = Literal["gauge", "counter", "histogram", "summary", "untyped"]


def format_number(value: float) -> str:
    """A sample value as Go llama-swap prints it: an int with %d (bytes, counters), a float with
    Go's %g: the shortest digits that read back to the same float, in exponent form (two exponent
    digits at least) below 1e-4 and from 1e6 up. 20 -> "20", 10.5 -> "10.5", 8589934592 ->
    "8589934592", 8589934592.0 -> "8.589934592e+09", 1e6 -> "1e+06", 0.00001 -> "1e-05".
    """
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    sign = "-" if math.copysign(1.0, value) < 0 else ""
    # repr() gives the shortest round-tripping digits, as Go's strconv does.
    _, digit_tuple, exponent = decimal.Decimal(repr(abs(value))).as_tuple()
    point = len(digit_tuple) + exponent  # the decimal point sits after this many digits
    digits = "".join(map(str, digit_tuple)).rstrip("0")
    if not digits:
        return sign + "0"
    decimal_exponent = point - 1
    if decimal_exponent < -4 or decimal_exponent >= 6:
        mantissa = digits[0] + (f".{digits[1:]}" if len(digits) > 1 else "")
        return f"{sign}{mantissa}e{'-' if decimal_exponent < 0 else '+'}{abs(decimal_exponent):02d}"
    if point <= 0:
        return f"{sign}0.{'0' * -point}{digits}"
    if point >= len(digits):
        return sign + digits + "0" * (point - len(digits))
    return f"{sign}{digits[:point]}.{digits[point:]}"


def escape_label_value(value: str) -> str:
    """A label value for the text format: backslash, double quote and newline escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def sample_line(name: str, labels: Mapping[str, str], value: float) -> str:
    if not labels:
        return f"{name} {format_number(value)}"
    label_text = ",".join(f'{key}="{escape_label_value(str(label))}"' for key, label in labels.items())
    return f"{name}{{{label_text}}} {format_number(value)}"


def family_header(name: str, help_text: str, kind: MetricKind) -> list[str]:
    # HELP text escapes only backslash and newline in this format.
    help_text = help_text.replace("\\", "\\\\").replace("\n", "\\n")
    return [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]


def metric_family(name: str, help_text: str, kind: MetricKind,
                  samples: Iterable[tuple[Mapping[str, str], float]]) -> str:
    """One metric family: # HELP, # TYPE, then one line per (labels, value), newline-terminated.
    Values follow format_number: pass ints for byte counts and counters, floats for the rest."""
    lines = family_header(name, help_text, kind)
    lines += [sample_line(name, labels, value) for labels, value in samples]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class HistogramSeries:
    """One label set of a histogram: cumulative counts, one per bucket bound (each count is of
    the observations <= that bound), then the sum and count of all observations."""

    labels: Mapping[str, str]
    cumulative_counts: Sequence[int]
    sum: float
    count: int


def histogram_family(name: str, help_text: str, buckets: Sequence[float],
                     series: Iterable[HistogramSeries]) -> str:
    """A histogram family: for each series, `_bucket` lines with `le` for each bound and then
    `le="+Inf"` (= count), then `_sum` and `_count`. `buckets` are the finite upper bounds in
    increasing order, shared by every series."""
    lines = family_header(name, help_text, "histogram")
    for one in series:
        if len(one.cumulative_counts) != len(buckets):
            raise ValueError(f"{name}: {len(one.cumulative_counts)} bucket counts for {len(buckets)} buckets")
        bounds = [format_number(float(bound)) for bound in buckets] + ["+Inf"]
        counts = [*one.cumulative_counts, one.count]
        lines += [sample_line(f"{name}_bucket", {**one.labels, "le": le}, count)
                  for le, count in zip(bounds, counts, strict=True)]
        lines.append(sample_line(f"{name}_sum", one.labels, float(one.sum)))
        lines.append(sample_line(f"{name}_count", one.labels, one.count))
    return "\n".join(lines) + "\n"


# Go writes every GPU value as a float64 with %g, byte sizes included (so 24 GiB reads
# 2.5769803776e+10); the floats here keep /metrics byte-identical to Go's.
GPU_METRICS: tuple[tuple[str, str, Callable[[GpuStat], float]], ...] = (
    ("llamaswap_gpu_temperature_celsius", "GPU temperature in Celsius", lambda g: float(g.temp_c)),
    ("llamaswap_gpu_vram_temperature_celsius", "GPU VRAM temperature in Celsius", lambda g: float(g.vram_temp_c)),
    ("llamaswap_gpu_util_percent", "GPU utilization percent (0-100)", lambda g: float(g.gpu_util_pct)),
    ("llamaswap_gpu_memory_util_percent", "GPU memory utilization percent (0-100)", lambda g: float(g.mem_util_pct)),
    ("llamaswap_gpu_memory_used_bytes", "GPU memory used in bytes", lambda g: float(g.mem_used_mb * MIB)),
    ("llamaswap_gpu_memory_total_bytes", "GPU memory total in bytes", lambda g: float(g.mem_total_mb * MIB)),
    ("llamaswap_gpu_fan_speed_percent", "GPU fan speed percent (0-100)", lambda g: float(g.fan_speed_pct)),
    ("llamaswap_gpu_power_draw_watts", "GPU power draw in watts", lambda g: float(g.power_draw_w)),
)


def render_prometheus(sys_stat: SysStat | None, gpu_stats: Iterable[GpuStat]) -> str:
    """The /metrics body: the newest system sample, then the newest reading of each GPU sorted
    by id. Empty until the first sample; GPU families only when there are GPU readings."""
    gpus = latest_per_gpu(gpu_stats)
    families = list(system_families(sys_stat)) if sys_stat else []
    if gpus:
        families += [metric_family(name, help_text, "gauge", [(gpu_labels(g), value(g)) for g in gpus])
                     for name, help_text, value in GPU_METRICS]
    return "".join(families)


def system_families(s: SysStat) -> Iterator[str]:
    yield metric_family("llamaswap_cpu_util_percent", "CPU utilization per core (0-100)", "gauge",
                        [({"core": str(core)}, float(pct)) for core, pct in enumerate(s.cpu_util_per_core)])
    for name, help_text, mb in (("llamaswap_memory_total_bytes", "Total memory in bytes", s.mem_total_mb),
                                ("llamaswap_memory_used_bytes", "Used memory in bytes", s.mem_used_mb),
                                ("llamaswap_memory_free_bytes", "Free memory in bytes", s.mem_free_mb),
                                ("llamaswap_swap_total_bytes", "Total swap in bytes", s.swap_total_mb),
                                ("llamaswap_swap_used_bytes", "Used swap in bytes", s.swap_used_mb)):
        yield metric_family(name, help_text, "gauge", [({}, mb * MIB)])
    yield metric_family("llamaswap_load_average", "Load average", "gauge",
                        [({"interval": "1m"}, float(s.load_avg_1)), ({"interval": "5m"}, float(s.load_avg_5)),
                         ({"interval": "15m"}, float(s.load_avg_15))])
    if s.net_io:
        yield metric_family("llamaswap_network_bytes_total", "Total network bytes transferred", "counter",
                            [({"interface": io.name, "direction": direction}, count) for io in s.net_io
                             for direction, count in (("recv", io.bytes_recv), ("sent", io.bytes_sent))])


def gpu_labels(g: GpuStat) -> dict[str, str]:
    return {"id": str(g.id), "name": g.name, **({"uuid": g.uuid} if g.uuid else {})}


# -- the proxy's own metrics --------------------------------------------------

# Seconds; requests span a cache hit to a long generation, starts a tiny model to a 100 GB one.
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
START_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)


class Histogram:
    """Observations counted into fixed buckets, per label set, as Prometheus histograms are."""

    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.series: dict[tuple, list] = {}  # labels -> [count per bucket..., sum, count]

    def observe(self, labels: tuple, value: float) -> None:
        series = self.series.setdefault(labels, [0] * len(self.buckets) + [0.0, 0])
        index = bisect.bisect_left(self.buckets, value)
        if index < len(self.buckets):
            series[index] += 1
        series[-2] += value
        series[-1] += 1

    def render(self, name: str, help_text: str) -> str:
        series = []
        for labels, counts in sorted(self.series.items()):
            cumulative = list(itertools.accumulate(counts[:-2]))
            series.append(HistogramSeries(dict(labels), cumulative, counts[-2], counts[-1]))
        return histogram_family(name, help_text, self.buckets, series)


class Metrics:
    """Per-model figures for /metrics, which the original does not export: requests, latency,
    tokens, starts and stops, queueing. Fed by notifications; nothing here is on the hot path
    beyond adding to a counter."""

    def __init__(self) -> None:
        self.requests: Counter[tuple] = Counter()  # (model, path, status)
        self.refused: Counter[str] = Counter()
        self.tokens: Counter[tuple] = Counter()  # (model, "prompt" | "generated")
        self.starts: Counter[tuple] = Counter()  # (model, "ready" | "failed")
        self.stops: Counter[tuple] = Counter()  # (model, reason)
        self.sleeps: Counter[tuple] = Counter()  # (model, reason)
        self.wakes: Counter[tuple] = Counter()  # (model, "ready" | "failed")
        self.kv_tokens: Counter[tuple] = Counter()  # (model, "save" | "restore")
        # Per API key (by name; requests without a key are not counted here):
        self.key_requests: Counter[str] = Counter()
        self.key_tokens: Counter[tuple] = Counter()  # (key, "prompt" | "generated")
        self.key_swaps: Counter[str] = Counter()  # swaps its requests caused
        self.key_wait: Counter[str] = Counter()  # seconds its requests waited for their model
        self.kv_seconds: Counter[tuple] = Counter()
        self.first_byte = Histogram(REQUEST_BUCKETS)
        self.duration = Histogram(REQUEST_BUCKETS)
        self.queue_wait = Histogram(REQUEST_BUCKETS)
        self.start_duration = Histogram(START_BUCKETS)
        self.wake_duration = Histogram(START_BUCKETS)
        self._states: dict[str, tuple[str, float]] = {}  # model -> (state, since)

    def kv_transfer(self, model: str, action: str, tokens: int, seconds: float) -> None:
        self.kv_tokens[(model, action)] += tokens
        self.kv_seconds[(model, action)] += seconds

    def state_changed(self, model: str, state: State, reason: str) -> None:
        """`reason`: why it sleeps (for SLEEPING), else why its run ends."""
        previous, since = self._states.get(model, (STOPPED, 0.0))
        now = time.monotonic()
        self._states[model] = (state, now)
        if previous == STARTING and state == READY:
            self.starts[(model, "ready")] += 1
            self.start_duration.observe((("model", model),), now - since)
        elif previous == STARTING and state == STOPPED and not reason:
            self.starts[(model, "failed")] += 1
        elif previous == WAKING and state == READY:
            self.wakes[(model, "ready")] += 1
            self.wake_duration.observe((("model", model),), now - since)
        elif previous == WAKING:
            self.wakes[(model, "failed")] += 1
        elif state == SLEEPING:
            self.sleeps[(model, reason or "unknown")] += 1
        elif state == STOPPED and previous != STOPPED:
            self.stops[(model, reason or "unknown")] += 1

    def request_done(self, model: str, path: str, status: int, first_byte_after: float | None, seconds: float,
                     key: str = "") -> None:
        self.requests[(model, path, str(status))] += 1
        if key:
            self.key_requests[key] += 1
        labels = (("model", model),)
        self.duration.observe(labels, seconds)
        if first_byte_after is not None:
            self.first_byte.observe(labels, first_byte_after)

    def waited(self, model: str, seconds: float, key: str = "") -> None:
        self.queue_wait.observe((("model", model),), seconds)
        if key:
            self.key_wait[key] += seconds

    def swapped(self, record: SwapRecord) -> None:
        if record.kind == "swap" and record.result == "pending" and record.key:
            self.key_swaps[record.key] += 1

    def refuse(self, model: str) -> None:
        self.refused[model] += 1

    def add_tokens(self, model: str, tokens: Tokens, key: str = "") -> None:
        counts = (("prompt", max(tokens.input_tokens, 0)), ("generated", max(tokens.output_tokens, 0)))
        for kind, count in counts:
            self.tokens[(model, kind)] += count
            if key:
                self.key_tokens[(key, kind)] += count

    def render(self, scheduler: Scheduler) -> str:
        models = sorted(scheduler.processes, key=str.encode)
        families = [
            metric_family("llamaswap_model_state", "Current state of each model (1 for the state it is in).", "gauge",
                          [({"model": m, "state": st}, int(scheduler.processes[m].state == st))
                           for m in models for st in State]),
            metric_family("llamaswap_inflight_requests", "Requests being served by each model.", "gauge",
                          [({"model": m}, scheduler.in_flight[m]) for m in models]),
            metric_family("llamaswap_queue_depth", "Requests admitted and waiting for their model.", "gauge",
                          [({"model": m}, scheduler.reserved[m] - scheduler.in_flight[m]) for m in models]),
            metric_family("llamaswap_requests_total", "Model requests by path and response status.", "counter",
                          [({"model": m, "path": p, "status": s}, n)
                           for (m, p, s), n in sorted(self.requests.items())]),
            metric_family("llamaswap_requests_refused_total", "Requests refused with 429 (concurrencyLimit).",
                          "counter", [({"model": m}, n) for m, n in sorted(self.refused.items())]),
            metric_family("llamaswap_tokens_total", "Prompt and generated tokens reported by the upstreams.", "counter",
                          [({"model": m, "kind": k}, n) for (m, k), n in sorted(self.tokens.items())]),
            metric_family("llamaswap_model_starts_total", "Model starts by result.", "counter",
                          [({"model": m, "result": r}, n) for (m, r), n in sorted(self.starts.items())]),
            metric_family("llamaswap_model_stops_total",
                          "Model stops by reason (swap, ttl, unload, crash, reload, shutdown).", "counter",
                          [({"model": m, "reason": r}, n) for (m, r), n in sorted(self.stops.items())]),
            metric_family("llamaswap_model_sleeps_total", "Models put to sleep instead of stopped, by reason "
                          "(swap, ttl).", "counter",
                          [({"model": m, "reason": r}, n) for (m, r), n in sorted(self.sleeps.items())]),
            metric_family("llamaswap_model_wakes_total", "Sleeping models woken, by result (failed: started anew).",
                          "counter", [({"model": m, "result": r}, n) for (m, r), n in sorted(self.wakes.items())]),
            metric_family("llamaswap_key_requests_total", "Model requests by API key name (apiKeys).", "counter",
                          [({"key": k}, n) for k, n in sorted(self.key_requests.items())]),
            metric_family("llamaswap_key_tokens_total", "Prompt and generated tokens by API key name.", "counter",
                          [({"key": k, "kind": kind}, n) for (k, kind), n in sorted(self.key_tokens.items())]),
            metric_family("llamaswap_key_swaps_total", "Swaps caused by each API key's requests.", "counter",
                          [({"key": k}, n) for k, n in sorted(self.key_swaps.items())]),
            metric_family("llamaswap_key_wait_seconds_total", "Time each API key's requests waited for their model "
                          "(queue, swaps and loads).", "counter",
                          [({"key": k}, round(n, 3)) for k, n in sorted(self.key_wait.items())]),
            metric_family("llamaswap_kv_cache_tokens_total", "Tokens of KV cache saved and restored (kvCache).",
                          "counter", [({"model": m, "action": a}, n) for (m, a), n in sorted(self.kv_tokens.items())]),
            metric_family("llamaswap_kv_cache_seconds_total", "Time spent saving and restoring KV cache (kvCache).",
                          "counter", [({"model": m, "action": a}, n) for (m, a), n in sorted(self.kv_seconds.items())]),
            self.duration.render("llamaswap_request_duration_seconds",
                                 "Time from the request to the end of its answer."),
            self.first_byte.render("llamaswap_time_to_first_byte_seconds",
                                   "Time from the request to the first byte of its answer."),
            self.queue_wait.render("llamaswap_queue_wait_seconds",
                                   "Time a request waited for its model (queue and load)."),
            self.start_duration.render("llamaswap_model_start_duration_seconds", "Time from spawn to healthy."),
            self.wake_duration.render("llamaswap_model_wake_duration_seconds", "Time from a wake call to ready."),
        ]
        return "".join(families)


def vram_families(book: VramBook) -> str:
    """The vram router's view for /metrics: each model's measured footprint, each GPU's budget."""
    budget = book.budget()
    return "".join([
        metric_family("llamaswap_model_vram_bytes",
                      "GPU memory a model's server held, as measured (largest in its latest run).", "gauge",
                      [({"model": m, "gpu": str(g)}, size) for m in sorted(book.measured, key=str.encode)
                       for g, size in sorted(book.measured[m].items())]),
        metric_family("llamaswap_gpu_vram_budget_bytes",
                      "GPU memory our models may hold: size less reserve and others' use.", "gauge",
                      [({"gpu": str(g)}, size) for g, size in sorted(budget.items())]),
    ])


###############################################################################
# 21. API answers #############################################################
###############################################################################

# What the API speaks: OpenAI-format errors, model records for /v1/models and /running, and
# the checks that keep other web pages and other hosts out (keys, origins, hosts).

# Routes whose model is read from the request. GET routes read ?model=.
MODEL_POST_PATHS = (
    "/v1/chat/completions", "/v1/responses", "/v1/completions", "/v1/messages", "/v1/messages/count_tokens",
    "/v1/embeddings", "/reranking", "/rerank", "/v1/rerank", "/v1/reranking", "/infill", "/completion",
    "/v1/audio/speech", "/v1/audio/voices", "/v1/images/generations", "/sdapi/v1/txt2img", "/sdapi/v1/img2img",
    "/audioapi/v1/tasks/run", "/v/chat/completions", "/v/responses", "/v/completions", "/v/messages",
    "/v/messages/count_tokens", "/v/embeddings", "/v/rerank", "/v/reranking",
    "/v1/audio/transcriptions", "/v1/images/edits",
)
MODEL_GET_PATHS = ("/v1/audio/voices", "/sdapi/v1/loras", "/props")

ERROR_KINDS = {
    400: ("invalid_request_error", "bad_request"), 401: ("authentication_error", "unauthorized"),
    403: ("authentication_error", "forbidden"), 404: ("invalid_request_error", "not_found"),
    409: ("invalid_request_error", "conflict"), 429: ("rate_limit_error", "rate_limit_exceeded"),
    502: ("server_error", "bad_gateway"), 503: ("server_error", "service_unavailable"),
    499: ("invalid_request_error", "request_cancelled"), 504: ("server_error", "gateway_timeout"),
}


COMFYUI_MODEL = "comfyui_auto"
CONCURRENCY_LIMIT_BODY = (b'{"src":"llama-swap","error":{"message":"Too many requests","type":"rate_limit_error",'
                          b'"param":null,"code":"concurrency_limit"}}')
OPEN_PATHS = frozenset({"/", "/health", "/wol-health", "/upstream", "/favicon.ico"})
MODEL_ROUTE_PATHS = frozenset(MODEL_POST_PATHS + MODEL_GET_PATHS + ("/v1/models", "/models"))

#
# A browser lets any page it shows send requests here: a form can POST to /api/models/unload and
# an image can GET /unload, and a page whose own name an attacker points at 127.0.0.1 (DNS
# rebinding) reads our answers as its own. Two guards: what changes state (POST and the like
# under /api/, and GET /unload) is refused from a page of another origin (Origin, or the fetch
# metadata of a request without it); and, with no keys to ask for, a request must name us by a
# name that no outsider controls: localhost, an IP address, a name without dots (or under
# .local), this machine's name, or one given in allowedOrigins (a reverse proxy's, say).

MACHINE_NAME = socket.gethostname().lower()


def authority_name(authority: str) -> str:
    """The host name of a `host[:port]` (an IPv6 address without its brackets)."""
    if authority.startswith("["):
        return authority[1:authority.find("]")] if "]" in authority else authority
    return authority.rpartition(":")[0] if authority.count(":") == 1 else authority


@functools.lru_cache(maxsize=256)  # every request asks, with one of a few names
def known_host(authority: str, allowed: tuple[str, ...]) -> bool:
    """Whether a Host header names us in a way no outsider's DNS can."""
    authority = authority.strip().lower()
    name = authority_name(authority)
    if not authority or authority in allowed or name in {authority_name(a) for a in allowed}:
        return True
    if name in ("localhost", MACHINE_NAME) or "." not in name or name.endswith((".localhost", ".local")):
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def changes_state(request: web.BaseRequest) -> bool:
    return request.path == "/unload" or \
        (request.path.startswith("/api/") and request.method not in ("GET", "HEAD", "OPTIONS"))


def foreign_origin(request: web.BaseRequest, allowed: Sequence[str]) -> str | None:
    """Which other site's page sent a request ("another site" when its browser says only that),
    or None when it came from our own pages, an allowed origin or no browser at all."""
    origin = request.headers.get("Origin")
    if origin is None:
        return "another site" if request.headers.get("Sec-Fetch-Site") in ("cross-site", "same-site") else None
    netloc = urllib.parse.urlsplit(origin.strip()).netloc.lower()
    if netloc and (netloc == request.headers.get("Host", "").strip().lower() or netloc in allowed):
        return None
    return printable(origin[:200])


def request_api_key(request: web.BaseRequest) -> str:
    """The key a client sent: Basic password, else Bearer token, else x-api-key."""
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "basic":
        try:
            _user, sep, password = base64.b64decode(value.strip(), validate=True).decode().partition(":")
            if sep:
                return password
        except (ValueError, UnicodeDecodeError):
            pass
    elif scheme.lower() == "bearer":
        return value.strip()
    return request.headers.get("x-api-key", "")


def find_key(key: str, keys: Iterable[ApiKey]) -> ApiKey | None:
    """The entry whose key this is. Constant-time against every key, so timing tells nothing
    about them: digests are compared, not the keys, since compare_digest gives away a
    difference in length."""
    digest = hashlib.sha256(key.encode()).digest()
    found = None
    for entry in keys:
        if hmac.compare_digest(digest, hashlib.sha256(entry.key.encode()).digest()):
            found = entry
    return found


class ApiError(Exception):
    """An error we answer ourselves, in the original's envelope."""

    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


def json_response(value: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(status=status, text=go_json(value) + "\n", content_type="application/json", headers=headers)


def unknown_model_message(name: str, config: Config) -> str:
    """The original's words, then the name asked for and the listed names closest to it (or
    some of them, where none is close): a typo is seen at once."""
    listed = [m.id for m in config.models.values() if not m.unlisted]
    listed += [a for m in config.models.values() if not m.unlisted for a in m.aliases]
    listed += [s.id for s in config.selectors.values() if not s.unlisted] + list(config.peer_routes)
    by_folded = {n.casefold(): n for n in sorted(listed, reverse=True)}
    close = []
    if len(name) <= 64:  # matching costs length squared: no suggestions for a name nobody typed
        close = [by_folded[c] for c in difflib.get_close_matches(name.casefold(), by_folded, n=3, cutoff=0.5)]
    shown = json.dumps(name if len(name) <= 100 else name[:100] + "...")
    if close:
        return f"no router for requested model {shown}; closest configured: {', '.join(close)}"
    names = sorted(set(listed), key=str.casefold)
    more = f" and {len(names) - 10} more" if len(names) > 10 else ""
    return f"no router for requested model {shown}; configured: {', '.join(names[:10]) or 'none'}{more}"


def error_response(request: web.BaseRequest, status: int, message: str) -> web.Response:
    """The original's error reply, in the form the client's Accept header asks for."""
    accept = request.headers.get("Accept", "")
    if "text/plain" in accept:
        return web.Response(status=status, text=f"llama-swap: {message}", content_type="text/plain")
    if "text/html" in accept:
        body = f"<html><body><h1>llama-swap</h1><p>{html.escape(message)}</p></body></html>"
        return web.Response(status=status, text=body, content_type="text/html")
    usual = ("invalid_request_error", "invalid_request") if 400 <= status < 500 else ("server_error", "internal_error")
    kind, code = ERROR_KINDS.get(status, usual)
    envelope = {"src": "llama-swap", "error": {"message": message, "type": kind, "param": None, "code": code}}
    return web.Response(status=status, text=go_json(envelope), content_type="application/json")


def capability_fields(caps: Capabilities) -> dict[str, Any]:
    """architecture / capabilities / supported_parameters / context_length as the original's /v1/models renders them."""
    fields: dict[str, Any] = {}
    if caps.inputs or caps.outputs:
        arch: dict[str, Any] = {}
        if caps.inputs:
            arch["input_modalities"] = caps.inputs
        if caps.outputs:
            arch["output_modalities"] = caps.outputs
        if caps.inputs and caps.outputs:
            arch["modality"] = f"{'+'.join(caps.inputs)}->{'+'.join(caps.outputs)}"
        fields["architecture"] = arch
    flags = {"vision": "image" in caps.inputs}
    if caps.inputs and caps.outputs:
        flags["audio_transcriptions"] = "audio" in caps.inputs and "text" in caps.outputs
        flags["audio_speech"] = "text" in caps.inputs and "audio" in caps.outputs
        flags["image_generation"] = "text" in caps.inputs and "image" in caps.outputs
        flags["image_to_image"] = "image" in caps.inputs and "image" in caps.outputs
    flags.update(function_calling=caps.tools, reranker=caps.reranker)
    if any(flags.values()):
        fields["capabilities"] = {k: True for k, v in flags.items() if v}
    if caps.tools:
        fields["supported_parameters"] = ["tools", "tool_choice"]
    if caps.context > 0:
        fields["context_length"] = caps.context
    return fields


RENDERED_CAPABILITY_KEYS = ("architecture", "capabilities", "supported_parameters", "context_length")


def model_record(record_id: str, model: ModelConfig, internal: dict[str, Any], status: dict[str, Any],
                 created: int) -> dict[str, Any]:
    """One /v1/models entry for a local model or one of its aliases."""
    record: dict[str, Any] = {"id": record_id, "object": "model", "created": created, "owned_by": "llama-swap"}
    if model.name.strip():
        record["name"] = model.name.strip()
    if model.description.strip():
        record["description"] = model.description.strip()
    caps = model.capabilities
    record.update(capability_fields(caps))
    metadata = dict(model.metadata)
    if not caps.empty():  # the rendered fields win over user metadata of the same name
        for key in RENDERED_CAPABILITY_KEYS:
            metadata.pop(key, None)
    meta: dict[str, Any] = {"llamaswap": {**metadata, **internal}}
    if caps.context > 0:
        meta["n_ctx"] = caps.context
    record["meta"] = meta
    record["status"] = status
    return record


def model_status(state: State, loading: dict[str, Any] | None, failure: dict[str, Any] | None = None) -> dict[str, Any]:
    """A /v1/models `status`: loaded or unloaded as the original says, our `loading` with its
    progress and ETA while the server starts, `sleeping` or `waking` (sleep: its calls), and
    the `error` of a start that failed (until the next attempt)."""
    if loading is not None:
        return {"value": "loading", **loading}
    if state in (SLEEPING, WAKING):
        return {"value": str(state)}
    status = {"value": "loaded" if state in (STARTING, READY, STOPPING) else "unloaded"}
    if failure is not None and state == STOPPED:
        status["error"] = failure["error"]
    return status


def model_records(config: Config, states: Mapping[str, State], created: int, profile: Profile | None = None,
                  loading: Mapping[str, dict[str, Any]] | None = None,
                  failures: Mapping[str, dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Every /v1/models entry: listed models, their aliases if asked for, peers, selectors and the
    active profile's pins; by ID. `loading`: the load status of models starting."""
    loading = loading or {}
    records = []
    for model_id, model in config.models.items():
        if model.unlisted:
            continue
        status = model_status(states[model_id], loading.get(model_id), (failures or {}).get(model_id))
        internal: dict[str, Any] = {"type": "model"}
        if model.aliases:
            internal["aliases"] = model.aliases
        if model.protected:
            internal["protected"] = True
        records.append(model_record(model_id, model, internal, status, created))
        if config.include_aliases_in_list:
            for alias in (a for a in model.aliases if a.strip()):
                records.append(model_record(alias, model, {"type": "alias", "modelID": model_id}, status, created))
    for peer in config.peers.values():
        for model in peer.models:
            records.append({"id": f"{peer.id}/{model}", "object": "model", "created": created, "owned_by": "llama-swap",
                            "name": f"{peer.id}: {model}", "meta": {"llamaswap": {"type": "peer", "peerID": peer.id}},
                            "status": {"value": "unloaded"}})
    for selector in config.selectors.values():
        if not selector.unlisted:
            records.append(selector_record(selector, config, states, created))
    if profile:
        taken = set(config.models) | set(config.aliases) | set(config.peer_routes) | set(config.selectors)
        for pin, target in profile.pins.items():
            if target and pin not in taken:  # a pin that shadows a real name adds no record
                records.append({"id": pin, "object": "model", "created": created, "owned_by": "llama-swap",
                                "meta": {"llamaswap": {"type": "profile"}}, "status": {"value": "unloaded"}})
    return sorted(records, key=lambda r: r["id"].encode())


def model_statuses(config: Config, states: Mapping[str, State],
                   loading: Mapping[str, dict[str, Any]] | None = None,
                   failures: Mapping[str, dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """The modelStatus event: local models by ID, then every peer model. A model starting
    also has our `loading` (elapsed_s, progress, eta_s); one whose start failed, `failed`
    (error, at) until its next attempt."""
    loading, failures = loading or {}, failures or {}
    statuses = []
    for model_id in sorted(config.models, key=str.encode):
        model = config.models[model_id]
        status = {"id": model_id, "name": model.name, "description": model.description, "state": states[model_id],
                  "unlisted": model.unlisted, "peerID": ""}
        if model.aliases:
            status["aliases"] = model.aliases
        if model.protected:
            status["protected"] = True
        status.update(routing_of(config.routing, model_id))
        rendered = capability_fields(model.capabilities)
        status.update({k: rendered[k] for k in ("capabilities", "context_length") if k in rendered})
        if model_id in loading:
            status["loading"] = loading[model_id]
        if model_id in failures and states[model_id] == STOPPED:
            status["failed"] = failures[model_id]
        statuses.append(status)
    for peer in config.peers.values():
        statuses += [{"id": f"{peer.id}/{m}", "name": "", "description": "", "state": "", "unlisted": False,
                      "peerID": peer.id} for m in peer.models]
    return statuses


def routing_of(routing: Routing, model_id: str) -> dict[str, Any]:
    """Where the swap rules put a model, for the UI: its group (name, swap, exclusive,
    persistent) or the matrix sets it is in; nothing for the default group or the vram router."""
    if routing.router is Router.MATRIX and routing.matrix is not None:
        sets = [name for name, combos in routing.matrix.combinations.items() if any(model_id in c for c in combos)]
        return {"matrix_sets": sets}
    if routing.router is Router.GROUP:
        for group in routing.groups:
            if model_id in group.members and group.name != DEFAULT_GROUP:
                return {"group": {"name": group.name, "swap": group.swap, "exclusive": group.exclusive,
                                  "persistent": group.persistent}}
    return {}


def selector_record(selector: Selector, config: Config, states: Mapping[str, str], created: int) -> dict[str, Any]:
    record: dict[str, Any] = {"id": selector.id, "object": "model", "created": created, "owned_by": "llama-swap"}
    if selector.name.strip():
        record["name"] = selector.name.strip()
    if selector.description.strip():
        record["description"] = selector.description.strip()
    internal: dict[str, Any] = {"type": "selector", "strategy": selector.strategy, "targets": selector.targets}
    if selector.strategy == "spillover":
        internal["spillover"] = selector.spillover
    record["meta"] = {"llamaswap": {**selector.metadata, **internal}}
    watched = selector.targets[:1] if selector.strategy == "pin" else selector.targets
    warm = any(states.get(config.real_model_id(t) or "") in (STARTING, READY) for t in watched)
    record["status"] = {"value": "loaded" if warm else "unloaded"}
    return record


def error_answer(request: web.Request, error: Exception, body_limit_mb: int) -> web.StreamResponse | None:
    """How an error that ends a handler is told to the client: our errors as OpenAI envelopes,
    unknown paths and methods as the original's plain texts; None for what is not ours to tell."""
    if isinstance(error, ApiError):
        response = error_response(request, error.status, error.message)
        response.headers.update(error.headers or {})
        return response
    if isinstance(error, SelectorError):
        return error_response(request, 503, str(error))
    if isinstance(error, RequestCancelled):
        response = error.exchange.response
        if response is None or not response.prepared:
            return error_response(request, 499, str(error))
        if request.transport is not None:
            request.transport.close()  # a cut stream must look cut to the client, not complete
        return response
    if isinstance(error, ConcurrencyLimited):
        return web.Response(status=429, body=CONCURRENCY_LIMIT_BODY,
                            headers={"Content-Type": "application/json", "Retry-After": "1"})
    if isinstance(error, Unavailable):
        response = error_response(request, 503, str(error))
        response.headers["Retry-After"] = str(error.retry_after)
        return response
    if isinstance(error, SchedulerError):
        return error_response(request, 500, f"unspecific error: {error}")
    if isinstance(error, BodyError):
        return error_response(request, error.status, str(error))
    if isinstance(error, web.RequestPayloadError):  # e.g. chunked framing that is broken or cut short
        reason = malformed_reason(error) or printable(str(error))
        response = error_response(request, 400, f"cannot read the request body: {reason}")
        response.force_close()  # the rest of the body is still on the wire
        return response
    if isinstance(error, ConnectionError):
        return request.get(STREAMING)  # the client left while we wrote to it: a disconnect, not a fault
    if isinstance(error, web.HTTPRequestEntityTooLarge):
        return error_response(request, 413,
                              f"request body too large: the limit is {body_limit_mb} MB (maxRequestBodyMB)")
    if isinstance(error, web.HTTPNotFound):
        return web.Response(status=404, text="404 page not found\n")
    if isinstance(error, web.HTTPMethodNotAllowed):
        return web.Response(status=405, text="Method Not Allowed\n",
                            headers={"Allow": ", ".join(sorted(error.allowed_methods))})
    return None


def check_host_and_origin(request: web.BaseRequest, config: Config) -> None:
    """ApiError 403 for a request by a name we do not answer to without keys (DNS rebinding, see
    `known_host`), or one that would change state from another origin's page (`foreign_origin`)."""
    host = request.headers.get("Host", "")
    if not (config.api_keys or config.admin_keys) and request.path not in ("/health", "/wol-health") and \
            not known_host(host, tuple(config.allowed_origins)):
        raise ApiError(403, f"refused: {printable(host[:200])!r} is not a name this server answers to without keys "
                            "(a guard against DNS rebinding); if it is yours, add its origin to allowedOrigins")
    if changes_state(request) and (origin := foreign_origin(request, config.allowed_origins)):
        raise ApiError(403, f"refused: a page of {origin} may not change anything here (a guard against other "
                            "web pages); if it should, add its origin to allowedOrigins")


def check_keys(request: web.Request, config: Config) -> ApiKey | None:
    """The request's key, or ApiError 401/403 unless the request may pass: with `adminKeys`, the
    admin surface takes only those, and keys from `apiKeys` are for model routes alone; a key
    scoped to some models or kept from swapping never changes the server's state. None where no
    key is needed or none was matched."""
    unknown_route = request.match_info.http_exception is not None  # 404/405 answer as they are
    if not (config.api_keys or config.admin_keys) or unknown_route or request.path in OPEN_PATHS:
        return None
    sent = request_api_key(request)
    model_route = request.path in MODEL_ROUTE_PATHS or request.path.startswith(("/upstream/", "/comfyui"))
    if admin := find_key(sent, config.admin_keys):
        return admin
    if key := find_key(sent, config.api_keys):
        if model_route:
            return key
        if config.admin_keys:
            raise ApiError(403, "this API key may only call model routes; the admin API needs a key from adminKeys")
        if key.restricted and changes_state(request):
            raise ApiError(403, f"API key {key.name!r} is limited (models or swap), so it may not change "
                                "what runs; that takes an unlimited key or one from adminKeys")
        return key
    if model_route and not config.api_keys:
        return None
    raise ApiError(401, "unauthorized: invalid or missing API key",
                   {"WWW-Authenticate": 'Basic realm="llama-swap"'})


class KeySlots:
    """How many requests each API key has admitted (being read, queued, served): a key with
    `concurrency` gets a 429 past it."""

    def __init__(self) -> None:
        self.taken_by: Counter[str] = Counter()

    @contextlib.contextmanager
    def taken(self, key: ApiKey | None) -> Iterator[None]:
        if key is None:
            yield
            return
        if key.concurrency and self.taken_by[key.name] >= key.concurrency:
            raise ApiError(429, f"API key {key.name!r} already has {key.concurrency} requests in flight "
                                "(its concurrency); try again when one ends", {"Retry-After": "1"})
        self.taken_by[key.name] += 1
        try:
            yield
        finally:
            self.taken_by[key.name] -= 1


def check_scope(key: ApiKey | None, *names: str) -> None:
    """403 unless the request's key may use the model known by these names (as asked for, as
    chosen by a pin or selector, its ID)."""
    if key is not None and not key.allows(*names):
        raise ApiError(403, f"API key {key.name!r} may not use model {names[0]!r}")


def split_upstream_path(config: Config, raw_tail: str) -> tuple[str | None, str]:
    """(model ID, raw remainder) for the longest leading run of path segments naming a model.
    Runs are tried from the shortest up and only while no longer than the longest name, so a
    path of ten thousand segments costs what a short one does."""
    found: tuple[str | None, str] = (None, "")
    end = 0
    while True:
        end = raw_tail.find("/", end + 1)
        name = urllib.parse.unquote(raw_tail if end < 0 else raw_tail[:end])
        if len(name) > config.longest_name:
            return found
        model = config.real_model_id(name) or (name if name in config.peer_routes else None)
        if model is not None:
            found = (model, "" if end < 0 else raw_tail[end:])
        if end < 0:
            return found


def add_vram_needs(records: list[dict[str, Any]], config: Config, book: VramBook) -> None:
    """With the vram router, each model's footprint in its /v1/models record: measured, else its hint."""
    for record in records:
        if record["meta"]["llamaswap"]["type"] in ("model", "alias"):
            need = book.need(config.real_model_id(record["id"]) or "")
            record["meta"]["llamaswap"]["vram"] = {str(g): b for g, b in sorted((need or {}).items())}


def running_records(scheduler: Scheduler, book: VramBook | None) -> list[dict[str, Any]]:
    """/running: each model whose server is starting, ready, sleeping or stopping, with its
    requests and, with the vram router (`book`), the memory it holds as measured: its footprint,
    or what it keeps while it sleeps."""
    running = []
    for model_id, process in sorted(scheduler.processes.items(), key=lambda e: e[0].encode()):
        if process.state == STOPPED:
            continue
        model = process.model
        entry = {"model": model_id, "state": process.state, "cmd": model.cmd, "proxy": model.proxy, "ttl": model.ttl}
        if model.protected:
            entry["protected"] = True
        entry.update({k: v for k, v in (("name", model.name), ("description", model.description)) if v})
        entry.update(in_flight=scheduler.in_flight[model_id], ttl_remaining=scheduler.ttl_remaining(model_id),
                     queued=scheduler.reserved[model_id] - scheduler.in_flight[model_id])
        held = None if book is None else book.kept_asleep(model_id) if process.asleep else book.measured.get(model_id)
        if held:
            entry["vram"] = {str(gpu): size for gpu, size in sorted(held.items())}
        running.append(entry)
    return running


def model_settings(model: ModelConfig) -> dict[str, Any]:
    """A model's settings as loaded (macros expanded, defaults filled in), in the config's own
    key names, secrets masked: what the UI's model page shows."""
    settings: dict[str, Any] = {
        "cmd": masked_command(model.cmd), "cmdStop": masked_command(model.cmd_stop), "proxy": model.proxy,
        "checkEndpoint": model.check_endpoint, "env": masked_env(model.env), "ttl": model.ttl,
        "unloadTimeout": model.unload_timeout, "concurrencyLimit": model.concurrency_limit,
        "useModelName": model.use_model_name, "sendLoadingState": model.send_loading_state,
        "unlisted": model.unlisted, "protected": model.protected,
        "filters": {"stripParams": model.filters.strip_params, "setParams": model.filters.set_params},
        "kvCache": None if model.kv_cache is None else {"maxDiskMB": model.kv_cache.max_disk_mb,
                                                         "saveTimeout": model.kv_cache.save_timeout},
        "sleep": None if model.sleep is None else {"sleep": str(model.sleep.sleep), "wake": str(model.sleep.wake)},
        "vram": {"all" if gpu is None else str(gpu): size for gpu, size in model.vram.items()},
    }
    if model.metadata:
        settings["metadata"] = model.metadata
    return settings


def model_detail(runtime: Runtime, model_id: str) -> dict[str, Any]:
    """GET /api/models/<id>: one model's page: state and why, settings, what was learnt of its
    loads, wakes and memory, what a request would take now, and its recent swaps."""
    process, scheduler, learnt = runtime.processes[model_id], runtime.scheduler, runtime.learnt
    model = process.model
    loads = list(learnt.loads(model_id))
    serving = scheduler.in_flight[model_id]
    return {
        "id": model_id, "name": model.name, "description": model.description, "state": process.state,
        "state_reason": process.state_reason, "aliases": model.aliases,
        **routing_of(runtime.config.routing, model_id), **capability_fields(model.capabilities),
        "loading": process.load_status(), "failed": process.failure if process.state == STOPPED else None,
        "in_flight": serving, "queued": scheduler.reserved[model_id] - serving,
        "ttl_remaining": scheduler.ttl_remaining(model_id), "settings": model_settings(model),
        "learnt": {"load_times": [round(t, 3) for t in loads],
                   "usual_load_s": round(statistics.median_high(loads), 3) if loads else None,
                   "wake_times": [round(t, 3) for t in learnt.wakes(model_id)],
                   "vram": {str(g): b for g, b in learnt.vram.get(model_id, {}).items()},
                   "vram_asleep": {str(g): b for g, b in learnt.vram_asleep.get(model_id, {}).items()}},
        "plan": scheduler.plan(model_id),
        "swaps": [r.as_json() for r in runtime.swap_history if r.model == model_id or model_id in r.stops][-50:],
    }


def requested_profile(body: bytes, config: Config) -> str | None:
    """The profile a PUT /api/profiles/active names ({"name": "<profile>"} or {"name": null})."""
    try:
        request = json.loads(body)
    except ValueError:
        request = None
    if not isinstance(request, dict):
        raise ApiError(400, "invalid profile request")
    if "name" not in request:
        raise ApiError(400, "profile name is required")
    name = request["name"]
    if name is not None and not isinstance(name, str):
        raise ApiError(400, "profile name must be a string or null")
    if name and name not in config.profiles:
        raise ApiError(404, f'profile "{name}" not found')
    return name or None


###############################################################################
# 22. Events and loading streams ##############################################
###############################################################################

# /api/events fan-out (model status, logs, activity, in-flight) and the SSE stream that a
# sendLoadingState model sends while it loads.


def sse_event(kind: str, data: Any) -> bytes:
    """One /api/events message: its `data` is JSON inside a JSON string, as the original sends it."""
    return f"event:message\ndata:{go_json({'type': kind, 'data': go_json(data)})}\n\n".encode()


class Events:
    """The /api/events watchers, each with its own queue of at most LIMIT bytes."""

    LIMIT = 4 * 1024 * 1024

    def __init__(self) -> None:
        self.streams: set[LogStream] = set()

    def publish(self, kind: str, data: Any) -> None:
        if self.streams:  # nobody watching: not even the message is made
            message = sse_event(kind, data)
            for stream in self.streams:
                stream.offer(message)

    @contextlib.contextmanager
    def watching(self, first: Iterable[bytes], hang_up: Callable[[], None]) -> Iterator[LogStream]:
        """A watcher that gets `first`, then every message published while the block runs;
        `hang_up` ends its connection when it falls too far behind."""
        stream = LogStream(self.LIMIT, resync=True)
        stream.hang_up = hang_up
        for message in first:
            stream.offer(message)
        self.streams.add(stream)
        try:
            yield stream
        finally:
            self.streams.discard(stream)

    def close(self) -> None:
        for stream in self.streams:
            stream.close()


class Timeline:
    """The box's last hour for the UI's timeline page: each model's state changes (with why)
    and, per second, how many of its requests were served and how many waited (the most at
    once, and how many at the second's end: a figure holds until the next second recorded).
    Bounded in time (WINDOW) and in entries (LIMIT) whatever the load: a busy model adds one
    entry a second, however many requests it serves. Each entry goes to `publish` when it is
    recorded, and again (same id) when its most rises or, once, when its second is over."""

    WINDOW = 3600.0
    LIMIT = 20000

    def __init__(self, publish: Callable[[dict[str, Any]], None] = lambda entry: None,
                 clock: Callable[[], float] = time.time,
                 later: Callable[[float, Callable[[], None]], Any] | None = None):
        self.entries: collections.deque[dict[str, Any]] = collections.deque(maxlen=self.LIMIT)
        self.latest: dict[str, dict[str, Any]] = {}  # model -> its last state entry, however old
        self.loads: dict[str, dict[str, Any]] = {}  # model -> its newest load entry
        self.publish, self.clock = publish, clock
        self.later = later or (lambda delay, call: asyncio.get_running_loop().call_later(delay, call))
        self.ids = itertools.count(1)
        self.started = round(clock(), 3)  # ids count from 1 again after a restart: this tells the runs apart

    def _add(self, entry: dict[str, Any]) -> dict[str, Any]:
        entry = {"id": next(self.ids), "at": round(self.clock(), 3), **entry}
        self.entries.append(entry)
        self.publish(entry)
        return entry

    def state(self, model: str, state: State, reason: str = "") -> None:
        self.latest[model] = self._add({"kind": "state", "model": model, "state": str(state), "reason": reason})

    def counted(self, model: str, serving: int, waiting: int) -> None:
        """The scheduler's counts of a model changed (a request arrived, was granted, ended)."""
        entry = self.loads.get(model)
        if entry is not None and entry["open"]:  # the common case, one dict update
            entry["serving"][1], entry["waiting"][1] = serving, waiting
            if serving > entry["serving"][0] or waiting > entry["waiting"][0]:
                entry["serving"][0], entry["waiting"][0] = max(serving, entry["serving"][0]), \
                    max(waiting, entry["waiting"][0])
                self.publish(entry)
            return
        if not (serving or waiting or entry and (entry["serving"][1] or entry["waiting"][1])):
            return  # idle, and it was at the end of its last second recorded
        self.loads[model] = entry = self._add({"kind": "load", "model": model, "second": int(self.clock()),
                                               "serving": [serving, serving], "waiting": [waiting, waiting],
                                               "open": True})
        self.later(entry["second"] + 1 - self.clock(), functools.partial(self._seal, entry))

    def _seal(self, entry: dict[str, Any]) -> None:
        """Its second is over: told once more with the figures it ended with."""
        entry["open"] = False
        self.publish(entry)

    def since(self, after: float) -> dict[str, Any]:
        """GET /api/timeline: entries newer than `after` (unix seconds) within the window, and
        what held before the first of them (each model's state, and its requests served and
        waiting where its last load entry is older), so that its lanes can be drawn."""
        now = self.clock()
        start = max(after, now - self.WINDOW)
        entries = [e for e in self.entries if e["at"] > start]
        first_id = entries[0]["id"] if entries else math.inf
        states = {m: e for m, e in self.latest.items() if e["id"] < first_id}
        for entry in self.entries:  # where a model's latest state is in the answer, the one before it
            if entry["id"] >= first_id:
                break
            if entry["kind"] == "state":
                states[entry["model"]] = entry
        before = {m: {"state": e["state"], "at": e["at"], "reason": e["reason"]} for m, e in states.items()}
        for model, load in self.loads.items():
            if load["id"] < first_id and (load["serving"][1] or load["waiting"][1]):
                before.setdefault(model, {}).update(serving=load["serving"][1], waiting=load["waiting"][1])
        return {"now": round(now, 3), "started": self.started, "window_s": self.WINDOW, "from": round(start, 3),
                "before": dict(sorted(before.items())), "entries": entries}


def wants_stream(body: bytes) -> bool:
    """Whether the client asked for a stream in its JSON body."""
    text = as_text(body)
    span = json_member_span(text, "stream")
    try:
        value = json.loads(text[span[0]:span[1]]) if span else False
    except ValueError:
        return False
    return value is True or value == "true" or (type(value) in (int, float) and value != 0)


class LoadingStream:
    """What a user sees in the reasoning field of their chat while the model loads: the
    model's name, the queue position when it changes, a dot every 0.75 s and now and then a
    remark, typed out five characters at a time; then how long it took.

    Unlike the original, the end is not typed: once the model is ready, whatever text is left
    goes out at once with the `Done!` line, so the answer never waits for an animation.
    """

    TICK = 0.75
    PIECE, PIECE_PAUSE = 5, 1 / 15  # 75 characters a second
    RULE = "\u2501" * 5
    REMARKS = (
        "Warming up the tensors", "Convincing the GPU this is a good idea", "Counting parameters, one by one",
        "Moving weights into VRAM; they are heavier than they look", "Asking the model to wake up politely",
        "Still faster than downloading it again", "Lining up the attention heads", "Untangling the KV cache",
    )

    def __init__(self, request: web.Request, model: str, position: Callable[[], int],
                 status: Callable[[], dict[str, Any] | None]):
        self.request = request
        self.position = position
        self.status = status  # the model's load status: progress and ETA, once it starts
        self.began = time.monotonic()
        self.response = CountedResponse(status=200, headers={
            "Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.pending = f"{self.RULE}\nllama-swap loading model: {model}\n"  # typed out by the writer
        self.writer: asyncio.Task | None = None

    async def open(self) -> web.StreamResponse:
        await self.response.prepare(self.request)
        self.writer = asyncio.create_task(self._type())
        return self.response

    async def say(self, text: str) -> None:
        event = {"choices": [{"delta": {"reasoning_content": text}}]}
        await self.response.write(f"data: {go_json(event)}\n\n".encode())

    async def _type(self) -> None:
        loop = asyncio.get_running_loop()
        next_tick = loop.time() + self.TICK
        next_remark = loop.time() + random.uniform(2, 5)
        shown = 0
        while True:
            if self.pending:
                piece, self.pending = self.pending[:self.PIECE], self.pending[self.PIECE:]
                await self.say(piece)
            await asyncio.sleep(self.PIECE_PAUSE)
            now = loop.time()
            if now < next_tick:
                continue
            next_tick += self.TICK
            position = self.position()
            if position and position != shown:
                self.pending += f"\nQueue position: #{position} "
            elif now >= next_remark:
                self.pending += f"\n{self._remark()} "
                next_remark = now + random.uniform(5, 9)
            else:
                self.pending += "."
            shown = position

    def _remark(self) -> str:
        """How far the load has got when that is known (`Loading 43%, about 12 s left`), else a
        remark of ours."""
        status = self.status() or {}
        progress, eta = status.get("progress"), status.get("eta_s")
        if progress is None and eta is None:
            return random.choice(self.REMARKS)
        text = "Loading" + (f" {progress:.0%}" if progress is not None else "")
        return text + (f", about {math.ceil(eta)} s left" if eta is not None else "")

    async def stop(self) -> None:
        """No more ticks; the text not typed yet goes out at once."""
        if self.writer:
            self.writer.cancel()
            await asyncio.wait({self.writer})  # unlike awaiting it, this never swallows our own cancellation
            self.writer = None
        if self.pending:
            text, self.pending = self.pending, ""
            with contextlib.suppress(ConnectionError):
                await self.say(text)

    async def finish(self) -> None:
        """The model is ready: say so, then the real answer follows in the same stream."""
        await self.stop()
        with contextlib.suppress(ConnectionError):  # the client may be gone; the relay notices next
            await self.say(f"\nDone! ({time.monotonic() - self.began:.2f}s)\n{self.RULE}\n \n")


async def stream_while_loading(request: web.Request, scheduler: Scheduler, model: str, path_qs: str,
                               body: bytes, key: ApiKey | None) -> web.StreamResponse:
    """sendLoadingState: admitted first (a 429 is never inside a stream), then an SSE
    stream at once that tells what happens while the model loads, then the answer itself."""
    with scheduler.admitted(model):
        ticket = scheduler.ticket(model, request_label(request), key)
        request[EXCHANGE].waiting_on(ticket, scheduler.position)
        processes = scheduler.processes
        loading = LoadingStream(request, model, lambda: scheduler.position(ticket),
                                lambda: processes[model].load_status() if model in processes else None)
        response = await loading.open()
        request[EXCHANGE].responding(response)
        try:
            async with scheduler.granted(ticket) as process:
                await loading.finish()
                if process.upstream is None:
                    raise UpstreamError(Failure.NOT_READY, f"[{model}] process is not ready")
                await relay_into(response, request, process.upstream, path_qs, body, forwarded_headers(request))
        except (SchedulerError, UpstreamError) as e:
            await loading.stop()
            message = f"unspecific error: {e}" if isinstance(e, SchedulerError) else \
                f"upstream {model} unreachable: {e}"
            request[EXCHANGE].failure = (503 if isinstance(e, Unavailable) else 500, message)
            with contextlib.suppress(ConnectionError):  # no one left to tell
                await response.write(stream_error_event(path_qs, message, "internal_error"))
        finally:
            await loading.stop()
        with contextlib.suppress(ConnectionError):
            await response.write_eof()
        return response


###############################################################################
# 23. Runtime #################################################################
###############################################################################

# What runs behind the HTTP face, wired once: the processes and their scheduler, logs,
# activity, metrics, events, GPU watching and every background task, each owned here and
# cancelled together at shutdown.

VRAM_EVERY = 2.0  # seconds between the vram router's readings of the GPUs


class Tasks:
    """Background work with one owner, each task by name: starting one under a name in use
    replaces it, and close() cancels them all together and waits for them, so what they hold
    (a GPU handle, a thread's result) is let go on the way out."""

    def __init__(self) -> None:
        self.running: dict[str, asyncio.Future] = {}

    def start(self, name: str, work: Awaitable[Any]) -> asyncio.Future:
        self.stop(name)
        task = self.running[name] = asyncio.ensure_future(work)
        return task

    def stop(self, name: str) -> None:
        if (task := self.running.pop(name, None)) is not None:
            task.cancel()

    def alive(self, name: str) -> bool:
        return name in self.running and not self.running[name].done()

    async def close(self) -> None:
        tasks = list(self.running.values())
        self.running.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


SWAP_HISTORY = 200  # swap records kept for GET /api/swaps


class Runtime:
    """Everything behind the HTTP face, wired once: the model processes and their scheduler, the
    logs, activity, metrics, event fan-out, GPU watching, and every background task (in one
    Tasks). Reload is a short list of configure() calls on the objects that hold config."""

    def __init__(self, config: Config, log: ProxyLog, source: ConfigSource | None = None,
                 groups: GroupRecord | None = None):
        self.config = config
        self.log = log
        self.source = source
        self.groups = groups or GroupRecord(None)
        self.tasks = Tasks()
        self.events = Events()
        self.timeline = Timeline(lambda entry: self.events.publish("timeline", entry))
        self.metrics = Metrics()
        self.learnt = Learnt(self._remember)
        self.vram_book = VramBook.of(config, self.learnt)
        self.processes = {m: self._process(cfg) for m, cfg in config.models.items()}  # the scheduler's from now on
        self.scheduler = Scheduler(self.processes, self._policy(config), log, config.routing.priority,
                                   config.routing.max_wait, config.routing.min_residency, config.routing.queue_timeout,
                                   on_grant=self.metrics.waited, on_refuse=self.metrics.refuse,
                                   on_swap=self._swapped, on_count=self.timeline.counted, new_process=self._process)
        self.swap_history: collections.deque[SwapRecord] = collections.deque(maxlen=SWAP_HISTORY)
        self.activity = Activity(config, log, self._activity_recorded)
        self.virtual = VirtualModels(config, self.processes)
        self.inflight = InFlight(lambda event: self.events.publish("inflight", event),
                                 lambda: bool(self.events.streams))
        self.performance: PerformanceMonitor | None = None
        self.hardware: asyncio.Future | None = None
        for source in ("proxy", "upstream"):
            getattr(log, source).listeners.add(functools.partial(self._publish_log, source))

    def start(self, watch_config_file: bool = False) -> None:
        """Once listening: TTL unloads begin, `hooks.on_startup.preload` models load, the
        performance monitor samples, the hardware is looked at once."""
        self.scheduler.start()
        self.tasks.start("recall", self._recall())
        self._watch_gpus(self.config)
        self._preload()
        self._monitor(self.config)
        self.hardware = self.tasks.start("hardware", asyncio.to_thread(hardware_snapshot, __version__))
        self._read_certificates(self.config)
        self.tasks.start("stalled clients", self._end_stalled_clients())
        if any(m.kv_cache for m in self.config.models.values()):  # the caches of models now gone
            dirs = {kv_cache_model_dir(self.config.kv_cache_root, m) for m in self.config.models}
            self.tasks.start("kv cleanup", asyncio.to_thread(remove_other_models_kv, self.config.kv_cache_root, dirs))
        if watch_config_file:
            self.tasks.start("config watch", watch_config(self))

    async def _end_stalled_clients(self) -> None:
        """Every second: a client that has taken no byte of its answer for stalledClientTimeout
        seconds is hung up on, so that its request ends and frees its model (and the swaps
        waiting for that model)."""
        while True:
            await asyncio.sleep(1.0)
            if timeout := self.config.stalled_client_timeout:
                for response in stalled_clients(timeout):
                    self.log.warn(f"{response.label}: the client took nothing of its answer for "
                                  f"{go_duration(timeout)}, hanging up (stalledClientTimeout)")
                    response.transport.abort()

    def _swapped(self, record: SwapRecord) -> None:
        """A swap decided or done: kept for /api/swaps (once), and told to /api/events watchers."""
        if not self.swap_history or self.swap_history[-1].id < record.id:
            self.swap_history.append(record)
            self.metrics.swapped(record)
        self.events.publish("swap", record.as_json())

    def _process(self, model: ModelConfig) -> ModelProcess:
        return ModelProcess(model, self.log, self._state_changed, self.groups, self.learnt, self._kv_done)

    def _policy(self, config: Config) -> SwapPolicy:
        if config.routing.router is Router.VRAM:
            return VramPolicy(self.vram_book, self.running_groups, self.log)
        return swap_policy(config)

    def running_groups(self) -> dict[str, int]:
        """The process group of each model whose server runs."""
        return {m: p.group for m, p in self.processes.items() if p.group is not None}

    def states(self) -> dict[str, State]:
        return {m: p.state for m, p in self.processes.items()}

    def _asleep(self) -> set[str]:
        return {m for m, p in self.processes.items() if p.asleep}

    def failures(self) -> dict[str, dict[str, Any]]:
        """Why the last start of each model whose start failed did (until its next attempt)."""
        return {m: p.failure for m, p in self.processes.items() if p.failure is not None}

    def loading(self) -> dict[str, dict[str, Any]]:
        """The load status (elapsed, progress, ETA) of every model starting now."""
        return {m: status for m, p in self.processes.items() if (status := p.load_status()) is not None}

    def _state_changed(self, process: ModelProcess) -> None:
        self.log.debug(f"<{process.model.id}> state is now {process.state}")
        reason = process.sleep_reason if process.state == SLEEPING else process.stop_reason
        self.metrics.state_changed(process.model.id, process.state, reason)
        self.timeline.state(process.model.id, process.state, process.state_reason)
        if process.state in (STOPPING, STOPPED):
            self.vram_book.stopped()
        self.scheduler.pump()
        self._publish_statuses()
        self.inflight.waiting_moved()
        if process.state == STARTING and not self.tasks.alive("load ticker"):
            self.tasks.start("load ticker", self._tick_loads())

    async def _tick_loads(self) -> None:
        """Once a second while a model starts: its progress and ETA to /api/events watchers."""
        while any(p.state == STARTING for p in self.processes.values()):
            await asyncio.sleep(1.0)
            self._publish_statuses()

    def _publish_statuses(self) -> None:
        if self.events.streams:
            statuses = model_statuses(self.config, self.states(), self.loading(), self.failures())
            self.events.publish("modelStatus", statuses)

    def _kv_done(self, model: str, action: str, transfer: SlotTransfer) -> None:
        self.metrics.kv_transfer(model, action, transfer.tokens, transfer.ms / 1000)
        self.events.publish("kvCache", {"model": model, "action": action, "slot": transfer.slot,
                                        "tokens": transfer.tokens, "bytes": transfer.size, "ms": transfer.ms})

    def _activity_recorded(self, row_id: int, model: str, tokens: Tokens, key: str) -> None:
        self.metrics.add_tokens(model, tokens, key)
        self.events.publish("activity", {"id": row_id})

    def _publish_log(self, source: str, data: bytes) -> None:
        self.events.publish("logData", {"source": source, "data": data.decode("utf-8", "replace")})

    def _remember(self, model: str) -> None:
        """What was learnt of a model, into the store for the next run (a model a reload removed is forgotten)."""
        if model in self.processes:
            self.activity.remember(model, self.learnt.figures(model))

    async def _recall(self) -> None:
        """What earlier runs learnt of each model (load times, measured VRAM), from the store."""
        try:
            saved = await self.activity.call(self.activity.store.figures)
        except sqlite3.Error as e:
            self.log.warn(f"store: the models' figures could not be read: {e}")
            return
        self.learnt.recall(saved)

    def _preload(self) -> None:
        self.tasks.stop("preload")
        if self.config.preload:
            self.tasks.start("preload", self._preload_models(list(self.config.preload)))

    async def _preload_models(self, models: list[str]) -> None:
        """One after another, through the scheduler like any request, so the routing rules hold
        and a request arriving meanwhile shares the start instead of causing a second one."""
        for model in models:
            self.log.info(f"preloading model: {model}")
            try:
                async with self.scheduler.lease(model, "preload"):
                    pass
            except SchedulerError as e:
                self.log.error(f"failed to preload model {model}: {e}")

    def _watch_gpus(self, config: Config) -> None:
        """The vram router's eyes, on while it is the router."""
        if config.routing.router is not Router.VRAM:
            self.tasks.stop("vram watch")
        elif "vram watch" not in self.tasks.running:  # (one that found no GPU is not started again)
            self.tasks.start("vram watch", self._read_gpus())

    async def _read_gpus(self) -> None:
        """Every VRAM_EVERY seconds: the GPUs and what our models hold of them. NVML is opened and
        closed in worker threads, never on the event loop."""
        book = self.vram_book
        book.source = await asyncio.shield(asyncio.to_thread(open_vram_source))
        if book.source is None:
            self.log.warn("vram router: no GPU found through NVML, so every model runs alone")
            return
        try:
            while True:
                starting = {m for m, p in self.processes.items() if p.state == STARTING}
                try:
                    await book.refresh(self.running_groups(), starting, self._asleep)
                except Exception as e:  # a bug or an odd driver: say so, and read again next time
                    self.log.error(f"vram router: reading the GPUs failed: {type(e).__name__}: {e}")
                await asyncio.sleep(VRAM_EVERY)
        finally:
            source, book.source = book.source, None
            await asyncio.shield(asyncio.to_thread(source.close))

    def gpu_budgets(self) -> dict[str, Any]:
        """With the vram router: each GPU's size, use and what our models may hold of it."""
        if self.config.routing.router is not Router.VRAM:
            return {}
        budget = self.vram_book.budget()
        return {"gpus": [{"index": i, "total": g.total, "used": g.used, "budget": budget[i]}
                         for i, g in sorted(self.vram_book.gpus.items())]}

    def _monitor(self, config: Config) -> None:
        self.tasks.stop("performance")
        self.performance = None if config.performance_disabled else PerformanceMonitor(config.performance_every)
        if self.performance:
            self.tasks.start("performance", self._sample(self.performance))

    async def _sample(self, monitor: PerformanceMonitor) -> None:
        """System and GPU samples until cancelled. NVML is opened and closed in worker threads
        (the close waits for a sample still reading it), never on the event loop."""
        monitor.gpu = await asyncio.shield(asyncio.to_thread(open_nvml))
        if monitor.gpu is None:
            self.log.info("GPU monitoring not available: no NVIDIA GPU found through NVML")
        try:
            await monitor.run()
        except Exception as e:  # a bug: say so, and the rest of the server goes on without samples
            self.log.error(f"performance monitor stopped: {type(e).__name__}: {e}")
        finally:
            if monitor.gpu:
                await asyncio.shield(asyncio.to_thread(monitor.gpu.close))

    def _read_certificates(self, config: Config) -> None:
        """For a config that names https upstreams or peers: the certificates that verify them,
        read in a thread, so that no request waits on the event loop for them."""
        if names_https(config):
            self.tasks.start("tls context", asyncio.to_thread(tls_client_context))

    def configure(self, new: Config) -> dict[str, list[str]]:
        """Switch to a new config (a reload's): each holder of config is told, the models
        added, removed, changed and kept are returned. No profile is active afterwards."""
        old, self.config = self.config, new
        self.log.configure(new)
        self.vram_book.configure(new)
        changes, relaunched = self.scheduler.configure(new, self._policy(new))
        for model in relaunched:
            self.vram_book.forget(model)
        self.virtual = VirtualModels(new, self.processes)
        self._watch_gpus(new)
        self._read_certificates(new)
        self.activity.configure(new)
        if (new.performance_disabled, new.performance_every) != (old.performance_disabled, old.performance_every):
            self._monitor(new)
        self._preload()
        self.events.publish("profileChanged", {"active": None})
        self._publish_statuses()
        return changes

    def request_done(self, exchange: Exchange, response: web.StreamResponse | None, status: int) -> None:
        """A model request's metrics and, for a POST, its activity row and capture."""
        seconds = time.monotonic() - exchange.clock
        self.metrics.request_done(exchange.model, exchange.path, status, exchange.first_byte_after, seconds,
                                  exchange.key)
        if exchange.method != "POST" or status == 101:
            return
        relayed = response is not None and response is exchange.response
        body = exchange.copy if relayed else getattr(response, "body", None)
        headers = response.headers if response is not None else {}
        self.activity.record(exchange, status, headers, body or b"", int(seconds * 1000))

    def log_monitor(self, name: str) -> LogMonitor:
        """The log /logs/stream/<name> reads: proxy, upstream, both (""), or one model's output."""
        if name in ("", "proxy", "upstream"):
            return {"": self.log.mux, "proxy": self.log.proxy, "upstream": self.log.upstream}[name]
        model, _rest = split_upstream_path(self.config, name)
        if model not in self.processes:
            raise ApiError(400, "invalid logger. Use 'proxy', 'upstream' or a model's ID")
        return self.processes[model].output

    def current_events(self) -> list[bytes]:
        """What an /api/events watcher is told first: the state of things now."""
        return [
            *(sse_event("logData", {"source": source, "data": log.history.history().decode("utf-8", "replace")})
              for source, log in (("proxy", self.log.proxy), ("upstream", self.log.upstream))),
            sse_event("modelStatus", model_statuses(self.config, self.states(), self.loading(), self.failures())),
            sse_event("uiConfig", {"activity": {"session_id": self.config.session_headers}}),
            sse_event("profileChanged", {"active": self.virtual.active}),
            sse_event("inflight", self.inflight.snapshot()),
        ]

    def activate_profile(self, name: str | None) -> None:
        """Pins of profile `name` (None: none) apply from the next request on."""
        if name != self.virtual.active:
            self.virtual.active = name
            self.log.info(f'active profile changed to "{name or ""}"')
            self.events.publish("profileChanged", {"active": name})
            self._publish_statuses()

    async def wind_down(self) -> None:
        """Shutdown begins: background work ends, event streams end, queued requests are refused."""
        await self.tasks.close()  # the GPU sources are closed on the way out
        self.events.close()
        self.scheduler.close()


###############################################################################
# 24. Reload ##################################################################
###############################################################################

# A changed config file, SIGHUP or /api/config/reload: the file is read and checked first (a
# bad one changes nothing), then models whose launch settings did not change keep running.


@dataclass(frozen=True)
class ConfigSource:
    """Where the config comes from: what a reload reads again and what --watch-config polls."""

    path: str | None
    directory: str | None

    def load(self, previous: Config | None = None) -> Config:
        return load_config(self.path, self.directory, previous)

    def snapshot(self) -> tuple:
        """Cheap fingerprint of the sources: None for a missing file or a dir with no YAML."""
        return (_file_fingerprint(self.path) if self.path else None,
                _dir_fingerprint(self.directory) if self.directory else None)


def _file_fingerprint(path: str) -> tuple | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


def _dir_fingerprint(directory: str) -> tuple | None:
    try:
        names = sorted(n for n in os.listdir(directory) if n.endswith((".yml", ".yaml")))
    except OSError:
        return None
    return tuple((n, _file_fingerprint(os.path.join(directory, n))) for n in names) or None


def reload(runtime: Runtime) -> dict[str, list[str]]:
    """Read the config again and switch to it; ConfigError leaves everything as it was.

    Models whose launch settings did not change keep their running server; changed and
    removed ones finish their requests on the old server and are then stopped.
    """
    if runtime.source is None:
        runtime.log.warn("nothing to reload: --demo has no config file")
        raise ConfigError("no config file to reload (started with --demo)")
    runtime.log.info("reloading configuration")
    try:
        new = runtime.source.load(runtime.config)
    except ConfigError as e:
        runtime.log.warn(f"failed to reload config: {e}")
        raise
    changes = runtime.configure(new)
    for note in new.notes():
        runtime.log.warn(f"config: {note}")
    runtime.log.info("configuration reloaded: " + ", ".join(f"{k} {v}" for k, v in changes.items() if v))
    return changes


WATCH_INTERVAL = 2.0


async def watch_config(runtime: Runtime) -> None:
    """Poll the config sources and reload when they change; a file that vanishes is not a change."""
    last = runtime.source.snapshot()
    while True:
        await asyncio.sleep(WATCH_INTERVAL)
        now = runtime.source.snapshot()
        if any(new is not None and new != old for old, new in zip(last, now)):
            reload_logged(runtime)
        last = now


def reload_logged(runtime: Runtime) -> None:
    """A reload whose failure is logged, never raised: the running config simply stays."""
    try:
        reload(runtime)
    except ConfigError:
        pass  # reload() has logged it
    except Exception as e:
        runtime.log.error(f"failed to reload config: {type(e).__name__}: {e}")


def reload_on_signal(runtime: Runtime) -> None:
    runtime.log.info("received SIGHUP, reloading config")
    reload_logged(runtime)


###############################################################################
# 25. HTTP ####################################################################
###############################################################################

# The application: middlewares, the route table and its handlers. The hot path:
# request -> model lookup -> scheduler.lease(model) -> relay -> release.

HTTP_TOKEN = re.compile(r"^[A-Za-z0-9!#$%&'*+\-.^_`|~]+$")


@web.middleware
async def cors_preflight(request: web.Request, handler) -> web.StreamResponse:
    """Any OPTIONS request is a CORS preflight, answered here for every path, without a key."""
    if request.method != "OPTIONS":
        return await handler(request)
    asked = request.headers.get("Access-Control-Request-Headers")
    allowed = ", ".join(h.strip() for h in asked.split(",") if HTTP_TOKEN.match(h.strip())) if asked is not None else \
        "Content-Type, Authorization, Accept, X-Requested-With"
    return web.Response(status=204, headers={
        "Access-Control-Allow-Origin": "*", "Access-Control-Allow-Methods": "GET, POST, PUT, PATCH, DELETE, OPTIONS",
        "Access-Control-Allow-Headers": allowed, "Access-Control-Max-Age": "86400"})


def add_trailing_slash(request: web.BaseRequest, location: str) -> web.Response:
    """301 (GET/HEAD) or 308 (keeps the method and body) to `location`, set by hand because
    aiohttp's redirect classes would re-encode its query."""
    return web.Response(status=301 if request.method in ("GET", "HEAD") else 308, headers={"Location": location})


@web.middleware
async def clean_path(request: web.Request, handler) -> web.StreamResponse:
    """Paths with `.`, `..` or empty segments (also percent-encoded) get a 301 to their clean form,
    as Go's ServeMux does, so that no `..` ever reaches an upstream or a peer."""
    raw_path, mark, query = request.raw_path.partition("?")
    decoded = urllib.parse.unquote(raw_path)
    if "//" not in decoded and not any(seg in (".", "..") for seg in decoded.split("/")):
        return await handler(request)
    clean = posixpath.normpath(decoded).replace("//", "/")
    if decoded.endswith("/") and clean != "/":
        clean += "/"
    return web.Response(status=301, headers={"Location": urllib.parse.quote(clean) + mark + query})


# Fixed, not from the system's mimetypes: some map .js to text/plain, which browsers refuse for modules.
UI_TYPES = {"html": "text/html", "js": "text/javascript", "css": "text/css", "svg": "image/svg+xml",
            "ico": "image/x-icon", "png": "image/png", "json": "application/json"}


class UiFiles:
    """Every file of the web UI by its path under /ui/, with its ETag: read once, at start,
    through importlib.resources so a zipapp serves them as well as a checkout does."""

    def __init__(self) -> None:
        self.files: dict[str, tuple[bytes, str]] = {}
        with contextlib.suppress(ModuleNotFoundError):
            self._walk(importlib.resources.files("ui_assets"), "")

    def _walk(self, directory: Any, prefix: str) -> None:
        for entry in directory.iterdir():
            if entry.is_dir():
                if not entry.name.startswith("__"):  # __pycache__ is Python's, not the UI's
                    self._walk(entry, f"{prefix}{entry.name}/")
            elif not entry.name.endswith((".py", ".pyc")):
                body = entry.read_bytes()
                self.files[prefix + entry.name] = body, '"' + hashlib.sha256(body).hexdigest()[:16] + '"'

    def answer(self, request: web.Request, path: str) -> web.Response:
        found = self.files.get(path)
        if found is None:
            raise ApiError(404, f"no such file in the web UI: {path}")
        body, etag = found
        headers = {"ETag": etag, "Cache-Control": "no-cache"}  # always revalidated: an upgrade shows at once
        if request.headers.get("If-None-Match") == etag:
            return web.Response(status=304, headers=headers)
        content_type = UI_TYPES.get(path.rpartition(".")[2], "application/octet-stream")
        return web.Response(body=body, content_type=content_type, headers=headers)


async def handle_health(request: web.Request) -> web.Response:
    return web.Response(text="OK")


async def handle_version(request: web.Request) -> web.Response:
    return json_response({"version": __version__, "commit": "python", "build_date": "unknown"})


def redirect(kind: type[web.HTTPRedirection], location: str) -> Callable[[web.Request], Awaitable[web.Response]]:
    """A handler that sends every request to `location`."""
    async def handle(request: web.Request) -> web.Response:
        raise kind(location)
    return handle


class Server:
    """The HTTP face of the proxy: the route table, its handlers, the middlewares and the steps
    of the hot path. What they act on is the Runtime's."""

    def __init__(self, runtime: Runtime):
        self.runtime = runtime
        self.log, self.processes, self.scheduler = runtime.log, runtime.processes, runtime.scheduler
        self.activity, self.metrics, self.events = runtime.activity, runtime.metrics, runtime.events
        self.inflight, self.vram_book = runtime.inflight, runtime.vram_book
        self.ui = UiFiles()
        self.log_streams: set[LogStream] = set()  # live /logs/stream readers, ended at shutdown
        self.websockets: weakref.WeakSet[web.WebSocketResponse] = weakref.WeakSet()  # closed at shutdown
        self.peers = PeerSessions()
        self.bodies = BodyReader()
        self.key_slots = KeySlots()
        self.handling: set[asyncio.Task] = set()  # requests being handled: what a shutdown ends

    @property
    def config(self) -> Config:  # replaced by a reload
        return self.runtime.config

    @property
    def virtual(self) -> VirtualModels:  # replaced by a reload
        return self.runtime.virtual

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self.access_log, cors_preflight, clean_path, self.watch, self.errors,
                                           self.guard],
                              client_max_size=self.config.max_request_body_mb * 1024 * 1024)
        any_path = "{tail:[\\s\\S]*}"
        app.add_routes([
            # the model routes: a model is read from the request, started if need be, relayed to
            *(web.post(path, self.handle_model) for path in MODEL_POST_PATHS),
            *(web.get(path, self.handle_model) for path in MODEL_GET_PATHS),
            web.get("/upstream", redirect(web.HTTPFound, "/ui/models")),
            web.route("*", "/upstream/" + any_path, self.handle_upstream),
            web.route("*", "/comfyui", self.handle_comfyui),
            web.route("*", "/comfyui/" + any_path, self.handle_comfyui),
            # models: listing and control
            web.get("/v1/models", self.handle_models),
            web.get("/models", self.handle_models),
            web.get("/running", self.handle_running),
            web.get("/unload", self.handle_unload_text),
            web.post("/api/models/unload", self.handle_unload_all),
            web.post("/api/models/unload/{model:[\\s\\S]+}", self.handle_unload_one),
            web.post("/api/models/load/{model:[\\s\\S]+}", self.handle_load_one),
            web.get("/api/profiles", self.handle_profiles),
            web.put("/api/profiles/active", self.handle_set_profile),
            web.post("/api/config/reload", self.handle_reload),
            web.get("/api/inflight", self.handle_inflight),
            web.get("/api/swaps", self.handle_swaps),
            web.get("/api/timeline", self.handle_timeline),
            web.get("/api/models/{model:[\\s\\S]+}", self.handle_model_detail),
            web.get("/api/plan", self.handle_plan),
            web.post("/api/inflight/{id}/cancel", self.handle_cancel_inflight),
            # watching
            web.get("/health", handle_health),
            web.get("/wol-health", handle_health),
            web.get("/logs", self.handle_logs),
            web.get("/logs/stream", self.handle_log_stream),
            web.get("/logs/stream/{id:[\\s\\S]+}", self.handle_log_stream),
            web.get("/api/events", self.handle_events),
            web.get("/metrics", self.handle_metrics),
            web.get("/api/performance", self.handle_performance),
            web.get("/api/hardware", self.handle_hardware),
            web.get("/api/metrics/activity", self.handle_activity),
            web.get("/api/metrics/stats", self.handle_activity_stats),
            web.get("/api/captures/{id}", self.handle_capture),
            # the web UI
            web.get("/", redirect(web.HTTPFound, "/ui")),
            web.get("/ui", redirect(web.HTTPMovedPermanently, "/ui/")),
            web.get("/ui/{path:[\\s\\S]*}", self.handle_ui),
            web.get("/favicon.ico", self.handle_favicon),
            web.get("/api/version", handle_version),
        ])
        app.on_shutdown.append(self._on_shutdown)
        app.on_cleanup.append(self._on_cleanup)
        return app


    # -- the hot path -------------------------------------------------------------

    async def handle_model(self, request: web.Request) -> web.StreamResponse:
        """request -> model (via profile pin or selector) -> scheduler.lease(model) -> relay -> release."""
        with self.key_slots.taken(request[API_KEY]):
            return await self.model_request(request)

    async def model_request(self, request: web.Request) -> web.StreamResponse:
        body = await self.read_body(request)
        requested = await self.bodies.off_loop(body, request_model, request.method,
                                               request.headers.get("Content-Type", ""), request.query.get("model", ""),
                                               body)
        name = self.virtual.pinned(requested)
        if not name:
            raise ApiError(404, "no model id could be identified")
        with self.virtual.selecting(name) as chosen:
            metadata = {"selector": name} if chosen != name else {}
            model = self.config.real_model_id(chosen)
            check_scope(request[API_KEY], requested, name, chosen, model or "")
            if model is None:
                return await self.peer_request(request, body, requested, chosen, metadata)
            return await self.local_request(request, body, requested, chosen, model, metadata)

    async def local_request(self, request: web.Request, body: bytes, requested: str, name: str, model: str,
                            metadata: dict[str, str]) -> web.StreamResponse:
        settings = self.config.models[model]
        path_qs, body = await self.for_upstream(request, body, requested, name, settings.filters,
                                                settings.use_model_name)
        key = request[API_KEY]
        priority = self.scheduler.priority.get(model, 0) + (key.priority if key else 0)
        metadata = {**metadata, "fifo_priority": str(priority)}
        with self.inflight.track(request, model, path_qs, body, metadata):
            if settings.send_loading_state and self.processes[model].state != READY and \
                    (key is None or key.swap is not SwapRight.RESIDENT) and \
                    path_qs.startswith("/v1/chat/completions") and await self.wants_stream(request, body):
                return await stream_while_loading(request, self.scheduler, model, path_qs, body, key)
            watch = functools.partial(request[EXCHANGE].waiting_on, position=self.scheduler.position)
            async with self.scheduler.lease(model, request_label(request), key, watch) as process:
                return await self.relay_local(request, process, path_qs, body)

    async def peer_request(self, request: web.Request, body: bytes, requested: str, name: str,
                           metadata: dict[str, str]) -> web.StreamResponse:
        """A model another server has: forwarded at once, no queue, no limit."""
        route = self.config.peer_routes.get(name)
        if route is None:
            raise ApiError(404, unknown_model_message(name, self.config))
        peer = self.config.peers[route[0]]
        # The peer knows the model by its own name.
        path_qs, body = await self.for_upstream(request, body, requested, route[1], peer.filters, "", name)
        with self.inflight.track(request, name, path_qs, body, metadata):
            return await self.relay_peer(request, peer, path_qs, body)

    async def for_upstream(self, request: web.Request, body: bytes, requested: str, name: str, filters: Filters,
                           use_model_name: str, filtered_as: str | None = None) -> tuple[str, bytes]:
        """Path and body as the upstream gets them: the model the client asked for replaced by
        `name` where a pin, a selector or a peer chose another (in the query of a GET, else in
        the body), then by `useModelName`, then the filters (keyed by `filtered_as`, the name)."""
        path_qs = forwarded_path(request)
        rename = None
        if name != requested:
            if request.method in ("GET", "HEAD"):
                path_qs = with_query_model(path_qs, name)
            else:
                rename = name
        body = await self.bodies.off_loop(body, upstream_body, request.headers.get("Content-Type", ""), body,
                                          use_model_name or rename, filters, filtered_as or name)
        return path_qs, body

    async def wants_stream(self, request: web.Request, body: bytes) -> bool:
        """Whether the client asked for a stream: `stream` in the JSON body, or ?stream=true."""
        if request.method in ("GET", "HEAD"):
            return request.query.get("stream") == "true"
        return await self.bodies.off_loop(body, wants_stream, body)

    async def read_body(self, request: web.Request) -> bytes:
        return await self.bodies.read(request, self.body_limit)

    @property
    def body_limit(self) -> int:
        """maxRequestBodyMB in bytes: a request body's limit, inflated or not, and a websocket message's."""
        return self.config.max_request_body_mb * 1024 * 1024

    async def relay_local(self, request: web.Request, process: ModelProcess, path_qs: str,
                          body: bytes) -> web.StreamResponse:
        upstream = process.upstream
        if upstream is None:  # it crashed or was stopped between the grant and now
            raise ApiError(503, f"[{process.model.id}] process is not ready")
        try:
            if is_websocket(request):
                return await relay_websocket(request, upstream, path_qs, forwarded_headers(request),
                                             self.body_limit, self.websockets)
            return await relay(request, upstream, path_qs, body, forwarded_headers(request), self.log)
        except UpstreamError as e:
            raise ApiError(e.status, f"upstream {process.model.id} unreachable: {e}") from None

    async def relay_peer(self, request: web.Request, peer: PeerConfig, path_qs: str, body: bytes) -> web.StreamResponse:
        try:
            if is_websocket(request):
                return await relay_websocket(request, self.peers.upstream(peer), path_qs, peer_headers(request, peer),
                                             self.body_limit, self.websockets)
            return await relay(request, self.peers.upstream(peer), path_qs, body, peer_headers(request, peer), self.log)
        except UpstreamError as e:
            self.log.warn(f"peer {peer.id}: proxy error: {printable(str(e))}")
            raise ApiError(502, f"peer proxy error: {e}") from None

    # -- /upstream and /comfyui ---------------------------------------------------

    async def handle_upstream(self, request: web.Request) -> web.StreamResponse:
        """/upstream/<model>/<path>: straight to the model's own server, body untouched."""
        raw_path, mark, raw_query = request.raw_path.partition("?")
        raw_tail = raw_path[len("/upstream/"):]
        model, rest = split_upstream_path(self.config, self.virtual.pinned_path(raw_tail))
        if model is None:
            raise ApiError(404, "model not found")
        check_scope(request[API_KEY], model)
        query = mark + raw_query
        if model not in self.processes and rest:  # not local: a peer's (local always wins)
            peer = self.config.peers[self.config.peer_routes[model][0]]
            body = await self.read_body(request)
            with self.tracked_passthrough(request, model, rest, body):
                return await self.relay_peer(request, peer, rest + query, body)
        if not rest:
            return add_trailing_slash(request, f"/upstream/{raw_tail.rstrip('/')}/{query}")
        ignored = any(p.search(urllib.parse.unquote(rest)) for p in self.config.ignore_paths)
        if ignored and self.processes[model].state != READY:
            raise ApiError(409, f"model {model} is not loaded; path matches upstream.ignorePaths")
        body = await self.read_body(request)
        with self.tracked_passthrough(request, model, rest, body):
            return await self.passthrough(request, model, rest + query, body)

    def tracked_passthrough(self, request: web.Request, model: str, path: str,
                            body: bytes) -> contextlib.AbstractContextManager:
        """An /upstream request is listed in flight when it calls a model route."""
        if path in {"POST": MODEL_POST_PATHS, "GET": MODEL_GET_PATHS}.get(request.method, ()):
            return self.inflight.track(request, model, path, body)
        return contextlib.nullcontext()

    async def passthrough(self, request: web.Request, model: str, path_qs: str, body: bytes) -> web.StreamResponse:
        """To a local model's own server, body untouched: /upstream and /comfyui."""
        process = self.processes[model]
        if process.model.ignore_websockets and is_websocket(request):
            # Outside the scheduler: it cannot start the model and does not keep it busy.
            if process.state != READY:
                raise ApiError(409, f"model {model} is not loaded; ignored websocket requests cannot start it")
            return await self.relay_local(request, process, path_qs, b"")
        with self.key_slots.taken(request[API_KEY]):
            async with self.scheduler.lease(model, request_label(request), request[API_KEY]) as process:
                return await self.relay_local(request, process, path_qs, body)

    async def handle_comfyui(self, request: web.Request) -> web.StreamResponse:
        """/comfyui/<path> to the model `comfyui_auto`; only the root page may start it."""
        raw_path, mark, raw_query = request.raw_path.partition("?")
        if raw_path == "/comfyui":
            return add_trailing_slash(request, f"/comfyui/{mark}{raw_query}")
        if COMFYUI_MODEL not in self.processes:
            raise ApiError(404, f"local model {COMFYUI_MODEL} not found")
        check_scope(request[API_KEY], COMFYUI_MODEL)
        rest = raw_path[len("/comfyui"):]
        if rest != "/" and self.processes[COMFYUI_MODEL].state != READY:
            raise ApiError(409, f"model {COMFYUI_MODEL} is not loaded; only /comfyui/ can start it")
        return await self.passthrough(request, COMFYUI_MODEL, rest + mark + raw_query, await self.read_body(request))

    # -- listing and control ------------------------------------------------------

    async def handle_models(self, request: web.Request) -> web.Response:
        """The OpenAI model list, with each model's loaded status."""
        profile = self.config.profiles.get(self.virtual.active) if self.virtual.active else None
        records = model_records(self.config, self.runtime.states(), int(time.time()), profile, self.runtime.loading(),
                                self.runtime.failures())
        if self.config.routing.router is Router.VRAM:
            add_vram_needs(records, self.config, self.vram_book)
        if (key := request[API_KEY]) is not None:  # a scoped key sees what it may use
            records = [r for r in records if key.allows(r["id"], r["meta"]["llamaswap"].get("modelID", ""))]
        headers = {"Access-Control-Allow-Origin": request.headers["Origin"]} if "Origin" in request.headers else None
        return json_response({"object": "list", "data": records, **self.runtime.gpu_budgets()}, headers=headers)

    async def handle_running(self, request: web.Request) -> web.Response:
        """Models whose server is starting, ready, sleeping or stopping."""
        book = self.vram_book if self.config.routing.router is Router.VRAM else None
        running = running_records(self.scheduler, book)
        failed = [{"model": m, **failure} for m, failure in sorted(self.runtime.failures().items())
                  if self.processes[m].state == STOPPED]
        return json_response({"running": running, **({"failed": failed} if failed else {}),
                              **self.runtime.gpu_budgets()})

    async def handle_unload_all(self, request: web.Request) -> web.Response:
        await self.scheduler.unload(list(self.processes), request_label(request))
        return json_response({"msg": "ok"})

    async def handle_unload_text(self, request: web.Request) -> web.Response:
        await self.scheduler.unload(list(self.processes), request_label(request))
        return web.Response(text="OK")

    async def handle_load_one(self, request: web.Request) -> web.Response:
        """Our addition, for the UI's Load button: start a model as a request would, answer once it is ready."""
        model = self.config.real_model_id(request.match_info["model"].lstrip("/"))
        if model is None:
            raise ApiError(404, "model not found")
        async with self.scheduler.lease(model, f"the load API, from {client_ip(request)}"):
            pass
        return json_response({"msg": "ok"})

    async def handle_unload_one(self, request: web.Request) -> web.Response:
        model = self.config.real_model_id(request.match_info["model"].lstrip("/"))
        if model is None:
            raise ApiError(404, "model not found")
        await self.scheduler.unload([model], request_label(request))
        return web.Response(text="OK")

    async def handle_swaps(self, request: web.Request) -> web.Response:
        """The latest swap decisions (SWAP_HISTORY), newest last: what started, what stopped and why."""
        return json_response({"swaps": [record.as_json() for record in self.runtime.swap_history]})

    async def handle_timeline(self, request: web.Request) -> web.Response:
        """The last hour's state changes, serving spans and queue depth (?after=<unix seconds>: newer only)."""
        try:
            after = float(request.query.get("after", "0"))
        except ValueError:
            raise ApiError(400, "after must be a time in unix seconds") from None
        return json_response(self.runtime.timeline.since(after if math.isfinite(after) else 0.0))

    async def handle_model_detail(self, request: web.Request) -> web.Response:
        """Ours, for the UI's model page: everything known of one model (see model_detail)."""
        name = request.match_info["model"].lstrip("/")
        model = self.config.real_model_id(name)
        if model is None:
            raise ApiError(404, unknown_model_message(name, self.config))
        check_scope(request[API_KEY], name, model)
        return json_response(model_detail(self.runtime, model))

    async def handle_plan(self, request: web.Request) -> web.Response:
        """What a request for ?model= would take now, without doing anything (as a key: ?key=name)."""
        name = request.query.get("model", "")
        model = self.config.real_model_id(name)
        if model is None:
            raise ApiError(404, unknown_model_message(name, self.config))
        key = None
        if key_name := request.query.get("key", ""):
            key = next((k for k in self.config.api_keys if k.name == key_name), None)
            if key is None:
                raise ApiError(400, f"no API key is named {key_name!r}")
        return json_response(self.scheduler.plan(model, key))

    async def handle_reload(self, request: web.Request) -> web.Response:
        """Reload now: 200 with what changed, or 400 saying why the running config was kept."""
        if self.runtime.source is None:
            raise ApiError(400, "config reload is not available: no config file to read")
        try:
            changes = reload(self.runtime)
        except ConfigError as e:
            raise ApiError(400, f"config reload failed, the running config is kept: {e}") from None
        return json_response({"msg": "ok", "models": changes})

    async def handle_profiles(self, request: web.Request) -> web.Response:
        profiles = [{"id": p.id, "description": p.description, "pins": p.pins}
                    for _, p in sorted(self.config.profiles.items(), key=lambda e: e[0].encode())]
        return json_response({"active": self.virtual.active, "profiles": profiles})

    async def handle_set_profile(self, request: web.Request) -> web.Response:
        """PUT {"name": "<profile>"} or {"name": null}: pins apply from the next request on."""
        self.runtime.activate_profile(requested_profile(await self.read_body(request), self.config))
        return json_response({"active": self.virtual.active})

    async def handle_inflight(self, request: web.Request) -> web.Response:
        """Our addition: the requests in flight now, as the `inflight` events carry them."""
        return json_response({"requests": self.inflight.records()})

    async def handle_cancel_inflight(self, request: web.Request) -> web.Response:
        exchange = self.inflight.cancel(request.match_info["id"])
        if exchange is None:
            raise ApiError(404, "inflight request not found")
        self.log.info(f"cancelled in-flight request {exchange.id} "
                      f"({printable(f'{exchange.model} {exchange.method} {exchange.path}')})")
        return json_response({"msg": "ok"})

    # -- activity, metrics, performance -------------------------------------------

    async def handle_activity(self, request: web.Request) -> web.Response:
        """Recorded requests, filtered, sorted and paged."""
        try:
            rows = await self.activity.call(self.activity.store.query, request.query, self.activity.has_capture)
            return json_response(rows)
        except QueryError as e:
            raise ApiError(400, str(e)) from None

    async def handle_activity_stats(self, request: web.Request) -> web.Response:
        return json_response(await self.activity.call(self.activity.store.stats, request.query.get("model") or None))

    async def handle_capture(self, request: web.Request) -> web.Response:
        """One recorded request and its answer."""
        try:
            capture_id = int(request.match_info["id"])
        except ValueError:
            raise ApiError(400, "invalid capture ID") from None
        capture = await self.activity.call(self.activity.captures.get, capture_id)
        if capture is None:
            raise ApiError(404, "capture not found")
        return json_response(capture)

    async def handle_metrics(self, request: web.Request) -> web.Response:
        """Prometheus text: the newest system and GPU sample, then our per-model series
        (served even with the performance monitor disabled, where the original answers 503)."""
        system = render_prometheus(*self.runtime.performance.latest()) if self.runtime.performance else ""
        vram = vram_families(self.vram_book) if self.config.routing.router is Router.VRAM else ""
        return web.Response(text=system + self.metrics.render(self.scheduler) + vram,
                            headers={"Content-Type": PROMETHEUS_CONTENT_TYPE})

    async def handle_performance(self, request: web.Request) -> web.Response:
        """The last hour of system and GPU samples, or those after `?after=`."""
        if self.runtime.performance is None:
            return json_response({"enabled": False}, status=503)
        try:
            after = parse_rfc3339(request.query["after"]) if "after" in request.query else None
        except ValueError:
            raise ApiError(400, "invalid 'after' timestamp, use RFC3339 format") from None
        return json_response(self.runtime.performance.snapshot(after))

    async def handle_hardware(self, request: web.Request) -> web.Response:
        try:
            return json_response(await asyncio.shield(self.runtime.hardware))
        except HardwareUnavailable:
            raise ApiError(503, "hardware detection unavailable") from None

    # -- logs and events ----------------------------------------------------------

    async def handle_logs(self, request: web.Request) -> web.Response:
        """The combined log's history; a browser is sent to the UI."""
        if "text/html" in request.headers.get("Accept", ""):
            raise web.HTTPFound("/ui/")
        return web.Response(body=self.log.mux.history.history(), content_type="text/plain")

    async def handle_log_stream(self, request: web.Request) -> web.StreamResponse:
        """History, then each new chunk as it is written, until the client or the server goes."""
        monitor = self.runtime.log_monitor(request.match_info.get("id", ""))
        response = CountedResponse(headers={"Content-Type": "text/plain", "X-Content-Type-Options": "nosniff",
                                               "X-Accel-Buffering": "no"})
        await response.prepare(request)
        with monitor.reading() as stream:
            self.log_streams.add(stream)
            try:
                if "no-history" not in request.query:
                    await response.write(monitor.history.history())
                async for chunk in stream:
                    await response.write(chunk)
            finally:
                self.log_streams.discard(stream)
        return response

    async def handle_events(self, request: web.Request) -> web.StreamResponse:
        """/api/events: the state of things first, then every change, as SSE."""
        response = CountedResponse(headers={
            "Content-Type": "text/event-stream", "Cache-Control": "no-cache", "Connection": "keep-alive",
            "X-Content-Type-Options": "nosniff", "X-Accel-Buffering": "no"})
        await response.prepare(request)
        watching = self.events.watching(self.runtime.current_events(),
                                        hang_up=lambda: request.transport and request.transport.abort())
        with watching as stream:
            async for message in stream:
                await response.write(message)
        return response

    # -- the web UI ---------------------------------------------------------------

    async def handle_ui(self, request: web.Request) -> web.Response:
        """The web UI: files as they are, and index.html for the app's own paths."""
        path = request.match_info["path"]
        if "." not in path.rpartition("/")[2]:
            path = "index.html"
        return self.ui.answer(request, path)

    async def handle_favicon(self, request: web.Request) -> web.Response:
        return self.ui.answer(request, "favicon.svg")

    # -- middlewares --------------------------------------------------------------

    @web.middleware
    async def errors(self, request: web.Request, handler) -> web.StreamResponse:
        """Our errors as envelopes; unknown paths and methods as the original's plain texts."""
        try:
            return await handler(request)
        except Exception as e:
            if (answer := error_answer(request, e, self.config.max_request_body_mb)) is None:
                raise
            return answer

    @web.middleware
    async def watch(self, request: web.Request, handler) -> web.StreamResponse:
        """Once a model request is answered: its figures. Outside `errors`, so an error
        counts with the status the client got; off the hot path, which only fills the Exchange."""
        status, response = 500, None
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as e:  # a redirect or an aiohttp error answer: its status is what was sent
            status = e.status
            raise
        except asyncio.CancelledError:
            status = 499  # the client left
            raise
        finally:
            if (exchange := request.get(EXCHANGE)) is not None:
                status = exchange.failure[0] if exchange.failure else status
                self.runtime.request_done(exchange, response if response is not None else exchange.response, status)

    @web.middleware
    async def guard(self, request: web.Request, handler) -> web.StreamResponse:
        """The guards against other web pages and DNS rebinding, then API keys."""
        check_host_and_origin(request, self.config)
        request[API_KEY] = check_keys(request, self.config)
        return await handler(request)

    @web.middleware
    async def access_log(self, request: web.Request, handler) -> web.StreamResponse:
        """One line per request, written when the response is complete or the client gone.
        Outermost, it also lists each request being handled, for a shutdown to end."""
        started = time.monotonic()
        status, size = 499, 0  # what the log shows when the client left before an answer
        self.handling.add(task := asyncio.current_task())
        try:
            response = await handler(request)
            status, size = response.status, sent_size(response)
            return response
        except asyncio.CancelledError:
            if (streaming := request.get(STREAMING)) is not None:  # it left during the answer
                status, size = streaming.status, streaming.written
            raise
        except web.HTTPException as e:  # a redirect or an aiohttp error answer
            status = e.status
            raise
        except Exception:
            status = 500
            raise
        finally:
            self.handling.discard(task)
            if not request.path.startswith(("/wol-health", "/metrics", "/api/performance")):
                version = f"HTTP/{request.version.major}.{request.version.minor}"
                agent = request.headers.get("User-Agent", "")
                line = f'{client_ip(request)} "{request.method} {request.path} {version}" {status} {size} "{agent}"'
                say = self.log.debug if quiet_read(request, status) else self.log.info
                say(f"Request {printable(line)} {go_duration(time.monotonic() - started)}")

    # -- shutdown -----------------------------------------------------------------

    async def _on_shutdown(self, app: web.Application) -> None:
        # Websockets never end by themselves: close them, or shutdown would wait for its budget.
        await asyncio.gather(*(ws.close(code=aiohttp.WSCloseCode.GOING_AWAY) for ws in list(self.websockets)),
                             return_exceptions=True)
        for stream in self.log_streams:  # streams that never end by themselves either
            stream.close()
        await self.runtime.wind_down()

    async def _on_cleanup(self, app: web.Application) -> None:
        await self.peers.close()
        await self.activity.close()
        self.bodies.close()

QUIET_READS = ("/ui", "/api/", "/favicon.ico")


def quiet_read(request: web.BaseRequest, status: int) -> bool:
    """A successful read of the web UI's files or of /api/*, or any read the UI says is its own
    (X-Llama-Swap-UI: /running, /logs, ...): logged at debug, so a page left open does not fill
    the proxy log with its polling. Model requests, changes, errors and a person's curl of
    /running stay at info."""
    return request.method in ("GET", "HEAD") and status < 400 and \
        (request.path.startswith(QUIET_READS) or "X-Llama-Swap-UI" in request.headers)


def stalled_clients(timeout: float) -> Iterator[CountedResponse]:
    """The answers whose client has taken none of their bytes for `timeout` seconds."""
    now = time.monotonic()
    for response in list(CountedResponse.live):
        if response.waiting_since and now - response.waiting_since >= timeout and response.transport is not None:
            yield response


def sent_size(response: web.StreamResponse) -> int:
    """Body bytes of an answer: counted for streams, known for the rest."""
    if isinstance(response, CountedResponse):
        return response.written
    return response.body_length if response.prepared else len(getattr(response, "body", b"") or b"")


def forwarded_path(request: web.BaseRequest) -> str:
    """The raw path and query sent upstream: `/v/...` and `/audioapi/...` lose their prefix."""
    path_qs = request.raw_path
    for prefix in ("/v/", "/audioapi/"):
        if path_qs.startswith(prefix):
            return path_qs[len(prefix) - 1:] if prefix == "/v/" else path_qs[len("/audioapi"):]
    return path_qs


###############################################################################
# 26. CLI #####################################################################
###############################################################################

# Flags, serve() (bind, start, wait, shut down) and main().

SHUTDOWN_BUDGET = 30.0


def parse_listen(listen: str) -> tuple[str | None, int]:
    """`host:port`, `:port` or `[v6]:port` -> (host or None for all interfaces, port)."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"invalid listen address {listen!r}: expected HOST:PORT, for example localhost:8080")
    host = host.strip("[]")
    return host or None, int(port)


def browser_url(scheme: str, host: str | None, port: int) -> str:
    """Where a browser on this machine finds us: `http://:8080` is no address to open."""
    if host in (None, "", "0.0.0.0", "::"):
        host = "localhost"
    return f"{scheme}://{f'[{host}]' if ':' in host else host}:{port}"


def is_loopback_only(host: str | None) -> bool:
    if not host:
        return False
    try:
        infos = socket.getaddrinfo(host, None)
    except socket.gaierror:
        return False
    return all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)


def normalize_flags(argv: list[str]) -> list[str]:
    """Go-style single-dash long flags (`-config x`, `-listen=:8080`) as argparse expects them."""
    out = []
    for arg in argv:
        if re.match(r"^-[a-z][a-z-]+(=.*)?$", arg):
            arg = "-" + arg
        out.append(arg)
    return out


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="llama-swap", description="Serve many local AI models from one address, swapping them on demand.")
    parser.add_argument("--config", help="path to the YAML config file")
    parser.add_argument("--config-dir", default="", help="directory of *.yml/*.yaml files merged after --config")
    parser.add_argument("--check-config", action="store_true", help="validate the config, print a summary and exit")
    parser.add_argument("--strict", action="store_true",
                        help="warnings are errors: --check-config fails on them, and so does a start")
    parser.add_argument("--watch-config", action="store_true", help="reload the config when its files change")
    parser.add_argument("--listen", default="", help="listen address HOST:PORT (default :8080, or :8443 with TLS)")
    parser.add_argument("--tls-cert-file", default="", help="TLS certificate file")
    parser.add_argument("--tls-key-file", default="", help="TLS key file")
    parser.add_argument("--demo", action="store_true",
                        help="serve three small fake models (no model files needed) instead of a config file")
    parser.add_argument("--example-config", action="store_true",
                        help="print config.example.yaml (every key, documented; its two demo models run as they are) "
                             "and exit")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    argv = ["--help" if a in ("-help", "--help") else a for a in normalize_flags(argv)]
    return parser.parse_args(argv)


# aiohttp's parser limits, set on purpose. A browser on localhost sends the cookies of every
# other local app (cookies ignore ports), so a header may be far past aiohttp's 8 KiB default;
# 128 headers of 32 KiB still bound what one connection can make us hold. An idle keep-alive
# connection is closed after 75 s (nginx's default; aiohttp's would keep it an hour).
HTTP_LIMITS = {"max_line_size": 16 * 1024, "max_field_size": 32 * 1024, "max_headers": 128,
               "keepalive_timeout": 75.0}


def raise_open_file_limit() -> int:
    """The soft limit on open files raised to the hard one, as the original does: systemd's
    1024 would let some thousand connections (or half as many streams, each with its upstream)
    exhaust it. Returns the limit now in force (0 where it cannot be known)."""
    try:
        import resource
    except ImportError:  # not POSIX
        return 0
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    with contextlib.suppress(ValueError, OSError):  # some systems cap it lower than they say
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        return wanted
    return soft


class QuietLoopErrors:
    """The event loop's error handler: running out of file descriptors while accepting is one
    warning line (at most every ten seconds), not a traceback per attempt; asyncio retries the
    accept by itself once a second. Anything else goes to the default handler."""

    def __init__(self, log: ProxyLog, open_files: int):
        self.log, self.open_files = log, open_files
        self.last = 0.0

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        error = context.get("exception")
        short_of_resources = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
        if not (isinstance(error, OSError) and error.errno in short_of_resources):
            loop.default_exception_handler(context)
        elif time.monotonic() - self.last >= 10:
            self.last = time.monotonic()
            limit = f" (the limit is {self.open_files})" if self.open_files else ""
            self.log.warn(f"cannot accept new connections: {error.strerror or error}{limit}; "
                          "they wait until some close")


def app_runner(server: Server) -> web.AppRunner:
    """The server's application as it is served: handlers cancelled when their client leaves,
    bodies read as sent (we inflate them), our limits, aiohttp's complaints in our log."""
    return web.AppRunner(server.app(), handler_cancellation=True, access_log=None, handle_signals=False,
                         auto_decompress=False, shutdown_timeout=SHUTDOWN_BUDGET, logger=ProtocolLog.logger(server.log),
                         **HTTP_LIMITS)


async def serve(config: Config, source: ConfigSource, host: str | None, port: int, ssl_context: Any, log: ProxyLog,
                watch: bool = False) -> int:
    """Run until SIGINT/SIGTERM, then shut down: in-flight requests first, then every upstream."""
    groups = GroupRecord(group_record_path(host, port))
    try:
        runtime = Runtime(config, log, source, groups)
    except sqlite3.Error as e:
        print(f"llama-swap: store.path: cannot open {config.store_path}: {e}", file=sys.stderr)
        return 1
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(QuietLoopErrors(log, raise_open_file_limit()))
    stop = asyncio.Event()
    signals_seen: list[int] = []

    def on_signal(sig: int) -> None:
        signals_seen.append(sig)
        if len(signals_seen) > 1:  # a second Ctrl-C: leave nothing running and go now
            log.warn("second signal received, killing every upstream and exiting now")
            runtime.scheduler.kill_all()
            STDOUT.flush(timeout=1.0)
            os._exit(1)
        stop.set()

    # Installed before we listen: a signal from then on must reach this handler, not the default.
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    loop.add_signal_handler(signal.SIGHUP, reload_on_signal, runtime)
    server = Server(runtime)
    runner = app_runner(server)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=ssl_context, reuse_address=True)
    try:
        await site.start()
    except OSError as e:
        log.error(f"http server error: cannot listen on {host or ''}:{port}: {e.strerror or e}")
        await runner.cleanup()
        return 1  # and nothing touched: whoever listens there keeps its models
    await groups.watch(log)  # before any model can start: every group it must know of is told
    await groups.stop_leftovers(log)  # the address is ours now, so a record for it is a dead run's
    runtime.start(watch_config_file=watch)
    url = browser_url("https" if ssl_context else "http", host, port)
    everywhere = " (all interfaces)" if host in (None, "", "0.0.0.0", "::") else ""
    log.info(f"llama-swap listening {'with TLS ' if ssl_context else ''}on {url}{everywhere}")
    log.info(f"web UI: {url}/ui/")
    if not is_loopback_only(host):
        log.info(f"llama-swap is reachable by all hosts on the network, use --listen localhost:{port} "
                 "to restrict to loopback only")
    if watch:
        log.info("watching configuration for changes (poll-based, 2s interval)")
    await stop.wait()
    log.info(f"received signal {signal.Signals(signals_seen[0]).name}, shutting down")
    # Stop listening and refuse queued requests; those in flight get SHUTDOWN_BUDGET between them
    # (aiohttp would give them that twice over), then are ended; then each model gets its own
    # unloadTimeout to stop (its cmdStop, say).
    cleanup = asyncio.create_task(runner.cleanup())
    if not (await asyncio.wait({cleanup}, timeout=SHUTDOWN_BUDGET))[0]:
        for task in server.handling:
            task.cancel()
    await cleanup
    await runtime.scheduler.shutdown()
    await groups.close()
    log.info("shutdown complete")
    return 0


def demo_config() -> str:
    """--demo: a chat model that loads fast, one that loads slowly (they swap), and an embedding
    model that runs beside them, all served by llama_swap_responder, shipped with us, on ports
    that are free now."""
    def model(name: str, delay: float, description: str) -> dict[str, Any]:
        return {"cmd": f"${{RESPONDER}} --port ${{PORT}} --name {name} --startup-delay {delay}",
                "description": description, "capabilities": {"in": ["text"], "out": ["text"]}}

    return yaml.safe_dump({
        "healthCheckTimeout": 30,
        "sendLoadingState": True,
        "startPort": free_ports(DEFAULT_START_PORT, 3),
        "models": {
            "chat-small": {**model("chat-small", 0.5, "loads in half a second"), "ttl": 600},
            "chat-large": model("chat-large", 3, "loads in three seconds; swaps with chat-small"),
            "embed": model("embed", 0.3, "an embedding model that runs beside the chat models"),
        },
        "groups": {
            "chat": {"swap": True, "exclusive": False, "members": ["chat-small", "chat-large"]},
            "embeddings": {"swap": False, "exclusive": False, "members": ["embed"]},
        },
    }, sort_keys=False)


def free_ports(first: int, count: int) -> int:
    """The first of `count` consecutive ports from `first` up that nothing listens on now."""
    for start in range(first, 65536 - count):
        try:
            for port in range(start, start + count):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        return start
    raise OSError("no free ports for the demo models")


def group_record_path(host: str | None, port: int) -> str:
    """Per listen address, so two instances never stop each other's models."""
    base = os.environ.get("XDG_RUNTIME_DIR") or os.path.join(os.path.expanduser("~"), ".cache")
    address = re.sub(r"[^A-Za-z0-9.-]", "_", host or "all")
    return os.path.join(base, "llama-swap-py", f"process-groups-{address}-{port}.json")


def check_config(config: Config, source: str, strict: bool) -> int:
    """--check-config: the effective config on stdout, each model that cannot start on stderr
    (named as a start-up error would be), and an exit status that says whether it passed;
    --strict fails it on warnings too. Piped into `head`, it stops quietly."""
    warnings = config.warnings + missing_programs(config)
    errors = [m.problem for m in config.models.values() if m.problem]
    verdict = ("config has errors" if errors else "config has warnings (--strict)" if strict and warnings
               else "config OK")
    print_for_reader((describe_config(config, f"{verdict}: {source}", warnings) + "\n").encode())
    for error in errors:
        print(f"llama-swap: {source}: {error}", file=sys.stderr)
    return 0 if verdict == "config OK" else 1


def print_for_reader(text: bytes) -> None:
    """To stdout; a reader that has seen enough (`| head`) ends it quietly, at exit too."""
    try:
        sys.stdout.buffer.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def missing_programs(config: Config) -> list[str]:
    """A warning for each model whose program is not found where it would be run from."""
    warnings = []
    for model_id in sorted(config.models, key=str.encode):
        model = config.models[model_id]
        if model.problem:
            continue
        program = split_command(model.cmd)[0]
        search = next((e.split("=", 1)[1] for e in reversed(model.env) if e.startswith("PATH=")), None)
        if shutil.which(program, path=search) is None:
            where = "is not an executable file" if "/" in program else "is not found on PATH"
            warnings.append(f"models.{model_id}.cmd: program {program!r} {where}")
    return warnings


def quoted_command(command: str) -> str:
    """A cmd as a shell would need it typed: the words it is split into, quoted where needed."""
    try:
        return shlex.join(split_command(command))
    except ValueError:
        return "(none)"


def describe_config(config: Config, headline: str, warnings: list[str]) -> str:
    """The effective config in a few lines: what would run, and how."""
    lines = [f"{headline}: {len(config.models)} models, {len(config.peers)} peers, router {config.routing.router}"]
    lines += [f"warning: {w}" for w in warnings]
    for model_id in sorted(config.models, key=str.encode):
        model = config.models[model_id]
        extras = [f"aliases {', '.join(model.aliases)}"] if model.aliases else []
        extras += [f"ttl {model.ttl}s"] if model.ttl else []
        lines.append(f"model {model_id}: proxy {model.proxy}" + "".join(f", {e}" for e in extras))
        lines.append(f"  cmd: {quoted_command(model.cmd)}")
    for group in config.routing.groups:
        if group.members:
            rules = ", ".join(k for k in ("swap", "exclusive", "persistent") if getattr(group, k))
            lines.append(f"group {group.name} [{rules or 'no swap'}]: {', '.join(sorted(group.members))}")
    if config.routing.matrix:
        for name, dsl in config.routing.matrix.sets.items():
            combos = " | ".join("+".join(sorted(c)) for c in config.routing.matrix.combinations[name])
            lines.append(f"matrix set {name} = {dsl}: {combos}")
    lines += [f"peer {p.id}: {p.proxy} ({', '.join(p.models)})" for p in config.peers.values()]
    return "\n".join(lines)


def c_speedups() -> list[str]:
    """The projects under aiohttp whose C parts loaded (each falls back to its pure-Python
    code by itself): what `--version` tells of a .pyz or an install without wheels."""
    parts = ("aiohttp._http_parser", "multidict._multidict", "yarl._quoting_c", "frozenlist._frozenlist",
             "propcache._helpers_c")
    return [name.partition(".")[0] for name in parts if name in sys.modules]


def print_example_config() -> int:
    """config.example.yaml as shipped: beside this file (a checkout, the .pyz) or where a wheel
    puts its data (share/llama-swap-py/ under the environment, or the user's base)."""
    here = os.path.dirname(os.path.abspath(__file__))
    bases = [sysconfig.get_path("data"), sysconfig.get_path("data", f"{os.name}_user"), sys.prefix, "/usr/local"]
    for path in [os.path.join(here, "config.example.yaml"),
                 *(os.path.join(b, "share", "llama-swap-py", "config.example.yaml") for b in bases)]:
        with contextlib.suppress(OSError):
            # The loader reads files inside the .pyz as well as beside a plain llama_swap.py.
            print_for_reader(__loader__.get_data(path) if path.startswith(here) else pathlib.Path(path).read_bytes())
            return 0
    print("llama-swap: config.example.yaml is not installed with this copy of llama-swap-py", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.version:
        print(f"version: {__version__} (llama-swap-py, Python {sys.version.split()[0]}, aiohttp {aiohttp.__version__}, "
              f"C speedups: {', '.join(c_speedups()) or 'none'}), built at unknown")
        return 0
    if args.example_config:
        return print_example_config()
    if args.demo and (args.config or args.config_dir or args.watch_config):
        print("llama-swap: --demo brings its own config; leave out --config, --config-dir and --watch-config",
              file=sys.stderr)
        return 1
    if not args.config and not args.config_dir and not args.demo:
        print("llama-swap: at least one of --config or --config-dir must be provided (see llama-swap --help)",
              file=sys.stderr)
        return 1
    if bool(args.tls_cert_file) != bool(args.tls_key_file):
        print("llama-swap: both --tls-cert-file and --tls-key-file must be provided for TLS", file=sys.stderr)
        return 1
    try:
        default_listen = "localhost:8080" if args.demo else ":8443" if args.tls_cert_file else ":8080"
        host, port = parse_listen(args.listen or default_listen)
        config = parse_config(demo_config()) if args.demo else load_config(args.config, args.config_dir)
    except (ConfigError, ValueError) as e:
        print("\n".join(f"llama-swap: {message}" for message in getattr(e, "messages", [str(e)])), file=sys.stderr)
        return 1
    if args.check_config:
        return check_config(config, args.config or args.config_dir, args.strict)
    if args.strict and config.notes():
        where = args.config or args.config_dir or "--demo"
        print("\n".join(f"llama-swap: {where}: {note}" for note in config.notes()), file=sys.stderr)
        print("llama-swap: not starting: --strict makes these errors", file=sys.stderr)
        return 1
    ssl_context = None
    if args.tls_cert_file:
        ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            ssl_context.load_cert_chain(args.tls_cert_file, args.tls_key_file)
        except (OSError, ssl.SSLError) as e:
            print(f"llama-swap: cannot load TLS certificate: {e}", file=sys.stderr)
            return 1
    log = ProxyLog(config.log_level, config.log_to_stdout, config.log_time_format)
    log.debug(f"PID: {os.getpid()}")
    for note in config.notes():
        log.warn(f"config: {note}")
    if args.demo:
        log.info(f"demo mode: {', '.join(config.models)} are served by the built-in fake upstream")
    source = None if args.demo else ConfigSource(args.config or None, args.config_dir or None)
    try:
        return asyncio.run(serve(config, source, host, port, ssl_context, log, watch=args.watch_config))
    finally:
        STDOUT.flush(timeout=5.0)


if __name__ == "__main__":
    sys.exit(main())
