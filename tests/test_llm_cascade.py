"""`LLM(cascade=...)`: the offline API holds the server's cascade (tiny random model as both members)."""

from __future__ import annotations

import math

import pytest

from jaxserve import LLM, SamplingParams
from jaxserve.cascade import CascadePolicy


def test_llm_cascade_answers_from_either_model(tiny_checkpoint):
    llm = LLM(str(tiny_checkpoint), cascade={"small": str(tiny_checkpoint), "threshold": -math.inf},
              max_num_seqs=2, max_num_batched_tokens=32, max_model_len=128, kv_cache_memory=4 * 2**20,
              dtype="float32", warmup=False)
    params = SamplingParams(temperature=0.0, max_tokens=4)
    kept = llm.generate(["The capital of France is", "One two"], params, use_tqdm=False)
    assert [o.answered_by for o in kept] == ["small", "small"]
    assert all(o.outputs[0].logprobs is None for o in kept)  # asked for by the cascade, not by the caller
    llm.engine.policy = CascadePolicy(threshold=0.0)  # every answer's logprob is below 0: always escalate
    escalated = llm.generate(["The capital of France is"], params, use_tqdm=False)
    assert escalated[0].answered_by == "large"
    assert escalated[0].outputs[0].token_ids == kept[0].outputs[0].token_ids  # the same weights, greedy
    assert (llm.engine.stats.answered_small, llm.engine.stats.answered_large) == (2, 1)
    with pytest.raises(ValueError, match="small"):
        LLM(str(tiny_checkpoint), cascade={"threshold": -1.0}, warmup=False, max_model_len=128,
            kv_cache_memory=4 * 2**20)
