"""Printed tables, machine description and the latency-vs-throughput plot of the benchmarks (no JAX)."""

from __future__ import annotations

import os
import platform
from typing import Sequence

METRICS = (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"), ("e2e_ms", "E2E"))


def machine() -> dict:
    """This machine, as the report states it: CPU model and count, memory, load when the run started."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"host": platform.node(), "os": f"{platform.system()} {platform.release()}", "cpu": cpu,
            "cpu_count": os.cpu_count(), "python": platform.python_version()}
    try:
        info["load_avg_1m"] = round(os.getloadavg()[0], 2)
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        info["memory_gib"] = round(pages * size / 2**30, 1)
    except (OSError, ValueError, AttributeError):
        pass
    return info


def _fmt(value, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def run_table(report: dict) -> str:
    """One run: settings, counts, throughputs and the latency summaries."""
    m, s = report["machine"], report["settings"]
    lines = [f"client machine: {m.get('cpu')} x{m.get('cpu_count')}, {m.get('memory_gib', '?')} GiB, "
             f"load {m.get('load_avg_1m', '?')} at start",
             "settings: " + ", ".join(f"{k}={v}" for k, v in s.items())]
    for run in report["runs"]:
        r = run["result"]
        lines += ["", f"== {run['label']} ==",
                  f"{'successful requests':<32}{r['completed']:>12}",
                  f"{'errors':<32}{r['errors']:>12}",
                  f"{'duration (s)':<32}{r['duration_s']:>12.2f}",
                  f"{'input tokens':<32}{r['total_input_tokens']:>12}",
                  f"{'output tokens':<32}{r['total_output_tokens']:>12}",
                  f"{'request throughput (req/s)':<32}{r['request_throughput']:>12.3f}",
                  f"{'input throughput (tok/s)':<32}{r['input_throughput']:>12.1f}",
                  f"{'output throughput (tok/s)':<32}{r['output_throughput']:>12.1f}",
                  f"{'':<14}{'mean':>9}{'median':>9}{'p95':>9}{'p99':>9}"]
        for key, name in METRICS:
            v = r[key]
            cells = "".join(f"{_fmt(v[k]):>9}" for k in ("mean", "median", "p95", "p99"))
            lines.append(f"{name + ' (ms)':<14}{cells}")
        for e in r["error_samples"]:
            lines.append(f"error: {e}")
    return "\n".join(lines)


def sweep_table(report: dict) -> str:
    """One line per run: the sweep at a glance."""
    head = (f"{'run':<18}{'ok':>5}{'err':>5}{'req/s':>8}{'in tok/s':>10}{'out tok/s':>10}"
            f"{'TTFT p50':>10}{'TTFT p99':>10}{'TPOT p50':>10}{'ITL p99':>9}{'E2E p50':>10}")
    lines = [head]
    for run in report["runs"]:
        r = run["result"]
        lines.append(f"{run['label']:<18}{r['completed']:>5}{r['errors']:>5}{r['request_throughput']:>8.2f}"
                     f"{r['input_throughput']:>10.1f}{r['output_throughput']:>10.1f}"
                     f"{_fmt(r['ttft_ms']['median']):>10}{_fmt(r['ttft_ms']['p99']):>10}"
                     f"{_fmt(r['tpot_ms']['median']):>10}{_fmt(r['itl_ms']['p99']):>9}"
                     f"{_fmt(r['e2e_ms']['median']):>10}")
    return "\n".join(lines)


def plot_sweep(runs: Sequence[dict], path: str, title: str) -> None:
    """Latency against output throughput, one point per run (labelled), TTFT and TPOT side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    x = [run["result"]["output_throughput"] for run in runs]
    for ax, (key, name) in zip(axes, METRICS[:2] + METRICS[3:]):
        for stat, style in (("median", "o-"), ("p99", "s--")):
            y = [run["result"][key][stat] for run in runs]
            if all(v is None for v in y):
                continue
            ax.plot(x, [float("nan") if v is None else v for v in y], style, label=stat)
        for xi, run in zip(x, runs):
            v = run["result"][key]["median"]
            if v is not None:
                ax.annotate(run["label"], (xi, v), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel("output throughput (tok/s)")
        ax.set_ylabel(f"{name} (ms)")
        ax.set_title(f"{name} vs throughput")
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
