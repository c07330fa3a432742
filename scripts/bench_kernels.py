"""Times the paged-attention kernels against the XLA path; prints a table and writes JSON.

    python scripts/bench_kernels.py                      # decode batch 1-256 x context 128-32k, mixed prefill
    python scripts/bench_kernels.py --quick --interpret  # CPU: small sweep + interpret-mode correctness checks
    python scripts/bench_kernels.py --quantized-matmul   # also the int8 / int4 matmul: Pallas vs XLA qdot

On CPU only the XLA path is timed (Pallas kernels run there in interpret mode, for correctness only). The
quantized matmul is timed by default on accelerators; on CPU only with --quantized-matmul, at a tiny size,
with the kernel interpreted (its time shows that it runs, nothing more).
See jaxserve/bench/kernels.py for what is counted.
"""

from __future__ import annotations

import argparse
import json

import jax

from jaxserve.bench import kernels as benchmark


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 64, 256])
    parser.add_argument("--contexts", type=int, nargs="+", default=[128, 1024, 8192, 32768])
    parser.add_argument("--quick", action="store_true", help="a small sweep (batches 1 4 16, contexts 128 1024)")
    parser.add_argument("--num-heads", type=int, default=32)
    parser.add_argument("--num-kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--kv-dtype", default=None, choices=["bfloat16", "float32", "int8"],
                        help="default: float32 on CPU, bfloat16 on accelerators")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--max-kv-gib", type=float, default=None,
                        help="skip cases whose KV exceeds this (default: 1 on CPU, 24 on accelerators)")
    parser.add_argument("--interpret", action="store_true", help="also check the Pallas kernels in interpret mode")
    parser.add_argument("--quantized-matmul", action="store_true",
                        help="on CPU, also run the quantized matmul (tiny, interpreted); accelerators always do")
    parser.add_argument("--out", default="bench_kernels.json")
    args = parser.parse_args()

    on_cpu = jax.default_backend() == "cpu"
    batches, contexts = ([1, 4, 16], [128, 1024]) if args.quick else (args.batches, args.contexts)
    cases = [benchmark.decode_case(b, c) for c in contexts for b in batches]
    cases += [benchmark.mixed_case(p, d, c) for p, d, c in ((512, 0, 1), (512, 32, max(contexts)), (128, 64, 1024))]
    shape = benchmark.AttentionShape(num_heads=args.num_heads, num_kv_heads=args.num_kv_heads, head_dim=args.head_dim,
                                     page_size=args.page_size,
                                     kv_dtype=args.kv_dtype or ("float32" if on_cpu else "bfloat16"))
    max_kv_gib = args.max_kv_gib if args.max_kv_gib is not None else (1 if on_cpu else 24)
    report = benchmark.run(cases, shape, iters=args.iters, max_kv_bytes=int(max_kv_gib * 2**30),
                           copy_mib=256 if on_cpu else 2048)
    if args.quantized_matmul or not on_cpu:
        report["results"] += benchmark.run_quantized_matmul(
            benchmark.QMM_TINY_SHAPES if on_cpu else benchmark.QMM_SHAPES, iters=args.iters,
            copy_bw=report["copy_gbps"] * 1e9, interpret=on_cpu)
    if args.interpret:
        report["interpret_checks"] = benchmark.check_interpret(shape)
    print(benchmark.format_table(report))
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
