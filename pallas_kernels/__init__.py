"""Pallas kernels for GPU (Triton lowering) and TPU (Mosaic), proven on CPU in interpret mode.

Every attention kernel has the engine's attention signature `(q [T, N, H], kv_pages, layer, step, *, scale)`
and a dense float32 `*_reference` with the same signature (docs/kernels.md for designs and tolerances);
the quantized matmul has `quantized_matmul_reference` beside it (docs/quantization.md).

  ragged_attention.py      GPU: mixed prefill/decode steps, grid (query blocks, KV heads)
  decode_attention.py      GPU: split-K for decode-shaped steps over long contexts
  tpu_ragged_attention.py  TPU: scalar-prefetched block tables, double-buffered page DMAs
  kv_cache.py              bf16/f32 pages or int8 + per-token-per-head scales; write_kv (quantize on write)
  quantized_matmul.py      GPU: x [M, I] @ an int8 / int4 weight dequantized tile by tile, grid (M, O blocks);
                           `--quantized-matmul pallas` (through `jaxserve.quantization.qdot_pallas`)
  backend.py               --attention-backend auto|xla|pallas, per-bucket kernel choice
"""

from pallas_kernels.backend import (make_pallas_attention, paged_attention_pallas, pallas_available,
                                    resolve_attention_backend)
from pallas_kernels.decode_attention import paged_decode_attention, paged_decode_attention_reference
from pallas_kernels.kv_cache import (QuantizedKV, allocate_kv_pages, dequantize, kv_cache_dtype, quantize_int8,
                                     write_kv)
from pallas_kernels.quantized_matmul import quantized_matmul, quantized_matmul_reference
from pallas_kernels.ragged_attention import ragged_paged_attention, ragged_paged_attention_reference
from pallas_kernels.tpu_ragged_attention import tpu_ragged_paged_attention, tpu_ragged_paged_attention_reference

__all__ = [
    "QuantizedKV", "allocate_kv_pages", "dequantize", "kv_cache_dtype", "make_pallas_attention",
    "paged_attention_pallas", "paged_decode_attention", "paged_decode_attention_reference", "pallas_available",
    "quantize_int8", "quantized_matmul", "quantized_matmul_reference", "ragged_paged_attention",
    "ragged_paged_attention_reference", "resolve_attention_backend", "tpu_ragged_paged_attention",
    "tpu_ragged_paged_attention_reference", "write_kv",
]
