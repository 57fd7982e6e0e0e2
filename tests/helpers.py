"""Shared test helpers: a real llama-swap process on a free port, real responder upstreams,
an in-memory scheduler (with a virtual clock and request tasks for stepping it deterministically),
an event-loop prober and small HTTP helpers.

Test modules import these from here (`from helpers import ...`); conftest.py holds only the
fixtures built on them. Every responder started through `Upstreams.cmd` appends its pid to the
test's pid file, so teardown can prove that nothing was left running (and kill it if something was).
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import yaml
from aiohttp import web

from llama_swap import (
    DEFAULT_GROUP,
    READY,
    SLEEPING,
    STARTING,
    STOPPED,
    ConfigSource,
    Group,
    GroupPolicy,
    ModelConfig,
    ProxyLog,
    Runtime,
    Scheduler,
    SchedulerError,
    Server,
    StartError,
    app_runner,
)

ROOT = Path(__file__).resolve().parent.parent
# The records of process groups that a killed llama-swap leaves (one per listen address) go to
# a directory of this run's, not the user's; llama-swaps started by the tests inherit it.
os.environ["XDG_RUNTIME_DIR"] = tempfile.mkdtemp(prefix="llama-swap-tests-")
RESPONDER = ROOT / "llama_swap_responder.py"
PY = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_port_block(size: int = 20) -> int:
    """The first of `size` consecutive ports that are free now, below the ephemeral range
    (32768 and up on Linux), so no client connection can take one of them later."""
    for _ in range(100):
        base = random.randrange(20000, 32000 - size)
        try:
            for port in range(base, base + size):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise RuntimeError("no block of free ports found")


def pid_alive(pid: int) -> bool:
    """True for a live process; zombies count as gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2:].split()[0] != b"Z"


def wait_until(predicate, timeout: float, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


class ServerProcess:
    """A llama-swap started from a command line, its output collected in a file."""

    def __init__(self, argv: list[str], workdir: Path, cwd: Path = ROOT, env: dict[str, str] | None = None):
        self.log_path = workdir / f"llama-swap-{len(list(workdir.glob('llama-swap-*.log')))}.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, text: str, timeout: float = 20) -> bool:
        """Until `text` is in the output (True) or the process exited or time ran out (False)."""
        return (wait_until(lambda: text in self.output() or self.proc.poll() is not None, timeout)
                and text in self.output())

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 45) -> int:
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(sig)
            return self.proc.wait(timeout)
        finally:
            self._log.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self._log.close()


class LlamaSwap(ServerProcess):
    """`python -m llama_swap` on a free port with a config written for the test."""

    def __init__(self, workdir: Path, config: dict | str, extra_args: tuple[str, ...] = ()):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config_path = workdir / "config.yaml"
        if isinstance(config, dict) and "startPort" not in config:
            # Upstream ports away from the default 5800, so parallel runs never meet.
            config = {"startPort": free_port_block(), **config}
        text = config if isinstance(config, str) else yaml.safe_dump(config, sort_keys=False)
        self.config_path.write_text(text)
        argv = [PY, "-m", "llama_swap", "--config", str(self.config_path), "--listen", f"127.0.0.1:{self.port}",
                *extra_args]
        super().__init__(argv, workdir)
        if not self.wait_for("listening on"):
            self.kill()
            raise RuntimeError(f"llama-swap did not start (exit status {self.proc.returncode}):\n{self.output()}")


class InProcess:
    """llama-swap's Runtime and Server in the test's own event loop, on a free port of
    127.0.0.1, with what it would print kept in memory: for tests of handlers and middlewares, where a
    process of its own would add only start-up time. What a test reads of it is what it reads of
    a LlamaSwap: `url` and `output()`; `runtime` and `server` are there to look inside."""

    def __init__(self, workdir: Path, config: dict | str):
        if isinstance(config, dict) and "startPort" not in config:
            config = {"startPort": free_port_block(), **config}
        self.config_path = workdir / "config.yaml"  # what a reload reads, as with --config
        self.config_path.write_text(config if isinstance(config, str) else yaml.safe_dump(config, sort_keys=False))
        source = ConfigSource(str(self.config_path), None)
        parsed = source.load()
        self.printed = bytearray()  # what the process would print on stdout
        self.log = ProxyLog(parsed.log_level, parsed.log_to_stdout, parsed.log_time_format, stdout=self.printed.extend)
        self.runtime = Runtime(parsed, self.log, source)
        self.server = Server(self.runtime)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.runner: web.AppRunner | None = None

    async def start(self) -> InProcess:
        self.runner = app_runner(self.server)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()
        self.runtime.start()
        return self

    def output(self) -> str:
        return self.printed.decode(errors="replace")

    async def stop(self) -> None:
        """As serve() ends: stop listening (requests in flight end), then stop every model."""
        if self.runner is not None:
            await self.runner.cleanup()
        await self.runtime.scheduler.shutdown()


class Upstreams:
    """Builds responder commands for configs and checks that their processes are gone."""

    def __init__(self, workdir: Path):
        self.pid_file = workdir / "upstream-pids"
        self.pid_file.touch()

    def cmd(self, *args: str, name: str | None = None) -> str:
        parts = [PY, str(RESPONDER), "--port", "${PORT}", "--pid-file", str(self.pid_file)]
        if name:
            parts += ["--name", name]
        return " ".join(parts + list(args))

    def pids(self) -> list[int]:
        return [int(line) for line in self.pid_file.read_text().split()]

    def alive(self) -> list[int]:
        return [pid for pid in self.pids() if pid_alive(pid)]

    def kill_leftovers(self) -> list[int]:
        leftovers = self.alive()
        for pid in leftovers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return leftovers


async def eventually(predicate, timeout: float, interval: float = 0.05) -> bool:
    """Poll a (sync or async) predicate until it is true or `timeout` seconds have passed."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return True
        if loop.time() >= deadline:
            return False
        await asyncio.sleep(interval)


class FakeClock:
    """Virtual monotonic seconds for a Scheduler (its `clock`): time moves only when the test
    advances it, so every rule measured in time is decided at a moment the test chose."""

    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        assert seconds >= 0, "monotonic time does not go back"
        self.now += seconds


async def settle(rounds: int = 100) -> None:
    """Let the event loop run every callback that is ready, and those they make ready, up to
    `rounds` turns deep, without letting any real time pass on purpose: whatever waits for a
    gate, a release or a timer stays waiting."""
    for _ in range(rounds):
        await asyncio.sleep(0)


class FakeProcess:
    """Just the surface the scheduler uses: state, model, start(), stop(), sleep(). A start,
    stop, sleep or wake takes one turn of the event loop, no real time; a test that must see a
    model STARTING clears its `start_gate` and sets it when the start may finish. `ready_since`
    is read from `clock`. It sleeps where its model has `sleep`, as a ModelProcess does."""

    def __init__(self, name: str, events: list[str], on_change, limit: int = 100, clock=time.monotonic):
        self.name = name
        self.model = ModelConfig(name, cmd="unused", proxy=f"http://127.0.0.1:{9000 + len(events)}",
                                 health_check_timeout=1, concurrency_limit=limit)
        self.events = events
        self.on_change = on_change
        self.clock = clock
        self.state = STOPPED
        self.load_times: list[float] = []  # what the scheduler weighs a swap by
        self.wake_times: list[float] = []  # ... or, for a model that sleeps, this
        self.ready_since = 0.0
        self.fail_next_start = ""
        self.start_gate = asyncio.Event()
        self.start_gate.set()

    def _set(self, state: str) -> None:
        self.state = state
        self.on_change(self)

    @property
    def asleep(self) -> bool:
        return self.state == SLEEPING

    async def sleep(self, timeout: float, reason: str = "") -> bool:
        if self.state == READY:
            self.events.append(f"sleep {self.name}")
            self._set(SLEEPING)
            await asyncio.sleep(0)
        return self.state == SLEEPING

    async def start(self) -> None:
        if self.state == READY:
            return
        if self.state == SLEEPING:
            self.events.append(f"wake {self.name}")
            await asyncio.sleep(0)
            self.ready_since = self.clock()
            self._set(READY)
            return
        self.events.append(f"start {self.name}")
        self._set(STARTING)
        await self.start_gate.wait()
        await asyncio.sleep(0)
        if self.fail_next_start:
            message, self.fail_next_start = self.fail_next_start, ""
            self._set(STOPPED)
            raise StartError(message)
        self.ready_since = self.clock()
        self._set(READY)

    async def stop(self, timeout: float, reason: str = "") -> None:
        if self.state != STOPPED:
            self.events.append(f"stop {self.name}")
            await asyncio.sleep(0)
            self._set(STOPPED)


def one_at_a_time(names) -> GroupPolicy:
    """Every model in the default group, as a config without groups has it."""
    return GroupPolicy([Group(DEFAULT_GROUP, frozenset(names))])


def make_scheduler(*names: str, policy=None, priority=None, limit: int = 100, clock=time.monotonic, **settings):
    """A Scheduler over FakeProcesses named `names`, all reading time from `clock`; returns it,
    the processes by name and the list their starts and stops are recorded in."""
    events: list[str] = []
    holder: dict[str, Scheduler] = {}
    processes = {n: FakeProcess(n, events, lambda p: holder["s"].pump(), limit, clock) for n in names}
    scheduler = Scheduler(processes, policy or one_at_a_time(names), ProxyLog(level="error"), priority=priority,
                          clock=clock, **settings)
    holder["s"] = scheduler
    return scheduler, processes, events


class Client:
    """One request for `model` as a task of its own: it takes a lease and holds it until the test
    calls release(); leave() hangs up, whether it waits or is being served. It records when it
    was granted (on the scheduler's clock) or the SchedulerError it got instead; on a grant the
    model's name is appended to `log`, if one is given."""

    def __init__(self, scheduler: Scheduler, model: str, log: list[str] | None = None):
        self.model = model
        self.granted_at: float | None = None
        self.error: SchedulerError | None = None
        self._released = asyncio.Event()
        self.task = asyncio.create_task(self._run(scheduler, log))

    async def _run(self, scheduler: Scheduler, log: list[str] | None) -> None:
        try:
            async with scheduler.lease(self.model):
                self.granted_at = scheduler.clock()
                if log is not None:
                    log.append(self.model)
                await self._released.wait()
        except SchedulerError as e:
            self.error = e

    @property
    def granted(self) -> bool:
        return self.granted_at is not None

    @property
    def done(self) -> bool:
        return self.task.done()

    def release(self) -> None:
        self._released.set()

    def leave(self) -> None:
        self.task.cancel()


# Runs in a process of its own, so that nothing the test itself does (building a 64 MB body, say)
# can delay it: GET /health every 50 ms until stdin closes, then the slowest answer as JSON.
PROBER = """
import http.client, json, select, sys, time
host, port = sys.argv[1], int(sys.argv[2])
worst, count, failures = 0.0, 0, []
connection = None
while count < 2 or not select.select([sys.stdin], [], [], 0.05)[0]:
    began = time.monotonic()
    try:
        connection = connection or http.client.HTTPConnection(host, port, timeout=60)
        connection.request("GET", "/health")
        response = connection.getresponse()
        response.read()
        if response.status != 200:
            failures.append(response.status)
    except OSError as e:
        failures.append(repr(e))
        connection = None
    worst, count = max(worst, time.monotonic() - began), count + 1
    if count == 1:
        print("probing", flush=True)
print(json.dumps({"worst": worst, "count": count, "failures": failures}))
"""
STALL_LIMIT = 0.1  # seconds the proxy's event loop may stand still (a /health round trip included)


class LoopProber:
    """While a test runs: /health asked every 50 ms from another process. The slowest answer is
    the longest time the proxy's event loop stood still, which must stay under STALL_LIMIT."""

    def __init__(self, ls):
        self.ls = ls
        self.worst, self.count = 0.0, 0

    def __enter__(self) -> LoopProber:
        self.proc = subprocess.Popen([PY, "-c", PROBER, "127.0.0.1", str(self.ls.port)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert self.proc.stdout.readline() == b"probing\n", "the prober did not start"
        return self

    def __exit__(self, *exc_info) -> None:
        out, _ = self.proc.communicate(b"", timeout=120)
        result = json.loads(out)
        self.worst, self.count = result["worst"], result["count"]
        if exc_info[0] is None:
            assert not result["failures"], f"/health failed while probed: {result['failures'][:5]}"
            assert self.worst < STALL_LIMIT, f"the event loop stood still for {self.worst:.3f} s ({self.count} probes)"


async def chat(session: aiohttp.ClientSession, ls, model: str, **extra) -> tuple[int, dict]:
    """POST a chat completion for `model` (extra JSON keys as given): status and decoded body."""
    async with session.post(ls.url + "/v1/chat/completions", json={"model": model, **extra}) as r:
        return r.status, json.loads(await r.read())


async def running(session: aiohttp.ClientSession, ls) -> list[dict]:
    async with session.get(ls.url + "/running") as r:
        assert r.status == 200
        return (await r.json())["running"]


def assert_envelope(status: int, body: dict, message_start: str) -> str:
    """A llama-swap 500 envelope whose message starts with `message_start`; returns the message."""
    assert status == 500, body
    assert body.get("src") == "llama-swap", body
    error = body["error"]
    assert error["type"] == "server_error", body
    assert error["code"] == "internal_error", body
    assert error["param"] is None, body
    assert error["message"].startswith(message_start), body
    return error["message"]
