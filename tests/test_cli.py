"""The command line: flags in Go style, clean one-line failures, listen warnings, signals.

Runs `python -m llama_swap` and, when installed, the `llama-swap` console script.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import urllib.request
from pathlib import Path

import pytest

from helpers import ROOT, ServerProcess, free_port

PY = sys.executable
SCRIPT = shutil.which("llama-swap")

LAUNCHERS = [
    pytest.param([PY, "-m", "llama_swap"], id="module"),
    pytest.param([SCRIPT or "llama-swap"], id="script",
                 marks=pytest.mark.skipif(SCRIPT is None, reason="llama-swap console script not installed")),
]


def run(launcher: list[str], *args: str, timeout: float = 30, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*launcher, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env=env)


def write_config(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


GOOD_CONFIG = """\
models:
  m:
    cmd: some-server --port ${PORT}
"""


@pytest.fixture
def servers():
    started: list[ServerProcess] = []
    yield started
    for server in started:
        server.kill()


def start(servers: list[ServerProcess], launcher: list[str], tmp_path: Path, *args: str) -> ServerProcess:
    server = ServerProcess([*launcher, *args], tmp_path)
    servers.append(server)
    return server


def http_get(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.status, r.read().decode()


def assert_one_clean_line(result: subprocess.CompletedProcess) -> str:
    """Exit status 1, no traceback anywhere, exactly one non-empty line on stderr."""
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    return lines[0]


# -- 1. version and help ----------------------------------------------------------------------


@pytest.mark.parametrize("launcher", LAUNCHERS)
@pytest.mark.parametrize("flag", ["--version", "-version"])
def test_version_flag_prints_version_and_exits_0(launcher, flag):
    result = run(launcher, flag)
    assert result.returncode == 0, result.stderr
    assert re.match(r"version: \S+", result.stdout), result.stdout
    assert len(result.stdout.splitlines()) == 1
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("launcher", LAUNCHERS)
@pytest.mark.parametrize("flag", ["-h", "--help", "-help"])
def test_help_flags_print_usage_and_exit_0(launcher, flag):
    result = run(launcher, flag)
    assert result.returncode == 0, result.stderr
    text = result.stdout + result.stderr
    assert "usage" in text.lower(), text
    for option in ("config", "listen", "version"):
        assert option in text
    assert "Traceback" not in text


# -- 2. single-dash flags ----------------------------------------------------------------------


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_single_dash_flags_start_the_server(launcher, tmp_path, servers):
    config = write_config(tmp_path, GOOD_CONFIG)
    port = free_port()
    server = start(servers, launcher, tmp_path, "-config", str(config), "-listen", f"127.0.0.1:{port}")
    assert server.wait_for(f"llama-swap listening on http://127.0.0.1:{port}"), server.output()
    assert http_get(f"http://127.0.0.1:{port}/health") == (200, "OK")
    assert server.stop() == 0, server.output()


def test_flag_equals_value_form_works(tmp_path, servers):
    config = write_config(tmp_path, GOOD_CONFIG)
    port = free_port()
    server = start(servers, [PY, "-m", "llama_swap"], tmp_path, f"-config={config}", f"--listen=127.0.0.1:{port}")
    assert server.wait_for(f"llama-swap listening on http://127.0.0.1:{port}"), server.output()
    assert http_get(f"http://127.0.0.1:{port}/health") == (200, "OK")
    assert server.stop() == 0, server.output()


# -- 3. no config --------------------------------------------------------------------------------


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_missing_config_flag_exits_1_with_one_line(launcher):
    result = run(launcher)
    line = assert_one_clean_line(result)
    assert "config" in line


# -- 4. bad configs --------------------------------------------------------------------------------


BAD_CONFIGS = {
    "ttl-not-an-int": ("models: {m: {cmd: 'x --port ${PORT}', ttl: abc}}\n", ["models.m.ttl"]),
    "proxy-port-without-cmd-port": (
        "models:\n  m:\n    cmd: x --port 9999\n    proxy: http://localhost:${PORT}\n", ["models.m", "PORT"]),
    "duplicate-alias": (
        "models:\n  m1:\n    cmd: x ${PORT}\n    aliases: [dup]\n  m2:\n    cmd: y ${PORT}\n    aliases: [dup]\n",
        ["aliases", "dup"]),
    "yaml-syntax-error": ("models:\n  m:\n    cmd: [unclosed\n  other: {\n", [re.compile(r"line \d+")]),
    "unknown-macro": ("models:\n  m:\n    cmd: x --port ${PORT} --opt ${nope}\n", ["models.m.cmd", "nope"]),
    "unset-env-macro": ("models:\n  m:\n    cmd: x --port ${PORT} ${env.LLAMA_SWAP_TEST_NOPE_VAR}\n",
                        ["LLAMA_SWAP_TEST_NOPE_VAR"]),
}


@pytest.mark.parametrize("launcher", LAUNCHERS)
@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_config_exits_1_with_one_line_naming_file_and_key(launcher, case, tmp_path):
    text, needles = BAD_CONFIGS[case]
    config = write_config(tmp_path, text)
    env = {k: v for k, v in os.environ.items() if k != "LLAMA_SWAP_TEST_NOPE_VAR"}
    result = run(launcher, "--config", str(config), "--listen", f"127.0.0.1:{free_port()}", env=env)
    line = assert_one_clean_line(result)
    assert str(config) in line, line
    for needle in needles:
        if isinstance(needle, re.Pattern):
            assert needle.search(line), line
        else:
            assert needle in line, line
    assert "listening" not in result.stdout


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_missing_config_file_exits_1_with_one_line(launcher, tmp_path):
    missing = tmp_path / "does-not-exist.yaml"
    result = run(launcher, "-config", str(missing), "-listen", f"127.0.0.1:{free_port()}")
    line = assert_one_clean_line(result)
    assert str(missing) in line, line


# -- 5. listen address warnings -------------------------------------------------------------------


@pytest.mark.parametrize("listen,warns", [(":{port}", True), ("0.0.0.0:{port}", True), ("127.0.0.1:{port}", False)])
def test_non_loopback_listen_address_logs_reachable_warning(listen, warns, tmp_path, servers):
    config = write_config(tmp_path, GOOD_CONFIG)
    port = free_port()
    server = start(servers, [PY, "-m", "llama_swap"], tmp_path, "--config", str(config),
                   "--listen", listen.format(port=port))
    assert server.wait_for("listening on http://"), server.output()
    if warns:
        assert server.wait_for("reachable by all hosts", 5), server.output()
        assert f"localhost:{port}" in server.output()
    assert http_get(f"http://127.0.0.1:{port}/health") == (200, "OK")
    assert server.stop() == 0
    assert ("reachable by all hosts" in server.output()) == warns, server.output()


@pytest.mark.parametrize("listen, shown", [(":{port}", "http://localhost:{port} (all interfaces)"),
                                           ("[::]:{port}", "http://localhost:{port} (all interfaces)"),
                                           ("127.0.0.1:{port}", "http://127.0.0.1:{port}"),
                                           ("[::1]:{port}", "http://[::1]:{port}")])
def test_the_address_and_the_web_ui_are_printed_as_urls_a_browser_opens(listen, shown, tmp_path, servers):
    if "::" in listen and not socket.has_ipv6:
        pytest.skip("no IPv6")
    config = write_config(tmp_path, GOOD_CONFIG)
    port = free_port()
    server = start(servers, [PY, "-m", "llama_swap"], tmp_path, "--config", str(config),
                   "--listen", listen.format(port=port))
    assert server.wait_for("web UI: "), server.output()
    url = shown.format(port=port).split(" ")[0]
    assert f"listening on {shown.format(port=port)}" in server.output()
    assert f"web UI: {url}/ui/" in server.output()
    assert server.stop() == 0


def test_the_demo_takes_free_ports_for_its_models(tmp_path, servers):
    with socket.socket() as busy:
        with contextlib.suppress(OSError):  # the default port made busy (or it is busy already)
            busy.bind(("127.0.0.1", 5800))
            busy.listen()
        port = free_port()
        server = start(servers, [PY, "-m", "llama_swap"], tmp_path, "--demo", "--listen", f"127.0.0.1:{port}")
        assert server.wait_for("listening on"), server.output()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", method="POST",
                                         data=b'{"model":"chat-small","messages":[]}',
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as r:
            assert r.status == 200
        [entry] = json.loads(http_get(f"http://127.0.0.1:{port}/running")[1])["running"]
        assert entry["model"] == "chat-small" and not entry["proxy"].endswith(":5800"), entry
    assert server.stop() == 0


def test_example_config_prints_the_shipped_example_from_anywhere(tmp_path):
    result = subprocess.run([PY, "-m", "llama_swap", "--example-config"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 0 and result.stdout == (ROOT / "config.example.yaml").read_text()


# -- 6. port in use --------------------------------------------------------------------------------


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_port_in_use_exits_1_with_clear_message(launcher, tmp_path):
    config = write_config(tmp_path, GOOD_CONFIG)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run(launcher, "--config", str(config), "--listen", f"127.0.0.1:{port}")
    text = result.stdout + result.stderr
    assert result.returncode == 1, text
    assert "Traceback" not in text
    assert str(port) in text
    assert re.search(r"in use|cannot listen|bind", text, re.I), text
    assert "listening on" not in text


# -- 7. SIGINT ------------------------------------------------------------------------------------


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_sigint_shuts_down_cleanly_with_exit_0(launcher, tmp_path, servers):
    config = write_config(tmp_path, GOOD_CONFIG)
    port = free_port()
    server = start(servers, launcher, tmp_path, "--config", str(config), "--listen", f"127.0.0.1:{port}")
    assert server.wait_for("listening on"), server.output()
    code = server.stop(signal.SIGINT)
    output = server.output()
    assert code == 0, output
    assert "shutdown complete" in output
    assert "Traceback" not in output
    assert "KeyboardInterrupt" not in output


def test_sigint_stops_a_loaded_upstream(start_llama_swap, upstreams):
    """Ctrl-C with a model running: the upstream is stopped before llama-swap exits 0."""
    from helpers import pid_alive

    ls = start_llama_swap({"healthCheckTimeout": 30, "startPort": free_port(),
                           "models": {"m": {"cmd": upstreams.cmd(name="m")}}})
    status, _ = http_get(ls.url + "/upstream/m/")
    assert status == 200
    [pid] = upstreams.pids()
    assert pid_alive(pid)
    assert ls.stop(signal.SIGINT) == 0, ls.output()
    assert "shutdown complete" in ls.output()
    assert not pid_alive(pid)
