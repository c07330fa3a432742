"""Chat templates: a model's jinja template turns a list of messages into the prompt text (no JAX).

The environment copies transformers' `apply_chat_template` (sandboxed, `trim_blocks`, `lstrip_blocks`,
`loopcontrols`, `raise_exception`, `strftime_now`, a `tojson` that keeps non-ASCII), because templates are
written against it: the same template must render the same text here.
"""

from __future__ import annotations

import functools
import json
from datetime import datetime
from pathlib import Path
from typing import Any, Mapping, Sequence

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

# Used when a model ships no template: plain ChatML, which SmolLM2, Qwen and many fine-tunes use.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def render_chat(template: str | None, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                bos_token: str | None = "", eos_token: str | None = "", **extra: Any) -> str:
    """Renders `messages` ([{"role": ..., "content": ...}, ...]) with a chat template.

    Args:
      template: the jinja source (`Tokenizer.chat_template`). None means the model has no template: the
        plain ChatML template `CHATML_TEMPLATE` is used instead.
      add_generation_prompt: end with the opening of an assistant turn, so the model writes the reply.
      bos_token, eos_token: the texts templates refer to as `bos_token` / `eos_token`.
      extra: more template variables (`tools`, `documents`, `enable_thinking`, ...).
    Returns:
      The prompt text; special tokens appear as text (encode it without adding BOS twice).
    Raises:
      ValueError: the template is empty or not a string, the messages are malformed, or the template fails
        (its syntax, an undefined variable it uses, or its own `raise_exception`); the message says which.
    """
    if template is None:
        template = CHATML_TEMPLATE
    if not isinstance(template, str) or not template.strip():
        raise ValueError(f"chat template must be a non-empty string, got {template!r:.80}")
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or "role" not in message:
            raise ValueError(f"messages[{i}] must be a mapping with a 'role', got {message!r:.80}")
    compiled = _compile(template)
    variables = {"tools": None, "documents": None, **extra}
    try:
        return compiled.render(messages=[dict(m) for m in messages], add_generation_prompt=add_generation_prompt,
                               bos_token=bos_token or "", eos_token=eos_token or "", **variables)
    except jinja2.TemplateError as e:
        raise ValueError(f"chat template failed: {type(e).__name__}: {e}") from e


@functools.lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    try:
        return _environment().from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"chat template syntax error at line {e.lineno}: {e.message}") from e


@functools.lru_cache(maxsize=1)
def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def _raise_exception(message: str):
    raise jinja2.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
            sort_keys: bool = False) -> str:
    # Unlike jinja's own tojson: no HTML escaping, non-ASCII kept (transformers does the same).
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def load_chat_template(value: str) -> str:
    """`--chat-template`: a file's contents, or the value itself as an inline jinja template (vLLM's rule)."""
    path = Path(value).expanduser()
    if path.is_file():
        return path.read_text()
    if "{" not in value and (value.endswith((".jinja", ".j2", ".jinja2")) or "/" in value):
        raise ValueError(f"chat template file {value!r} does not exist")
    return value
