"""PagePool: page ids, reference counts, the free list and the prefix-hash map (plain Python, no JAX).

The pool makes no policy decisions. It hands out pages from the head of the free list, takes pages back
at the tail (in the order the caller gives them), and remembers which full page holds which hash. The
caller (`KVCacheManager`) decides which pages to ask for, in what order to free them, and when a page
is full enough to be cached.

Page 0 is the null page: padded page-table entries and padding tokens point at it, so it is never
handed out, never freed and never cached. Every other page is, at any moment, either *used*
(refcount > 0, owned by one or more page tables) or *free* (refcount 0, on the free list); a free page
may still hold a cached full page of tokens, findable by its hash until the page is reallocated. So

    num_free_pages + num_used_pages == num_pages - 1      (always)

The free list is the eviction order (LRU): freed pages join the tail, allocation takes the head, and
taking a cached page from the head evicts its hash.
"""

from __future__ import annotations

import collections

NULL_PAGE = 0


class PagePool:
    def __init__(self, num_pages: int):
        """`num_pages` counts the null page: pages 1 .. num_pages - 1 can be handed out."""
        if num_pages < 2:
            raise ValueError(f"a page pool needs at least 2 pages (the null page and one more), got {num_pages}")
        self.num_pages = num_pages
        self._refcount = [0] * num_pages
        # NOTE: an OrderedDict used as an ordered set: O(1) pop from the head, append at the tail, and
        # removal from the middle when a prefix-cache hit revives a free cached page.
        self._free: collections.OrderedDict[int, None] = collections.OrderedDict.fromkeys(range(1, num_pages))
        self._page_of_hash: dict[bytes, int] = {}
        self._hash_of_page: dict[int, bytes] = {}
        self._num_used = 0

    # ------------------------------------------------------------------ counters

    @property
    def num_free_pages(self) -> int:
        """Free pages, cached or not: all of them can be handed out (cached ones by eviction)."""
        return len(self._free)

    @property
    def num_cached_free_pages(self) -> int:
        return sum(1 for p in self._free if p in self._hash_of_page)

    @property
    def num_used_pages(self) -> int:
        return self._num_used

    @property
    def num_cached_pages(self) -> int:
        """Pages findable by hash, used or free."""
        return len(self._hash_of_page)

    def refcount(self, page: int) -> int:
        return self._refcount[page]

    def free_page_ids(self) -> list[int]:
        """The free list, head (next to be handed out / evicted) first."""
        return list(self._free)

    def is_free(self, page: int) -> bool:
        return page in self._free

    # ------------------------------------------------------------------ pages

    def allocate(self, n: int) -> list[int]:
        """Takes `n` pages from the head of the free list (evicting their cached hashes), refcount 1 each."""
        if n > len(self._free):
            raise ValueError(f"asked for {n} pages but only {len(self._free)} are free")
        pages = []
        for _ in range(n):
            page, _ = self._free.popitem(last=False)
            self._evict(page)
            self._refcount[page] = 1
            pages.append(page)
        self._num_used += n
        return pages

    def touch(self, pages: list[int]) -> None:
        """Adds a reference to each page (prefix-cache hits); a free page leaves the free list, keeping its hash."""
        for page in pages:
            self._check_page(page)
            if self._refcount[page] == 0:
                del self._free[page]
                self._num_used += 1
            self._refcount[page] += 1

    def free(self, pages: list[int]) -> None:
        """Drops one reference from each page; pages reaching 0 join the tail of the free list in this order."""
        for page in pages:
            self._check_page(page)
            if self._refcount[page] <= 0:
                raise ValueError(f"page {page} freed more often than it was allocated")
            self._refcount[page] -= 1
            if self._refcount[page] == 0:
                self._free[page] = None
                self._num_used -= 1

    # ------------------------------------------------------------------ prefix-hash map

    def cache(self, page: int, page_hash: bytes) -> bool:
        """Registers a used, full page under its hash. Returns False (and caches nothing) when the hash is
        already held by another page (two sequences computed the same tokens) or the page holds a hash."""
        self._check_page(page)
        if self._refcount[page] == 0:
            raise ValueError(f"page {page} is free; only pages in use can be cached")
        if page_hash in self._page_of_hash or page in self._hash_of_page:
            return False
        self._page_of_hash[page_hash] = page
        self._hash_of_page[page] = page_hash
        return True

    def lookup(self, page_hash: bytes) -> int | None:
        """The page holding these tokens (by their hash), used or free, or None."""
        return self._page_of_hash.get(page_hash)

    def hash_of(self, page: int) -> bytes | None:
        return self._hash_of_page.get(page)

    def _evict(self, page: int) -> None:
        page_hash = self._hash_of_page.pop(page, None)
        if page_hash is not None:
            del self._page_of_hash[page_hash]

    def _check_page(self, page: int) -> None:
        if not 0 < page < self.num_pages:
            raise ValueError(f"page {page} is the null page or out of range [1, {self.num_pages})")

    def check_invariants(self) -> None:
        """Raises AssertionError if the counters, the free list and the hash maps disagree (for tests)."""
        assert NULL_PAGE not in self._free and self._refcount[NULL_PAGE] == 0
        assert NULL_PAGE not in self._hash_of_page
        for page in range(1, self.num_pages):
            assert (self._refcount[page] == 0) == (page in self._free), page
            assert self._refcount[page] >= 0, page
        assert self.num_free_pages + self.num_used_pages == self.num_pages - 1
        assert self._num_used == sum(1 for r in self._refcount if r > 0)
        assert all(self._page_of_hash[h] == p for p, h in self._hash_of_page.items())
        assert len(self._page_of_hash) == len(self._hash_of_page)
