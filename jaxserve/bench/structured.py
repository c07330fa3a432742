"""What a JSON-schema constraint costs: output tok/s with and without it, and the host time its masks add.

One in-process engine (`LLM`), the same prompts and sampling in both modes; the constrained mode adds a JSON
schema whose array needs more items than `max_tokens` leaves room for, so both modes generate exactly
`max_tokens` tokens per stream and the comparison is per token. Each case runs once untimed first (its step
shapes compile), then timed.

Numbers per (streams, mode):
  * output_tok_s: output tokens / wall seconds of the timed run;
  * host_ms_per_step: engine-step wall time not spent waiting for the device (EngineStats), mean per step;
  * mask_ms_per_step (constrained): the engine thread's time on masks (advancing matchers, rows computed on
    the spot, waiting for the worker), mean per step: what the masks add to the critical path;
  * wait_ms_per_step (constrained): of mask_ms_per_step, the time spent waiting for the worker thread (on a
    loaded machine mostly the OS getting round to scheduling it);
  * prefetch_ms_per_step (constrained): the worker thread's time computing rows ahead (overlapped).
"""

from __future__ import annotations

import time

from jaxserve.core.sampling_params import SamplingParams
from jaxserve.core.structured_outputs import StructuredOutputsParams

# An object holding a long array of small records: far more items than a run's max_tokens can write.
SCHEMA = {
    "type": "object",
    "properties": {"records": {"type": "array", "minItems": 1000, "items": {
        "type": "object",
        "properties": {"id": {"type": "integer"}, "name": {"type": "string", "maxLength": 16},
                       "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
                       "score": {"type": "number"}},
        "required": ["id", "name", "tags", "score"], "additionalProperties": False}}},
    "required": ["records"], "additionalProperties": False,
}
PROMPT = "List the records of the inventory as JSON: "


def params(mode: str, max_tokens: int, seed: int) -> SamplingParams:
    so = StructuredOutputsParams(json=SCHEMA) if mode == "json" else None
    return SamplingParams(max_tokens=max_tokens, min_tokens=max_tokens, ignore_eos=True, temperature=0.8,
                          seed=seed, structured_outputs=so)


def run_case(llm, streams: int, mode: str, max_tokens: int) -> dict:
    engine = llm.engine
    prompts = [f"{PROMPT}{i}" for i in range(streams)]
    llm.generate(prompts, [params(mode, min(8, max_tokens), i) for i in range(streams)], use_tqdm=False)  # compile
    s0 = (engine.stats.steps, engine.stats.step_seconds, engine.stats.host_seconds)
    m0 = (engine.structured.stats.mask_seconds, engine.structured.stats.prefetch_seconds,
          engine.structured.stats.mask_rows, engine.structured.stats.prefetched_rows,
          engine.structured.stats.wait_seconds)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, [params(mode, max_tokens, i) for i in range(streams)], use_tqdm=False)
    seconds = time.perf_counter() - t0
    steps = engine.stats.steps - s0[0]
    tokens = sum(len(c.token_ids) for o in outs for c in o.outputs)
    st = engine.structured.stats
    return {"streams": streams, "mode": mode, "output_tokens": tokens, "seconds": round(seconds, 3),
            "output_tok_s": round(tokens / seconds, 2), "steps": steps,
            "host_ms_per_step": round(1e3 * (engine.stats.host_seconds - s0[2]) / steps, 3),
            "step_ms": round(1e3 * (engine.stats.step_seconds - s0[1]) / steps, 3),
            "mask_ms_per_step": round(1e3 * (st.mask_seconds - m0[0]) / steps, 3),
            "wait_ms_per_step": round(1e3 * (st.wait_seconds - m0[4]) / steps, 3),
            "prefetch_ms_per_step": round(1e3 * (st.prefetch_seconds - m0[1]) / steps, 3),
            "mask_rows": st.mask_rows - m0[2], "prefetched_rows": st.prefetched_rows - m0[3]}


def run(model: str, streams_list: list[int], *, max_tokens: int = 64, prefetch: bool | None = None,
        **engine_options) -> dict:
    """`prefetch`: masks computed ahead on a worker thread (True), on the spot (False), or the default for
    this machine (None: StructuredOutputManager's rule)."""
    from jaxserve import LLM

    max_seqs = max(streams_list)
    llm = LLM(model, max_num_seqs=max_seqs, warmup=False, **engine_options)
    if prefetch is not None:
        llm.engine.structured.prefetch_enabled = prefetch
    cases = [run_case(llm, s, mode, max_tokens) for s in streams_list for mode in ("free", "json")]
    return {"model": model, "max_tokens": max_tokens, "prefetch": llm.engine.structured.prefetch_enabled,
            "cases": cases}


def format_table(result: dict) -> str:
    head = (f"{'streams':>7} {'mode':>5} {'tok/s':>9} {'step ms':>8} {'host ms/step':>12} {'mask ms/step':>12} "
            f"{'(waiting)':>9} {'prefetch ms/step':>16} {'prefetched':>10}")
    lines = [f"masks computed {'ahead on a worker thread' if result['prefetch'] else 'on the spot'}", head]
    for c in result["cases"]:
        lines.append(f"{c['streams']:>7} {c['mode']:>5} {c['output_tok_s']:>9.1f} {c['step_ms']:>8.1f} "
                     f"{c['host_ms_per_step']:>12.2f} {c['mask_ms_per_step']:>12.3f} {c['wait_ms_per_step']:>9.3f} "
                     f"{c['prefetch_ms_per_step']:>16.3f} {c['prefetched_rows']:>5}/{c['mask_rows']:<5}")
    return "\n".join(lines)


def summary(result: dict) -> dict:
    """The final JSON line: tok/s per streams and mode, and the mask cost per step of the constrained runs."""
    by = {(c["streams"], c["mode"]): c for c in result["cases"]}
    streams = sorted({c["streams"] for c in result["cases"]})
    return {"output_tok_s": {f"{s}_{m}": by[s, m]["output_tok_s"] for s in streams for m in ("free", "json")},
            "json_over_free": {str(s): round(by[s, "json"]["output_tok_s"] / by[s, "free"]["output_tok_s"], 3)
                               for s in streams},
            "mask_ms_per_step": {str(s): by[s, "json"]["mask_ms_per_step"] for s in streams},
            "wait_ms_per_step": {str(s): by[s, "json"]["wait_ms_per_step"] for s in streams},
            "prefetch_ms_per_step": {str(s): by[s, "json"]["prefetch_ms_per_step"] for s in streams}}
