"""GGUF (llama.cpp) → jaxserve weights, as one table.

GGUF stores the same [out, in] matrices as Hugging Face (its dims are listed innermost first, so numpy sees
[out, in]), so the rows of `gguf_table` reuse the transforms of `hf_safetensors`. Tensors are memory-mapped
and dequantized one at a time by the `gguf` package's own dequantizers (F32, F16, BF16, Q8_0, Q4_0, Q4_1,
Q4_K, Q5_K, Q6_K, ...).

NOTE: llama.cpp's convert_hf_to_gguf.py reorders the rows of q and k (weights and biases) of *llama* models
within each head, from HF's rotate-half pairs (i, i + H/2) to adjacent pairs (2i, 2i + 1):
`w.reshape(n_head, 2, rows // n_head // 2, *rest).swapaxes(1, 2).reshape(w.shape)`, with n_head the KV heads
for k. `unpermute_qk` inverts it exactly. Qwen2 GGUFs are written without the permutation.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from checkpoints_conv.hf_safetensors import Loader, Table, Transform, bias, linear, same
from jaxserve.config import ModelConfig

MAGIC = b"GGUF"


def unpermute_qk(then: Transform) -> Transform:
    """Undoes llama.cpp's q/k row permutation, then applies `then`. The target's second-to-last axis is the
    head count (wq [D, N, H], wk [D, K, H], bq [N, H]), the last one head_dim."""

    def transform(w: np.ndarray, target: tuple[int, ...], key: str) -> np.ndarray:
        n_head, head_dim = target[-2], target[-1]
        if w.shape[0] != n_head * head_dim:
            raise ValueError(f"tensor {key} has {w.shape[0]} rows, expected {n_head} heads x {head_dim}")
        # the permutation took (head, half, i) to (head, i, half); swap back
        w = w.reshape(n_head, head_dim // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
        return then(w, target, key)

    return transform


def gguf_table(arch: str) -> Table:
    """The conversion table of a GGUF architecture ("llama" or "qwen2")."""
    permuted = arch == "llama"
    qk = unpermute_qk(linear(1)) if permuted else linear(1)
    qk_bias = unpermute_qk(bias) if permuted else bias
    layer = r"blk\.(\d+)\."
    return (
        (r"token_embd\.weight", "embed", same),  # [V, D]
        (r"output_norm\.weight", "final_norm", same),
        (r"output\.weight", "lm_head", linear(1)),  # [V, D] → [D, V]; absent when tied
        (layer + r"attn_norm\.weight", "layers.attn_norm", same),
        (layer + r"attn_q\.weight", "layers.wq", qk),  # [N*H, D] → [D, N, H]
        (layer + r"attn_k\.weight", "layers.wk", qk),  # [K*H, D] → [D, K, H]
        (layer + r"attn_v\.weight", "layers.wv", linear(1)),
        (layer + r"attn_output\.weight", "layers.wo", linear(2)),  # [D, N*H] → [N, H, D]
        (layer + r"attn_q\.bias", "layers.bq", qk_bias),
        (layer + r"attn_k\.bias", "layers.bk", qk_bias),
        (layer + r"attn_v\.bias", "layers.bv", bias),
        (layer + r"ffn_norm\.weight", "layers.mlp_norm", same),
        (layer + r"ffn_gate\.weight", "layers.w_gate", linear(1)),  # [F, D] → [D, F]
        (layer + r"ffn_up\.weight", "layers.w_up", linear(1)),
        (layer + r"ffn_down\.weight", "layers.w_down", linear(1)),  # [D, F] → [F, D]
    )


def is_source(path: Path) -> bool:
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return path.suffix == ".gguf" or f.read(4) == MAGIC


def open_reader(path: Path):
    """A memory-mapped `gguf.GGUFReader`, or a ValueError naming the file and what is wrong with it."""
    import gguf

    size = path.stat().st_size
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != MAGIC:
        raise ValueError(f"{path} is not a GGUF file: it starts with {magic!r}, not {MAGIC!r}")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # NOTE: a truncated file surfaces as IndexError, odd reshape errors, ...
        raise ValueError(f"{path} ({size} bytes) is truncated or malformed: reading it failed with "
                         f"{type(e).__name__}: {e}") from e
    for t in reader.tensors:
        end = t.data_offset + t.n_bytes
        if end > size:
            raise ValueError(f"{path} is truncated: tensor {t.name} ends at byte {end}, past the end of the "
                             f"file ({size} bytes)")
    return reader


def metadata(reader) -> dict:
    """Every key/value except the tokenizer's (large arrays, read by `jaxserve.text.tokenizer`), decoded."""
    return {k: f.contents() for k, f in reader.fields.items()
            if not k.startswith(("tokenizer.", "GGUF."))}


def read_source(path: Path) -> tuple[ModelConfig, Table, list[tuple[str, Loader]]]:
    """The model config, the conversion table and every tensor (name, dequantizing loader) of a GGUF file."""
    reader = open_reader(path)
    meta = metadata(reader)
    by_name = {t.name: t for t in reader.tensors}
    if "general.architecture" not in meta:
        raise ValueError(f"{path}: missing required key general.architecture")
    if "token_embd.weight" not in by_name:
        raise ValueError(f"{path}: missing required tensor token_embd.weight")
    try:
        cfg = ModelConfig.from_gguf_metadata(meta, vocab_size=int(by_name["token_embd.weight"].shape[-1]),
                                             has_output_weight="output.weight" in by_name,
                                             has_qkv_bias="blk.0.attn_q.bias" in by_name)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e
    return cfg, gguf_table(meta["general.architecture"]), [(t.name, _loader(path, t)) for t in reader.tensors]


def _loader(path: Path, t) -> Loader:
    def load() -> np.ndarray:
        import gguf

        shape = tuple(reversed([int(d) for d in t.shape]))  # GGUF lists dims innermost first
        try:
            w = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError as e:
            raise ValueError(f"{path}: tensor {t.name} has type {t.tensor_type.name}, which gguf cannot "
                             f"dequantize: {e}") from e
        if w.size != math.prod(shape):
            raise ValueError(f"{path}: tensor {t.name} dequantized to {w.shape}, expected {shape}")
        return np.asarray(w, dtype=np.float32).reshape(shape)

    load.gguf_tensor = t  # NOTE: the raw blocks, for repacking Q8_0 / Q4_0 / Q4_1 without dequantizing
    return load
