"""The persistent compilation cache: a second start loads every executable, a changed model compiles afresh,
and `none` writes no executable. Each start is a fresh process (JAX opens the cache once per process)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jaxlib
import pytest

from jaxserve.config import EngineConfig
from jaxserve.server.__main__ import build_parser
from jaxserve.worker import compilation_cache

ROOT = Path(__file__).resolve().parents[2]
# One engine start on the tiny checkpoint with few step shapes; prints the cache's counters.
START = """
import json, sys
from jaxserve.config import EngineConfig
from jaxserve.engine import LLMEngine
from jaxserve.worker import compilation_cache
LLMEngine(EngineConfig(model=sys.argv[1], compilation_cache_dir=sys.argv[2], max_num_seqs=2,
                       max_num_batched_tokens=4, max_model_len=64, num_pages=16))
print("STATS", json.dumps(compilation_cache.stats()))
"""


def start(checkpoint, setting: str, env: dict) -> dict[str, int]:
    out = subprocess.run([sys.executable, "-c", START, str(checkpoint), setting], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(re.search(r"^STATS (.*)$", out.stdout, re.MULTILINE).group(1))


@pytest.fixture
def env(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAXSERVE_CACHE=str(tmp_path / "cache"),
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    env["XLA_FLAGS"] = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", "")).strip()
    return env


def test_second_start_loads_everything_and_a_changed_model_compiles_afresh(tiny_checkpoint, env, tmp_path):
    folder = tmp_path / "cache" / "xla" / f"jax-{jax.__version__}-jaxlib-{jaxlib.__version__}-cpu"
    first = start(tiny_checkpoint, "auto", env)
    stored = sorted(p.name for p in folder.iterdir())
    assert first["hits"] == 0 and first["requests"] == len(stored) > 0
    steps = [n for n in stored if n.startswith("jit__step-")]
    assert len(steps) == 3  # the step shapes of max_num_batched_tokens=4: 1x1, 2x2, 4x2

    second = start(tiny_checkpoint, "auto", env)
    assert second == {"requests": first["requests"], "hits": first["requests"]}  # nothing compiled
    assert sorted(p.name for p in folder.iterdir()) == stored  # nothing written

    # Same shapes, one constant of the model changed: no step may load an executable built for the old one.
    changed = tmp_path / "changed"
    shutil.copytree(tiny_checkpoint, changed)
    config = json.loads((changed / "config.json").read_text())
    config["model"]["rms_norm_eps"] *= 2
    (changed / "config.json").write_text(json.dumps(config))
    third = start(changed, "auto", env)
    assert third["hits"] <= third["requests"] - len(steps)
    assert len([p for p in folder.iterdir() if p.name.startswith("jit__step-")]) == 2 * len(steps)


def test_none_reads_and_writes_nothing(tiny_checkpoint, env, tmp_path):
    env["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path / "jax_env")  # "none" wins over JAX's own variable too
    assert start(tiny_checkpoint, "none", env) == {"requests": 0, "hits": 0}
    # NOTE: the native CPU kernels are built under the cache's kernels/ (a build, not compiled executables).
    written = {p.name for p in (tmp_path / "cache").iterdir()} if (tmp_path / "cache").exists() else set()
    assert written <= {"kernels"} and not (tmp_path / "jax_env").exists()


def test_where_the_cache_lives(monkeypatch, tmp_path):
    monkeypatch.setenv("JAXSERVE_CACHE", str(tmp_path))
    tail = f"jax-{jax.__version__}-jaxlib-{jaxlib.__version__}-{jax.default_backend()}"
    assert compilation_cache.resolve_dir("auto") == tmp_path / "xla" / tail
    assert compilation_cache.resolve_dir(str(tmp_path / "elsewhere")) == tmp_path / "elsewhere" / tail
    assert compilation_cache.resolve_dir("none") is None and compilation_cache.resolve_dir("None") is None
    with pytest.raises(ValueError, match="compilation_cache_dir"):
        EngineConfig(compilation_cache_dir=" ")


def test_server_flag():
    assert build_parser().parse_args([]).compilation_cache_dir == "auto"
    assert build_parser().parse_args(["--compilation-cache-dir", "none"]).compilation_cache_dir == "none"
    assert "compiled executables" in build_parser().format_help()
