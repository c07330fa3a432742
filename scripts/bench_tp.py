"""Step time and compiled collectives per tensor-parallel size, on whatever devices JAX sees.

    python scripts/bench_tp.py                       # a random 8-query / 4-KV-head model, TP = 1, 2, 4, 8
    python scripts/bench_tp.py --model smollm2 --sizes 1,3
    python scripts/bench_tp.py --smoke               # a few steps only

On a CPU host, `--cpu-devices N` (default 8) fakes N devices with
`--xla_force_host_platform_device_count`; they share the host's cores, so TP > 1 is expected to be *slower*
there (the point on CPU is correctness and the collective count, not speed).

For each size: the median wall time of a decode step (`--rows` sequences, one token each) and of a prefill
step (`--prefill-tokens` tokens of one sequence), both through `ModelRunner.execute` (forward + sampling, host
copies included), and the all-reduces the compiled step holds per layer and outside the layers.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import statistics
import sys
import tempfile
import time


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=("random", "smollm2"), default="random")
    p.add_argument("--sizes", default=None, help="comma-separated TP sizes (default: 1,2,4,8; smollm2: 1,3)")
    p.add_argument("--rows", type=int, default=8, help="sequences in the decode step")
    p.add_argument("--prefill-tokens", type=int, default=128)
    p.add_argument("--steps", type=int, default=20, help="timed steps of each kind")
    p.add_argument("--cpu-devices", type=int, default=8)
    p.add_argument("--smoke", action="store_true", help="3 timed steps, small shapes")
    return p.parse_args()


args = parse_args()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={args.cpu_devices}").strip()

import jax
import numpy as np

from jaxserve.config import EngineConfig, ModelConfig
from jaxserve.core.sampling_params import SamplingParams
from jaxserve.model import llama
from jaxserve.model.checkpoint import save_checkpoint
from jaxserve.model.sampler import RowSampling
from jaxserve.model_registry import resolve_model
from jaxserve.worker.model_runner import ModelRunner

RANDOM_MODEL = ModelConfig(vocab_size=8192, hidden_size=512, intermediate_size=1536, num_layers=4, num_heads=8,
                           num_kv_heads=4, head_dim=64, max_position_embeddings=2048)


@dataclasses.dataclass
class Chunk:
    request_id: str
    token_ids: list[int]
    start_pos: int
    page_table: list[int]


def random_checkpoint(cfg: ModelConfig, dest: str) -> str:
    rng = np.random.default_rng(0)
    weights = jax.tree.map(lambda i: (1 + 0.1 * rng.standard_normal(i.shape) if i.norm
                                      else 0.05 * rng.standard_normal(i.shape)).astype(np.float32),
                           llama.weight_info(cfg))
    save_checkpoint(dest, cfg, weights, source={"format": "random"})
    return dest


def collectives(hlo: str) -> tuple[int, int]:
    """(all-reduces in the scanned layer body, all-reduces elsewhere) of compiled HLO text."""
    per, name = {}, None
    for line in hlo.splitlines():
        if line and not line.startswith(" ") and line.rstrip().endswith("{"):
            name = "ENTRY" if line.startswith("ENTRY") else line.split()[0]
        if re.search(r"\ball-reduce(-start)?\(", line):
            per[name] = per.get(name, 0) + 1
    entry = per.pop("ENTRY", 0)
    return max(per.values(), default=0), entry


def timed(runner: ModelRunner, chunks, rows, steps: int) -> float:
    for _ in range(2):  # compile, then one untimed run
        runner.execute(chunks, rows)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        runner.execute(chunks, rows)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> int:
    steps = 3 if args.smoke else args.steps
    rows_n = min(args.rows, 4) if args.smoke else args.rows
    prefill = min(args.prefill_tokens, 32) if args.smoke else args.prefill_tokens
    tmp = tempfile.TemporaryDirectory()
    if args.model == "smollm2":
        path, sizes = str(resolve_model("SmolLM2-135M-Instruct")), args.sizes or "1,3"
    else:
        path, sizes = random_checkpoint(RANDOM_MODEL, tmp.name + "/ckpt"), args.sizes or "1,2,4,8"
    page = 16
    print(f"model {args.model}; decode {rows_n} rows, prefill {prefill} tokens, median of {steps} steps")
    print(f"{'TP':>3} {'decode ms':>10} {'prefill ms':>11} {'all-reduce/layer':>17} {'all-reduce outside':>19}")
    for tp in (int(s) for s in sizes.split(",")):
        config = EngineConfig(model=path, tensor_parallel_size=tp, max_num_seqs=rows_n,
                              max_num_batched_tokens=max(prefill, rows_n), max_model_len=prefill + 64,
                              block_size=page, num_pages=rows_n * ((prefill + 64) // page) + 2)
        runner = ModelRunner(config, path)
        greedy = RowSampling(params=SamplingParams(temperature=0.0), seed=0, position=0)
        pages_per = (prefill + 64) // page
        decode = [Chunk(f"d{i}", [i + 1], 40, list(range(1 + i * pages_per, 1 + (i + 1) * pages_per)))
                  for i in range(rows_n)]
        pre = [Chunk("p", list(range(1, prefill + 1)), 0, list(range(1, 1 + pages_per)))]
        t_decode = timed(runner, decode, [greedy] * rows_n, steps)
        t_prefill = timed(runner, pre, [greedy], steps)
        per_layer, outside = collectives(runner.step_hlo(*runner.buckets.choose(prefill, 1)))
        print(f"{tp:>3} {t_decode * 1e3:>10.1f} {t_prefill * 1e3:>11.1f} {per_layer:>17} {outside:>19}", flush=True)
        del runner
    return 0


if __name__ == "__main__":
    sys.exit(main())
