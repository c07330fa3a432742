"""Step shape buckets: which (T, R) shapes exist and which one a step gets (host only, no JAX)."""

import pytest

from jaxserve.model.step_inputs import StepBuckets


def test_mixed_buckets_are_powers_of_two_then_steps_of_an_eighth_of_the_budget():
    assert StepBuckets(16, 512).mixed_tokens == [32, 64, 128, 192, 256, 320, 384, 448, 512]
    assert StepBuckets(16, 2048).mixed_tokens == [32, 64, 128, 256, 512, 768, 1024, 1280, 1536, 1792, 2048]
    # Small budgets keep their powers of two (the step never drops below 64 tokens), an odd budget ends the list.
    assert StepBuckets(8, 64).mixed_tokens == [16, 32, 64]
    assert StepBuckets(16, 100).mixed_tokens == [32, 64, 100]
    assert StepBuckets(16, 16).mixed_tokens == [16]
    # Many seats: the first mixed size (128) is past the step (64), and the steps go on from it.
    assert StepBuckets(64, 512).mixed_tokens == [128, 192, 256, 320, 384, 448, 512]


@pytest.mark.parametrize("seats", [1, 3, 16, 33, 64, 128, 256])
@pytest.mark.parametrize("budget", [16, 64, 100, 512, 2048])
def test_every_seat_count_and_budget_gives_sorted_sizes_ending_at_the_budget(seats, budget):
    if budget < seats:
        return  # EngineConfig refuses a budget below max_num_seqs
    sizes = StepBuckets(seats, budget).mixed_tokens
    assert sizes == sorted(set(sizes)) and sizes[-1] == budget and sizes[0] > min(seats, budget - 1)


@pytest.mark.parametrize("budget", [64, 100, 512, 2048, 8192])
def test_a_mixed_step_pads_to_less_than_a_step_or_its_own_size(budget):
    buckets = StepBuckets(16, budget)
    shapes = set(buckets.shapes())
    for tokens in range(17, budget + 1):
        t, r = buckets.choose(tokens, 16)
        assert (t, r) in shapes and r == 16 and t >= tokens
        assert t - tokens < max(buckets.mixed_token_step, tokens), (tokens, t)
    # One prompt of ~200 tokens beside 15 decodes: 320 tokens, no longer padded to 512.
    if budget == 512:
        assert buckets.choose(215, 16) == (256, 16) and buckets.choose(260, 16) == (320, 16)


def test_decode_shaped_steps_keep_their_row_buckets():
    buckets = StepBuckets(16, 512)
    assert [buckets.choose(n, n) for n in (1, 3, 9, 16)] == [(1, 1), (4, 4), (16, 16), (16, 16)]
    assert len(buckets.shapes()) == len(set(buckets.shapes())) == 5 + 9
