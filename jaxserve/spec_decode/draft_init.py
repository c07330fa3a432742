"""A draft model initialised from its target: the target's embeddings, final norm and first layers.

`scripts/distill_draft.py` starts from this and trains it; tests use it untrained as a draft that agrees
with the target often but not always. The draft shares the target's vocabulary and tokenizer files.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import jax
import numpy as np

from jaxserve.config import ModelConfig
from jaxserve.model.checkpoint import load_checkpoint, save_checkpoint
from jaxserve.model.llama import LlamaWeights

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json")


def truncated_weights(target_dir: str | Path, num_layers: int) -> tuple[ModelConfig, LlamaWeights]:
    """(draft config, float32 numpy weights) keeping the target's first `num_layers` layers."""
    cfg, weights = load_checkpoint(target_dir)
    if not 1 <= num_layers <= cfg.num_layers:
        raise ValueError(f"num_layers must be in [1, {cfg.num_layers}], got {num_layers}")
    weights = jax.tree.map(lambda w: np.asarray(jax.device_get(w)), weights)
    layers = jax.tree.map(lambda w: w[:num_layers], weights.layers)  # every layer field is [L, ...]
    return dataclasses.replace(cfg, num_layers=num_layers), dataclasses.replace(weights, layers=layers)


def save_draft(dest: str | Path, target_dir: str | Path, cfg: ModelConfig, weights: LlamaWeights,
               source: dict | None = None) -> Path:
    """Writes a draft checkpoint folder (weights + the target's tokenizer files) usable as --speculative-model."""
    dest = Path(dest)
    if (dest / "params").exists():
        shutil.rmtree(dest / "params")
    save_checkpoint(dest, cfg, jax.tree.map(lambda w: np.asarray(w, np.float32), weights),
                    source={"draft_of": str(target_dir), **(source or {})})
    for name in TOKENIZER_FILES:
        if (Path(target_dir) / name).exists():
            shutil.copy(Path(target_dir) / name, dest / name)
    return dest


def make_truncated_draft(target_dir: str | Path, dest: str | Path, num_layers: int) -> Path:
    cfg, weights = truncated_weights(target_dir, num_layers)
    return save_draft(dest, target_dir, cfg, weights, {"kind": "truncated", "num_layers": num_layers})
