"""scripts/profile_step.py: a traced step's ops land in the model's named scopes, each counted once."""

import json
import sys
from pathlib import Path
from types import SimpleNamespace

from jaxserve.bench.step_profile import exclusive_times

ROOT = Path(__file__).resolve().parents[2]


def test_profile_step_attributes_a_mixed_step_to_the_models_scopes(tiny_checkpoint, tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    import profile_step

    out = tmp_path / "profile.json"
    assert profile_step.main(["--model", str(tiny_checkpoint), "--cases", "2:12", "--max-num-seqs", "2",
                              "--max-num-batched-tokens", "16", "--max-model-len", "64", "--block-size", "4",
                              "--num-pages", "24", "--out", str(out)]) == 0
    case = json.loads(out.read_text())["cases"][0]
    assert case["rows"] == 2 and case["prompt_len"] == 12 and case["wall_ms"] > 0
    scopes = case["scopes_ms"]
    for label in ("paged attention", "MLP (dequantize + dots)", "LM head"):
        assert scopes.get(label, 0) > 0, (label, scopes)


def event(name, start, end):
    return SimpleNamespace(name=name, start_ns=start, end_ns=end, duration_ns=end - start)


def test_nested_ops_are_subtracted_from_their_parent_only():
    events = [event("while.1", 0, 100), event("ffi_call.2", 10, 40), event("fusion.3", 40, 55),
              event("ffi_call.4", 60, 90), event("copy.5", 120, 130)]
    got = dict(exclusive_times(events))
    assert got == {"while.1": 100 - 30 - 15 - 30, "ffi_call.2": 30, "fusion.3": 15, "ffi_call.4": 30, "copy.5": 10}
    assert sum(got.values()) == 110  # the thread's busy time, counted once


def test_two_levels_of_nesting():
    got = dict(exclusive_times([event("outer", 0, 100), event("inner", 10, 60), event("leaf", 20, 30)]))
    assert got == {"outer": 50, "inner": 40, "leaf": 10}
