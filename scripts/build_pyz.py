"""Build llama-swap.pyz: the whole server in one file that runs with any Python >= 3.10.

    python scripts/build_pyz.py [-o llama-swap.pyz]

The code that runs is pure Python, so the file is not tied to the Python version or the machine
it was built on: aiohttp and its helpers from their pure-Python wheels (they fall back from their
C speedups by themselves), PyYAML's pure-Python package (the .py files of one of its wheels,
the same as in its source distribution; its C loader is not used), and nvidia-ml-py. The web UI
travels inside (read through importlib.resources), and config.example.yaml beside llama_swap.py
(for --example-config).

Beside that code, for speed where most servers run, speedups/<tag>.tar.xz holds the extension
modules of the very same versions of aiohttp, multidict, yarl, frozenlist and propcache, taken
from their manylinux2014 wheels, for every CPython in TARGETS on x86_64 and aarch64. The entry
point (scripts/pyz_boot.py, in the file as llama_swap_pyz) unpacks the code and the set that fits
into a cache directory on the first start; xz packs them to 70 % of what zip's deflate would.

Which Python builds it does not matter either. pip decides a wheel's conditional dependencies
(`async-timeout; python_version < "3.11"`) for the Python that runs pip, whatever
--python-version says, so the builder reads the Requires-Dist of every wheel it downloaded
itself, evaluates each marker for every Python in TARGETS (CPython on Linux), and downloads what
any of them needs, until nothing is missing. The file's own __main__.py is written in syntax
that every Python parses, so that one older than 3.10 says in one line what is needed.
"""

from __future__ import annotations

import argparse
import email.parser
import functools
import hashlib
import operator
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

try:
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet
    from packaging.utils import canonicalize_name
    from packaging.version import Version
except ImportError:  # pip, which the build needs anyway, carries its own copy
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.specifiers import SpecifierSet
    from pip._vendor.packaging.utils import canonicalize_name
    from pip._vendor.packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
TARGETS = ["3.10", "3.11", "3.12", "3.13", "3.14"]  # what the README promises; the oldest first
PURE_WHEELS = ["aiohttp", "nvidia-ml-py"]  # with their dependencies
PYYAML = "pyyaml"

SPEEDUPS = ["aiohttp", "multidict", "yarl", "frozenlist", "propcache"]  # their C parts, where they have them
MACHINES = ["x86_64", "aarch64"]
MANYLINUX = "manylinux2014"  # glibc 2.17: every Linux distribution still supported
GLIBC = (2, 17)  # what every set needs, checked by the entry point before it unpacks one
NOT_SPEEDUPS = ("_testcapi",)  # multidict's C test helper

# The zipapp's entry point. Every Python must be able to parse it, 2.7 included (no f-strings, no
# annotations), so that one too old gets a sentence rather than a SyntaxError from llama_swap.py.
MAIN = """\
# llama-swap.pyz: check the Python before importing anything that needs a newer one.
import sys

if sys.version_info < (3, 10):
    sys.stderr.write("llama-swap needs Python 3.10 or newer; this is Python %d.%d.%d (%s)\\n"
                     % (sys.version_info[0], sys.version_info[1], sys.version_info[2], sys.executable or "?"))
    sys.exit(1)

import llama_swap_pyz

sys.exit(llama_swap_pyz.main({build!r}, {speedups!r}, {glibc!r}))
"""


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "--quiet", *args], check=True)


def download_pure_wheels(wheels: Path, python: str, *requirements: str, deps: bool = True) -> None:
    pip("download", "--only-binary", ":all:", "--platform", "any", "--implementation", "py", "--python-version", python,
        "--abi", "none", *([] if deps else ["--no-deps"]), "-d", str(wheels), *requirements)


def marker_environments() -> list[dict[str, str]]:
    """The marker variables of CPython on Linux, for each Python in TARGETS (its first release and
    a late one) and each common machine."""
    return [{"implementation_name": "cpython", "implementation_version": full, "os_name": "posix",
             "platform_machine": machine, "platform_python_implementation": "CPython", "platform_release": "",
             "platform_system": "Linux", "platform_version": "", "python_full_version": full,
             "python_version": python, "sys_platform": "linux"}
            for python in TARGETS for full in (f"{python}.0", f"{python}.99") for machine in ("x86_64", "aarch64")]


@dataclass
class Wheel:
    path: Path
    name: str  # canonical
    version: Version
    requires_python: SpecifierSet
    requires: list[Requirement]

    @classmethod
    def read(cls, path: Path) -> Wheel:
        with zipfile.ZipFile(path) as archive:
            [metadata] = [n for n in archive.namelist() if n.count("/") == 1 and n.endswith(".dist-info/METADATA")]
            message = email.parser.HeaderParser().parsestr(archive.read(metadata).decode("utf-8"))
        return cls(path, canonicalize_name(message["Name"]), Version(message["Version"]),
                   SpecifierSet(message.get("Requires-Python") or ""),
                   [Requirement(line) for line in message.get_all("Requires-Dist") or []])


@dataclass
class Need:
    """What the targets ask of one project: every requirement on it, and which Pythons need it."""
    name: str
    specifiers: list[SpecifierSet] = field(default_factory=list)
    pythons: set[str] = field(default_factory=set)

    def satisfied_by(self, wheel: Wheel | None) -> bool:
        return wheel is not None and all(s.contains(wheel.version, prereleases=True) for s in self.specifiers)

    def requirement(self) -> str:
        return self.name + str(functools.reduce(operator.and_, self.specifiers, SpecifierSet()))

    def oldest_python(self) -> str:
        return min(self.pythons, key=Version)


def read_wheels(wheels: Path) -> dict[str, Wheel]:
    found: dict[str, Wheel] = {}
    for path in sorted(wheels.glob("*.whl")):
        wheel = Wheel.read(path)
        if wheel.name in found:
            raise SystemExit(f"build_pyz: two versions of {wheel.name} downloaded: "
                             f"{found[wheel.name].path.name}, {path.name}")
        found[wheel.name] = wheel
    return found


def needs(wheels: dict[str, Wheel]) -> dict[str, Need]:
    """Everything reachable from PURE_WHEELS through the downloaded wheels' dependencies, for
    any of the targets."""
    needed: dict[str, Need] = {}
    for environment in marker_environments():
        todo = [Requirement(root) for root in PURE_WHEELS]
        seen: set[tuple[str, str]] = set()
        while todo:
            requirement = todo.pop()
            name = canonicalize_name(requirement.name)
            need = needed.setdefault(name, Need(requirement.name))
            need.specifiers.append(requirement.specifier)
            need.pythons.add(environment["python_version"])
            for extra in ("", *sorted(requirement.extras)):
                if name not in wheels or (name, extra) in seen:
                    continue
                seen.add((name, extra))
                todo += [dependency for dependency in wheels[name].requires
                         if (dependency.marker.evaluate({**environment, "extra": extra})
                             if dependency.marker is not None else not extra)]
    return needed


def download_for_every_target(wheels: Path) -> None:
    """Complete what pip downloaded with what the other targets' markers ask for."""
    for _ in range(20):
        have = read_wheels(wheels)
        needed = needs(have)
        missing = {name: need for name, need in needed.items() if not need.satisfied_by(have.get(name))}
        if not missing:
            break
        by_python: dict[str, list[str]] = {}
        for name, need in missing.items():
            if name in have:  # a version that some target's requirement rules out
                have[name].path.unlink()
            # For the oldest Python that needs it, so that every Python that needs it can use it.
            by_python.setdefault(need.oldest_python(), []).append(need.requirement())
        for python, requirements in sorted(by_python.items(), key=lambda item: Version(item[0])):
            download_pure_wheels(wheels, python, *requirements, deps=False)
    else:
        raise SystemExit("build_pyz: the dependencies of the pure wheels did not settle: " +
                         ", ".join(need.requirement() for need in missing.values()))
    for name, wheel in have.items():
        if name not in needed:  # asked for only by the markers of the Python running pip
            wheel.path.unlink()
        elif unfit := sorted(python for python in needed[name].pythons
                             if not wheel.requires_python.contains(f"{python}.0", prereleases=True)):
            raise SystemExit(f"build_pyz: {wheel.path.name} (Requires-Python {wheel.requires_python}) is needed "
                             f"on Python {', '.join(unfit)} too")


def add_pure_wheels(app: Path, downloads: Path) -> None:
    wheels = downloads / "wheels"
    download_pure_wheels(wheels, TARGETS[0], *PURE_WHEELS)
    download_for_every_target(wheels)
    for wheel in sorted(wheels.glob("*.whl")):
        with zipfile.ZipFile(wheel) as archive:  # a pure wheel is installed by unpacking it
            archive.extractall(app)


def download_native_wheels(wheels: Path, python: str, machine: str, *requirements: str) -> None:
    pip("download", "--no-deps", "--only-binary", ":all:", "--platform", f"{MANYLINUX}_{machine}",
        "--implementation", "cp", "--python-version", python, "--abi", "cp" + python.replace(".", ""),
        "-d", str(wheels), *requirements)


def add_pure_pyyaml(app: Path, downloads: Path) -> None:
    """PyYAML has no pure wheel. Its binary wheels carry, beside the optional C speedup
    (yaml/_yaml*.so, which yaml/__init__.py does without), the very .py files of its source
    distribution's lib/yaml: those are taken. The source distribution itself cannot be downloaded
    without pip preparing its metadata, which installs Cython and, where no Cython wheel fits,
    compiles it: minutes of a build spent on nothing that goes in."""
    download_native_wheels(downloads / "pyyaml", TARGETS[0], MACHINES[0], PYYAML)
    [wheel] = (downloads / "pyyaml").glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(app, [n for n in archive.namelist() if n.startswith("yaml/") and n.endswith(".py")])
    if not (app / "yaml" / "__init__.py").is_file():
        raise SystemExit(f"build_pyz: no yaml package in {wheel.name}")


def speedup_set(downloads: Path, python: str, machine: str, pins: list[str]) -> Path | None:
    """The extension modules of the pinned versions for one Python and machine, as a .tar.xz of
    the paths they install to; None when no wheel of any has them. A project without a wheel for
    the target is left out of the set: its pure-Python code, in the file anyway, runs instead."""
    wheels = downloads / f"native-{python}-{machine}"
    try:
        download_native_wheels(wheels, python, machine, *pins)
    except subprocess.CalledProcessError:
        for pin in pins:
            try:
                download_native_wheels(wheels, python, machine, pin)
            except subprocess.CalledProcessError:
                print(f"build_pyz: no {MANYLINUX} wheel of {pin} for CPython {python} on {machine}: "
                      "its pure-Python code runs there", file=sys.stderr)
    packed = downloads / f"cp{python.replace('.', '')}-{machine}.tar.xz"
    with tarfile.open(packed, "w:xz") as tar:
        for wheel in sorted(wheels.glob("*.whl")):
            with zipfile.ZipFile(wheel) as archive:
                for info in archive.infolist():
                    if info.filename.endswith(".so") and not Path(info.filename).name.startswith(NOT_SPEEDUPS):
                        member = tarfile.TarInfo(info.filename)
                        member.size, member.mode = info.file_size, 0o755
                        tar.addfile(member, archive.open(info))
        found = tar.getnames()
    return packed if found else None


def add_speedups(app: Path, downloads: Path) -> list[str]:
    """speedups/<tag>.tar.xz for every target Python and machine, of the very versions whose
    pure-Python code is in the file; the tags of the sets made."""
    versions = {wheel.name: wheel.version for wheel in read_wheels(downloads / "wheels").values()}
    pins = [f"{name}=={versions[name]}" for name in SPEEDUPS if name in versions]
    (app / "speedups").mkdir()
    tags = []
    for python in TARGETS:
        for machine in MACHINES:
            packed = speedup_set(downloads, python, machine, pins)
            if packed is not None:
                shutil.copy2(packed, app / "speedups" / packed.name)
                tags.append(packed.name.removesuffix(".tar.xz"))
    return tags


def app_files(app: Path) -> list[Path]:
    return sorted(p for p in app.rglob("*") if p.is_file())


def digest(app: Path) -> str:
    """What names a build's unpacked directory: the same files give the same name."""
    hashed = hashlib.sha256()
    for path in app_files(app):
        hashed.update(path.relative_to(app).as_posix().encode() + b"\0" + path.read_bytes())
    return hashed.hexdigest()[:16]


def write_zipapp(app: Path, output: Path) -> None:
    """As zipapp writes one, but with the speedup sets stored as they are (xz already packed them)."""
    with output.open("wb") as file:
        file.write(b"#!/usr/bin/env python3\n")
        with zipfile.ZipFile(file, "w") as archive:
            for path in app_files(app):
                name = path.relative_to(app).as_posix()
                archive.write(path, name, zipfile.ZIP_STORED if name.endswith(".xz") else zipfile.ZIP_DEFLATED)
    output.chmod(0o755)


def build(output: Path) -> Path:
    with tempfile.TemporaryDirectory(prefix="llama-swap-pyz-") as scratch:
        app, downloads = Path(scratch) / "app", Path(scratch) / "downloads"
        app.mkdir()
        add_pure_wheels(app, downloads)
        add_pure_pyyaml(app, downloads)
        speedups = add_speedups(app, downloads)
        # The server, --demo's fake upstream, and the documented example (--example-config).
        for name in ("llama_swap.py", "llama_swap_responder.py", "config.example.yaml"):
            shutil.copy2(ROOT / name, app)
        shutil.copy2(ROOT / "scripts" / "pyz_boot.py", app / "llama_swap_pyz.py")
        shutil.copytree(ROOT / "ui_assets", app / "ui_assets", ignore=shutil.ignore_patterns("__pycache__"))
        (app / "__main__.py").write_text(MAIN.format(build=digest(app), speedups=speedups, glibc=GLIBC))
        write_zipapp(app, output)
    return output


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Build the single-file llama-swap.pyz.")
    parser.add_argument("-o", "--output", type=Path, default=ROOT / "llama-swap.pyz")
    print(build(parser.parse_args().output))
