"""Template: the tests every Lamina tool should have (see docs/plugins.md, "Test it").

Copy this file into your plugin package's tests. It runs as it is anywhere Lamina is
installed, and imports only Lamina's public API. Then:

1. replace the two example tools below with imports of yours;
2. adjust the arguments and expected values in the tests.

It checks what a reviewer asks of a tool:

- the schema the model is shown: names, types, required, a description everywhere;
- a happy call, made as production makes it: through the execution policy
  (``build_toolset``), on behalf of a caller;
- invalid arguments come back as a structured error the model can correct,
  and the tool does not run;
- the role check: the tool is hidden from, and refused to, a caller without the role;
- a high-risk tool never runs without a person's approval.
"""

from __future__ import annotations

from typing import Annotated, Literal

import pytest
from pydantic import Field

from tools.contracts import (
    InvalidToolArguments,
    RiskLevel,
    ToolApprovalRequired,
    ToolCaller,
    ToolPermissionDenied,
    Toolset,
)
from tools.plugins import Tool, tool
from tools.policy import build_toolset
from tools.settings import ToolsSettings
from tools.testing import StaticCaller

# --- the tools under test: replace with `from your_package.tools import ...` -------------

ROOMS = {"contoso": {"Fjord": 8, "Glacier": 4, "Summit": 12}}
BOOKINGS: list[dict[str, object]] = []


@tool(risk=RiskLevel.READ, roles={"employee"})
def find_rooms(
    caller: ToolCaller,
    seats: Annotated[int, Field(ge=1, le=50, description="Seats needed")],
    layout: Annotated[Literal["any", "boardroom"], "Room layout"] = "any",
) -> list[str]:
    """Meeting rooms of the caller's office with at least this many seats."""
    rooms = ROOMS.get(caller.tenant_id, {})  # scoped by the caller, never by an argument
    return sorted(name for name, size in rooms.items() if size >= seats)


@tool(risk=RiskLevel.HIGH, roles={"facilities.admin"})
def close_room(
    caller: ToolCaller,
    room: Annotated[str, "Name of the room to close"],
    reason: Annotated[str, "Why, shown to everyone whose booking is cancelled"],
) -> str:
    """Close a room and cancel every booking in it."""
    BOOKINGS.append({"closed": room, "by": caller.user_id})
    return f"{room} is closed"


TOOLS = [find_rooms, close_room]

# --- callers -------------------------------------------------------------------------------

EMPLOYEE = StaticCaller(tenant_id="contoso", user_id="megan", roles={"employee"})
ADMIN = StaticCaller(tenant_id="contoso", user_id="nestor", roles={"facilities.admin"})
GUEST = StaticCaller(tenant_id="contoso", user_id="guest", roles={"guest"})


@pytest.fixture
def toolset() -> Toolset:
    # Only these tools, behind the real execution policy; no installed plugin is loaded.
    return build_toolset(ToolsSettings(load_entry_points=False), TOOLS)


# --- the schema the model sees ----------------------------------------------------------


def test_schema_shown_to_the_model() -> None:
    spec = find_rooms.spec
    assert spec.name == "find_rooms"
    assert spec.description.startswith("Meeting rooms")
    assert spec.parameters["required"] == ["seats"]
    assert spec.parameters["properties"]["seats"] == {
        "type": "integer",
        "minimum": 1,
        "maximum": 50,
        "description": "Seats needed",
    }
    assert spec.parameters["properties"]["layout"]["enum"] == ["any", "boardroom"]


@pytest.mark.parametrize("declared", TOOLS, ids=lambda t: t.spec.name)
def test_every_parameter_is_described(declared: Tool) -> None:
    properties = declared.spec.parameters["properties"]
    undescribed = [name for name, prop in properties.items() if not prop.get("description")]
    assert undescribed == [], "the model only knows what a parameter means from its description"


def test_risk_and_who_may_use_it() -> None:
    assert (find_rooms.spec.risk, find_rooms.spec.required_roles) == (
        RiskLevel.READ,
        frozenset({"employee"}),
    )
    assert (close_room.spec.risk, close_room.spec.required_roles) == (
        RiskLevel.HIGH,
        frozenset({"facilities.admin"}),
    )


# --- a happy call through the policy ------------------------------------------------------


async def test_returns_what_the_caller_asked_for(toolset: Toolset) -> None:
    result = await toolset.call("find_rooms", {"seats": 6}, EMPLOYEE)
    assert result.output == ["Fjord", "Summit"]


async def test_sees_only_the_callers_tenant(toolset: Toolset) -> None:
    outsider = StaticCaller(tenant_id="fabrikam", roles={"employee"})
    assert (await toolset.call("find_rooms", {"seats": 1}, outsider)).output == []


# --- invalid arguments: a structured error the model can act on ----------------------------


@pytest.mark.parametrize(
    ("arguments", "field"),
    [
        ({}, "seats"),
        ({"seats": 0}, "seats"),
        ({"seats": "six"}, "seats"),
        ({"seats": 6, "layout": "theatre"}, "layout"),
        ({"seats": 6, "floor": 2}, "floor"),
    ],
)
async def test_invalid_arguments_are_refused_with_errors_naming_the_field(
    toolset: Toolset, arguments: dict[str, object], field: str
) -> None:
    with pytest.raises(InvalidToolArguments) as caught:
        await toolset.call("find_rooms", arguments, EMPLOYEE)
    assert caught.value.tool == "find_rooms"
    assert any(field in error for error in caught.value.errors), caught.value.errors
    assert field in caught.value.message, "the message, which the model reads, names the field"


# --- the role check --------------------------------------------------------------------------


async def test_hidden_from_and_refused_to_callers_without_the_role(toolset: Toolset) -> None:
    assert [spec.name for spec in toolset.list_tools(GUEST)] == []
    with pytest.raises(ToolPermissionDenied):
        await toolset.call("find_rooms", {"seats": 2}, GUEST)


# --- high risk: never without approval ----------------------------------------------------


async def test_high_risk_tool_never_runs_without_approval(toolset: Toolset) -> None:
    BOOKINGS.clear()
    assert "close_room" in [spec.name for spec in toolset.list_tools(ADMIN)]

    with pytest.raises(ToolApprovalRequired):
        await toolset.call("close_room", {"room": "Fjord", "reason": "Water leak"}, ADMIN)

    assert BOOKINGS == [], "the tool did not run"


async def test_high_risk_tool_checks_role_and_arguments_before_asking_anyone(
    toolset: Toolset,
) -> None:
    # A person is never asked to approve a call that could not run.
    with pytest.raises(ToolPermissionDenied):
        await toolset.call("close_room", {"room": "Fjord", "reason": "Leak"}, EMPLOYEE)
    with pytest.raises(InvalidToolArguments):
        await toolset.call("close_room", {"room": "Fjord"}, ADMIN)
