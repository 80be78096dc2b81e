"""What a deployment offers: its tools as the server builds them, and who may use each.

``lamina tools list`` reads this. The installed plugins are discovered (when
``load_entry_points`` is on) and handed to :func:`tools.policy.build_tools`,
which builds what the server builds: the execution policy with its effective
timeouts, the per-tenant and ``enabled`` filters. Who may use a tool is answered
by that policy, never by a second copy of its rules. Nothing here calls a tool.

MCP servers and OpenAPI documents are configured in settings and connected when
the server starts; a listing names them without connecting.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from tools.contracts import JsonValue, ToolSpec
from tools.policy import GuardedToolset, build_tools, has_role, has_scope
from tools.registry import ENTRY_POINT_GROUP, PluginLoadError, PluginSource, ToolRegistry
from tools.settings import ToolsSettings

ANY_SIGNED_IN_USER = "any signed-in user"


def who_may_use(spec: ToolSpec) -> str:
    """One line for people: ``roles: a or b; scopes: s; tenants: t``."""
    parts = [
        f"{label}: {' or '.join(sorted(names))}"
        for label, names in (
            ("roles", spec.required_roles),
            ("scopes", spec.required_scopes),
            ("tenants", spec.tenants),
        )
        if names
    ]
    return "; ".join(parts) or ANY_SIGNED_IN_USER


@dataclass(frozen=True, slots=True)
class ListedTool:
    spec: ToolSpec
    """As the policy holds it: with the effective timeout (the tool's own, or the
    deployment's ``default_timeout_s``)."""
    source: PluginSource | None
    """The entry point that brought it; ``None`` for a tool registered in code."""

    def as_json(self) -> dict[str, JsonValue]:
        """A JSON object with stable keys (``lamina tools list --json``)."""
        spec = self.spec
        return {
            "name": spec.name,
            "description": spec.description,
            "origin": spec.origin,
            "plugin": None if self.source is None else self.source.entry_point,
            "distribution": None if self.source is None else self.source.distribution,
            "risk": spec.risk.value,
            "idempotent": spec.idempotent,
            "timeout_s": spec.timeout_s,
            "roles": sorted(spec.required_roles),
            "scopes": sorted(spec.required_scopes),
            "tenants": sorted(spec.tenants),
        }


@dataclass(frozen=True, slots=True)
class _Caller:
    """The caller a listing asks about (a :class:`~tools.contracts.ToolCaller`)."""

    tenant_id: str
    user_id: str
    roles: frozenset[str]
    scopes: frozenset[str]


@dataclass(frozen=True, slots=True)
class ToolCatalog:
    """The tools a deployment's settings offer, and what went wrong loading them."""

    tools: tuple[ListedTool, ...]
    """Every tool the ``enabled`` setting leaves, in registration order."""
    load_errors: tuple[PluginLoadError, ...]
    """Plugins that were skipped, and why."""
    not_installed: tuple[str, ...]
    """Tool names ``LAMINA_TOOLS__ENABLED`` or ``LAMINA_TOOLS__TENANTS`` mention that no
    loaded plugin brings."""
    connected_sources: tuple[str, ...]
    """Configured MCP servers and OpenAPI documents (``mcp:<name>``, ``openapi:<name>``),
    whose tools are known only once the server has connected to them."""
    _toolset: GuardedToolset = field(repr=False, compare=False)

    def usable_by(
        self,
        *,
        roles: Iterable[str] = (),
        scopes: Iterable[str] = (),
        tenant_id: str | None = None,
    ) -> tuple[ListedTool, ...]:
        """The tools a caller with these roles and delegated scopes may use.

        With ``tenant_id``, the server's own toolset answers, per-tenant settings and
        ``ToolSpec.tenants`` included. Without it, only the roles and scopes are
        checked, with the policy's rules: what such a caller may use in some tenant.
        """
        caller = _Caller(tenant_id or "", "lamina-tools-list", frozenset(roles), frozenset(scopes))
        if tenant_id is None:
            return tuple(
                listed
                for listed in self.tools
                if has_role(listed.spec, caller) and has_scope(listed.spec, caller)
            )
        usable = {spec.name for spec in self._toolset.list_tools(caller)}
        return tuple(listed for listed in self.tools if listed.spec.name in usable)


def load_catalog(settings: ToolsSettings, *, group: str = ENTRY_POINT_GROUP) -> ToolCatalog:
    """The installed tools, as the server builds them (see the module docstring)."""
    registry = ToolRegistry()
    if settings.load_entry_points:
        registry.discover(group)
    sources = {entry.spec.name: entry.source for entry in registry.entries()}
    # Discovery is done: the rest is the server's own builder, with the same tools.
    built = build_tools(
        settings.model_copy(update={"load_entry_points": False}),
        [list(registry.seal().values())],
    )
    enabled = None if settings.enabled is None else frozenset(settings.enabled)
    mentioned = set(enabled or ())
    for rule in settings.tenants.values():
        mentioned.update(rule.enabled or ())
        mentioned.update(rule.disabled)
    return ToolCatalog(
        tools=tuple(
            ListedTool(spec, sources.get(spec.name))
            for spec in built.specs
            if enabled is None or spec.name in enabled
        ),
        load_errors=tuple(registry.load_errors),
        not_installed=tuple(sorted(mentioned - set(sources))),
        connected_sources=tuple(
            [f"mcp:{server.name}" for server in settings.mcp_servers]
            + [f"openapi:{source.name}" for source in settings.openapi]
        ),
        _toolset=built.toolset,
    )
