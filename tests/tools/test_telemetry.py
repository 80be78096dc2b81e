"""Each tool call through the execution policy is an ``execute_tool`` span and a count of
``lamina.tool.calls`` by tool and outcome: the real policy over real tools, the
session's in-memory telemetry capture."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from typing import Any
from uuid import uuid4

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import StatusCode

from tests.support.telemetry import InMemorySpanExporter, MetricsProbe, children, finished_spans
from tools.contracts import (
    InvalidToolArguments,
    RiskLevel,
    ToolApprovalRequired,
    ToolError,
    ToolExecutionFailed,
    ToolPermissionDenied,
    ToolTimeout,
    UnknownTool,
)
from tools.plugins import tool
from tools.policy import FilteredToolset, PolicyEnforcedToolset
from tools.registry import ToolRegistry
from tools.settings import ToolsSettings
from tools.telemetry import UNKNOWN_TOOL
from tools.testing import StaticCaller

SETTINGS = ToolsSettings(load_entry_points=False)
SECRET_SERIAL = "SN-4711-SECRET"

tracer = trace.get_tracer("tests")


@tool(roles={"employee"}, risk=RiskLevel.WRITE)
def book_room(room: str, hours: int = 1) -> dict[str, object]:
    """Book a meeting room."""
    return {"room": room, "hours": hours, "confirmation": "BK-1234"}


@tool(risk=RiskLevel.HIGH, roles={"employee"})
def wipe_laptop(serial: str) -> str:
    """Remotely wipe a laptop."""
    return f"wiped {serial}"


@tool(timeout_s=0.01)
async def slow_lookup() -> str:
    """Never answers in time."""
    await asyncio.sleep(5)
    return "late"


@tool
def broken() -> str:
    """Always fails."""
    raise RuntimeError("database password is hunter2")


def policy(*, capture_content: bool = False) -> PolicyEnforcedToolset:
    registry = ToolRegistry()
    for source in (book_room, wipe_laptop, slow_lookup, broken):
        registry.add(source)
    return PolicyEnforcedToolset(registry, SETTINGS, capture_content=capture_content)


@pytest.fixture
def employee() -> StaticCaller:
    """A caller of this test alone: metrics are cumulative for the session."""
    return StaticCaller(
        tenant_id=f"tenant-{uuid4().hex[:8]}", user_id=f"user-{uuid4().hex[:8]}", roles={"employee"}
    )


def only(name: str) -> ReadableSpan:
    found = finished_spans(name)
    assert len(found) == 1, [s.name for s in finished_spans()]
    return found[0]


def calls(metrics: MetricsProbe, tool: str, outcome: str) -> float:
    return metrics.amount(
        "lamina.tool.calls", **{"gen_ai.tool.name": tool, "lamina.tool.outcome": outcome}
    )


def values(span: ReadableSpan) -> str:
    return " ".join(str(v) for v in (span.attributes or {}).values())


async def test_a_call_is_an_execute_tool_span_under_the_callers(
    employee: StaticCaller, spans: InMemorySpanExporter, metrics: MetricsProbe
) -> None:
    with tracer.start_as_current_span("step"):
        await policy().call("book_room", {"room": "Fjord", "hours": 2}, employee)

    span = only("execute_tool book_room")
    assert children(only("step"), spans.get_finished_spans()) == [span]
    assert dict(span.attributes or {}) == {
        "gen_ai.operation.name": "execute_tool",
        "gen_ai.tool.name": "book_room",
        "lamina.tool.risk": "write",
        "lamina.tool.outcome": "ok",
        "lamina.tenant.id": employee.tenant_id,
    }
    assert span.status.status_code is StatusCode.UNSET
    assert "Fjord" not in values(span) and "BK-1234" not in values(span)
    assert calls(metrics, "book_room", "ok") == 1


async def test_arguments_and_result_reach_the_span_only_with_content_capture(
    employee: StaticCaller,
) -> None:
    await policy(capture_content=True).call("book_room", {"room": "Fjord"}, employee)

    attributes = only("execute_tool book_room").attributes or {}
    assert json.loads(str(attributes["gen_ai.tool.call.arguments"])) == {"room": "Fjord"}
    assert json.loads(str(attributes["gen_ai.tool.call.result"])) == {
        "room": "Fjord",
        "hours": 1,
        "confirmation": "BK-1234",
    }


@pytest.mark.parametrize(
    ("name", "arguments", "roles", "error", "outcome"),
    [
        ("book_room", {}, {"employee"}, InvalidToolArguments, "invalid_arguments"),
        ("book_room", {"room": "Fjord"}, {"guest"}, ToolPermissionDenied, "forbidden"),
        ("slow_lookup", {}, (), ToolTimeout, "timeout"),
        ("broken", {}, (), ToolExecutionFailed, "error"),
    ],
)
async def test_failures_are_errors_on_the_span_and_counted_by_outcome(
    metrics: MetricsProbe,
    name: str,
    arguments: Mapping[str, Any],
    roles: set[str],
    error: type[ToolError],
    outcome: str,
) -> None:
    caller = StaticCaller(tenant_id="contoso", user_id=f"user-{uuid4().hex[:8]}", roles=roles)

    with pytest.raises(error):
        await policy().call(name, arguments, caller)

    span = only(f"execute_tool {name}")
    attributes = span.attributes or {}
    assert attributes["lamina.tool.outcome"] == outcome
    assert attributes["error.type"] == error.__name__
    assert span.status.status_code is StatusCode.ERROR
    assert "hunter2" not in values(span) and span.events == ()
    assert calls(metrics, name, outcome) == 1
    for attribute_set in metrics.attribute_sets("lamina.tool.calls"):
        assert set(attribute_set) == {"gen_ai.tool.name", "lamina.tool.outcome"}
        assert caller.user_id not in attribute_set.values()


async def test_a_high_risk_call_waits_for_approval_then_runs_approved(
    employee: StaticCaller, metrics: MetricsProbe
) -> None:
    toolset = policy(capture_content=False)

    with pytest.raises(ToolApprovalRequired):
        await toolset.call("wipe_laptop", {"serial": SECRET_SERIAL}, employee)
    await toolset.call_approved(
        "wipe_laptop", {"serial": SECRET_SERIAL}, employee, approval_id="ap-1"
    )

    waiting, approved = finished_spans("execute_tool wipe_laptop")
    assert (waiting.attributes or {})["lamina.tool.outcome"] == "needs_approval"
    assert waiting.status.status_code is StatusCode.UNSET, "waiting for a person is no error"
    assert (approved.attributes or {})["lamina.tool.outcome"] == "ok"
    assert (approved.attributes or {})["lamina.tool.approval_id"] == "ap-1"
    assert (approved.attributes or {})["lamina.tool.risk"] == "high"
    assert SECRET_SERIAL not in values(waiting) + values(approved)
    assert calls(metrics, "wipe_laptop", "needs_approval") == 1
    assert calls(metrics, "wipe_laptop", "ok") == 1


async def test_names_no_tool_has_are_recorded_as_unknown_whoever_refuses_them(
    employee: StaticCaller, metrics: MetricsProbe
) -> None:
    made_up = f"tool_{uuid4().hex}"
    toolset = policy()
    hiding = FilteredToolset(toolset, lambda name: name != "broken")

    with pytest.raises(UnknownTool):
        await toolset.call(made_up, {}, employee)
    with pytest.raises(UnknownTool):
        await hiding.call("broken", {}, employee)

    unknown, hidden = finished_spans()
    assert unknown.name == f"execute_tool {UNKNOWN_TOOL}"
    assert made_up not in values(unknown)
    assert (unknown.attributes or {})["lamina.tool.outcome"] == "unknown_tool"
    assert hidden.name == "execute_tool broken", "a registered tool keeps its name"
    assert (hidden.attributes or {})["lamina.tool.outcome"] == "unknown_tool"
    assert calls(metrics, UNKNOWN_TOOL, "unknown_tool") == 1
    names = {a["gen_ai.tool.name"] for a in metrics.attribute_sets("lamina.tool.calls")}
    assert made_up not in names
