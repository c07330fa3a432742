"""Two OpenAI-compatible servers measured side by side in one run: same prompts, alternating, medians.

Each round runs every (concurrency, server) pair once over the same requests; the server that goes first
alternates from round to round, so slow drift of the machine's load falls on both. Both servers stay up for
the whole run (an idle server costs nothing); only loopback servers are started or measured.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import statistics
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

from jaxserve.bench import client, datasets
from jaxserve.bench.stats import aggregate

# (figure, how to read it from a run's aggregate, higher is better)
FIGURES = (
    ("output tok/s", lambda r: r["output_throughput"], True),
    ("mean TTFT ms", lambda r: r["ttft_ms"]["mean"], False),
    ("median TTFT ms", lambda r: r["ttft_ms"]["median"], False),
    ("median TPOT ms", lambda r: r["tpot_ms"]["median"], False),
    ("median ITL ms", lambda r: r["itl_ms"]["median"], False),
)


@dataclasses.dataclass
class Server:
    name: str
    command: list[str]
    port: int
    model: str  # the model name requests carry
    log: Path
    process: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(self.command, stdout=self.log.open("wb"), stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float) -> None:
        """Until GET /health answers 200 (both llama-server and jaxserve have it)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}; see {self.log}")
            try:
                with urllib.request.urlopen(self.base_url + "/health", timeout=5) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.5)
        raise TimeoutError(f"{self.name} not healthy after {timeout:.0f}s; see {self.log}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def run_rounds(servers: Sequence[Server], requests_for: Callable[[int, int], list[datasets.BenchRequest]],
               concurrencies: Sequence[int], rounds: int, *, temperature: float = 0.0,
               timeout: float = 900.0, progress: bool = True) -> list[dict]:
    """Every round: each concurrency, each server (order alternating by round). One record per run.

    `requests_for(round_index, concurrency)` gives that run's requests: the same for both servers of a round,
    new in every round and concurrency, so no server answers from a prompt cache it filled in an earlier run
    (jaxserve's prefix cache and llama-server's slot cache both would)."""
    records = []
    for round_index in range(rounds):
        order = list(servers) if round_index % 2 == 0 else list(servers)[::-1]
        for concurrency in concurrencies:
            for server in order:
                cfg = client.LoadConfig(server.base_url, server.model, "completions", math.inf, concurrency,
                                        1.0, True, temperature, None, timeout, 0)
                desc = f"round {round_index + 1} c={concurrency} {server.name}"
                results, duration = asyncio.run(client.run_load(requests_for(round_index, concurrency), cfg,
                                                                progress=progress,
                                                                desc=desc))
                records.append({"round": round_index, "concurrency": concurrency, "server": server.name,
                                "result": aggregate(results, duration)})
    return records


def medians(records: Sequence[dict]) -> dict[int, dict[str, dict[str, float]]]:
    """{concurrency: {server: {figure: median over rounds}}}."""
    out: dict[int, dict[str, dict[str, float]]] = {}
    for rec in records:
        out.setdefault(rec["concurrency"], {}).setdefault(rec["server"], {})
    for concurrency, by_server in out.items():
        for server in by_server:
            runs = [r["result"] for r in records if r["concurrency"] == concurrency and r["server"] == server]
            by_server[server] = {name: statistics.median(read(r) for r in runs) for name, read, _ in FIGURES
                                 if all(read(r) is not None for r in runs)}
    return out


def comparison_table(table: dict[int, dict[str, dict[str, float]]], ours: str, theirs: str) -> str:
    """Medians and ratios (ours / theirs; for latencies < 1 is better)."""
    lines = [f"| concurrency | figure | {ours} | {theirs} | ratio |", "|---:|---|---:|---:|---:|"]
    for concurrency, by_server in sorted(table.items(), reverse=True):
        for name, _, _ in FIGURES:
            a, b = by_server.get(ours, {}).get(name), by_server.get(theirs, {}).get(name)
            if a is None or b is None:
                continue
            lines.append(f"| {concurrency} | {name} | {a:.1f} | {b:.1f} | {a / b:.2f}x |")
    return "\n".join(lines)
