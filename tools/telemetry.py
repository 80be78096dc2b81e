"""Spans and metrics of the tools layer, on the OpenTelemetry API.

Every call that reaches the execution policy, run or refused, is one
``execute_tool {tool}`` span and one count of ``lamina.tool.calls`` by tool and outcome.
A name that is not a registered tool is recorded as ``(unknown)``: the name comes from
a model or a client, and must not grow the metric's series or the span names without
bound. The arguments and the result reach the span only when the operator allows
content in spans.

The instruments are created at import, on the API's proxies: they bind to the SDK
providers once the composition root installs them.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from opentelemetry import metrics, trace
from opentelemetry.trace import Span, StatusCode
from opentelemetry.util.types import AttributeValue

from tools.contracts import (
    InvalidToolArguments,
    JsonValue,
    RiskLevel,
    ToolApprovalRequired,
    ToolPermissionDenied,
    ToolTimeout,
    UnknownTool,
)

tracer = trace.get_tracer("lamina.tools")
meter = metrics.get_meter("lamina.tools")

tool_calls = meter.create_counter(
    "lamina.tool.calls",
    unit="{call}",
    description="Tool calls through the execution policy, by tool and outcome",
)

UNKNOWN_TOOL = "(unknown)"
"""The tool name recorded for a call of a name no registered tool has."""

_OUTCOMES: tuple[tuple[type[BaseException], str], ...] = (
    (UnknownTool, "unknown_tool"),
    (ToolPermissionDenied, "forbidden"),
    (InvalidToolArguments, "invalid_arguments"),
    (ToolApprovalRequired, "needs_approval"),
    (ToolTimeout, "timeout"),
)
_NOT_FAILURES = frozenset({"ok", "needs_approval", "cancelled"})
"""Outcomes that are not errors: the call ran, waits for a person, or its caller left."""


def outcome_of(error: BaseException | None) -> str:
    """``lamina.tool.outcome``: ``ok``, ``unknown_tool``, ``forbidden``,
    ``invalid_arguments``, ``needs_approval``, ``timeout``, ``cancelled`` or ``error``."""
    if error is None:
        return "ok"
    for kind, outcome in _OUTCOMES:
        if isinstance(error, kind):
            return outcome
    return "error" if isinstance(error, Exception) else "cancelled"


@dataclass(frozen=True, slots=True)
class ToolExecution:
    """The span of one tool call, to be told what the tool returned."""

    span: Span
    capture_content: bool

    def returned(self, output: JsonValue) -> None:
        """What the tool gave back (on the span only when content may be captured)."""
        if self.capture_content:
            self.span.set_attribute("gen_ai.tool.call.result", _json(output))


@contextmanager
def executing(
    tool: str | None,
    *,
    risk: RiskLevel | None,
    tenant_id: str,
    arguments: Mapping[str, Any] | None = None,
    approval_id: str | None = None,
) -> Iterator[ToolExecution]:
    """An ``execute_tool`` span, current while the block runs, ended with the block's
    outcome (the error leaving it, or ``ok``), which is also counted. ``tool`` is None
    for a name no registered tool has; ``arguments`` only when content may be captured."""
    name = tool or UNKNOWN_TOOL
    attributes: dict[str, AttributeValue] = {
        "gen_ai.operation.name": "execute_tool",
        "gen_ai.tool.name": name,
        "lamina.tenant.id": tenant_id,
    }
    if risk is not None:
        # str(): a hand-made spec may carry the level as a plain string.
        attributes["lamina.tool.risk"] = str(risk)
    if approval_id is not None:
        attributes["lamina.tool.approval_id"] = approval_id
    if arguments is not None:
        attributes["gen_ai.tool.call.arguments"] = _json(arguments)
    with tracer.start_as_current_span(
        f"execute_tool {name}",
        attributes=attributes,
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        try:
            yield ToolExecution(span, capture_content=arguments is not None)
        except BaseException as exc:
            _ended(span, name, exc)
            raise
        _ended(span, name, None)


def _ended(span: Span, tool: str, error: BaseException | None) -> None:
    outcome = outcome_of(error)
    span.set_attribute("lamina.tool.outcome", outcome)
    if error is not None and outcome not in _NOT_FAILURES:
        span.set_attribute("error.type", type(error).__name__)
        span.set_status(StatusCode.ERROR, outcome)
    tool_calls.add(1, {"gen_ai.tool.name": tool, "lamina.tool.outcome": outcome})


def _json(value: JsonValue) -> str:
    return json.dumps(value, ensure_ascii=False, default=str)
