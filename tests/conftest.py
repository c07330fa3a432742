"""Test set-up and the fakes tests share.

Platform: CPU with 8 virtual devices (for sharding tests), set before anything imports JAX. Shared fakes
and fixtures, so no test module imports another:

  * `FakeEngine` and `serving(...)`: the engine's add_request / abort / stream interface with outputs
    computable by hand, behind the real aiohttp app (no JAX, no model). One token per ASCII character; the
    next token after a context is 97 + (sum of the context's token ids + choice index) % 26.
  * `tiny_checkpoint`: a tiny random Llama saved as a checkpoint with SmolLM2's tokenizer.

This module imports no JAX at the top: JAX is imported inside the fixtures that need it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import math
import os
import queue
import re
import shutil
import threading
import time
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("JAX_PLATFORMS", "cpu")
flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count=8".strip()

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from aiohttp.test_utils import TestClient, TestServer  # noqa: E402

from jaxserve.config import ModelConfig  # noqa: E402
from jaxserve.core.outputs import RequestDelta, RequestStream, TokenLogprob  # noqa: E402
from jaxserve.core.sampling_params import SamplingParams, SamplingParamsError  # noqa: E402
from jaxserve.core.scheduler import SchedulerStats  # noqa: E402
from jaxserve.engine_client import ITERATION_TOKEN_BUCKETS, EngineHealth, EngineStatsSnapshot, bucket_index  # noqa: E402, E501
from jaxserve.server.app import STATE, ServingConfig, create_app  # noqa: E402

# ---------------------------------------------------------------------------- the fake engine

FAKE_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


def next_token(context: list[int], index: int = 0) -> int:
    return 97 + (sum(context) + index) % 26


def expected(prompt: str | list[int], k: int, index: int = 0) -> str:
    ctx = [ord(c) for c in prompt] if isinstance(prompt, str) else list(prompt)
    out = ""
    for _ in range(k):
        ctx.append(next_token(ctx, index))
        out += chr(ctx[-1])
    return out


class FakeTokenizer:
    vocab_size = 128
    bos_token = eos_token = None
    chat_template = FAKE_TEMPLATE

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [ord(c) % 128 for c in text]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(chr(i) for i in ids)


@dataclasses.dataclass(eq=False)
class _Req:
    stream: RequestStream
    index: int
    prompt: list[int]
    params: SamplingParams
    script: str | None
    output: list[int] = dataclasses.field(default_factory=list)
    scheduled: float | None = None
    pages: int = 0


class FakeKV:
    def __init__(self, num_pages: int, page_size: int):
        self.page_size = page_size
        self.pool = SimpleNamespace(num_used_pages=0)
        self.num_usable_pages = num_pages - 1
        self.prefix_hit_rate, self.prefix_queries, self.prefix_hits = 0.0, 0, 0

    @property
    def usage(self) -> float:
        return self.pool.num_used_pages / self.num_usable_pages


class FakeEngine:
    """Steps in a thread like the real engine. `scripts` maps a prompt text to the exact output text to emit
    (a NUL character in it fails the request with finish_reason "error" at that point; a request's stop string
    ends it where the script would write it)."""

    def __init__(self, *, max_model_len: int = 256, num_pages: int = 65, page_size: int = 16, max_num_seqs: int = 4,
                 step_delay: float = 0.0, first_token_delay: float = 0.0):
        self.tokenizer = FakeTokenizer()
        self.max_model_len = max_model_len
        self.default_sampling: dict = {}
        self.max_num_seqs = max_num_seqs
        self.step_delay, self.first_token_delay = step_delay, first_token_delay
        self.kv_cache = FakeKV(num_pages, page_size)
        self.scheduler = SimpleNamespace(running=[], waiting=[], num_preemptions=0)
        self.stats = SimpleNamespace(steps=0, tokens=0, step_seconds=0.0,
                                     iteration=[0] * (len(ITERATION_TOKEN_BUCKETS) + 1))
        self.warmup_seconds = 0.0
        self.scripts: dict[str, str] = {}
        self.added: list[tuple[str, list[int], SamplingParams]] = []
        self.aborted: list[str] = []
        self._inbox: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.progress_time = time.monotonic()
        self.hang = threading.Event()  # set: the next step hangs until it is cleared (a stuck device)

    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        wanted = len(prompt_ids) + (params.max_tokens or 1)
        if wanted > self.max_model_len:
            raise ValueError(f"This model's maximum context length is {self.max_model_len} tokens. However, you "
                             f"requested {wanted} tokens ({len(prompt_ids)} in the prompt, {params.max_tokens} for "
                             f"the completion).")
        for token in params.logit_bias or {}:
            if not 0 <= token < 128:
                raise SamplingParamsError("logit_bias", f"token id {token} is outside the vocabulary [0, 128)")

    def stats_snapshot(self) -> EngineStatsSnapshot:
        kv = self.kv_cache
        sched = SchedulerStats(
            num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
            num_preemptions=self.scheduler.num_preemptions, num_steps=self.stats.steps,
            num_scheduled_tokens=self.stats.tokens, last_step_tokens=0, prefix_cache_queries=kv.prefix_queries,
            prefix_cache_hits=kv.prefix_hits, prefix_cache_hit_rate=kv.prefix_hit_rate, kv_usage=kv.usage,
            kv_used_pages=kv.pool.num_used_pages, kv_total_pages=kv.num_usable_pages, kv_waste_tokens=0)
        return EngineStatsSnapshot(sched, self.stats.steps, self.stats.tokens, self.stats.step_seconds,
                                   host_fraction=0.0, warmup_seconds=self.warmup_seconds,
                                   iteration_token_counts=tuple(self.stats.iteration))

    def add_request(self, prompt, params: SamplingParams, *, request_id: str, priority: int = 0) -> RequestStream:
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        self.validate(ids, params)
        self.added.append((request_id, ids, params))
        stream = RequestStream(request_id, params.n, ids)
        script = self.scripts.get(self.tokenizer.decode(ids))
        for i in range(params.n):
            self._inbox.put(("add", _Req(stream, i, ids, params, script)))
        return stream

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))

    def health(self) -> EngineHealth:
        alive = self._thread is None or self._thread.is_alive()
        return EngineHealth(alive, bool(self.scheduler.running or self.scheduler.waiting or not self._inbox.empty()),
                            time.monotonic() - self.progress_time)

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(5)

    # ------------------------------------------------------------------ the engine thread

    def _loop(self) -> None:
        sched = self.scheduler
        while not self._stop.is_set():
            self.progress_time = time.monotonic()
            while not self._inbox.empty():
                command, arg = self._inbox.get()
                if command == "add":
                    sched.waiting.append(arg)
                    continue
                self.aborted.append(arg)
                for req in [r for r in sched.running + sched.waiting if r.stream.request_id == arg]:
                    self._finish(req, [], "abort")
            while sched.waiting and len(sched.running) < self.max_num_seqs:
                req = sched.waiting.pop(0)
                req.scheduled = time.monotonic()
                sched.running.append(req)
                self._resize(req)
            if not sched.running:
                time.sleep(0.001)
                continue
            time.sleep(self.step_delay)
            while self.hang.is_set() and not self._stop.is_set():
                time.sleep(0.01)
            self.stats.steps += 1
            before = self.stats.tokens
            for req in list(sched.running):
                if time.monotonic() - req.scheduled < self.first_token_delay:
                    continue
                self._step(req)
            self.stats.iteration[bucket_index(self.stats.tokens - before, ITERATION_TOKEN_BUCKETS)] += 1

    def _step(self, req: _Req) -> None:
        if req.script is not None:
            # A stop string where the script goes on: finish before it, as the engine does (text held back).
            rest = req.script[len(req.output):]
            hit = next((s for s in req.params.stop or () if rest.startswith(s)), None)
            if hit is not None:
                self._send(req, [], "", None, "stop", stop_reason=hit)
                self._release(req)
                return
            ch = req.script[len(req.output)]
            if ch == "\0":
                self._finish(req, [], "error", error="the fake engine failed")
                return
            token = ord(ch)
        else:
            token = next_token(req.prompt + req.output, req.index)
        req.output.append(token)
        self.stats.tokens += 1
        self._resize(req)
        n = req.params.logprobs
        logprobs = None
        if n is not None:
            top = [(token, -0.25)] + [(97 + (token - 97 + j) % 26, -1.0 - j) for j in range(1, n)]
            logprobs = [TokenLogprob(token, -0.25, top[:n])]
        done = len(req.output) >= req.params.max_tokens or (req.script is not None and
                                                             len(req.output) == len(req.script))
        reason = ("stop" if req.script is not None and len(req.output) == len(req.script) else "length") if done \
            else None
        self._send(req, [token], chr(token), logprobs, reason)
        if done:
            self._release(req)

    def _finish(self, req: _Req, tokens, reason: str, error: str | None = None) -> None:
        self._send(req, tokens, "", None, reason, error)
        self._release(req)

    def _release(self, req: _Req) -> None:
        for lst in (self.scheduler.running, self.scheduler.waiting):
            if req in lst:
                lst.remove(req)
        self.kv_cache.pool.num_used_pages -= req.pages
        req.pages = 0

    def _resize(self, req: _Req) -> None:
        pages = math.ceil((len(req.prompt) + len(req.output)) / self.kv_cache.page_size)
        self.kv_cache.pool.num_used_pages += pages - req.pages
        req.pages = pages

    def _send(self, req: _Req, tokens, text, logprobs, reason, error=None, stop_reason=None) -> None:
        first = req.scheduled if not req.output or len(req.output) == len(tokens) else None
        req.stream.put(RequestDelta(
            request_id=req.stream.request_id, index=req.index, new_token_ids=list(tokens), new_text=text,
            logprobs=logprobs, finished=reason is not None, finish_reason=reason, error=error,
            num_prompt_tokens=len(req.prompt), num_output_tokens=len(req.output), time=time.monotonic(),
            first_scheduled_time=first, stop_reason=stop_reason))


# ---------------------------------------------------------------------------- harness

@contextlib.asynccontextmanager
async def serving(engine: FakeEngine | None = None, *, ready: bool = True, **config):
    engine = engine or FakeEngine()
    engine.start()
    config.setdefault("served_model_name", "fake")
    app = create_app(ServingConfig(**config), engine if ready else None)
    client = TestClient(TestServer(app))
    await client.start_server()
    client.engine, client.state = engine, app[STATE]
    try:
        yield client
    finally:
        await client.close()
        engine.shutdown()


def async_test(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        asyncio.run(asyncio.wait_for(fn(*args, **kwargs), 30))
    return wrapper


async def read_sse(resp) -> tuple[list, list[str]]:
    """(events: parsed JSON objects or the string "[DONE]", comment lines)."""
    events, comments = [], []
    async for raw in resp.content:
        line = raw.decode().rstrip("\n")
        if line.startswith(":"):
            comments.append(line)
        elif line.startswith("data: "):
            data = line[6:]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events, comments


def drop_model_name(line: str) -> str:
    """A /metrics sample line without its `model_name` label (the label every series carries)."""
    name, brace, rest = line.partition("{")
    if not brace:
        return line
    labels, _, value = rest.partition("} ")
    kept = [kv for kv in re.findall(r'\w+="[^"]*"', labels) if not kv.startswith("model_name=")]
    return f"{name}{{{','.join(kept)}}} {value}" if kept else f"{name} {value}"


async def metric(client, name: str) -> float | None:
    """One sample's value; `name` may leave out the `model_name` label every series carries."""
    text = await (await client.get("/metrics")).text()
    for line in text.splitlines():
        if "model_name=" not in name:
            line = drop_model_name(line)
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return None


def error_of(body: dict) -> dict:
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


# ---------------------------------------------------------------------------- a tiny random checkpoint

TINY = ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=8,
                   num_kv_heads=4, head_dim=8, rope_theta=500.0, max_position_embeddings=256)


def random_weights(cfg: ModelConfig, seed: int):
    """Numpy weights (numpy: no compile per weight shape), scaled so that logits are far from uniform."""
    from jaxserve.model import llama
    from jaxserve.model.weight_info import from_named, named

    rng = np.random.default_rng(seed)
    infos = llama.weight_info(cfg)
    by_name = named(infos)
    # NOTE: drawn in the order the weights were once listed (final_norm before the layers): seeds keep their values.
    order = sorted(by_name, key=lambda n: {"embed": 0, "final_norm": 1, "lm_head": 3}.get(n, 2))
    return from_named(infos, {n: (1 + 0.1 * rng.standard_normal(by_name[n].shape) if by_name[n].norm
                                  else 0.2 * rng.standard_normal(by_name[n].shape)).astype(np.float32)
                              for n in order})


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """The tiny model saved as a checkpoint with SmolLM2's tokenizer (vocabulary widened to match it)."""
    from jaxserve.model.checkpoint import read_config, save_checkpoint
    from jaxserve.model_registry import resolve_model

    smol = Path(resolve_model("SmolLM2-135M-Instruct"))
    cfg = dataclasses.replace(TINY, vocab_size=read_config(smol)[0].vocab_size)
    dest = tmp_path_factory.mktemp("tiny_ckpt")
    save_checkpoint(dest, cfg, random_weights(cfg, 11), source={"format": "random"})
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smol / name, dest / name)
    return dest
