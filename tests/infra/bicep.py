"""A reading of Bicep files through the tree-sitter Bicep grammar, for structural checks.

The bicep CLI (the compiler) is not installable from a package registry, so the tests
parse the templates instead: declarations become plain Python values where they are
literals, and :class:`Expr` (the source text) where they are expressions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeAlias

import tree_sitter
import tree_sitter_bicep

_PARSER = tree_sitter.Parser(tree_sitter.Language(tree_sitter_bicep.language()))


@dataclass(frozen=True)
class Expr:
    """An expression the tests do not evaluate, kept as its source text."""

    text: str


Value: TypeAlias = "str | int | bool | Expr | list[Value] | dict[str, Value] | None"


@dataclass(frozen=True)
class Resource:
    symbol: str
    type: str
    api_version: str
    existing: bool
    body: dict[str, Value]
    """The declaration's object (the loop body for a resource loop)."""


@dataclass(frozen=True)
class Module:
    symbol: str
    path: str
    body: dict[str, Value]


@dataclass(frozen=True)
class Param:
    name: str
    type: str
    default: Value
    has_default: bool


@dataclass
class BicepFile:
    path: Path
    errors: list[str] = field(default_factory=list)
    """ERROR and MISSING nodes, as 'line:column text'."""
    params: dict[str, Param] = field(default_factory=dict)
    variables: dict[str, Value] = field(default_factory=dict)
    resources: list[Resource] = field(default_factory=list)
    modules: list[Module] = field(default_factory=list)
    outputs: dict[str, Expr] = field(default_factory=dict)

    def resource(self, symbol: str) -> Resource:
        [found] = [r for r in self.resources if r.symbol == symbol]
        return found

    def of_type(self, resource_type: str) -> list[Resource]:
        return [r for r in self.resources if r.type == resource_type and not r.existing]


def parse(path: Path) -> BicepFile:
    tree = _PARSER.parse(path.read_bytes())
    parsed = BicepFile(path)
    _collect_errors(tree.root_node, parsed.errors)
    for node in tree.root_node.named_children:
        kind = node.type
        if kind == "parameter_declaration":
            name, type_node = node.named_children[0], node.named_children[1]
            default = node.named_children[2] if len(node.named_children) > 2 else None
            parsed.params[_text(name)] = Param(
                _text(name),
                _text(type_node),
                value(default) if default is not None else None,
                default is not None,
            )
        elif kind == "variable_declaration":
            name, expression = node.named_children[0], node.named_children[-1]
            parsed.variables[_text(name)] = value(expression)
        elif kind == "resource_declaration":
            symbol, type_string = node.named_children[0], node.named_children[1]
            resource_type, _, api_version = _string(type_string).partition("@")
            existing = any(child.type == "existing" for child in node.children)
            parsed.resources.append(
                Resource(
                    _text(symbol),
                    resource_type,
                    api_version,
                    existing,
                    _body(node.named_children[-1]),
                )
            )
        elif kind == "module_declaration":
            symbol, module_path = node.named_children[0], node.named_children[1]
            parsed.modules.append(
                Module(_text(symbol), _string(module_path), _body(node.named_children[-1]))
            )
        elif kind == "output_declaration":
            parsed.outputs[_text(node.named_children[0])] = Expr(_text(node.named_children[-1]))
    return parsed


def value(node: tree_sitter.Node) -> Value:
    """A literal as Python (strings without interpolation, numbers, booleans, null,
    arrays, objects); anything else as :class:`Expr`."""
    kind = node.type
    if kind == "string" and not any(c.type == "interpolation" for c in node.named_children):
        return _string(node)
    if kind == "number":
        return int(_text(node))
    if kind == "boolean":
        return _text(node) == "true"
    if kind == "null":
        return None
    if kind == "array":
        return [value(child) for child in node.named_children if child.type != "comment"]
    if kind == "object":
        result: dict[str, Value] = {}
        for prop in node.named_children:
            if prop.type != "object_property":
                continue
            key, item = prop.named_children[0], prop.named_children[-1]
            result[_string(key) if key.type == "string" else _text(key)] = value(item)
        return result
    return Expr(_text(node))


def _body(node: tree_sitter.Node) -> dict[str, Value]:
    # `= {…}`, `= if (…) {…}` and `= [for … : {…}]` all end in the object.
    while node.type in ("if_statement", "for_statement"):
        node = node.named_children[-1]
    body = value(node)
    assert isinstance(body, dict), f"expected an object, got {node.type}"
    return body


def _string(node: tree_sitter.Node) -> str:
    return "".join(_text(c) for c in node.named_children if c.type == "string_content")


def _text(node: tree_sitter.Node) -> str:
    return (node.text or b"").decode()


def _collect_errors(node: tree_sitter.Node, into: list[str]) -> None:
    if node.type == "ERROR" or node.is_missing:
        line, column = node.start_point
        into.append(f"{line + 1}:{column + 1} {_text(node)[:60]!r}")
    for child in node.children:
        _collect_errors(child, into)
