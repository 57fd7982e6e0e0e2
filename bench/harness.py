"""What the benchmarks share: a free port, and llama-swap started on a config and stopped again."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def running_llama_swap(config: dict, prefix: str) -> Iterator[tuple[str, Path]]:
    """`python -m llama_swap` on `config` (written as JSON, which is YAML) and a free port, until
    the block ends (then SIGTERM, which stops its upstreams): its URL and its log file."""
    with tempfile.TemporaryDirectory(prefix=prefix) as scratch:
        work = Path(scratch)
        (work / "config.yaml").write_text(json.dumps(config))
        port, log_path = free_port(), work / "llama-swap.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen([sys.executable, "-m", "llama_swap", "--config", str(work / "config.yaml"),
                                     "--listen", f"127.0.0.1:{port}"], cwd=ROOT, stdout=log,
                                    stderr=subprocess.STDOUT, env={**os.environ, "XDG_RUNTIME_DIR": scratch})
            try:
                deadline = time.monotonic() + 30
                while b"listening on" not in log_path.read_bytes():
                    if time.monotonic() > deadline or proc.poll() is not None:
                        raise RuntimeError(log_path.read_text())
                    time.sleep(0.1)
                yield f"http://127.0.0.1:{port}", log_path
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(60)
