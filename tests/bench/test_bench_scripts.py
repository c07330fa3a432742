"""The benchmark, batch and cost helpers behind `scripts/`, and the scripts end to end.

Hand-computed cases for the statistics and the cost arithmetic; the dataset generators with a whitespace
counter (exact) and the real tokenizer; the loopback guard; `generate_batch` on the real SmolLM2 (golden
greedy outputs from transformers) with a bad line and a resume; `bench_serving` against a real server
process on an ephemeral loopback port; the server's cost gauges in /metrics (fake engine, exact values).
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

from jaxserve.bench import client, datasets
from jaxserve.bench.stats import RequestResult, aggregate, summarize
from jaxserve.server import cost

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = json.loads((ROOT / "tests/data/golden_smollm2.json").read_text())


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"script_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def words(text: str) -> int:
    return len(text.split())


# ---------------------------------------------------------------------------- statistics

def test_request_timings_follow_the_vllm_definitions():
    # sent at 10.0; four content chunks; the last one ends the stream; five tokens (one chunk held two)
    r = RequestResult(prompt_tokens=7, start=10.0, chunk_times=[10.5, 10.7, 11.0, 11.6], end=11.6, output_tokens=5,
                      success=True)
    assert r.ttft == pytest.approx(0.5)
    assert r.e2e == pytest.approx(1.6)
    assert r.tpot == pytest.approx(1.1 / 4)  # (e2e - ttft) / (tokens - 1): per token
    assert r.itls == pytest.approx([0.2, 0.3, 0.6])  # per chunk
    one = RequestResult(prompt_tokens=1, start=0.0, chunk_times=[0.2], end=0.2, output_tokens=1, success=True)
    assert one.tpot is None and one.itls == []


def test_summaries_and_aggregate():
    s = summarize([4.0, 1.0, 3.0, 2.0])
    # linear interpolation between order statistics: p95 at rank 0.95 * 3 = 2.85 -> 3 + 0.85
    assert s == pytest.approx({"mean": 2.5, "median": 2.5, "std": math.sqrt(1.25), "p50": 2.5, "p95": 3.85,
                               "p99": 3.97})
    assert summarize([]) == {"mean": None, "median": None, "std": None, "p50": None, "p95": None, "p99": None}
    a = RequestResult(10, 0.0, [0.1, 0.2, 0.4], 0.4, 3, True)
    b = RequestResult(20, 0.0, [0.3, 0.5], 0.5, 2, True)
    bad = RequestResult(30, 0.0, error="HTTP 503: busy")
    r = aggregate([a, b, bad], duration=2.0)
    assert (r["completed"], r["errors"], r["error_samples"]) == (2, 1, ["HTTP 503: busy"])
    assert (r["total_input_tokens"], r["total_output_tokens"]) == (30, 5)
    assert r["request_throughput"] == 1.0 and r["input_throughput"] == 15.0 and r["output_throughput"] == 2.5
    assert r["ttft_ms"]["mean"] == pytest.approx(200.0)
    assert r["tpot_ms"]["mean"] == pytest.approx((150.0 + 200.0) / 2)  # a: 0.3 / 2, b: 0.2 / 1
    assert r["itl_ms"]["median"] == pytest.approx(200.0)  # pooled gaps 100, 200, 200
    assert r["e2e_ms"]["p99"] == pytest.approx(499.0)


def test_poisson_gaps_have_the_rate_and_are_seeded():
    gaps = client.arrival_gaps(20000, rate=4.0, seed=1)
    assert sum(gaps) / len(gaps) == pytest.approx(0.25, rel=0.03)
    assert sum(g > 0.5 for g in gaps) / len(gaps) == pytest.approx(math.exp(-2.0), abs=0.01)  # P(gap > t) = e^{-rt}
    assert gaps[:10] == client.arrival_gaps(10, rate=4.0, seed=1)
    assert client.arrival_gaps(3, math.inf) == [0.0, 0.0, 0.0]
    bursty = client.arrival_gaps(20000, rate=4.0, burstiness=0.5, seed=1)
    assert sum(bursty) / len(bursty) == pytest.approx(0.25, rel=0.05)


def test_sweep_configurations_and_request_bodies():
    base = client.LoadConfig("http://127.0.0.1:1", "m", request_rate=2.0, max_concurrency=8)
    runs = client.sweep_configs(base, concurrencies=[1, 4])
    assert [(label, c.request_rate, c.max_concurrency) for label, c in runs] == [
        ("concurrency=1", math.inf, 1), ("concurrency=4", math.inf, 4)]
    runs = client.sweep_configs(base, rates=[1.0, math.inf])
    assert [(label, c.request_rate, c.max_concurrency) for label, c in runs] == [
        ("rate=1/s", 1.0, 8), ("rate=inf/s", math.inf, 8)]
    assert client.sweep_configs(base)[0][0] == "rate=2/s concurrency=8"
    with pytest.raises(ValueError):
        client.sweep_configs(base, rates=[1.0], concurrencies=[1])
    req = datasets.BenchRequest("hello there", 2, 5)
    body = client.request_body(req, base)
    assert body["prompt"] == "hello there" and body["max_tokens"] == 5 and body["ignore_eos"] is True
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    chat = client.request_body(req, client.LoadConfig("u", "m", endpoint="chat", ignore_eos=False))
    assert chat["messages"] == [{"role": "user", "content": "hello there"}] and "ignore_eos" not in chat
    with pytest.raises(ValueError):
        client.LoadConfig("u", "m", request_rate=0.0)


# ---------------------------------------------------------------------------- datasets

def test_synthetic_is_seeded_and_respects_the_length_bounds():
    spec = datasets.SyntheticSpec(num_prompts=40, input_len=50, output_len=20, range_ratio=0.5, seed=3,
                                  output_range_ratio=0.5)
    first = datasets.synthetic(spec, words)
    assert first == datasets.synthetic(spec, words)
    assert first != datasets.synthetic(datasets.SyntheticSpec(40, 50, 20, 0.5, seed=4, output_range_ratio=0.5), words)
    assert all(25 <= r.prompt_tokens <= 75 and words(r.prompt) == r.prompt_tokens for r in first)
    assert all(10 <= r.output_tokens <= 30 for r in first)
    assert len({r.prompt for r in first}) == 40 and len({r.prompt_tokens for r in first}) > 10
    fixed = datasets.synthetic(datasets.SyntheticSpec(5, 16, 8, 0.0, seed=0), words)
    assert [(r.prompt_tokens, r.output_tokens) for r in fixed] == [(16, 8)] * 5
    with pytest.raises(ValueError):
        datasets.SyntheticSpec(range_ratio=1.0)
    with pytest.raises(ValueError):
        datasets.SyntheticSpec(output_range_ratio=-0.1)


def test_synthetic_with_the_real_tokenizer():
    count = datasets.local_counter("SmolLM2-135M-Instruct")
    spec = datasets.SyntheticSpec(num_prompts=20, input_len=60, output_len=8, range_ratio=0.5, seed=0)
    reqs = datasets.synthetic(spec, count)
    lo, hi = spec.input_bounds()
    assert {r.output_tokens for r in reqs} == {8}
    for r in reqs:
        assert count(r.prompt) == r.prompt_tokens
        assert lo - 3 <= r.prompt_tokens <= hi  # at the drawn length, or short of it by less than a word
    assert len({r.prompt_tokens for r in reqs}) > 5


def test_sharegpt_and_jsonl_loaders(tmp_path):
    convs = [{"conversations": [{"from": "human", "value": " ".join(["q"] * n)},
                                {"from": "gpt", "value": " ".join(["a"] * m)}]}
             for n, m in [(5, 6), (2, 9), (7, 3), (8, 8), (9, 10), (1200, 5)]]
    convs.append({"conversations": [{"from": "human", "value": "only one turn"}]})
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(convs))
    got = datasets.load_sharegpt(path, words, seed=0)
    # too short a prompt (2), too short a reply (3), too long a prompt (1200) and a one-turn entry are skipped
    assert sorted((r.prompt_tokens, r.output_tokens) for r in got) == [(5, 6), (8, 8), (9, 10)]
    assert got == datasets.load_sharegpt(path, words, seed=0)
    assert len(datasets.load_sharegpt(path, words, num_prompts=2, seed=1)) == 2
    assert {r.output_tokens for r in datasets.load_sharegpt(path, words, output_len=64)} == {64}

    jl = tmp_path / "prompts.jsonl"
    jl.write_text('"just a string"\n\n{"prompt": "one two three", "max_tokens": 7}\n{"text": "four five"}\n')
    got = sorted(datasets.load_jsonl(jl, words, output_len=11), key=lambda r: r.prompt)
    assert [(r.prompt, r.prompt_tokens, r.output_tokens) for r in got] == [
        ("four five", 2, 11), ("just a string", 3, 11), ("one two three", 3, 7)]
    jl.write_text('{"prompt": "ok"}\n{"no_prompt": 1}\n')
    with pytest.raises(ValueError, match=":2:"):
        datasets.load_jsonl(jl, words)


# ---------------------------------------------------------------------------- loopback guard

@pytest.mark.parametrize("url", ["http://127.0.0.1:8000", "http://localhost:8000/v1", "http://[::1]:80",
                                 "http://127.3.2.1:9", "https://localhost"])
def test_loopback_targets_are_accepted(url):
    assert client.check_target(url) == url.removesuffix("/v1")


@pytest.mark.parametrize("url", ["http://10.0.0.1:8000", "http://example.com", "http://0.0.0.0:8000",
                                 "http://127.0.0.1.example.com", "http://[2001:db8::1]:8000"])
def test_remote_targets_need_allow_remote(url):
    with pytest.raises(client.RemoteTargetError, match="--allow-remote"):
        client.check_target(url)
    assert client.check_target(url, allow_remote=True)


def test_bench_serving_script_refuses_a_remote_host_before_connecting(capsys):
    script = load_script("bench_serving")
    assert script.main(["--base-url", "http://192.0.2.1:8000", "--num-requests", "1"]) == 2
    assert "--allow-remote" in capsys.readouterr().err
    with pytest.raises(ValueError):
        client.check_target("ftp://127.0.0.1")


# ---------------------------------------------------------------------------- cost arithmetic

def test_cost_worked_example():
    # $3.60/h at 50% utilisation: a busy second costs 3.6 / 3600 / 0.5 = $0.002. Measured 800 input + 1000
    # output tok/s; an input token weighs 0.15 / 0.60 = 0.25 output tokens (the API list's ratio), so a busy
    # second does 0.25 * 800 + 1000 = 1200 output-token equivalents: $0.002 / 1200 per output token.
    acc = cost.Accelerator(price_per_hour=3.6, utilization=0.5, input_tokens_per_s=800, output_tokens_per_s=1000)
    traffic = cost.Traffic(requests_per_day=100_000, input_tokens=400, output_tokens=200)
    cheap, dear = cost.ApiPrice.parse("cheap=0.15,0.60"), cost.ApiPrice.parse("dear=2.5,10")
    r = cost.analyse(acc, traffic, [cheap, dear])
    assert r["input_weight"] == 0.25
    assert r["unit"]["cost_per_million_output_tokens"] == pytest.approx(0.002 / 1200 * 1e6)  # $1.6667
    assert r["unit"]["cost_per_million_input_tokens"] == pytest.approx(0.25 * 0.002 / 1200 * 1e6)
    # a request is 0.25 * 400 + 200 = 300 units: 1200 / 300 = 4 req per busy second, 86400 * 0.5 busy s/day
    m = r["monthly"]
    assert m["capacity_requests_per_day"] == pytest.approx(172_800)
    assert m["accelerators"] == 1 and m["cost_per_month"] == pytest.approx(3.6 * 730)
    # the cheap API: 400 * 0.15e-6 + 200 * 0.6e-6 = $0.00018 per request: cheaper than us even at capacity
    low, high = r["apis"]
    assert low["api_cost_per_request"] == pytest.approx(0.00018) and low["break_even_requests_per_day"] is None
    # the dear one: $0.003 per request; one accelerator's month (2628) / (0.003 * 365 / 12) = 28,800 req/day
    assert high["break_even_requests_per_day"] == pytest.approx(28_800)
    assert high["api_cost_per_month"] == pytest.approx(0.003 * 100_000 * 365 / 12)
    # 400,000 req/day needs ceil(400000 / 172800) = 3 accelerators
    assert cost.monthly(acc, cost.Traffic(400_000, 400, 200), 0.25)["accelerators"] == 3
    assert cost.unit_costs(acc, 0.0)["cost_per_million_input_tokens"] == 0.0
    for bad in ("nameonly", "x=1", "x=a,b", "=1,2", "x=-1,2"):
        with pytest.raises(ValueError):
            cost.ApiPrice.parse(bad)
    with pytest.raises(ValueError):
        cost.Accelerator(1.0, utilization=0.0, output_tokens_per_s=1.0)


def test_cost_script_reads_a_bench_json(tmp_path, capsys):
    def run(label, out):
        return {"label": label, "result": {"input_throughput": 50.0, "output_throughput": out, "completed": 10,
                                           "total_input_tokens": 1000, "total_output_tokens": 500}}

    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"runs": [run("c=1", 20.0), run("c=4", 100.0)]}))
    out = tmp_path / "cost.json"
    assert load_script("cost").main(["--bench-json", str(bench), "--price-per-hour", "1.8", "--input-weight", "0",
                                     "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["accelerator"]["output_tokens_per_s"] == 100.0  # the best run
    assert (r["traffic"]["input_tokens"], r["traffic"]["output_tokens"]) == (100.0, 50.0)  # its means
    assert r["unit"]["cost_per_million_output_tokens"] == pytest.approx(1.8 / 3600 / 100 * 1e6)  # $5
    assert "$ per 1M output tokens" in capsys.readouterr().out


# ---------------------------------------------------------------------------- the server's cost gauges

def test_cost_gauges_in_metrics():
    from conftest import FakeEngine, async_test, metric, serving

    @async_test
    async def check():
        engine = FakeEngine()
        async with serving(engine, accelerator_price_per_hour=3.6, accelerator_utilization=0.5) as c:
            await (await c.post("/v1/completions", json={"prompt": "ab", "max_tokens": 5})).read()
            assert await metric(c, "jaxserve:accelerator_price_per_hour") == 3.6
            assert await metric(c, "jaxserve:accelerator_utilization") == 0.5
            assert await metric(c, "jaxserve:cost_per_million_output_tokens") is None  # no busy time yet
            engine.stats.step_seconds = 2.0  # 2 prompt + 5 generated tokens in 2 busy seconds
            # a busy second costs 3.6 / 3600 / 0.5 = $0.002 for 1 + 2.5 tokens (input weight 1)
            assert await metric(c, "jaxserve:cost_per_million_output_tokens") == pytest.approx(0.002 / 3.5 * 1e6)
            assert await metric(c, "jaxserve:cost_per_million_input_tokens") == pytest.approx(0.002 / 3.5 * 1e6)
            assert 0 < await metric(c, "jaxserve:accelerator_busy_fraction") <= 1
        async with serving(FakeEngine()) as c:
            assert await metric(c, "jaxserve:accelerator_price_per_hour") is None

    check()


# ---------------------------------------------------------------------------- generate_batch, real model

def _golden(name: str) -> dict:
    return next(p for p in GOLDEN["prompts"] if p["name"] == name)


@pytest.mark.slow
def test_generate_batch_end_to_end_with_a_bad_line_and_a_resume(tmp_path, small_server):
    # NOTE: `small_server` is only started here (not used), so its warm-up runs alongside this test's compiles.
    from jaxserve.config import EngineConfig
    from jaxserve.engine import LLMEngine
    from jaxserve.server.batch import run_batch

    text, chat = _golden("short_text"), _golden("capital_chat")
    lines = [
        {"custom_id": "text", "method": "POST", "url": "/v1/completions",
         "body": {"prompt": [text["text"], text["text"]], "max_tokens": 6, "temperature": 0, "logprobs": 2}},
        "this line is not JSON",
        {"custom_id": "hot", "url": "/v1/completions", "body": {"prompt": "x", "temperature": 7}},
        {"custom_id": "chat", "method": "POST", "url": "/v1/chat/completions",
         "body": {"messages": chat["messages"], "max_tokens": 12, "temperature": 0}},
    ]
    later = {"custom_id": "later", "url": "/v1/completions", "body": {"prompt": text["prompt_ids"], "max_tokens": 3,
                                                                     "temperature": 0}}
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join((json.dumps(x) if isinstance(x, dict) else x) + "\n" for x in lines))
    engine = LLMEngine(EngineConfig(max_num_seqs=2, max_num_batched_tokens=4, max_model_len=128,
                                    kv_cache_memory=8 * 2**20), warmup=False)
    summary = run_batch(engine, src, out, model="smol", progress=False)
    assert (summary["succeeded"], summary["failed"], summary["skipped"]) == (2, 2, 0)
    records = {r["custom_id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert records[None]["response"] is None and records[None]["error"]["code"] == "invalid_json_line"
    hot = records["hot"]["response"]
    assert hot["status_code"] == 400 and hot["body"]["error"]["param"] == "temperature"

    tok = engine.tokenizer
    body = records["text"]["response"]["body"]
    assert records["text"]["response"]["status_code"] == 200 and body["object"] == "text_completion"
    assert body["model"] == "smol" and records["text"]["response"]["request_id"] == body["id"]
    want = tok.decode(text["greedy_ids"][:6])  # transformers' greedy tokens
    assert [c["index"] for c in body["choices"]] == [0, 1] and {c["text"] for c in body["choices"]} == {want}
    assert body["choices"][0]["finish_reason"] == "length"
    first = body["choices"][0]["logprobs"]
    assert first["token_logprobs"][0] == pytest.approx(text["top_logprobs"][0][0][1], abs=1e-3)
    golden_top = {tok.decode([t]): lp for t, lp in text["top_logprobs"][0][:2]}  # transformers' top-2
    assert first["top_logprobs"][0] == pytest.approx(golden_top, abs=1e-3)
    usage = body["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"]) == (10, 12, 22)
    reply = records["chat"]["response"]["body"]
    assert reply["object"] == "chat.completion"
    assert reply["choices"][0]["message"]["content"] == "The capital of France is Paris."
    assert reply["choices"][0]["finish_reason"] == "stop"

    # resume: the finished custom_ids are skipped, the new line runs, a torn last line is dropped first
    with open(out, "a") as f:
        f.write('{"id": "batch_req_torn", "custom_id": "la')
    src.write_text(src.read_text() + json.dumps(later) + "\n")
    summary = run_batch(engine, src, out, model="smol", progress=False)
    assert summary["skipped"] == 3 and summary["succeeded"] == 1  # the id-less bad line is reported again
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["custom_id"] for r in records].count("later") == 1 and len(records) == 6
    late = next(r for r in records if r["custom_id"] == "later")["response"]["body"]
    assert late["choices"][0]["text"] == tok.decode(text["greedy_ids"][:3])


# ---------------------------------------------------------------------------- bench_serving, real server

class _LaunchedServer:
    """A server process started at once; `ready()` waits for its warm-up (the first time only)."""

    def __init__(self, proc, log_path):
        self.proc, self.log_path, self._ready = proc, log_path, None

    def ready(self):
        from server_process import wait_ready

        self._ready = self._ready or wait_ready(self.proc, self.log_path, timeout=300)
        return self._ready


@pytest.fixture(scope="module")
def small_server(tmp_path_factory):
    """Started before the generate_batch test so that its warm-up overlaps that test's in-process compiles."""
    from server_process import launch, stop

    # NOTE: three step shapes only ((1, 1), (2, 2), (4, 2)): the warm-up dominates this module's runtime.
    args = ["--host", "127.0.0.1", "--port", "0", "--max-num-seqs", "2", "--max-num-batched-tokens", "4",
            "--max-model-len", "64", "--kv-cache-memory", "8MiB", "--accelerator-price-per-hour", "2.0",
            "--no-guardrail-pii", "--no-guardrail-content-policy"]
    log_path = tmp_path_factory.mktemp("bench") / "server.log"
    launched = _LaunchedServer(launch(args, log_path), log_path)
    try:
        yield launched
    finally:
        stop(launched.proc)


async def _metrics(url: str) -> dict[str, float]:
    import aiohttp

    from conftest import drop_model_name

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as s, s.get(url + "/metrics") as resp:
        text = await resp.text()
    lines = [drop_model_name(line) for line in text.splitlines() if line and not line.startswith("#")]
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in lines}


@pytest.mark.slow
def test_bench_serving_end_to_end(small_server, tmp_path, capsys):
    import asyncio

    small_server = small_server.ready()
    result, plot = tmp_path / "bench.json", tmp_path / "bench.png"
    rc = load_script("bench_serving").main([
        "--base-url", small_server.url, "--num-requests", "3", "--input-len", "12", "--output-len", "4",
        "--range-ratio", "0", "--sweep-concurrency", "1,2", "--result-json", str(result), "--plot", str(plot),
        "--no-progress"])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    report = json.loads(result.read_text())
    assert [r["label"] for r in report["runs"]] == ["concurrency=1", "concurrency=2"]
    assert report["settings"]["prompt_tokens"] == "12-12"  # counted with the server's /tokenize
    for run in report["runs"]:
        r = run["result"]
        assert (r["completed"], r["errors"]) == (3, 0)
        assert r["total_output_tokens"] == 12 and r["total_input_tokens"] == 36  # the server's usage
        assert 0 < r["ttft_ms"]["median"] <= r["e2e_ms"]["median"]
        assert r["tpot_ms"]["mean"] > 0 and r["itl_ms"]["p99"] >= r["itl_ms"]["median"]
        assert r["output_throughput"] == pytest.approx(12 / r["duration_s"])
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "concurrency=2" in printed and "TPOT (ms)" in printed
    m = asyncio.run(_metrics(small_server.url))
    assert m["jaxserve:generation_tokens_total"] == 24  # what the server counted = what the client counted
    assert m["jaxserve:accelerator_price_per_hour"] == 2.0
    assert m["jaxserve:cost_per_million_output_tokens"] > 0 and 0 < m["jaxserve:accelerator_busy_fraction"] <= 1
    # the chat endpoint: content arrives in `delta.content`; the chat template adds to the prompt's tokens
    chat = tmp_path / "chat.json"
    assert load_script("bench_serving").main([
        "--base-url", small_server.url, "--endpoint", "chat", "--num-requests", "2", "--input-len", "8",
        "--output-len", "3", "--range-ratio", "0", "--max-concurrency", "2", "--result-json", str(chat),
        "--no-progress"]) == 0
    r = json.loads(chat.read_text())["runs"][0]["result"]
    assert (r["completed"], r["total_output_tokens"]) == (2, 6) and r["total_input_tokens"] > 2 * 8


# ---------------------------------------------------------------------------- structured outputs

def test_bench_structured_script_on_the_tiny_model(tiny_checkpoint, tmp_path, capsys):
    """Both modes generate max_tokens per stream, the constrained one computes its masks (most ahead of the step)."""
    script = load_script("bench_structured")
    out = tmp_path / "structured.json"
    assert script.main(["--model", str(tiny_checkpoint), "--streams", "2", "--max-tokens", "6", "--prefetch", "on",
                        "--max-model-len", "128", "--out", str(out)]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(line["output_tok_s"]) == {"2_free", "2_json"} and set(line["mask_ms_per_step"]) == {"2"}
    cases = json.loads(out.read_text())["cases"]
    assert [c["output_tokens"] for c in cases] == [12, 12]
    json_cases = [c for c in cases if c["mode"] == "json"]
    assert all(c["mask_rows"] == c["output_tokens"] and c["prefetched_rows"] > 0 for c in json_cases)
    assert all(c["mask_rows"] == 0 for c in cases if c["mode"] == "free")


# ---------------------------------------------------------------------------- speculative decoding

def test_bench_speculative_script_on_the_tiny_model(tiny_checkpoint, tmp_path, capsys):
    """`--quick`: none and ngram on both prompt sets at batch 1 and 4, through engines built with the given
    `--activation-quantization` (recorded in the JSON); every row has a TPOT, the ngram rows their acceptance."""
    script = load_script("bench_speculative")
    out = tmp_path / "spec.json"
    assert script.main(["--model", str(tiny_checkpoint), "--quick", "--activation-quantization", "int8",
                        "--max-model-len", "256", "--out", str(out)]) == 0
    assert "method" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["config"]["activation_quantization"] == "int8"
    rows = result["rows"]
    assert {(r["method"], r["set"], r["batch"]) for r in rows} == {
        (m, s, b) for m in ("none", "ngram") for s in ("repetitive", "chat") for b in (1, 4)}
    assert all(r["tpot_ms"] > 0 and r["tokens"] > 0 for r in rows)
    for r in (r for r in rows if r["method"] == "ngram"):  # mean length 0: no verify carried a proposal
        length = r["mean_accepted_length"]
        assert 0 <= r["acceptance_rate"] <= 1 and (length == 0 or 1 <= length <= 5)
        assert isinstance(r["same_as_none"], bool)
