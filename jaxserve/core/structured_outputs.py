"""StructuredOutputsParams: the constraint a request puts on its output (vLLM's names; plain Python, no JAX).

Exactly one of the fields is set (SamplingParams checks it). The engine compiles it with the grammar engine
and masks each step's logits so the output always matches it.
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class StructuredOutputsParams:
    json: dict[str, Any] | str | None = None  # a JSON schema (dict or its JSON text)
    json_object: bool = False  # any JSON object (OpenAI's response_format {"type": "json_object"})
    regex: str | None = None
    choice: tuple[str, ...] | None = None  # exactly one of these strings
    grammar: str | None = None  # a Lark / EBNF grammar (llguidance syntax)

    def __post_init__(self):
        if self.choice is not None:
            object.__setattr__(self, "choice", tuple(self.choice))

    def kinds(self) -> list[str]:
        """The fields that are set; a valid constraint has exactly one."""
        chosen = [name for name in ("json", "regex", "choice", "grammar") if getattr(self, name) is not None]
        return chosen + ["json_object"] if self.json_object else chosen
