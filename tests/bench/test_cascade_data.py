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
