"""Host overhead of the engine loop: the real engine over a stand-in model step that costs the device nothing.

Everything on the host is the real thing: the scheduler, the KV cache manager, `build_step_inputs`,
`build_sampling_metadata`, the runner's dispatch/collect, the detokenizer and stop strings, the request
streams, and with `server=True` the aiohttp app streaming SSE to loopback clients. Only the jitted step is
replaced (`StandInRunner._run`): the next token is a deterministic function of each row's last token and
position, computed in numpy. `device_ms > 0` makes the stand-in device take that long per step, queued as a
real accelerator queues dispatched work, so that one can see whether the device ever waits for the host.

Numbers (per concurrent-row count R, every request decoding):
  * host_ms_per_step: median wall time of one engine step minus the time it sat blocked on the device;
  * host_cpu_ms_per_step: median CPU time of the engine thread per step (immune to the OS descheduling the
    process on a loaded machine, but blind to time lost waiting for the GIL);
  * steps_per_s: engine steps per second of wall time over the measured window;
  * device_idle_ms_per_step (device_ms > 0): the mean time the stand-in device sat idle between steps.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import statistics
import time
from types import SimpleNamespace

import numpy as np

from jaxserve.config import EngineConfig
from jaxserve.core.sampling_params import SamplingParams
from jaxserve.model.step_inputs import StepBuckets
from jaxserve.worker.model_runner import NUM_LOGPROBS, ModelRunner

# The stand-in's tokens come from this id range (plain word pieces in SmolLM2's vocabulary: no special tokens).
FIRST_TOKEN, NUM_TOKENS = 1000, 20000


@dataclasses.dataclass
class _StandInOut:
    token_ids: np.ndarray  # [R]
    logprobs: np.ndarray  # [R]
    top_ids: np.ndarray  # [R, NUM_LOGPROBS]
    top_logprobs: np.ndarray  # [R, NUM_LOGPROBS]
    ready_at: float  # time.perf_counter() when the stand-in device finishes the step


class StandInRunner(ModelRunner):
    """A `ModelRunner` whose host half is real and whose device step is free (or costs `device_ms`)."""

    def __init__(self, *, max_num_seqs: int, max_num_batched_tokens: int, page_size: int = 16,
                 max_model_len: int = 4096, num_pages: int = 8192, vocab_size: int = 49152,
                 device_ms: float = 0.0):
        # NOTE: ModelRunner.__init__ is skipped on purpose: no weights, no KV pages, no compile.
        self.page_size = page_size
        self.max_model_len = max_model_len
        self.max_pages_per_seq = -(-max_model_len // page_size)
        self.num_pages = num_pages
        self.model_config = SimpleNamespace(vocab_size=vocab_size)
        self.spec_tokens = 0
        self.buckets = StepBuckets(max_num_seqs, max_num_batched_tokens, 1)
        self._channel = None
        self.device_seconds = device_ms / 1000
        self.device_free_at = 0.0
        self.device_idle_seconds = 0.0  # device waiting for the host, summed over steps
        self.blocked_seconds = 0.0  # host waiting for the device, summed over steps
        self.num_steps = 0

    def warmup(self) -> float:
        return 0.0

    def num_compiled(self) -> int:
        return 0

    def close(self) -> None:
        pass

    def _run(self, step, md, plp=None):
        last = np.asarray(step.token_ids)[np.asarray(step.logits_indices)].astype(np.int64)  # [R]
        pos = np.asarray(md.positions).astype(np.int64)
        tokens = (FIRST_TOKEN + (last * 7919 + pos * 104729) % NUM_TOKENS).astype(np.int32)
        r = len(tokens)
        now = time.perf_counter()
        if self.num_steps and now > self.device_free_at:
            self.device_idle_seconds += now - self.device_free_at
        self.num_steps += 1
        self.device_free_at = max(now, self.device_free_at) + self.device_seconds
        return _StandInOut(tokens, np.zeros(r, np.float32), np.zeros((r, NUM_LOGPROBS), np.int32),
                           np.zeros((r, NUM_LOGPROBS), np.float32), self.device_free_at)

    def _fetch(self, out: _StandInOut):
        wait = out.ready_at - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
            self.blocked_seconds += wait
        return out.token_ids, out.logprobs, out.top_ids, out.top_logprobs


def request_mix(num: int, max_tokens: int, seed: int = 0) -> list[tuple[list[int], SamplingParams]]:
    """`num` prompts of 24-40 tokens: half greedy, a quarter seeded top-p, a quarter with stop strings."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(num):
        prompt = [int(t) for t in rng.integers(FIRST_TOKEN, FIRST_TOKEN + NUM_TOKENS, int(rng.integers(24, 41)))]
        kind = i % 4
        if kind == 1:
            params = SamplingParams(max_tokens=max_tokens, temperature=0.8, top_p=0.95, seed=i, ignore_eos=True)
        elif kind == 3:
            params = SamplingParams(max_tokens=max_tokens, temperature=0.0, stop=["<|stop here|>", "\n\n\n\n"],
                                    ignore_eos=True)
        else:
            params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        out.append((prompt, params))
    return out


def build_engine(rows: int, *, max_num_seqs: int = 64, device_ms: float = 0.0, tokenizer=None):
    from jaxserve.engine import LLMEngine

    max_num_seqs = max(max_num_seqs, rows)
    config = EngineConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max(512, max_num_seqs))
    runner = StandInRunner(max_num_seqs=max_num_seqs, max_num_batched_tokens=config.max_num_batched_tokens,
                           page_size=config.block_size, device_ms=device_ms)
    if tokenizer is None:
        tokenizer = default_tokenizer()
    return LLMEngine(config, warmup=False, runner=runner, tokenizer=tokenizer)


def default_tokenizer():
    """SmolLM2's tokenizer (the engine's default model), so detokenization costs what it costs in serving."""
    from jaxserve.model_registry import resolve_model
    from jaxserve.text.tokenizer import load_tokenizer

    return load_tokenizer(resolve_model(EngineConfig.model))


def _summary(rows: int, step_host: list[float], step_cpu: list[float], steps: int, seconds: float,
             idle_seconds: float) -> dict:
    return {"rows": rows, "steps": steps, "seconds": seconds,
            "host_cpu_ms_per_step": 1000 * statistics.median(step_cpu) if step_cpu else None,
            "host_ms_per_step": 1000 * statistics.median(step_host) if step_host else None,
            "host_ms_per_step_mean": 1000 * statistics.fmean(step_host) if step_host else None,
            "steps_per_s": steps / seconds if seconds else 0.0,
            "device_idle_ms_per_step": 1000 * idle_seconds / max(1, steps)}


def run_in_process(rows: int, *, steps: int = 200, device_ms: float = 0.0, tokenizer=None,
                   max_num_seqs: int = 64) -> dict:
    """`rows` requests decode together; times `steps` engine steps once every prompt is computed."""
    engine = build_engine(rows, max_num_seqs=max_num_seqs, device_ms=device_ms, tokenizer=tokenizer)
    runner = engine.runner
    streams = [engine.add_request(p, sp) for p, sp in request_mix(rows, max_tokens=steps + 64)]
    for _ in range(64):  # prefill until every request decodes
        engine.step()
        for s in streams:
            for _ in s.ready():
                pass
        if len(engine.scheduler.running) == rows and all(
                r.num_computed_tokens >= r.num_prompt_tokens for r in engine.scheduler.running):
            break
    step_host, step_cpu = [], []
    idle0 = runner.device_idle_seconds
    t_start = time.perf_counter()
    for _ in range(steps):
        blocked0 = runner.blocked_seconds
        t0, c0 = time.perf_counter(), time.thread_time()
        engine.step()
        step_cpu.append(time.thread_time() - c0)
        step_host.append(time.perf_counter() - t0 - (runner.blocked_seconds - blocked0))
        for s in streams:
            for _ in s.ready():
                pass
    seconds = time.perf_counter() - t_start
    result = _summary(rows, step_host, step_cpu, steps, seconds, runner.device_idle_seconds - idle0)
    for s in streams:
        engine.abort(s.request_id)
    while engine.has_unfinished():
        engine.step()
    return result


def run_server(rows: int, *, max_tokens: int = 200, device_ms: float = 0.0, tokenizer=None,
               max_num_seqs: int = 64, timeout: float = 120.0, guardrails: bool = True) -> dict:
    """`rows` loopback clients stream /v1/completions from the real app over the engine in its thread.

    The steps measured are those in which all `rows` requests decode (clients start a little apart, and
    end a little apart).
    NOTE: the clients run in this process, so they compete with the server and the engine for the GIL as
    a co-located load generator would; the numbers are a pessimistic bound on the server's own cost.
    """
    import aiohttp
    from aiohttp import web

    from jaxserve.server.app import ServingConfig, create_app
    from jaxserve.server.guardrails import GuardrailConfig

    engine = build_engine(rows, max_num_seqs=max_num_seqs, device_ms=device_ms, tokenizer=tokenizer)
    runner = engine.runner
    mix = request_mix(rows, max_tokens=max_tokens)
    marks: dict[str, tuple] = {}
    engine_step = engine.step
    step_host: list[float] = []
    step_cpu: list[float] = []

    def timed_step():  # the engine thread: time the steps in which all `rows` requests decode
        running = engine.scheduler.running
        full = len(running) == rows and all(r.num_computed_tokens >= r.num_prompt_tokens for r in running)
        blocked0 = runner.blocked_seconds
        t0, c0 = time.perf_counter(), time.thread_time()
        worked = engine_step()
        if worked and full:
            t1 = time.perf_counter()
            step_cpu.append(time.thread_time() - c0)
            step_host.append(t1 - t0 - (runner.blocked_seconds - blocked0))
            if "start" not in marks:
                marks["start"] = (t0, runner.device_idle_seconds, runner.num_steps)
            marks["end"] = (t1, runner.device_idle_seconds)
        return worked

    engine.step = timed_step
    engine.start()

    async def main():
        app = create_app(ServingConfig(max_waiting=max(1024, rows), guardrails=GuardrailConfig(enabled=guardrails)),
                         engine)
        app_runner = web.AppRunner(app)
        await app_runner.setup()
        site = web.TCPSite(app_runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]

        async def client(session, prompt, params):
            body = {"model": engine.config.model, "prompt": prompt, "max_tokens": params.max_tokens, "stream": True,
                    "temperature": params.temperature, "top_p": params.top_p, "ignore_eos": True}
            if params.seed is not None:
                body["seed"] = params.seed
            if params.stop:
                body["stop"] = list(params.stop)
            chunks = 0
            async with session.post(f"http://127.0.0.1:{port}/v1/completions", json=body) as resp:
                if resp.status != 200:
                    raise RuntimeError(f"HTTP {resp.status}: {await resp.text()}")
                async for line in resp.content:
                    if not line.startswith(b"data:") or line.startswith(b"data: [DONE]"):
                        continue
                    chunks += 1
            return chunks

        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=rows + 8)) as session:
            tasks = [asyncio.create_task(client(session, p, sp)) for p, sp in mix]
            chunks = await asyncio.wait_for(asyncio.gather(*tasks), timeout)
        await app_runner.cleanup()
        return chunks

    try:
        chunks = asyncio.run(main())
    finally:
        engine.shutdown()
    if "start" not in marks:
        raise RuntimeError(f"the {rows} requests never decoded together: raise max_tokens")
    (t0, idle0, _), (t1, idle1) = marks["start"], marks["end"]
    result = _summary(rows, step_host, step_cpu, len(step_host), t1 - t0, idle1 - idle0)
    result["sse_chunks"] = sum(chunks)
    return result


def run(rows_list: list[int], *, server: bool = False, steps: int = 200, device_ms: float = 0.0,
        max_num_seqs: int = 64, guardrails: bool = True) -> dict:
    """One case per row count; returns {"cases": [...], "host_ms_per_step": {rows: ms}, "steps_per_s": {...}}."""
    tokenizer = default_tokenizer()
    cases = []
    for rows in rows_list:
        if server:
            cases.append(run_server(rows, max_tokens=steps + 64, device_ms=device_ms, tokenizer=tokenizer,
                                    max_num_seqs=max_num_seqs, guardrails=guardrails))
        else:
            cases.append(run_in_process(rows, steps=steps, device_ms=device_ms, tokenizer=tokenizer,
                                        max_num_seqs=max_num_seqs))
    return {"server": server, "guardrails": guardrails, "device_ms": device_ms, "cases": cases,
            "host_ms_per_step": {str(c["rows"]): round(c["host_ms_per_step"], 3) for c in cases},
            "steps_per_s": {str(c["rows"]): round(c["steps_per_s"], 1) for c in cases}}


def format_table(result: dict) -> str:
    where = "in-process"
    if result["server"]:
        where = f"HTTP server, loopback clients, guardrails {'on' if result['guardrails'] else 'off'}"
    lines = [f"engine host overhead ({where}, "
             f"stand-in device {result['device_ms']} ms/step)",
             f"{'rows':>5} {'steps':>6} {'host ms/step p50':>17} {'mean':>7} {'cpu ms p50':>10} {'steps/s':>8} "
             f"{'device idle ms/step':>20}"]
    for c in result["cases"]:
        lines.append(f"{c['rows']:>5} {c['steps']:>6} {c['host_ms_per_step']:>17.3f} "
                     f"{c['host_ms_per_step_mean']:>7.3f} {c['host_cpu_ms_per_step']:>10.3f} {c['steps_per_s']:>8.1f} "
                     f"{c['device_idle_ms_per_step']:>20.3f}")
    return "\n".join(lines)


def summary_line(result: dict) -> str:
    return json.dumps({"host_ms_per_step": result["host_ms_per_step"], "steps_per_s": result["steps_per_s"]})
