"""KVCacheManager: per-request page tables over a PagePool, with automatic prefix caching (no JAX).

It answers three questions for the scheduler and decides nothing else:
  * `get_computed_pages(request)`: which leading pages of this request are already in the cache?
  * `allocate_slots(request, n, hits)`: can the request's page table grow to hold n more tokens?
  * `free(request)`: give its pages back.

A full page is identified by a hash chained over (parent page's hash, the page's token ids), so equal
hashes mean equal whole prefixes, not just equal pages. NOTE: we use SHA-256 of the token bytes rather
than Python's `hash()` of tuples: the latter is 64 bits, unkeyed for ints and easy to collide on
purpose, and a collision would silently serve one request's K/V (another tenant's prompt) to another.
SHA-256 costs about a microsecond per page, which is noise next to a model step.

Page tables are append-only while a request runs: pages are never reordered or replaced, so a
`ScheduledChunk`'s copy of the table stays valid for its step.
"""

from __future__ import annotations

import hashlib

import numpy as np

from jaxserve.core.page_pool import PagePool
from jaxserve.core.request import Request


def hash_page(parent: bytes, token_ids: list[int]) -> bytes:
    """The chained hash of one full page: SHA-256(parent hash || int64 token ids)."""
    return hashlib.sha256(parent + np.asarray(token_ids, dtype=np.int64).tobytes()).digest()


class KVCacheManager:
    def __init__(self, num_pages: int, page_size: int, enable_prefix_caching: bool = True,
                 max_model_len: int | None = None):
        """`num_pages` includes the null page 0; each page holds `page_size` tokens of K/V."""
        if page_size < 1:
            raise ValueError(f"page_size must be positive, got {page_size}")
        self.pool = PagePool(num_pages)
        self.page_size = page_size
        self.enable_prefix_caching = enable_prefix_caching
        self.max_model_len = max_model_len
        self._tables: dict[str, list[int]] = {}
        self._requests: dict[str, Request] = {}
        self._hashes: dict[str, list[bytes]] = {}  # chained hashes of a request's full pages, as far as known
        self._num_cached: dict[str, int] = {}  # leading pages of the table already registered in the pool
        self.prefix_queries = 0  # tokens looked up at admissions
        self.prefix_hits = 0  # of those, tokens found in the cache

    # ------------------------------------------------------------------ stats

    @property
    def num_pages(self) -> int:
        return self.pool.num_pages

    @property
    def num_usable_pages(self) -> int:
        return self.pool.num_pages - 1

    @property
    def usage(self) -> float:
        """Fraction of usable pages held by page tables (cached free pages count as free)."""
        return self.pool.num_used_pages / self.num_usable_pages

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0

    def kv_waste_tokens(self) -> int:
        """Allocated token slots minus tokens held, over resident requests (between steps: at most one
        partly filled page per sequence)."""
        return sum(len(table) * self.page_size - self._requests[rid].num_computed_tokens
                   for rid, table in self._tables.items())

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def can_ever_fit(self, num_tokens: int) -> bool:
        """Whether a sequence holding `num_tokens` tokens of K/V fits the whole pool."""
        return self.pages_for(num_tokens) <= self.num_usable_pages

    # ------------------------------------------------------------------ tables

    def get_page_table(self, request_id: str) -> list[int]:
        """A copy of the request's page table ([] if it holds no pages)."""
        return list(self._tables.get(request_id, ()))

    def get_computed_pages(self, request: Request) -> tuple[list[int], int]:
        """The longest run of cached full pages that starts the request's tokens, and the tokens they hold.

        NOTE: the hit stops at `num_tokens - 1`, rounded down to a page: the last token must be computed
        even when the whole sequence is cached, because its logits give the next token.
        """
        if not self.enable_prefix_caching:
            return [], 0
        max_pages = (request.num_tokens - 1) // self.page_size
        pages = []
        for page_hash in self._page_hashes(request, max_pages):
            page = self.pool.lookup(page_hash)
            if page is None:
                break
            pages.append(page)
        return pages, len(pages) * self.page_size

    def allocate_slots(self, request: Request, num_new_tokens: int,
                       new_computed_pages: list[int] | tuple[int, ...] = ()) -> list[int] | None:
        """Grows the request's page table to hold `num_new_tokens` more tokens.

        Args:
          request: its `num_computed_tokens` tokens are already covered by its table.
          num_new_tokens: tokens to be computed this step.
          new_computed_pages: prefix-cache hits from `get_computed_pages`, only on a request holding no
            pages; they cover the `len(new_computed_pages) * page_size` tokens after `num_computed_tokens`
            (the caller then advances `num_computed_tokens` by that much).

        Returns:
          The pages added to the table (hits first, then fresh pages; possibly []), or None when the pool
          cannot supply them, in which case nothing was allocated. Free cached pages count as free.
        """
        rid = request.request_id
        table = self._tables.get(rid, [])
        if not new_computed_pages and table and (
                request.num_computed_tokens + num_new_tokens <= len(table) * self.page_size
                and (self.max_model_len is None or request.num_computed_tokens + num_new_tokens <= self.max_model_len)):
            return []  # NOTE: the common decode step: the last page still has room, nothing to allocate
        if new_computed_pages and table:
            raise ValueError(f"request {rid!r} already holds pages; prefix hits are taken only at admission")
        total = request.num_computed_tokens + len(new_computed_pages) * self.page_size + num_new_tokens
        if self.max_model_len is not None and total > self.max_model_len:
            raise ValueError(f"request {rid!r} would hold {total} tokens, over max_model_len={self.max_model_len}")
        num_fresh = max(0, self.pages_for(total) - len(table) - len(new_computed_pages))
        num_revived = sum(1 for p in new_computed_pages if self.pool.is_free(p))
        if num_fresh + num_revived > self.pool.num_free_pages:
            return None
        if rid not in self._tables:
            self._tables[rid] = table
            self._requests[rid] = request
            self._num_cached[rid] = len(new_computed_pages)
            # Count the lookup once per admission that succeeds, not once per retry.
            self.prefix_queries += request.num_tokens
            self.prefix_hits += len(new_computed_pages) * self.page_size
        # NOTE: take the hits before allocating, so fresh pages cannot evict the very pages we hit.
        self.pool.touch(list(new_computed_pages))
        new_pages = list(new_computed_pages) + self.pool.allocate(num_fresh)
        table.extend(new_pages)
        return new_pages

    def cache_full_pages(self, request: Request) -> None:
        """Registers the request's pages that are full of computed tokens under their chained hashes."""
        if not self.enable_prefix_caching:
            return
        rid = request.request_id
        table = self._tables.get(rid)
        if table is None:
            return
        num_full = min(request.num_computed_tokens // self.page_size, len(table))
        start = self._num_cached[rid]
        if num_full <= start:
            return
        hashes = self._page_hashes(request, num_full)
        for i in range(start, num_full):
            # A False return means another page already holds these tokens (computed concurrently); ours
            # stays uncached and simply returns to the free list when the request ends.
            self.pool.cache(table[i], hashes[i])
        self._num_cached[rid] = num_full

    def trim(self, request: Request) -> None:
        """Frees the pages past those holding the request's `num_computed_tokens` (speculative tokens that
        were rejected). NOTE: such pages were never cached: only pages full of computed tokens are."""
        table = self._tables.get(request.request_id)
        if table is None:
            return
        keep = self.pages_for(request.num_computed_tokens)
        if len(table) > keep:
            extra = table[keep:]
            del table[keep:]
            self.pool.free(extra[::-1])

    def free(self, request: Request) -> None:
        """Releases every page of the request. NOTE: in reverse order, so the tail of a sequence (the page
        least likely to be shared) reaches the head of the eviction order before its prefix."""
        rid = request.request_id
        table = self._tables.pop(rid, None)
        self._requests.pop(rid, None)
        self._hashes.pop(rid, None)
        self._num_cached.pop(rid, None)
        if table:
            self.pool.free(table[::-1])

    def _page_hashes(self, request: Request, num_pages: int) -> list[bytes]:
        """Chained hashes of the request's first `num_pages` full pages, extending a per-request memo."""
        hashes = self._hashes.setdefault(request.request_id, [])
        ps = self.page_size
        while len(hashes) < num_pages:
            i = len(hashes)
            hashes.append(hash_page(hashes[-1] if hashes else b"", request.token_slice(i * ps, (i + 1) * ps)))
        return hashes[:num_pages]
