"""Weight-only quantization: bytes, decode time per output token and perplexity for none / int8 / int4.

    python scripts/bench_quantization.py                 # SmolLM2-135M, batch 1 and 32, the whole text
    python scripts/bench_quantization.py --quick         # fewer iterations, 1,024 tokens of text
    python scripts/bench_quantization.py --out q.json    # also write the report as JSON

For each scheme it reports the weight bytes in device memory, the decode step time (TPOT) at each batch
(one jitted `llama.forward` + greedy pick over B rows of `--context` cached tokens, median of `--iters`)
next to the bandwidth floor: (weight bytes + KV bytes the step reads) / the measured copy bandwidth
(`copy_bandwidth`: a jitted, donated x + 1 over a large buffer). Perplexity is
over tests/data/perplexity_text.txt (public domain), in windows of 512 tokens.

Schemes: none (the model dtype), int8 (per output channel), int4 (group 128 along the input, lowered to a
divisor where needed), and for a GGUF model also int4-gguf: its own Q4_x / Q8_0 blocks repacked (g = 32).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # NOTE: import this checkout's packages, not whichever jaxserve is installed

from jaxserve import model_registry  # noqa: E402
from jaxserve.model import llama  # noqa: E402
from jaxserve.model import quantization as qz  # noqa: E402
from jaxserve.model.attention import paged_attention_xla  # noqa: E402
from jaxserve.model.checkpoint import load_checkpoint  # noqa: E402
from jaxserve.model.scoring import Scorer  # noqa: E402
from jaxserve.model.step_inputs import SeqChunk, build_step_inputs  # noqa: E402
from jaxserve.text.tokenizer import load_tokenizer  # noqa: E402
from jaxserve.worker.model_runner import resolve_dtype  # noqa: E402

PAGE = 16


def copy_bandwidth(mib: int, iters: int = 10) -> float:
    """Bytes per second of a jitted read-and-write of `mib` MiB.

    NOTE: like `jaxserve.bench.kernels.measure_copy_bandwidth`, but donating the buffer: without donation
    every call writes a freshly allocated output, and on CPU first-touch page faults then dominate (measured:
    1.4 GB/s there against ~20 GB/s that a dense float32 decode step streams its weights at).
    """
    step = jax.jit(lambda a: a + 1, donate_argnums=0)
    x = step(jnp.ones((mib * (1 << 20) // 4,), jnp.float32))
    jax.block_until_ready(x)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        x = step(x)
        jax.block_until_ready(x)
        times.append(time.perf_counter() - t0)
    return 2 * x.nbytes / statistics.median(times)


def decode_seconds(weights, cfg, batch: int, context: int, iters: int) -> float:
    """Median seconds of one decode step of `batch` rows, each with `context` tokens already cached."""
    pages_per_row = -(-(context + 1) // PAGE)
    chunks = [SeqChunk([1], context, list(range(1 + r * pages_per_row, 1 + (r + 1) * pages_per_row)))
              for r in range(batch)]
    step = jax.tree.map(jnp.asarray, build_step_inputs(chunks, num_tokens=batch, num_rows=batch, page_size=PAGE,
                                                       max_pages_per_seq=pages_per_row))
    kv = jnp.zeros(llama.kv_cache_shape(cfg, batch * pages_per_row + 1, PAGE), weights.final_norm.dtype)

    @jax.jit
    def run(weights, kv):
        logits, kv = llama.forward(weights, kv, step, cfg, paged_attention_xla)
        return jnp.argmax(logits, axis=-1), kv

    jax.block_until_ready(run(weights, kv))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(run(weights, kv))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def schemes(model: str, weights, cfg, quantize_embeddings: bool) -> dict:
    infos = llama.weight_info(cfg)
    out = {"none": weights}
    for scheme in ("int8", "int4"):
        spec = qz.QuantSpec(scheme, scheme if quantize_embeddings else "none")
        out[scheme] = qz.quantize_weights(weights, infos, spec)
    src = model_registry.MODELS[model]() if model in model_registry.MODELS else Path(model)
    if src.is_file() and src.suffix == ".gguf":
        from checkpoints_conv.convert import convert

        with tempfile.TemporaryDirectory() as tmp:
            convert(src, Path(tmp) / "ckpt", quantize="int4", quantize_embeddings="int8", progress=False)
            _, repacked = load_checkpoint(Path(tmp) / "ckpt", weights.final_norm.dtype)
        out["int4-gguf"] = repacked
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=model_registry.DEFAULT_MODEL)
    p.add_argument("--dtype", default="auto", help="auto: float32 on CPU, bfloat16 on accelerators")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    p.add_argument("--context", type=int, default=128, help="cached tokens per row during decode")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--quantize-embeddings", action="store_true", help="int8 / int4 embed and lm_head too")
    p.add_argument("--quick", action="store_true", help="5 iterations, 1,024 tokens of text, 64 MiB copy")
    p.add_argument("--out", default=None, help="write the report as JSON here")
    args = p.parse_args(argv)
    iters = 5 if args.quick else args.iters

    path = model_registry.resolve_model(args.model)
    dtype = resolve_dtype(args.dtype)
    cfg, weights = load_checkpoint(path, dtype)
    text = load_tokenizer(path).encode((ROOT / "tests" / "data" / "perplexity_text.txt").read_text())
    text = text[:1024] if args.quick else text
    copy_bw = copy_bandwidth(64 if args.quick else (256 if jax.default_backend() == "cpu" else 2048))
    scorer = Scorer(cfg)
    kv_item = jnp.dtype(dtype).itemsize
    rows = []
    for name, w in schemes(args.model, weights, cfg, args.quantize_embeddings).items():
        wbytes = qz.weight_bytes(w)
        row = {"scheme": name, "weight_mib": wbytes / 2**20, "perplexity": scorer.perplexity(w, text), "decode": []}
        for b in args.batch:
            kv_bytes = b * (args.context + 1) * cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * kv_item
            seconds = decode_seconds(w, cfg, b, args.context, iters)
            row["decode"].append({"batch": b, "tpot_ms": 1e3 * seconds,
                                  "floor_ms": 1e3 * (wbytes + kv_bytes) / copy_bw})
        rows.append(row)
        print(f"done {name}", file=sys.stderr, flush=True)
    report = {"model": args.model, "backend": jax.default_backend(), "device": str(jax.devices()[0]),
              "dtype": jnp.dtype(dtype).name, "copy_gbps": copy_bw / 1e9, "context": args.context,
              "text_tokens": len(text), "quick": args.quick, "results": rows}
    print(format_table(report))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


def format_table(report: dict) -> str:
    lines = [f"{report['model']} on {report['backend']} ({report['device']}), {report['dtype']}, copy bandwidth "
             f"{report['copy_gbps']:.1f} GB/s, decode at {report['context']} cached tokens, perplexity over "
             f"{report['text_tokens']} tokens",
             f"{'scheme':<10} {'weights MiB':>11} {'ppl':>8} " + " ".join(
                 f"{'B=' + str(d['batch']) + ' ms':>10} {'floor':>7}" for d in report["results"][0]["decode"])]
    for r in report["results"]:
        lines.append(f"{r['scheme']:<10} {r['weight_mib']:>11.1f} {r['perplexity']:>8.3f} " + " ".join(
            f"{d['tpot_ms']:>10.2f} {d['floor_ms']:>7.2f}" for d in r["decode"]))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
