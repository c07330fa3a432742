"""The cascade benchmark's prompt set and answer checker."""

from jaxserve.bench.cascade_data import is_correct, load_items, make_items


def test_the_committed_set_is_the_generated_one_with_two_splits():
    items = load_items()
    assert items == make_items()
    assert len(items) >= 250 and {it["split"] for it in items} == {"tune", "test"}
    assert {it["kind"] for it in items} == {"add", "mul", "capital", "copy"}


def test_answers_are_checked_after_a_restated_question():
    add = {"kind": "add", "prompt": "What is 36 + 38? Answer with the number only.", "answer": 74}
    assert is_correct(add, "74") and is_correct(add, "36 + 38 = 74.") and is_correct(add, "36 + 38 is 74")
    assert not is_correct(add, "36 + 38 = 104") and not is_correct(add, "To add 38 to 36") and not is_correct(add, "")
    assert not is_correct(add, "36 + 38 is 74.5")
    city = {"kind": "capital", "prompt": "What is the capital of Peru?", "answer": "Lima"}
    assert is_correct(city, "The capital of Peru is lima.") and not is_correct(city, "Cusco")


def load_script(name: str):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"script_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_threshold_keeps_the_most_on_small_within_the_allowed_drop():
    bench = load_script("bench_cascade")
    # Four prompts: the small model is right on the two it is most sure of, the large one on all but one.
    signals = [-0.1, -0.2, -0.9, -1.5]
    small_ok, large_ok = [True, True, False, False], [True, False, True, True]
    t, sweep = bench.pick_threshold(signals, small_ok, large_ok, max_drop=0.0)
    # Keeping the top two on small: accuracy 1.0 >= large's 0.75, share 0.5; keeping three: 0.75, share 0.75.
    assert t == -0.9 and (t, 0.75, 0.75) in sweep
    t, _ = bench.pick_threshold(signals, small_ok, large_ok, max_drop=0.5)
    assert t == float("-inf")  # everything on small (accuracy 0.5) is within 0.5 of 0.75
    assert bench.cost_per_million(3.6, 1000.0) == 1.0  # $3.6/h at 1000 tokens/s
