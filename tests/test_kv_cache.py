"""kvCache: a llama-server's slots saved before a swap stops it and restored after its next start,
so that coming back to a model does not mean reading the whole conversation again.

Against the real llama-server where it is built (tests/llama_server.py --build), and against a
small fake server for what the real one does not do on demand (hang or die while saving)."""

from __future__ import annotations

import os
import sys
import time

import aiohttp
import pytest
import yaml

from helpers import eventually, running
from llama_server import binary, tiny_model
from llama_swap import ConfigError, kv_cache_model_dir, parse_config, prune_kv_files, remove_other_models_kv

needs_llama_server = pytest.mark.skipif(binary() is None,
                                        reason="llama-server is not built: python tests/llama_server.py --build")

PROMPT = "The quick brown fox jumps over the lazy dog. " * 30  # some 300 tokens of this vocabulary
TIMEOUT = aiohttp.ClientTimeout(total=120)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> str:
    return str(tiny_model(tmp_path_factory.mktemp("gguf") / "tiny-random-llama.gguf"))


def llama_cmd(model_file: str, *extra: str) -> str:
    return (f"{binary()} --host 127.0.0.1 --port ${{PORT}} -m {model_file} -c 1024 -np 1 --threads 2 --no-webui "
            "--slot-save-path ${KV_CACHE_DIR} " + " ".join(extra))


def two_models(tmp_path, model_file: str, kv_cache: bool, *extra: str) -> dict:
    alpha = {"cmd": llama_cmd(model_file, *extra)}
    if kv_cache:
        alpha["kvCache"] = True
    else:
        alpha["cmd"] = alpha["cmd"].replace("--slot-save-path ${KV_CACHE_DIR}", "")
    beta = {"cmd": llama_cmd(model_file).replace("--slot-save-path ${KV_CACHE_DIR}", "")}
    # The store beside the test: the caches go beside it, never into the user's cache directory.
    return {"healthCheckTimeout": 60, "store": {"path": str(tmp_path / "activity.db")},
            "models": {"alpha": alpha, "beta": beta}}


async def complete(s: aiohttp.ClientSession, ls, model: str, prompt: str) -> dict:
    async with s.post(ls.url + "/completion", json={"model": model, "prompt": prompt, "n_predict": 2,
                                                     "ignore_eos": True, "cache_prompt": True}) as r:
        assert r.status == 200, await r.text()
        return (await r.json())["timings"]


async def come_back_after_a_swap(ls) -> tuple[dict, dict]:
    """A long prompt to alpha, a request to beta (alpha is swapped out), then alpha again with
    the same conversation and a little more: the timings of the first and the last request."""
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        first = await complete(s, ls, "alpha", PROMPT)
        await complete(s, ls, "beta", "hello")
        assert [e["model"] for e in await running(s, ls)] == ["beta"]
        again = await complete(s, ls, "alpha", PROMPT + "And then it ran away.")
    return first, again


@needs_llama_server
async def test_a_model_coming_back_after_a_swap_does_not_read_its_conversation_again(
        in_process, upstreams, model_file, tmp_path):
    ls = await in_process(two_models(tmp_path, model_file, kv_cache=True))
    first, again = await come_back_after_a_swap(ls)
    assert first["prompt_n"] > 250, first
    assert again["prompt_n"] < 20, f"the restored slot should have spared the prompt: {again}"
    assert again["cache_n"] >= first["prompt_n"] - 1, again
    output = ls.output()
    assert "<alpha> KV cache: saved slot 0," in output and "<alpha> KV cache: restored slot 0," in output, output

    async def last_row() -> dict | None:  # the activity row of the request that came back
        async with s.get(ls.url + "/api/metrics/activity?model=alpha&order=desc") as r:
            rows = (await r.json())["data"]
        return rows[0] if len(rows) == 2 else None
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        assert await eventually(last_row, 10)
        assert (await last_row())["tokens"]["cache_tokens"] == again["cache_n"], await last_row()
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        async with s.get(ls.url + "/metrics") as r:
            metrics = await r.text()
    saved = [line for line in metrics.splitlines()
             if line.startswith('llamaswap_kv_cache_tokens_total{model="alpha",action="save"}')]
    assert saved and float(saved[0].split()[-1]) >= first["prompt_n"], metrics[-2000:]


@needs_llama_server
async def test_without_kv_cache_the_conversation_is_read_again(in_process, upstreams, model_file, tmp_path):
    ls = await in_process(two_models(tmp_path, model_file, kv_cache=False))
    first, again = await come_back_after_a_swap(ls)
    assert again["prompt_n"] >= first["prompt_n"], (first, again)
    assert "KV cache" not in ls.output()


@needs_llama_server
async def test_a_changed_cmd_restores_nothing(in_process, upstreams, model_file, tmp_path):
    ls = await in_process(two_models(tmp_path, model_file, True))
    first, _ = await come_back_after_a_swap(ls)
    # The same model with other launch settings: its saved slots were made by another server.
    ls.config_path.write_text(yaml.safe_dump(two_models(tmp_path, model_file, True, "--temp", "0.5")))
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        async with s.post(ls.url + "/api/config/reload") as r:
            assert r.status == 200, await r.text()
        await complete(s, ls, "beta", "hello")
        again = await complete(s, ls, "alpha", PROMPT + "And then it ran away.")
    assert again["prompt_n"] >= first["prompt_n"], again


# -- a server that hangs or dies while saving -------------------------------------------------------

FAKE_SERVER = r'''
import json, os, sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

port, mode = int(sys.argv[1]), sys.argv[2]

class Handler(BaseHTTPRequestHandler):
    def answer(self, body):
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self.answer([{"id": 0, "n_prompt_tokens": 12}] if self.path == "/slots" else {"status": "ok"})

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path.startswith("/slots/"):
            if mode == "die":
                os._exit(3)
            time.sleep(3600)
        self.answer({"choices": [{"text": "ok"}]})

    def log_message(self, *args):
        pass

ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
'''


@pytest.mark.parametrize("mode", ["hang", "die"])
async def test_a_server_that_hangs_or_dies_while_saving_does_not_hold_up_the_swap(
        in_process, upstreams, tmp_path, mode):
    script = tmp_path / "fake_llama_server.py"
    script.write_text(FAKE_SERVER)
    fake = f"{sys.executable} {script} ${{PORT}} {mode} --slot-save-path ${{KV_CACHE_DIR}}"
    ls = await in_process({"store": {"path": str(tmp_path / "activity.db")}, "models": {
        "alpha": {"cmd": fake, "kvCache": {"saveTimeout": 1}},
        "beta": {"cmd": upstreams.cmd(name="beta")}}})
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        async with s.post(ls.url + "/v1/completions", json={"model": "alpha", "prompt": "hi"}) as r:
            assert r.status == 200
        began = time.monotonic()
        async with s.post(ls.url + "/v1/chat/completions", json={"model": "beta", "messages": []}) as r:
            assert r.status == 200
        swap = time.monotonic() - began
        assert [e["model"] for e in await running(s, ls)] == ["beta"]
    assert swap < 12, f"the swap waited {swap:.1f} s for a save bounded by saveTimeout 1"
    expected = "saving took longer than 1s (kvCache.saveTimeout)" if mode == "hang" else "could not save"
    assert f"<alpha> KV cache: {expected}" in ls.output(), ls.output()


# -- config and disk ---------------------------------------------------------------------------------

def test_kv_cache_needs_the_directory_passed_to_llama_server():
    with pytest.raises(ConfigError, match=r"models\.m\.kvCache: cmd must pass --slot-save-path \$\{KV_CACHE_DIR\}"):
        parse_config("models:\n  m:\n    cmd: llama-server --port ${PORT}\n    kvCache: true\n")
    with pytest.raises(ConfigError, match=r"models\.m\.cmd: \$\{KV_CACHE_DIR\} is only set for a model with kvCache"):
        parse_config("models:\n  m:\n    cmd: llama-server --port ${PORT} --slot-save-path ${KV_CACHE_DIR}\n")
    with pytest.raises(ConfigError, match=r"models\.m\.kvCache\.maxDiskMB: must be at least 1"):
        parse_config("models:\n  m:\n    cmd: s --port ${PORT} --slot-save-path ${KV_CACHE_DIR}\n"
                     "    kvCache: {maxDiskMB: 0}\n")


def test_the_cache_directory_is_the_models_own_and_changes_with_its_launch_settings(tmp_path):
    def directory(cmd: str, model: str = "m") -> str:
        config = parse_config(yaml.safe_dump({"store": {"path": str(tmp_path / "a.db")},
                                              "models": {model: {"cmd": cmd, "kvCache": {"maxDiskMB": 64}}}}))
        settings = config.models[model].kv_cache
        assert settings.max_disk_mb == 64 and settings.save_timeout == 30
        assert f"--slot-save-path {settings.directory}" in config.models[model].cmd
        return settings.directory

    first = directory("llama-server --port ${PORT} -m a.gguf --slot-save-path ${KV_CACHE_DIR}")
    assert first.startswith(str(tmp_path / "kv-cache") + os.sep)
    assert directory("llama-server --port ${PORT} -m a.gguf --slot-save-path ${KV_CACHE_DIR}") == first
    assert directory("llama-server --port ${PORT} -m b.gguf --slot-save-path ${KV_CACHE_DIR}") != first
    other = directory("llama-server --port ${PORT} -m a.gguf --slot-save-path ${KV_CACHE_DIR}", "other")
    assert os.path.dirname(other) != os.path.dirname(first)


def test_the_oldest_files_go_first_when_a_model_passes_its_disk_budget(tmp_path):
    now = time.time()
    for age, (folder, name) in enumerate([("old-settings", "slot-0.bin"), ("current", "slot-1.bin"),
                                          ("current", "slot-0.bin")]):
        path = tmp_path / folder / name
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"x" * 1000)
        os.utime(path, (now - 100 + age, now - 100 + age))
    removed = prune_kv_files(str(tmp_path), 2000)
    assert removed == [str(tmp_path / "old-settings" / "slot-0.bin")]
    assert prune_kv_files(str(tmp_path), 2000) == []
    assert prune_kv_files(str(tmp_path), 999) == [str(tmp_path / "current" / "slot-1.bin"),
                                                  str(tmp_path / "current" / "slot-0.bin")]


def test_at_start_the_caches_of_models_no_longer_in_the_config_are_removed(tmp_path):
    root = str(tmp_path)
    kept, gone = kv_cache_model_dir(root, "coder"), kv_cache_model_dir(root, "old/model")
    for directory in (kept, gone):
        os.makedirs(os.path.join(directory, "settings"))
        with open(os.path.join(directory, "settings", "slot-0.bin"), "wb") as f:
            f.write(b"x")
    assert remove_other_models_kv(root, {kept}) == [gone]
    assert os.listdir(root) == [os.path.basename(kept)]
    assert remove_other_models_kv(str(tmp_path / "none yet"), set()) == []


@needs_llama_server
async def test_a_reload_that_changes_a_running_model_saves_its_slots_first(in_process, upstreams, model_file, tmp_path):
    ls = await in_process(two_models(tmp_path, model_file, True))
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        await complete(s, ls, "alpha", PROMPT)
        changed = two_models(tmp_path, model_file, True, "--temp", "0.5")
        changed["startPort"] = yaml.safe_load(ls.config_path.read_text())["startPort"]  # beta stays as it is
        ls.config_path.write_text(yaml.safe_dump(changed))
        async with s.post(ls.url + "/api/config/reload") as r:
            assert r.status == 200, await r.text()
            assert (await r.json())["models"]["changed"] == ["alpha"]
        assert await eventually(lambda: "<alpha> KV cache: saved slot 0," in ls.output(), 30), ls.output()
