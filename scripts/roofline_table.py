"""Prints the decode-floor table of docs/accelerators.md (jaxserve.bench.roofline.datasheet_decode_floors).

    python scripts/roofline_table.py              # SmolLM2-135M and Llama-3-8B, batch 1 and 64, 2048 tokens
    python scripts/roofline_table.py --context 8192
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # NOTE: this checkout, not an installed one

from jaxserve.bench.roofline import datasheet_decode_floors  # noqa: E402
from jaxserve.config import ModelConfig  # noqa: E402
from jaxserve.model.checkpoint import read_config  # noqa: E402
from jaxserve.model_registry import resolve_model  # noqa: E402

LLAMA3_8B = ModelConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
                        num_kv_heads=8, head_dim=128, rope_theta=500000.0, max_position_embeddings=8192)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--context", type=int, default=2048, help="tokens in each sequence's KV cache")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    args = p.parse_args()
    models = {"SmolLM2-135M": read_config(resolve_model("SmolLM2-135M-Instruct"))[0], "Llama-3-8B": LLAMA3_8B}
    print("| model | batch | chip | TPOT floor ms | memory ms | compute ms | GB read / step | bound | tok/s ceiling |")
    print("|---|---:|---|---:|---:|---:|---:|---|---:|")
    for r in datasheet_decode_floors(models, tuple(args.batches), args.context):
        print(f"| {r['model']} | {r['batch']} | {r['chip']} | {r['tpot_ms']:.3f} | {r['memory_ms']:.3f} | "
              f"{r['compute_ms']:.3f} | {r['gbytes']:.3f} | {r['bound']} | {r['tok_s']:,.0f} |")


if __name__ == "__main__":
    main()
