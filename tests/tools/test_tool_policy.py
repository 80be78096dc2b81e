"""The execution policy: every refusal happens before the tool runs; every failure is safe."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import pytest
from pydantic import BaseModel, Field, model_validator

from tools.audit import REDACTED, redact_arguments, redact_text
from tools.contracts import (
    InvalidToolArguments,
    JsonValue,
    RiskLevel,
    ToolApprovalRequired,
    ToolAuditRecord,
    ToolCaller,
    ToolExecutionFailed,
    ToolPermissionDenied,
    Toolset,
    ToolSpec,
    ToolTimeout,
    UnknownTool,
)
from tools.plugins import Tool, tool
from tools.policy import (
    FilteredToolset,
    PolicyEnforcedToolset,
    TenantEnabledToolset,
    build_tools,
    build_toolset,
    cap_output,
)
from tools.registry import ToolRegistry
from tools.settings import TenantToolSettings, ToolsSettings
from tools.testing import StaticCaller

EMPLOYEE = StaticCaller(roles={"employee"})
AGENT = StaticCaller(roles={"servicedesk.agent"})
NOBODY = StaticCaller(roles=())
SETTINGS = ToolsSettings(load_entry_points=False)

runs: list[str] = []
"""Names of the tools whose bodies ran; cleared before each test."""

NOON = datetime(2025, 6, 2, 12, 0, tzinfo=UTC)


@dataclass
class RecordingSink:
    """An audit sink keeping what it is given; ``fail`` makes it raise instead."""

    records: list[ToolAuditRecord] = field(default_factory=list)
    fail: bool = False

    async def record(self, entry: ToolAuditRecord) -> None:
        if self.fail:
            raise ConnectionError("audit store down")
        self.records.append(entry)


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


def toolset(
    *sources: object, settings: ToolsSettings = SETTINGS, audit: RecordingSink | None = None
) -> PolicyEnforcedToolset:
    registry = ToolRegistry()
    for source in sources:
        registry.add(source)
    return PolicyEnforcedToolset(registry, settings, audit=audit, clock=lambda: NOON)


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
    with pytest.raises(ToolPermissionDenied) as caught:
        await toolset(book_room).call("book_room", {"room": "Fjord"}, AGENT)
    assert runs == []
    assert caught.value.message == "you do not have a role that may use this tool"


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


# --- scopes and tenants ------------------------------------------------------------


class Restricted(Tool):
    """A tool whose spec names scopes or tenants (``@tool`` takes neither)."""

    def __init__(self, inner: Tool, **spec_changes: Any) -> None:
        self._inner = inner
        self.spec = replace(inner.spec, **spec_changes)
        self.timeout_s = inner.timeout_s

    async def invoke(self, arguments: Mapping[str, Any], caller: ToolCaller) -> JsonValue:
        return await self._inner.invoke(arguments, caller)


@tool
def read_file(path: str) -> str:
    """Read a file of the caller's OneDrive."""
    runs.append("read_file")
    return path


FILES = Restricted(read_file, required_scopes=frozenset({"Files.Read", "Files.ReadWrite"}))
SIGNED_IN = StaticCaller(roles={"employee"}, scopes={"User.Read", "Files.Read"})
API_KEY = StaticCaller(roles={"employee"})
"""API keys and app tokens carry no delegated scopes."""
FABRIKAM = StaticCaller("fabrikam", roles={"employee"})
NORTHWIND = StaticCaller("northwind", roles={"employee"})


async def test_a_tool_with_scopes_needs_one_of_them() -> None:
    tools = toolset(FILES)

    result = await tools.call("read_file", {"path": "plan.docx"}, SIGNED_IN)
    with pytest.raises(ToolPermissionDenied) as caught:
        await tools.call("read_file", {"path": "plan.docx"}, API_KEY)

    assert result.output == "plan.docx"
    assert runs == ["read_file"]
    assert (
        caught.value.message == "your sign-in does not grant a permission (scope) this tool needs"
    )
    assert listed(tools, SIGNED_IN) == ["read_file"]
    assert listed(tools, API_KEY) == []


async def test_a_caller_missing_both_role_and_scope_is_told_both() -> None:
    tools = toolset(
        Restricted(
            read_file, required_roles=frozenset({"hr"}), required_scopes=frozenset({"Files.Read"})
        )
    )

    with pytest.raises(ToolPermissionDenied) as caught:
        await tools.call("read_file", {"path": "a"}, API_KEY)

    assert caught.value.message == (
        "you do not have a role that may use this tool, and your sign-in does not"
        " grant a permission (scope) it needs"
    )
    assert "hr" not in caught.value.message
    assert "Files" not in caught.value.message


async def test_a_tool_of_other_tenants_is_unknown_exactly_like_a_missing_one() -> None:
    fabrikam_only = Restricted(book_room, tenants=frozenset({"fabrikam"}))
    tools = toolset(fabrikam_only)

    with pytest.raises(UnknownTool) as hidden:
        await tools.call("book_room", {"room": "Fjord"}, EMPLOYEE)
    with pytest.raises(UnknownTool) as hidden_from_a_caller_without_the_role:
        await tools.call("book_room", {"room": "Fjord"}, NOBODY)
    with pytest.raises(UnknownTool) as missing:
        await tools.call("book_rooms", {"room": "Fjord"}, EMPLOYEE)
    with pytest.raises(UnknownTool):
        tools.check("book_room", {"room": "Fjord"}, EMPLOYEE, authorize=False)

    assert hidden.value.message == "there is no tool named 'book_room'"
    assert hidden_from_a_caller_without_the_role.value.message == hidden.value.message
    assert missing.value.message == "there is no tool named 'book_rooms'"
    assert listed(tools, EMPLOYEE) == []
    assert runs == []
    assert listed(tools, FABRIKAM) == ["book_room"]
    assert (await tools.call("book_room", {"room": "Fjord"}, FABRIKAM)).output["room"] == "Fjord"


def test_check_without_authorization_skips_only_roles_and_scopes() -> None:
    tools = toolset(book_room, FILES)

    assert tools.check("book_room", {"room": "Fjord"}, NOBODY, authorize=False).name == "book_room"
    assert tools.check("read_file", {"path": "a"}, API_KEY, authorize=False).name == "read_file"
    with pytest.raises(InvalidToolArguments):
        tools.check("book_room", {"room": "F"}, NOBODY, authorize=False)
    with pytest.raises(ToolPermissionDenied):
        tools.check("book_room", {"room": "Fjord"}, NOBODY)
    assert runs == []


# --- per-tenant enablement ---------------------------------------------------------

TENANTS = {
    "contoso": TenantToolSettings(enabled=["public_time", "book_room"], disabled=["book_room"]),
    "fabrikam": TenantToolSettings(disabled=["public_time"]),
}


def test_each_tenant_sees_the_tools_its_settings_enable() -> None:
    tools = TenantEnabledToolset(toolset(public_time, book_room, wipe_laptop), TENANTS)

    assert listed(tools, EMPLOYEE) == ["public_time"], "enabled, less disabled"
    assert listed(tools, FABRIKAM) == ["book_room", "wipe_laptop"]
    assert listed(tools, NORTHWIND) == ["public_time", "book_room", "wipe_laptop"], "no settings"


async def test_a_tool_disabled_for_the_tenant_is_unknown_to_every_entry_point() -> None:
    tools = TenantEnabledToolset(toolset(public_time, book_room, wipe_laptop), TENANTS)

    with pytest.raises(UnknownTool) as on_call:
        await tools.call("book_room", {"room": "Fjord"}, EMPLOYEE)
    with pytest.raises(UnknownTool) as on_check:
        tools.check("wipe_laptop", {"serial": "X1"}, EMPLOYEE)
    with pytest.raises(UnknownTool) as on_approved_run:
        await tools.call_approved("wipe_laptop", {"serial": "X1"}, EMPLOYEE, approval_id="apr_1")

    assert on_call.value.message == "there is no tool named 'book_room'"
    assert on_check.value.message == on_approved_run.value.message
    assert on_check.value.message == "there is no tool named 'wipe_laptop'"
    assert runs == []
    await tools.call_approved("wipe_laptop", {"serial": "X1"}, FABRIKAM)
    assert runs == ["wipe_laptop"]


async def test_tenant_enablement_still_applies_the_policy() -> None:
    tools = TenantEnabledToolset(toolset(book_room), TENANTS)
    fabrikam_agent = StaticCaller("fabrikam", roles={"servicedesk.agent"})

    with pytest.raises(ToolPermissionDenied):
        await tools.call("book_room", {"room": "Fjord"}, fabrikam_agent)


def test_build_tools_layers_policy_tenants_and_the_enabled_filter() -> None:
    settings = ToolsSettings(
        load_entry_points=False,
        enabled=["public_time", "book_room"],
        tenants={"contoso": TenantToolSettings(disabled=["book_room"])},
    )
    built = build_tools(settings, [public_time, book_room, wipe_laptop])

    assert listed(built.toolset, EMPLOYEE) == ["public_time"]
    assert listed(built.toolset, FABRIKAM) == ["public_time", "book_room"]
    assert [spec.name for spec in built.specs] == ["public_time", "book_room", "wipe_laptop"]
    assert built.approvals is None, "no store, no gate: high-risk tools cannot run"
    assert built.load_errors == ()


def test_tenant_settings_naming_unknown_tools_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    build_tools(
        ToolsSettings(
            load_entry_points=False,
            tenants={"contoso": TenantToolSettings(enabled=["public_tiem"], disabled=["wipe"])},
        ),
        [public_time],
    )
    assert "LAMINA_TOOLS__TENANTS['contoso'] names tools that are not registered" in caplog.text
    assert "public_tiem, wipe" in caplog.text


# --- audit -------------------------------------------------------------------------


async def test_every_call_is_audited_with_its_outcome() -> None:
    sink = RecordingSink()
    tools = toolset(book_room, wipe_laptop, audit=sink)

    await tools.call("book_room", {"room": "Fjord", "hours": 2}, EMPLOYEE)
    refused: list[tuple[str, dict[str, object], StaticCaller, type[Exception]]] = [
        ("book_room", {"room": "F"}, EMPLOYEE, InvalidToolArguments),
        ("book_room", {"room": "Fjord"}, AGENT, ToolPermissionDenied),
        ("no_such_tool", {}, EMPLOYEE, UnknownTool),
        ("wipe_laptop", {"serial": "X1"}, EMPLOYEE, ToolApprovalRequired),
    ]
    for name, arguments, caller, error in refused:
        with pytest.raises(error):
            await tools.call(name, arguments, caller)

    assert [(record.tool, record.outcome) for record in sink.records] == [
        ("book_room", "ok"),
        ("book_room", "InvalidToolArguments"),
        ("book_room", "ToolPermissionDenied"),
        ("no_such_tool", "UnknownTool"),
        ("wipe_laptop", "ToolApprovalRequired"),
    ]
    first = sink.records[0]
    assert first.event == "tool.call"
    assert (first.tenant_id, first.user_id) == ("contoso", "test-user")
    assert first.arguments == {"room": "Fjord", "hours": 2}
    assert first.duration_ms is not None
    assert first.duration_ms >= 0
    assert first.approval_id is None
    assert first.at == NOON


async def test_calls_to_hidden_tools_are_audited_like_unknown_ones() -> None:
    sink = RecordingSink()
    settings = ToolsSettings(
        load_entry_points=False,
        enabled=["public_time", "wipe_laptop"],
        tenants={"contoso": TenantToolSettings(disabled=["wipe_laptop"])},
    )
    tools = build_tools(settings, [public_time, book_room, wipe_laptop], audit=sink).toolset

    with pytest.raises(UnknownTool):
        await tools.call("book_room", {"room": "Fjord", "password": "x"}, EMPLOYEE)
    with pytest.raises(UnknownTool):
        await tools.call("wipe_laptop", {"serial": "X1"}, EMPLOYEE)
    with pytest.raises(UnknownTool):
        await tools.call_approved("wipe_laptop", {"serial": "X1"}, EMPLOYEE, approval_id="apr_2")

    assert [(r.tool, r.outcome, r.approval_id) for r in sink.records] == [
        ("book_room", "UnknownTool", None),
        ("wipe_laptop", "UnknownTool", None),
        ("wipe_laptop", "UnknownTool", "apr_2"),
    ]
    assert sink.records[0].arguments == {"room": "Fjord", "password": REDACTED}
    assert runs == []


async def test_audited_arguments_are_redacted_and_the_tool_gets_them_whole() -> None:
    received: list[dict[str, object]] = []

    @tool
    def connect(host: str, password: str, headers: dict[str, str]) -> str:
        """Connect to a host."""
        received.append({"password": password, "headers": headers})
        return "connected"

    sink = RecordingSink()
    arguments = {
        "host": "db.contoso.com",
        "password": "hunter2",
        "headers": {"Authorization": "Bearer abcdefghijklmnop1234", "Accept": "text/plain"},
    }
    await toolset(connect, audit=sink).call("connect", arguments, NOBODY)

    (record,) = sink.records
    assert record.arguments == {
        "host": "db.contoso.com",
        "password": REDACTED,
        "headers": {"Authorization": REDACTED, "Accept": "text/plain"},
    }
    assert received == [{"password": "hunter2", "headers": arguments["headers"]}]


async def test_a_cancelled_call_is_audited_as_cancelled() -> None:
    started = asyncio.Event()

    @tool
    async def wait_forever() -> None:
        """Waits."""
        started.set()
        await asyncio.sleep(30)

    sink = RecordingSink()
    task = asyncio.create_task(toolset(wait_forever, audit=sink).call("wait_forever", {}, NOBODY))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    assert [record.outcome for record in sink.records] == ["cancelled"]


async def test_a_failing_audit_sink_never_fails_the_call(caplog: pytest.LogCaptureFixture) -> None:
    result = await toolset(public_time, audit=RecordingSink(fail=True)).call(
        "public_time", {}, NOBODY
    )

    assert result.output == "12:00"
    assert "tool audit sink failed to record tool.call of public_time" in caplog.text


async def test_the_audit_log_line_is_written_with_or_without_a_sink(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.INFO, logger="tools.audit"):
        await toolset(public_time).call("public_time", {}, NOBODY)
        await toolset(public_time, audit=RecordingSink()).call("public_time", {}, NOBODY)

    lines = [r.getMessage() for r in caplog.records if r.name == "tools.audit"]
    assert len(lines) == 2
    assert all(
        line.startswith("tool call public_time by contoso/test-user: ok in ") for line in lines
    )


async def test_an_approved_run_is_audited_with_its_approval() -> None:
    sink = RecordingSink()

    await toolset(wipe_laptop, audit=sink).call_approved(
        "wipe_laptop", {"serial": "X1"}, EMPLOYEE, approval_id="apr_1"
    )

    (record,) = sink.records
    assert (record.outcome, record.approval_id) == ("ok", "apr_1")
    assert runs == ["wipe_laptop"]


# --- redaction ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "key",
    [
        "password",
        "Password",
        "db_passwd",
        "client_secret",
        "clientSecret",
        "apiKey",
        "X-API-Key",
        "authorization",
        "access_token",
        "refreshToken",
        "private_key",
        "connection_string",
        "Cookie",
        "aws_secret_access_key",
        "credentials",
        "pin",
        "auth",
    ],
)
def test_values_under_secret_keys_are_redacted(key: str) -> None:
    assert redact_arguments({key: "hunter2", "room": "Fjord"}) == {key: REDACTED, "room": "Fjord"}


@pytest.mark.parametrize(
    "key", ["max_tokens", "token_count", "author", "secretary", "description", "passage", "key"]
)
def test_ordinary_keys_keep_their_values(key: str) -> None:
    assert redact_arguments({key: "hunter2"}) == {key: "hunter2"}


def test_secrets_are_redacted_at_any_depth() -> None:
    arguments = {
        "connection": {"host": "db", "credentials": {"user": "sa", "password": "x"}},
        "headers": [
            {"name": "Authorization", "value": "Bearer abcdefghijklmnop1234"},
            {"Cookie": "session=abc"},
        ],
        "password": None,
        "count": 3,
        "ratio": 0.5,
        "dry_run": True,
        "tags": ("a", "b"),
    }

    assert redact_arguments(arguments) == {
        "connection": {"host": "db", "credentials": REDACTED},
        "headers": [{"name": "Authorization", "value": REDACTED}, {"Cookie": REDACTED}],
        "password": None,
        "count": 3,
        "ratio": 0.5,
        "dry_run": True,
        "tags": ["a", "b"],
    }


@pytest.mark.parametrize(
    "secret",
    [
        "eyJhbGciOiJSUzI1NiIsImtpZCI6ImsxIn0.eyJzdWIiOiJhZGVsZSIsInRpZCI6ImMifQ.c2lnbmF0dXJl",
        "Bearer 0a1b2c3d4e5f6a7b8c9d",
        "bearer abc.DEF-ghi_jkl123",
        "lam_abcdefghijkl_0123456789abcdefghijklmnopqrstuvwxyzABCDEFG",
        "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA\n-----END RSA PRIVATE KEY-----",
        "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC",
        "AKIAIOSFODNN7EXAMPLE",
        "ghp_0123456789abcdefghijklmnopqrstuvwxyz",
        "sk-proj-abcdefghijklmnopqrstuvwxyz012345",
        "xoxb-1234567890-abcdefghij",
        "Zx8Qm2LpR7vN4kTb9WcY3hJd6FsA1gE5uK0oP",
        "dGhpcyBpcyBhIHRlc3Qgb2YgYmFzZTY0IGVuY29kaW5nIQ==",
    ],
)
def test_values_that_look_like_secrets_are_redacted_whatever_the_key(secret: str) -> None:
    assert redact_arguments({"note": secret, "list": [secret]}) == {
        "note": REDACTED,
        "list": [REDACTED],
    }


@pytest.mark.parametrize(
    ("text", "redacted"),
    [
        (
            "Server=db;User Id=sa;Password=hunter2;Encrypt=true",
            "Server=db;User Id=sa;Password=[redacted];Encrypt=true",
        ),
        (
            "DefaultEndpointsProtocol=https;AccountName=x;AccountKey=abc+def/ghi==;",
            "DefaultEndpointsProtocol=https;AccountName=x;AccountKey=[redacted];",
        ),
        ("postgres://admin:s3cr3t@db:5432/app", "postgres://admin:[redacted]@db:5432/app"),
        (
            "https://x.blob.core.windows.net/c?sv=1&sig=AbC%2Bd",
            "https://x.blob.core.windows.net/c?sv=1&sig=[redacted]",
        ),
        ("send it with Bearer 0a1b2c3d4e5f6a7b8c9d please", "send it with [redacted] please"),
    ],
)
def test_only_the_secret_part_of_a_longer_value_is_replaced(text: str, redacted: str) -> None:
    assert redact_text(text) == redacted


@pytest.mark.parametrize(
    "text",
    [
        "Please book the boardroom for Tuesday at 10:00 with coffee for 12.",
        "the bearer of this letter",
        "megan.bowen@contoso.com",
        "2025-06-02T12:00:00+00:00",
        "550e8400-e29b-41d4-a716-446655440000",
        "3f2a9c0b8e7d4c1a9b2f3e4d5c6b7a89",
        "da39a3ee5e6b4b0d3255bfef95601890afd80709",
        "apr_3f2a9c0b8e7d4c1a9b2f3e4d5c6b7a89",
        "/Users/JohnSmith/Documents/Q3Report2024/FinalVersion.docx",
        "https://contoso.sharepoint.com/sites/HR/Shared%20Documents/Policies2024/Leave.docx",
        "ProjectFalconBudgetReviewQ3FY2024Summary",
        "HTTPServerErrorCode500InternalServerError",
        "INC0012345_ThinkPadX1Carbon_Gen11_PF3ABCD1",
        "SKU-XPS13-9340-i7-32GB-1TB-Platinum",
        "AzureOpenAI-gpt4o-2024-08-06-Deployment",
        "Zürich — «urgent» ✓",
    ],
)
def test_ordinary_text_is_kept(text: str) -> None:
    assert redact_text(text) == text


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
