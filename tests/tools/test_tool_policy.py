"""The execution policy: every refusal happens before the tool runs; every failure is safe."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import TYPE_CHECKING, Annotated, Literal

import pytest
from pydantic import BaseModel, Field, model_validator

from tools.contracts import (
    InvalidToolArguments,
    RiskLevel,
    ToolApprovalRequired,
    ToolExecutionFailed,
    ToolPermissionDenied,
    Toolset,
    ToolTimeout,
    UnknownTool,
)
from tools.plugins import tool
from tools.policy import FilteredToolset, PolicyEnforcedToolset, build_toolset, cap_output
from tools.registry import ToolRegistry
from tools.settings import ToolsSettings
from tools.testing import StaticCaller

if TYPE_CHECKING:
    pass

EMPLOYEE = StaticCaller(roles={"employee"})
AGENT = StaticCaller(roles={"servicedesk.agent"})
NOBODY = StaticCaller(roles=())
SETTINGS = ToolsSettings(load_entry_points=False)

runs: list[str] = []
"""Names of the tools whose bodies ran; cleared before each test."""


@pytest.fixture(autouse=True)
def _clear_runs() -> None:
    runs.clear()


@tool
def public_time() -> str:
    """The time, for anyone."""
    runs.append("public_time")
    return "12:00"


@tool(roles={"employee"})
def book_room(
    room: Annotated[str, Field(min_length=3, description="Room name")],
    hours: Annotated[int, Field(ge=1, le=8)] = 1,
    layout: Literal["boardroom", "theatre"] = "boardroom",
) -> dict[str, object]:
    """Book a meeting room."""
    runs.append("book_room")
    return {"room": room, "hours": hours, "layout": layout}


@tool(risk=RiskLevel.HIGH, roles={"employee", "servicedesk.agent"})
async def wipe_laptop(serial: str) -> str:
    """Remotely wipe a laptop."""
    runs.append("wipe_laptop")
    return "wiped"


def toolset(*sources: object, settings: ToolsSettings = SETTINGS) -> PolicyEnforcedToolset:
    registry = ToolRegistry()
    for source in sources:
        registry.add(source)
    return PolicyEnforcedToolset(registry, settings)


def listed(toolset: Toolset, caller: StaticCaller) -> list[str]:
    return [spec.name for spec in toolset.list_tools(caller)]


# --- refusals ----------------------------------------------------------------------


async def test_valid_call_runs_the_tool() -> None:
    result = await toolset(book_room).call("book_room", {"room": "Fjord", "hours": 2}, EMPLOYEE)

    assert result.tool == "book_room"
    assert result.output == {"room": "Fjord", "hours": 2, "layout": "boardroom"}
    assert runs == ["book_room"]


@pytest.mark.parametrize(
    ("arguments", "expected_errors"),
    [
        ({}, ("'room' is a required property",)),
        ({"room": "Fjord", "hours": "2"}, ("hours: '2' is not of type 'integer'",)),
        ({"room": "Fjord", "hours": 9}, ("hours: 9 is greater than the maximum of 8",)),
        ({"room": "F"}, ("room: 'F' is too short",)),
        (
            {"room": "Fjord", "layout": "cabaret"},
            ("layout: 'cabaret' is not one of ['boardroom', 'theatre']",),
        ),
        (
            {"room": "Fjord", "floor": 3},
            ("Additional properties are not allowed ('floor' was unexpected)",),
        ),
        (
            {"hours": 0, "layout": 1},
            (
                "'room' is a required property",
                "hours: 0 is less than the minimum of 1",
                "layout: 1 is not of type 'string'",
                "layout: 1 is not one of ['boardroom', 'theatre']",
            ),
        ),
    ],
)
async def test_invalid_arguments_are_refused_before_the_tool_runs(
    arguments: dict[str, object], expected_errors: tuple[str, ...]
) -> None:
    with pytest.raises(InvalidToolArguments) as caught:
        await toolset(book_room).call("book_room", arguments, EMPLOYEE)

    assert runs == [], "the tool body must not run"
    assert sorted(caught.value.errors) == sorted(expected_errors)
    for error in expected_errors:
        assert error in caught.value.message, "the message alone lets a model correct the call"


class Span(BaseModel):
    start: int
    end: int

    @model_validator(mode="after")
    def ordered(self) -> Span:
        if self.end < self.start:
            raise ValueError("end must not come before start")
        return self


@tool
def span_length(span: Span) -> int:
    """Length of a span."""
    runs.append("span_length")
    return span.end - span.start


async def test_checks_the_json_schema_cannot_express_refuse_the_same_way() -> None:
    with pytest.raises(InvalidToolArguments) as caught:
        await toolset(span_length).call("span_length", {"span": {"start": 5, "end": 1}}, NOBODY)

    assert runs == []
    assert caught.value.errors == ("span: Value error, end must not come before start",)


async def test_unknown_tool() -> None:
    with pytest.raises(UnknownTool) as caught:
        await toolset(book_room).call("book_rooom", {}, EMPLOYEE)
    assert caught.value.message == "there is no tool named 'book_rooom'"


async def test_caller_without_any_required_role_is_refused() -> None:
    with pytest.raises(ToolPermissionDenied):
        await toolset(book_room).call("book_room", {"room": "Fjord"}, AGENT)
    assert runs == []


async def test_one_of_the_required_roles_is_enough() -> None:
    # wipe_laptop needs employee OR servicedesk.agent; both get past the role check.
    for caller in (EMPLOYEE, AGENT):
        with pytest.raises(ToolApprovalRequired):
            await toolset(wipe_laptop).call("wipe_laptop", {"serial": "X1"}, caller)
    with pytest.raises(ToolPermissionDenied):
        await toolset(wipe_laptop).call("wipe_laptop", {"serial": "X1"}, NOBODY)


async def test_high_risk_tool_never_runs_unapproved() -> None:
    with pytest.raises(ToolApprovalRequired) as caught:
        await toolset(wipe_laptop).call("wipe_laptop", {"serial": "X1"}, EMPLOYEE)

    assert runs == []
    assert "approval" in caught.value.message


async def test_high_risk_arguments_are_validated_before_asking_for_approval() -> None:
    with pytest.raises(InvalidToolArguments):
        await toolset(wipe_laptop).call("wipe_laptop", {}, EMPLOYEE)


async def test_mutating_a_listed_spec_does_not_loosen_validation() -> None:
    @tool
    def order_chairs(count: Annotated[int, Field(le=8)]) -> int:
        """Order chairs."""
        runs.append("order_chairs")
        return count

    tools = toolset(order_chairs)
    (spec,) = tools.list_tools(EMPLOYEE)
    spec.parameters["properties"]["count"]["maximum"] = 1000

    with pytest.raises(InvalidToolArguments) as caught:
        await tools.call("order_chairs", {"count": 9}, EMPLOYEE)
    assert caught.value.errors == ("count: 9 is greater than the maximum of 8",), (
        "refused by the policy's own copy of the schema"
    )
    assert runs == []


def test_list_tools_shows_only_what_the_caller_may_use() -> None:
    tools = toolset(public_time, book_room, wipe_laptop)

    assert listed(tools, NOBODY) == ["public_time"]
    assert listed(tools, EMPLOYEE) == ["public_time", "book_room", "wipe_laptop"]
    assert listed(tools, AGENT) == ["public_time", "wipe_laptop"]


# --- timeouts, failures, output ----------------------------------------------------


def test_listed_specs_carry_the_effective_timeout() -> None:
    @tool(timeout_s=2.5)
    def slow() -> None:
        """Slow."""

    tools = toolset(public_time, slow, settings=ToolsSettings(default_timeout_s=7))
    timeouts = {spec.name: spec.timeout_s for spec in tools.list_tools(NOBODY)}
    assert timeouts == {"public_time": 7, "slow": 2.5}


async def test_async_tool_past_its_timeout() -> None:
    @tool(timeout_s=0.05)
    async def hang() -> None:
        """Never finishes."""
        await asyncio.sleep(30)

    started = time.perf_counter()
    with pytest.raises(ToolTimeout) as caught:
        await toolset(hang).call("hang", {}, NOBODY)
    assert time.perf_counter() - started < 5
    assert caught.value.message == "the tool did not finish within 0.05 s"


async def test_sync_tool_past_its_timeout() -> None:
    @tool
    def block() -> None:
        """Blocks its thread."""
        time.sleep(0.3)

    with pytest.raises(ToolTimeout):
        await toolset(block, settings=ToolsSettings(default_timeout_s=0.05)).call(
            "block", {}, NOBODY
        )


async def test_tool_exception_becomes_a_safe_failure(caplog: pytest.LogCaptureFixture) -> None:
    @tool
    def leaky() -> None:
        """Fails with internals in the message."""
        raise RuntimeError("password=hunter2 at /srv/app/secret.py")

    with caplog.at_level(logging.ERROR), pytest.raises(ToolExecutionFailed) as caught:
        await toolset(leaky).call("leaky", {}, NOBODY)

    error = caught.value
    assert error.message == "the tool failed; the error has been logged"
    assert "hunter2" not in str(error)
    assert error.__cause__ is None
    assert error.__suppress_context__
    assert any("hunter2" in (record.exc_text or "") for record in caplog.records), (
        "the details are logged for operators"
    )


async def test_a_timeout_error_raised_by_the_tool_is_a_failure_not_a_timeout() -> None:
    @tool
    async def upstream_timeout() -> None:
        """Its backend timed out."""
        raise TimeoutError("upstream")

    with pytest.raises(ToolExecutionFailed):
        await toolset(upstream_timeout).call("upstream_timeout", {}, NOBODY)


async def test_a_tool_may_raise_its_own_tool_error_with_a_message_for_the_model() -> None:
    @tool
    def strict() -> None:
        """Refuses with an explanation."""
        raise ToolExecutionFailed("strict", "the room is booked until 14:00")

    with pytest.raises(ToolExecutionFailed) as caught:
        await toolset(strict).call("strict", {}, NOBODY)
    assert caught.value.message == "the room is booked until 14:00"


async def test_output_that_is_not_json_is_a_failure() -> None:
    @tool
    def nan() -> float:
        """Not a JSON number."""
        return float("nan")

    with pytest.raises(ToolExecutionFailed):
        await toolset(nan).call("nan", {}, NOBODY)


async def test_output_is_capped_and_flagged() -> None:
    @tool
    def big() -> dict[str, str]:
        """Big output."""
        return {"text": 'é"' * 500}

    settings = ToolsSettings(load_entry_points=False, max_output_chars=200)
    result = await toolset(big, settings=settings).call("big", {}, NOBODY)

    full = json.dumps({"text": 'é"' * 500}, ensure_ascii=False, separators=(",", ":"))
    assert result.output["truncated"] is True
    assert result.output["original_chars"] == len(full)
    assert full.startswith(result.output["content"])
    one_more = {**result.output, "content": full[: len(result.output["content"]) + 1]}
    assert len(json.dumps(one_more, ensure_ascii=False, separators=(",", ":"))) > 200, (
        "as much as fits is kept"
    )
    assert len(json.dumps(result.output, ensure_ascii=False, separators=(",", ":"))) <= 200


def test_output_within_the_cap_is_unchanged() -> None:
    output = {"a": [1, 2, 3]}
    assert cap_output(output, 100) is output
    assert cap_output("x" * 100, 102) == "x" * 100


# --- enabled filter and the builder ------------------------------------------------


def build(*extra: object, **settings: object) -> Toolset:
    return build_toolset(
        ToolsSettings.model_validate({"load_entry_points": False, **settings}), extra
    )


async def test_enabled_filter_hides_the_other_tools() -> None:
    tools = build(public_time, book_room, enabled=["book_room"])

    assert listed(tools, EMPLOYEE) == ["book_room"]
    with pytest.raises(UnknownTool) as caught:
        await tools.call("public_time", {}, EMPLOYEE)
    assert caught.value.message == "there is no tool named 'public_time'", "same as a missing tool"
    assert runs == []


async def test_filtered_toolset_still_applies_the_policy() -> None:
    tools = FilteredToolset(toolset(book_room, wipe_laptop), lambda name: True)
    with pytest.raises(ToolPermissionDenied):
        await tools.call("book_room", {"room": "Fjord"}, AGENT)


def test_enabled_names_that_match_nothing_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    build(public_time, enabled=["public_time", "pubic_time"])
    assert "pubic_time" in caplog.text


def test_build_toolset_without_enabled_shows_everything() -> None:
    assert listed(build(public_time, [book_room]), EMPLOYEE) == ["public_time", "book_room"]


def test_build_toolset_duplicate_extras_are_an_error() -> None:
    @tool(name="public_time")
    def clock() -> str:
        """Another clock."""
        return "noon"

    with pytest.raises(ValueError, match="already registered"):
        build(public_time, clock)


@pytest.mark.usefixtures("lamina_entry_points")
async def test_build_toolset_discovers_the_sample_plugin() -> None:
    tools = build_toolset(ToolsSettings())

    assert listed(tools, EMPLOYEE) == ["lookup_employee", "servicedesk-create_ticket"]
    assert listed(tools, NOBODY) == []
    found = await tools.call("lookup_employee", {"query": "megan"}, EMPLOYEE)
    assert [person["email"] for person in found.output] == ["megan.bowen@contoso.com"]
    with pytest.raises(ToolApprovalRequired):
        await tools.call(
            "servicedesk-create_ticket",
            {"title": "VPN down", "description": "Cannot connect since 9:00"},
            EMPLOYEE,
        )


@pytest.mark.usefixtures("lamina_entry_points")
def test_discovered_plugin_that_clashes_with_an_extra_is_skipped() -> None:
    @tool(name="lookup_employee")
    def my_lookup(query: str) -> list[str]:
        """A deployment's own directory lookup."""
        return []

    tools = build_toolset(ToolsSettings(), [my_lookup])
    assert listed(tools, EMPLOYEE) == ["lookup_employee"]
    (spec,) = tools.list_tools(EMPLOYEE)
    assert spec.description == "A deployment's own directory lookup."


async def test_a_risk_given_as_a_plain_string_is_still_refused_without_approval() -> None:
    from tools.contracts import ToolApprovalRequired, ToolSpec
    from tools.plugins import Tool
    from tools.policy import PolicyEnforcedToolset
    from tools.registry import ToolRegistry
    from tools.settings import ToolsSettings
    from tools.testing import StaticCaller

    ran: list[bool] = []

    @tool(risk="high")  # type: ignore[arg-type]
    def wipe() -> str:
        """Wipe production."""
        ran.append(True)
        return "wiped"

    assert wipe.spec.risk is RiskLevel.HIGH

    class HandMade(Tool):
        spec = ToolSpec("handmade", "x", {"type": "object"}, risk="high")  # type: ignore[arg-type]
        timeout_s = None

        async def invoke(self, arguments: object, caller: object) -> object:  # type: ignore[override]
            ran.append(True)
            return "ran"

    registry = ToolRegistry()
    registry.register(wipe)
    registry.register(HandMade())
    toolset = PolicyEnforcedToolset(registry, ToolsSettings())
    for name in ("wipe", "handmade"):
        with pytest.raises(ToolApprovalRequired):
            await toolset.call(name, {}, StaticCaller())
    assert ran == []


def test_roles_given_as_one_string_are_refused() -> None:
    with pytest.raises(ValueError, match="not a string"):

        @tool(roles="admin")
        def reset() -> str:
            """Reset."""
            return "x"
