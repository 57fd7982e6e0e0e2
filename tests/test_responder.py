"""Tests for the fake upstream server, llama_swap_responder.py."""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import pytest

import llama_swap
import llama_swap_responder

RESPONDER = Path(__file__).resolve().parent.parent / "llama_swap_responder.py"
START_TIMEOUT = 10.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get(port: int, path: str, timeout: float = 2.0) -> tuple[int, bytes]:
    url = f"http://127.0.0.1:{port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def post_json(port: int, path: str, payload: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        data=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def wait_for_event(port: int, event: str, timeout: float = 5.0) -> bool:
    """Poll /_responder/events until `event` is recorded; False once `timeout` has passed."""
    deadline = time.monotonic() + timeout
    while event not in [e["event"] for e in json.loads(get(port, "/_responder/events")[1])]:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def wait_until_listening(
    port: int, proc: subprocess.Popen[str], timeout: float = START_TIMEOUT
) -> None:
    """Wait until /health answers at all (any status)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"responder exited early with {proc.returncode}")
        try:
            get(port, "/health", timeout=0.5)
            return
        except (OSError, http.client.HTTPException):
            time.sleep(0.05)
    raise AssertionError("responder did not start listening in time")


def kill(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=5)


Spawn = Callable[..., tuple[subprocess.Popen[str], int]]


@pytest.fixture
def spawn() -> Iterator[Spawn]:
    """Start responders (optionally waiting for them to listen); kill all at teardown."""
    procs: list[subprocess.Popen[str]] = []

    def start(*args: str, wait: bool = True, **popen: Any) -> tuple[subprocess.Popen[str], int]:
        port = free_port()
        proc = subprocess.Popen(
            [sys.executable, str(RESPONDER), "--port", str(port), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            **popen,
        )
        procs.append(proc)
        if wait:
            wait_until_listening(port, proc)
        return proc, port

    yield start
    for proc in procs:
        kill(proc)


def test_health_loading_then_ok(spawn: Spawn) -> None:
    _proc, port = spawn("--healthy-after", "0.6")
    status, body = get(port, "/health")
    assert status == 503
    assert json.loads(body) == {"status": "loading"}
    deadline = time.monotonic() + 5
    while get(port, "/health")[0] != 200:
        assert time.monotonic() < deadline, "never became healthy"
        time.sleep(0.05)
    assert json.loads(get(port, "/health")[1]) == {"status": "ok"}


def test_json_echo_reports_model_and_request(spawn: Spawn) -> None:
    _proc, port = spawn("--name", "m1")
    payload = {"model": "llama", "messages": []}
    status, reply = post_json(port, "/v1/chat/completions?a=%20b", payload)
    assert status == 200
    assert reply["object"] == "chat.completion"
    assert reply["model"] == "m1"
    assert reply["choices"][0]["message"]["content"] == "hello from m1"
    echo = reply["echo"]
    assert echo["method"] == "POST"
    assert echo["path"] == "/v1/chat/completions"
    assert echo["query"] == "a=%20b"
    assert echo["model"] == "llama"
    assert echo["content_type"] == "application/json"
    assert echo["form_fields"] is None
    assert json.loads(echo["body"]) == payload

    status, reply = post_json(port, "/v1/embeddings", {"model": "e", "responder_status": 418})
    assert status == 418
    assert reply["object"] == "list"
    assert reply["echo"]["model"] == "e"

    info = json.loads(get(port, "/_responder/info")[1])
    assert info["requests"] == 2 and info["name"] == "m1"
    events = json.loads(get(port, "/_responder/events")[1])
    assert [e["event"] for e in events] == ["request", "request"]


def test_multipart_echo_lists_fields(spawn: Spawn) -> None:
    _proc, port = spawn()
    boundary = "xyzBOUNDARY"
    body = (
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper\r\n"
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n"
        f"Content-Type: audio/wav\r\n\r\nRIFF....\r\n--{boundary}--\r\n"
    ).encode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request(
            "POST",
            "/v1/audio/transcriptions",
            body=body,
            headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
        )
        echo = json.loads(conn.getresponse().read())["echo"]
    finally:
        conn.close()
    assert echo["model"] == "whisper"
    assert echo["form_fields"] == [{"name": "model"}, {"name": "file", "filename": "a.wav"}]
    assert echo["body_len"] == len(body)


def test_rerank_scores_documents_by_the_query_words_they_hold_best_first(spawn: Spawn) -> None:
    _proc, port = spawn("--name", "ranker")
    documents = ["a cat sat", "nothing here", "The CAT sat on the mat", "mat"]
    status, reply = post_json(port, "/v1/rerank", {"model": "r", "query": "cat on mat", "documents": documents})
    assert status == 200
    assert reply["model"] == "ranker" and reply["object"] == "list"
    # The share of the query's words each document holds; ties stay in document order.
    assert reply["results"] == [{"index": 2, "relevance_score": 1.0}, {"index": 0, "relevance_score": 0.333333},
                                {"index": 3, "relevance_score": 0.333333}, {"index": 1, "relevance_score": 0.0}]
    assert reply["usage"] == {"prompt_tokens": 3 + 3 + 2 + 6 + 1, "total_tokens": 15}
    assert reply["echo"]["model"] == "r" and reply["echo"]["path"] == "/v1/rerank"

    # top_n keeps the best; llama.cpp's other names and "texts" answer the same.
    status, reply = post_json(port, "/rerank", {"query": "cat on mat", "texts": documents, "top_n": 2})
    assert status == 200
    assert [r["index"] for r in reply["results"]] == [2, 0]
    assert post_json(port, "/v1/reranking", {"query": "x", "documents": ["x"], "top_n": 0})[1]["results"] == []

    for bad in ({"documents": ["a"]}, {"query": "a", "documents": []}, {"query": "a", "documents": [1]},
                {"query": "a", "documents": ["a"], "top_n": -1}, {"query": "a", "documents": ["a"], "top_n": "2"}):
        status, reply = post_json(port, "/v1/rerank", bad)
        assert status == 400, bad
        assert reply["error"]["type"] == "invalid_request_error" and reply["error"]["message"], reply
    status, reply = post_json(port, "/v1/rerank", {"query": "a", "documents": ["a"], "responder_status": 503})
    assert status == 503 and reply["results"] == [{"index": 0, "relevance_score": 1.0}]
    info = json.loads(get(port, "/_responder/info")[1])
    assert info["requests"] == 9


def read_sse(port: int, payload: dict[str, Any]) -> tuple[dict[str, str], list[tuple[float, str]]]:
    """POST payload and return (headers, [(arrival time, data)]) read line by line."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("POST", "/v1/chat/completions", body=json.dumps(payload),
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        headers = {k.lower(): v for k, v in resp.getheaders()}
        events: list[tuple[float, str]] = []
        while line := resp.readline():
            if line.startswith(b"data: "):
                events.append((time.monotonic(), line[6:].decode().strip()))
        return headers, events
    finally:
        conn.close()


def test_stream_is_incremental(spawn: Spawn) -> None:
    _proc, port = spawn()
    chunks, delay = 4, 0.1
    headers, events = read_sse(port, {"model": "x", "stream": True,
                                      "responder_chunks": chunks, "responder_delay": delay})
    assert headers["content-type"].startswith("text/event-stream")
    assert "content-length" not in headers
    assert len(events) == chunks + 2
    assert events[-1][1] == "[DONE]"
    first = json.loads(events[0][1])
    assert first["object"] == "chat.completion.chunk"
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": "tok0 "}
    assert first["echo"]["model"] == "x"
    final = json.loads(events[-2][1])
    assert final["choices"][0]["finish_reason"] == "stop"
    assert final["usage"]["completion_tokens"] == chunks
    # Events arrive spread out over time, not all at once (loose bound).
    assert events[-1][0] - events[0][0] >= delay * chunks * 0.7
    kinds = [e["event"] for e in json.loads(get(port, "/_responder/events")[1])]
    assert kinds == ["request", "stream_completed"]


def test_stream_disconnect_is_recorded(spawn: Spawn) -> None:
    proc, port = spawn()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    conn.request("POST", "/v1/chat/completions", body=json.dumps(
        {"stream": True, "responder_chunks": 100, "responder_delay": 0.05}))
    resp = conn.getresponse()
    assert resp.readline().startswith(b"data: ")
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    assert wait_for_event(port, "client_disconnected")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=5)
    assert proc.returncode == 0
    assert "client disconnected during stream on /v1/chat/completions" in out
    assert "SIGTERM received, shutting down" in out
    assert "Traceback" not in err


def test_exit_after_fails_with_message(spawn: Spawn) -> None:
    proc, _port = spawn("--name", "big", "--exit-after", "0.2", "--startup-delay", "5", wait=False)
    out, err = proc.communicate(timeout=10)
    assert proc.returncode == 1
    assert "error: failed to load model 'big': out of memory (simulated)" in err
    assert "loading model..." in out
    assert "listening" not in out


def test_ignore_sigterm_survives(spawn: Spawn) -> None:
    proc, port = spawn("--ignore-sigterm")
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    assert proc.poll() is None
    assert get(port, "/health")[0] == 200
    proc.kill()
    out, _err = proc.communicate(timeout=5)
    assert "ignoring SIGTERM" in out


def test_fork_grandchild_serves(spawn: Spawn, tmp_path: Path) -> None:
    pid_file = tmp_path / "pids"
    proc, port = spawn("--fork-grandchild", "--pid-file", str(pid_file), start_new_session=True)
    try:
        info = json.loads(get(port, "/_responder/info")[1])
        assert info["pid"] != proc.pid
        assert pid_file.read_text().split() == [str(proc.pid), str(info["pid"])]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 0
        # The parent did not forward SIGTERM: the orphaned grandchild still serves.
        assert get(port, "/health")[0] == 200
    finally:
        kill_group(proc.pid)
    assert proc.stdout is not None
    assert f"grandchild pid {info['pid']}" in proc.stdout.read()


def kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def stream_until_eof(port: int, payload: dict[str, Any]) -> tuple[bytes, bool]:
    """POST a streaming payload; (the de-chunked body, whether the chunked body ended properly)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("POST", "/v1/chat/completions", body=json.dumps({"stream": True, **payload}))
        resp = conn.getresponse()
        try:
            return resp.read(), True
        except http.client.IncompleteRead as cut:
            return cut.partial, False
    finally:
        conn.close()


def test_crash_after_sends_whole_events_then_dies(spawn: Spawn) -> None:
    proc, port = spawn("--name", "c")
    body, finished = stream_until_eof(port, {"responder_crash_after": 3, "responder_delay": 0})
    assert not finished, "a crash must not end the chunked body"
    events = body.split(b"\n\n")
    assert events[-1] == b"" and len(events) == 4, body
    assert [json.loads(e[len(b"data: "):])["choices"][0]["delta"]["content"] for e in events[:3]] == [
        "tok0 ", "tok1 ", "tok2 "]
    assert proc.wait(timeout=5) == 1
    assert "crashing mid-stream after 3 events (simulated)" in proc.communicate()[0]


def test_crash_partial_leaves_half_an_event(spawn: Spawn) -> None:
    proc, port = spawn()
    body, finished = stream_until_eof(port, {"responder_crash_after": 2, "responder_crash_partial": True})
    assert not finished
    assert body.count(b"\n\n") == 2
    assert body.endswith(b'\n\ndata: {"choi'), body[-40:]
    assert proc.wait(timeout=5) == 1


def test_bytes_stream_sends_filler_events_and_counts_them(spawn: Spawn) -> None:
    _proc, port = spawn()
    body, finished = stream_until_eof(port, {"responder_bytes": 1024**2})
    assert finished
    events = body.split(b"\n\n")
    assert events[-2:] == [b"data: [DONE]", b""]
    assert len(events) == 64 + 2  # 1 MiB is 64 events of 16 KiB
    assert {len(e) + 2 for e in events[:-2]} == {16 * 1024}
    assert json.loads(events[0][len(b"data: "):])["filler"].strip("x") == ""
    info = json.loads(get(port, "/_responder/info")[1])
    assert info["streamed_bytes"] == 1024**2


def test_bytes_stream_waits_for_a_reader_that_stops(spawn: Spawn) -> None:
    _proc, port = spawn()
    total = 256 * 1024**2
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        body = json.dumps({"stream": True, "responder_bytes": total}).encode()
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")

        def streamed() -> int:
            return json.loads(get(port, "/_responder/info")[1])["streamed_bytes"]

        # Nobody reads: once the socket buffers are full, write() must stop returning.
        previous, deadline = -1, time.monotonic() + 10
        while (current := streamed()) != previous:
            assert time.monotonic() < deadline, f"still streaming: {current} bytes"
            previous = current
            time.sleep(0.5)
        assert 0 < current < 32 * 1024**2, current
    # Closed with unread data: a reset that reaches the writer while it waits in write().
    assert wait_for_event(port, "client_disconnected")


SHARD_UPDATES = "".join(f"\rLoading safetensors checkpoint shards: {percent}% Completed | {n}/7"
                        for n, percent in enumerate(["  0", " 14", " 29", " 43", " 57", " 71", " 86", "100"]))


@pytest.mark.parametrize("style, expected", [
    ("dots", "llm_load_tensors: loading model tensors\n" + "." * 100 + "\n"),
    ("percent", SHARD_UPDATES + "\n"),
])
def test_load_progress_is_printed_as_the_load_goes_then_it_listens(spawn: Spawn, style: str, expected: str) -> None:
    delay = 2.0
    proc, _port = spawn("--startup-delay", str(delay), "--load-progress", style, wait=False)
    assert proc.stdout is not None
    out, arrivals = "", []  # arrivals: (seconds, length of the output by then)
    while "listening on" not in out:
        chunk = os.read(proc.stdout.fileno(), 65536).decode()
        assert chunk, f"the responder ended its output early: {out!r}"
        out += chunk
        arrivals.append((time.monotonic(), len(out)))
    start = out.find(expected)
    assert start >= 0, out
    assert "loading model..." not in out
    assert out.index("listening on") > start + len(expected)

    def arrived(position: int) -> float:
        return next(t for t, length in arrivals if length > position)

    # Spread over the delay, not held back until a newline: the middle comes well apart from both ends.
    middle = arrived(start + len(expected) // 2)
    assert middle - arrived(start) >= delay / 4
    assert arrived(start + len(expected) - 1) - middle >= delay / 4


# -- fake GPU memory (--fake-vram), as llama-swap's FakeVram reads it ------------------------

GiB = 1024**3
FAKE_GPUS = [{"total": 24 * GiB, "used": 0}]


def fake_gpu_file(tmp_path: Path) -> Path:
    path = tmp_path / "gpus.json"
    path.write_text(json.dumps({"gpus": FAKE_GPUS, "processes": {}}))
    return path


def fake_processes(path: Path) -> dict[str, dict[str, float]]:
    state = json.loads(path.read_text())
    assert state["gpus"] == FAKE_GPUS, "a responder lost the GPUs of the file"
    return state["processes"]


def read_until(proc: subprocess.Popen[str], text: str) -> None:
    assert proc.stdout is not None
    while text not in (line := proc.stdout.readline()):
        assert line, f"the responder ended its output before printing {text!r}"


def test_fake_vram_is_held_once_loaded_and_shown_freed_later_after_sigterm(spawn: Spawn, tmp_path: Path) -> None:
    gpus = fake_gpu_file(tmp_path)
    proc, port = spawn("--startup-delay", "1", "--fake-vram", "0:4GiB,1:512M", "--fake-vram-file", str(gpus),
                       "--fake-vram-release", "30", wait=False)
    read_until(proc, "loading model...")
    assert fake_processes(gpus) == {}, "memory held before the load finished"
    read_until(proc, "listening on")
    assert fake_processes(gpus) == {str(proc.pid): {"0": 4 * GiB, "1": 512 * 1024**2}}
    before = time.time()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=5) == 0
    entry = fake_processes(gpus)[str(proc.pid)]
    assert before + 30 <= entry["until"] <= time.time() + 30
    assert entry["0"] == 4 * GiB, "the entry must stay until the memory is shown freed"


def test_fake_vram_entries_of_responders_loading_together_are_all_kept(spawn: Spawn, tmp_path: Path) -> None:
    gpus = fake_gpu_file(tmp_path)
    started = [spawn("--fake-vram", f"0:{n}GiB", "--fake-vram-file", str(gpus), wait=False) for n in (1, 2, 3)]
    for proc, port in started:
        wait_until_listening(port, proc)
    assert fake_processes(gpus) == {str(proc.pid): {"0": n * GiB} for n, (proc, _port) in zip((1, 2, 3), started)}


def test_a_crash_leaves_the_fake_vram_entry_as_it_was(spawn: Spawn, tmp_path: Path) -> None:
    gpus = fake_gpu_file(tmp_path)
    proc, port = spawn("--fake-vram", "0:8GiB", "--fake-vram-file", str(gpus), "--fake-vram-release", "30")
    stream_until_eof(port, {"responder_crash_after": 1})
    assert proc.wait(timeout=5) == 1
    # No "until": FakeVram counts a dead pid's memory as freed at once.
    assert fake_processes(gpus) == {str(proc.pid): {"0": 8 * GiB}}


@pytest.mark.parametrize("text", ["8GiB", "20 GB", "512M", "1.5g", "7 kb", "2TiB", "1048576"])
def test_fake_vram_sizes_are_read_as_llama_swap_reads_them(text: str) -> None:
    assert llama_swap_responder.parse_size(text) == llama_swap.parse_size(text)


def test_a_fake_vram_spec_names_a_size_per_gpu() -> None:
    assert llama_swap_responder.parse_vram_spec("0:4GiB, 1:512M") == {"0": 4 * GiB, "1": 512 * 1024**2}


@pytest.mark.parametrize("spec", ["8GiB", "0:lots", "x:1GiB", "0:1GiB,", "-1:1GiB"])
def test_a_fake_vram_spec_that_is_not_gpu_and_size_is_refused(spec: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        llama_swap_responder.parse_vram_spec(spec)
