"""scripts/device_check.py on a host without an accelerator: says so and exits 0 at once, writing nothing."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_without_an_accelerator_it_says_so_and_exits_0(tmp_path):
    out = tmp_path / "check.json"
    t0 = time.monotonic()
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "device_check.py"), "--out", str(out)],
                          env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "no accelerator here (JAX backend: cpu)" in done.stdout
    assert time.monotonic() - t0 < 60  # one JAX import in a child, nothing else
    assert not out.exists()
