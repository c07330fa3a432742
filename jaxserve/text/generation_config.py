"""`--generation-config`: the sampling defaults a model ships in `generation_config.json` (vLLM's behaviour).

`auto` reads the served checkpoint's file, `vllm` uses none (our SamplingParams defaults), a folder reads
that folder's file. A request's own fields always win; the defaults fill only the fields it left out.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# generation_config.json key -> the request / SamplingParams field it sets the default of
SAMPLING_KEYS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                 "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}


def sampling_defaults(setting: str, model_dir: str | Path | None) -> dict[str, Any]:
    """{SamplingParams field: default} from the generation config `setting` selects."""
    if setting == "vllm":
        return {}
    if setting == "auto":
        if model_dir is None:
            return {}
        path = Path(model_dir) / "generation_config.json"
        if not path.is_file():
            return {}
    else:
        path = Path(setting).expanduser()
        path = path / "generation_config.json" if path.is_dir() else path
        if not path.is_file():
            raise ValueError(f"--generation-config {setting!r}: no generation_config.json there "
                             f"(use auto, vllm or a folder holding one)")
    raw = json.loads(path.read_text())
    return {field: raw[key] for key, field in SAMPLING_KEYS.items() if raw.get(key) is not None}
