"""Per-request speculation back-off: stop proposing where the proposals keep being rejected.

A verify step costs more than a decode step (1.4x for one row with K = 4 on the CPU, and a compute-bound batch
pays for every proposal), so mostly rejected proposals make decoding slower: n-gram proposals on open chat ran at
0.61x of no speculation at batch 8 (docs/performance.md). Each request keeps an exponential average of the
proposals accepted per verify; below `min_accepted` it stops proposing and probes again every `PROBE_EVERY`
steps, taking the probe's result as its new average. Outputs never change: only whether proposals are made.
"""

from __future__ import annotations

import dataclasses

SMOOTHING = 0.3  # weight of the newest verify in the average
PROBE_EVERY = 16  # steps without proposals before a request in back-off tries again


@dataclasses.dataclass
class SpeculationBackoff:
    min_accepted: float  # proposals accepted per verify, averaged, below which a request stops proposing (0: never)
    _average: dict[str, float] = dataclasses.field(default_factory=dict)
    _waiting: dict[str, int] = dataclasses.field(default_factory=dict)  # request -> steps since it stopped

    def allows(self, request_id: str) -> bool:
        """Whether the request should propose this step (called once per step per decoding request)."""
        if request_id not in self._waiting:
            return True
        self._waiting[request_id] += 1
        return self._waiting[request_id] >= PROBE_EVERY

    def record(self, request_id: str, num_proposed: int, num_accepted: int) -> None:
        if num_proposed == 0 or self.min_accepted <= 0:
            return
        probing = self._waiting.pop(request_id, None) is not None
        # NOTE: a fresh request starts from an optimistic average, so one unlucky verify does not stop it.
        before = self._average.get(request_id, 2.0 * self.min_accepted)
        average = num_accepted if probing else (1 - SMOOTHING) * before + SMOOTHING * num_accepted
        self._average[request_id] = average
        if average < self.min_accepted:
            self._waiting[request_id] = 0

    def release(self, request_ids) -> None:
        for rid in request_ids:
            self._average.pop(rid, None)
            self._waiting.pop(rid, None)
