"""The tool registry: where tools are collected before the policy takes them.

Tools arrive explicitly (:meth:`ToolRegistry.register`, ``register_function``,
``register_kernel_plugin``, ``add``) or from installed packages through the
``lamina.tools`` entry-point group (:meth:`ToolRegistry.discover`), which
remembers the plugin each tool came from. The registry runs nothing:
:meth:`ToolRegistry.seal` hands the tools, once, to the execution policy, and
after that it accepts no more tools and hands them to no one else. Listings
(``lamina tools list``) read :meth:`ToolRegistry.entries`, which carry specs,
never runnable tools.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from types import MappingProxyType
from typing import Any

from jsonschema.exceptions import SchemaError
from jsonschema.validators import Draft202012Validator, validator_for

from tools.contracts import RiskLevel, ToolSpec
from tools.plugins import FunctionTool, Tool, check_names, check_tool_name
from tools.sk_adapter import ToolPolicy, is_kernel_plugin, kernel_plugin_tools

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "lamina.tools"

_ACCEPTED = (
    "a Tool, an @tool function, a semantic-kernel plugin class or instance, "
    "an iterable of those, or a zero-argument callable returning them"
)


class DuplicateToolName(ValueError):
    """Two tools claim the same name; tool names are unique in a deployment."""


@dataclass(frozen=True, slots=True)
class PluginSource:
    """The ``lamina.tools`` entry point a tool came from."""

    entry_point: str
    """The entry point's name, e.g. ``directory``."""
    value: str
    """What it names, ``module:attribute``, e.g. ``tools.samples:directory_plugin``."""
    distribution: str | None
    """The installed package that declares it, e.g. ``lamina``, when it is known."""

    @classmethod
    def of(cls, entry_point: EntryPoint) -> PluginSource:
        dist = entry_point.dist
        return cls(entry_point.name, entry_point.value, None if dist is None else dist.name)


@dataclass(frozen=True, slots=True)
class PluginLoadError:
    """An entry point that could not be loaded; it was skipped."""

    entry_point: str
    """``name = module:attribute`` as declared by the package."""
    error: str
    distribution: str | None = None
    """The installed package that declares the entry point, when it is known."""


@dataclass(frozen=True, slots=True)
class RegistryEntry:
    """What a listing may know of a registered tool; nothing here can run it."""

    spec: ToolSpec
    """As its author declared it."""
    source: PluginSource | None
    """The entry point that brought the tool; ``None`` for one registered in code."""


def collect_tools(source: object) -> list[Tool]:
    """The tools in ``source``: any of the shapes :meth:`ToolRegistry.add` accepts."""
    return _collect(source, call_factory=True)


def _collect(source: object, *, call_factory: bool) -> list[Tool]:
    if isinstance(source, Tool):
        return [source]
    # Before the callable check: a plugin class is callable too.
    if is_kernel_plugin(source):
        return kernel_plugin_tools(source)
    if isinstance(source, Iterable) and not isinstance(source, str | bytes | Mapping):
        return [tool for item in source for tool in _collect(item, call_factory=False)]
    if call_factory and callable(source) and _takes_no_arguments(source):
        return _collect(source(), call_factory=False)
    raise TypeError(f"expected {_ACCEPTED}; got {type(source).__name__}")


def _takes_no_arguments(candidate: Callable[..., object]) -> bool:
    try:
        parameters = inspect.signature(candidate).parameters.values()
    except (TypeError, ValueError):
        return False
    return all(
        p.default is not p.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in parameters
    )


def _check(tool: Tool) -> None:
    spec = tool.spec
    check_tool_name(spec.name)
    if spec.parameters.get("type") != "object":
        raise ValueError(f"tool {spec.name!r}: its parameters schema must have type 'object'")
    validator = validator_for(spec.parameters, default=Draft202012Validator)
    try:
        validator.check_schema(dict(spec.parameters))
    except SchemaError as exc:
        raise ValueError(
            f"tool {spec.name!r}: its parameters are not a valid JSON schema: {exc.message}"
        ) from None
    try:
        RiskLevel(spec.risk)
    except ValueError:
        raise ValueError(
            f"tool {spec.name!r}: risk must be one of {[r.value for r in RiskLevel]}"
        ) from None
    for what, names in (
        ("required_roles", spec.required_roles),
        ("required_scopes", spec.required_scopes),
        ("tenants", spec.tenants),
    ):
        check_names(f"tool {spec.name!r}", what, names)
    if tool.timeout_s is not None and tool.timeout_s <= 0:
        raise ValueError(f"tool {spec.name!r}: timeout_s must be positive")


class ToolRegistry:
    """Tools by name, each name once, in registration order."""

    def __init__(self) -> None:
        self._tools: dict[str, Tool] = {}
        self._sources: dict[str, PluginSource] = {}
        self._sealed = False
        self.load_errors: list[PluginLoadError] = []
        """Entry points :meth:`discover` skipped, and why."""

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def __len__(self) -> int:
        return len(self._tools)

    def specs(self) -> list[ToolSpec]:
        """The registered tools' specs, as their authors declared them."""
        return [tool.spec for tool in self._tools.values()]

    def entries(self) -> list[RegistryEntry]:
        """Each registered tool's spec and plugin, in registration order."""
        return [
            RegistryEntry(tool.spec, self._sources.get(name)) for name, tool in self._tools.items()
        ]

    def register(self, tool: Tool) -> Tool:
        """Add one tool; raises :class:`DuplicateToolName` if its name is taken."""
        self._add_all([tool])
        return tool

    def register_function(
        self,
        function: Callable[..., Any],
        *,
        name: str | None = None,
        description: str | None = None,
        risk: RiskLevel = RiskLevel.READ,
        roles: Iterable[str] = (),
        scopes: Iterable[str] = (),
        timeout_s: float | None = None,
        idempotent: bool | None = None,
    ) -> Tool:
        """Add a plain typed function (or an ``@tool`` one, as it is) as a tool; the
        options mean what they mean for :func:`~tools.plugins.tool`."""
        if isinstance(function, Tool):
            return self.register(function)
        return self.register(
            FunctionTool(
                function,
                name=name,
                description=description,
                risk=risk,
                roles=roles,
                scopes=scopes,
                timeout_s=timeout_s,
                idempotent=idempotent,
            )
        )

    def register_kernel_plugin(
        self,
        plugin: object,
        *,
        plugin_name: str | None = None,
        policies: Mapping[str, ToolPolicy] | None = None,
    ) -> list[Tool]:
        """Add every ``@kernel_function`` of a semantic-kernel plugin class or instance."""
        tools = kernel_plugin_tools(plugin, plugin_name=plugin_name, policies=policies)
        self._add_all(tools)
        return tools

    def add(self, source: object) -> list[Tool]:
        """Add all tools of ``source``: a Tool, an ``@tool`` function, a semantic-kernel
        plugin class or instance, an iterable of those, or a zero-argument callable
        returning them. All or nothing: on a bad or duplicate tool none is added."""
        tools = collect_tools(source)
        self._add_all(tools)
        return tools

    def discover(self, group: str = ENTRY_POINT_GROUP) -> list[Tool]:
        """Load the tools of every installed entry point in ``group``.

        Each entry point may name anything :meth:`add` accepts. One that fails to
        import, has the wrong shape, or brings a duplicate name is logged, kept in
        :attr:`load_errors` and skipped; the others still load. The tools keep
        their ``origin``; :meth:`entries` tells which entry point brought each.
        """
        self._refuse_if_sealed()
        loaded: list[Tool] = []
        for entry_point in entry_points(group=group):
            source = PluginSource.of(entry_point)
            label = f"{entry_point.name} = {entry_point.value}"
            try:
                tools = self.add(entry_point.load())
            except Exception as exc:
                logger.warning("tool plugin %r was skipped", label, exc_info=True)
                self.load_errors.append(
                    PluginLoadError(label, f"{type(exc).__name__}: {exc}", source.distribution)
                )
                continue
            logger.info("tool plugin %r: %s", label, ", ".join(tool.spec.name for tool in tools))
            self._sources.update((tool.spec.name, source) for tool in tools)
            loaded.extend(tools)
        return loaded

    def seal(self) -> Mapping[str, Tool]:
        """Hand the tools over, once, to the execution policy, and accept no more.

        The runnable tools leave the registry only here, so every run goes through
        the one policy that sealed it.
        """
        self._refuse_if_sealed()
        self._sealed = True
        return MappingProxyType(dict(self._tools))

    def _refuse_if_sealed(self) -> None:
        if self._sealed:
            raise RuntimeError(
                "the tool registry is sealed: its tools went to the execution policy; "
                "register tools before building the toolset"
            )

    def _add_all(self, tools: Iterable[Tool]) -> None:
        self._refuse_if_sealed()
        incoming: dict[str, Tool] = {}
        for tool in tools:
            _check(tool)
            name = tool.spec.name
            if name in self._tools or name in incoming:
                raise DuplicateToolName(
                    f"a tool named {name!r} is already registered; tool names must be unique"
                    " (rename one, or use a different plugin_name for a semantic-kernel plugin)"
                )
            incoming[name] = tool
        self._tools.update(incoming)
