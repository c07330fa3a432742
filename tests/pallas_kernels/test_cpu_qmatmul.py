"""The native CPU quantized matmul (`pallas_kernels/cpu_qmatmul.cc`) against its jnp reference and numpy.

Fresh random weights and activations every run (odd M, O not a multiple of 16, ragged wide heads, every group
size and scale dtype the model uses). `np_dense` rebuilds a layer's dense weight in float64 from the layout in the
kernel's docstring, sharing no code with the package. Then the wiring: `llama.forward` with `qdot_native[_q8]`,
the lossless int8 head, and `--quantized-matmul` / `--activation-quantization` through the server's flags into
the model runner. Everything skips where the kernel cannot build (no g++ or no AVX512-VNNI).
"""

import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.config import EngineConfig, ModelConfig
from jaxserve.model import llama
from jaxserve.model import native_matmul as nm
from jaxserve.model import quantization as qz
from pallas_kernels import cpu_build
from pallas_kernels import cpu_qmatmul as k
from pallas_kernels.quantized_weights import Int4Weight, Int8Weight, QuantizedWeight

needs_kernel = pytest.mark.skipif(not nm.available(), reason="native CPU kernel unavailable here")

def random_weight(rng: np.random.Generator, L: int, I: int, O: int, g: int, *, int4: bool = True,
                  scale_dtype=jnp.float32) -> QuantizedWeight:
    """A random stacked weight of the kernel's layout."""
    G = I // g
    scales = jnp.asarray(rng.uniform(0.001, 0.02, (L, G, O)), scale_dtype)
    if int4:
        packed = jnp.asarray(rng.integers(0, 256, (L, G, g // 2, O)), jnp.uint8)
        mins = jnp.asarray(rng.uniform(-0.15, 0.0, (L, G, O)), scale_dtype)
        return Int4Weight(packed, scales, mins, (I,), 1)
    return Int8Weight(jnp.asarray(rng.integers(-127, 128, (L, G, g, O)), jnp.int8), scales, (I,), 1)


# Float32 tolerance: accumulation order only (the kernel sums q * x per group, then scales); observed max
# relative error ~1e-6 of max |y|.
RTOL = 1e-5

CASES = {
    # name: (M, I, O, g, int4, scale dtype)
    "gemv_gguf_q4": (1, 576, 1536, 32, True, jnp.float16),
    "rows3_ragged_o": (3, 96, 37, 32, True, jnp.float32),
    "rows13_buffered": (13, 576, 100, 32, True, jnp.float16),
    "g96_smollm2_default": (9, 576, 192, 96, True, jnp.float32),
    "g16_bf16": (5, 64, 50, 16, True, jnp.bfloat16),
    "int8_g16": (7, 64, 50, 16, False, jnp.bfloat16),
    "int8_per_channel": (2, 80, 33, 80, False, jnp.float32),
    "wide_head_ragged": (2, 64, 4100, 32, False, jnp.float32),  # the LM head path (O >= 4096), last item 4 wide
    "wide_head_int4": (1, 64, 5000, 32, True, jnp.float16),
    "wide_head_rows11": (11, 64, 4100, 32, True, jnp.float32),  # two row blocks (8 + 3) of the wide path
    # the int8 head path: row blocks of 6 (+ a remainder), sub-tiles of 64 columns, a ragged last item
    "int8_head_row1": (1, 96, 4136, 32, False, jnp.float16),
    "int8_head_rows5": (5, 96, 4136, 32, False, jnp.float16),
    "int8_head_rows10": (10, 64, 4100, 32, False, jnp.float32),
}


def np_dense(w, layer: int) -> np.ndarray:
    """Layer `layer` of a [L, G, R, O] weight as dense float64 [I, O]."""
    s = np.asarray(w.scales[layer].astype(jnp.float32), np.float64)  # [G, O]
    if isinstance(w, Int4Weight):
        p = np.asarray(w.packed[layer]).astype(np.int64)  # [G, R, O]; byte b: inputs b (low), b + R (high)
        q = np.concatenate([p & 15, p >> 4], axis=1)
        dense = q * s[:, None] + np.asarray(w.mins[layer].astype(jnp.float32), np.float64)[:, None]
    else:
        dense = np.asarray(w.values[layer], np.float64) * s[:, None]
    return dense.reshape(-1, dense.shape[-1])


@needs_kernel
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_exact_mode_matches_reference_and_numpy(case):
    M, I, O, g, int4, sd = CASES[case]
    rng = np.random.default_rng()
    w = random_weight(rng, 3, I, O, g, int4=int4, scale_dtype=sd)
    x = jnp.asarray(rng.standard_normal((M, I)), jnp.float32)
    fn = jax.jit(k.cpu_qmatmul)
    for layer in (0, 2):
        got = np.asarray(fn(x, w, layer), np.float64)
        want = np.asarray(x, np.float64) @ np_dense(w, layer)
        scale = np.abs(want).max()
        np.testing.assert_allclose(got, want, rtol=0, atol=RTOL * scale)
        np.testing.assert_allclose(got, np.asarray(k.cpu_qmatmul_reference(x, w, layer)), rtol=0, atol=RTOL * scale)


@needs_kernel
@pytest.mark.parametrize("case", [c for c in CASES if CASES[c][4] and CASES[c][3] % 32 == 0])
def test_q8_mode_matches_its_reference_and_stays_near_exact(case):
    """q8 equals the reference that rounds x through llama.cpp's Q8 blocks first, and (being lossy) stays within
    a percent-level bound of the exact product."""
    M, I, O, g, _, sd = CASES[case]
    rng = np.random.default_rng()
    w = random_weight(rng, 2, I, O, g, scale_dtype=sd)
    x = jnp.asarray(rng.standard_normal((M, I)), jnp.float32)
    got = np.asarray(jax.jit(lambda x, w: k.cpu_qmatmul(x, w, 1, q8=True))(x, w))
    want = np.asarray(k.cpu_qmatmul_reference(x, w, 1, q8=True))
    exact = np.asarray(x, np.float64) @ np_dense(w, 1)
    np.testing.assert_allclose(got, want, rtol=0, atol=RTOL * np.abs(want).max())
    assert 0 < np.abs(got - exact).max() < 0.03 * np.abs(exact).max()


@needs_kernel
@pytest.mark.parametrize("q8", [False, True])
def test_padding_rows_are_skipped_and_zero(q8):
    """`rows` (a step's real token count, traced) multiplies only the first rows; the rest come back zero, even
    where x holds NaN (a padding token's activations are never read)."""
    rng = np.random.default_rng()
    w = random_weight(rng, 2, 256, 96, 32)
    x = np.asarray(rng.standard_normal((40, 256)), np.float32)
    for rows in (0, 1, 9, 17, 40):
        xp = x.copy()
        xp[rows:] = np.nan
        got = np.asarray(jax.jit(lambda x, r: k.cpu_qmatmul(x, w, 1, q8=q8, rows=r))(jnp.asarray(xp), rows))
        want = np.asarray(k.cpu_qmatmul_reference(jnp.asarray(x), w, 1, q8=q8))
        np.testing.assert_allclose(got[:rows], want[:rows], rtol=0, atol=RTOL * np.abs(want).max())
        np.testing.assert_array_equal(got[rows:], 0.0)


@needs_kernel
def test_q8_block_quantization_is_llama_cpp_q8():
    x = jnp.asarray(np.random.default_rng().standard_normal((3, 64)), jnp.float32)
    q, d = k.quantize_q8_reference(x)
    np.testing.assert_allclose(np.abs(np.asarray(q)).reshape(3, 2, 32).max(-1), 127)  # each block spans +-127
    np.testing.assert_allclose(np.asarray(q, np.float32).reshape(3, 2, 32) * np.asarray(d)[..., None],
                               np.asarray(x).reshape(3, 2, 32), atol=float(np.asarray(d).max()) / 2 + 1e-7)


@needs_kernel
def test_bad_shapes_raise():
    rng = np.random.default_rng(0)
    w = random_weight(rng, 1, 64, 16, 32)
    with pytest.raises(ValueError, match="is not \\[M, 64\\]"):
        k.cpu_qmatmul(jnp.zeros((2, 63), jnp.float32), w)
    with pytest.raises(ValueError, match="must be float32"):
        k.cpu_qmatmul(jnp.zeros((2, 64), jnp.bfloat16), w)
    with pytest.raises(ValueError, match="q8 needs int4 weights in groups of a multiple of 32"):
        k.cpu_qmatmul(jnp.zeros((2, 64), jnp.float32), random_weight(rng, 1, 64, 16, 16), q8=True)


@needs_kernel
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_tiled_layout_multiplies_like_the_stored_one(case):
    """`tile_columns` (each 32-column tile contiguous: how the engine stores layer stacks) in both modes: the
    same bits as the untiled weight where both take the same kernel path (O < 4096), else the float64 product;
    `untile_columns` gives the weight back exactly, zero past O in the padded last tile."""
    M, I, O, g, int4, sd = CASES[case]
    rng = np.random.default_rng()
    w = random_weight(rng, 3, I, O, g, int4=int4, scale_dtype=sd)
    t = k.tile_columns(w)
    first = t.weight.packed if int4 else t.weight.values
    assert first.shape == (3, -(-O // 32), I // g, g // 2 if int4 else g, 32)
    assert not np.asarray(first)[:, -1, ..., O % 32 or 32:].any()
    back = k.untile_columns(t)
    for c in ("packed", "scales", "mins") if int4 else ("values", "scales"):
        np.testing.assert_array_equal(np.asarray(getattr(back, c)), np.asarray(getattr(w, c)))
        np.testing.assert_array_equal(np.asarray(getattr(k.untile_columns(t, 2), c)), np.asarray(getattr(w, c)[2]))
    modes = [False, True] if int4 and g % 32 == 0 else [False]
    for rows in (M, 1, 17):
        x = jnp.asarray(rng.standard_normal((rows, I)), jnp.float32)
        for q8 in modes:
            fn = jax.jit(functools.partial(k.cpu_qmatmul, layer=2, q8=q8))
            got = np.asarray(fn(x, t))
            if O < 4096:
                np.testing.assert_array_equal(got, np.asarray(fn(x, w)))
            want = np.asarray(k.cpu_qmatmul_reference(x, w, 2, q8=q8), np.float64)
            np.testing.assert_allclose(got, want, rtol=0, atol=RTOL * np.abs(want).max())


@needs_kernel
def test_tiled_shapes_are_checked():
    rng = np.random.default_rng(0)
    t = k.tile_columns(random_weight(rng, 2, 64, 40, 32))
    bad = k.ColumnTiles(t.weight, (70,))  # 70 columns need 3 tiles, the weight has 2
    with pytest.raises(ValueError, match="want a \\[L, T, G, R, 32\\] weight"):
        k.cpu_qmatmul(jnp.zeros((2, 64), jnp.float32), bad)


# ------------------------------------------------------------------------------------------ the model


def tiny_config(**overrides) -> ModelConfig:
    base = dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_layers=3, num_heads=4, num_kv_heads=2,
                head_dim=16, rope_theta=500.0, max_position_embeddings=256)
    return ModelConfig(**{**base, **overrides})


@needs_kernel
@pytest.mark.parametrize("spec", [qz.QuantSpec("int4", int4_group_size=32),
                                  qz.QuantSpec("int4", "int4", int4_group_size=32), qz.QuantSpec("int8", "int8")],
                         ids=["int4_g32", "int4_g32_head", "int8_head"])
def test_forward_with_the_native_matmul_matches_qdot(spec):
    """Every projection (stacked weights indexed in place) and, quantized, the tied head through the kernel."""
    cfg = tiny_config()
    qw = qz.quantize_weights(llama.init_weights(cfg, jax.random.key(1)), llama.weight_info(cfg), spec)
    ids = [int(t) for t in np.random.default_rng().integers(0, cfg.vocab_size, 13)]
    ref = np.asarray(llama.sequence_logits(qw, cfg, ids, page_size=4))
    got = np.asarray(llama.sequence_logits(qw, cfg, ids, page_size=4, matmul=nm.qdot_native))
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4 * np.abs(ref).max())
    if spec.weights == "int4":  # q8: lossy, but close on these logits
        q8 = np.asarray(llama.sequence_logits(qw, cfg, ids, page_size=4, matmul=nm.qdot_native_q8))
        assert 0 < np.abs(q8 - ref).max() < 0.05 * np.abs(ref).max()


@needs_kernel
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["kernel", "xla_fallback_bf16"])
def test_forward_with_tiled_layer_stacks(dtype):
    """`tile_layers` (what the engine does with the native matmul): float32 activations go through the kernel
    and give the untiled weights' logits bit for bit; bfloat16 ones fall back to XLA on the untiled layer."""
    cfg = tiny_config(intermediate_size=80)  # gate / up: 80 columns, a partly filled last tile
    qw = qz.quantize_weights(llama.init_weights(cfg, jax.random.key(4), dtype), llama.weight_info(cfg, dtype),
                             qz.QuantSpec("int4", int4_group_size=32))
    tiled = nm.tile_layers(jax.tree.map(jnp.copy, qw))  # (it donates its input)
    assert isinstance(tiled.layers.w_up, k.ColumnTiles) and tiled.layers.w_up.out_shape == (80,)
    ids = [int(t) for t in np.random.default_rng().integers(0, cfg.vocab_size, 11)]
    want = np.asarray(llama.sequence_logits(qw, cfg, ids, page_size=4, matmul=nm.qdot_native))
    got = np.asarray(llama.sequence_logits(tiled, cfg, ids, page_size=4, matmul=nm.qdot_native))
    np.testing.assert_array_equal(got, want)
    if dtype == jnp.bfloat16:
        np.testing.assert_array_equal(got, np.asarray(llama.sequence_logits(qw, cfg, ids, page_size=4)))


@needs_kernel
def test_the_layer_scan_passes_whole_stacks_to_the_kernel():
    """One custom call per projection inside the scan, reading the stacked [L, ...] weight (no sliced copy)."""
    cfg = tiny_config()
    qw = qz.quantize_weights(llama.init_weights(cfg, jax.random.key(1)), llama.weight_info(cfg),
                             qz.QuantSpec("int4", int4_group_size=32))
    fn = jax.jit(lambda w: llama.sequence_logits(w, cfg, list(range(5)), page_size=4, matmul=nm.qdot_native))
    hlo = fn.lower(qw).as_text()
    calls = [line for line in hlo.splitlines() if k.TARGET in line]
    assert len(calls) == 7, calls  # q, k, v, o, gate, up, down
    L = cfg.num_layers
    assert all(f"tensor<{L}x" in line for line in calls), calls


@needs_kernel
def test_lossless_int8_head_only_when_exact():
    cfg = tiny_config()
    infos = llama.weight_info(cfg)
    w = llama.init_weights(cfg, jax.random.key(2))
    assert not qz.is_quantized(nm.lossless_int8_head(w, infos).embed)  # random floats: not int8 blocks
    assert nm.prepare("auto", 1, w, infos) == ("xla", w)  # nothing quantized: no kernel built or used
    # A table that is int8 blocks of 32 with float16 scales (what a GGUF Q8_0 dequantizes to) becomes int8.
    q8 = qz.quantize_int8(w.embed.T, 1, group_size=32, scale_dtype=jnp.float16)
    table = qz.dequantize_weight(q8, jnp.float32).T  # [V, D]
    tabled = llama.LlamaWeights(table, w.layers, w.final_norm)
    got = nm.lossless_int8_head(tabled, infos).embed
    resolved, prepared = nm.prepare("auto", 1, tabled, infos)
    assert resolved == "native" and qz.is_quantized(prepared.embed)
    assert qz.is_quantized(got) and got.group_size == 32
    np.testing.assert_array_equal(np.asarray(qz.dequantize_weight(got, jnp.float32)).T, np.asarray(table))


@needs_kernel
def test_flags_reach_the_kernel_through_the_server_entry_point(tmp_path):
    """`--quantized-matmul` / `--activation-quantization` parsed by the server's CLI pick the runner's matmul,
    and its steps run the kernel: native equals xla (exact), native + int8 runs q8 (differs, close)."""
    from jaxserve.core.sampling_params import SamplingParams
    from jaxserve.model.checkpoint import save_checkpoint
    from jaxserve.model.sampler import RowSampling
    from jaxserve.server.__main__ import build_parser, configs_from_args
    from jaxserve.worker.model_runner import ModelRunner

    cfg = tiny_config()
    spec = qz.QuantSpec("int4", int4_group_size=32)
    qw = qz.quantize_weights(llama.init_weights(cfg, jax.random.key(3)), llama.weight_info(cfg), spec)
    save_checkpoint(tmp_path, cfg, qz.np_tree(qw), quantization=spec)
    assert EngineConfig().quantized_matmul == "auto"
    outs = {}
    for flags, want in ((["--quantized-matmul", "xla"], qz.qdot), ([], nm.qdot_native),
                        (["--activation-quantization", "int8"], nm.qdot_native_q8)):
        engine_cfg, _ = configs_from_args(build_parser().parse_args(
            [str(tmp_path), "--max-num-seqs", "1", "--max-num-batched-tokens", "16", "--max-model-len", "64",
             "--num-pages", "8", "--block-size", "4", "--dtype", "float32", *flags]))
        runner = ModelRunner(engine_cfg, str(tmp_path))
        assert runner.matmul is want
        # the native matmul's layer stacks are stored tiled (each 32-column tile contiguous)
        assert isinstance(runner.weights.layers.w_up, k.ColumnTiles) == (want is not qz.qdot)
        chunk = types.SimpleNamespace(request_id="a", token_ids=list(range(3, 14)), start_pos=0, page_table=[1, 2, 3])
        row = RowSampling(params=SamplingParams(temperature=0.0, logprobs=5), seed=0, position=11)
        outs[want.__name__] = runner.execute([chunk], [row])
    exact, native, q8 = outs["qdot"], outs["qdot_native"], outs["qdot_native_q8"]
    np.testing.assert_array_equal(native.token_ids, exact.token_ids)
    np.testing.assert_allclose(native.top_logprobs, exact.top_logprobs, rtol=1e-4, atol=1e-4)
    assert not np.array_equal(q8.top_logprobs, exact.top_logprobs)  # int8 activations: lossy, so it did run
    np.testing.assert_allclose(q8.top_logprobs, exact.top_logprobs, atol=0.1)


def test_missing_isa_falls_back_to_xla_with_one_warning(tmp_path, monkeypatch, caplog):
    """No AVX512-VNNI (or no compiler): `available` says why once, and `auto` / `native` resolve to xla."""
    monkeypatch.setattr(cpu_build, "_cpu_flags", lambda: {"avx512f", "fma"})
    monkeypatch.setattr(cpu_build, "_registered", {})  # as in a fresh process
    with caplog.at_level("WARNING"):
        assert not k.available(tmp_path / "nobuild") and not k.available(tmp_path / "nobuild")
    warnings = [r for r in caplog.records if "native CPU quantized matmul unavailable" in r.getMessage()]
    assert len(warnings) == 1 and "avx512_vnni" in warnings[0].getMessage()
    assert not (tmp_path / "nobuild").exists()  # nothing was compiled
    monkeypatch.setattr(nm, "available", lambda: False)
    assert nm.resolve("auto", 1) == "xla" and nm.resolve("native", 1) == "xla"
    assert nm.resolve("auto", 4) == "xla" and nm.resolve("xla", 1) == "xla"
    with pytest.raises(ValueError, match="quantized_matmul must be one of"):
        nm.resolve("triton", 1)
