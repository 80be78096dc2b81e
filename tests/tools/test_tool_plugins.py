"""The ``@tool`` decorator: schema derivation and invocation of plain typed functions."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass
from datetime import date
from enum import Enum
from typing import Annotated, Literal

import pytest
from pydantic import BaseModel, Field
from typing_extensions import TypedDict  # pydantic needs this one on Python 3.11

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


def test_scopes_are_declared_like_roles() -> None:
    @tool(roles={"employee"}, scopes={"Tools.Write", "Tools.Admin"})
    def publish(text: str) -> str:
        """Publish."""
        return text

    assert publish.spec.required_roles == frozenset({"employee"})
    assert publish.spec.required_scopes == frozenset({"Tools.Write", "Tools.Admin"})
    assert publish.spec.origin == "python"
    assert everything.spec.required_scopes == frozenset(), "no scope is needed by default"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"roles": "admin"}, "roles must be a set of names, not a string"),
        ({"scopes": "Tools.Write"}, "scopes must be a set of names, not a string"),
        ({"scopes": {""}}, "scopes must be non-empty strings"),
        ({"roles": {"employee", ""}}, "roles must be non-empty strings"),
    ],
)
def test_roles_and_scopes_must_be_sets_of_names(options: dict[str, object], message: str) -> None:
    def f() -> None:
        """Doc."""

    with pytest.raises(ValueError, match=f"tool 'f': {message}"):
        FunctionTool(f, **options)  # type: ignore[arg-type]


# --- schema details a model relies on ----------------------------------------------------


@dataclass
class Window:
    """A span of time."""

    start: Annotated[str, "ISO 8601 start, e.g. '2024-05-01T09:00'"]
    hours: Annotated[int, Field(ge=1, description="Length in hours")] = 1


class Attendee(BaseModel):
    """Someone invited."""

    email: Annotated[str, "Work email address"]
    optional: bool = Field(default=False, description="May skip the meeting")
    note: Annotated[str, "ignored: the explicit Field wins", Field(description="A short note")] = ""


class Room(TypedDict):
    building: Annotated[str, "Building code"]
    floor: int


def test_nested_dataclasses_models_and_typed_dicts_keep_every_description() -> None:
    @tool
    def schedule(window: Window, attendees: list[Attendee], room: Room | None = None) -> None:
        """Schedule a meeting."""

    schema = schedule.spec.parameters
    window, attendee = schema["$defs"]["Window"], schema["$defs"]["Attendee"]
    assert schema["$defs"]["Room"]["properties"]["building"] == {
        "type": "string",
        "description": "Building code",
    }
    assert window["description"] == "A span of time."
    assert window["properties"] == {
        "start": {"type": "string", "description": "ISO 8601 start, e.g. '2024-05-01T09:00'"},
        "hours": {"type": "integer", "minimum": 1, "default": 1, "description": "Length in hours"},
    }
    assert window["required"] == ["start"]
    assert attendee["properties"]["email"]["description"] == "Work email address"
    assert attendee["properties"]["optional"]["description"] == "May skip the meeting"
    assert attendee["properties"]["note"]["description"] == "A short note"
    assert schema["properties"]["attendees"] == {
        "type": "array",
        "items": {"$ref": "#/$defs/Attendee"},
    }


class Unit(Enum):
    CELSIUS = "celsius"
    FAHRENHEIT = "fahrenheit"


def test_descriptions_constraints_enums_and_optional_combine() -> None:
    @tool
    def measure(
        where: Annotated[str, "Site code", Field(min_length=3)],
        unit: Annotated[Unit, "Unit of the reading"] = Unit.CELSIUS,
        around: Annotated[Literal["am", "pm"] | None, "Half of the day; none for both"] = None,
        *,
        sensors: Annotated[list[str], Field(default_factory=list, description="Sensor ids")],
    ) -> None:
        """Read a temperature."""

    schema = measure.spec.parameters
    properties = schema["properties"]
    assert schema["required"] == ["where"], "a default_factory makes a parameter optional too"
    assert properties["where"] == {"type": "string", "minLength": 3, "description": "Site code"}
    assert properties["unit"] == {
        "$ref": "#/$defs/Unit",
        "default": "celsius",
        "description": "Unit of the reading",
    }
    assert schema["$defs"]["Unit"]["enum"] == ["celsius", "fahrenheit"]
    assert properties["around"] == {
        "anyOf": [{"type": "string", "enum": ["am", "pm"]}, {"type": "null"}],
        "default": None,
        "description": "Half of the day; none for both",
    }
    assert properties["sensors"] == {
        "type": "array",
        "items": {"type": "string"},
        "description": "Sensor ids",
    }


async def test_enum_and_default_factory_arguments_reach_the_function() -> None:
    @tool
    def reading(unit: Unit, sensors: Annotated[list[str], Field(default_factory=list)]) -> str:
        """Describe a reading."""
        return f"{unit.name} from {len(sensors)} sensors"

    assert await reading.invoke({"unit": "fahrenheit"}, CALLER) == "FAHRENHEIT from 0 sensors"


def test_a_parameter_type_without_json_schema_is_refused_naming_the_tool() -> None:
    with pytest.raises(TypeError, match="tool 'hold': no JSON schema can be derived"):

        @tool
        def hold(lock: threading.Lock) -> None:  # type: ignore[valid-type]
            """Hold a lock."""
