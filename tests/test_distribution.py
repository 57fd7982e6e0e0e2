"""How users get it: the wheel, `python -m llama_swap`, the single-file .pyz and --demo."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import aiohttp
import pytest

from conftest import PY, ROOT, ServerProcess, chat, free_port, running


def demo_server(workdir: Path, *launcher: str) -> ServerProcess:
    port = free_port()
    server = ServerProcess([*launcher, "--demo", "--listen", f"127.0.0.1:{port}"], workdir)
    server.url = f"http://127.0.0.1:{port}"
    if not server.wait_for("listening on"):
        server.kill()
        raise AssertionError(f"--demo did not start:\n{server.output()}")
    return server


async def exercise_demo(server: ServerProcess) -> None:
    """Swap the two chat models, run the embedding model beside them, see the UI."""
    async with aiohttp.ClientSession() as s:
        assert (await chat(s, server, "chat-small"))[0] == 200
        async with s.post(server.url + "/v1/embeddings", json={"model": "embed", "input": "x"}) as r:
            assert r.status == 200
        status, reply = await chat(s, server, "chat-large")
        assert status == 200 and reply["model"] == "chat-large"
        assert sorted(e["model"] for e in await running(s, server)) == ["chat-large", "embed"]
        async with s.get(server.url + "/ui/models") as r:
            assert r.status == 200 and "text/html" in r.headers["Content-Type"]
        async with s.get(server.url + "/ui/pages/models.js") as r:
            assert r.status == 200


def stop_cleanly(server: ServerProcess) -> None:
    assert server.stop() == 0, server.output()
    assert "shutdown complete" in server.output()


async def test_demo_mode_needs_no_config_and_no_model_files(tmp_path):
    server = demo_server(tmp_path, PY, "-m", "llama_swap")
    try:
        assert "demo mode: chat-large, chat-small, embed" in server.output()
        await exercise_demo(server)
    finally:
        stop_cleanly(server)


def test_demo_mode_refuses_a_config_as_well():
    done = subprocess.run([PY, "-m", "llama_swap", "--demo", "--config", "x.yaml"], capture_output=True, text=True,
                          timeout=30, cwd=ROOT)
    assert done.returncode == 1 and "--demo brings its own config" in done.stderr


@pytest.fixture(scope="module")
def pyz(tmp_path_factory) -> Path:
    """Built once for the module, the way the README says (it downloads pure-Python wheels)."""
    target = tmp_path_factory.mktemp("pyz") / "llama-swap.pyz"
    subprocess.run([PY, str(ROOT / "scripts" / "build_pyz.py"), "-o", str(target)], check=True, timeout=300)
    return target


async def test_the_single_file_runs_with_nothing_installed(pyz, tmp_path):
    # -S: no site-packages at all, so everything it needs must be inside the one file.
    server = demo_server(tmp_path, PY, "-S", str(pyz))
    try:
        await exercise_demo(server)
    finally:
        stop_cleanly(server)


def test_the_single_file_carries_only_portable_code(pyz):
    names = zipfile.ZipFile(pyz).namelist()
    assert {"__main__.py", "llama_swap.py", "llama_swap_responder.py", "ui_assets/index.html", "yaml/__init__.py",
            "aiohttp/__init__.py", "pynvml.py"} <= set(names)
    assert not [n for n in names if n.endswith((".so", ".pyd"))]  # any Python >= 3.10, any machine


def test_the_wheel_carries_the_ui_the_responder_and_the_example_config(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(tmp_path), str(ROOT)],
                   check=True, timeout=300)
    [wheel] = tmp_path.glob("llama_swap_py-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"llama_swap.py", "llama_swap_responder.py", "ui_assets/index.html", "ui_assets/pages/playground.js",
            "ui_assets/style.css"} <= names
    assert any(n.endswith("share/llama-swap-py/config.example.yaml") for n in names)


async def test_an_installed_wheel_serves_its_ui_and_demo_from_anywhere(tmp_path):
    """What `pipx install` gives: the wheel in a venv of its own (dependencies borrowed from this
    environment, so the test needs no network), started from a directory without the checkout."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(tmp_path / "dist"), str(ROOT)],
                   check=True, timeout=300)
    [wheel] = (tmp_path / "dist").glob("*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=120)
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--no-deps", "--force-reinstall",
                    str(wheel)], check=True, timeout=300)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    server = demo_server(elsewhere, str(venv / "bin" / "llama-swap"))
    try:
        await exercise_demo(server)
    finally:
        stop_cleanly(server)
