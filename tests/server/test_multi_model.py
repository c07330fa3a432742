"""Several models behind one app (fake engines, no JAX): routing by `model`, the 404 listing the names, a
cascade's answerer in the header and the body, its counters in /metrics, and the flag parsing."""

from __future__ import annotations

import contextlib
import dataclasses

import pytest
from aiohttp.test_utils import TestClient, TestServer

from jaxserve.cascade import CascadeEngine, CascadePolicy
from jaxserve.config import EngineConfig
from jaxserve.server.app import STATE, ServingConfig, create_app
from jaxserve.server.model_router import ANSWERED_BY_HEADER, CascadeSpec, ModelSpec, check_cascades, plan_engines

from conftest import FakeEngine, async_test, error_of, read_sse


class UnsureEngine(FakeEngine):
    """Sampled-token logprob -3 on prompts containing "hard" (FakeEngine's -0.25 otherwise)."""

    def _send(self, req, tokens, text, logprobs, reason, error=None):
        if logprobs and "hard" in self.tokenizer.decode(req.prompt):
            logprobs = [dataclasses.replace(e, logprob=-3.0) for e in logprobs]
        super()._send(req, tokens, text, logprobs, reason, error)


@contextlib.asynccontextmanager
async def two_models():
    small, large = UnsureEngine(), FakeEngine()
    small.scripts = {"easy": "small says hi", "a hard one": "small guess"}
    large.scripts = {"easy": "large says hi", "a hard one": "LARGE KNOWS"}
    for e in (small, large):
        e.start()
    app = create_app(ServingConfig(served_model_name="small", accelerator_price_per_hour=2.0))
    app[STATE].set_models({"small": small, "large": large,
                           "auto": CascadeEngine(small, large, CascadePolicy(threshold=-1.0), small_name="small",
                                                 large_name="large")})
    client = TestClient(TestServer(app))
    await client.start_server()
    try:
        yield client
    finally:
        await client.close()
        small.shutdown()
        large.shutdown()


async def complete(client, model: str, prompt: str, **extra):
    return await client.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": 20, **extra})


@async_test
async def test_requests_route_by_model_and_an_unknown_name_lists_the_served_ones():
    async with two_models() as client:
        models = await (await client.get("/v1/models")).json()
        assert [m["id"] for m in models["data"]] == ["small", "large", "auto"]
        for name, text in (("small", "small says hi"), ("large", "large says hi")):
            resp = await complete(client, name, "easy")
            body = await resp.json()
            assert body["choices"][0]["text"] == text and body["model"] == name
            assert ANSWERED_BY_HEADER not in resp.headers and "answered_by" not in body
        resp = await complete(client, "medium", "easy")
        err = error_of(await resp.json())
        assert resp.status == 404 and err["param"] == "model"
        assert all(f"'{n}'" in err["message"] for n in ("small", "large", "auto")), err["message"]
        tok = await client.post("/tokenize", json={"model": "nope", "prompt": "x"})
        assert tok.status == 404


@async_test
async def test_the_cascade_answers_from_both_models_and_says_which():
    async with two_models() as client:
        resp = await complete(client, "auto", "easy")
        body = await resp.json()
        assert body["choices"][0]["text"] == "small says hi" and body["model"] == "auto"
        assert body["answered_by"] == "small" and resp.headers[ANSWERED_BY_HEADER] == "small"
        assert "logprobs" not in body["choices"][0] or body["choices"][0]["logprobs"] is None

        resp = await complete(client, "auto", "a hard one")
        body = await resp.json()
        assert body["choices"][0]["text"] == "LARGE KNOWS"
        assert body["answered_by"] == "large" and resp.headers[ANSWERED_BY_HEADER] == "large"

        # Streaming: the decision comes before the first byte, so the header can carry it.
        resp = await complete(client, "auto", "a hard one", stream=True)
        assert resp.headers[ANSWERED_BY_HEADER] == "large"
        events, _ = await read_sse(resp)
        chunks = [e for e in events if e != "[DONE]"]
        assert "".join(c["choices"][0]["text"] for c in chunks) == "LARGE KNOWS"
        assert {c["answered_by"] for c in chunks} == {"large"}

        cascade = client.server.app[STATE].router.scope("auto").engine
        cascade.small.stats.step_seconds, cascade.large.stats.step_seconds = 1.0, 4.0  # busy seconds per engine
        text = await (await client.get("/metrics")).text()
        lines = text.splitlines()
        assert 'jaxserve:cascade_requests_total{answered_by="small",model_name="auto"} 1.0' in lines
        assert 'jaxserve:cascade_requests_total{answered_by="large",model_name="auto"} 2.0' in lines
        assert 'jaxserve:cascade_escalations_total{model_name="auto"} 2.0' in lines
        st, c_small, c_large = cascade.stats, 1.0 / cascade.small.stats.tokens, 4.0 / cascade.large.stats.tokens
        saved = c_large * st.kept_tokens - c_small * st.small_tokens  # busy seconds
        fraction = saved / (c_large * (st.kept_tokens + st.large_tokens))
        assert gauge(lines, "cascade_cost_saved_fraction") == pytest.approx(fraction)
        assert gauge(lines, "cascade_cost_saved_dollars") == pytest.approx(saved * 2.0 / 3600)
        # Each model's own request and engine series, one HELP / TYPE per family.
        assert text.count("# TYPE jaxserve:request_success_total counter") == 1
        for name in ("small", "large", "auto"):
            assert f'jaxserve:request_success_total{{finished_reason="stop",model_name="{name}"}}' in text
        for name in ("small", "large"):
            assert f'jaxserve:kv_cache_usage_perc{{model_name="{name}"}}' in text


def test_model_specs_and_the_memory_split():
    spec = ModelSpec.parse("draft=/ckpt/small,quantization=int4,memory_share=0.25,max_model_len=512")
    assert (spec.name, spec.model, spec.memory_share) == ("draft", "/ckpt/small", 0.25)
    base = EngineConfig(kv_cache_memory=400 * 2**20)
    plan = plan_engines("big", base, [spec])
    assert [n for n, _ in plan] == ["big", "draft"]
    assert [c.kv_cache_memory for _, c in plan] == [300 * 2**20, 100 * 2**20]
    assert plan[1][1].quantization == "int4" and plan[1][1].max_model_len == 512 and plan[1][1].model == "/ckpt/small"
    # No --kv-cache-memory: each engine is sized after the ones before, by a cumulative utilization.
    plan = plan_engines("big", EngineConfig(gpu_memory_utilization=0.8), [spec], 0.5)
    assert [c.gpu_memory_utilization for _, c in plan] == [pytest.approx(0.4), pytest.approx(0.6)]
    for bad in ("noequals", "x=/p,colour=red"):
        with pytest.raises(ValueError):
            ModelSpec.parse(bad)
    with pytest.raises(ValueError, match="unique"):
        plan_engines("big", base, [ModelSpec("big", "/p")])
    with pytest.raises(ValueError, match="shares"):
        plan_engines("big", base, [ModelSpec("a", "/p", 0.7)], 0.6)


def test_cascade_specs():
    c = CascadeSpec.parse("auto=small,large,threshold=-0.8,signal=min_logprob")
    assert (c.name, c.small, c.large, c.threshold, c.signal) == ("auto", "small", "large", -0.8, "min_logprob")
    check_cascades([c], ["small", "large"])
    with pytest.raises(ValueError, match="not a served model"):
        check_cascades([c], ["small"])
    with pytest.raises(ValueError):
        CascadeSpec.parse("auto=small")


def gauge(lines: list[str], name: str) -> float:
    prefix = f'jaxserve:{name}{{model_name="auto"}} '
    return float(next(ln for ln in lines if ln.startswith(prefix)).removeprefix(prefix))


def test_a_model_that_fails_to_load_fails_the_start_up_naming_it(tmp_path, monkeypatch):
    from jaxserve.server.__main__ import _build_models

    failed, shut = [], []

    class Loop:
        def call_soon_threadsafe(self, fn, *args):
            fn(*args)

    class State:
        def set_engine_failed(self, message):
            failed.append(message)

        def set_models(self, engines):
            raise AssertionError("must not be ready")

    missing = str(tmp_path / "no-such-model")
    good = FakeEngine()
    good.shutdown = lambda: shut.append("good")
    import jaxserve.engine

    real = jaxserve.engine.LLMEngine  # the second model loads for real, and fails
    monkeypatch.setattr(jaxserve.engine, "LLMEngine",
                        lambda cfg, warmup: good if cfg.model == "good" else real(cfg, warmup=False))
    _build_models([("first", EngineConfig(model="good")), ("second", EngineConfig(model=missing))], [], Loop(),
                  State())
    assert len(failed) == 1 and failed[0].startswith(f"model 'second' ({missing}): ValueError"), failed
    assert shut == ["good"]  # the engines already built are shut down
