"""The Pallas dequantize-in-the-matmul kernel against its jnp reference and an independent numpy product.

Fresh random weights every run, quantized with `jaxserve.model.quantization`; `np_dense` rebuilds the dense
[I, O] weight from the stored arrays in float64, written from the layout in the kernel's docstring (no
code shared with the package). `TestQuantizedMatmul` runs the compiled kernel on a GPU (skipped elsewhere);
`TestQuantizedMatmulInterpret` sets INTERPRET = True and runs the same matrix on CPU (habit 15). The
kernel is also lowered for CUDA (Triton) on CPU at SmolLM2's shapes. Then the wiring: `qdot_pallas` on
llama.py's einsum specs, `llama.forward` and the model runner with `--quantized-matmul pallas`.
"""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.config import EngineConfig, ModelConfig
from jaxserve.model import llama
from jaxserve.model import quantization as qz
from pallas_kernels.quantized_matmul import quantized_matmul, quantized_matmul_reference

# Stated tolerances (rtol and atol; outputs are O(1): x ~ N(0, 1), w ~ 0.05 N(0, 1), I <= 576, |y| < ~5).
#   float32: accumulation order only. Observed max abs error 1e-6 against float64 numpy, 5e-6 against the
#   reference (3 seeds x every case).
#   bfloat16: x is bf16; the kernel rounds each dequantized weight tile to bf16 (as qdot does) and the
#   output to bf16, each a relative 2^-9. Observed max abs error 1.8e-2 against numpy, 3.1e-2 against the
#   (also bf16-rounded) reference: two bf16 ulps at |y| ~ 4.6; per-channel int8 equals the reference exactly.
TOLERANCE = {"float32": 1e-5, "bfloat16": 3e-2}

WEIGHTS = {
    # name: (scheme, I, O, group size, scale dtype)
    "int8_per_channel": ("int8", 64, 128, None, "float32"),
    "int8_g32": ("int8", 128, 64, 32, "float32"),
    "int4_g32_f16_scales": ("int4", 128, 64, 32, "float16"),  # GGUF Q4 blocks: g = 32, float16 scales
    "int4_g128": ("int4", 256, 64, 128, "float32"),
    "int4_g96_smollm2": ("int4", 576, 64, 96, "float32"),  # SmolLM2's D = 576: 128 lowered to 96
}
TOKENS = (1, 5, 33)  # decode, a few rows, M not a multiple of block_m (padded in the wrapper)


def random_weight(rng, scheme, I, O, group, scale_dtype):
    w = rng.standard_normal((I, O)).astype(np.float32) * 0.05
    qw = qz.quantize(w, scheme, 1, group_size=group, scale_dtype=jnp.dtype(scale_dtype))
    assert qw.group_size == (group or I)
    return qw


def np_dense(w) -> np.ndarray:
    """float64 [I, O]: int8 values * scales; int4 byte b of a group = input b (low) | input b + g/2 (high)."""
    scales = np.asarray(w.scales.astype(jnp.float32), np.float64)[:, None, :]  # [G, 1, O]
    if isinstance(w, qz.Int8Weight):
        dense = np.asarray(w.values, np.float64) * scales
    else:
        packed = np.asarray(w.packed)
        q = np.concatenate([packed & 15, packed >> 4], axis=1).astype(np.float64)  # [G, g, O]
        dense = q * scales + np.asarray(w.mins.astype(jnp.float32), np.float64)[:, None, :]
    return dense.reshape(-1, dense.shape[-1])


def check(got, want, dtype, what):
    got = np.asarray(got.astype(jnp.float32), np.float64)
    np.testing.assert_allclose(got, want, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype], err_msg=what)


@pytest.mark.gpu
class TestQuantizedMatmul:
    PLATFORM = "gpu"
    INTERPRET = False

    @pytest.fixture(autouse=True)
    def _needs_platform(self):
        if not self.INTERPRET and jax.default_backend() != self.PLATFORM:
            pytest.skip(f"needs a {self.PLATFORM}")

    @pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
    @pytest.mark.parametrize("name", sorted(WEIGHTS))
    def test_matches_reference_and_numpy(self, name, dtype):
        rng = np.random.default_rng()
        w = random_weight(rng, *WEIGHTS[name])
        dense = np_dense(w)
        for M in TOKENS:
            x = jnp.asarray(rng.standard_normal((M, dense.shape[0])), dtype)
            got = quantized_matmul(x, w, block_n=32, interpret=self.INTERPRET)
            assert got.shape == (M, dense.shape[1]) and got.dtype == x.dtype
            want = np.asarray(x.astype(jnp.float32), np.float64) @ dense
            check(got, want, dtype, f"{name} M={M} vs numpy")
            check(got, np.asarray(quantized_matmul_reference(x, w).astype(jnp.float32), np.float64), dtype,
                  f"{name} M={M} vs reference")

    def test_explicit_blocks_and_float32_output_from_bfloat16(self):
        rng = np.random.default_rng()
        w = random_weight(rng, *WEIGHTS["int4_g96_smollm2"])
        x = jnp.asarray(rng.standard_normal((7, 576)), jnp.bfloat16)
        got = quantized_matmul(x, w, block_m=8, block_n=16, block_k=24, preferred_element_type=jnp.float32,
                               interpret=self.INTERPRET)
        assert got.dtype == jnp.float32
        # the same math as qdot in bf16 (weight rounded once to bf16, float32 accumulation and output). NOTE:
        # q * scale + min is one fused multiply-add in one and two roundings in the other, so a weight on a
        # bf16 rounding boundary can land one bf16 ulp apart (|w| ~ 0.2 -> 8e-4, times |x| <= ~4): a few such
        # weights in a run move a column by up to ~1e-2 (CI saw 2.4e-3), while a wrong tile moves it by O(1).
        want = qz.qdot("TD,DF->TF", x, w, preferred_element_type=jnp.float32)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-2)


class TestQuantizedMatmulInterpret(TestQuantizedMatmul):
    INTERPRET = True


def test_unsupported_shapes_raise_naming_them():
    rng = np.random.default_rng(0)
    w = random_weight(rng, "int4", 128, 48, 32, "float32")
    x = jnp.zeros((3, 128), jnp.float32)
    with pytest.raises(ValueError, match=r"O = 48 .* block_n = 32"):
        quantized_matmul(x, w, block_n=32, interpret=True)
    with pytest.raises(ValueError, match=r"x \(3, 64\) has 64 inputs .* G \* g = 128"):
        quantized_matmul(jnp.zeros((3, 64)), w, block_n=16, interpret=True)
    with pytest.raises(ValueError, match="block_k = 5 must divide the 16 stored rows"):
        quantized_matmul(x, w, block_n=16, block_k=5, interpret=True)
    stacked = qz.quantize_int8(np.zeros((2, 128, 32), np.float32), 1, lead_ndim=1)
    with pytest.raises(ValueError, match=r"one layer's weight .* \(2, 1, 128, 32\)"):
        quantized_matmul(x, stacked, block_n=16, interpret=True)


@pytest.mark.parametrize("scheme,I,O,group,M,dtype", [
    ("int8", 576, 576, None, 16, jnp.bfloat16),  # per-channel wq
    ("int8", 1536, 576, 128, 64, jnp.bfloat16),  # grouped w_down
    ("int4", 576, 1536, 96, 1, jnp.bfloat16),  # w_gate with SmolLM2's g = 96 (chunks of 16 packed rows)
    ("int4", 576, 49152, 96, 8, jnp.float32),  # the LM head
])
def test_kernel_lowers_to_triton(scheme, I, O, group, M, dtype):
    S = jax.ShapeDtypeStruct
    G = I // (group or I)
    g = I // G
    if scheme == "int8":
        w = qz.Int8Weight(S((G, g, O), jnp.int8), S((G, O), jnp.float32), (I,), 1)
    else:
        w = qz.Int4Weight(S((G, g // 2, O), jnp.uint8), S((G, O), jnp.float16), S((G, O), jnp.float16), (I,), 1)
    lowered = jax.jit(lambda x, w: quantized_matmul(x, w, block_n=64)).trace(S((M, I), dtype), w).lower(
        lowering_platforms=("cuda",))
    assert "triton" in lowered.as_text()


# ------------------------------------------------------------------------------------------- wiring


@pytest.mark.parametrize("scheme,group", [("int8", None), ("int8", 16), ("int4", 32)])
def test_qdot_pallas_matches_qdot_on_the_model_specs(scheme, group):
    rng = np.random.default_rng()
    cases = [("TD,DNH->TNH", (5, 64), (64, 4, 16), 1), ("TNH,NHD->TD", (5, 4, 16), (4, 16, 64), 2),
             ("MD,DV->MV", (3, 64), (64, 128), 1)]
    for spec, xs, ws, n_in in cases:
        x = jnp.asarray(rng.standard_normal(xs), jnp.float32)
        w = qz.quantize(rng.standard_normal(ws).astype(np.float32) * 0.05, scheme, n_in, group_size=group)
        got = jax.jit(lambda x, w, spec=spec: qz.qdot_pallas(spec, x, w, preferred_element_type=jnp.float32))(x, w)
        want = qz.qdot(spec, x, w, preferred_element_type=jnp.float32)
        assert got.shape == want.shape and got.dtype == want.dtype
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5, err_msg=spec)


def test_qdot_pallas_leaves_what_it_does_not_take_to_qdot():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((3, 64)), jnp.float32)
    dense = jnp.asarray(rng.standard_normal((64, 97)), jnp.float32)
    odd = qz.quantize_int8(np.asarray(dense), 1)  # O = 97: no block size divides it
    for w in (dense, odd):
        np.testing.assert_array_equal(np.asarray(qz.qdot_pallas("MD,DV->MV", x, w)),
                                      np.asarray(qz.qdot("MD,DV->MV", x, w)))


def tiny_config(**overrides) -> ModelConfig:
    base = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                head_dim=16, rope_theta=500.0, max_position_embeddings=256)
    return ModelConfig(**{**base, **overrides})


@pytest.mark.parametrize("spec", [qz.QuantSpec("int8", "int8"), qz.QuantSpec("int4", "int4", int4_group_size=32)],
                         ids=["int8", "int4_g32"])
def test_forward_with_the_pallas_matmul_matches_qdot(spec):
    """Every projection and the tied head (V = 128) through the kernel in interpret mode, 13 tokens."""
    cfg = tiny_config()
    w = llama.init_weights(cfg, jax.random.key(0))
    qw = qz.quantize_weights(w, llama.weight_info(cfg), spec)
    ids = [int(t) for t in np.random.default_rng(2).integers(0, cfg.vocab_size, 13)]
    ref = np.asarray(llama.sequence_logits(qw, cfg, ids, page_size=4))
    got = np.asarray(llama.sequence_logits(qw, cfg, ids, page_size=4, matmul=qz.qdot_pallas))
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


def test_engine_option_and_server_flag():
    from jaxserve.server.__main__ import build_parser, configs_from_args

    assert EngineConfig().quantized_matmul == "auto"
    with pytest.raises(ValueError, match="quantized_matmul must be one of"):
        EngineConfig(quantized_matmul="triton")
    engine_cfg, _ = configs_from_args(build_parser().parse_args(["--quantized-matmul", "pallas"]))
    assert engine_cfg.quantized_matmul == "pallas"


def test_runner_with_pallas_matmul_samples_what_the_xla_runner_samples(tmp_path):
    from jaxserve.core.sampling_params import SamplingParams
    from jaxserve.model.checkpoint import save_checkpoint
    from jaxserve.model.sampler import RowSampling
    from jaxserve.worker.model_runner import ModelRunner

    cfg = tiny_config()
    spec = qz.QuantSpec("int4", int4_group_size=32)
    qw = qz.quantize_weights(llama.init_weights(cfg, jax.random.key(3)), llama.weight_info(cfg), spec)
    save_checkpoint(tmp_path, cfg, qz.np_tree(qw), quantization=spec)
    outs = {}
    for matmul in ("xla", "pallas"):
        runner = ModelRunner(EngineConfig(model=str(tmp_path), dtype="float32", quantized_matmul=matmul,
                                          max_num_seqs=1, max_num_batched_tokens=16, max_model_len=64,
                                          num_pages=8, block_size=4), str(tmp_path))
        assert runner.matmul is (qz.qdot_pallas if matmul == "pallas" else qz.qdot)
        chunk = types.SimpleNamespace(request_id="a", token_ids=list(range(3, 14)), start_pos=0, page_table=[1, 2, 3])
        row = RowSampling(params=SamplingParams(temperature=0.0, logprobs=5), seed=0, position=11)
        outs[matmul] = runner.execute([chunk], [row])
    np.testing.assert_array_equal(outs["pallas"].token_ids, outs["xla"].token_ids)
    np.testing.assert_allclose(outs["pallas"].top_logprobs, outs["xla"].top_logprobs, rtol=1e-4, atol=1e-4)
