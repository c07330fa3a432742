"""One command for the day a GPU or TPU is at hand: the checks that cannot run on our CPU CI, in 8 minutes.

    python scripts/device_check.py                    # on a GPU / TPU host; prints one table, writes JSON
    python scripts/device_check.py --out check.json

On a host without an accelerator it says so and exits 0 at once. Otherwise each check runs in a child
process of its own (so one that hangs or crashes cannot take the others with it, and the parent never holds
device memory), with its own time budget inside an 8-minute total:
  1. kernels   the compiled (non-interpret) Pallas kernel tests: tests/pallas_kernels without the
               `*Interpret` classes, whose bases skip unless the device is there;
  2. golden    the transformers golden greedy outputs through the engine with `LLM(attention_backend="pallas")`
               (float32 like the golden file; fails clearly if the backend is not available);
  3. bandwidth the attention kernels' achieved bandwidth against a measured HBM copy (scripts/bench_kernels.py
               --quick); the bar is >= 70% of copy on decode (docs/accelerators.md);
  4. latency   TTFT / TPOT at batch 1, 16 and 64 in bfloat16 against the roofline (scripts/bench_latency.py).
Exit status: 0 when every check passed (a bandwidth under the bar is reported, not failed), else 1.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOTAL_SECONDS = 8 * 60
DECODE_BAR = 0.70  # attention kernels on decode: at least this fraction of the measured HBM copy bandwidth

PROBE = "import jax; print('BACKEND', jax.default_backend(), jax.devices()[0].device_kind, jax.device_count())"

GOLDEN = """
import json, sys
from jaxserve import LLM
from jaxserve.core.sampling_params import SamplingParams
golden = json.loads(open(sys.argv[1]).read())
llm = LLM(attention_backend="pallas", dtype="float32", max_num_seqs=4, max_num_batched_tokens=32,
          kv_cache_memory=64 * 2**20)
params = SamplingParams(max_tokens=golden["num_generated"], temperature=0.0, ignore_eos=True)
outs = llm.generate([p["prompt_ids"] for p in golden["prompts"]], params, use_tqdm=False)
bad = [p["name"] for p, o in zip(golden["prompts"], outs) if o.outputs[0].token_ids != p["greedy_ids"]]
print("GOLDEN", json.dumps({"prompts": len(outs), "mismatched": bad}))
"""


def run_child(cmd: list[str], budget: float) -> tuple[int | None, str, float]:
    """(exit status or None on timeout, stdout + stderr, seconds) of a child process in the repository root."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    t0 = time.monotonic()
    try:
        out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=max(budget, 1))
        return out.returncode, out.stdout + out.stderr, time.monotonic() - t0
    except subprocess.TimeoutExpired as e:
        text = (e.stdout or b"").decode(errors="replace") + (e.stderr or b"").decode(errors="replace")
        return None, text, time.monotonic() - t0


def probe() -> tuple[str, str, int]:
    """(backend, device kind, device count), probed in a child so this process never claims device memory."""
    rc, text, _ = run_child([sys.executable, "-c", PROBE], 120)
    m = re.search(r"^BACKEND (\S+) (.*) (\d+)$", text, re.MULTILINE)
    if rc != 0 or not m:
        raise SystemExit(f"could not start JAX:\n{text[-2000:]}")
    return m.group(1), m.group(2), int(m.group(3))


def check_kernels(budget: float, tmp: Path) -> dict:
    rc, text, secs = run_child([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                "tests/pallas_kernels", "-k", "not Interpret"], budget)
    lines = [ln.strip("= ") for ln in text.splitlines() if re.search(r"\b(passed|failed|error|skipped)\b", ln)]
    summary = "timed out" if rc is None else (lines[-1] if lines else f"pytest exited {rc}")
    return dict(ok=rc == 0, seconds=secs, summary=summary,
                tail=None if rc == 0 else text[-3000:])


def check_golden(budget: float, tmp: Path) -> dict:
    rc, text, secs = run_child([sys.executable, "-c", GOLDEN, str(ROOT / "tests/data/golden_smollm2.json")],
                               budget)
    m = re.search(r"^GOLDEN (.*)$", text, re.MULTILINE)
    if rc != 0 or not m:
        return dict(ok=False, seconds=secs, summary="timed out" if rc is None else "failed (see tail)",
                    tail=text[-3000:])
    got = json.loads(m.group(1))
    ok = not got["mismatched"]
    summary = (f"{got['prompts']} prompts match" if ok else f"mismatched: {', '.join(got['mismatched'])}")
    return dict(ok=ok, seconds=secs, summary=summary, **got)


def check_bandwidth(budget: float, tmp: Path) -> dict:
    out = tmp / "bench_kernels.json"
    rc, text, secs = run_child([sys.executable, "scripts/bench_kernels.py", "--quick", "--out", str(out)], budget)
    if rc != 0 or not out.exists():
        return dict(ok=False, seconds=secs, summary="timed out" if rc is None else "failed", tail=text[-3000:])
    report = json.loads(out.read_text())
    best: dict[str, float] = {}  # per kernel, its worst decode case as a fraction of copy bandwidth
    for r in report["results"]:
        if "frac_of_copy" in r and r["case"].startswith("decode"):
            best[r["kernel"]] = min(best.get(r["kernel"], 1e9), r["frac_of_copy"])
    pallas = {k: v for k, v in best.items() if k != "xla"}
    summary = f"copy {report['copy_gbps']:.0f} GB/s; worst decode case: " + ", ".join(
        f"{k} {100 * v:.0f}%" for k, v in sorted(best.items()))
    below = [k for k, v in pallas.items() if v < DECODE_BAR]
    if below:
        summary += f" (under the {100 * DECODE_BAR:.0f}% bar: {', '.join(below)})"
    return dict(ok=True, seconds=secs, summary=summary, copy_gbps=report["copy_gbps"], worst_decode_frac=best,
                meets_bar=not below, report=report)


def check_latency(budget: float, tmp: Path) -> dict:
    out = tmp / "bench_latency.json"
    rc, text, secs = run_child([sys.executable, "scripts/bench_latency.py", "--batch-sizes", "1,16,64",
                                "--prompt-lens", "128", "--output-len", "32", "--dtype", "bfloat16",
                                "--result-json", str(out)], budget)
    if rc != 0 or not out.exists():
        return dict(ok=False, seconds=secs, summary="timed out" if rc is None else "failed", tail=text[-3000:])
    report = json.loads(out.read_text())
    summary = "; ".join(f"b{r['batch_size']} TPOT {1e3 * r['tpot_s']:.2f} ms ({100 * r['tpot_frac_of_floor']:.0f}% "
                        f"of floor)" for r in report["rows"])
    return dict(ok=True, seconds=secs, summary=summary, report=report)


# (name, function, seconds it may take at most): 8 minutes in all, leaving the probe its share.
CHECKS = [("kernels", check_kernels, 120), ("golden", check_golden, 100), ("bandwidth", check_bandwidth, 90),
          ("latency", check_latency, 150)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench_results/device_check.json", help="where the JSON report goes")
    p.add_argument("--only", nargs="+", choices=[c[0] for c in CHECKS], help="run only these checks")
    args = p.parse_args(argv)
    deadline = time.monotonic() + TOTAL_SECONDS
    backend, kind, count = probe()
    if backend not in ("gpu", "tpu"):
        print(f"no accelerator here (JAX backend: {backend}); nothing to check. Run this on a GPU or TPU host.")
        return 0
    print(f"{backend}: {count} x {kind}")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, check, budget in CHECKS:
            if args.only and name not in args.only:
                continue
            left = deadline - time.monotonic()
            if left < 10:
                results[name] = dict(ok=False, seconds=0.0, summary="skipped: the 8-minute budget is spent")
                continue
            results[name] = check(min(budget, left), Path(tmp))
            print(f"  {name:<10} {'ok' if results[name]['ok'] else 'FAIL':<5} {results[name]['seconds']:6.1f} s")
    print(f"\n{'check':<10} {'result':<6} {'s':>6}  summary")
    for name, r in results.items():
        print(f"{name:<10} {'ok' if r['ok'] else 'FAIL':<6} {r['seconds']:>6.1f}  {r['summary']}")
    for name, r in results.items():
        if r.get("tail"):
            print(f"\n--- {name}: last lines ---\n{r['tail']}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"backend": backend, "device": kind, "device_count": count,
                                          "checks": results}, indent=1))
    print(f"wrote {args.out}")
    return 0 if all(r["ok"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
