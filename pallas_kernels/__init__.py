"""Pallas kernels for GPU (Triton lowering) and TPU (Mosaic), proven on CPU in interpret mode.

Imports only JAX and itself. Every attention kernel has the engine's attention signature
`(q [T, N, H], kv_pages, layer, step, *, scale)` and a dense float32 `*_reference` with the same signature
(docs/kernels.md for designs and tolerances); the quantized matmul has `quantized_matmul_reference` beside
it (docs/quantization.md). The data the kernels read is defined here and imported by the engine:

  step_metadata.py         StepInputs: the per-step device metadata (page tables, query starts, ...)
  kv_cache.py              bf16/f32 pages or int8 + per-token-per-head scales; write_kv (quantize on write)
  quantized_weights.py     Int8Weight / Int4Weight: the quantized-weight layout the matmul reads
  reference.py             the dense float32 ragged paged attention every kernel is checked against
  ragged_attention.py      GPU: mixed prefill/decode steps, grid (query blocks, KV heads)
  decode_attention.py      GPU: split-K for decode-shaped steps over long contexts
  tpu_ragged_attention.py  TPU: scalar-prefetched page tables, double-buffered page DMAs
  quantized_matmul.py      GPU: x [M, I] @ an int8 / int4 weight dequantized tile by tile, grid (M, O blocks)

Which kernel serves which bucket is the engine's choice: `jaxserve.model.attention_backends`.
"""

from pallas_kernels.decode_attention import paged_decode_attention, paged_decode_attention_reference
from pallas_kernels.kv_cache import QuantizedKV, allocate_kv_pages, dequantize_kv, kv_cache_dtype, quantize_kv, write_kv
from pallas_kernels.quantized_matmul import quantized_matmul, quantized_matmul_reference
from pallas_kernels.ragged_attention import ragged_paged_attention, ragged_paged_attention_reference
from pallas_kernels.step_metadata import StepInputs
from pallas_kernels.tpu_ragged_attention import tpu_ragged_paged_attention, tpu_ragged_paged_attention_reference

__all__ = [
    "QuantizedKV", "StepInputs", "allocate_kv_pages", "dequantize_kv", "kv_cache_dtype",
    "paged_decode_attention", "paged_decode_attention_reference", "quantize_kv", "quantized_matmul",
    "quantized_matmul_reference", "ragged_paged_attention", "ragged_paged_attention_reference",
    "tpu_ragged_paged_attention", "tpu_ragged_paged_attention_reference", "write_kv",
]
