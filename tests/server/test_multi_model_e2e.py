"""`python -m jaxserve.server` with two models and two cascades over them, through the official openai client.

Two tiny random models (same tokenizer, different weights, so their greedy answers differ). The cascade
`keep` (threshold -inf) never escalates and `escalate` (threshold 0: every answer's logprob is below it)
always does, so both members answer through a cascade, and the response says which.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import urllib.request

import openai
import pytest

from conftest import TINY, random_weights
from server_process import running_server

ARGS = ["--host", "127.0.0.1", "--port", "0", "--max-num-seqs", "2", "--max-num-batched-tokens", "32",
        "--max-model-len", "128", "--kv-cache-memory", "8MiB", "--dtype", "float32"]


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    from jaxserve.model.checkpoint import read_config, save_checkpoint

    other = tmp_path_factory.mktemp("tiny_b")
    cfg = dataclasses.replace(TINY, vocab_size=read_config(tiny_checkpoint)[0].vocab_size)
    save_checkpoint(other, cfg, random_weights(cfg, 12), source={"format": "random"})
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_checkpoint / name, other / name)
    args = [str(tiny_checkpoint), "--served-model-name", "a", "--add-model", f"b={other},memory_share=0.5",
            "--cascade", "keep=a,b,threshold=-inf", "--cascade", "escalate=a,b,threshold=0", *ARGS]
    log = tmp_path_factory.mktemp("multi") / "server.log"
    with running_server(args, log, 300.0) as srv:
        yield srv


def complete(client: openai.OpenAI, model: str):
    return client.completions.with_raw_response.create(model=model, prompt="The capital of France is",
                                                       max_tokens=6, temperature=0.0)


@pytest.mark.slow
def test_two_models_and_two_cascades_answer_by_name(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)
    assert [m.id for m in client.models.list().data] == ["a", "b", "keep", "escalate"]
    raw = {name: complete(client, name) for name in ("a", "b", "keep", "escalate")}
    text = {name: r.parse().choices[0].text for name, r in raw.items()}
    assert text["a"] != text["b"]  # two different models answered
    assert raw["a"].parse().model == "a" and raw["b"].parse().model == "b"
    assert (text["keep"], raw["keep"].parse().model_extra["answered_by"]) == (text["a"], "a")
    assert (text["escalate"], raw["escalate"].parse().model_extra["answered_by"]) == (text["b"], "b")
    assert raw["escalate"].headers["x-jaxserve-answered-by"] == "b"
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="c", prompt="hi", max_tokens=2)
    assert all(f"'{n}'" in e.value.message for n in ("a", "b", "keep", "escalate"))

    with urllib.request.urlopen(server.url + "/metrics", timeout=30) as resp:
        metrics = resp.read().decode()
    assert 'cascade_escalations_total{model_name="escalate"} 1.0' in metrics
    assert 'cascade_escalations_total{model_name="keep"} 0.0' in metrics
    for name in ("a", "b"):  # each engine's own KV pool (8 MiB split in two)
        assert f'kv_cache_total_pages{{model_name="{name}"}}' in metrics
    assert json.loads(urllib.request.urlopen(server.url + "/health", timeout=30).read())["status"] == "ok"
