"""The execution policy: the only way a tool runs.

Cross-cutting behaviour is a wrapper around a toolset, not a flag threaded
through it. :class:`PolicyEnforcedToolset` takes the raw tools from a sealed
:class:`~tools.registry.ToolRegistry` and, for every call, in this order:

1. refuses an unknown tool (:class:`~tools.contracts.UnknownTool`), and a tool
   limited to other tenants (``ToolSpec.tenants``) exactly the same way;
2. refuses a caller with none of the tool's roles, or none of its delegated
   scopes (``ToolPermissionDenied``, saying which is missing);
3. validates the arguments against the tool's JSON schema, before the tool
   runs (``InvalidToolArguments``, with errors a model can correct);
4. refuses a ``HIGH`` risk tool (``ToolApprovalRequired``): it runs only through
   :meth:`PolicyEnforcedToolset.call_approved`, which the approval gate
   (:mod:`tools.approvals`) calls once per approval a person gave;
5. runs the tool under its timeout (``ToolTimeout``);
6. turns any failure into ``ToolExecutionFailed`` with a safe message (the
   details go to the log, never to the caller);
7. caps the output at ``max_output_chars`` of JSON;
8. audits the call, whatever its outcome: a line on the ``tools.audit`` logger
   and, given a sink, a :class:`~tools.contracts.ToolAuditRecord` with the
   arguments redacted (:func:`tools.audit.redact_arguments`);
9. traces and counts the call, whatever its outcome: an ``execute_tool`` span and
   ``lamina.tool.calls`` (:mod:`tools.telemetry`).

:class:`TenantEnabledToolset` hides tools per tenant (``ToolsSettings.tenants``),
:class:`FilteredToolset` by name (``ToolsSettings.enabled``); a hidden tool is an
unknown tool. :func:`build_tools` composes registry, discovery, policy, the two
filters and the approval gate (:mod:`tools.approvals`), which sees exactly the
tools the toolset shows.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, NoReturn, Protocol

from jsonschema.protocols import Validator
from jsonschema.validators import Draft202012Validator, validator_for

from tools.approvals.gate import HumanApprovalGate
from tools.approvals.store import ApprovalStore
from tools.audit import record_safely, redact_arguments, utc_now
from tools.contracts import (
    ApprovalGate,
    InvalidToolArguments,
    JsonValue,
    RiskLevel,
    ToolApprovalRequired,
    ToolAuditRecord,
    ToolAuditSink,
    ToolCaller,
    ToolError,
    ToolExecutionFailed,
    ToolPermissionDenied,
    ToolResult,
    Toolset,
    ToolSpec,
    ToolTimeout,
    UnknownTool,
)
from tools.plugins import Tool
from tools.registry import PluginLoadError, ToolRegistry
from tools.settings import TenantToolSettings, ToolsSettings
from tools.telemetry import ToolExecution, executing

logger = logging.getLogger(__name__)
audit_logger = logging.getLogger("tools.audit")

_MAX_REPORTED_ERRORS = 10
_MAX_ERROR_CHARS = 300


def _unknown_tool(name: str) -> UnknownTool:
    return UnknownTool(name, f"there is no tool named {name!r}")


def visible_to(spec: ToolSpec, caller: ToolCaller) -> bool:
    """Whether the tool exists for ``caller``'s tenant (``ToolSpec.tenants`` empty or naming it)."""
    return not spec.tenants or caller.tenant_id in spec.tenants


def has_role(spec: ToolSpec, caller: ToolCaller) -> bool:
    """Whether ``caller`` holds at least one of the tool's roles (or the tool needs none)."""
    return not spec.required_roles or not spec.required_roles.isdisjoint(caller.roles)


def has_scope(spec: ToolSpec, caller: ToolCaller) -> bool:
    """Whether ``caller``'s token grants at least one of the tool's delegated scopes
    (or the tool needs none)."""
    return not spec.required_scopes or not spec.required_scopes.isdisjoint(caller.scopes)


def may_use(spec: ToolSpec, caller: ToolCaller) -> bool:
    """Whether ``caller`` sees the tool and may call it: its tenant, a role, a scope."""
    return visible_to(spec, caller) and has_role(spec, caller) and has_scope(spec, caller)


def _permission_denied(spec: ToolSpec, caller: ToolCaller) -> ToolPermissionDenied | None:
    # Says what is missing, never which roles or scopes would do: the caller learns
    # what to ask an administrator for, not how the deployment is set up.
    role, scope = has_role(spec, caller), has_scope(spec, caller)
    if role and scope:
        return None
    if not role and not scope:
        message = (
            "you do not have a role that may use this tool, and your sign-in does not"
            " grant a permission (scope) it needs"
        )
    elif not role:
        message = "you do not have a role that may use this tool"
    else:
        message = "your sign-in does not grant a permission (scope) this tool needs"
    return ToolPermissionDenied(spec.name, message)


def schema_errors(validator: Validator, arguments: Any) -> tuple[str, ...]:
    """Why ``arguments`` do not fit the schema, one short line per problem, in a stable order."""
    errors = sorted(validator.iter_errors(arguments), key=lambda e: [str(p) for p in e.path])
    lines: list[str] = []
    for error in errors[:_MAX_REPORTED_ERRORS]:
        path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.path)
        message = error.message
        if len(message) > _MAX_ERROR_CHARS:
            message = message[: _MAX_ERROR_CHARS - 1] + "…"
        lines.append(f"{path.lstrip('.')}: {message}" if path else message)
    if len(errors) > _MAX_REPORTED_ERRORS:
        lines.append(f"… and {len(errors) - _MAX_REPORTED_ERRORS} more")
    return tuple(lines)


def cap_output(output: JsonValue, max_chars: int) -> JsonValue:
    """``output`` itself if its compact JSON fits in ``max_chars``, else a flagged prefix.

    The replacement, ``{"truncated": true, "original_chars": n, "content": "<JSON prefix>"}``,
    itself serialises within ``max_chars``, and tells a model the answer is partial.
    """
    text = json.dumps(output, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    if len(text) <= max_chars:
        return output

    def capped(keep: int) -> dict[str, JsonValue]:
        return {"truncated": True, "original_chars": len(text), "content": text[:keep]}

    def fits(keep: int) -> bool:
        serialised = json.dumps(capped(keep), ensure_ascii=False, separators=(",", ":"))
        return len(serialised) <= max_chars

    # Escaping makes the serialised size grow unevenly with the prefix, so
    # search for the longest prefix that fits.
    low, high = 0, max_chars
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if fits(middle) else (low, middle - 1)
    return capped(low)


@dataclass(frozen=True, slots=True)
class _GuardedTool:
    tool: Tool
    spec: ToolSpec
    """The spec callers see, with the effective timeout."""
    validator: Validator


class GuardedToolset(Toolset, Protocol):
    """A toolset behind the execution policy, with the two entry points the approval
    gate drives: the checks alone, and the run of an approved high-risk call.

    :class:`PolicyEnforcedToolset` and the wrappers around it implement it; a wrapper
    applies its own visibility to both, so the gate sees what callers see.
    """

    def check(
        self,
        name: str,
        arguments: Mapping[str, Any],
        caller: ToolCaller,
        *,
        authorize: bool = True,
    ) -> ToolSpec:
        """The spec if ``caller`` may call ``name`` with ``arguments``, else the
        ``ToolError`` a call would raise. ``authorize=False`` skips the caller's roles
        and scopes, keeping the tenant's visibility and the schema check."""
        ...

    async def call_approved(
        self,
        name: str,
        arguments: Mapping[str, Any],
        caller: ToolCaller,
        *,
        approval_id: str | None = None,
    ) -> ToolResult:
        """Run a high-risk call a person approved, through every other check."""
        ...

    async def refuse(
        self,
        name: str,
        arguments: Mapping[str, Any],
        caller: ToolCaller,
        error: ToolError,
        *,
        approval_id: str | None = None,
    ) -> NoReturn:
        """Audit a call that a wrapper refused before it reached the policy (a tool
        hidden from the caller), then raise ``error``: every call attempt is audited."""
        ...


class PolicyEnforcedToolset:
    """The tools of a registry behind the execution policy (see the module docstring).

    Building it seals the registry: this object is then the only holder of the
    runnable tools.

    Args:
        registry: the tools; sealed here.
        settings: timeouts and the output cap.
        audit: where every call's :class:`~tools.contracts.ToolAuditRecord` goes; a
            failing sink is logged and never fails the call.
        clock: the time stamped on audit records.
        capture_content: put each call's arguments and result in its span
            (``LAMINA_TELEMETRY__CAPTURE_CONTENT``); off, spans carry neither.
    """

    def __init__(
        self,
        registry: ToolRegistry,
        settings: ToolsSettings,
        *,
        audit: ToolAuditSink | None = None,
        clock: Callable[[], datetime] = utc_now,
        capture_content: bool = False,
    ) -> None:
        self._max_output_chars = settings.max_output_chars
        self._audit_sink = audit
        self._clock = clock
        self._capture_content = capture_content
        self._tools: dict[str, _GuardedTool] = {}
        for name, tool in registry.seal().items():
            timeout_s = settings.default_timeout_s if tool.timeout_s is None else tool.timeout_s
            # The validator keeps its own copy: specs are handed out, and a caller
            # mutating one must not loosen the check.
            schema = copy.deepcopy(dict(tool.spec.parameters))
            validator_class = validator_for(schema, default=Draft202012Validator)
            self._tools[name] = _GuardedTool(
                tool=tool,
                spec=replace(tool.spec, timeout_s=timeout_s),
                validator=validator_class(schema, format_checker=validator_class.FORMAT_CHECKER),
            )

    def specs(self) -> list[ToolSpec]:
        """Every tool's spec, with its effective timeout, whoever may use it (for
        operators: ``lamina tools list``)."""
        return [guarded.spec for guarded in self._tools.values()]

    def list_tools(self, caller: ToolCaller) -> Sequence[ToolSpec]:
        return [guarded.spec for guarded in self._tools.values() if may_use(guarded.spec, caller)]

    async def call(self, name: str, arguments: Mapping[str, Any], caller: ToolCaller) -> ToolResult:
        return await self._audited_call(name, arguments, caller, approved=False, approval_id=None)

    def check(
        self,
        name: str,
        arguments: Mapping[str, Any],
        caller: ToolCaller,
        *,
        authorize: bool = True,
    ) -> ToolSpec:
        """Everything :meth:`call` checks before running, without running: the spec if the
        caller may call ``name`` with ``arguments``, else the ``ToolError`` a call would raise.
        The approval gate asks this before it asks a person.

        ``authorize=False`` skips the caller's roles and scopes (not the tenant's
        visibility, nor the schema): for a decider editing someone else's call, whose
        own roles do not matter; the requester's are checked when the call runs."""
        guarded, _ = self._admit(name, arguments, caller, authorize=authorize)
        return guarded.spec

    async def call_approved(
        self,
        name: str,
        arguments: Mapping[str, Any],
        caller: ToolCaller,
        *,
        approval_id: str | None = None,
    ) -> ToolResult:
        """Run a high-risk tool whose call a person approved. For the approval gate only,
        which calls it once per approval it has claimed; every other check still applies.
        ``approval_id`` goes into the call's audit record."""
        return await self._audited_call(
            name, arguments, caller, approved=True, approval_id=approval_id
        )

    async def refuse(
        self,
        name: str,
        arguments: Mapping[str, Any],
        caller: ToolCaller,
        error: ToolError,
        *,
        approval_id: str | None = None,
    ) -> NoReturn:
        """Audit a call a wrapper refused before it got here, then raise ``error``."""
        with self._execution(name, arguments, caller, approval_id):
            await self._audit(
                name, arguments, caller, type(error).__name__, time.perf_counter(), approval_id
            )
            raise error

    def _execution(
        self,
        name: str,
        arguments: Mapping[str, Any],
        caller: ToolCaller,
        approval_id: str | None,
    ) -> AbstractContextManager[ToolExecution]:
        guarded = self._tools.get(name)
        return executing(
            name if guarded is not None else None,
            risk=guarded.spec.risk if guarded is not None else None,
            tenant_id=caller.tenant_id,
            arguments=arguments if self._capture_content else None,
            approval_id=approval_id,
        )

    async def _audited_call(
        self,
        name: str,
        arguments: Mapping[str, Any],
        caller: ToolCaller,
        *,
        approved: bool,
        approval_id: str | None,
    ) -> ToolResult:
        started = time.perf_counter()
        with self._execution(name, arguments, caller, approval_id) as execution:
            try:
                output = await self._checked_call(name, arguments, caller, approved=approved)
            except ToolError as exc:
                await self._audit(name, arguments, caller, type(exc).__name__, started, approval_id)
                raise
            except asyncio.CancelledError:
                await self._audit(name, arguments, caller, "cancelled", started, approval_id)
                raise
            await self._audit(name, arguments, caller, "ok", started, approval_id)
            execution.returned(output)
            return ToolResult(tool=name, output=output)

    def _admit(
        self,
        name: str,
        arguments: Mapping[str, Any],
        caller: ToolCaller,
        *,
        authorize: bool = True,
    ) -> tuple[_GuardedTool, Any]:
        guarded = self._tools.get(name)
        # A tool of other tenants is reported exactly like a missing one: its
        # existence is their business.
        if guarded is None or not visible_to(guarded.spec, caller):
            raise _unknown_tool(name)
        spec = guarded.spec
        denied = _permission_denied(spec, caller) if authorize else None
        if denied is not None:
            raise denied
        # A copy: the tool runs with exactly the arguments that were checked.
        checked: Any = dict(arguments) if isinstance(arguments, Mapping) else arguments
        errors = schema_errors(guarded.validator, checked)
        if errors:
            raise InvalidToolArguments(
                name, "the arguments do not match the tool's schema: " + "; ".join(errors), errors
            )
        return guarded, checked

    async def _checked_call(
        self, name: str, arguments: Mapping[str, Any], caller: ToolCaller, *, approved: bool
    ) -> JsonValue:
        guarded, checked = self._admit(name, arguments, caller)
        spec = guarded.spec
        # Fail closed: anything not plainly read or write needs a person's approval.
        if spec.risk not in (RiskLevel.READ, RiskLevel.WRITE) and not approved:
            raise ToolApprovalRequired(
                name, "this action needs a person's approval before it runs; it was not run"
            )

        deadline = asyncio.timeout(spec.timeout_s)
        try:
            async with deadline:
                output = await guarded.tool.invoke(checked, caller)
            return cap_output(output, self._max_output_chars)
        except ToolError:
            raise  # a tool's own ToolError carries a message meant for the caller
        except Exception:
            # asyncio.timeout rather than wait_for: it tells our deadline apart
            # from a TimeoutError the tool itself raised.
            if deadline.expired():
                raise ToolTimeout(
                    name, f"the tool did not finish within {spec.timeout_s:g} s"
                ) from None
            logger.exception("tool %r failed", name)
            raise ToolExecutionFailed(name, "the tool failed; the error has been logged") from None

    async def _audit(
        self,
        name: str,
        arguments: Mapping[str, Any],
        caller: ToolCaller,
        outcome: str,
        started: float,
        approval_id: str | None,
    ) -> None:
        duration_ms = (time.perf_counter() - started) * 1000
        audit_logger.info(
            "tool call %s by %s/%s: %s in %.0f ms",
            name,
            caller.tenant_id,
            caller.user_id,
            outcome,
            duration_ms,
        )
        if self._audit_sink is None:
            return
        entry = ToolAuditRecord(
            event="tool.call",
            tool=name,
            tenant_id=caller.tenant_id,
            user_id=caller.user_id,
            outcome=outcome,
            arguments=redact_arguments(arguments) if isinstance(arguments, Mapping) else {},
            duration_ms=duration_ms,
            approval_id=approval_id,
            at=self._clock(),
        )
        await record_safely(self._audit_sink, entry)


class HidingToolset(ABC):
    """A toolset wrapper that hides some tools from some callers.

    A hidden tool is reported as unknown, exactly like one that does not exist, to
    callers and to the approval gate alike; subclasses say what is visible.
    """

    def __init__(self, inner: GuardedToolset) -> None:
        self._inner = inner

    @abstractmethod
    def visible(self, name: str, caller: ToolCaller) -> bool:
        """Whether ``caller`` may see the tool ``name`` at all."""

    def list_tools(self, caller: ToolCaller) -> Sequence[ToolSpec]:
        return [s for s in self._inner.list_tools(caller) if self.visible(s.name, caller)]

    async def call(self, name: str, arguments: Mapping[str, Any], caller: ToolCaller) -> ToolResult:
        if not self.visible(name, caller):
            await self._inner.refuse(name, arguments, caller, _unknown_tool(name))
        return await self._inner.call(name, arguments, caller)

    def check(
        self,
        name: str,
        arguments: Mapping[str, Any],
        caller: ToolCaller,
        *,
        authorize: bool = True,
    ) -> ToolSpec:
        if not self.visible(name, caller):
            raise _unknown_tool(name)
        return self._inner.check(name, arguments, caller, authorize=authorize)

    async def call_approved(
        self,
        name: str,
        arguments: Mapping[str, Any],
        caller: ToolCaller,
        *,
        approval_id: str | None = None,
    ) -> ToolResult:
        if not self.visible(name, caller):
            await self.refuse(name, arguments, caller, _unknown_tool(name), approval_id=approval_id)
        return await self._inner.call_approved(name, arguments, caller, approval_id=approval_id)

    async def refuse(
        self,
        name: str,
        arguments: Mapping[str, Any],
        caller: ToolCaller,
        error: ToolError,
        *,
        approval_id: str | None = None,
    ) -> NoReturn:
        await self._inner.refuse(name, arguments, caller, error, approval_id=approval_id)


class FilteredToolset(HidingToolset):
    """Shows every caller only the tools whose names ``allowed`` accepts."""

    def __init__(self, inner: GuardedToolset, allowed: Callable[[str], bool]) -> None:
        super().__init__(inner)
        self._allowed = allowed

    def visible(self, name: str, caller: ToolCaller) -> bool:
        return self._allowed(name)


class TenantEnabledToolset(HidingToolset):
    """Shows each tenant only the tools its settings enable.

    For a caller whose tenant has :class:`~tools.settings.TenantToolSettings`,
    ``enabled`` (when set) lists the only tools it sees, and ``disabled`` removes
    tools; tenants without settings see every tool.
    """

    def __init__(self, inner: GuardedToolset, tenants: Mapping[str, TenantToolSettings]) -> None:
        super().__init__(inner)
        self._rules: dict[str, tuple[frozenset[str] | None, frozenset[str]]] = {
            tenant: (
                None if rule.enabled is None else frozenset(rule.enabled),
                frozenset(rule.disabled),
            )
            for tenant, rule in tenants.items()
        }

    def allows(self, name: str, tenant_id: str) -> bool:
        """Whether tenant ``tenant_id`` may see the tool ``name``."""
        rule = self._rules.get(tenant_id)
        if rule is None:
            return True
        enabled, disabled = rule
        return (enabled is None or name in enabled) and name not in disabled

    def visible(self, name: str, caller: ToolCaller) -> bool:
        return self.allows(name, caller.tenant_id)


@dataclass(frozen=True, slots=True)
class BuiltTools:
    """What :func:`build_tools` assembled."""

    toolset: GuardedToolset
    """What callers get: policy, then per-tenant enablement, then the global filter."""
    approvals: ApprovalGate | None
    """The approval gate over :attr:`toolset`, when an approval store was given."""
    specs: tuple[ToolSpec, ...]
    """Every registered tool, whoever may see it (for ``lamina tools list``)."""
    load_errors: tuple[PluginLoadError, ...]
    """Plugins that failed to load and were skipped."""


def build_tools(
    settings: ToolsSettings,
    extra: Iterable[object] = (),
    *,
    audit: ToolAuditSink | None = None,
    approval_store: ApprovalStore | None = None,
    clock: Callable[[], datetime] = utc_now,
    capture_content: bool = False,
) -> BuiltTools:
    """Assemble the tools layer a deployment hands out.

    Args:
        settings: the tools layer's settings.
        extra: tool sources registered before discovery, each anything
            :meth:`ToolRegistry.add <tools.registry.ToolRegistry.add>` accepts
            (a Tool, an ``@tool`` function, a semantic-kernel plugin, an iterable
            or zero-argument factory of those). A clash among them is an error; a
            discovered plugin clashing with them is skipped and logged.
        audit: receives an audit record of every call and approval step.
        approval_store: where approvals are kept (opened by the caller); without
            one there is no approval gate, and high-risk tools never run.
        clock: the time of audit records and approvals.
        capture_content: put the calls' arguments and results in their spans.
    """
    registry = ToolRegistry()
    for source in extra:
        registry.add(source)
    if settings.load_entry_points:
        registry.discover()
    policy = PolicyEnforcedToolset(
        registry, settings, audit=audit, clock=clock, capture_content=capture_content
    )
    known = {spec.name for spec in policy.specs()}
    toolset: GuardedToolset = policy
    if settings.tenants:
        for tenant, rule in settings.tenants.items():
            _warn_unknown(
                f"LAMINA_TOOLS__TENANTS[{tenant!r}]", [*(rule.enabled or ()), *rule.disabled], known
            )
        toolset = TenantEnabledToolset(toolset, settings.tenants)
    if settings.enabled is not None:
        enabled = frozenset(settings.enabled)
        _warn_unknown("LAMINA_TOOLS__ENABLED", enabled, known)
        toolset = FilteredToolset(toolset, enabled.__contains__)
    approvals = (
        None
        if approval_store is None
        else HumanApprovalGate(
            toolset, approval_store, settings.approvals, audit=audit, clock=clock
        )
    )
    return BuiltTools(
        toolset=toolset,
        approvals=approvals,
        specs=tuple(policy.specs()),
        load_errors=tuple(registry.load_errors),
    )


def _warn_unknown(setting: str, names: Iterable[str], known: set[str]) -> None:
    unknown = sorted(set(names) - known)
    if unknown:
        logger.warning("%s names tools that are not registered: %s", setting, ", ".join(unknown))


def build_toolset(settings: ToolsSettings, extra: Iterable[object] = ()) -> Toolset:
    """The toolset a deployment hands out: every tool behind the execution policy,
    filtered per tenant and by name. :func:`build_tools` also builds the approval gate
    and wires audit; this is its toolset alone.

    Args:
        settings: the tools layer's settings.
        extra: tool sources registered before discovery (see :func:`build_tools`).
    """
    return build_tools(settings, extra).toolset
