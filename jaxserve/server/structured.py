"""The request fields that constrain the output, read into one `StructuredOutputsParams` (no JAX).

Accepted on both endpoints, at most one per request:

  * OpenAI's `response_format`: {"type": "text"} (no constraint), {"type": "json_object"},
    {"type": "json_schema", "json_schema": {"name", "schema", "strict", "description"}};
  * vLLM's current `structured_outputs`: {"json" | "regex" | "choice" | "grammar" | "json_object"};
  * vLLM's older `guided_json`, `guided_regex`, `guided_choice`, `guided_grammar`.

JSON schemas are checked here, before any compute: a schema that is not valid against its own metaschema,
or a `$ref` that does not resolve inside the schema (remote references are never fetched), is a 400 whose
param and message name the field and the place. Regexes and grammars are compiled by the engine's
`validate` (also before any compute).
"""

from __future__ import annotations

import json
import re
from typing import Any

import jsonschema
import referencing
import referencing.exceptions
import referencing.jsonschema

from jaxserve.core.structured_outputs import StructuredOutputsParams
from jaxserve.server.errors import bad_request

GUIDED = ("guided_json", "guided_regex", "guided_choice", "guided_grammar")
FIELDS = ("response_format", "structured_outputs", *GUIDED)  # the request fields this module reads
_SO_KEYS = ("json", "regex", "choice", "grammar", "json_object")
NAME_PATTERN = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")  # OpenAI's rule for json_schema and function names
MAX_CHOICES = 1024


def parse_structured_outputs(body: dict) -> tuple[StructuredOutputsParams | None, str | None]:
    """(the constraint the body asks for, the field that asked for it); (None, None) when there is none."""
    found = []
    for name in FIELDS:
        value = body.get(name)
        if value is None:
            continue
        params = _READERS[name](value, name)
        if params is not None:
            found.append((params, name))
    if len(found) > 1:
        raise bad_request(f"'{found[1][1]}' cannot be combined with '{found[0][1]}': give one output constraint",
                          param=found[1][1])
    return found[0] if found else (None, None)


def check_schema(schema: Any, param: str) -> dict | bool:
    """A JSON schema (an object, a boolean, or its JSON text) checked against its metaschema; a 400 naming
    `param` and the place in the schema when it is not valid or has a `$ref` that does not resolve."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise bad_request(f"'{param}' is not valid JSON: {e}", param=param) from None
    if not isinstance(schema, (dict, bool)):
        raise bad_request(f"'{param}' must be a JSON schema (an object), got {type(schema).__name__}", param=param)
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    try:
        cls.check_schema(schema)
    except jsonschema.SchemaError as e:
        where = "/".join(str(p) for p in e.path) or "the top level"
        raise bad_request(f"'{param}' is not a valid JSON schema at {where}: {e.message}", param=param) from None
    if isinstance(schema, dict):
        _check_refs(schema, param)
    return schema


def _check_refs(schema: dict, param: str) -> None:
    spec = referencing.jsonschema.specification_with(schema.get("$schema", ""),
                                                     default=referencing.jsonschema.DRAFT202012)
    root = "urn:jaxserve:schema"
    resolver = referencing.Registry().with_resource(root, spec.create_resource(schema)).resolver(root)
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str):
                try:
                    resolver.lookup(ref)
                except referencing.exceptions.Unresolvable:
                    raise bad_request(f"'{param}' has a $ref that does not resolve inside the schema: {ref!r} "
                                      "(remote references are not fetched)", param=param) from None
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


def _response_format(value: Any, name: str) -> StructuredOutputsParams | None:
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        raise bad_request(f"'{name}' must be an object with a 'type'", param=name)
    kind = value["type"]
    extra = set(value) - {"type", "json_schema"}
    if extra or (kind != "json_schema" and "json_schema" in value):
        raise bad_request(f"'{name}' has unknown fields: {sorted(extra) or ['json_schema']}", param=name)
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutputsParams(json_object=True)
    if kind != "json_schema":
        raise bad_request(f"'{name}.type' must be one of text, json_object, json_schema; got {kind!r}",
                          param=f"{name}.type")
    spec = value.get("json_schema")
    param = f"{name}.json_schema"
    if not isinstance(spec, dict):
        raise bad_request(f"'{param}' must be an object with a 'name' and a 'schema'", param=param)
    unknown = set(spec) - {"name", "schema", "strict", "description"}
    if unknown:
        raise bad_request(f"'{param}' has unknown fields: {sorted(unknown)}", param=param)
    if not isinstance(spec.get("name"), str) or not NAME_PATTERN.match(spec["name"]):
        raise bad_request(f"'{param}.name' must be 1 to 64 letters, digits, '_' or '-'", param=f"{param}.name")
    if spec.get("strict") is not None and not isinstance(spec["strict"], bool):
        raise bad_request(f"'{param}.strict' must be a boolean", param=f"{param}.strict")
    if spec.get("description") is not None and not isinstance(spec["description"], str):
        raise bad_request(f"'{param}.description' must be a string", param=f"{param}.description")
    # NOTE: strict or not, the output is held to the schema (a constraint is cheaper than a retry).
    if spec.get("schema") is None:
        return StructuredOutputsParams(json_object=True)
    return StructuredOutputsParams(json=check_schema(spec["schema"], f"{param}.schema"))


def _structured_outputs(value: Any, name: str) -> StructuredOutputsParams | None:
    if not isinstance(value, dict):
        raise bad_request(f"'{name}' must be an object with one of {', '.join(_SO_KEYS)}", param=name)
    unknown = set(value) - set(_SO_KEYS)
    if unknown:
        key = sorted(unknown)[0]
        raise bad_request(f"'{name}.{key}' is not supported (known: {', '.join(_SO_KEYS)})", param=f"{name}.{key}")
    given = [k for k in _SO_KEYS if value.get(k) not in (None, False)]
    if len(given) != 1:
        raise bad_request(f"'{name}' must set exactly one of {', '.join(_SO_KEYS)}, got {given}", param=name)
    key = given[0]
    return _KINDS[key](value[key], f"{name}.{key}")


def _json(value: Any, param: str) -> StructuredOutputsParams:
    return StructuredOutputsParams(json=check_schema(value, param))


def _json_object(value: Any, param: str) -> StructuredOutputsParams:
    if value is not True:
        raise bad_request(f"'{param}' must be true", param=param)
    return StructuredOutputsParams(json_object=True)


def _regex(value: Any, param: str) -> StructuredOutputsParams:
    if not isinstance(value, str) or not value:
        raise bad_request(f"'{param}' must be a non-empty string", param=param)
    return StructuredOutputsParams(regex=value)


def _choice(value: Any, param: str) -> StructuredOutputsParams:
    if not isinstance(value, list) or not value or not all(isinstance(c, str) and c for c in value):
        raise bad_request(f"'{param}' must be a non-empty array of non-empty strings", param=param)
    if len(value) > MAX_CHOICES:
        raise bad_request(f"'{param}' may hold at most {MAX_CHOICES} strings", param=param)
    return StructuredOutputsParams(choice=tuple(value))


def _grammar(value: Any, param: str) -> StructuredOutputsParams:
    if not isinstance(value, str) or not value.strip():
        raise bad_request(f"'{param}' must be a non-empty string (a Lark grammar)", param=param)
    return StructuredOutputsParams(grammar=value)


_KINDS = {"json": _json, "json_object": _json_object, "regex": _regex, "choice": _choice, "grammar": _grammar}
_READERS = {"response_format": _response_format, "structured_outputs": _structured_outputs,
            "guided_json": _json, "guided_regex": _regex, "guided_choice": _choice, "guided_grammar": _grammar}
