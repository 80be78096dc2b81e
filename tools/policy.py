"""The execution policy: the only way a tool runs.

Cross-cutting behaviour is a wrapper around a toolset, not a flag threaded
through it. :class:`PolicyEnforcedToolset` takes the raw tools from a sealed
:class:`~tools.registry.ToolRegistry` and, for every call, in this order:

1. refuses an unknown tool (:class:`~tools.contracts.UnknownTool`);
2. refuses a caller with none of the tool's roles (``ToolPermissionDenied``);
3. validates the arguments against the tool's JSON schema, before the tool
   runs (``InvalidToolArguments``, with errors a model can correct);
4. refuses a ``HIGH`` risk tool (``ToolApprovalRequired``): it runs only through
   :meth:`PolicyEnforcedToolset.call_approved`, which the approval gate
   (:mod:`tools.approvals`) calls once per approval a person gave;
5. runs the tool under its timeout (``ToolTimeout``);
6. turns any failure into ``ToolExecutionFailed`` with a safe message (the
   details go to the log, never to the caller);
7. caps the output at ``max_output_chars`` of JSON.

:class:`FilteredToolset` hides tools by name (``ToolsSettings.enabled``).
:func:`build_toolset` composes registry, discovery, policy and filter.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from jsonschema.protocols import Validator
from jsonschema.validators import Draft202012Validator, validator_for

from tools.contracts import (
    InvalidToolArguments,
    JsonValue,
    RiskLevel,
    ToolApprovalRequired,
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
from tools.registry import ToolRegistry
from tools.settings import ToolsSettings

logger = logging.getLogger(__name__)
audit_logger = logging.getLogger("tools.audit")

_MAX_REPORTED_ERRORS = 10
_MAX_ERROR_CHARS = 300


def _unknown_tool(name: str) -> UnknownTool:
    return UnknownTool(name, f"there is no tool named {name!r}")


def may_use(spec: ToolSpec, caller: ToolCaller) -> bool:
    """Whether ``caller`` holds at least one of the tool's roles (or the tool needs none)."""
    return not spec.required_roles or not spec.required_roles.isdisjoint(caller.roles)


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


class PolicyEnforcedToolset:
    """The tools of a registry behind the execution policy (see the module docstring).

    Building it seals the registry: this object is then the only holder of the
    runnable tools.
    """

    def __init__(self, registry: ToolRegistry, settings: ToolsSettings) -> None:
        self._max_output_chars = settings.max_output_chars
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

    def list_tools(self, caller: ToolCaller) -> Sequence[ToolSpec]:
        return [guarded.spec for guarded in self._tools.values() if may_use(guarded.spec, caller)]

    async def call(self, name: str, arguments: Mapping[str, Any], caller: ToolCaller) -> ToolResult:
        return await self._audited_call(name, arguments, caller, approved=False)

    def check(self, name: str, arguments: Mapping[str, Any], caller: ToolCaller) -> ToolSpec:
        """Everything :meth:`call` checks before running, without running: the spec if the
        caller may call ``name`` with ``arguments``, else the ``ToolError`` a call would raise.
        The approval gate asks this before it asks a person."""
        guarded, _ = self._admit(name, arguments, caller)
        return guarded.spec

    async def call_approved(
        self, name: str, arguments: Mapping[str, Any], caller: ToolCaller
    ) -> ToolResult:
        """Run a high-risk tool whose call a person approved. For the approval gate only,
        which calls it once per approval it has claimed; every other check still applies."""
        return await self._audited_call(name, arguments, caller, approved=True)

    async def _audited_call(
        self, name: str, arguments: Mapping[str, Any], caller: ToolCaller, *, approved: bool
    ) -> ToolResult:
        started = time.perf_counter()
        try:
            output = await self._checked_call(name, arguments, caller, approved=approved)
        except ToolError as exc:
            self._audit(name, caller, type(exc).__name__, started)
            raise
        except asyncio.CancelledError:
            self._audit(name, caller, "cancelled", started)
            raise
        self._audit(name, caller, "ok", started)
        return ToolResult(tool=name, output=output)

    def _admit(
        self, name: str, arguments: Mapping[str, Any], caller: ToolCaller
    ) -> tuple[_GuardedTool, Any]:
        guarded = self._tools.get(name)
        if guarded is None:
            raise _unknown_tool(name)
        spec = guarded.spec
        if not may_use(spec, caller):
            raise ToolPermissionDenied(name, "you do not have a role that may use this tool")
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

    def _audit(self, name: str, caller: ToolCaller, outcome: str, started: float) -> None:
        audit_logger.info(
            "tool call %s by %s/%s: %s in %.0f ms",
            name,
            caller.tenant_id,
            caller.user_id,
            outcome,
            (time.perf_counter() - started) * 1000,
        )


class FilteredToolset:
    """A toolset showing only the tools whose names ``allowed`` accepts.

    A hidden tool is reported as unknown, exactly like one that does not exist.
    """

    def __init__(self, inner: Toolset, allowed: Callable[[str], bool]) -> None:
        self._inner = inner
        self._allowed = allowed

    def list_tools(self, caller: ToolCaller) -> Sequence[ToolSpec]:
        return [spec for spec in self._inner.list_tools(caller) if self._allowed(spec.name)]

    async def call(self, name: str, arguments: Mapping[str, Any], caller: ToolCaller) -> ToolResult:
        if not self._allowed(name):
            raise _unknown_tool(name)
        return await self._inner.call(name, arguments, caller)


def build_toolset(settings: ToolsSettings, extra: Iterable[object] = ()) -> Toolset:
    """The toolset a deployment hands out: every tool behind the execution policy.

    Args:
        settings: the tools layer's settings.
        extra: tool sources registered before discovery, each anything
            :meth:`ToolRegistry.add <tools.registry.ToolRegistry.add>` accepts
            (a Tool, an ``@tool`` function, a semantic-kernel plugin, an iterable
            or zero-argument factory of those). A clash among them is an error; a
            discovered plugin clashing with them is skipped and logged.
    """
    registry = ToolRegistry()
    for source in extra:
        registry.add(source)
    if settings.load_entry_points:
        registry.discover()
    toolset: Toolset = PolicyEnforcedToolset(registry, settings)
    if settings.enabled is not None:
        enabled = frozenset(settings.enabled)
        unknown = sorted(name for name in enabled if name not in registry)
        if unknown:
            logger.warning(
                "LAMINA_TOOLS__ENABLED names tools that are not registered: %s", ", ".join(unknown)
            )
        toolset = FilteredToolset(toolset, enabled.__contains__)
    return toolset
