"""Public contract of the tools layer.

A :class:`Toolset` is what callers see. The toolset the composition root hands
out is always wrapped in the execution policy (argument validation, roles,
risk, timeout), so no caller can run a tool without its policy check.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

JsonValue = Any
"""A JSON-serialisable value (dict, list, str, int, float, bool or None)."""


class RiskLevel(StrEnum):
    READ = "read"
    WRITE = "write"
    HIGH = "high"
    """Irreversible or costly actions: never run without a human's approval."""


class ToolCaller(Protocol):
    """The identity fields tool authorization checks."""

    @property
    def tenant_id(self) -> str: ...

    @property
    def user_id(self) -> str: ...

    @property
    def roles(self) -> frozenset[str]: ...


@dataclass(frozen=True, slots=True)
class ToolSpec:
    name: str
    """Matches ``^[a-zA-Z0-9_-]{1,64}$``, so every model API accepts it unchanged and a
    model's call can be echoed back under the same name."""
    description: str
    parameters: Mapping[str, Any]
    """JSON schema (type ``object``) of the arguments."""
    risk: RiskLevel = RiskLevel.READ
    required_roles: frozenset[str] = frozenset()
    """The caller needs at least one of these roles; empty means any authenticated caller."""
    timeout_s: float = 10.0
    idempotent: bool = True


@dataclass(frozen=True, slots=True)
class ToolResult:
    tool: str
    output: JsonValue


class Toolset(Protocol):
    def list_tools(self, caller: ToolCaller) -> Sequence[ToolSpec]:
        """The tools this caller may use."""
        ...

    async def call(self, name: str, arguments: Mapping[str, Any], caller: ToolCaller) -> ToolResult:
        """Run one tool, or raise a :class:`ToolError`."""
        ...


# --- errors ------------------------------------------------------------------


@dataclass
class ToolError(Exception):
    """Base of tool failures. ``message`` is safe to show a user and to feed back to a model."""

    tool: str
    message: str

    def __str__(self) -> str:
        return f"{self.tool}: {self.message}"


class UnknownTool(ToolError):
    pass


@dataclass
class InvalidToolArguments(ToolError):
    errors: tuple[str, ...] = field(default=())


class ToolPermissionDenied(ToolError):
    pass


class ToolApprovalRequired(ToolError):
    """The tool is high risk: it runs only after a human approves the call."""


class ToolTimeout(ToolError):
    pass


class ToolExecutionFailed(ToolError):
    pass
