"""bench_engine_overhead end to end on a small case: the real engine loop (and server) over the stand-in step."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

from jaxserve.bench import engine_overhead

ROOT = Path(__file__).resolve().parents[2]


def test_script_prints_the_json_shape_and_steps_happen(tmp_path):
    out = tmp_path / "overhead.json"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts/bench_engine_overhead.py"), "--rows", "2,4",
                           "--steps", "12", "--max-num-seqs", "8", "--out", str(out)],
                          capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(last) == {"host_ms_per_step", "steps_per_s"}
    assert set(last["host_ms_per_step"]) == set(last["steps_per_s"]) == {"2", "4"}
    assert all(v > 0 for v in last["host_ms_per_step"].values())
    full = json.loads(out.read_text())
    assert [c["steps"] for c in full["cases"]] == [12, 12]
    assert "rows" in proc.stdout and "steps/s" in proc.stdout


def test_server_case_streams_every_client(tmp_path):
    tokenizer = engine_overhead.default_tokenizer()
    result = engine_overhead.run_server(3, max_tokens=64, tokenizer=tokenizer, max_num_seqs=4, timeout=60,
                                       device_ms=2.0)  # slow enough that every client starts before one ends
    assert result["steps"] > 0 and result["steps_per_s"] > 0
    assert result["sse_chunks"] >= 3  # every client got tokens (stop strings can merge chunks, never drop them)


def test_stand_in_device_time_is_waited_for():
    engine = engine_overhead.build_engine(2, max_num_seqs=4, device_ms=5.0,
                                          tokenizer=engine_overhead.default_tokenizer())
    for prompt, params in engine_overhead.request_mix(2, max_tokens=4):
        engine.add_request(prompt, params)
    while engine.has_unfinished():
        engine.step()
    assert engine.runner.num_steps >= 4
    assert engine.runner.blocked_seconds > 0.004 * engine.runner.num_steps * 0.5


def test_overlapped_engine_streams_whole_text_and_cuts_stop_strings():
    """The engine emits step N-1's text while step N runs: every request still gets all its text, a stop
    string ends its request without reaching the stream, and no page is left held."""
    tokenizer = engine_overhead.default_tokenizer()
    engine = engine_overhead.build_engine(6, max_num_seqs=8, tokenizer=tokenizer)
    mix = engine_overhead.request_mix(6, max_tokens=40)
    # Learn request 0's greedy text, then ask again with a stop string cut from its middle.
    first = engine.add_request(*mix[0])
    while engine.has_unfinished():
        engine.step()
    deltas = list(first.ready())
    tokens = [t for d in deltas for t in d.new_token_ids]
    full = "".join(d.new_text for d in deltas)
    assert len(tokens) == 40 and deltas[-1].finish_reason == "length"
    assert full == tokenizer.decode(tokens)
    stop = full[len(full) // 2:len(full) // 2 + 5]
    prompt, params = mix[0]
    streams = [engine.add_request(prompt, dataclasses.replace(params, stop=[stop]))]
    streams += [engine.add_request(p, sp) for p, sp in mix[1:]]
    while engine.has_unfinished():
        engine.step()
    stopped = list(streams[0].ready())
    assert stopped[-1].finish_reason == "stop"
    assert "".join(d.new_text for d in stopped) == full[:full.index(stop)]
    for stream in streams[1:]:
        got = list(stream.ready())
        assert got[-1].finished and "".join(d.new_text for d in got) != ""
    assert engine.kv_cache.pool.num_used_pages == 0
