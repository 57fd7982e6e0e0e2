"""What llama-swap.pyz runs first (as llama_swap_pyz, called by the file's __main__.py).

Imported from inside a zip, aiohttp and its helpers could only be their pure-Python selves: no
extension module loads from a zip, and zipimport writes no bytecode. So the first start unpacks
the file once into a cache directory (the code, the C speedups built for this Python and machine
when the file carries them, every module compiled to bytecode) and every start after that imports
from there, as an installed copy would. A machine the file has no speedups for gets the code
and the bytecode unpacked all the same. Where nothing can be unpacked (no writable cache), the
server runs from the zip as it is and says so in one line; LLAMA_SWAP_PYZ_UNPACK=0 asks for that.

The directory's name holds the build's digest, the Python and the machine: a different build or
Python gets its own, and a directory that exists is complete (it is renamed into place when done).
Every start marks its directory as used (its mtime) and holds a shared lock on a file in it for as
long as it runs; the first start of a new build removes the directories that no start has used for
UNUSED_DAYS and no running server holds, so that upgrades leave no copies behind for good.
"""

from __future__ import annotations

import os
import sys

UNUSED_DAYS = 30
IN_USE = ".in-use"  # each running server holds a shared lock on it (where there are locks: fcntl)
held: list[int] = []  # that lock's file, open for as long as this process runs


def cache_home() -> str:
    return os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")


def glibc() -> tuple[int, ...]:
    """The C library's version where it is glibc; () elsewhere (musl, macOS), where manylinux
    speedups cannot load."""
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
        return tuple(int(part) for part in version.split(".")[:2]) if name == "glibc" else ()
    except (AttributeError, OSError, TypeError, ValueError):
        return ()


def native_tag() -> str:
    """This Python and machine in the names the build gives its speedup sets: cp312-x86_64.
    A free-threaded or debug build (abiflags) loads none of them."""
    if sys.implementation.name != "cpython" or getattr(sys, "abiflags", "x") or sys.platform != "linux":
        return ""
    return "cp%d%d-%s" % (sys.version_info[0], sys.version_info[1], os.uname().machine)


def speedups_for(tags: list[str], needs_glibc: tuple[int, ...]) -> str:
    """The member of the .pyz holding the speedups for this Python and machine, or ''."""
    tag = native_tag()
    return "speedups/%s.tar.xz" % tag if tag in tags and glibc() >= needs_glibc else ""


def unpack(pyz: str, target: str, speedups: str) -> None:
    """Everything but the speedup sets, then the set for here, compiled; renamed into place."""
    import compileall
    import contextlib
    import shutil
    import tarfile
    import tempfile
    import time
    import zipfile

    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    for left in os.listdir(parent):
        path = os.path.join(parent, left)
        with contextlib.suppress(OSError):  # another start may be removing it too
            unused = time.time() - os.stat(path).st_mtime
            if left.startswith(".unpacking-"):  # scratch of a start killed while unpacking
                if unused > 3600:
                    shutil.rmtree(path)
            elif unused > UNUSED_DAYS * 86400 and not in_use(path):
                # Out of the way first, in one step: a removal cut short leaves scratch (removed
                # as above), never a copy that looks complete.
                doomed = os.path.join(parent, ".unpacking-removed-%d-%s" % (os.getpid(), left))
                os.rename(path, doomed)
                shutil.rmtree(doomed)
    scratch = tempfile.mkdtemp(prefix=".unpacking-", dir=parent)
    try:
        with zipfile.ZipFile(pyz) as archive:
            archive.extractall(scratch, [name for name in archive.namelist() if not name.startswith("speedups/")])
            if speedups:
                with archive.open(speedups) as packed, tarfile.open(fileobj=packed, mode="r:xz") as tar:
                    # Ours, so trusted; Pythons before 3.10.12 know no extraction filters.
                    tar.extractall(scratch, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
        # A module that does not compile here is compiled (or not) when imported, as installed.
        compileall.compile_dir(scratch, quiet=2, ddir=target)
        try:
            os.rename(scratch, target)
        except OSError:
            if not os.path.isdir(target):  # not another start that finished first
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def in_use(copy: str) -> bool:
    """Whether a running server holds the copy."""
    try:
        import fcntl
        fd = os.open(os.path.join(copy, IN_USE), os.O_RDONLY)
    except (ImportError, OSError):  # no locks here, or a copy that no server has held
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


def hold(copy: str) -> None:
    """Mark the copy as used now, and as in use for as long as this process runs."""
    try:
        os.utime(copy)
    except OSError:  # a cache someone else owns still serves
        pass
    try:
        import fcntl
        fd = os.open(os.path.join(copy, IN_USE), os.O_RDONLY | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        held.append(fd)
    except (ImportError, OSError):  # no locks here, or a lock file we may not make
        pass


def unpacked(pyz: str, build: str, tags: list[str], needs_glibc: tuple[int, ...]) -> str:
    """The directory to import from, unpacked now if need be; '' to run from the .pyz itself."""
    speedups = speedups_for(tags, needs_glibc)
    tag = native_tag() or "%s-%d%d" % (sys.implementation.name, sys.version_info[0], sys.version_info[1])
    target = os.path.join(cache_home(), "llama-swap-py", "pyz", "%s-%s%s" % (build, tag, "" if speedups else "-pure"))
    if not os.path.isdir(target):
        try:
            unpack(pyz, target, speedups)
        except Exception as e:  # anything at all: the zip itself still runs
            sys.stderr.write("llama-swap.pyz: running from the file itself, without C speedups or bytecode: "
                             "cannot unpack it into %s: %s (set XDG_CACHE_HOME to a writable directory)\n"
                             % (target, e))
            return ""
    hold(target)
    return target


def main(build: str, tags: list[str], needs_glibc: tuple[int, ...]) -> int:
    """Run the server, from the unpacked copy where there is one. `tags`: the speedup sets the
    file carries (cp312-x86_64, ...), each needing glibc `needs_glibc` or newer."""
    pyz = os.path.dirname(os.path.abspath(__file__))
    if os.environ.get("LLAMA_SWAP_PYZ_UNPACK", "1") != "0":
        where = unpacked(pyz, build, tags, needs_glibc)
        if where:
            sys.path.insert(0, where)
    import llama_swap

    return llama_swap.main()
