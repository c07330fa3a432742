"""schemathesis against the served /openapi.json (issue 20): every operation, a fixed number of generated
requests each (seeded), valid and invalid, against a real server process on the tiny random model. Each
answer must not be a server error and must agree with the document (status code declared, body matching
its schema, content type, headers), and a request the document forbids must get a 4xx. Not checked: that
every request the document allows gets a 2xx (schemathesis's `positive_data_acceptance`), since a valid body
can still be refused for what a schema cannot say (prompt + max_tokens over the context, a guardrail).
Afterwards no step compiled after warm-up and every KV page is back.

The document is read from the running server, so fields other engineers add are fuzzed as soon as the
document describes them. Bounded to about a minute on 2 cores: a 64-token context keeps generations short.
"""

from __future__ import annotations

import copy
import json
import re
import urllib.request

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.generation.modes import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance

from server_process import running_server

EXAMPLES_PER_OPERATION = 40
SEED = 20


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    args = [str(tiny_checkpoint), "--host", "127.0.0.1", "--port", "0", "--max-model-len", "64",
            "--max-num-seqs", "4", "--max-num-batched-tokens", "32", "--num-pages", "40",
            "--max-seqs-per-request", "8", "--guardrails", "--request-timeout", "30"]
    with running_server(args, tmp_path_factory.mktemp("contract") / "server.log") as srv:
        yield srv


def _schema(doc: dict, url: str):
    schema = schemathesis.openapi.from_dict(doc)
    schema.config.update(base_url=url)
    schema.config.seed = SEED
    return schema


@pytest.fixture(scope="module")
def api_schemas(server):
    """The served document for invalid requests; for valid ones, aimed where bugs are: `model` is the served
    name and max_tokens small, so most valid bodies generate instead of stopping at a 404 or a context 400."""
    doc = json.load(urllib.request.urlopen(f"{server.url}/openapi.json", timeout=10))
    served = json.load(urllib.request.urlopen(f"{server.url}/v1/models", timeout=10))["data"][0]["id"]
    aimed = copy.deepcopy(doc)
    for name in ("CompletionRequest", "ChatCompletionRequest"):
        props = aimed["components"]["schemas"][name]["properties"]
        props["model"] = {"const": served}
        for field in ("max_tokens", "max_completion_tokens"):
            if field in props:
                props[field] = {"type": "integer", "minimum": 1, "maximum": 8}
        props["n"], props["priority"] = {"type": "integer", "minimum": 1, "maximum": 4}, {"const": 0}
    return {GenerationMode.POSITIVE: _schema(aimed, server.url), GenerationMode.NEGATIVE: _schema(doc, server.url)}


# NOTE: schemathesis's pytest plugin reads a pytest attribute that pytest 9 removed, so the cases are drawn with
# hypothesis here, from the strategies schemathesis builds for each operation.
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_every_answer_agrees_with_the_document_and_none_is_a_server_error(api_schemas, mode):
    failures = {}
    for result in api_schemas[mode].get_all_operations():
        operation = result.ok()

        @settings(max_examples=EXAMPLES_PER_OPERATION, derandomize=True, deadline=None, database=None,
                  phases=[Phase.generate], suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy(generation_mode=mode))
        def check(case):
            case.call_and_validate(timeout=60, excluded_checks=[positive_data_acceptance])

        try:
            check()
        except Unsatisfiable:  # nothing to negate (no parameters, or a free-form string): nothing to send
            assert mode == GenerationMode.NEGATIVE, operation.label
        except (Exception, BaseExceptionGroup) as e:  # every operation runs; the first failure of each is reported
            failures[operation.label] = f"{type(e).__name__}: {e}"[:2000]
    assert not failures, "\n\n".join(f"{label}: {text}" for label, text in failures.items())


def _metrics(url: str) -> dict[str, float]:
    text = urllib.request.urlopen(f"{url}/metrics", timeout=10).read().decode()
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^jaxserve:(\w+)\{[^}]*\} (\S+)$", text, re.M)}


def test_afterwards_nothing_compiled_and_every_page_is_back(server):
    import time

    deadline = time.monotonic() + 30
    while True:
        m = _metrics(server.url)
        if m["num_requests_running"] == m["num_requests_waiting"] == m["kv_cache_used_pages"] == 0:
            break
        assert time.monotonic() < deadline, m
        time.sleep(0.2)
    assert m["engine_compiles_after_warmup"] == 0
    assert "Traceback" not in server.log()
