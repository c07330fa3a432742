"""GGUF Q8_0 / Q4_0 / Q4_1 tensors → jaxserve's `Int8Weight` / `Int4Weight` arrays, bytes moved, never through float.

The blocks (llama.cpp's ggml-common.h), 32 weights of one row each:

    Q8_0  d f16 | 32 x int8 q            w = d * q
    Q4_0  d f16 | 16 bytes               w = d * (q - 8)   = q * d + (-8 d)
    Q4_1  d f16 | m f16 | 16 bytes       w = q * d + m

with byte j of a 4-bit block holding weights j (low nibble) and j + 16 (high nibble): the nibble order of
`quantization.pack_int4` at g = 32, so the packed bytes are copied as they are. A GGUF matrix is [out, in]
with blocks along `in`; ours is [G, g(/2), *out], so repacking is a transpose of the block grid plus the
row order of the conversion table's transform (llama.cpp's q/k row permutation), which `row_order` reads off
the transform itself. -8 d is exact in float16 (a power-of-two multiple), so every repacked weight
dequantizes to exactly what `gguf.quants.dequantize` gives (checked by tests/test_quantization.py).
"""

from __future__ import annotations

import math

import numpy as np

from checkpoints_conv.hf_safetensors import Transform

BLOCK = 32
REPACKABLE = {"int8": ("Q8_0",), "int4": ("Q4_0", "Q4_1")}
_BLOCK_BYTES = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}


# The layer projections of a llama GGUF (blk.N.attn_q.weight, ...): what decides its own scheme.
_PROJECTIONS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def native_scheme(reader) -> str:
    """The scheme a GGUF's layer projections are already in: "int4" when every one is Q4_0 / Q4_1, "int8" when
    every one is Q8_0, else "none" (float, or mixed / k-quant types that would be quantized again)."""
    types = {t.tensor_type.name for t in reader.tensors
             if t.name.startswith("blk.") and t.name.split(".")[2] in _PROJECTIONS}
    for scheme, qtypes in REPACKABLE.items():
        if types and types <= set(qtypes):
            return scheme
    return "none"


def can_repack(qtype: str, scheme: str, group_size: int | None, scale_dtype: str) -> bool:
    """Whether a tensor of GGUF type `qtype` repacks exactly into `scheme` at this group size and scale dtype."""
    return qtype in REPACKABLE.get(scheme, ()) and group_size == BLOCK and scale_dtype in ("float16", "float32")


def split_blocks(raw: np.ndarray, qtype: str) -> dict[str, np.ndarray]:
    """raw uint8 [rows, row_bytes] → the components with rows first: values / packed [rows, G, 32 or 16],
    scales (and mins) float16 [rows, G]."""
    rows = raw.shape[0]
    blocks = np.asarray(raw, np.uint8).reshape(rows, -1, _BLOCK_BYTES[qtype])  # [rows, G, bytes]

    def f16(lo: int) -> np.ndarray:
        return np.ascontiguousarray(blocks[..., lo:lo + 2]).view(np.float16)[..., 0]  # [rows, G]

    d = f16(0)
    if qtype == "Q8_0":
        return {"values": np.ascontiguousarray(blocks[..., 2:]).view(np.int8), "scales": d}
    if qtype == "Q4_0":
        with np.errstate(over="raise"):
            mins = d * np.float16(-8)  # exact: a power-of-two multiple (raises if it overflows float16)
        return {"packed": blocks[..., 2:], "scales": d, "mins": mins}
    return {"packed": blocks[..., 4:], "scales": d, "mins": f16(2)}


def row_order(transform: Transform, target: tuple[int, ...], rows: int, cols: int, key: str) -> np.ndarray:
    """For each flattened output position of `transform`'s result [*in, *out], the source row it comes from.

    The transform runs on a probe whose entries encode (row, col); a ValueError if it moves inputs (columns)
    anywhere but to their own position in the flattened `in` axes, which blocks along `in` rely on.
    """
    probe = np.arange(rows, dtype=np.int64)[:, None] * cols + np.arange(cols, dtype=np.int64)[None, :]
    moved = transform(probe, target, key).reshape(cols, rows)  # [I, O]
    order = moved[0] // cols
    if not np.array_equal(moved, order[None, :] * cols + np.arange(cols)[:, None]):
        raise ValueError(f"tensor {key}: its transform reorders inputs, so its blocks cannot be repacked")
    return order


def repack(raw: np.ndarray, qtype: str, transform: Transform, target: tuple[int, ...], n_in: int,
           key: str) -> dict[str, np.ndarray]:
    """One GGUF tensor → our components for a weight of dense shape `target` = [*in, *out] (one layer).

    Args:
      raw: the tensor's bytes, uint8 [rows = out, row_bytes] (`gguf.GGUFReader` tensor `.data`).
      transform: the conversion table's transform of this tensor (used only to read the row order).
      n_in: the number of `in` axes of `target`.
    Returns:
      values [G, 32, *out] int8 + scales [G, *out] (Q8_0), or packed [G, 16, *out] uint8 + scales + mins
      (Q4_0 / Q4_1), scales and mins float16 as stored.
    """
    cols, out_shape = math.prod(target[:n_in]), target[n_in:]
    rows = math.prod(out_shape)
    if raw.shape[0] != rows or raw.shape[1] * BLOCK != cols * _BLOCK_BYTES[qtype]:
        raise ValueError(f"tensor {key} ({qtype}) has {raw.shape} bytes, expected {rows} rows of {cols} weights")
    order = row_order(transform, target, rows, cols, key)
    parts = split_blocks(raw, qtype)
    # [rows, G, ...] → [G, ..., rows] in our row order → [G, ..., *out]
    return {c: np.ascontiguousarray(np.moveaxis(a[order], 0, -1)).reshape(*a.shape[1:], *out_shape)
            for c, a in parts.items()}
