"""The Pallas kernels against the dense float32 reference, on fresh random ragged steps.

Every page a sequence does not own is NaN, and so is every slot of its own pages past its length: a read
outside the sequence's KV shows as NaN in its output (pages are a security boundary between users).
Padding tokens carry NaN queries: their outputs must come back exactly zero and leave the rest untouched.

`TestX` runs the compiled kernel on its platform (skipped elsewhere); `TestXInterpret` sets INTERPRET =
True and runs the same matrix on CPU (habit 15). The GPU kernels are also lowered for CUDA and the TPU
kernel for Mosaic on CPU, which checks the backends' tiling and dtype rules without hardware.
"""

import functools
import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.config import ModelConfig
from jaxserve.model import llama
from jaxserve.model.attention import paged_attention_xla
from jaxserve.model.attention_backends import native_available, paged_attention_native, select_attention
from jaxserve.model.step_inputs import SeqChunk, build_step_inputs
from pallas_kernels.decode_attention import paged_decode_attention
from pallas_kernels.kv_cache import QuantizedKV, dequantize_kv, quantize_kv, write_kv
from pallas_kernels.ragged_attention import ragged_paged_attention
from pallas_kernels.reference import ragged_paged_attention_reference
from pallas_kernels.tpu_ragged_attention import tpu_ragged_paged_attention

PAGE = 4
SCALE = 0.3
# Stated tolerances (max abs and rel error against the float32 reference on the same stored pages).
TOLERANCE = {"float32": 1e-5, "float16": 1e-5, "bfloat16": 2e-2, "int8": 1e-5}
# int8 pages against the unquantized float32 cache: the quantization error itself (unit-normal K/V).
INT8_VS_FLOAT_ATOL = 6e-2  # observed max 0.033 over 200 random steps (H = 64, GQA 8)


def random_step(rng, *, kv_heads, group, head_dim, chunks_spec, num_tokens, num_rows, kv_dtype="float32",
                num_pages=48, num_layers=1, poison=True, page=PAGE):
    """chunks_spec: (start_pos, new_tokens) per sequence, pages a random permutation.

    Returns q [T, N, H] (NaN on padding tokens), kv pages (plain or QuantizedKV), the float32 pages before
    storage rounding, and the step. With `poison`, every slot a sequence may not read is NaN (for int8: its
    scale), else finite garbage.
    """
    order = rng.permutation(np.arange(1, num_pages))
    chunks, readable, used = [], np.zeros((num_pages, page), bool), 0
    for start, n in chunks_spec:
        need = -(-(start + n) // page)
        table = [int(p) for p in order[used:used + need]]
        used += need
        for pos in range(start + n):
            readable[table[pos // page], pos % page] = True
        chunks.append(SeqChunk([0] * n, start, table))
    step = build_step_inputs(chunks, num_tokens=num_tokens, num_rows=num_rows, page_size=page,
                             max_pages_per_seq=32, kv_block_pages=2)
    kv = rng.standard_normal((num_layers, num_pages, page, 2 * kv_heads, head_dim)).astype(np.float32)
    bad = np.nan if poison else 1e3
    n_valid = int(step.query_starts[-1])
    q = rng.standard_normal((num_tokens, kv_heads * group, head_dim)).astype(np.float32)
    q[n_valid:] = np.nan
    if kv_dtype == "int8":
        values, scales = (np.array(a) for a in quantize_kv(jnp.asarray(kv)))
        scales[:, ~readable] = bad
        pages = QuantizedKV(jnp.asarray(values), jnp.asarray(scales))
    else:
        kv_stored = kv.copy()
        kv_stored[:, ~readable] = bad
        pages = jnp.asarray(kv_stored).astype(kv_dtype)
    q_dtype = jnp.bfloat16 if kv_dtype == "bfloat16" else jnp.float32
    return jnp.asarray(q).astype(q_dtype), pages, jnp.asarray(kv), jax.tree.map(jnp.asarray, step)


CASES = {
    # name: (kv_heads, group, head_dim, kv dtype, [(start_pos, new_tokens), ...], T, R)
    # KV lengths 1, page-1, page, page+1 and long; three padding rows and three padding tokens.
    "decode_edge_lengths_gqa4": (2, 4, 16, "float32", [(0, 1), (PAGE - 2, 1), (PAGE - 1, 1), (PAGE, 1), (37, 1)],
                                 8, 8),
    # decode rows beside a chunked-prefill continuation and a fresh prompt; GQA 3 like SmolLM2.
    "mixed_prefill_decode_gqa3_h64_bf16": (3, 3, 64, "bfloat16", [(9, 1), (16, 17), (3, 1), (0, 5)], 32, 4),
    "prefill_gqa1_h128": (2, 1, 128, "float32", [(0, 23), (PAGE, 6), (0, 1)], 32, 4),
    "long_gqa8_int8": (1, 8, 16, "int8", [(70, 1), (0, 40), (51, 9)], 64, 4),
}


def check(out, ref, step, kv_dtype):
    """Valid rows finite and close to the reference; padding rows exactly zero."""
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    n = int(step.query_starts[-1])
    assert np.isfinite(out[:n]).all(), "a read outside the sequence's own KV leaked NaN"
    tol = TOLERANCE[kv_dtype]
    np.testing.assert_allclose(out[:n], ref[:n], rtol=tol, atol=tol)
    np.testing.assert_array_equal(out[n:], 0.0)


class KernelTest:
    """The matrix every kernel runs; subclasses say which kernel, on which platform, interpreted or not."""

    PLATFORM = ""
    INTERPRET = False

    @pytest.fixture(autouse=True)
    def _needs_platform(self):
        if not self.INTERPRET and jax.default_backend() != self.PLATFORM:
            pytest.skip(f"needs a {self.PLATFORM}")

    def attention(self, q, kv, layer, step, **options):
        raise NotImplementedError

    @pytest.mark.parametrize("name", sorted(CASES))
    def test_matches_reference(self, name):
        kv_heads, group, head_dim, kv_dtype, spec, T, R = CASES[name]
        q, kv, _, step = random_step(np.random.default_rng(), kv_heads=kv_heads, group=group, head_dim=head_dim,
                                     chunks_spec=spec, num_tokens=T, num_rows=R, kv_dtype=kv_dtype)
        out = self.attention(q, kv, jnp.int32(0), step)
        check(out, ragged_paged_attention_reference(q, kv, jnp.int32(0), step, scale=SCALE), step, kv_dtype)

    def test_sliding_window_and_soft_cap(self):
        q, kv, _, step = random_step(np.random.default_rng(), kv_heads=2, group=2, head_dim=16,
                                     chunks_spec=[(30, 1), (5, 14), (0, 3)], num_tokens=32, num_rows=4)
        options = dict(sliding_window=7, soft_cap=2.0)
        out = self.attention(q, kv, jnp.int32(0), step, **options)
        ref = ragged_paged_attention_reference(q, kv, jnp.int32(0), step, scale=SCALE, **options)
        check(out, ref, step, "float32")

    def test_traced_layer_inside_jit_and_scan(self):
        """The engine calls attention under lax.scan over layers with the layer index traced."""
        q, kv, _, step = random_step(np.random.default_rng(), kv_heads=1, group=4, head_dim=16,
                                     chunks_spec=[(6, 1), (0, 9)], num_tokens=16, num_rows=2, num_layers=2)

        @jax.jit
        def all_layers(q, kv, step):
            return jax.lax.scan(lambda c, layer: (c, self.attention(q, kv, layer, step)), 0,
                                jnp.arange(2, dtype=jnp.int32))[1]

        outs = all_layers(q, kv, step)
        for layer in range(2):
            ref = ragged_paged_attention_reference(q, kv, jnp.int32(layer), step, scale=SCALE)
            check(outs[layer], ref, step, "float32")


@pytest.mark.gpu
class TestRaggedAttention(KernelTest):
    PLATFORM = "gpu"

    def attention(self, q, kv, layer, step, **options):
        return ragged_paged_attention(q, kv, layer, step, scale=SCALE, pages_per_block=4, interpret=self.INTERPRET,
                                      **options)


class TestRaggedAttentionInterpret(TestRaggedAttention):
    INTERPRET = True


@pytest.mark.gpu
class TestDecodeAttention(KernelTest):
    PLATFORM = "gpu"

    def attention(self, q, kv, layer, step, **options):
        return paged_decode_attention(q, kv, layer, step, scale=SCALE, num_splits=2, pages_per_block=4,
                                      interpret=self.INTERPRET, **options)


class TestDecodeAttentionInterpret(TestDecodeAttention):
    INTERPRET = True


@pytest.mark.tpu
class TestTpuRaggedAttention(KernelTest):
    PLATFORM = "tpu"

    def attention(self, q, kv, layer, step, **options):
        return tpu_ragged_paged_attention(q, kv, layer, step, scale=SCALE, pages_per_block=2,
                                          interpret=self.INTERPRET, **options)


class TestTpuRaggedAttentionInterpret(TestTpuRaggedAttention):
    INTERPRET = True


class TestNativeCpuAttention(KernelTest):
    """`--attention-backend native` (the CPU default): the FFI kernel, and the XLA path for int8 pages."""

    PLATFORM = "cpu"

    @pytest.fixture(autouse=True)
    def _needs_kernel(self):
        if not native_available():
            pytest.skip("the native CPU attention does not build here (needs AVX512 + VNNI and g++)")

    def attention(self, q, kv, layer, step, **options):
        if options:
            pytest.skip("the engine passes no sliding window or soft cap; the native kernel has neither")
        return paged_attention_native(q, kv, layer, step, scale=SCALE)

    @pytest.mark.parametrize("seed", range(2))
    def test_random_steps(self, seed):
        """Fresh random ragged steps: decodes and prefill chunks of random lengths at random positions, pages of
        4 or 16 tokens (so blocks of 16 KV tokens cross pages or not), every head size and dtype the kernel takes."""
        rng = np.random.default_rng()
        for _ in range(6):
            head_dim = int(rng.choice([8, 16, 64, 128]))
            kv_heads, group = int(rng.integers(1, 4)), int(rng.choice([1, 3, 4, 8]))
            kv_dtype = str(rng.choice(["float32", "float16", "bfloat16"]))
            page = int(rng.choice([4, 16]))
            spec = [(int(rng.integers(0, 90)), 1 if rng.random() < 0.5 else int(rng.integers(2, 40)))
                    for _ in range(int(rng.integers(1, 6)))]
            total = sum(n for _, n in spec)
            num_tokens = 1 << (total + int(rng.integers(0, 3))).bit_length()
            q, kv, _, step = random_step(rng, kv_heads=kv_heads, group=group, head_dim=head_dim, chunks_spec=spec,
                                         num_tokens=num_tokens, num_rows=len(spec) + int(rng.integers(0, 3)),
                                         kv_dtype=kv_dtype, page=page, num_pages=2 + sum(-(-(a + b) // page)
                                                                                         for a, b in spec))
            out = self.attention(q, kv, jnp.int32(0), step)
            check(out, ragged_paged_attention_reference(q, kv, jnp.int32(0), step, scale=SCALE), step, kv_dtype)

    def test_bad_page_id_is_an_error_not_a_wild_read(self):
        q, kv, _, step = random_step(np.random.default_rng(), kv_heads=1, group=2, head_dim=16,
                                     chunks_spec=[(5, 1)], num_tokens=1, num_rows=1)
        step.page_tables = step.page_tables.at[0, 0].set(10_000)
        with pytest.raises(Exception, match="page id out of range"):
            np.asarray(self.attention(q, kv, jnp.int32(0), step))

    @pytest.mark.parametrize("kv_dtype", ["float32", "bfloat16", "float16"])
    def test_kv_write_equals_the_xla_scatter_bit_for_bit_and_runs_in_place(self, kv_dtype):
        """The backend's KV write (`paged_attention_native.write_kv`, what `llama.forward` calls): fresh random
        K/V (wide range, so rounding to 16 bits matters) into shuffled slots of one layer of NaN-filled pages
        equals `kv_cache.write_kv` bit for bit, every other slot keeps its NaN bits, and inside a layer scan XLA
        neither copies nor converts the cache (it once copied a 16-bit cache whole on every layer: 5 s a step)."""
        rng = np.random.default_rng()
        L, P, K, H, T = 3, 6, 2, 16, 9
        pages = jnp.full((L, P, PAGE, 2 * K, H), jnp.nan, kv_dtype)
        k, v = (jnp.asarray(rng.standard_normal((T, K, H)) * 10.0 ** rng.integers(-3, 4, (T, K, 1)), jnp.float32)
                for _ in range(2))
        slots = jnp.asarray(rng.permutation(P * PAGE)[:T], jnp.int32)
        layer = jnp.int32(rng.integers(L))
        write = paged_attention_native.write_kv
        got = jax.jit(write)(pages, layer, k, v, slots)
        want = write_kv(pages, layer, k, v, slots)
        bits = {"float32": np.uint32}.get(kv_dtype, np.uint16)
        assert got.dtype == pages.dtype
        np.testing.assert_array_equal(np.asarray(got).view(bits), np.asarray(want).view(bits))
        assert np.isnan(np.asarray(got, np.float32)).sum() == (L * P * PAGE - T) * 2 * K * H

        def layers(pages):
            def one(pages, layer):
                return write(pages, layer, k, v, slots), None
            return jax.lax.scan(one, pages, jnp.arange(L, dtype=jnp.int32))[0]

        hlo = jax.jit(layers, donate_argnums=0).lower(pages).compile().as_text()
        # every instruction whose result is the whole cache: only the custom call may make one
        made = set(re.findall(rf"= \w+\[{L},{P},{PAGE},{2 * K},{H}\]\S* ([\w-]+)\(", hlo))
        assert made <= {"parameter", "get-tuple-element", "custom-call", "bitcast"}, made

    def test_kv_write_refuses_a_slot_outside_the_cache(self):
        k = jnp.zeros((2, 1, 16), jnp.float32)
        with pytest.raises(Exception, match="slot out of range"):
            np.asarray(paged_attention_native.write_kv(jnp.zeros((1, 2, PAGE, 2, 16), jnp.bfloat16), jnp.int32(0),
                                                       k, k, jnp.array([1, 2 * PAGE], jnp.int32)))


# ------------------------------------------------------------------------------------ references, int8


def test_write_kv_quantizes_on_write():
    rng = np.random.default_rng()
    k = jnp.asarray(rng.standard_normal((3, 2, 16)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((3, 2, 16)), jnp.float32)
    slots = jnp.array([2 * PAGE + 1, 4 * PAGE + 3, 1 * PAGE])
    plain = jnp.zeros((2, 6, PAGE, 4, 16))
    quant = write_kv(QuantizedKV.zeros(plain.shape), jnp.int32(1), k, v, slots)
    assert quant.values.dtype == jnp.int8 and quant.scales.shape == plain.shape[:-1]
    exact = np.asarray(write_kv(plain, jnp.int32(1), k, v, slots))
    # symmetric absmax: each element within half a quantization step of its token-head scale
    err = np.abs(np.asarray(dequantize_kv(quant)) - exact)
    assert (err <= np.asarray(quant.scales)[..., None] / 2 + 1e-7).all()
    assert np.count_nonzero(np.asarray(quant.values)[0]) == 0


def test_xla_path_and_reference_run_unchanged_on_int8_pages():
    q, kv, _, step = random_step(np.random.default_rng(), kv_heads=2, group=2, head_dim=16,
                                 chunks_spec=[(9, 1), (0, 12)], num_tokens=16, num_rows=2, kv_dtype="int8")
    out = jax.jit(paged_attention_xla, static_argnames="scale")(q, kv, jnp.int32(0), step, scale=SCALE)
    check(out, ragged_paged_attention_reference(q, kv, jnp.int32(0), step, scale=SCALE), step, "int8")


def test_int8_cache_is_close_to_the_float_cache():
    """The quantization error itself: int8 pages vs the float32 pages they were made from."""
    q, kv, kv_float, step = random_step(np.random.default_rng(), kv_heads=1, group=8, head_dim=64,
                                        chunks_spec=[(70, 1), (0, 20)], num_tokens=32, num_rows=2,
                                        kv_dtype="int8", poison=False)
    out = ragged_paged_attention(q, kv, jnp.int32(0), step, scale=0.125, interpret=True)
    ref = ragged_paged_attention_reference(q, kv_float, jnp.int32(0), step, scale=0.125)
    n = int(step.query_starts[-1])
    np.testing.assert_allclose(np.asarray(out[:n]), np.asarray(ref[:n]), atol=INT8_VS_FLOAT_ATOL)


# ------------------------------------------------------------- JAX's own Pallas kernels as independent checks


def _separate_kv(kv):
    """[1, P, page, 2K, H] interleaved -> k, v [K, P, page, H] (the layout of JAX's decode kernels)."""
    return kv[0, :, :, 0::2].transpose(2, 0, 1, 3), kv[0, :, :, 1::2].transpose(2, 0, 1, 3)


def _decode_case(kv_dtype):
    # JAX's kernels multiply masked probabilities (0) with whatever V holds, so foreign pages are finite here.
    return random_step(np.random.default_rng(), kv_heads=2, group=4, head_dim=128, kv_dtype=kv_dtype,
                       chunks_spec=[(0, 1), (PAGE - 1, 1), (PAGE, 1), (29, 1)], num_tokens=4, num_rows=4,
                       poison=False)


def test_agrees_with_jax_gpu_paged_attention():
    from jax.experimental.pallas.ops.gpu import paged_attention as jax_gpu

    q, kv, _, step = _decode_case("float32")
    k_pages, v_pages = _separate_kv(kv)
    theirs = jax_gpu.paged_attention(q * SCALE, k_pages, v_pages, step.page_tables, step.kv_lens, k_splits=2,
                                     pages_per_compute_block=2, interpret=True)
    for ours in (ragged_paged_attention(q, kv, jnp.int32(0), step, scale=SCALE, interpret=True),
                 paged_decode_attention(q, kv, jnp.int32(0), step, scale=SCALE, num_splits=2, interpret=True)):
        np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), rtol=1e-5, atol=1e-5)


def test_agrees_with_jax_tpu_paged_attention():
    """JAX's TPU decode kernel in TPU interpret mode. (Its ragged_paged_attention reshapes refs, which jax
    0.10.2's TPU interpret mode rejects, so it cannot run on CPU.) It computes with bf16 pages: give it some."""
    from jax.experimental.pallas import tpu as pltpu
    from jax.experimental.pallas.ops.tpu.paged_attention import paged_attention as jax_tpu

    q, kv, _, step = _decode_case("bfloat16")
    k_pages, v_pages = _separate_kv(kv)
    with pltpu.force_tpu_interpret_mode(pltpu.InterpretParams()):
        theirs = jax_tpu(q.astype(jnp.float32) * SCALE, k_pages, v_pages, step.kv_lens, step.page_tables,
                         pages_per_compute_block=2)
    ours = tpu_ragged_paged_attention(q.astype(jnp.float32), kv, jnp.int32(0), step, scale=SCALE,
                                      pages_per_block=2, interpret=True)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), rtol=1e-4, atol=1e-4)


# -------------------------------------------------------------------- lowering for the real backends, on CPU

LOWERING_CASES = {  # realistic shapes: 16-token pages; SmolLM2's GQA 3 / head_dim 64 and Llama's GQA 4 / 128
    "smollm2_bf16": (3, 3, 64, "bfloat16"),
    "llama_int8": (8, 4, 128, "int8"),
    "llama_f32": (8, 4, 128, "float32"),
}


def _abstract_case(kv_heads, group, head_dim, kv_dtype, *, decode):
    spec = [(100, 1)] * 8 if decode else [(100, 1), (0, 40), (37, 20)]
    chunks = [SeqChunk([0] * n, s, list(range(1, 1 + -(-(s + n) // 16)))) for s, n in spec]
    step = build_step_inputs(chunks, num_tokens=8 if decode else 64, num_rows=8, page_size=16,
                             max_pages_per_seq=128)
    step = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), step)
    q_dtype = jnp.float32 if kv_dtype == "float32" else jnp.bfloat16
    q = jax.ShapeDtypeStruct((step.num_tokens, kv_heads * group, head_dim), q_dtype)
    shape = (2, 64, 16, 2 * kv_heads, head_dim)
    kv = (QuantizedKV(jax.ShapeDtypeStruct(shape, jnp.int8), jax.ShapeDtypeStruct(shape[:-1], jnp.float32))
          if kv_dtype == "int8" else jax.ShapeDtypeStruct(shape, kv_dtype))
    return q, kv, jax.ShapeDtypeStruct((), jnp.int32), step


@pytest.mark.parametrize("name", sorted(LOWERING_CASES))
def test_gpu_kernels_lower_to_triton(name):
    for fn, decode in ((ragged_paged_attention, False), (ragged_paged_attention, True),
                       (paged_decode_attention, True)):
        args = _abstract_case(*LOWERING_CASES[name], decode=decode)
        lowered = jax.jit(functools.partial(fn, scale=0.125, soft_cap=30.0)).trace(*args).lower(
            lowering_platforms=("cuda",))
        assert "__gpu$xla.gpu.triton" in lowered.as_text() or "triton" in lowered.as_text()


@pytest.mark.parametrize("name", sorted(LOWERING_CASES))
def test_tpu_kernel_lowers_to_mosaic(name, monkeypatch):
    """Python-side Mosaic lowering only (libtpu's layout passes do not run on CPU)."""
    tpu_info = pytest.importorskip("jax._src.pallas.mosaic.tpu_info")
    if not hasattr(tpu_info, "registry"):
        pytest.skip("this jax cannot describe a TPU to the lowering on CPU")
    monkeypatch.setitem(tpu_info.registry, jax.devices()[0].device_kind,
                        lambda: tpu_info.get_tpu_info_for_chip(tpu_info.ChipVersion.TPU_V5E, 1))
    args = _abstract_case(*LOWERING_CASES[name], decode=False)
    lowered = jax.jit(functools.partial(tpu_ragged_paged_attention, scale=0.125)).trace(*args).lower(
        lowering_platforms=("tpu",))
    assert "tpu_custom_call" in lowered.as_text()


# ------------------------------------------- the tiny model through the kernels (the registry: tests/model)

PALLAS = select_attention("pallas", "cpu")[1]  # what --attention-backend pallas serves on CPU (interpret mode)


def tiny_config(**overrides):
    base = dict(vocab_size=97, hidden_size=48, intermediate_size=64, num_layers=2, num_heads=6, num_kv_heads=2,
                head_dim=16, rope_theta=500.0, max_position_embeddings=256)
    return ModelConfig(**{**base, **overrides})


def test_model_with_pallas_attention_matches_xla_path():
    """`--attention-backend pallas` on CPU (interpret mode) through the whole tiny model, prefill of 21 tokens."""
    cfg = tiny_config()
    w = llama.init_weights(cfg, jax.random.key(0))
    ids = [int(t) for t in np.random.default_rng(0).integers(0, cfg.vocab_size, 21)]
    ref = np.asarray(llama.sequence_logits(w, cfg, ids, page_size=PAGE))
    got = np.asarray(llama.sequence_logits(w, cfg, ids, page_size=PAGE,
                                           attention=PALLAS))
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(got.argmax(-1), ref.argmax(-1))


def test_model_with_int8_kv_cache(monkeypatch):
    """The int8 wiring end to end: quantize on write (pallas_kernels.write_kv), dequantize in the kernel."""
    cfg = tiny_config()
    w = llama.init_weights(cfg, jax.random.key(1))
    ids = [int(t) for t in np.random.default_rng(1).integers(0, cfg.vocab_size, 21)]
    ref = np.asarray(llama.sequence_logits(w, cfg, ids, page_size=PAGE))
    monkeypatch.setattr(llama, "write_kv", write_kv)
    pages = -(-len(ids) // PAGE)
    step = build_step_inputs([SeqChunk(ids, 0, list(range(1, pages + 1)))], num_tokens=len(ids), num_rows=1,
                             page_size=PAGE, max_pages_per_seq=pages, all_logits=True)
    kv = QuantizedKV.zeros(llama.kv_cache_shape(cfg, pages + 1, PAGE))
    fwd = jax.jit(llama.forward, static_argnames=("cfg", "attention"))
    got, kv = fwd(w, kv, jax.tree.map(jnp.asarray, step), cfg, PALLAS)
    assert kv.values.dtype == jnp.int8
    np.testing.assert_allclose(np.asarray(got), ref, atol=2e-2)


# ------------------------------------------------------------------------ the real model, golden outputs

REAL_MODEL_KERNELS = {
    "gpu_ragged": functools.partial(ragged_paged_attention, interpret=True),
    "gpu_splitk": functools.partial(paged_decode_attention, num_splits=2, pages_per_block=1, interpret=True),
    "tpu_ragged": functools.partial(tpu_ragged_paged_attention, pages_per_block=2, interpret=True),
    "cpu_native": paged_attention_native,
}


@pytest.fixture(scope="module")
def smollm2():
    registry = pytest.importorskip("jaxserve.model_registry")
    checkpoint = pytest.importorskip("jaxserve.model.checkpoint")
    try:
        cfg, weights = checkpoint.load_checkpoint(registry.resolve_model(registry.DEFAULT_MODEL), jnp.float32)
    except (ValueError, OSError) as e:
        pytest.skip(f"SmolLM2 checkpoint unavailable: {e}")
    golden = json.loads((Path(__file__).parents[1] / "data" / "golden_smollm2.json").read_text())
    return cfg, weights, golden["prompts"][0]


def greedy(weights, cfg, prompt: list[int], n: int, attention) -> list[int]:
    """Prefill then n - 1 single-token decode steps through llama.forward, as the engine runs them."""
    page = 16
    table = [3, 1, 4]  # shuffled, non-contiguous
    fwd = jax.jit(llama.forward, static_argnames=("cfg", "attention"))
    kv = jnp.zeros(llama.kv_cache_shape(cfg, 6, page), jnp.float32)
    tokens, chunk, start = [], prompt, 0
    for _ in range(n):
        T = 1 if len(chunk) == 1 else 16
        step = build_step_inputs([SeqChunk(chunk, start, table)], num_tokens=T, num_rows=1, page_size=page,
                                 max_pages_per_seq=len(table))
        logits, kv = fwd(weights, kv, jax.tree.map(jnp.asarray, step), cfg, attention)
        tokens.append(int(np.argmax(np.asarray(logits[0]))))
        start, chunk = start + len(chunk), [tokens[-1]]
    return tokens


@pytest.mark.slow
@pytest.mark.parametrize("kernel", sorted(REAL_MODEL_KERNELS))
def test_real_model_reproduces_golden_greedy_tokens(smollm2, kernel):
    """SmolLM2-135M with each kernel in interpret mode: prefill + decode reproduce the transformers golden."""
    cfg, weights, prompt = smollm2
    n = 4
    assert greedy(weights, cfg, prompt["prompt_ids"], n, REAL_MODEL_KERNELS[kernel]) == prompt["greedy_ids"][:n]


@pytest.mark.slow
def test_real_model_pallas_backend_logits_match_xla(smollm2):
    """`--attention-backend pallas` (CPU: interpret mode) over a short teacher-forced continuation."""
    cfg, weights, prompt = smollm2
    ids = prompt["prompt_ids"] + prompt["greedy_ids"][:7]
    ref = np.asarray(llama.sequence_logits(weights, cfg, ids))
    got = np.asarray(llama.sequence_logits(weights, cfg, ids, attention=PALLAS))
    np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-3)
    assert got[len(prompt["prompt_ids"]) - 1:].argmax(-1).tolist() == prompt["greedy_ids"][:8]
