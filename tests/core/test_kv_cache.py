"""PagePool and KVCacheManager on a tiny pool (11 pages of 16 tokens): exact page ids, refcounts, free-list
and eviction order, then a hypothesis property over random admit / grow / finish sequences."""

import collections

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxserve.core.kv_cache_manager import KVCacheManager, hash_page
from jaxserve.core.page_pool import PagePool
from jaxserve.core.request import Request
from jaxserve.core.sampling_params import SamplingParams

PS = 16


def make_request(rid, tokens, max_tokens=16):
    return Request(rid, list(tokens), SamplingParams(max_tokens=max_tokens))


def admit(kv, req, num_new=None):
    """What the scheduler does at admission: look up hits, allocate, advance the computed count."""
    hits, hit_tokens = kv.get_computed_pages(req)
    num_new = req.num_tokens - hit_tokens if num_new is None else num_new
    pages = kv.allocate_slots(req, num_new, hits)
    assert pages is not None
    req.num_computed_tokens = hit_tokens + num_new
    kv.cache_full_pages(req)
    return hits, pages


def test_page_pool_null_page_refcounts_and_lru_order():
    pool = PagePool(11)
    # Fresh pool: pages 1..10 free in id order, page 0 (null) never among them.
    assert pool.free_page_ids() == list(range(1, 11))
    assert (pool.num_free_pages, pool.num_used_pages, pool.num_cached_free_pages) == (10, 0, 0)
    # Allocation takes from the head.
    assert pool.allocate(3) == [1, 2, 3]
    assert [pool.refcount(p) for p in (0, 1, 2, 3, 4)] == [0, 1, 1, 1, 0]
    # Page 2 is shared (touch) and cached; freeing 3, 2, 1 returns only 3 and 1 to the tail, in that order.
    pool.touch([2])
    assert pool.cache(2, b"h2") and pool.cache(1, b"h1")
    assert not pool.cache(3, b"h2"), "a hash held by another page is not cached twice"
    pool.free([3, 2, 1])
    assert pool.free_page_ids() == [4, 5, 6, 7, 8, 9, 10, 3, 1]
    assert pool.refcount(2) == 1 and pool.num_used_pages == 1 and pool.num_cached_free_pages == 1
    # A free cached page stays findable; a hit revives it from the middle of the free list.
    assert pool.lookup(b"h1") == 1
    pool.touch([1])
    assert pool.free_page_ids() == [4, 5, 6, 7, 8, 9, 10, 3]
    pool.free([1, 2])
    assert pool.free_page_ids() == [4, 5, 6, 7, 8, 9, 10, 3, 1, 2]
    # Taking 9 pages reaches the cached page 1 at the head and evicts its hash; page 2 stays cached.
    assert pool.allocate(9) == [4, 5, 6, 7, 8, 9, 10, 3, 1]
    assert pool.lookup(b"h1") is None and pool.lookup(b"h2") == 2
    pool.check_invariants()
    # The null page and over-frees are refused.
    with pytest.raises(ValueError, match="null page"):
        pool.free([0])
    with pytest.raises(ValueError, match="only 1 are free"):
        pool.allocate(2)
    pool.free([5])
    with pytest.raises(ValueError, match="more often"):
        pool.free([5])


def test_prefix_hits_refcounts_free_order_and_eviction():
    kv = KVCacheManager(11, PS, max_model_len=160)
    prompt = list(range(100, 140))  # 40 tokens: two full pages and 8 tokens
    a = make_request("a", prompt)
    # A misses, takes pages 1-3; its two full pages get cached, the partial page 3 does not.
    assert admit(kv, a) == ([], [1, 2, 3])
    assert kv.pool.lookup(hash_page(b"", prompt[:16])) == 1
    assert kv.pool.num_cached_pages == 2
    # B shares the first 32 tokens: hits pages 1 and 2 (refcount 2), gets fresh page 4 for its own tail.
    b = make_request("b", prompt[:32] + [7] * 8)
    assert admit(kv, b) == ([1, 2], [1, 2, 4])
    assert kv.get_page_table("b") == [1, 2, 4]
    assert [kv.pool.refcount(p) for p in range(1, 6)] == [2, 2, 1, 1, 0]
    # Freeing A (in reverse: 3, 2, 1) returns only its private page 3; freeing B returns 4, 2, 1 after it.
    kv.free(a)
    assert kv.pool.free_page_ids() == [5, 6, 7, 8, 9, 10, 3]
    kv.free(b)
    assert kv.pool.free_page_ids() == [5, 6, 7, 8, 9, 10, 3, 4, 2, 1]
    assert (kv.pool.num_free_pages, kv.pool.num_cached_free_pages, kv.pool.num_used_pages) == (10, 2, 0)
    # C repeats A's prompt: revives cached pages 1 and 2 from the free list's tail, computes 8 tokens on page 5.
    c = make_request("c", prompt)
    assert admit(kv, c) == ([1, 2], [1, 2, 5])
    assert kv.pool.free_page_ids() == [6, 7, 8, 9, 10, 3, 4]
    kv.free(c)
    assert kv.pool.free_page_ids() == [6, 7, 8, 9, 10, 3, 4, 5, 2, 1]
    # D (unrelated, 144 tokens) takes the 9 head pages: the last one taken is cached page 2, which is evicted;
    # page 1 survives, so E with A's prompt now hits one page only (the chain breaks at page 2).
    d = make_request("d", [9] * 144)
    assert admit(kv, d) == ([], [6, 7, 8, 9, 10, 3, 4, 5, 2])
    kv.free(d)
    e = make_request("e", prompt)
    assert kv.get_computed_pages(e) == ([1], 16)
    assert kv.pool.lookup(hash_page(hash_page(b"", prompt[:16]), prompt[16:32])) is None
    kv.pool.check_invariants()


def test_hit_is_capped_so_the_last_token_is_computed():
    kv = KVCacheManager(11, PS)
    admit(kv, make_request("a", range(33)))
    # 33 cached tokens (two full pages): a repeat hits 32 and computes the 33rd.
    assert kv.get_computed_pages(make_request("b", range(33))) == ([1, 2], 32)
    # A 32-token prompt is all cached, but a hit of 32 would leave nothing to compute: it hits one page.
    assert kv.get_computed_pages(make_request("c", range(32))) == ([1], 16)


def test_hash_is_chained_over_the_prefix():
    kv = KVCacheManager(11, PS)
    admit(kv, make_request("a", [1] * 16 + [2] * 16 + [0]))
    # Same second page behind a different first page: no hit at all.
    assert kv.get_computed_pages(make_request("b", [3] * 16 + [2] * 16 + [0])) == ([], 0)


def test_allocate_slots_all_or_nothing_counting_cached_free_pages():
    kv = KVCacheManager(11, PS)
    a = make_request("a", range(64))
    admit(kv, a)
    kv.free(a)  # four cached free pages, ten free in all
    b = make_request("b", [5] * 200)
    assert kv.allocate_slots(b, 161) is None  # eleven pages: refused, nothing taken
    assert kv.get_page_table("b") == [] and kv.pool.num_free_pages == 10 and kv.pool.num_cached_free_pages == 4
    assert kv.allocate_slots(b, 160) == [5, 6, 7, 8, 9, 10, 4, 3, 2, 1]  # ten pages: evicts all four
    assert kv.pool.num_cached_pages == 0 and kv.usage == 1.0


def test_growth_stats_and_waste():
    kv = KVCacheManager(11, PS, max_model_len=64)
    a = make_request("a", range(20))
    admit(kv, a)
    # 20 tokens on two pages: 12 slots wasted. Growing by one token needs no page, by 13 needs one.
    assert kv.kv_waste_tokens() == 12
    assert kv.allocate_slots(a, 1) == []
    a.num_computed_tokens = 21
    assert kv.allocate_slots(a, 12) == [3]
    with pytest.raises(ValueError, match="max_model_len"):
        kv.allocate_slots(a, 64)
    b = make_request("b", list(range(16)) + [1, 2])
    admit(kv, b)
    # Queries count every admitted token, hits the 16 reused ones.
    assert (kv.prefix_queries, kv.prefix_hits) == (38, 16)
    assert kv.prefix_hit_rate == pytest.approx(16 / 38)
    assert kv.usage == pytest.approx(4 / 10)


def test_concurrent_identical_blocks_cache_once_and_no_caching_mode():
    kv = KVCacheManager(11, PS)
    a, b = make_request("a", range(17)), make_request("b", range(17))
    # Both admitted before either computed: no hit for b; both compute page 0..15, only a's page is cached.
    for r in (a, b):
        assert kv.allocate_slots(r, 17, []) is not None
    for r in (a, b):
        r.num_computed_tokens = 17
        kv.cache_full_pages(r)
    assert kv.get_page_table("a") == [1, 2] and kv.get_page_table("b") == [3, 4]
    assert kv.pool.hash_of(1) is not None and kv.pool.hash_of(3) is None
    off = KVCacheManager(11, PS, enable_prefix_caching=False)
    admit(off, make_request("a", range(40)))
    assert off.get_computed_pages(make_request("b", range(40))) == ([], 0) and off.pool.num_cached_pages == 0


# ---------------------------------------------------------------------------------------------- hypothesis

PROMPTS = st.lists(st.integers(0, 2), min_size=1, max_size=40)  # a tiny alphabet: prefixes get shared
OPS = st.lists(st.tuples(st.sampled_from(["admit", "grow", "free"]), st.integers(0, 5), PROMPTS), max_size=40)


@settings(max_examples=100, deadline=None)
@given(OPS)
def test_random_admit_grow_free_never_leaks(ops):
    kv = KVCacheManager(11, 4, max_model_len=40)  # 10 usable pages of 4 tokens
    live: dict[str, Request] = {}
    for op, slot, tokens in ops:
        rid = f"r{slot}"
        if op == "admit" and rid not in live:
            req = make_request(rid, tokens)
            hits, hit_tokens = kv.get_computed_pages(req)
            if kv.allocate_slots(req, req.num_tokens - hit_tokens, hits) is not None:
                req.num_computed_tokens = req.num_tokens
                kv.cache_full_pages(req)
                live[rid] = req
            else:
                assert kv.get_page_table(rid) == []
        elif op == "grow" and rid in live:
            req = live[rid]
            extra = tokens[: 40 - req.num_tokens]
            if extra and kv.allocate_slots(req, len(extra)) is not None:
                req.output_token_ids.extend(extra)
                req.num_computed_tokens = req.num_tokens
                kv.cache_full_pages(req)
        elif op == "free" and rid in live:
            kv.free(live.pop(rid))
        # No page twice in a table, refcount == number of tables holding the page, counters balance.
        held = collections.Counter()
        for rid_, req in live.items():
            table = kv.get_page_table(rid_)
            assert len(set(table)) == len(table) and 0 not in table
            assert len(table) == kv.pages_for(req.num_computed_tokens)
            held.update(table)
        assert all(kv.pool.refcount(p) == held[p] for p in range(kv.num_pages))
        kv.pool.check_invariants()
    for req in live.values():
        kv.free(req)
    assert kv.pool.num_free_pages == 10 and kv.pool.num_used_pages == 0
