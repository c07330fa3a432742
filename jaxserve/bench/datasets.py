"""Prompts for the serving benchmark: a seeded synthetic generator, and ShareGPT / JSONL loaders.

Token counts matter (throughput is counted in tokens), so every prompt carries its length as counted by a
`TokenCounter`: the served model's own tokenizer, locally (`local_counter`) or through the server's
`/tokenize` route (`server_counter`, jaxserve's and llama.cpp's shapes). The synthetic generator builds
each prompt from seeded random common words and adds or drops words until the counter agrees with the
drawn length (within one word's tokens, usually exactly), so two runs with one seed send the same text.
No JAX: the local counter loads only the tokenizer.
"""

from __future__ import annotations

import dataclasses
import json
import random
import urllib.request
from pathlib import Path
from typing import Callable, Iterable

TokenCounter = Callable[[str], int]

# Common English words: each is one token (with its leading space) in most BPE vocabularies, so a prompt's
# length converges in a step or two. Random order makes every prompt distinct (no accidental prefix hits).
WORDS = tuple("""
the of and to in is was for on that with as by at from his her it an were are which this be has had not
one but their its new after who they have also first been two more other all time can only some years when
there she into most over many city between such year may where would about during these three world used
than later however then part under both made while known state well since people through game because
water small found work each music light large long around several school early system day film family
house group number second home team life great war local high south north east west name book story old
road river land field power market open hand place line case point fact night week month color table
window garden letter paper stone glass bread apple river summer winter morning evening voice heart mind
""".split())


@dataclasses.dataclass(frozen=True)
class BenchRequest:
    prompt: str
    prompt_tokens: int  # as counted by the dataset's TokenCounter
    output_tokens: int  # max_tokens to ask for


@dataclasses.dataclass(frozen=True)
class SyntheticSpec:
    """Prompt lengths are drawn uniformly from [input_len * (1 - range_ratio), input_len * (1 + range_ratio)]
    (vLLM's random dataset), output lengths likewise with `output_range_ratio`; 0 gives fixed lengths."""

    num_prompts: int = 100
    input_len: int = 128
    output_len: int = 128
    range_ratio: float = 0.0
    seed: int = 0
    output_range_ratio: float = 0.0

    def __post_init__(self):
        if self.num_prompts < 1 or self.input_len < 1 or self.output_len < 1:
            raise ValueError("num_prompts, input_len and output_len must be positive")
        for name in ("range_ratio", "output_range_ratio"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")

    @staticmethod
    def _bounds(length: int, ratio: float) -> tuple[int, int]:
        return max(1, int(length * (1 - ratio))), max(1, int(length * (1 + ratio)))

    def input_bounds(self) -> tuple[int, int]:
        return self._bounds(self.input_len, self.range_ratio)

    def output_bounds(self) -> tuple[int, int]:
        return self._bounds(self.output_len, self.output_range_ratio)


def synthetic_prompt(rng: random.Random, target: int, count: TokenCounter) -> tuple[str, int]:
    """Words from `rng` whose token count is `target` or just under it (never over, unless one word is)."""
    words = [rng.choice(WORDS) for _ in range(target)]
    n = count(" ".join(words))
    for _ in range(8):  # each word is about one token: this converges in a round or two (or oscillates by one)
        if n == target:
            break
        if n < target:
            words += [rng.choice(WORDS) for _ in range(target - n)]
        else:
            words = words[:max(1, len(words) - (n - target))]
        n = count(" ".join(words))
    while n > target and len(words) > 1:
        words.pop()
        n = count(" ".join(words))
    return " ".join(words), n


def synthetic(spec: SyntheticSpec, count: TokenCounter) -> list[BenchRequest]:
    rng = random.Random(spec.seed)
    lo_in, hi_in = spec.input_bounds()
    lo_out, hi_out = spec.output_bounds()
    lengths = [(rng.randint(lo_in, hi_in), rng.randint(lo_out, hi_out)) for _ in range(spec.num_prompts)]
    out = []
    for input_len, output_len in lengths:
        text, n = synthetic_prompt(rng, input_len, count)
        out.append(BenchRequest(text, n, output_len))
    return out


def _sample(items: list, num_prompts: int | None, seed: int) -> list:
    items = list(items)
    random.Random(seed).shuffle(items)
    return items if num_prompts is None else items[:num_prompts]


def load_sharegpt(path: str | Path, count: TokenCounter, *, num_prompts: int | None = None, seed: int = 0,
                  output_len: int | None = None, min_len: int = 4, max_prompt_len: int = 1024,
                  max_total_len: int = 2048) -> list[BenchRequest]:
    """ShareGPT-style JSON: a list of {"conversations": [{"from": "human", "value"}, {"from": "gpt", "value"}, ...]}.

    As vLLM: the first turn is the prompt, the second's token count the output length (unless `output_len`);
    pairs with fewer than `min_len` tokens, a prompt over `max_prompt_len` or a sum over `max_total_len`
    are skipped. Entries are shuffled with `seed`; counting stops once `num_prompts` are kept.
    """
    data = json.loads(Path(path).read_text())
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of conversations")
    convs = [d.get("conversations") or d.get("conversation") for d in data if isinstance(d, dict)]
    convs = [c for c in convs if isinstance(c, list) and len(c) >= 2]
    out = []
    for conv in _sample(convs, None, seed):
        prompt, reply = str(conv[0].get("value", "")), str(conv[1].get("value", ""))
        n_in = count(prompt)
        n_out = output_len if output_len is not None else count(reply)
        if n_in < min_len or n_out < min_len or n_in > max_prompt_len or n_in + n_out > max_total_len:
            continue
        out.append(BenchRequest(prompt, n_in, n_out))
        if num_prompts is not None and len(out) >= num_prompts:
            break
    return out


def load_jsonl(path: str | Path, count: TokenCounter, *, num_prompts: int | None = None, seed: int = 0,
               output_len: int = 128) -> list[BenchRequest]:
    """One prompt a line: a JSON string, or an object with "prompt" (or "text") and optionally "max_tokens"
    (or "output_tokens"). Blank lines are skipped; a line of another shape raises ValueError naming it."""
    rows = []
    for i, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        obj = json.loads(line)
        if isinstance(obj, str):
            obj = {"prompt": obj}
        prompt = obj.get("prompt", obj.get("text")) if isinstance(obj, dict) else None
        if not isinstance(prompt, str) or not prompt:
            raise ValueError(f"{path}:{i}: expected a string or an object with a 'prompt' string")
        rows.append((prompt, int(obj.get("max_tokens", obj.get("output_tokens", output_len)))))
    return [BenchRequest(p, count(p), n) for p, n in _sample(rows, num_prompts, seed)]


def local_counter(model: str) -> TokenCounter:
    """Counts with the model's tokenizer (a jaxserve model name, checkpoint folder, HF folder or GGUF path)."""
    from jaxserve.model_registry import resolve_model
    from jaxserve.text.tokenizer import load_tokenizer

    tok = load_tokenizer(resolve_model(model))
    return lambda text: len(tok.encode(text, add_special_tokens=False))


def server_counter(base_url: str, *, api_key: str | None = None, timeout: float = 30.0) -> TokenCounter:
    """Counts with the server's `/tokenize` (jaxserve and vLLM: {"prompt"}; llama.cpp: {"content"})."""
    url = base_url.rstrip("/").removesuffix("/v1") + "/tokenize"
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"

    def count(text: str) -> int:
        body = json.dumps({"prompt": text, "content": text, "add_special_tokens": False}).encode()
        with urllib.request.urlopen(urllib.request.Request(url, body, headers), timeout=timeout) as resp:
            out = json.loads(resp.read())
        return int(out["count"]) if "count" in out else len(out["tokens"])

    return count


def lengths(requests: Iterable[BenchRequest]) -> tuple[list[int], list[int]]:
    requests = list(requests)
    return [r.prompt_tokens for r in requests], [r.output_tokens for r in requests]
