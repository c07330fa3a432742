"""Two `python -m jaxserve.server --distributed` processes on loopback, one CPU device each, the tiny model split
TP=2 across them (CPU collectives over gloo): one request served end to end must equal the single-process
output, with float and with int8 weights (quantized at load, scales split like their values).
Process 0 serves HTTP and broadcasts each step; process 1 follows and exits when process 0 stops.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from jaxserve import LLM, SamplingParams

pytestmark = pytest.mark.slow

STARTUP_TIMEOUT = 240.0
PROMPT, MAX_TOKENS = "Hello there, my name is", 8
# One step shape to compile: one token a step (the prompt is prefilled a token at a time).
ENGINE_ARGS = ["--max-num-seqs", "1", "--max-num-batched-tokens", "1", "--max-model-len", "64", "--num-pages", "32"]


def cpu_collectives_missing() -> str | None:
    """Why this jaxlib cannot run multi-process CPU collectives, or None when it can."""
    try:
        from jax._src.lib import _jax
    except ImportError as e:
        return f"cannot inspect jaxlib ({e})"
    if not hasattr(_jax, "make_gloo_tcp_collectives"):
        return "the installed jaxlib has no gloo CPU collectives (make_gloo_tcp_collectives)"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.loads(resp.read())


def health(port: int) -> int | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as resp:
            return resp.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return None


@pytest.mark.parametrize("quantization", ["none", "int8"])
def test_two_processes_serve_one_request_like_one_process(tiny_checkpoint, tmp_path, quantization):
    reason = cpu_collectives_missing()
    if reason:
        print(f"skipping the two-process test: {reason}")
        pytest.skip(reason)

    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", JAX_NUM_PROCESSES="2")
    env["XLA_FLAGS"] = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", "")).strip()
    common = ["--model", str(tiny_checkpoint), "--tensor-parallel-size", "2", "--distributed",
              "--coordinator-address", f"127.0.0.1:{free_port()}", *ENGINE_ARGS, "--quantization", quantization,
              "--no-guardrails",
              "--host", "127.0.0.1", "--port", "0"]
    logs = [tmp_path / f"process{i}.log" for i in range(2)]
    procs = []
    try:
        for i, log_path in enumerate(logs):
            # The process count comes from $JAX_NUM_PROCESSES (the environment path); the id from the flag.
            with open(log_path, "wb") as log:
                procs.append(subprocess.Popen([sys.executable, "-m", "jaxserve.server", *common, "--process-id",
                                               str(i)], stdout=log, stderr=subprocess.STDOUT, env=env))
        port, deadline = None, time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            for p, log_path in zip(procs, logs):
                if p.poll() is not None:
                    pytest.fail(f"{log_path.name} exited with {p.returncode}:\n{log_path.read_text()[-4000:]}")
            m = re.search(r"listening on http://127\.0\.0\.1:(\d+)", logs[0].read_text(errors="replace"))
            port = int(m.group(1)) if m else None
            if port is not None and health(port) == 200:
                break
            time.sleep(0.5)
        else:
            pytest.fail(f"not healthy after {STARTUP_TIMEOUT} s:\n{logs[0].read_text()[-3000:]}\n"
                        f"{logs[1].read_text()[-3000:]}")
        served = post(f"http://127.0.0.1:{port}/v1/completions",
                      {"model": tiny_checkpoint.name, "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0})

        procs[0].send_signal(signal.SIGTERM)  # drains, then tells the follower to stop
        assert [p.wait(60) for p in procs] == [0, 0], [log.read_text()[-2000:] for log in logs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(30)
    follower_log = logs[1].read_text()
    assert "process 1 of 2" in follower_log and "the leader stopped" in follower_log
    assert "listening on" not in follower_log  # only process 0 serves HTTP
    assert all(f"quantization {quantization}:" in log.read_text() for log in logs)  # both loaded it so

    engine_kwargs = {a.removeprefix("--").replace("-", "_"): int(v)
                     for a, v in zip(ENGINE_ARGS[::2], ENGINE_ARGS[1::2])}
    llm = LLM(str(tiny_checkpoint), warmup=False, quantization=quantization, **engine_kwargs)
    local = llm.generate([PROMPT], SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0), use_tqdm=False)[0]
    assert served["usage"]["completion_tokens"] == len(local.outputs[0].token_ids) == MAX_TOKENS
    assert served["choices"][0]["text"] == local.outputs[0].text
