"""The serving benchmark's load generator: streaming OpenAI requests against one base URL.

Requests are sent in dataset order. Arrivals are a Poisson process at `request_rate` per second
(exponential gaps; `burstiness` != 1 draws gamma gaps with the same mean, as vLLM's `--burstiness`), or
all at once with `inf`; `max_concurrency` caps the requests in flight either way (a semaphore, so a
capped run at rate `inf` is a closed loop of that many clients). Each request streams
(`stream_options.include_usage`), and the client stamps every content-bearing chunk; the token counts are
the server's `usage` when it sends one, else the dataset's prompt count and one token per content chunk.

`check_target` is the only way a URL gets here: loopback hosts only, unless the caller allows remote ones.
Everything runs on one asyncio loop; a request's failure is recorded in its result, never raised.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import json
import math
import random
import time
import urllib.parse
from typing import Sequence

import aiohttp
from tqdm import tqdm

from jaxserve.bench.datasets import BenchRequest
from jaxserve.bench.stats import RequestResult

ENDPOINTS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}


class RemoteTargetError(ValueError):
    pass


def is_loopback(host: str) -> bool:
    """True for `localhost`, 127.0.0.0/8 and ::1. Other names are not resolved: they count as remote."""
    host = host.strip("[]").lower()
    if host in ("localhost", "localhost.localdomain") or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_target(base_url: str, allow_remote: bool = False) -> str:
    """The base URL without a trailing `/v1`; raises RemoteTargetError for a non-loopback host unless allowed."""
    parsed = urllib.parse.urlsplit(base_url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ValueError(f"expected an http(s) URL such as http://127.0.0.1:8000, got {base_url!r}")
    if not allow_remote and not is_loopback(parsed.hostname):
        raise RemoteTargetError(f"{parsed.hostname} is not a loopback address; pass --allow-remote to benchmark "
                                "a server on another machine (only ever one you are allowed to load)")
    return base_url.rstrip("/").removesuffix("/v1")


@dataclasses.dataclass(frozen=True)
class LoadConfig:
    base_url: str  # already through check_target
    model: str
    endpoint: str = "completions"  # completions | chat
    request_rate: float = math.inf  # requests per second; inf: send all at once
    max_concurrency: int | None = None  # cap on requests in flight
    burstiness: float = 1.0  # gamma shape of the gaps; 1: Poisson
    ignore_eos: bool = True  # generate exactly the requested output lengths
    temperature: float = 0.0
    api_key: str | None = None
    timeout: float = 600.0  # per request, seconds
    seed: int = 0

    def __post_init__(self):
        if self.endpoint not in ENDPOINTS:
            raise ValueError(f"endpoint must be one of {sorted(ENDPOINTS)}, got {self.endpoint!r}")
        if not self.request_rate > 0:
            raise ValueError(f"request_rate must be positive (or inf), got {self.request_rate}")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"max_concurrency must be positive, got {self.max_concurrency}")
        if self.burstiness <= 0:
            raise ValueError(f"burstiness must be positive, got {self.burstiness}")


def arrival_gaps(n: int, rate: float, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """Seconds to wait before each of n requests: gamma(burstiness, 1 / (rate * burstiness)) draws, mean 1/rate."""
    if math.isinf(rate):
        return [0.0] * n
    rng = random.Random(seed)
    return [rng.gammavariate(burstiness, 1.0 / (rate * burstiness)) for _ in range(n)]


def request_body(req: BenchRequest, cfg: LoadConfig) -> dict:
    body = {"model": cfg.model, "max_tokens": req.output_tokens, "temperature": cfg.temperature, "stream": True,
            "stream_options": {"include_usage": True}}
    if cfg.ignore_eos:
        body["ignore_eos"] = True
    if cfg.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": req.prompt}]
    else:
        body["prompt"] = req.prompt
    return body


def _content(chunk: dict) -> str:
    text = ""
    for choice in chunk.get("choices") or ():
        text += choice.get("text") or (choice.get("delta") or {}).get("content") or ""
    return text


async def send_one(session: aiohttp.ClientSession, req: BenchRequest, cfg: LoadConfig) -> RequestResult:
    result = RequestResult(prompt_tokens=req.prompt_tokens, start=time.perf_counter())
    usage = None
    try:
        async with session.post(cfg.base_url + ENDPOINTS[cfg.endpoint], json=request_body(req, cfg)) as resp:
            if resp.status != 200:
                result.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                return result
            async for raw in resp.content:
                line = raw.decode("utf-8", "replace").strip()
                if not line.startswith("data:"):
                    continue  # blank separators and `: keep-alive` comments
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    result.error = f"stream error: {json.dumps(chunk['error'])[:200]}"
                    return result
                text = _content(chunk)
                if text:
                    result.chunk_times.append(time.perf_counter())
                    result.text += text
                if chunk.get("usage"):
                    usage = chunk["usage"]
        result.end = time.perf_counter()
    except (aiohttp.ClientError, asyncio.TimeoutError, json.JSONDecodeError, UnicodeDecodeError) as e:
        result.error = f"{type(e).__name__}: {e}"[:200]
        return result
    if usage:
        result.prompt_tokens = int(usage.get("prompt_tokens") or req.prompt_tokens)
        result.output_tokens = int(usage.get("completion_tokens") or 0)
    else:
        result.output_tokens = len(result.chunk_times)
    result.success = bool(result.chunk_times)
    if not result.success:
        result.error = "no content in the response"
    return result


async def run_load(requests: Sequence[BenchRequest], cfg: LoadConfig, *, progress: bool = True,
                   desc: str = "requests") -> tuple[list[RequestResult], float]:
    """Sends every request as the arrival process says; returns the results (dataset order) and the wall time."""
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    limit = asyncio.Semaphore(cfg.max_concurrency) if cfg.max_concurrency else None
    timeout = aiohttp.ClientTimeout(total=cfg.timeout)
    # NOTE: a fresh connection per request: some servers (llama-server) close kept-alive connections under
    # load, and a reused one then fails to write the next request body or stalls its start.
    connector = aiohttp.TCPConnector(limit=cfg.max_concurrency or 0, force_close=True)
    gaps = arrival_gaps(len(requests), cfg.request_rate, cfg.burstiness, cfg.seed)
    with tqdm(total=len(requests), desc=desc, unit="req", disable=not progress, leave=False) as bar:
        async with aiohttp.ClientSession(headers=headers, timeout=timeout, connector=connector) as session:

            async def one(req: BenchRequest) -> RequestResult:
                if limit is None:
                    out = await send_one(session, req, cfg)
                else:
                    async with limit:
                        out = await send_one(session, req, cfg)
                bar.update(1)
                return out

            start = time.perf_counter()
            tasks = []
            for req, gap in zip(requests, gaps):
                if gap:
                    await asyncio.sleep(gap)
                tasks.append(asyncio.create_task(one(req)))
            results = await asyncio.gather(*tasks)
            duration = time.perf_counter() - start
    return list(results), duration


async def served_model(base_url: str, api_key: str | None = None, timeout: float = 30.0) -> dict:
    """The first model card of `/v1/models` ({} when the server has none), e.g. {"id", "max_model_len"}."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with aiohttp.ClientSession(headers=headers, timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        async with session.get(base_url + "/v1/models") as resp:
            resp.raise_for_status()
            data = (await resp.json()).get("data") or [{}]
    return data[0]


def sweep_configs(base: LoadConfig, *, rates: Sequence[float] = (), concurrencies: Sequence[int] = ()
                  ) -> list[tuple[str, LoadConfig]]:
    """(label, config) per run: one per rate, one per concurrency (at rate inf), or just `base`."""
    if rates and concurrencies:
        raise ValueError("sweep over rates or over concurrencies, not both")
    if rates:
        return [(f"rate={r:g}/s", dataclasses.replace(base, request_rate=r)) for r in rates]
    if concurrencies:
        return [(f"concurrency={c}", dataclasses.replace(base, request_rate=math.inf, max_concurrency=c))
                for c in concurrencies]
    if math.isinf(base.request_rate) and base.max_concurrency:
        return [(f"concurrency={base.max_concurrency}", base)]
    label = f"rate={base.request_rate:g}/s" + (f" concurrency={base.max_concurrency}" if base.max_concurrency else "")
    return [(label, base)]


def run_sweep(requests: Sequence[BenchRequest], runs: Sequence[tuple[str, LoadConfig]], *,
              progress: bool = True) -> list[dict]:
    """Runs each configuration over the same requests, one after another; [{label, config, result}]."""
    from jaxserve.bench.stats import aggregate

    out = []
    for label, cfg in runs:
        results, duration = asyncio.run(run_load(requests, cfg, progress=progress, desc=label))
        shown = dataclasses.asdict(cfg)
        shown.pop("api_key")
        out.append({"label": label, "config": shown, "result": aggregate(results, duration)})
    return out
