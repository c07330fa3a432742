"""Per-key rate limits: a requests-per-minute AND a tokens-per-minute token bucket for every key.

A key is the API key when the server has keys, else the client's address (`ip:ADDRESS`); never the request's
`user` field, which the client chooses freely.
Each bucket holds at most one minute's allowance and refills continuously at limit/60 per second.

Tokens are reserved at admission as prompt + max_tokens (for every choice), the worst case, and settled
when the request ends: the unused part of the reservation goes back into the bucket. A request whose
reservation exceeds a whole minute's allowance can never be admitted and is refused at once, saying so.

Single-threaded by design: only the asyncio event loop calls in. `clock` is injectable for tests.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable

from jaxserve.server.errors import rate_limited


@dataclasses.dataclass(frozen=True)
class Limits:
    requests_per_minute: float = 0.0  # 0: unlimited
    tokens_per_minute: float = 0.0  # 0: unlimited

    @property
    def unlimited(self) -> bool:
        return not self.requests_per_minute and not self.tokens_per_minute


class TokenBucket:
    def __init__(self, per_minute: float, now: float):
        self.capacity = per_minute
        self.rate = per_minute / 60.0  # per second
        self.level = per_minute
        self.updated = now

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
        self.updated = now

    def wait_for(self, amount: float) -> float:
        """Seconds until `amount` is available (0 if it is now); call `refill` first."""
        return 0.0 if self.level >= amount else (amount - self.level) / self.rate

    def full(self) -> bool:
        return self.level >= self.capacity


@dataclasses.dataclass
class Reservation:
    key: str
    tokens: int
    settled: bool = False


class RateLimiter:
    MAX_IDLE_KEYS = 10_000  # full buckets are forgotten beyond this many keys (they hold no state)

    def __init__(self, default: Limits, overrides: dict[str, Limits] | None = None,
                 clock: Callable[[], float] = time.monotonic, on_reject: Callable[[str], None] | None = None):
        """`on_reject(kind)` is called for every refusal, kind "requests" or "tokens" (the metrics hook)."""
        self.default = default
        self.on_reject = on_reject
        self.overrides = dict(overrides or {})
        self.clock = clock
        self._buckets: dict[str, tuple[TokenBucket | None, TokenBucket | None]] = {}

    def limits_for(self, key: str) -> Limits:
        return self.overrides.get(key, self.default)

    @property
    def num_keys(self) -> int:
        return len(self._buckets)

    def admit(self, key: str, tokens: int) -> Reservation:
        """Takes one request and `tokens` tokens from the key's buckets, or raises a 429 APIError (taking nothing)."""
        limits = self.limits_for(key)
        if limits.unlimited:
            return Reservation(key, 0)
        now = self.clock()
        requests, token_bucket = self._get(key, limits, now)
        if token_bucket is not None and tokens > token_bucket.capacity:
            self._reject("tokens")
            raise rated(f"This request needs {tokens} tokens (prompt + max_tokens), more than the limit of "
                        f"{token_bucket.capacity:g} tokens per minute; lower max_tokens.", 60.0)
        waits = []
        if requests is not None:
            waits.append(("requests", requests.wait_for(1)))
        if token_bucket is not None:
            waits.append(("tokens", token_bucket.wait_for(tokens)))
        kind, wait = max(waits, key=lambda kw: kw[1])
        if wait > 0:
            self._reject(kind)
            limit = limits.requests_per_minute if kind == "requests" else limits.tokens_per_minute
            raise rated(f"Rate limit reached: {limit:g} {kind} per minute for this key; retry in {wait:.1f} s.", wait)
        if requests is not None:
            requests.level -= 1
        if token_bucket is not None:
            token_bucket.level -= tokens
            return Reservation(key, tokens)
        return Reservation(key, 0)

    def settle(self, reservation: Reservation, used_tokens: int) -> None:
        """Gives back what the request reserved but did not use (never more than it reserved)."""
        if reservation.settled or not reservation.tokens:
            reservation.settled = True
            return
        reservation.settled = True
        buckets = self._buckets.get(reservation.key)
        if buckets and buckets[1] is not None:
            bucket = buckets[1]
            bucket.refill(self.clock())
            bucket.level = min(bucket.capacity, bucket.level + max(0, reservation.tokens - used_tokens))

    def _reject(self, kind: str) -> None:
        if self.on_reject is not None:
            self.on_reject(kind)

    def _get(self, key: str, limits: Limits, now: float) -> tuple[TokenBucket | None, TokenBucket | None]:
        buckets = self._buckets.get(key)
        if buckets is None:
            if len(self._buckets) >= self.MAX_IDLE_KEYS:
                self._forget_full(now)
            buckets = (TokenBucket(limits.requests_per_minute, now) if limits.requests_per_minute else None,
                       TokenBucket(limits.tokens_per_minute, now) if limits.tokens_per_minute else None)
            self._buckets[key] = buckets
        for bucket in buckets:
            if bucket is not None:
                bucket.refill(now)
        return buckets

    def _forget_full(self, now: float) -> None:
        for key, buckets in list(self._buckets.items()):
            live = [b for b in buckets if b is not None]
            for b in live:
                b.refill(now)
            if all(b.full() for b in live):
                del self._buckets[key]


def rated(message: str, retry_after: float):
    return rate_limited(message, math.ceil(retry_after))


def parse_override(text: str) -> tuple[str, Limits]:
    """`KEY=RPM,TPM` (either number may be 0 for unlimited) → (key, Limits)."""
    key, sep, numbers = text.rpartition("=")
    parts = numbers.split(",")
    if not sep or not key or len(parts) != 2:
        raise ValueError(f"rate-limit override must look like KEY=RPM,TPM, got {text!r}")
    rpm, tpm = (float(p) for p in parts)
    if rpm < 0 or tpm < 0:
        raise ValueError(f"rate limits must be >= 0, got {text!r}")
    return key, Limits(rpm, tpm)
