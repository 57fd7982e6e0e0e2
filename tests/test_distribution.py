"""How users get it: the wheel, `python -m llama_swap`, the single-file .pyz and --demo."""

from __future__ import annotations

import concurrent.futures
import fcntl
import functools
import os
import platform
import shutil
import site
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import aiohttp
import pytest

from helpers import PY, ROOT, ServerProcess, chat, free_port, free_port_block, running

# Building the .pyz or the wheel downloads from the package index: on a loaded machine that takes
# minutes, far beyond pyproject's 120 s per test, which pytest-timeout also charges for the setup
# of the module fixtures that build them. The subprocess limit runs out first, with its output.
BUILD_TIMEOUT = 600
SLOW = pytest.mark.timeout(BUILD_TIMEOUT + 300)

SUPPORTED = [f"3.{minor}" for minor in range(10, 15)]  # what the README promises the .pyz runs on
SPEEDUPS = ["aiohttp", "multidict", "yarl", "frozenlist", "propcache"]  # with C parts for common Linux machines
TOO_OLD = ["3.9", "3.8", "3.7", "3.6", "2.7"]


def demo_server(workdir: Path, *launcher: str, outside_checkout: bool = False) -> ServerProcess:
    return started(workdir, [*launcher, "--demo"], outside_checkout)


def started(workdir: Path, argv: list[str], outside_checkout: bool = False,
            env: dict[str, str] | None = None) -> ServerProcess:
    """outside_checkout: started in `workdir` rather than the checkout, so that neither llama-swap nor the
    upstreams it starts (the responder) can import anything from the checkout."""
    port = free_port()
    server = ServerProcess([*argv, "--listen", f"127.0.0.1:{port}"], workdir, cwd=workdir if outside_checkout else ROOT,
                           env=env)
    server.url = f"http://127.0.0.1:{port}"
    # From a .pyz nothing is compiled ahead (zipimport writes no .pyc): a busy machine needs a while.
    if not server.wait_for("listening on", timeout=60):
        server.kill()
        raise AssertionError(f"{argv} did not start:\n{server.output()}")
    return server


async def exercise_example_config(workdir: Path, *launcher: str) -> None:
    """What a new user does: take the example out of the installed copy and run it as it is (but
    for its ports, moved where nothing else listens), on a box whose `python3` is not the Python
    llama-swap-py was installed for (here: one that only says so)."""
    example = subprocess.run([*launcher, "--example-config"], capture_output=True, text=True, timeout=60, cwd=workdir)
    assert example.returncode == 0, example.stderr
    config = workdir / "config.yaml"
    config.write_text(example.stdout.replace("startPort: 5800", f"startPort: {free_port_block()}"))
    other = workdir / "other-python"
    other.mkdir()
    for name in ("python", "python3"):
        (other / name).write_text("#!/bin/sh\necho 'a python without aiohttp' >&2\nexit 1\n")
        (other / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{other}{os.pathsep}{os.environ.get('PATH', '')}"}
    server = started(workdir, [*launcher, "--config", str(config)], outside_checkout=True, env=env)
    try:
        async with aiohttp.ClientSession() as s:
            for model in ("small", "large"):  # they swap
                status, reply = await chat(s, server, model)
                assert status == 200 and reply["model"] == model, (model, reply, server.output())
    finally:
        stop_cleanly(server)


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
                          timeout=60, cwd=ROOT)
    assert done.returncode == 1 and "--demo brings its own config" in done.stderr


def package_index_reachable() -> bool:
    """Asked the way the builds ask, through pip and its configuration (index, proxy,
    certificates), with its cache left out so that only the network can answer."""
    done = subprocess.run([PY, "-m", "pip", "--no-cache-dir", "--retries", "0", "--timeout", "20", "index", "versions",
                           "nvidia-ml-py"], capture_output=True, text=True, timeout=120)
    return done.returncode == 0


def build_or_skip(what: str, argv: list[str]) -> None:
    """Run a build that downloads; skip when the package index cannot be reached, fail otherwise."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=BUILD_TIMEOUT)
    except subprocess.TimeoutExpired as e:
        output = "".join(o.decode(errors="replace") if isinstance(o, bytes) else o or "" for o in (e.stdout, e.stderr))
        failure = f"still running after {BUILD_TIMEOUT} s:\n{output}"
    else:
        if done.returncode == 0:
            return
        failure = f"exit status {done.returncode}:\n{done.stdout}{done.stderr}"
    if not package_index_reachable():
        pytest.skip(f"{what} downloads from the package index, which cannot be reached from here")
    pytest.fail(f"{what} failed, {failure}")


@functools.cache
def find_python(version: str) -> str | None:
    """A CPython X.Y: this one, `pythonX.Y` on PATH, or one that pyenv installed (its shims on
    PATH answer only for the versions pyenv was told to use, so each candidate is asked)."""
    candidates = [sys.executable] if f"{sys.version_info[0]}.{sys.version_info[1]}" == version else []
    candidates.append(shutil.which(f"python{version}"))
    candidates += sorted(map(str, Path("~/.pyenv/versions").expanduser().glob(f"{version}*/bin/python")), reverse=True)
    ask = ("import platform, sys; "  # in words that every Python since 2.7 understands
           "sys.stdout.write('%s %d.%d' % ((platform.python_implementation(),) + sys.version_info[:2]))")
    for python in filter(None, candidates):
        try:
            done = subprocess.run([python, "-c", ask], capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if done.returncode == 0 and done.stdout == f"CPython {version}":
            return python
    return None


def python_or_skip(version: str) -> str:
    python = find_python(version)
    if python is None:
        pytest.skip(f"no CPython {version} here (as python{version} on PATH or under ~/.pyenv/versions)")
    return python


def here_has_speedups() -> bool:
    """Whether this Python and machine are among those the .pyz carries C speedups for."""
    return (sys.platform == "linux" and platform.machine() in ("x86_64", "aarch64") and not sys.abiflags
            and sys.implementation.name == "cpython" and platform.libc_ver()[0] == "glibc")


@pytest.fixture(autouse=True, scope="module")
def pyz_cache(tmp_path_factory):
    """Where the .pyz started by this module's tests unpacks itself: not the user's ~/.cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="module")
def pyz(tmp_path_factory) -> Path:
    """Built once for the module, the way the README says (it downloads wheels)."""
    target = tmp_path_factory.mktemp("pyz") / "llama-swap.pyz"
    build_or_skip("building the .pyz", [PY, str(ROOT / "scripts" / "build_pyz.py"), "-o", str(target)])
    return target


@SLOW
@pytest.mark.parametrize("version", SUPPORTED)
async def test_the_single_file_runs_on_every_python_it_promises_with_nothing_installed(version, tmp_path, request):
    python = python_or_skip(version)
    pyz = request.getfixturevalue("pyz")  # after the skip: no build for a Python that is not here
    # -E -S: no PYTHONPATH, no site-packages, so everything it needs must be inside the one file,
    # whichever Python built it. (The demo upstreams it starts find the file first on their path.)
    server = demo_server(tmp_path, python, "-E", "-S", str(pyz), outside_checkout=True)
    try:
        await exercise_demo(server)
    finally:
        stop_cleanly(server)
    version = subprocess.run([python, "-E", "-S", str(pyz), "--version"], capture_output=True, text=True, timeout=60)
    assert f"C speedups: {', '.join(SPEEDUPS) if here_has_speedups() else 'none'})" in version.stdout, version


@SLOW
@pytest.mark.parametrize("version", TOO_OLD)
def test_the_single_file_tells_an_older_python_what_it_needs_in_one_line(version, request):
    python = python_or_skip(version)
    pyz = request.getfixturevalue("pyz")
    done = subprocess.run([python, "-E", "-S", str(pyz), "--demo"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stderr
    assert done.stdout == ""
    [line] = done.stderr.splitlines()
    assert line.startswith(f"llama-swap needs Python 3.10 or newer; this is Python {version}."), line


@SLOW
def test_the_single_file_hands_back_the_exit_status(pyz):
    done = subprocess.run([PY, "-E", "-S", str(pyz), "--demo", "--config", "x.yaml"], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)
    assert done.returncode == 1 and "--demo brings its own config" in done.stderr


@SLOW
def test_the_single_file_carries_portable_code_and_speedups_for_the_common_linux_machines(pyz):
    archive = zipfile.ZipFile(pyz)
    names = archive.namelist()
    assert {"__main__.py", "llama_swap.py", "llama_swap_responder.py", "config.example.yaml", "ui_assets/index.html",
            "yaml/__init__.py", "aiohttp/__init__.py", "pynvml.py"} <= set(names)
    assert not [n for n in names if n.endswith((".so", ".pyd"))]  # loose, the code runs on any machine
    for python in SUPPORTED:
        for machine in ("x86_64", "aarch64"):
            tag = f"cp{python.replace('.', '')}-{machine}"
            with archive.open(f"speedups/{tag}.tar.xz") as packed, tarfile.open(fileobj=packed, mode="r:xz") as tar:
                suffix = f".cpython-{python.replace('.', '')}-{machine}-linux-gnu.so"
                parts = {name.split("/")[0] for name in tar.getnames() if name.endswith(suffix)}
            assert parts == set(SPEEDUPS), (tag, parts)


def run_pyz(pyz: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-E", "-S", str(pyz), *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def unpacked_copies(cache: Path) -> list[Path]:
    return sorted((cache / "llama-swap-py" / "pyz").glob("*"))


@SLOW
def test_the_first_starts_unpack_it_once_and_every_start_imports_the_compiled_copy(pyz, tmp_path):
    env = {"XDG_CACHE_HOME": str(tmp_path)}
    abandoned = tmp_path / "llama-swap-py" / "pyz" / ".unpacking-abandoned"  # by a start killed 2 hours ago
    (abandoned / "aiohttp").mkdir(parents=True)
    os.utime(abandoned, (time.time() - 7200, time.time() - 7200))
    with concurrent.futures.ThreadPoolExecutor(3) as pool:  # three first starts at once
        firsts = list(pool.map(lambda _: run_pyz(pyz, "--version", env=env), range(3)))
    for done in [*firsts, run_pyz(pyz, "--version", env=env)]:
        assert done.returncode == 0 and done.stderr == "", done.stderr
        assert f"C speedups: {', '.join(SPEEDUPS) if here_has_speedups() else 'none'})" in done.stdout, done.stdout
    [copy] = unpacked_copies(tmp_path)  # one, complete, and no scratch left beside it
    version = f"{sys.version_info[0]}{sys.version_info[1]}"
    assert copy.name.endswith(f"-cp{version}-{platform.machine()}" if here_has_speedups() else "-pure"), copy.name
    assert (copy / "__pycache__" / f"llama_swap.cpython-{version}.pyc").is_file()
    assert (copy / "aiohttp" / "__pycache__" / f"web.cpython-{version}.pyc").is_file()
    assert not (copy / "speedups").exists()
    assert not abandoned.exists()


@SLOW
def test_an_upgrade_removes_the_copies_no_start_has_used_for_30_days(pyz, tmp_path):
    """Each build unpacks into a directory of its own (about 20 MB): the first start of a new
    one removes the copies of other builds that no start has used for 30 days and no running
    server holds, and every start marks its own copy as used."""
    pyz_cache = tmp_path / "llama-swap-py" / "pyz"
    long_ago, lately = time.time() - 31 * 86400, time.time() - 29 * 86400
    for name, when in (("0ld-cp311-x86_64", long_ago), ("0ld-cpython-311-pure", long_ago),
                       ("recent-cp311-x86_64", lately), ("running-cp311-x86_64", long_ago)):
        (pyz_cache / name / "aiohttp").mkdir(parents=True)
        (pyz_cache / name / ".in-use").write_text("")
        os.utime(pyz_cache / name, (when, when))
    env = {"XDG_CACHE_HOME": str(tmp_path)}
    with open(pyz_cache / "running-cp311-x86_64" / ".in-use") as held:  # a server started 31 days ago
        fcntl.flock(held, fcntl.LOCK_SH)
        assert run_pyz(pyz, "--version", env=env).returncode == 0
    copies = unpacked_copies(tmp_path)
    assert [c.name for c in copies if c.name.startswith(("0ld", "recent", "running"))] == \
        ["recent-cp311-x86_64", "running-cp311-x86_64"]
    [ours] = [c for c in copies if not c.name.startswith(("recent", "running"))]
    assert not list(pyz_cache.glob(".unpacking-*"))

    os.utime(ours, (long_ago, long_ago))  # a copy that was last started long ago ...
    assert run_pyz(pyz, "--version", env=env).returncode == 0
    assert ours.stat().st_mtime > lately  # ... is marked as used when it starts again


@SLOW
def test_without_a_writable_cache_it_runs_from_the_file_itself_and_says_so_once(pyz, tmp_path):
    (tmp_path / "not-a-directory").write_text("")
    done = run_pyz(pyz, "--version", env={"XDG_CACHE_HOME": str(tmp_path / "not-a-directory")})
    assert done.returncode == 0 and "C speedups: none)" in done.stdout, (done.stdout, done.stderr)
    [line] = done.stderr.splitlines()
    assert line.startswith("llama-swap.pyz: running from the file itself, without C speedups or bytecode: "
                           f"cannot unpack it into {tmp_path / 'not-a-directory'}"), line

    asked = run_pyz(pyz, "--version", env={"XDG_CACHE_HOME": str(tmp_path), "LLAMA_SWAP_PYZ_UNPACK": "0"})
    assert asked.returncode == 0 and asked.stderr == "" and "C speedups: none)" in asked.stdout
    assert unpacked_copies(tmp_path) == []


@SLOW
def test_the_single_file_prints_the_example_config_it_carries(pyz, tmp_path):
    done = subprocess.run([PY, "-E", "-S", str(pyz), "--example-config"], capture_output=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout == (ROOT / "config.example.yaml").read_bytes()


@SLOW
async def test_the_example_config_runs_from_the_single_file(pyz, tmp_path):
    await exercise_example_config(tmp_path, PY, "-E", "-S", str(pyz))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The project's wheel, built once for the module (pip fetches setuptools to build it)."""
    dist = tmp_path_factory.mktemp("dist")
    build_or_skip("building the wheel", [PY, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(dist), str(ROOT)])
    [built] = dist.glob("llama_swap_py-*.whl")
    return built


@SLOW
def test_the_wheel_carries_the_ui_the_responder_and_the_example_config(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"llama_swap.py", "llama_swap_responder.py", "ui_assets/index.html", "ui_assets/pages/playground.js",
            "ui_assets/style.css"} <= names
    assert any(n.endswith("share/llama-swap-py/config.example.yaml") for n in names)


def these_site_packages() -> list[str]:
    """The directories the packages of the environment running the tests come from (a venv's own,
    or the system's), not those of the interpreter it was made from."""
    found = [*site.getsitepackages(), *([site.getusersitepackages()] if site.ENABLE_USER_SITE else [])]
    found += [p for p in sys.path if Path(p).name in ("site-packages", "dist-packages")]
    return [p for p in dict.fromkeys(os.path.abspath(p) for p in found) if os.path.isdir(p)]


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """What `pipx install` gives: the wheel in a venv of its own. Its dependencies are borrowed
    from the environment running the tests, so this needs no network: a .pth file lists that
    environment's site-packages (the directories only; the .pth files in them, such as an
    editable install of this checkout, are not read). Returns the venv's bin directory."""
    venv = tmp_path_factory.mktemp("pipx") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=BUILD_TIMEOUT)
    python = str(venv / "bin" / "python")
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True, timeout=60).stdout.strip()
    Path(purelib, "borrowed-from-the-test-environment.pth").write_text("".join(f"{p}\n" for p in these_site_packages()))
    # --force-reinstall: the borrowed directories may hold this project already (an editable install).
    subprocess.run([python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps", "--no-index",
                    "--force-reinstall", str(wheel)], check=True, timeout=BUILD_TIMEOUT)
    return venv / "bin"


@SLOW
async def test_an_installed_wheel_serves_its_ui_and_demo_from_anywhere(installed, tmp_path):
    server = demo_server(tmp_path, str(installed / "llama-swap"), outside_checkout=True)
    try:
        await exercise_demo(server)
    finally:
        stop_cleanly(server)


@SLOW
async def test_the_example_config_runs_from_an_installed_wheel(installed, tmp_path):
    await exercise_example_config(tmp_path, str(installed / "llama-swap"))
