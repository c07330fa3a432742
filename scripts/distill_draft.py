"""Distil a small draft model for speculative decoding from the target's own generations.

    python scripts/distill_draft.py --out /tmp/smollm2-draft            # small default run (minutes on CPU)
    python -m jaxserve.server --speculative-model /tmp/smollm2-draft --num-speculative-tokens 3

1. The target generates continuations of a prompt set (sampled, so the data covers more than one path).
2. The draft starts as the target's embeddings, final norm and first `--layers` layers (`draft_init`).
3. Training minimises KL(target || draft) of the next-token distributions at every position of those
   sequences, with optax AdamW; the embeddings (tied to the LM head) stay frozen.
4. It reports the greedy acceptance rate, the fraction of held-out positions where the draft's argmax is
   the target's (the per-token acceptance of greedy speculation), before and after training, and
   writes an orbax checkpoint folder usable as `--speculative-model`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxserve import LLM, SamplingParams
from jaxserve.model.checkpoint import load_checkpoint
from jaxserve.model.llama import forward, kv_cache_shape
from jaxserve.model.step_inputs import SeqChunk, build_step_inputs
from jaxserve.model_registry import resolve_model
from jaxserve.spec_decode.draft_init import save_draft, truncated_weights

TOPICS = ["the history of Rome", "how rainbows form", "a recipe for pancakes", "the rules of chess",
          "why the sky is blue", "how to learn Python", "the life of bees", "the water cycle", "black holes",
          "a trip to Japan", "how vaccines work", "the French revolution", "photosynthesis", "the moon landing",
          "machine learning", "climate change", "the Eiffel tower", "volcanoes", "the human heart", "jazz music",
          "the Great Wall of China", "how computers work", "the ocean", "dinosaurs"]


def dense_causal_attention(q, kv_pages, layer, step, *, scale):
    """Attention of one packed sequence (row 0) over its own tokens, without loops (so it differentiates).

    It reads K/V back through the step's slots, so `llama.forward` runs unchanged. q: [T, N, H]."""
    page_size = kv_pages.shape[2]
    kv = kv_pages[layer, step.slot_mapping // page_size, step.slot_mapping % page_size]  # [T, 2K, H]
    T, two_k, H = kv.shape
    kv = kv.reshape(T, two_k // 2, 2, H)
    k, v = kv[:, :, 0], kv[:, :, 1]  # [T, K, H]
    qg = q.reshape(T, two_k // 2, -1, H)  # [T, K, G, H]
    scores = jnp.einsum("TKGH,SKH->KGTS", qg, k).astype(jnp.float32) * scale
    idx = jnp.arange(T)
    ok = (idx[None, :] <= idx[:, None]) & (idx[None, :] < step.query_starts[1])  # [T, S]
    probs = jax.nn.softmax(jnp.where(ok, scores, -1e30), axis=-1)
    return jnp.einsum("KGTS,SKH->TKGH", probs.astype(v.dtype), v).reshape(q.shape)


def prompts(tokenizer_llm: LLM, n: int) -> list[str]:
    out = []
    for i in range(n):
        topic = TOPICS[i % len(TOPICS)]
        kind = ["Write a short paragraph about", "Explain", "Tell me three facts about"][i % 3]
        out.append(tokenizer_llm.render_chat([{"role": "user", "content": f"{kind} {topic}."}]))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="SmolLM2-135M-Instruct")
    ap.add_argument("--out", required=True, help="the draft checkpoint folder to write")
    ap.add_argument("--layers", type=int, default=2, help="draft depth (1-4): the target's first layers")
    ap.add_argument("--num-prompts", type=int, default=24)
    ap.add_argument("--gen-tokens", type=int, default=96)
    ap.add_argument("--seq-len", type=int, default=160, help="training sequences are cut / padded to this")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="also write the report here")
    args = ap.parse_args()
    if not 1 <= args.layers <= 4:
        ap.error("--layers must be in [1, 4]")
    t_start = time.time()
    target_dir = resolve_model(args.model)

    # 1. The target's own generations.
    llm = LLM(target_dir, max_num_seqs=8, max_num_batched_tokens=256, max_model_len=512,
              kv_cache_memory=64 * 2**20, warmup=False)
    ps = prompts(llm, args.num_prompts)
    outs = llm.generate(ps, SamplingParams(temperature=0.7, top_p=0.95, max_tokens=args.gen_tokens,
                                           seed=args.seed), use_tqdm=True)
    seqs = [(o.prompt_token_ids + o.outputs[0].token_ids)[:args.seq_len] for o in outs]
    del llm
    print(f"generated {len(seqs)} sequences in {time.time() - t_start:.0f}s")

    # 2. Target soft labels and the draft's initial weights.
    cfg_t, w_t = load_checkpoint(target_dir)
    cfg_d, w_d = truncated_weights(target_dir, args.layers)
    T, page = args.seq_len, 16
    num_pages = -(-T // page)

    def step_for(n):
        return jax.tree.map(jnp.asarray, build_step_inputs(
            [SeqChunk([0] * n, 0, list(range(1, num_pages + 1)))], num_tokens=T, num_rows=1, page_size=page,
            max_pages_per_seq=num_pages, all_logits=True))

    def logits_of(weights, cfg, tokens, step):
        kv = jnp.zeros(kv_cache_shape(cfg, num_pages + 1, page), jnp.float32)
        step = dataclasses.replace(step, token_ids=tokens)
        return forward(weights, kv, step, cfg, dense_causal_attention)[0]  # [T, V]

    target_logits = jax.jit(lambda tokens, step: logits_of(w_t, cfg_t, tokens, step))
    data = []
    for s in seqs:
        tokens = np.zeros(T, np.int32)
        tokens[:len(s)] = s
        step = step_for(len(s))
        mask = (np.arange(T) < len(s) - 1).astype(np.float32)  # positions with a next token
        data.append((jnp.asarray(tokens), step, jnp.asarray(mask), jax.nn.log_softmax(target_logits(tokens, step))))
    rng = np.random.default_rng(args.seed)
    order = rng.permutation(len(data))
    held_out = [data[i] for i in order[:max(2, len(data) // 6)]]
    train = [data[i] for i in order[len(held_out):]]

    frozen_embed = jnp.asarray(w_d.embed)  # the target's embeddings stay as they are
    trainable = jax.tree.map(jnp.asarray, dataclasses.replace(w_d, embed=None))

    def draft_logits(params, tokens, step):
        return logits_of(dataclasses.replace(params, embed=frozen_embed), cfg_d, tokens, step)

    def loss_fn(params, tokens, step, mask, target_lp):
        lp = jax.nn.log_softmax(draft_logits(params, tokens, step))
        kl = jnp.sum(jnp.exp(target_lp) * (target_lp - lp), -1)  # [T]
        return jnp.sum(kl * mask) / jnp.sum(mask)

    @jax.jit
    def agreement(params, tokens, step, mask, target_lp):
        same = jnp.argmax(draft_logits(params, tokens, step), -1) == jnp.argmax(target_lp, -1)
        return jnp.sum(same * mask), jnp.sum(mask)

    def acceptance(params):
        hits = total = 0.0
        for d in held_out:
            h, n = agreement(params, *d)
            hits, total = hits + float(h), total + float(n)
        return hits / total

    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(args.lr, weight_decay=0.0))
    opt_state = opt.init(trainable)

    @jax.jit
    def train_step(params, opt_state, tokens, step, mask, target_lp):
        loss, grads = jax.value_and_grad(loss_fn)(params, tokens, step, mask, target_lp)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    before = acceptance(trainable)
    print(f"greedy acceptance before training: {before:.3f} ({args.layers} of {cfg_t.num_layers} layers)")
    t0 = time.time()
    for i in range(args.steps):
        trainable, opt_state, loss = train_step(trainable, opt_state, *train[i % len(train)])
        if i % 25 == 0 or i == args.steps - 1:
            print(f"step {i:4d}  KL {float(loss):.3f}  ({time.time() - t0:.0f}s)")
    after = acceptance(trainable)
    print(f"greedy acceptance after training:  {after:.3f}")

    dest = save_draft(args.out, target_dir, cfg_d, dataclasses.replace(trainable, embed=frozen_embed),
                      {"kind": "distilled", "layers": args.layers, "steps": args.steps,
                       "greedy_acceptance": after})
    report = {"out": str(dest), "layers": args.layers, "steps": args.steps, "sequences": len(seqs),
              "greedy_acceptance_before": before, "greedy_acceptance_after": after,
              "seconds": time.time() - t_start}
    print(json.dumps(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
