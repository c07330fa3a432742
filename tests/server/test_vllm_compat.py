"""A drop-in for vLLM users: their command lines, their dashboard's metrics, their client calls (fake engine)."""

from __future__ import annotations

import argparse
import json
import logging
import shlex
from pathlib import Path

import pytest
from openai import AsyncOpenAI

from jaxserve.config import EngineConfig, kv_budget_bytes, speculative_fields
from jaxserve.server.__main__ import build_parser, configs_from_args, parse_args
from jaxserve.server.middleware import CorsConfig
from jaxserve.text.chat_template import load_chat_template
from jaxserve.text.generation_config import sampling_defaults

from conftest import FakeEngine, async_test, error_of, expected, serving

DATA = Path(__file__).parent.parent / "data"


def _commands() -> list[tuple[str, str]]:
    out = []
    for line in (DATA / "vllm_serve_commands.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            flag, _, command = line.partition(" | ")
            out.append((flag.strip(), command.strip()))
    return out


def _our_argv(command: str) -> list[str]:
    """`vllm serve MODEL ...` / `python -m vllm.entrypoints.openai.api_server ...` → what follows."""
    tokens = shlex.split(command)
    for i, token in enumerate(tokens):
        if token == "serve" or token.endswith("api_server"):
            return tokens[i + 1:]
    raise AssertionError(f"not a vllm command line: {command}")


# ---------------------------------------------------------------------------- the command line

def test_a_dozen_vllm_command_lines_from_the_docs_parse_or_name_their_one_unsupported_flag(capsys):
    commands = _commands()
    assert len(commands) >= 12
    for unsupported, command in commands:
        argv = _our_argv(command)
        if unsupported == "-":
            engine, serving = configs_from_args(parse_args(argv))
            assert engine.model == argv[0] or "--model" in argv, command
            continue
        with pytest.raises((SystemExit, ValueError)) as info:
            configs_from_args(parse_args(argv))
        message = capsys.readouterr().err if info.type is SystemExit else str(info.value)
        assert unsupported in message, (command, message)


def test_vllm_spellings_map_onto_our_fields():
    args = parse_args(["serve", "Qwen/Qwen3-4B", "-tp", "1", "--gpu_memory_utilization=0.8", "--max-logprobs", "5",
                       "--speculative-config", '{"method": "ngram", "num_speculative_tokens": 3, '
                                               '"prompt_lookup_max": 5, "prompt_lookup_min": 2}',
                       "--dtype", "float", "--served-model-name", "a", "b", "--enable-chunked-prefill",
                       "--allowed-origins", '["https://app.example"]'])
    engine, serving = configs_from_args(args)
    assert (engine.model, engine.tensor_parallel_size, engine.gpu_memory_utilization, engine.max_logprobs,
            engine.dtype) == ("Qwen/Qwen3-4B", 1, 0.8, 5, "float32")
    assert (engine.spec_method, engine.num_speculative_tokens, engine.ngram_prompt_lookup_max,
            engine.ngram_prompt_lookup_min) == ("ngram", 3, 5, 2)
    assert serving.model_names == ("a", "b") and serving.cors.allowed_origins == ("https://app.example",)
    assert speculative_fields({"model": "draft", "num_speculative_tokens": 2}) == {
        "speculative_method": "draft", "speculative_model": "draft", "num_speculative_tokens": 2}
    with pytest.raises(ValueError, match="eagle"):
        speculative_fields({"method": "eagle", "model": "x"})


def test_refused_flags_say_what_to_use_instead(capsys):
    for argv, advice in ((["--enforce-eager"], "--compilation-cache-dir"), (["--swap-space", "4"], "recomputed"),
                         (["--enable-chunked-prefill=false"], "always"), (["--no-enable-chunked-prefill"], "always on"),
                         (["--quantization", "awq"], "invalid choice")):
        with pytest.raises(SystemExit):
            parse_args(argv)
        err = capsys.readouterr().err
        assert argv[0].split("=")[0] in err and advice in err, err


def test_every_flag_has_help_text_with_its_default():
    parser = build_parser()
    for action in parser._actions:
        if action.help == argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
            continue
        assert action.help and not action.help.startswith("EngineConfig."), action.option_strings
    text = parser.format_help()
    assert "(default: 0.9" not in text  # None: the device decides; shown as such
    assert "--gpu-memory-utilization" in text and "--max-num-seqs" in text and "(default: 16)" in text


def test_guardrails_are_off_unless_asked_and_each_stage_is_its_own_flag():
    _, serving = configs_from_args(parse_args([]))
    assert not serving.guardrails.enabled
    _, serving = configs_from_args(parse_args(["--guardrails"]))
    g = serving.guardrails
    assert g.enabled and g.input_length and g.injection and g.content_policy and g.pii
    _, serving = configs_from_args(parse_args(["--guardrail-pii"]))
    g = serving.guardrails
    assert g.enabled and g.pii and not (g.injection or g.content_policy or g.input_length)
    _, serving = configs_from_args(parse_args(["--guardrails", "--no-guardrail-injection"]))
    assert serving.guardrails.pii and not serving.guardrails.injection


def test_kv_budget_and_cpu_default():
    # 80 GiB device at 0.9 with 10 GiB of weights and 1 GiB of activations: 72 - 10 - 1 = 61 GiB of KV.
    assert kv_budget_bytes(total=80 * 2**30, in_use=10 * 2**30, utilization=0.9,
                           activation_bytes=2**30) == 61 * 2**30 + int(0.9 * 80 * 2**30) - 72 * 2**30
    assert kv_budget_bytes(total=2**30, in_use=2**30, utilization=0.5, activation_bytes=0) == 0
    assert EngineConfig().kv_cache_memory is None and EngineConfig().cache.kv_cache_memory == 2**30
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        EngineConfig(gpu_memory_utilization=1.5)
    with pytest.raises(ValueError, match="max_logprobs"):
        EngineConfig(max_logprobs=21)


def test_chat_template_file_or_inline_and_generation_config(tmp_path):
    (tmp_path / "t.jinja").write_text("{{ messages[0]['content'] }}")
    assert load_chat_template(str(tmp_path / "t.jinja")) == "{{ messages[0]['content'] }}"
    assert load_chat_template("{{ bos_token }}x") == "{{ bos_token }}x"
    with pytest.raises(ValueError, match="does not exist"):
        load_chat_template(str(tmp_path / "missing.jinja"))
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"temperature": 0.6, "top_p": 0.9, "max_new_tokens": 7, "bos_token_id": 1, "do_sample": True}))
    assert sampling_defaults("auto", tmp_path) == {"temperature": 0.6, "top_p": 0.9, "max_tokens": 7}
    assert sampling_defaults(str(tmp_path), None) == sampling_defaults("auto", tmp_path)
    assert sampling_defaults("vllm", tmp_path) == {}
    assert sampling_defaults("auto", tmp_path / "nothing-here") == {}
    with pytest.raises(ValueError, match="generation-config"):
        sampling_defaults(str(tmp_path / "nothing-here"), None)


# ---------------------------------------------------------------------------- metrics

def _series(text: str) -> list[tuple[str, dict[str, str]]]:
    out = []
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, rest = line.partition("{")
            labels = dict(kv.split("=", 1) for kv in rest.partition("}")[0].split(",") if "=" in kv)
            out.append((name.split(" ")[0], {k: v.strip('"') for k, v in labels.items()}))
    return out


@async_test
async def test_every_name_and_label_of_vllms_dashboard_resolves_with_the_vllm_prefix():
    async with serving(metrics_prefix="vllm", served_model_name="smol") as c:
        for stream in (False, True):
            resp = await c.post("/v1/completions", json={"prompt": "ab", "max_tokens": 3, "stream": stream})
            await resp.read()
        series = _series(await (await c.get("/metrics")).text())
    assert series and all(labels.get("model_name") == "smol" for _, labels in series)
    assert all(name.startswith("vllm:") for name, _ in series)
    wanted = [line.split() for line in (DATA / "vllm_dashboard_metrics.txt").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    for name, *labels in wanted:
        if name == "label":
            continue
        matches = [lab for n, lab in series if n == name]
        assert matches, f"{name} is missing from /metrics"
        assert all(label in lab for label in labels for lab in matches), (name, labels)
    names = {n for n, _ in series}
    for name in ("vllm:iteration_tokens_total_bucket", "vllm:request_params_n_bucket",
                 "vllm:request_params_max_tokens_bucket", "vllm:request_inference_time_seconds_bucket"):
        assert name in names


@async_test
async def test_default_prefix_is_jaxserve_and_the_new_histograms_count_requests():
    async with serving() as c:
        await (await c.post("/v1/completions", json={"prompt": "ab", "max_tokens": 3, "n": 2})).read()
        text = await (await c.get("/metrics")).text()
    series = _series(text)
    assert all(n.startswith("jaxserve:") for n, _ in series)
    values = {line.split(" ")[0].split("{")[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line and not line.startswith("#") and "_bucket" not in line}
    assert values["jaxserve:request_params_n_count"] == 1 and values["jaxserve:request_params_n_sum"] == 2
    assert values["jaxserve:request_params_max_tokens_sum"] == 3
    assert values["jaxserve:request_decode_time_seconds_count"] == 2
    assert values["jaxserve:request_prefill_time_seconds_count"] == 2
    assert "Prompt tokens of admitted requests" in text


# ---------------------------------------------------------------------------- HTTP

@async_test
async def test_openai_client_models_retrieve_and_aliases():
    async with serving(served_model_name="smol", model_aliases=("smol-alias",)) as c:
        client = AsyncOpenAI(base_url=str(c.make_url("/v1")), api_key="x", max_retries=0, timeout=10)
        model = await client.models.retrieve("smol")
        assert model.id == "smol" and model.owned_by == "jaxserve"
        assert (await client.models.retrieve("smol-alias")).id == "smol-alias"
        resp = await c.get("/v1/models/nope")
        assert resp.status == 404 and error_of(await resp.json())["code"] == "model_not_found"
        body = await (await c.post("/v1/completions", json={"model": "smol-alias", "prompt": "ab",
                                                            "max_tokens": 2})).json()
        assert body["choices"][0]["text"] == expected("ab", 2)


@async_test
async def test_cors_preflight_and_response_headers():
    cors = CorsConfig(allowed_origins=("https://app.example",))
    async with serving(cors=cors, api_keys=("k",)) as c:
        preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
                     "Access-Control-Request-Headers": "authorization, content-type"}
        resp = await c.options("/v1/chat/completions", headers=preflight)  # no API key: preflights carry none
        assert resp.status == 200
        assert resp.headers["Access-Control-Allow-Origin"] == "https://app.example"
        assert "POST" in resp.headers["Access-Control-Allow-Methods"]
        assert resp.headers["Access-Control-Allow-Headers"] == "authorization, content-type"
        resp = await c.options("/v1/chat/completions", headers={**preflight, "Origin": "https://evil.example"})
        assert resp.status == 400 and "Access-Control-Allow-Origin" not in resp.headers
        resp = await c.post("/v1/completions", json={"prompt": "ab", "max_tokens": 2, "stream": True},
                            headers={"Origin": "https://app.example", "Authorization": "Bearer k"})
        await resp.read()
        assert resp.status == 200 and resp.headers["Access-Control-Allow-Origin"] == "https://app.example"
    async with serving() as c:  # no --allowed-origins: no CORS headers
        resp = await c.get("/health", headers={"Origin": "https://app.example"})
        assert "Access-Control-Allow-Origin" not in resp.headers


@async_test
async def test_docs_page_is_self_contained_and_listed_in_openapi():
    async with serving() as c:
        resp = await c.get("/docs")
        html = await resp.text()
        assert resp.status == 200 and resp.content_type == "text/html"
        assert "openapi.json" in html and "http://" not in html and "https://" not in html and "src=" not in html
        spec = await (await c.get("/openapi.json")).json()
        assert "/docs" in spec["paths"] and "/v1/models/{model}" in spec["paths"]


@async_test
async def test_request_id_is_propagated_and_the_access_log_has_one_line_per_request(caplog):
    caplog.set_level(logging.INFO, logger="jaxserve.access")
    async with serving(FakeEngine()) as c:
        resp = await c.post("/v1/completions", json={"prompt": "secret prompt", "max_tokens": 3},
                            headers={"X-Request-Id": "abc-123"})
        body = await resp.json()
        assert resp.headers["X-Request-Id"] == "abc-123" and body["id"] == "cmpl-abc-123"
        assert c.engine.added[-1][0] == "cmpl-abc-123"
        resp = await c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                          "max_tokens": 2, "stream": True},
                            headers={"X-Request-Id": "chat-1"})
        await resp.read()
        assert resp.headers["X-Request-Id"] == "chat-1"
        resp = await c.get("/health")
        assert len(resp.headers["X-Request-Id"]) == 32  # made up
        resp = await c.post("/v1/completions", json={"prompt": 5})
        assert resp.status == 400
    lines = [r.getMessage() for r in caplog.records if r.name == "jaxserve.access"]
    assert len(lines) == 4, lines
    assert lines[0].startswith("POST /v1/completions 200 prompt_tokens=13 completion_tokens=3 latency=")
    assert lines[0].endswith("request_id=abc-123")
    assert lines[1].startswith("POST /v1/chat/completions 200") and lines[1].endswith("request_id=chat-1")
    assert lines[2].startswith("GET /health 200 prompt_tokens=- completion_tokens=-")
    assert lines[3].startswith("POST /v1/completions 400")
    assert not any("secret" in line for line in lines)


@async_test
async def test_generation_config_defaults_fill_only_the_fields_a_request_leaves_out():
    engine = FakeEngine()
    engine.default_sampling = {"max_tokens": 4, "temperature": 0.5}
    async with serving(engine) as c:
        body = await (await c.post("/v1/completions", json={"prompt": "ab"})).json()
        assert body["choices"][0]["text"] == expected("ab", 4)
        assert engine.added[-1][2].temperature == 0.5
        body = await (await c.post("/v1/completions", json={"prompt": "ab", "max_tokens": 2,
                                                            "temperature": 0})).json()
        assert body["choices"][0]["text"] == expected("ab", 2) and engine.added[-1][2].temperature == 0


@async_test
async def test_vllms_extra_sampling_fields_reach_the_engine_over_http():
    engine = FakeEngine(max_model_len=64)
    async with serving(engine) as c:
        body = {"prompt": "x" * 200, "max_tokens": 3, "skip_special_tokens": False, "include_stop_str_in_output": True,
                "bad_words": ["foo", " bar baz"], "truncate_prompt_tokens": 5}
        resp = await c.post("/v1/completions", json=body)
        out = await resp.json()
        assert resp.status == 200 and out["usage"]["prompt_tokens"] == 5  # truncated before the context check
        params = engine.added[-1][2]
        assert (params.skip_special_tokens, params.include_stop_str_in_output, params.bad_words,
                params.truncate_prompt_tokens) == (False, True, ("foo", " bar baz"), 5)
        assert len(engine.added[-1][1]) == 5
        chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "bad_words": ["x"]}
        assert (await c.post("/v1/chat/completions", json=chat)).status == 200
        assert engine.added[-1][2].bad_words == ("x",)
        for field, value in (("bad_words", "foo"), ("bad_words", [" "]), ("bad_words", ["w"] * 129),
                             ("skip_special_tokens", "no"), ("truncate_prompt_tokens", 0)):
            resp = await c.post("/v1/completions", json={"prompt": "ab", field: value})
            assert resp.status == 400 and error_of(await resp.json())["param"] == field, (field, value)
        spec = await (await c.get("/openapi.json")).json()
        props = spec["components"]["schemas"]["CompletionRequest"]["properties"]
        assert {"skip_special_tokens", "include_stop_str_in_output", "bad_words", "truncate_prompt_tokens"} \
            <= set(props)
