"""Hugging Face safetensors → jaxserve weights, as one table.

Each row of `HF_TABLE` maps a source-key regex (group 1, when present, is the layer index) to a weight's
name, its path in `jaxserve.model.llama.weight_info` ("layers.wq"; None: the tensor is dropped), and a
transform. A transform gets the source tensor and the target shape (one layer's slice for "layers.*"
names), checks the source shape, and returns the tensor in jaxserve's layout. Keys no row matches are refused.

The transforms here are shared with `checkpoints_conv.gguf`: GGUF stores the same [out, in] matrices.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable

import numpy as np

from jaxserve.config import ModelConfig

Transform = Callable[[np.ndarray, tuple[int, ...], str], np.ndarray]
Table = tuple[tuple[str, str | None, Transform | None], ...]
Loader = Callable[[], np.ndarray]  # reads one source tensor as float32 numpy


def _expect(w: np.ndarray, shape: tuple[int, ...], key: str) -> None:
    if tuple(w.shape) != tuple(shape):
        raise ValueError(f"tensor {key} has shape {tuple(w.shape)}, expected {tuple(shape)}")


def same(w: np.ndarray, target: tuple[int, ...], key: str) -> np.ndarray:
    """Already in our layout (embeddings [V, D], norm scales [D])."""
    _expect(w, target, key)
    return w


def bias(w: np.ndarray, target: tuple[int, ...], key: str) -> np.ndarray:
    """A projection bias [N*H] → [N, H]."""
    _expect(w, (math.prod(target),), key)
    return w.reshape(target)


def linear(num_in_axes: int) -> Transform:
    """A torch Linear weight [out, in] → ours [*in_axes, *out_axes], the first `num_in_axes` axes being `in`.

    wq [D | N, H] and w_gate [D | F] have one input axis; wo [N, H | D] has two.
    """

    def transform(w: np.ndarray, target: tuple[int, ...], key: str) -> np.ndarray:
        _expect(w, (math.prod(target[num_in_axes:]), math.prod(target[:num_in_axes])), key)
        return w.T.reshape(target)

    return transform


_LAYER = r"model\.layers\.(\d+)\."
HF_TABLE: Table = (
    (r"model\.embed_tokens\.weight", "embed", same),
    (r"model\.norm\.weight", "final_norm", same),
    (r"lm_head\.weight", "lm_head", linear(1)),  # [V, D] → [D, V]
    (_LAYER + r"input_layernorm\.weight", "layers.attn_norm", same),
    (_LAYER + r"self_attn\.q_proj\.weight", "layers.wq", linear(1)),  # [N*H, D] → [D, N, H]
    (_LAYER + r"self_attn\.k_proj\.weight", "layers.wk", linear(1)),  # [K*H, D] → [D, K, H]
    (_LAYER + r"self_attn\.v_proj\.weight", "layers.wv", linear(1)),
    (_LAYER + r"self_attn\.o_proj\.weight", "layers.wo", linear(2)),  # [D, N*H] → [N, H, D]
    (_LAYER + r"self_attn\.q_proj\.bias", "layers.bq", bias),  # Qwen2
    (_LAYER + r"self_attn\.k_proj\.bias", "layers.bk", bias),
    (_LAYER + r"self_attn\.v_proj\.bias", "layers.bv", bias),
    (_LAYER + r"post_attention_layernorm\.weight", "layers.mlp_norm", same),
    (_LAYER + r"mlp\.gate_proj\.weight", "layers.w_gate", linear(1)),  # [F, D] → [D, F]
    (_LAYER + r"mlp\.up_proj\.weight", "layers.w_up", linear(1)),
    (_LAYER + r"mlp\.down_proj\.weight", "layers.w_down", linear(1)),  # [D, F] → [F, D]
    (_LAYER + r"self_attn\.rotary_emb\.inv_freq", None, None),  # recomputed from the config
)


# ------------------------------------------------------------------------------------------ the source


def is_source(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def read_source(path: Path) -> tuple[ModelConfig, Table, list[tuple[str, Loader]]]:
    """The model config, the conversion table and every tensor (key, loader) of a Hugging Face folder."""
    cfg = ModelConfig.from_hf_config(json.loads((path / "config.json").read_text()))
    return cfg, HF_TABLE, tensors(path)


def shard_files(path: Path) -> list[Path]:
    """The safetensors files of a folder: those the index names when there is one, else every *.safetensors."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            raise ValueError(f"{index} names shards that are not in {path}: {missing}")
        return [path / n for n in names]
    return sorted(path.glob("*.safetensors"))


def tensors(path: Path) -> list[tuple[str, Loader]]:
    """(source key, a loader that reads just that tensor as float32 numpy) for every tensor of every shard."""
    from safetensors import safe_open

    def load(file: Path, key: str) -> np.ndarray:
        with safe_open(file, framework="numpy") as f:  # memory-mapped; reads one tensor
            return f.get_tensor(key).astype(np.float32)

    out = []
    for file in shard_files(path):
        with safe_open(file, framework="numpy") as f:
            out.extend((key, lambda file=file, key=key: load(file, key)) for key in f.keys())
    return out
