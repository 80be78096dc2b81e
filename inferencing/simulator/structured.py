"""Structured output: for a ``response_format``, the smallest JSON document it accepts.

The instance is built from the JSON Schema alone (objects with their ``required``
properties, the first ``enum`` value, the first ``anyOf`` branch, ``$ref`` to ``$defs``,
bounds of numbers, strings and arrays), deterministically. ``pattern`` and
``uniqueItems`` are not honoured.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

_MAX_DEPTH = 32
"""Past this depth a recursive schema takes its ``null`` branch where it has one."""

_FORMATTED = {
    "date-time": "2024-01-01T00:00:00Z",
    "date": "2024-01-01",
    "time": "00:00:00Z",
    "email": "simulated@example.com",
    "uri": "https://example.com/",
    "uuid": "00000000-0000-0000-0000-000000000000",
    "ipv4": "127.0.0.1",
    "ipv6": "::1",
    "hostname": "example.com",
}


def structured_content(body: Mapping[str, Any]) -> str | None:
    """The reply text a ``response_format`` asks for, or None for plain text."""
    response_format = body.get("response_format")
    if not isinstance(response_format, Mapping):
        return None
    kind = response_format.get("type")
    if kind == "json_object":
        return "{}"
    if kind != "json_schema":
        return None
    spec = response_format.get("json_schema")
    schema = spec.get("schema") if isinstance(spec, Mapping) else None
    if not isinstance(schema, Mapping):
        return "{}"
    return json.dumps(minimal_instance(schema))


def minimal_instance(schema: Mapping[str, Any]) -> Any:
    """A small JSON value that validates against ``schema`` (a JSON Schema object)."""
    return _Builder(schema).build(schema, 0)


class _Builder:
    def __init__(self, root: Mapping[str, Any]) -> None:
        self._root = root

    def build(self, schema: Any, depth: int) -> Any:
        if not isinstance(schema, Mapping):
            # ``true`` or a malformed subschema: anything goes.
            return None
        if "const" in schema:
            return schema["const"]
        enum = schema.get("enum")
        if isinstance(enum, list) and enum:
            return enum[0]
        ref = schema.get("$ref")
        if isinstance(ref, str):
            return self.build(self._resolve(ref), depth + 1)
        for combinator in ("anyOf", "oneOf"):
            options = schema.get(combinator)
            if isinstance(options, list) and options:
                return self.build(self._choose(options, depth), depth + 1)
        parts = schema.get("allOf")
        if isinstance(parts, list) and parts:
            built = [self.build(part, depth + 1) for part in parts]
            if all(isinstance(value, dict) for value in built):
                return {key: value for part in built for key, value in part.items()}
            return built[0]
        return self._typed(schema, _type_of(schema, depth), depth)

    def _typed(self, schema: Mapping[str, Any], kind: str | None, depth: int) -> Any:
        if kind == "object":
            properties = schema.get("properties") or {}
            extra = schema.get("additionalProperties")
            return {
                name: self.build(
                    properties.get(name, extra if extra is not None else {}), depth + 1
                )
                for name in schema.get("required") or ()
            }
        if kind == "array":
            return self._array(schema, depth)
        if kind == "string":
            return _string(schema)
        if kind in ("number", "integer"):
            return _number(schema, integer=kind == "integer")
        if kind == "boolean":
            return False
        return None

    def _array(self, schema: Mapping[str, Any], depth: int) -> list[Any]:
        prefix = schema.get("prefixItems")
        items = schema.get("items")
        if isinstance(items, list):  # draft 4-7 tuple form
            prefix, items = items, schema.get("additionalItems")
        values = [self.build(item, depth + 1) for item in prefix or ()]
        minimum = schema.get("minItems")
        if isinstance(minimum, int) and len(values) < minimum:
            filler = self.build(items if items is not None else {}, depth + 1)
            values.extend(filler for _ in range(minimum - len(values)))
        return values

    def _choose(self, options: list[Any], depth: int) -> Any:
        if depth >= _MAX_DEPTH:
            for option in options:
                if isinstance(option, Mapping) and option.get("type") == "null":
                    return option
        return options[0]

    def _resolve(self, ref: str) -> Any:
        if not ref.startswith("#"):
            return {}  # remote references are out of reach; anything goes
        target: Any = self._root
        for token in ref.lstrip("#").split("/"):
            if not token:
                continue
            key = token.replace("~1", "/").replace("~0", "~")
            if not isinstance(target, Mapping) or key not in target:
                return {}
            target = target[key]
        return target


def _type_of(schema: Mapping[str, Any], depth: int) -> str | None:
    declared = schema.get("type")
    if isinstance(declared, list):
        types = [t for t in declared if isinstance(t, str)]
        if depth >= _MAX_DEPTH and "null" in types:
            return "null"
        return next((t for t in types if t != "null"), "null" if types else None)
    if isinstance(declared, str):
        return declared
    if "properties" in schema or "required" in schema:
        return "object"
    if "items" in schema or "prefixItems" in schema or "minItems" in schema:
        return "array"
    if {"minLength", "maxLength", "format", "pattern"} & schema.keys():
        return "string"
    if {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"} & schema.keys():
        return "number"
    return None


def _string(schema: Mapping[str, Any]) -> str:
    fmt = schema.get("format")
    text = _FORMATTED.get(fmt, "simulated") if isinstance(fmt, str) else "simulated"
    longest = schema.get("maxLength")
    if isinstance(longest, int):
        text = text[:longest]
    shortest = schema.get("minLength")
    if isinstance(shortest, int) and len(text) < shortest:
        text = text.ljust(shortest, "x")
    return text


def _number(schema: Mapping[str, Any], *, integer: bool) -> int | float:
    """0 when the bounds allow it, else the bound nearest to 0 (nudged inside if exclusive)."""
    low, low_open = _bound(schema, "minimum", "exclusiveMinimum")
    high, high_open = _bound(schema, "maximum", "exclusiveMaximum")
    step = schema.get("multipleOf")
    value: float = 0.0
    if low is not None and (value < low or (low_open and value <= low)):
        value = _inside(low, low_open, high, +1, integer)
    elif high is not None and (value > high or (high_open and value >= high)):
        value = _inside(high, high_open, low, -1, integer)
    if isinstance(step, int | float) and step > 0 and value % step:
        up = math.ceil(value / step) * step
        value = up if high is None or up <= high else math.floor(value / step) * step
    return int(value) if integer else value


def _inside(
    bound: float, is_open: bool, other: float | None, direction: int, integer: bool
) -> float:
    if integer:
        edge = math.ceil(bound) if direction > 0 else math.floor(bound)
        return edge + direction if is_open and edge == bound else edge
    if not is_open:
        return bound
    if other is not None:
        return (bound + other) / 2
    return bound + direction


def _bound(schema: Mapping[str, Any], inclusive: str, exclusive: str) -> tuple[float | None, bool]:
    strict = schema.get(exclusive)
    if isinstance(strict, bool):  # draft 4: a flag on the inclusive keyword
        value = schema.get(inclusive)
        return (float(value), strict) if isinstance(value, int | float) else (None, False)
    if isinstance(strict, int | float):
        return float(strict), True
    value = schema.get(inclusive)
    return (float(value), False) if isinstance(value, int | float) else (None, False)
