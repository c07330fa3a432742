"""Speculation back-off: requests whose proposals keep failing stop proposing, probe again, and resume."""

from jaxserve.spec_decode.backoff import PROBE_EVERY, SpeculationBackoff


def test_a_request_that_keeps_failing_stops_then_probes():
    b = SpeculationBackoff(min_accepted=1.0)
    assert b.allows("a")
    b.record("a", 4, 0)  # one bad verify: the optimistic start keeps it going
    assert b.allows("a")
    b.record("a", 4, 0)
    b.record("a", 4, 0)
    allowed = [b.allows("a") for _ in range(PROBE_EVERY)]
    assert allowed == [False] * (PROBE_EVERY - 1) + [True]  # stopped, then one probe
    b.record("a", 4, 3)  # the probe succeeded: its result becomes the average
    assert all(b.allows("a") for _ in range(5))


def test_failed_probe_waits_again_and_good_requests_never_stop():
    b = SpeculationBackoff(min_accepted=1.0)
    for _ in range(4):
        b.record("bad", 4, 0)
        b.record("good", 4, 3)
    for _ in range(PROBE_EVERY):
        b.allows("bad")
    b.record("bad", 4, 0)
    assert not b.allows("bad")
    assert all(b.allows("good") for _ in range(3 * PROBE_EVERY))
    b.record("good", 0, 0)  # a step with no proposals says nothing
    b.release(["bad", "good"])
    assert b.allows("bad")


def test_zero_never_backs_off():
    b = SpeculationBackoff(min_accepted=0.0)
    for _ in range(10):
        b.record("a", 4, 0)
    assert all(b.allows("a") for _ in range(PROBE_EVERY * 2))
