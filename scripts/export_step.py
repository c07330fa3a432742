"""Lowers every warm-up bucket of the serving step for TPU or CUDA with `jax.export`, on a machine without either.

    python scripts/export_step.py --platform tpu --model llama3-8b --tensor-parallel-size 8
    python scripts/export_step.py --platform cuda --model SmolLM2-135M-Instruct --kv-cache-dtype int8

Weights are abstract (no checkpoint is read for the built-in `llama3-8b` shape); the mesh is made of fake CPU
devices. One line per bucket with the Pallas kernels found in the lowered module, then one JSON object
{platform, model, tensor_parallel_size, buckets, lowered, pallas_calls, seconds}. Exit status 1 if any bucket
fails to lower or lowers without the Pallas attention. See `jaxserve.worker.export`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--platform", choices=("tpu", "cuda"), required=True)
    p.add_argument("--model", default="SmolLM2-135M-Instruct", help="llama3-8b (a built-in shape) or a model name")
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--quantization", choices=("none", "int8", "int4"), default="none")
    p.add_argument("--kv-cache-dtype", choices=("auto", "bf16", "int8"), default="auto")
    p.add_argument("--max-num-seqs", type=int, default=16)
    p.add_argument("--max-num-batched-tokens", type=int, default=512)
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--num-pages", type=int, default=1024)
    p.add_argument("--max-buckets", type=int, default=None, help="lower only the first N buckets")
    p.add_argument("--tpu-chip", default="v5e", help="the TPU generation described to the Mosaic lowering")
    return p.parse_args()


def main() -> int:
    args = parse_args()
    # Fake devices for the mesh: must be set before JAX starts.
    os.environ["JAX_PLATFORMS"] = "cpu"
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={max(8, args.tensor_parallel_size)}"

    from jaxserve.config import EngineConfig
    from jaxserve.model.checkpoint import read_config
    from jaxserve.model_registry import resolve_model
    from jaxserve.worker import export

    t0 = time.perf_counter()
    config = EngineConfig(model=args.model, dtype="bfloat16", attention_backend="pallas",
                          tensor_parallel_size=args.tensor_parallel_size, quantization=args.quantization,
                          kv_cache_dtype=args.kv_cache_dtype, max_num_seqs=args.max_num_seqs,
                          max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
                          num_pages=args.num_pages)
    model = export.BUILTIN_MODELS.get(args.model) or read_config(resolve_model(args.model))[0]
    reports = export.export_step(config, model, args.platform, tpu_chip=args.tpu_chip,
                                 max_buckets=args.max_buckets)
    for r in reports:
        print(r.line(), flush=True)
    lowered = sum(r.error is None for r in reports)
    print(json.dumps({"platform": args.platform, "model": args.model, "tensor_parallel_size": args.tensor_parallel_size,
                      "quantization": args.quantization, "kv_cache_dtype": args.kv_cache_dtype,
                      "buckets": len(reports), "lowered": lowered, "pallas_calls": [r.pallas_calls for r in reports],
                      "kernels": sorted({k for r in reports for k in r.kernels}),
                      "seconds": round(time.perf_counter() - t0, 1)}))
    return 0 if lowered == len(reports) else 1


if __name__ == "__main__":
    sys.exit(main())
