"""Build llama-swap.pyz: the whole server in one file that runs with any Python >= 3.10.

    python scripts/build_pyz.py [-o llama-swap.pyz]

Only pure-Python code goes in, so the file is not tied to the Python version or the machine it
was built on: aiohttp and its helpers from their pure-Python wheels (they fall back from their
C speedups by themselves), PyYAML's pure-Python package from its source distribution, and
nvidia-ml-py. The web UI travels inside, read through importlib.resources.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipapp
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PURE_WHEELS = ["aiohttp", "nvidia-ml-py"]  # with their dependencies
PYYAML = "pyyaml"


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "--quiet", *args], check=True)


def add_pure_wheels(app: Path, downloads: Path) -> None:
    pip("download", "--only-binary", ":all:", "--platform", "any", "--implementation", "py",
        "--python-version", "3.10", "--abi", "none", "-d", str(downloads / "wheels"), *PURE_WHEELS)
    for wheel in sorted((downloads / "wheels").glob("*.whl")):
        with zipfile.ZipFile(wheel) as archive:  # a pure wheel is installed by unpacking it
            archive.extractall(app)


def add_pure_pyyaml(app: Path, downloads: Path) -> None:
    pip("download", "--no-deps", "--no-binary", ":all:", "-d", str(downloads / "sdist"), PYYAML)
    [archive] = (downloads / "sdist").glob("*.tar.gz")
    with tarfile.open(archive) as tar:
        tar.extractall(downloads / "sdist", filter="data")
    [package] = (downloads / "sdist").glob("*/lib/yaml")
    shutil.copytree(package, app / "yaml")


def build(output: Path) -> Path:
    with tempfile.TemporaryDirectory(prefix="llama-swap-pyz-") as scratch:
        app, downloads = Path(scratch) / "app", Path(scratch) / "downloads"
        app.mkdir()
        add_pure_wheels(app, downloads)
        add_pure_pyyaml(app, downloads)
        for module in ("llama_swap.py", "llama_swap_responder.py"):  # the server, and --demo's fake upstream
            shutil.copy2(ROOT / module, app)
        shutil.copytree(ROOT / "ui_assets", app / "ui_assets", ignore=shutil.ignore_patterns("__pycache__"))
        zipapp.create_archive(app, output, interpreter="/usr/bin/env python3", main="llama_swap:main", compressed=True)
    return output


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Build the single-file llama-swap.pyz.")
    parser.add_argument("-o", "--output", type=Path, default=ROOT / "llama-swap.pyz")
    print(build(parser.parse_args().output))
