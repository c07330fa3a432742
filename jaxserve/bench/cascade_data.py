"""The cascade benchmark's labelled prompts (tests/data/cascade_prompts.jsonl) and how an answer is checked.

Four kinds with answers a program can check: addition, multiplication, capitals, and copying a word. Each
item carries its split: `tune` (thresholds are picked here) or `test` (accuracy is reported here).
`make_items()` is how the file was written (fixed seed), kept so the set can be regenerated or grown.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "tests" / "data" / "cascade_prompts.jsonl"

CAPITALS = {
    "France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Germany": "Berlin", "Spain": "Madrid",
    "Russia": "Moscow", "China": "Beijing", "Egypt": "Cairo", "Greece": "Athens", "Portugal": "Lisbon",
    "Austria": "Vienna", "Ireland": "Dublin", "Norway": "Oslo", "Sweden": "Stockholm", "Finland": "Helsinki",
    "Denmark": "Copenhagen", "Poland": "Warsaw", "Hungary": "Budapest", "Canada": "Ottawa", "Mexico": "Mexico City",
    "Argentina": "Buenos Aires", "Peru": "Lima", "Chile": "Santiago", "Colombia": "Bogota", "Cuba": "Havana",
    "Kenya": "Nairobi", "Thailand": "Bangkok", "Vietnam": "Hanoi", "South Korea": "Seoul", "Indonesia": "Jakarta",
    "the Philippines": "Manila", "India": "New Delhi", "Iran": "Tehran", "Iraq": "Baghdad", "Turkey": "Ankara",
    "Belgium": "Brussels", "the Netherlands": "Amsterdam", "Switzerland": "Bern", "the United Kingdom": "London",
    "the Czech Republic": "Prague", "Romania": "Bucharest", "Bulgaria": "Sofia", "Ukraine": "Kyiv",
    "Australia": "Canberra", "New Zealand": "Wellington", "Brazil": "Brasilia", "Venezuela": "Caracas",
    "Saudi Arabia": "Riyadh", "Israel": "Jerusalem", "Lebanon": "Beirut", "Syria": "Damascus", "Morocco": "Rabat",
    "Nigeria": "Abuja", "Ethiopia": "Addis Ababa", "Ghana": "Accra", "Pakistan": "Islamabad", "Nepal": "Kathmandu",
    "Afghanistan": "Kabul", "Iceland": "Reykjavik", "Croatia": "Zagreb", "Serbia": "Belgrade",
    "Malaysia": "Kuala Lumpur",
    "Singapore": "Singapore", "the United States": "Washington",
}
WORDS = ["apple", "river", "purple", "window", "garden", "silver", "tiger", "pencil", "rocket", "castle", "orange",
         "planet", "basket", "dragon", "forest", "candle", "mirror", "guitar", "island", "pepper", "jacket", "ladder",
         "monkey", "rabbit", "saddle", "tunnel", "violin", "walnut", "yellow", "zipper", "anchor", "bridge", "cactus",
         "donkey", "engine", "falcon", "ginger", "hammer", "igloo", "jungle", "kettle", "lemon", "magnet", "needle",
         "oyster", "parrot", "quartz", "ribbon", "spider", "teapot", "umbrella", "velvet", "wizard", "yogurt",
         "zebra", "blanket", "cookie", "dolphin", "feather", "harbor"]


def make_items(seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    items = []
    for _ in range(100):
        a, b = rng.randint(1, 60), rng.randint(1, 60)
        items.append({"kind": "add", "prompt": f"What is {a} + {b}? Answer with the number only.", "answer": a + b})
    for _ in range(60):
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        items.append({"kind": "mul", "prompt": f"What is {a} times {b}? Answer with the number only.",
                      "answer": a * b})
    for country, city in CAPITALS.items():
        items.append({"kind": "capital", "prompt": f"What is the capital of {country}? Answer with the city name "
                      "only.", "answer": city})
    for word in WORDS:
        items.append({"kind": "copy", "prompt": f"Repeat this word exactly once and nothing else: {word}",
                      "answer": word})
    rng.shuffle(items)
    for i, item in enumerate(items):
        item["id"] = i
        item["split"] = "tune" if i % 2 == 0 else "test"
    return items


def load_items(path: str | Path = DATA) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def is_correct(item: dict, text: str) -> bool:
    """Numbers: the answer is the first number after the question's operands when the text restates them
    ("12 times 5 is 60", "36 + 38 = 104"), else its first number ("60", "To add 44 ..." is wrong).
    Words: the answer appears, case-insensitive."""
    if item["kind"] in ("add", "mul"):
        numbers = re.findall(r"-?\d+(?:\.\d+)?", text.replace(",", ""))
        operands = re.findall(r"\d+", item["prompt"])
        if numbers[:len(operands)] == operands:
            numbers = numbers[len(operands):]
        return bool(numbers) and float(numbers[0]) == item["answer"]
    return str(item["answer"]).lower() in text.lower()


if __name__ == "__main__":
    DATA.write_text("".join(json.dumps(item) + "\n" for item in make_items()))
    print(f"wrote {DATA}")
