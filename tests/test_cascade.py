"""The cascade over two fake engines (outputs computable by hand): who answers, what the caller sees, aborts,
and the counters. The small engine is unsure (logprob -3 per token) of prompts containing "hard"."""

from __future__ import annotations

import dataclasses
import math
import time

import pytest

from jaxserve.cascade import CascadeEngine, CascadePolicy
from jaxserve.core.sampling_params import SamplingParams

from conftest import FakeEngine, expected


class UnsureEngine(FakeEngine):
    """A FakeEngine whose sampled-token logprob is -3 on prompts containing "hard" (-0.25 otherwise)."""

    def _send(self, req, tokens, text, logprobs, reason, error=None):
        if logprobs and "hard" in self.tokenizer.decode(req.prompt):
            logprobs = [dataclasses.replace(e, logprob=-3.0) for e in logprobs]
        super()._send(req, tokens, text, logprobs, reason, error)


@pytest.fixture
def cascade():
    small, large = UnsureEngine(), FakeEngine()
    large.scripts["a hard one"] = "LARGE"
    small.start()
    large.start()
    try:
        yield CascadeEngine(small, large, CascadePolicy(threshold=-1.0), small_name="s", large_name="l")
    finally:
        small.shutdown()
        large.shutdown()


def collect(stream, timeout: float = 10.0) -> tuple[str, list]:
    deltas = []
    deadline = time.monotonic() + timeout
    open_ = stream.n
    while open_:
        d = stream.get(timeout=max(0.01, deadline - time.monotonic()))
        deltas.append(d)
        open_ -= d.finished
    return "".join(d.new_text for d in deltas), deltas


def test_a_confident_answer_stays_small_without_the_logprobs_it_did_not_ask_for(cascade):
    stream = cascade.add_request("easy", SamplingParams(max_tokens=4), request_id="r1")
    text, deltas = collect(stream)
    assert text == expected("easy", 4)
    assert stream.answered_by == "s" and stream.signal == pytest.approx(-0.25)
    assert all(d.logprobs is None for d in deltas)  # the cascade asked for them, the caller did not
    assert cascade.small.added[0][2].logprobs == 0 and cascade.large.added == []
    assert (cascade.stats.answered_small, cascade.stats.answered_large) == (1, 0)
    assert cascade.stats.kept_tokens == cascade.stats.small_tokens == 4 + 4


def test_an_unsure_answer_escalates_to_the_large_model(cascade):
    stream = cascade.add_request("a hard one", SamplingParams(max_tokens=8, logprobs=1), request_id="r2")
    text, deltas = collect(stream)
    assert text == "LARGE" and stream.answered_by == "l" and stream.signal == pytest.approx(-3.0)
    assert [a[0] for a in cascade.large.added] == ["r2"] and cascade.large.added[0][2].logprobs == 1
    assert all(d.request_id == "r2" for d in deltas) and deltas[-1].finish_reason == "stop"
    assert (cascade.stats.answered_small, cascade.stats.answered_large) == (0, 1)
    assert cascade.stats.large_tokens == len("a hard one") + 5


def test_min_logprob_signal_and_n_choices_take_the_worst(cascade):
    cascade.policy = CascadePolicy(threshold=-0.1, signal="min_logprob")
    stream = cascade.add_request("easy", SamplingParams(max_tokens=2, n=2), request_id="r3")
    collect(stream)
    assert stream.answered_by == "l"  # -0.25 < -0.1
    assert CascadePolicy().score([]) == math.inf
    with pytest.raises(ValueError, match="signal"):
        CascadePolicy(signal="entropy")
    with pytest.raises(ValueError, match="log-probability"):
        CascadePolicy(threshold=0.5)


def test_abort_while_the_small_model_runs_ends_the_stream_without_escalating():
    small, large = UnsureEngine(step_delay=0.02), FakeEngine()
    small.start()
    large.start()
    try:
        c = CascadeEngine(small, large, CascadePolicy(threshold=-1.0))
        stream = c.add_request("a hard one", SamplingParams(max_tokens=200), request_id="r4")
        time.sleep(0.1)
        c.abort("r4")
        _, deltas = collect(stream)
        assert deltas[-1].finish_reason == "abort" and large.added == [] and stream.answered_by == "small"
        assert small.kv_cache.pool.num_used_pages == 0
    finally:
        small.shutdown()
        large.shutdown()


def test_models_with_different_tokenizers_are_refused():
    class Other(FakeEngine):
        pass

    other = Other()
    other.tokenizer = dataclasses.make_dataclass("T", [("vocab_size", int, 5)])()
    with pytest.raises(ValueError, match="share a tokenizer"):
        CascadeEngine(FakeEngine(), other)
