"""`scripts/export_step.py`: the serving step lowered for TPU / CUDA on CPU, every bucket holding the Pallas attention.

Small cases only (the full table, Llama-3-8B at TP 1 / 4 / 8, is in docs/kernels.md): the default model for
two buckets through the script, and tiny configs on the 8 fake CPU devices of conftest in-process.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jaxserve.config import EngineConfig
from jaxserve.worker import export

from conftest import TINY

ROOT = Path(__file__).parents[2]


def test_script_lowers_the_default_model_for_tpu():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "scripts/export_step.py", "--platform", "tpu", "--max-buckets", "2",
                           "--max-num-seqs", "4", "--max-num-batched-tokens", "32", "--max-model-len", "256",
                           "--num-pages", "64"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    summary = json.loads(lines[-1])
    assert summary["platform"] == "tpu" and summary["buckets"] == summary["lowered"] == 2
    assert summary["pallas_calls"] == [1, 1]
    assert all("tpu_ragged_paged_attention" in line for line in lines[:-1])


@pytest.mark.parametrize("platform,kernel", [("tpu", "tpu_ragged_paged_attention"),
                                             ("cuda", "ragged_paged_attention")])
def test_tp2_int8_pages_lower_with_the_kernel_per_device(platform, kernel):
    cfg = dataclasses.replace(TINY, head_dim=16)  # Triton needs head_dim a power of two >= 16
    config = EngineConfig(dtype="bfloat16", tensor_parallel_size=2, kv_cache_dtype="int8", max_num_seqs=2,
                          max_num_batched_tokens=4, max_model_len=64, num_pages=16)
    reports = export.export_step(config, cfg, platform)
    assert [(r.num_tokens, r.num_rows) for r in reports] == [(1, 1), (2, 2), (4, 2)]
    for r in reports:
        assert r.error is None and r.devices == 2 and r.pallas_calls == 1, r.line()
        assert any(k.startswith(kernel) for k in r.kernels), r.line()


def test_a_bucket_without_the_kernel_is_reported_as_failed():
    """head_dim 8 breaks Triton's rules: every CUDA bucket fails, naming why (the script then exits 1)."""
    config = EngineConfig(dtype="bfloat16", max_num_seqs=1, max_num_batched_tokens=1, max_model_len=64,
                          num_pages=16)
    (report,) = export.export_step(config, TINY, "cuda")
    assert report.error is not None and "head_dim a power of two >= 16" in report.error
    assert "FAILED" in report.line()
