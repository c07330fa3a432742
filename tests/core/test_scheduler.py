"""Scheduler driven to completion by a fake model whose next token is (sum of the context) mod VOCAB.

The fake model keeps a simulated paged KV cache: it writes each chunk's tokens through the page table
and reads the context back through it, so a wrong page (shared when it should not be, evicted while in
use, overwritten after caching) shows up as a wrong token, not just a wrong counter.
"""

import collections

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from jaxserve.core.kv_cache_manager import KVCacheManager
from jaxserve.core.request import Request, RequestStatus
from jaxserve.core.sampling_params import SamplingParams
from jaxserve.core.scheduler import Scheduler, SchedulerConfig

VOCAB = 50
PS = 16


class FakeModel:
    def __init__(self, num_pages, page_size):
        self.page_size = page_size
        self.kv = np.full((num_pages, page_size), -1, np.int64)

    def step(self, out, pool=None):
        ps = self.page_size
        for c in out.chunks:  # all K/V writes of the step first, as in a real forward pass
            assert c.token_ids == c.request.all_token_ids[c.start_pos:c.start_pos + len(c.token_ids)]
            assert len(c.page_table) * ps >= c.start_pos + len(c.token_ids)
            for j, t in enumerate(c.token_ids):
                page = c.page_table[(c.start_pos + j) // ps]
                assert page != 0, "wrote into the null page"
                assert pool is None or pool.hash_of(page) is None, "wrote into a cached (immutable) page"
                self.kv[page, (c.start_pos + j) % ps] = t
        sampled = {}
        for c in out.chunks:
            if c.sample:
                end = c.start_pos + len(c.token_ids)
                context = [int(self.kv[c.page_table[p // ps], p % ps]) for p in range(end)]
                assert context == c.request.all_token_ids[:end], "K/V read back differs from the tokens"
                sampled[c.request_id] = sum(context) % VOCAB
        return sampled


def reference(prompt, max_tokens):
    tokens = list(prompt)
    for _ in range(max_tokens):
        tokens.append(sum(tokens) % VOCAB)
    return tokens[len(prompt):]


def make(num_pages=11, page_size=PS, caching=True, **config):
    config = {"max_num_seqs": 4, "max_num_batched_tokens": 32, "max_model_len": 160, **config}
    kv = KVCacheManager(num_pages, page_size, caching, config["max_model_len"])
    return Scheduler(SchedulerConfig(**config), kv), FakeModel(num_pages, page_size)


def req(rid, prompt, max_tokens=8, **kw):
    params = {k: kw.pop(k) for k in list(kw) if k in ("min_tokens", "ignore_eos", "stop_token_ids")}
    return Request(rid, list(prompt), SamplingParams(max_tokens=max_tokens, **params), **kw)


def check_invariants(sched):
    kv, pool = sched.kv, sched.kv.pool
    pool.check_invariants()
    held = collections.Counter()
    for r in sched.running:
        table = kv.get_page_table(r.request_id)
        assert len(set(table)) == len(table) and 0 not in table
        assert len(table) == kv.pages_for(r.num_computed_tokens)  # at most one partly filled page
        held.update(table)
    for r in sched.waiting:
        assert kv.get_page_table(r.request_id) == [] and r.num_computed_tokens == 0
    assert all(pool.refcount(p) == held[p] for p in range(pool.num_pages))
    assert all(pool.hash_of(p) is not None for p, n in held.items() if n > 1), "shared pages must be cached"


def step(sched, model):
    out = sched.schedule()
    updates = sched.update_from_output(out, model.step(out, sched.kv.pool))
    check_invariants(sched)
    return out, updates


def run(sched, model, requests=(), max_steps=1000):
    for r in requests:
        sched.add_request(r)
    log = []
    while sched.has_unfinished():
        log.append(step(sched, model)[0])
        assert len(log) < max_steps
    assert sched.kv.pool.num_used_pages == 0 and sched.kv.pool.num_free_pages == sched.kv.num_usable_pages
    return log


def shape(out):
    return [(c.request_id, c.start_pos, len(c.token_ids), c.sample) for c in out.chunks]


def test_chunked_prefill_respects_budget():
    sched, model = make()
    a = req("a", range(70), max_tokens=3)
    log = run(sched, model, [a])
    # 70 prompt tokens in chunks of 32, 32, 6 (the last samples), then two decodes.
    assert [shape(o) for o in log] == [[("a", 0, 32, False)], [("a", 32, 32, False)], [("a", 64, 6, True)],
                                       [("a", 70, 1, True)], [("a", 71, 1, True)]]
    assert [o.chunks[0].page_table for o in log[:3]] == [[1, 2], [1, 2, 3, 4], [1, 2, 3, 4, 5]]
    assert a.output_token_ids == reference(range(70), 3) and a.status == RequestStatus.FINISHED_LENGTH
    assert sched.stats().num_steps == 5 and sched.stats().num_scheduled_tokens == 72


def test_decodes_are_not_starved_by_a_long_prompt():
    sched, model = make()
    short = [req("s0", [1, 2, 3, 4], max_tokens=12), req("s1", [5, 6, 7, 8], max_tokens=12)]
    for r in short:
        sched.add_request(r)
    step(sched, model)  # both short prompts in one step
    sched.add_request(req("long", [3] * 100, max_tokens=3))
    # While the long prompt is chunked, each short stream still decodes a token every step: 1 + 1 + 30.
    out, _ = step(sched, model)
    assert shape(out) == [("s0", 4, 1, True), ("s1", 4, 1, True), ("long", 0, 30, False)]
    # This does not rest on admission order: first in line, the long prompt still leaves one token of the
    # budget for each stream behind it (taking all 32 would starve both).
    sched.running.sort(key=lambda r: r.request_id != "long")
    for k in (1, 2):
        out, _ = step(sched, model)
        assert shape(out) == [("long", 30 * k, 30, False), ("s0", 4 + k, 1, True), ("s1", 4 + k, 1, True)]
    out, _ = step(sched, model)
    assert shape(out) == [("long", 90, 10, True), ("s0", 7, 1, True), ("s1", 7, 1, True)]
    run(sched, model)
    assert [r.output_token_ids for r in short] == [reference([1, 2, 3, 4], 12), reference([5, 6, 7, 8], 12)]


def test_prefix_hit_skips_computation_and_matches_a_miss():
    prompt = list(range(10, 50))  # 40 tokens
    outputs = {}
    for caching in (False, True):
        sched, model = make(caching=caching)
        run(sched, model, [req("a", prompt)])
        b = req("b", prompt)
        log = run(sched, model, [b])
        outputs[caching] = b.output_token_ids
        # With caching, b starts at token 32 (pages 1 and 2 reused) and computes only the 8-token tail.
        assert shape(log[0]) == ([("b", 32, 8, True)] if caching else [("b", 0, 32, False)])
        assert b.num_cached_tokens == (32 if caching else 0)
    assert outputs[True] == outputs[False] == reference(prompt, 8)
    assert sched.stats().prefix_cache_hits == 32 and sched.stats().prefix_cache_queries == 80


def test_whole_prompt_hit_still_computes_the_last_token():
    sched, model = make()
    # b repeats a's 33-token prompt: hit 32, compute 1. c has a 32-token prompt fully cached: hit 16, compute 16.
    run(sched, model, [req("a", range(33), max_tokens=1)])
    b, c = req("b", range(33)), req("c", range(32))
    assert shape(run(sched, model, [b])[0]) == [("b", 32, 1, True)]
    assert shape(run(sched, model, [c])[0]) == [("c", 16, 16, True)]
    assert b.output_token_ids == reference(range(33), 8) and c.output_token_ids == reference(range(32), 8)


def test_preemption_under_a_tiny_pool_gives_the_unconstrained_outputs():
    prompts = {f"r{i}": [i + 1] * 20 for i in range(4)}
    # 20 + 30 tokens need 4 pages each; 16 would fit 4 at once, 5 pages make them take turns.
    sched, model = make(num_pages=6, max_num_batched_tokens=64)
    requests = [req(rid, p, max_tokens=30) for rid, p in prompts.items()]
    for r in requests:
        sched.add_request(r)
    # Step 1 admits r0 (2 pages) then r1 (2 pages); r2 would need 2 more but only 1 is free: the queue waits.
    assert shape(step(sched, model)[0]) == [("r0", 0, 20, True), ("r1", 0, 20, True)]
    preempted = []
    while sched.has_unfinished():
        out, _ = step(sched, model)
        preempted += out.preempted_ids
    # At token 32 r0 takes the last free page and r1, admitted last, is preempted; each later pair repeats
    # this. A readmitted request hits its own first page (its second, freed first, was evicted first).
    assert preempted == ["r1", "r2", "r3"] and sched.num_preemptions == 3
    assert sched.stats().prefix_cache_hits == 3 * 16
    assert all(r.output_token_ids == reference(prompts[r.request_id], 30) for r in requests)
    assert sum(r.num_preemptions for r in requests) == len(preempted)


def test_abort_frees_pages_at_once():
    sched, model = make(max_num_batched_tokens=64)
    a, b = req("a", range(40)), req("b", range(100, 120))
    sched.add_request(a)
    sched.add_request(b)
    step(sched, model)
    assert sched.kv.get_page_table("a") == [1, 2, 3] and sched.kv.get_page_table("b") == [4, 5]
    # Aborting a frees its pages in reverse order right away, before any step; b keeps running.
    assert sched.abort_request("a") and not sched.abort_request("a")
    assert a.status == RequestStatus.FINISHED_ABORTED and a.status.finish_reason == "abort"
    assert sched.kv.pool.free_page_ids() == [6, 7, 8, 9, 10, 3, 2, 1]
    out, _ = step(sched, model)
    assert out.finished == [a] and shape(out) == [("b", 20, 1, True)]
    # A waiting request aborts too, and the next step reports it.
    c = req("c", range(5))
    sched.add_request(c)
    sched.abort_request("c")
    assert sched.schedule().finished == [c]


def test_a_request_that_can_never_fit_errors_cleanly():
    sched, model = make(max_model_len=400)
    too_big = req("big", range(100), max_tokens=100)  # 199 tokens of K/V: 13 pages, the pool has 10
    too_long = req("long", range(400), max_tokens=1)  # the prompt alone reaches max_model_len
    ok = req("ok", range(10))
    log = run(sched, model, [too_big, too_long, ok])
    assert log[0].finished == [too_big, too_long]
    assert too_big.status == RequestStatus.FINISHED_ERROR and "13 KV pages" in too_big.error
    assert "max_model_len is 400" in too_long.error and too_long.status.finish_reason == "error"
    assert ok.output_token_ids == reference(range(10), 8)


def test_n_siblings_share_the_prompt_pages():
    sched, model = make()
    sibs = [req(f"g#{i}", range(40), group_id="g") for i in range(3)]
    for r in sibs:
        sched.add_request(r)
    # Only the first sibling computes the 40-token prompt; the others wait for it.
    assert shape(step(sched, model)[0]) == [("g#0", 0, 32, False)]
    assert shape(step(sched, model)[0]) == [("g#0", 32, 8, True)]
    # Then both others hit its two full pages and compute only their 8-token tails.
    out, _ = step(sched, model)
    assert shape(out) == [("g#0", 40, 1, True), ("g#1", 32, 8, True), ("g#2", 32, 8, True)]
    assert [c.page_table for c in out.chunks] == [[1, 2, 3], [1, 2, 4], [1, 2, 5]]
    assert sched.kv.pool.refcount(1) == sched.kv.pool.refcount(2) == 3
    run(sched, model)
    assert all(r.output_token_ids == reference(range(40), 8) for r in sibs)


def test_stop_conditions():
    prompt = [1, 2, 3]
    ref = reference(prompt, 20)
    eos = ref[2]
    cases = {  # rid: (request, expected output, status)
        "eos": (req("eos", prompt, 20, eos_token_ids={eos}), ref[:ref.index(eos) + 1], "stop"),
        "ignore": (req("ignore", prompt, 6, eos_token_ids={eos}, ignore_eos=True), ref[:6], "length"),
        "stop_id": (req("stop_id", prompt, 20, stop_token_ids=(ref[1],)), ref[:ref.index(ref[1]) + 1], "stop"),
        "min": (req("min", prompt, 20, eos_token_ids={ref[0]}, min_tokens=5), ref[:20], None),
        "ctx": (req("ctx", prompt, None), reference(prompt, 157), "length"),  # up to max_model_len = 160
    }
    sched, model = make()
    run(sched, model, [r for r, _, _ in cases.values()])
    for rid, (r, expected, reason) in cases.items():
        if reason is None:  # stops at the first occurrence of its EOS after min_tokens, or at max_tokens
            later = [i for i, t in enumerate(ref[:20]) if t == ref[0] and i >= 4]
            expected = ref[:later[0] + 1] if later else ref[:20]
        assert r.output_token_ids == expected, rid
        assert r.status.finish_reason == (reason or r.status.finish_reason)


def test_priority_then_fcfs_and_stats():
    sched, model = make(max_num_seqs=1)
    for rid, prio, t in [("late", 0, 2.0), ("early", 0, 1.0), ("urgent", -1, 3.0)]:
        sched.add_request(req(rid, [1] * 4, max_tokens=1, priority=prio, arrival_time=t))
    order = [step(sched, model)[0].chunks[0].request_id for _ in range(3)]
    assert order == ["urgent", "early", "late"]
    stats = sched.stats()
    assert (stats.num_running, stats.num_waiting, stats.num_steps, stats.mean_tokens_per_step) == (0, 0, 3, 4.0)


# ---------------------------------------------------------------------------------------------- hypothesis

class SchedulerMachine(RuleBasedStateMachine):
    """Random adds (shared prefixes, sibling groups, some too big to ever fit), steps, aborts and engine-side
    finishes on a pool of 10 usable pages of 4 tokens: pages balance after every rule, all come back at the
    end, and every output is a prefix of the reference."""

    def __init__(self):
        super().__init__()
        self.sched, self.model = make(num_pages=11, page_size=4, max_num_seqs=3, max_num_batched_tokens=8,
                                      max_model_len=48)
        self.requests: dict[str, Request] = {}
        self.count = 0

    @rule(prefix=st.sampled_from([[1] * 8, [2] * 6, [1] * 4 + [3] * 4]), tail=st.lists(st.integers(0, 9),
          max_size=12), max_tokens=st.integers(1, 24), n=st.integers(1, 3))
    def add(self, prefix, tail, max_tokens, n):
        gid = f"g{self.count}"
        self.count += 1
        for i in range(n):
            r = req(f"{gid}#{i}", prefix + tail, max_tokens, group_id=gid)
            self.requests[r.request_id] = r
            self.sched.add_request(r)

    @precondition(lambda self: self.sched.has_unfinished())
    @rule()
    def step(self):
        step(self.sched, self.model)

    @precondition(lambda self: self.sched.requests)
    @rule(data=st.data(), status=st.sampled_from([RequestStatus.FINISHED_ABORTED, RequestStatus.FINISHED_STOPPED]))
    def finish(self, data, status):
        rid = data.draw(st.sampled_from(sorted(self.sched.requests)))
        assert self.sched.finish_request(rid, status)
        assert self.sched.kv.get_page_table(rid) == []

    @invariant()
    def pages_balance(self):
        check_invariants(self.sched)

    def teardown(self):
        for rid in list(self.sched.requests):
            self.sched.abort_request(rid)
        self.sched.schedule()
        pool = self.sched.kv.pool
        assert pool.num_used_pages == 0 and pool.num_free_pages == pool.num_pages - 1
        for r in self.requests.values():  # however a request ended, what it generated is the reference's prefix
            assert r.output_token_ids == reference(r.prompt_token_ids, r.num_output_tokens)
            if r.status == RequestStatus.FINISHED_LENGTH:
                assert r.num_output_tokens == r.max_tokens or r.num_tokens == self.sched.config.max_model_len


TestSchedulerMachine = SchedulerMachine.TestCase
TestSchedulerMachine.settings = settings(max_examples=80, stateful_step_count=40, deadline=None)


@pytest.mark.parametrize("bad", [dict(max_num_batched_tokens=2, max_num_seqs=4),
                                 dict(enable_chunked_prefill=False, max_num_batched_tokens=64, max_model_len=128)])
def test_config_validation(bad):
    with pytest.raises(ValueError):
        SchedulerConfig(**bad)
