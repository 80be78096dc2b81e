"""The ``@tool`` decorator: schema derivation and invocation of plain typed functions."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass
from datetime import date
from typing import Annotated, Literal

import pytest
from pydantic import BaseModel, Field

from tools.contracts import InvalidToolArguments, RiskLevel, ToolCaller
from tools.plugins import FunctionTool, tool
from tools.testing import StaticCaller

CALLER = StaticCaller(roles={"employee"})


class Address(BaseModel):
    street: str
    city: str


@tool
def everything(
    name: Annotated[str, "Full name of the person"],
    age: Annotated[int, Field(ge=0, description="Age in whole years")],
    color: Literal["red", "green"] = "red",
    tags: list[str] | None = None,
    ratio: float = 0.5,
    active: bool = True,
    address: Address | None = None,
    birthday: date | None = None,
) -> dict[str, object]:
    """Echo the arguments back.

    Used to check schema derivation.
    """
    return {
        "name": name,
        "age": age,
        "color": color,
        "tags": tags,
        "ratio": ratio,
        "active": active,
        "address": address,
        "birthday": birthday,
    }


def test_bare_decorator_derives_name_description_and_defaults() -> None:
    spec = everything.spec
    assert isinstance(everything, FunctionTool)
    assert spec.name == "everything"
    assert spec.description == "Echo the arguments back.\n\nUsed to check schema derivation."
    assert spec.risk is RiskLevel.READ
    assert spec.required_roles == frozenset()
    assert spec.idempotent is True
    assert everything.timeout_s is None


def test_schema_types_descriptions_defaults_and_required() -> None:
    schema = everything.spec.parameters
    properties = schema["properties"]
    assert schema["type"] == "object"
    assert schema["additionalProperties"] is False
    assert schema["required"] == ["name", "age"]
    assert "title" not in schema
    assert properties["name"] == {"type": "string", "description": "Full name of the person"}
    assert properties["age"] == {
        "type": "integer",
        "minimum": 0,
        "description": "Age in whole years",
    }
    assert properties["color"] == {"type": "string", "enum": ["red", "green"], "default": "red"}
    assert properties["tags"] == {
        "anyOf": [{"type": "array", "items": {"type": "string"}}, {"type": "null"}],
        "default": None,
    }
    assert properties["ratio"] == {"type": "number", "default": 0.5}
    assert properties["active"] == {"type": "boolean", "default": True}
    assert properties["birthday"]["anyOf"][0] == {"type": "string", "format": "date"}
    # Nested models become $defs at the root, where "#/$defs/..." references resolve.
    assert properties["address"]["anyOf"][0] == {"$ref": "#/$defs/Address"}
    assert set(schema["$defs"]["Address"]["required"]) == {"street", "city"}


def test_decorator_arguments_set_the_spec() -> None:
    @tool(
        name="open-door",
        description="Open a door.",
        risk=RiskLevel.WRITE,
        roles={"facilities"},
        timeout_s=3,
    )
    def open_door(door: str) -> str:
        return door

    spec = open_door.spec
    assert (spec.name, spec.description, spec.risk) == ("open-door", "Open a door.", "write")
    assert spec.required_roles == frozenset({"facilities"})
    assert spec.timeout_s == 3
    assert open_door.timeout_s == 3
    assert spec.idempotent is False, "a write is not assumed safe to retry"


def test_decorated_function_stays_callable() -> None:
    assert everything("Ada", 36)["color"] == "red"


async def test_invoke_sync_function_runs_off_the_event_loop_and_coerces_arguments() -> None:
    loop_thread = threading.get_ident()
    seen: dict[str, object] = {}

    @tool
    def record(when: date, address: Address) -> str:
        """Record a visit."""
        seen.update(thread=threading.get_ident(), when=when, address=address)
        return "ok"

    output = await record.invoke(
        {"when": "2024-05-01", "address": {"street": "1 Main St", "city": "Redmond"}}, CALLER
    )

    assert output == "ok"
    assert seen["thread"] != loop_thread
    assert seen["when"] == date(2024, 5, 1)
    assert seen["address"] == Address(street="1 Main St", city="Redmond")


async def test_invoke_async_function_and_json_output() -> None:
    @dataclass
    class Point:
        x: int
        y: int

    @tool
    async def midpoint(a: list[int], b: list[int]) -> Point:
        """Midpoint of two points."""
        await asyncio.sleep(0)
        return Point((a[0] + b[0]) // 2, (a[1] + b[1]) // 2)

    assert await midpoint.invoke({"a": [0, 0], "b": [4, 6]}, CALLER) == {"x": 2, "y": 3}
    assert await everything.invoke(
        {"name": "Ada", "age": 36, "birthday": "1815-12-10"}, CALLER
    ) == {
        "name": "Ada",
        "age": 36,
        "color": "red",
        "tags": None,
        "ratio": 0.5,
        "active": True,
        "address": None,
        "birthday": "1815-12-10",
    }


async def test_caller_is_injected_and_kept_out_of_the_schema() -> None:
    @tool
    def whoami(caller: ToolCaller, greeting: str = "hi") -> str:
        """Greet the caller."""
        return f"{greeting} {caller.user_id}@{caller.tenant_id}"

    assert "caller" not in whoami.spec.parameters["properties"]
    assert whoami.spec.parameters.get("required", []) == []
    assert await whoami.invoke({}, StaticCaller(tenant_id="fabrikam", user_id="ann")) == (
        "hi ann@fabrikam"
    )


async def test_invoke_rejects_arguments_pydantic_refuses_without_running() -> None:
    calls: list[int] = []

    @tool
    def count(n: Annotated[int, Field(gt=0)]) -> int:
        """Count."""
        calls.append(n)
        return n

    with pytest.raises(InvalidToolArguments) as caught:
        await count.invoke({"n": 0, "extra": 1}, CALLER)

    assert calls == []
    assert caught.value.tool == "count"
    assert set(caught.value.errors) == {
        "n: Input should be greater than 0",
        "extra: Extra inputs are not permitted",
    }


def test_positional_only_parameters_are_passed_positionally() -> None:
    @tool
    def divide(a: int, b: int, /) -> float:
        """Divide a by b."""
        return a / b

    assert asyncio.run(divide.invoke({"a": 6, "b": 3}, CALLER)) == 2.0


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("def f(x):\n    '''Doc.'''", "needs a type annotation"),
        ("def f(*args: int):\n    '''Doc.'''", "*args has no JSON schema"),
        ("def f(x: int):\n    pass", "needs a description"),
        ("def f(x: int):\n    '''Doc.'''\nf.__name__ = 'bad name'", "invalid tool name"),
        ("def f(x: int):\n    '''Doc.'''\nf.__name__ = 'n' * 65", "invalid tool name"),
    ],
)
def test_bad_declarations_fail_at_decoration(source: str, message: str) -> None:
    namespace: dict[str, object] = {}
    exec(source, namespace)
    with pytest.raises((TypeError, ValueError), match=message.replace("*", r"\*")):
        tool(namespace["f"])  # type: ignore[call-overload]


def test_timeout_must_be_positive() -> None:
    with pytest.raises(ValueError, match="timeout_s must be positive"):

        @tool(timeout_s=0)
        def f() -> None:
            """Doc."""
