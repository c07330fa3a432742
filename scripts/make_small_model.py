"""Make the cascade's small model from SmolLM2: int4 projections, optionally with layers pruned (no training).

    python scripts/make_small_model.py                  # int4, all 30 layers -> ~/.cache/jaxserve/small/...
    python scripts/make_small_model.py --keep 0-21,24-29 --quantization none --out /tmp/small

The projections are quantized to int4 (groups of 32, float scales and mins) and saved quantized, so the
checkpoint serves at its own size; embeddings (tied to the LM head) and norms stay float, so both models
share the vocabulary and tokenizer the cascade needs. `--keep` prunes layers (first and last kept,
a middle block dropped, as ShortGPT / Gromov et al. 2024 do).

What we chose, and why: int4 at full depth. On SmolLM2-135M, pruning without training ruins the model:
dropping 2 of 30 layers already gives wrong capitals, 4 give fluent nonsense and 14 give word salad, and
distilling a deep student back (scripts/distill_draft.py) does not fit the 2 shared cores of the machine
this was built on. int4 keeps much of the model's knowledge, makes more mistakes (mostly arithmetic) and
decodes faster, which is the trade a cascade's small model should offer.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
from pathlib import Path

import jax
import numpy as np

from jaxserve.model.checkpoint import load_checkpoint, save_checkpoint
from jaxserve.model.llama import weight_info
from jaxserve.model.quantization import QuantSpec, quantize_weights
from jaxserve.model_registry import resolve_model
from jaxserve.spec_decode.draft_init import TOKENIZER_FILES

DEFAULT_KEEP = "0-29"  # every layer of SmolLM2's 30


def parse_layers(text: str, num_layers: int) -> list[int]:
    """`0-11,26-29` -> [0, ..., 11, 26, ..., 29]; ascending, each in [0, num_layers)."""
    out: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.strip().partition("-")
        out += range(int(lo), int(hi or lo) + 1)
    if not out or out != sorted(set(out)) or not 0 <= out[0] <= out[-1] < num_layers:
        raise ValueError(f"--keep must list ascending layers in [0, {num_layers}), got {text!r}")
    return out


def make_small_model(model: str, keep: str, out: str | Path, quantization: str = "int4") -> Path:
    """Writes the small model's checkpoint folder (weights + the source's tokenizer files) and returns it."""
    target_dir = Path(resolve_model(model))
    cfg, weights = load_checkpoint(target_dir)
    layers = parse_layers(keep, cfg.num_layers)
    weights = jax.tree.map(lambda w: np.asarray(jax.device_get(w), np.float32), weights)
    idx = np.asarray(layers)
    pruned = dataclasses.replace(weights, layers=jax.tree.map(lambda w: w[idx], weights.layers))  # [L', ...]
    small_cfg = dataclasses.replace(cfg, num_layers=len(layers))
    spec = QuantSpec(weights=quantization)
    if spec.active:
        pruned = jax.tree.map(np.asarray, quantize_weights(pruned, weight_info(small_cfg), spec))
    dest = Path(out)
    if (dest / "params").exists():
        shutil.rmtree(dest / "params")
    save_checkpoint(dest, small_cfg, pruned, quantization=spec if spec.active else None,
                    source={"small_of": str(target_dir), "kept_layers": layers, "quantization": quantization})
    for name in TOKENIZER_FILES:
        if (target_dir / name).exists():
            shutil.copy(target_dir / name, dest / name)
    return dest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="SmolLM2-135M-Instruct")
    ap.add_argument("--keep", default=DEFAULT_KEEP, help="layers to keep: ranges and indices, e.g. 0-11,26-29")
    ap.add_argument("--quantization", default="int4", choices=("none", "int8", "int4"), help="of the projections")
    ap.add_argument("--out", default=None, help="checkpoint folder (default: ~/.cache/jaxserve/small/...)")
    args = ap.parse_args()
    out = args.out or default_out(args.keep, args.quantization)
    dest = make_small_model(args.model, args.keep, out, args.quantization)
    print(json.dumps({"out": str(dest), "keep": args.keep, "quantization": args.quantization}))


def default_out(keep: str = DEFAULT_KEEP, quantization: str = "int4") -> Path:
    return Path.home() / ".cache" / "jaxserve" / "small" / f"smollm2-{keep.replace(',', '_')}-{quantization}"


if __name__ == "__main__":
    main()
