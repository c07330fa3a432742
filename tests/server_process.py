"""A real `python -m jaxserve.server` process on an ephemeral loopback port, for end-to-end tests.

`running_server(args, log_path)` starts it (CPU, one device), waits until `/health` is 200, yields a
`ServerProcess`, and kills it at the end whatever happened. `launch` / `wait_ready` / `stop` are its
parts, for a module that wants the server's warm-up to overlap other work. Shared by the test modules
that need a server.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Iterator

import pytest


class ServerProcess:
    def __init__(self, proc: subprocess.Popen, log_path, port: int, saw_503: bool):
        self.proc, self.log_path, self.port, self.saw_503 = proc, log_path, port, saw_503
        self.url = f"http://127.0.0.1:{port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def get_status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return None


def launch(args: list[str], log_path) -> subprocess.Popen:
    """Starts the server process (CPU, one device), logging to `log_path`; does not wait for it."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    # conftest.py asks for 8 virtual CPU devices for the sharding tests; the server needs one.
    env["XLA_FLAGS"] = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", "")).strip()
    with open(log_path, "wb") as log:
        return subprocess.Popen([sys.executable, "-m", "jaxserve.server", *args], stdout=log,
                                stderr=subprocess.STDOUT, env=env)


def wait_ready(proc: subprocess.Popen, log_path, timeout: float = 300.0,
               cls: type[ServerProcess] = ServerProcess) -> ServerProcess:
    """Waits until the launched server answers /health with 200; fails the test if it exits or times out."""
    deadline = time.monotonic() + timeout
    port, saw_503 = None, False
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
        if port is None:
            m = re.search(r"listening on http://127\.0\.0\.1:(\d+)", log_path.read_text(errors="replace"))
            port = int(m.group(1)) if m else None
        if port is not None:
            status = get_status(f"http://127.0.0.1:{port}/health")
            saw_503 = saw_503 or status == 503
            if status == 200:
                return cls(proc, log_path, port, saw_503)
        time.sleep(0.5)
    pytest.fail(f"server not healthy after {timeout} s:\n{log_path.read_text()[-4000:]}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait(30)


@contextlib.contextmanager
def running_server(args: list[str], log_path, timeout: float = 300.0,
                   cls: type[ServerProcess] = ServerProcess) -> Iterator[ServerProcess]:
    proc = launch(args, log_path)
    try:
        yield wait_ready(proc, log_path, timeout, cls)
    finally:
        stop(proc)
