"""Tensor and data parallelism on the 8 virtual CPU devices of conftest.py.

A tiny random model with 8 query / 4 KV heads runs at TP = 2, 4, 8 (8 repeats each KV head) and on data x
model meshes, and must match the unsharded model; the real SmolLM2 (9 / 3 heads) runs at TP = 3 through the
engine and must give the same greedy tokens as TP = 1. The placement of every weight and of the KV pages is
checked shard by shard, and the compiled step's HLO must hold exactly two all-reduces per layer.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxserve import LLM, SamplingParams
from jaxserve.config import EngineConfig, ModelConfig
from jaxserve.model import llama, sharding
from jaxserve.model import quantization as qz
from jaxserve.model.attention import paged_attention_xla
from jaxserve.model.checkpoint import read_config, save_checkpoint
from jaxserve.model.sampler import RowSampling
from jaxserve.model.step_inputs import SeqChunk, build_step_inputs
from jaxserve.model.weight_info import named
from jaxserve.worker.model_runner import ModelRunner

from conftest import TINY, random_weights

PAGE = 4
NUM_PAGES = 12
MESHES = [(2, 1), (4, 1), (8, 1), (2, 4)]  # (tensor, data)


@pytest.fixture(scope="module")
def tiny_weights():
    return random_weights(TINY, 7)


def two_steps():
    """A prefill of two sequences (one chunked), then a decode step that reads what the prefill wrote."""
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, TINY.vocab_size, 11).tolist(), rng.integers(0, TINY.vocab_size, 6).tolist()
    tables = [[3, 1, 5, 7], [2, 9]]
    prefill = build_step_inputs([SeqChunk(a[:10], 0, tables[0]), SeqChunk(b[:5], 0, tables[1])], num_tokens=16,
                                num_rows=2, page_size=PAGE, max_pages_per_seq=8)
    # The same bucket as the prefill, so each mesh compiles one program.
    decode = build_step_inputs([SeqChunk(a[10:], 10, tables[0]), SeqChunk(b[5:], 5, tables[1])], num_tokens=16,
                               num_rows=2, page_size=PAGE, max_pages_per_seq=8)
    return prefill, decode


def run_two_steps(weights, tp: int, dp: int):
    """(logits of both steps, the KV cache after them, the plan, the compiled HLO text).

    Unsharded (plan None) when tp == dp == 1."""
    if (tp, dp) == (1, 1):
        plan, cfg = None, TINY
        fn = jax.jit(functools.partial(llama.forward, cfg=cfg, attention=paged_attention_xla))
        kv = jnp.zeros(llama.kv_cache_shape(cfg, NUM_PAGES, PAGE))
    else:
        plan = sharding.plan_sharding(TINY, tp, dp)
        cfg = sharding.serving_config(TINY, plan)
        infos = llama.weight_info(TINY)
        weights = sharding.repeat_kv_heads(jax.device_put(weights, plan.shardings(infos)), infos, plan)
        kv_sharding = sharding.kv_cache_sharding(plan)
        kv = jax.device_put(jnp.zeros(llama.kv_cache_shape(cfg, NUM_PAGES, PAGE)), kv_sharding)
        attention = sharding.shard_attention(paged_attention_xla, plan)
        fn = jax.jit(functools.partial(llama.forward, cfg=cfg, attention=attention, plan=plan),
                     in_shardings=(plan.shardings(llama.weight_info(cfg)), kv_sharding, plan.replicated),
                     out_shardings=(plan.replicated, kv_sharding))
    steps = two_steps()
    compiled = fn.lower(weights, kv, steps[0]).compile()  # both steps have the same shapes
    logits = []
    for step in steps:
        out, kv = compiled(weights, kv, step)
        logits.append(np.asarray(out))
    return logits, kv, plan, compiled.as_text()


@pytest.fixture(scope="module")
def reference(tiny_weights):
    logits, kv, _, _ = run_two_steps(tiny_weights, 1, 1)
    return logits, np.asarray(kv)


@pytest.mark.parametrize("tp,dp", MESHES)
def test_sharded_logits_and_kv_cache_match_one_device(tiny_weights, reference, tp, dp):
    ref_logits, ref_kv = reference
    logits, kv, plan, hlo = run_two_steps(tiny_weights, tp, dp)
    for got, want in zip(logits, ref_logits):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    if dp == 1:
        per_computation = collectives_by_computation(hlo)
        entry = per_computation.pop("ENTRY")
        # One computation (the scanned layer body, run L times) holds the per-layer collectives: exactly one
        # all-reduce after the attention block's row-parallel O projection, one after the MLP's down projection.
        assert [ops for ops in per_computation.values() if ops] == [["all-reduce", "all-reduce"]], per_computation
        # Outside the layers: the vocabulary-parallel embedding's all-reduce, and the logits gathered at the end.
        assert sorted(entry) == ["all-gather", "all-reduce"], entry
    # The cache: every device holds whole KV heads, K and V of each together. With repeated heads (TP=8: each
    # of the 4 heads twice) the served cache is the reference with each head's (K, V) pair repeated.
    r = plan.kv_replicas
    assert r == max(1, tp // TINY.num_kv_heads)
    L, Pn, ps, two_k, H = ref_kv.shape
    served = np.repeat(ref_kv.reshape(L, Pn, ps, two_k // 2, 2, H), r, axis=3).reshape(L, Pn, ps, two_k * r, H)
    assert kv.sharding.spec == P(None, None, None, "model", None)
    rows = two_k * r // tp  # 2 * (KV heads per device)
    model_index = {d: idx[1] for idx, d in np.ndenumerate(plan.mesh.devices)}
    assert len(kv.addressable_shards) == tp * dp
    for shard in kv.addressable_shards:
        j = model_index[shard.device]
        assert shard.data.shape == (L, Pn, ps, rows, H)
        np.testing.assert_allclose(np.asarray(shard.data), served[:, :, :, j * rows:(j + 1) * rows], atol=1e-5)


# The intended layout, written out by hand (not derived from the code under test).
EXPECTED_SPECS = {
    "embed": P("model", None),
    "lm_head": P(None, "model"),
    "final_norm": P(None),
    "layers.attn_norm": P(None, None),
    "layers.mlp_norm": P(None, None),
    "layers.wq": P(None, None, "model", None),
    "layers.wk": P(None, None, "model", None),
    "layers.wv": P(None, None, "model", None),
    "layers.wo": P(None, "model", None, None),
    "layers.w_gate": P(None, None, "model"),
    "layers.w_up": P(None, None, "model"),
    "layers.w_down": P(None, "model", None),
}


def tiny_runner(path, tp: int) -> ModelRunner:
    config = EngineConfig(model=str(path), tensor_parallel_size=tp, max_num_seqs=2, max_num_batched_tokens=16,
                          max_model_len=64, num_pages=24, block_size=PAGE)
    return ModelRunner(config, str(path))


@pytest.fixture(scope="module")
def runner_tp8(tiny_checkpoint):
    return tiny_runner(tiny_checkpoint, 8)


def test_runner_loads_into_shardings_and_compiles_two_all_reduces_per_layer(runner_tp8):
    runner, tp = runner_tp8, 8
    cfg = runner.model_config
    assert cfg.num_kv_heads == max(TINY.num_kv_heads, tp)  # TP=8: the 4 KV heads are each served twice
    for name, w in named(runner.weights).items():
        assert w.sharding.spec == EXPECTED_SPECS[name], name
        shape = named(llama.weight_info(cfg))[name].shape
        split = [s // tp if e == "model" else s for s, e in zip(shape, EXPECTED_SPECS[name])]
        assert {tuple(s.data.shape) for s in w.addressable_shards} == {tuple(split)}, name
        assert len({s.device for s in w.addressable_shards}) == tp
    assert runner.kv_pages.sharding.spec == P(None, None, None, "model", None)
    assert runner.kv_pages.addressable_shards[0].data.shape[3] == 2 * cfg.num_kv_heads // tp

    # Each device holds an eighth of every split weight: about an eighth of the model (norms are replicated).
    held = sharding.per_device_bytes(runner.weights)
    total = sum(np.prod(i.shape) * 4 for i in jax.tree.leaves(llama.weight_info(cfg)))
    assert len(held) == tp and len(set(held.values())) == 1 and total / tp <= held["0"] < 1.01 * total / tp

    hlo = runner.step_hlo(16, 2)
    per_computation = collectives_by_computation(hlo)
    entry = per_computation.pop("ENTRY", [])
    # The whole step, sampler included: still two all-reduces per layer, the embedding's all-reduce, and the
    # logits gathered over the vocabulary for sampling (which then runs replicated: no further collectives).
    # The prompt-logprob branch (a cond, taken only when a request asks) gathers its own [slots, V] logits,
    # never the LM head weight.
    assert sorted(ops for ops in per_computation.values() if ops) == [["all-gather"], ["all-reduce", "all-reduce"]]
    assert sorted(entry) == ["all-gather", "all-reduce"], entry
    gathered = re.findall(r"= f32\[(\d+),(\d+)\]\{[\d,]*\} all-gather\(", hlo)
    assert gathered and all(int(v) == cfg.vocab_size and int(m) != cfg.hidden_size for m, v in gathered), gathered


def collectives_by_computation(hlo: str) -> dict[str, list[str]]:
    """Collective ops of compiled HLO text, grouped by the computation they sit in ("ENTRY" for the entry)."""
    out: dict[str, list[str]] = {}
    name = None
    for line in hlo.splitlines():
        if line and not line.startswith(" ") and line.rstrip().endswith("{"):
            name = "ENTRY" if line.startswith("ENTRY") else line.split()[0].lstrip("%")
            out.setdefault(name, [])
        m = re.search(r"\b(all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)(-start)?\(", line)
        if m and name is not None:
            out[name].append(m.group(1))
    return out


@dataclasses.dataclass
class Chunk:  # what the runner reads of a scheduled chunk
    request_id: str
    token_ids: list[int]
    start_pos: int
    page_table: list[int]


def test_runner_tp8_samples_like_tp1(tiny_checkpoint, runner_tp8):
    rows = [RowSampling(params=SamplingParams(temperature=0.0, logprobs=5), seed=0, position=n) for n in (7, 3)]
    chunks = [Chunk("a", [5, 9, 200, 31, 7, 1, 44], 0, [1, 2]), Chunk("b", [8, 8, 3], 0, [3])]
    outs = [runner.execute(chunks, rows) for runner in (tiny_runner(tiny_checkpoint, 1), runner_tp8)]
    np.testing.assert_array_equal(outs[0].token_ids, outs[1].token_ids)
    np.testing.assert_array_equal(outs[0].top_ids, outs[1].top_ids)
    np.testing.assert_allclose(outs[0].top_logprobs, outs[1].top_logprobs, atol=1e-5)


# ---------------------------------------------------------------------- quantized weights and KV pages


def two_runner_steps(runner):
    """A prefill of two sequences, then a decode step reading what it wrote: outputs of both steps."""
    rows = [RowSampling(params=SamplingParams(temperature=0.0, logprobs=5), seed=0, position=n) for n in (7, 3)]
    prefill = [Chunk("a", [5, 9, 200, 31, 7, 1, 44], 0, [1, 2]), Chunk("b", [8, 8, 3], 0, [3])]
    first = runner.execute(prefill, rows)
    rows = [RowSampling(params=SamplingParams(temperature=0.0, logprobs=5), seed=0, position=n) for n in (8, 4)]
    decode = [Chunk("a", [int(first.token_ids[0])], 7, [1, 2]), Chunk("b", [int(first.token_ids[1])], 3, [3])]
    return first, runner.execute(decode, rows)


def assert_same_outputs(got, want):
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g.token_ids, w.token_ids)
        np.testing.assert_array_equal(g.top_ids, w.top_ids)
        np.testing.assert_allclose(g.top_logprobs, w.top_logprobs, atol=1e-5)


# int4 projections and int8 embeddings in groups of 16 inputs: the row-parallel weights (wo, w_down) have
# several groups, so their group axis is what tensor parallelism splits.
QUANT_SPEC = qz.QuantSpec("int4", "int8", int8_group_size=16, int4_group_size=16)


@pytest.fixture(scope="module")
def tiny_quantized_checkpoint(tiny_checkpoint, tmp_path_factory):
    cfg, _ = read_config(tiny_checkpoint)
    weights = qz.quantize_weights(random_weights(cfg, 11), llama.weight_info(cfg), QUANT_SPEC)
    dest = tmp_path_factory.mktemp("tiny_quantized")
    save_checkpoint(dest, cfg, qz.np_tree(weights), source={"format": "random"}, quantization=QUANT_SPEC)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_checkpoint / name, dest / name)
    return dest


@pytest.fixture(scope="module")
def quantized_tp1_outputs(tiny_quantized_checkpoint):
    return two_runner_steps(tiny_runner(tiny_quantized_checkpoint, 1))


@pytest.mark.parametrize("tp", [2, 4, 8])
def test_quantized_checkpoint_shards_scales_like_their_values_and_matches_tp1(tiny_quantized_checkpoint,
                                                                              quantized_tp1_outputs, tp):
    runner = tiny_runner(tiny_quantized_checkpoint, tp)
    layers = runner.weights.layers
    assert isinstance(layers.wq, qz.Int4Weight) and isinstance(runner.weights.embed, qz.Int8Weight)
    # Column parallel wq [L, G, g/2, N, H]: the heads split, and so do its scales [L, G, N, H].
    assert layers.wq.packed.sharding.spec == P(None, None, None, "model", None)
    assert layers.wq.scales.sharding.spec == layers.wq.mins.sharding.spec == P(None, None, "model", None)
    # Row parallel w_down [L, G, g/2, D] over F = 128 inputs: 8 groups of 16, a whole number per device.
    assert layers.w_down.packed.sharding.spec == P(None, "model", None, None)
    assert layers.w_down.scales.sharding.spec == P(None, "model", None)
    assert {s.data.shape for s in layers.w_down.scales.addressable_shards} == {(TINY.num_layers, 8 // tp,
                                                                               TINY.hidden_size)}
    # wo over N * H = 64 inputs is 4 groups: split at TP <= 4; at TP = 8 a group spans two devices' heads, so
    # it is replicated (and XLA moves activations instead).
    wo_groups = "model" if tp <= 4 else None
    assert layers.wo.packed.sharding.spec == P(None, wo_groups, None, None)
    assert layers.wo.scales.sharding.spec == P(None, wo_groups, None)
    # The embedding, quantized as the head [D, V]: its vocabulary splits.
    assert runner.weights.embed.values.sharding.spec == P(None, None, "model")
    assert runner.weights.embed.scales.sharding.spec == P(None, "model")
    if tp == 8:  # 4 KV heads each served twice: the quantized wk repeated, values and scales alike
        assert layers.wk.packed.shape[-2] == layers.wk.scales.shape[-2] == 8
    assert_same_outputs(two_runner_steps(runner), quantized_tp1_outputs)


def test_engine_int8_weights_and_int8_kv_pages_under_tp_match_tp1(tiny_checkpoint):
    """`--quantization int8` (per output channel, quantized at load) with `--kv-cache-dtype int8` at TP = 2."""
    outs = {}
    for tp in (1, 2):
        config = EngineConfig(model=str(tiny_checkpoint), tensor_parallel_size=tp, max_num_seqs=2,
                              max_num_batched_tokens=16, max_model_len=64, num_pages=24, block_size=PAGE,
                              quantization="int8", kv_cache_dtype="int8")
        runner = ModelRunner(config, str(tiny_checkpoint))
        wo = runner.weights.layers.wo
        assert isinstance(wo.weight if tp == 1 else wo, qz.Int8Weight)  # TP 1: the native matmul's tiles
        if tp == 2:
            # One group (per output channel): the row-parallel input axis sits on g; the scales replicate.
            assert runner.weights.layers.wo.values.sharding.spec == P(None, None, "model", None)
            assert runner.weights.layers.wo.scales.sharding.spec == P(None, None, None)
            assert runner.kv_pages.values.sharding.spec == P(None, None, None, "model", None)
            assert runner.kv_pages.scales.sharding.spec == P(None, None, None, "model")
            assert runner.kv_pages.scales.addressable_shards[0].data.shape[3] == TINY.num_kv_heads  # 2K / 2
        outs[tp] = two_runner_steps(runner)
    assert_same_outputs(outs[2], outs[1])


# ---------------------------------------------------------------------- refused sizes and rules


def test_sizes_that_split_no_heads_are_refused_naming_the_valid_ones():
    smol = ModelConfig(vocab_size=64, hidden_size=72, intermediate_size=64, num_layers=1, num_heads=9,
                       num_kv_heads=3, head_dim=8)
    assert sharding.valid_tensor_parallel_sizes(smol) == [1, 3, 9]
    assert sharding.kv_replicas_for(smol, 3) == 1 and sharding.kv_replicas_for(smol, 9) == 3
    for tp in (2, 4, 8):
        with pytest.raises(ValueError, match=r"tensor_parallel_size=\d .* valid sizes are \[1, 3, 9\]"):
            sharding.kv_replicas_for(smol, tp)
    assert sharding.valid_tensor_parallel_sizes(TINY) == [1, 2, 4, 8]


def test_llm_refuses_tp2_on_smollm2_at_start_up():
    with pytest.raises(ValueError, match=r"9 query / 3 KV heads.*valid sizes are \[1, 3, 9\]"):
        LLM(tensor_parallel_size=2, warmup=False)


def test_rules_refuse_collisions_and_unknown_axes():
    rules = sharding.ShardingRules(embed="model")
    with pytest.raises(ValueError, match="collision.*'vocab' and 'embed'.*'model'"):
        rules.spec(("vocab", "embed"))
    with pytest.raises(ValueError, match="not a mesh axis"):
        sharding.ShardingRules(heads="tensor")
    with pytest.raises(ValueError, match="unknown logical axis"):
        sharding.ShardingRules().spec(("hidden",))
    assert sharding.ShardingRules(batch=None, ffw=("data", "model")).spec(("batch", "ffw")) == P(None, ("data",
                                                                                                  "model"))
    with pytest.raises(ValueError, match="needs 16 devices; 8 are visible"):
        sharding.make_mesh(8, 2)
    with pytest.raises(ValueError, match="must be positive"):
        EngineConfig(tensor_parallel_size=0)


# ---------------------------------------------------------------------- the real model


@pytest.mark.slow
def test_smollm2_tp3_greedy_matches_tp1_through_the_engine():
    golden = json.loads((Path(__file__).parents[1] / "data" / "golden_smollm2.json").read_text())
    short = next(p for p in golden["prompts"] if p["name"] == "short_text")  # from HF transformers, float32
    prompts = [short["text"], "def fibonacci(n):"]
    params = SamplingParams(max_tokens=6, temperature=0.0, logprobs=2)
    # One token a step (prompts prefilled a token at a time, one sequence at a time): one step shape to compile
    # per TP size, which is most of this test's time. The tiny model's tests above cover batches of rows.
    options = {"max_num_seqs": 1, "max_num_batched_tokens": 1, "max_model_len": 64, "kv_cache_memory": 8 * 2**20,
               "warmup": False}
    results = {}
    for tp in (1, 3):
        llm = LLM(tensor_parallel_size=tp, **options)
        results[tp] = llm.generate(prompts, params, use_tqdm=False)
        if tp == 3:
            runner = llm.engine.runner
            # The default serves the GGUF's own Q4_1 blocks: int4 [L, G, g/2, N, H], split over the heads.
            assert runner.weights.layers.wq.packed.sharding.spec == P(None, None, None, "model", None)
            assert runner.weights.layers.wq.scales.sharding.spec == P(None, None, "model", None)
            assert runner.kv_pages.addressable_shards[0].data.shape[3] == 2  # one KV head (K and V) a device
    for one, three in zip(results[1], results[3]):
        assert one.outputs[0].token_ids == three.outputs[0].token_ids
        assert len(one.outputs[0].token_ids) == 6
        lp1 = [lp.logprob for lp in one.outputs[0].logprobs]
        lp3 = [lp.logprob for lp in three.outputs[0].logprobs]
        np.testing.assert_allclose(lp3, lp1, atol=1e-4)
    assert results[3][0].prompt_token_ids == short["prompt_ids"]
    assert results[3][0].outputs[0].token_ids == short["greedy_ids"][:6]
