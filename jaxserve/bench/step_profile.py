"""Where one serving step's time goes: a `jax.profiler` trace of the runner's step, each XLA op attributed to
the model's named scopes (`attention`, `mlp`, `lm_head`, the sampler's) through the compiled HLO's op names.

The figures are the ops' durations summed over every thread of the trace, per step: on a CPU with two
threads they add up to about twice the step's wall time.
"""

from __future__ import annotations

import collections
import glob
import re
import tempfile
import time
from types import SimpleNamespace

import jax

from jaxserve.core.sampling_params import SamplingParams
from jaxserve.model.sampler import RowSampling

SCOPES = (  # (label, pattern in the op's name) in order of precedence
    ("paged attention", r"attention/while|paged_attention"),  # the XLA path's loop; the kernels' named scope
    ("attention block (q/k/v/o, KV write)", r"/attention/"),
    ("MLP (dequantize + dots)", r"/mlp/"),
    ("LM head", r"lm_head"),
    ("sampling", r"sampl|logit_bias|penalt|logprob|top_k|take_along"),
)


def synthetic_step(num_rows: int, prompt_len: int, page_size: int, context: int = 200):
    """Chunks of one step: row 0 a prompt of `prompt_len` tokens (1: a decode like the rest), the other rows
    decoding at `context`; each row its own pages of `page_size` tokens."""
    pages = -(-(max(prompt_len, context) + 1) // page_size)
    chunks = [SimpleNamespace(request_id=f"r{r}", token_ids=[5] * (prompt_len if r == 0 else 1),
                              start_pos=0 if (r == 0 and prompt_len > 1) else context,
                              page_table=list(range(1 + pages * r, 1 + pages * (r + 1)))) for r in range(num_rows)]
    params = SamplingParams(temperature=0.0, max_tokens=8)
    rows = [RowSampling(params=params, seed=0, position=context, prompt_token_ids=[1], output_token_ids=[])
            for _ in range(num_rows)]
    return chunks, rows


def exclusive_times(events) -> list[tuple[str, int]]:
    """(name, ns) of each event less the events nested in it on the same thread: a `while` thunk encloses its
    body's ops, which the trace also lists, so summing raw durations would count the layers twice."""
    out, stack = [], []  # stack: [end_ns, index into out]
    for e in sorted(events, key=lambda e: (e.start_ns, -e.end_ns)):
        while stack and stack[-1][0] <= e.start_ns:
            stack.pop()
        if stack:
            out[stack[-1][1]][1] -= e.duration_ns
        out.append([e.name, e.duration_ns])
        stack.append((e.end_ns, len(out) - 1))
    return [(name, ns) for name, ns in out]


def profile_step(runner, chunks, rows, repeats: int = 3) -> dict:
    """{"wall_ms": per step, "scopes_ms": {label: ms per step}, "ops_ms": {op: ms per step}} of `runner`."""
    for _ in range(2):  # compile and warm
        runner.execute(chunks, rows)
    trace_dir = tempfile.mkdtemp(prefix="jaxserve-profile-")
    with jax.profiler.trace(trace_dir):
        t0 = time.perf_counter()
        for _ in range(repeats):
            runner.execute(chunks, rows)
        wall = (time.perf_counter() - t0) / repeats
    path = glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)[0]
    ops: collections.Counter = collections.Counter()
    for plane in jax.profiler.ProfileData.from_file(path).planes:
        for line in plane.lines:
            if line.name.startswith("tf_XLA"):
                events = [e for e in line.events if not e.name.startswith("ThunkExecutor")]
                for name, ns in exclusive_times(events):
                    ops[name.split(" ")[0]] += ns
    num_tokens, num_rows = runner.buckets.choose(sum(len(c.token_ids) for c in chunks), len(chunks))
    op_names = {}
    for line in runner.step_hlo(num_tokens, num_rows).splitlines():
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = .*op_name=\"([^\"]+)\"", line)
        if m:
            # NOTE: the native attention by its target too: an executable from the persistent compilation cache
            # keeps the op names it was compiled with (metadata is not part of the cache key).
            native = 'custom_call_target="jaxserve_cpu_attention"' in line
            op_names[m.group(1)] = m.group(2) + ("/paged_attention" if native else "")
    scopes: collections.Counter = collections.Counter()
    for op, ns in ops.items():
        name = op_names.get(op, "")
        label = next((label for label, pattern in SCOPES if re.search(pattern, name)), "loop / thread pool / other")
        scopes[label] += ns / repeats / 1e6
    return {"wall_ms": 1e3 * wall, "scopes_ms": dict(scopes.most_common()),
            "ops_ms": {op: ns / repeats / 1e6 for op, ns in ops.most_common(15)}}
