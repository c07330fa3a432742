"""scripts/profile_step.py: a traced step's ops land in the model's named scopes."""

import json
import sys
from pathlib import Path

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
        assert scopes.get(label, 0) > 0, scopes
