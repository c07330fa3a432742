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


def test_datasheet_floor_of_llama3_8b_by_hand():
    from jaxserve.bench.roofline import datasheet_decode_floors
    from jaxserve.config import ModelConfig

    cfg = ModelConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
                      num_kv_heads=8, head_dim=128, rope_theta=5e5, max_position_embeddings=8192)
    row = next(r for r in datasheet_decode_floors({"8b": cfg}, (1,), 2048) if r["chip"] == "H100 SXM")
    kv_per_token = 32 * 2 * 8 * 128 * 2  # layers x (K, V) x KV heads x head_dim x bf16
    nbytes = 8_030_261_248 * 2 + (2048 + 1) * kv_per_token  # weights + the context's KV + the new token's
    assert row["bound"] == "memory" and abs(row["tpot_ms"] - 1e3 * nbytes / 3.35e12) < 1e-9
