"""A real `python -m jaxserve.server` process on an ephemeral loopback port, for end-to-end tests.

`running_server(args, log_path)` starts it (CPU, one device), waits until `/health` is 200, yields a
`ServerProcess`, and kills it at the end whatever happened. Shared by the test modules that need one.
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


@contextlib.contextmanager
def running_server(args: list[str], log_path, timeout: float = 300.0,
                   cls: type[ServerProcess] = ServerProcess) -> Iterator[ServerProcess]:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    # conftest.py asks for 8 virtual CPU devices for the sharding tests; the server needs one.
    env["XLA_FLAGS"] = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", "")).strip()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "jaxserve.server", *args], stdout=log,
                                stderr=subprocess.STDOUT, env=env)
    try:
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
                    break
            time.sleep(0.5)
        else:
            pytest.fail(f"server not healthy after {timeout} s:\n{log_path.read_text()[-4000:]}")
        yield cls(proc, log_path, port, saw_503)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait(30)
