"""The attention backend registry through the public entry points: `LLM(attention_backend=...)` / EngineConfig.

On CPU `pallas` runs the GPU kernels in interpret mode (slow but exact), so these tests use the tiny model
(8 query / 4 KV heads, head_dim 8) with few buckets. Under tensor parallelism the kernels run per device
inside `shard_map` (`sharding.shard_attention`); each case must give the tokens of the XLA path at TP = 1
and compile nothing after warm-up.
"""

from __future__ import annotations

import jax
import pytest

from jaxserve import LLM, SamplingParams
from jaxserve.config import ATTENTION_BACKENDS, EngineConfig
from jaxserve.model import attention_backends as backends
from jaxserve.model.attention import paged_attention_xla

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
# The random model falls into loops within 12 tokens, which the n-gram proposer then proposes.
PROMPTS = [list(range(5, 24)), [40, 41, 42]]
# 2 rows, 16 tokens a step: 5 step shapes (+ 2 verify shapes with 2 speculative tokens); the 19-token prompt
# is prefilled in two chunks.
TINY_ENGINE = dict(max_num_seqs=2, max_num_batched_tokens=16, max_model_len=64, num_pages=24, block_size=4)


def test_registry_matches_the_flag_and_resolves_per_platform():
    assert ATTENTION_BACKENDS == ("auto", *backends.BACKENDS)
    native = "native" if backends.native_available() else "xla"
    assert backends.resolve_attention_backend("auto", "cpu") == native
    assert backends.resolve_attention_backend("native", "cpu") == native
    assert backends.resolve_attention_backend("pallas", "cpu") == "pallas"
    with pytest.raises(ValueError, match="native is a CPU kernel"):
        backends.resolve_attention_backend("native", "tpu")
    assert backends.select_attention("xla", "tpu") == ("xla", paged_attention_xla)
    name, fn = backends.select_attention("pallas", "cuda")
    assert name == "pallas" and fn is backends.make_pallas_attention(platform="gpu")  # stable: jit caches hit
    assert fn.keywords["platform"] == "gpu"
    with pytest.raises(ValueError, match="auto, xla, pallas, native"):
        backends.resolve_attention_backend("triton")
    with pytest.raises(ValueError, match="attention_backend must be one of"):
        EngineConfig(attention_backend="triton")


def test_decode_split_heuristic():
    # decode at batch 4 over 32k tokens, 8 KV heads: split until ~512 programs, at most 16 splits
    assert backends.decode_num_splits(4, 8, 32768, 64) == 16
    assert backends.decode_num_splits(256, 8, 32768, 64) == 1
    assert backends.decode_num_splits(1, 1, 256, 128) == 1


@pytest.mark.slow
@pytest.mark.parametrize("platform", ["gpu", "tpu"])
def test_start_up_probe_runs_in_interpret_mode(platform):
    backends.probe_kernels(platform, backends.ProbeShape(num_kv_heads=2, group=3, head_dim=64, kv_dtype="int8"),
                           interpret=True)


def test_auto_falls_back_to_xla_naming_the_error(tiny_checkpoint, monkeypatch, caplog):
    """`auto` on a "GPU" whose kernels do not compile: here the probe really runs the Triton kernels on CPU
    (not interpreted), which fails, and the engine comes up on XLA with a warning naming that error."""
    backends.probe_error.cache_clear()
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    llm = LLM(str(tiny_checkpoint), attention_backend="auto", dtype="float32", warmup=False, **TINY_ENGINE)
    monkeypatch.undo()
    backends.probe_error.cache_clear()
    assert llm.engine.runner.attention_backend == "xla"
    warning = next(r for r in caplog.records if "failed the start-up probe on gpu" in r.getMessage())
    assert "falling back to XLA" in warning.getMessage() and "Error" in warning.getMessage()


def test_native_falls_back_to_xla_where_the_kernel_cannot_build(monkeypatch):
    monkeypatch.setattr(backends, "native_available", lambda: False)
    assert backends.resolve_attention_backend("auto", "cpu") == "xla"
    assert backends.resolve_attention_backend("native", "cpu") == "xla"


@pytest.fixture(scope="module")
def xla_tp1_tokens(tiny_checkpoint):
    out = {}
    for kv in ("auto", "int8"):
        llm = LLM(str(tiny_checkpoint), attention_backend="xla", kv_cache_dtype=kv, warmup=False, **TINY_ENGINE)
        out[kv] = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("kv_cache_dtype,speculative", [("auto", False), ("int8", True)])
def test_pallas_under_tp2_matches_xla_tp1_and_compiles_nothing_after_warmup(tiny_checkpoint, xla_tp1_tokens,
                                                                             kv_cache_dtype, speculative):
    """The kernels per device in shard_map at TP = 2, chunked prefill, float32 or int8 KV pages, and (int8)
    speculative verify steps (n-gram proposals; greedy verification keeps the plain greedy tokens)."""
    spec = dict(speculative_method="ngram", num_speculative_tokens=2) if speculative else {}
    llm = LLM(str(tiny_checkpoint), attention_backend="pallas", tensor_parallel_size=2, kv_cache_dtype=kv_cache_dtype,
              **spec, **TINY_ENGINE)
    runner = llm.engine.runner
    assert runner.attention_backend == "pallas" and runner.plan.tensor_parallel_size == 2
    compiled = runner.num_compiled()
    # Warm-up compiled every bucket once, for the plain step and (speculative) the verify step too.
    assert compiled == len(runner.buckets.shapes()) * (2 if speculative else 1)
    got = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
    assert got == xla_tp1_tokens[kv_cache_dtype]
    assert runner.num_compiled() == compiled  # every shape, verify steps included, was compiled at warm-up
    if speculative:
        assert llm.engine.spec.stats.num_draft_tokens > 0  # verify steps really ran


@pytest.mark.parametrize("kv_cache_dtype,tensor_parallel_size", [("auto", 1), ("bf16", 1), ("bf16", 2)])
def test_native_matches_xla_through_llm(tiny_checkpoint, xla_tp1_tokens, kv_cache_dtype, tensor_parallel_size):
    """`LLM(attention_backend="native")`, the CPU default: chunked prefill and decode give the XLA path's greedy
    tokens (float32 pages exactly; bfloat16 pages, written by the native KV write on one device and by XLA under
    TP = 2 with the kernel per device in shard_map, within a tolerance of the float32 run's tokens), and nothing
    compiles after warm-up."""
    if not backends.native_available():
        pytest.skip("the native CPU attention does not build here")
    llm = LLM(str(tiny_checkpoint), attention_backend="native", kv_cache_dtype=kv_cache_dtype,
              tensor_parallel_size=tensor_parallel_size, dtype="float32", **TINY_ENGINE)
    runner = llm.engine.runner
    assert runner.attention_backend == "native"
    compiled = runner.num_compiled()
    got = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
    want = xla_tp1_tokens["auto"]
    if kv_cache_dtype == "auto":
        assert got == want
    else:  # bfloat16 pages round K/V; the first tokens must still agree
        assert [g[:4] for g in got] == [w[:4] for w in want]
    assert runner.num_compiled() == compiled
