"""jaxserve against llama.cpp's llama-server on the same GGUF, side by side in one run.

    BUILD_DIR=~/.cache/llama-server ../shared/tools/build_llama_server.sh      # once (20-40 min on 2 cores)
    python scripts/bench_vs_llamacpp.py --llama-server ~/.cache/llama-server/.../build/bin/llama-server
    python scripts/bench_vs_llamacpp.py --llama-server PATH --rounds 3 --concurrency 16,1 -- --no-guardrails

Starts both servers on loopback (llama-server with `-np 16 -t 2 --cont-batching`, the same GGUF jaxserve's
default model is converted from; jaxserve with its defaults plus anything after `--`), waits for both to be
healthy, then runs `--rounds` rounds: each concurrency against each server over the same synthetic prompts
(`--input-len` +- `--range-ratio` tokens, `--output-len` tokens, streaming, ignore_eos, greedy), the order
alternating by round. Prints the medians and ratios (jaxserve / llama.cpp) and writes every run to JSON.
Keep the machine otherwise quiet: both servers share its cores with nothing else.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # NOTE: this checkout, not an installed jaxserve

from jaxserve.bench import datasets, report  # noqa: E402
from jaxserve.bench.side_by_side import Server, comparison_table, medians, run_rounds  # noqa: E402
from jaxserve.model_registry import DEFAULT_MODEL, MODELS  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--llama-server", required=True, help="path to the llama-server binary")
    p.add_argument("--gguf", default=None, help="the GGUF both serve (default: the default model's)")
    p.add_argument("--concurrency", default="16,1", help="comma-separated concurrencies")
    p.add_argument("--num-requests", default="32,6", help="requests per run, per concurrency")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--input-len", type=int, default=105)
    p.add_argument("--range-ratio", type=float, default=0.8)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--threads", type=int, default=2, help="llama-server -t")
    p.add_argument("--parallel", type=int, default=16, help="llama-server -np")
    p.add_argument("--ports", default="8301,8302", help="jaxserve,llama-server")
    p.add_argument("--result-json", default="bench_results/bench_vs_llamacpp.json")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    gguf = args.gguf or str(MODELS[DEFAULT_MODEL]())
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    counts = [int(n) for n in args.num_requests.split(",")]
    ours_port, theirs_port = (int(x) for x in args.ports.split(","))
    logs = Path(args.result_json).parent
    ours = Server("jaxserve", [sys.executable, "-m", "jaxserve.server", "--port", str(ours_port), *extra], ours_port,
                  DEFAULT_MODEL, logs / "jaxserve.log")
    theirs = Server("llama.cpp", [args.llama_server, "-m", gguf, "--host", "127.0.0.1", "--port", str(theirs_port),
                                  "-c", "32768", "-np", str(args.parallel), "-t", str(args.threads),
                                  "--cont-batching", "--no-webui", "--alias", DEFAULT_MODEL], theirs_port,
                    DEFAULT_MODEL, logs / "llama-server.log")
    count = datasets.local_counter(DEFAULT_MODEL)
    num_requests = dict(zip(concurrencies, counts))

    def requests_for(round_index: int, concurrency: int):  # fresh prompts per run: no prompt-cache hits
        seed = 1000 * round_index + concurrency
        return datasets.synthetic(datasets.SyntheticSpec(num_requests[concurrency], args.input_len, args.output_len,
                                                         args.range_ratio, seed=seed), count)
    servers = [ours, theirs]
    try:
        for server in servers:
            server.start()
        for server in servers:
            server.wait_ready(timeout=600)
        started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        records = run_rounds(servers, requests_for, concurrencies, args.rounds, progress=not args.no_progress)
    finally:
        for server in servers:
            server.stop()
    table = medians(records)
    in_lens, out_lens = datasets.lengths(requests_for(0, concurrencies[0]))
    settings = {"gguf": gguf, "jaxserve_args": extra, "llama_server": theirs.command, "rounds": args.rounds,
                "prompt_tokens": f"{min(in_lens)}-{max(in_lens)}", "output_tokens": args.output_len,
                "concurrency_requests": dict(zip(concurrencies, counts))}
    print(f"machine: {report.machine()}")
    print(f"settings: {json.dumps(settings)}")
    print(f"medians of {args.rounds} alternating rounds; ratio = jaxserve / llama.cpp (latency: < 1 is better)")
    print(comparison_table(table, "jaxserve", "llama.cpp"))
    out = {"started": started, "machine": report.machine(), "settings": settings, "medians": table,
           "runs": records}
    Path(args.result_json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.result_json).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.result_json}")
    return 0 if all(r["result"]["errors"] == 0 for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
