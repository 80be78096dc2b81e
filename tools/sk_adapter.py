"""semantic-kernel plugins as Lamina tools.

An existing class of ``@kernel_function`` methods works unchanged: each method
becomes a tool named ``<plugin>-<function>`` (semantic-kernel's own fully
qualified name), whose schema comes from the function's metadata and whose
calls go through ``KernelFunction.invoke`` with a ``Kernel`` and
``KernelArguments``. Risk, roles and scopes come from :func:`tool_policy`
stacked on the method or from a ``policies`` mapping; by default a function is
``RiskLevel.READ`` and open to any authenticated caller.

semantic-kernel costs seconds to import, so it is imported only inside the
functions that need it, never when this module is imported.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import Field, TypeAdapter, WithJsonSchema
from pydantic_core import to_jsonable_python

from tools.contracts import DEFAULT_TOOL_TIMEOUT_S, JsonValue, RiskLevel, ToolCaller, ToolSpec
from tools.plugins import (
    Tool,
    annotated,
    arguments_model,
    check_names,
    check_tool_name,
    parameters_schema,
)

if TYPE_CHECKING:
    from semantic_kernel import Kernel
    from semantic_kernel.functions import KernelFunction
    from semantic_kernel.functions.kernel_parameter_metadata import KernelParameterMetadata

F = TypeVar("F", bound=Callable[..., Any])

_POLICY_ATTRIBUTE = "__lamina_tool_policy__"
_PLUGIN_NAME_PATTERN = re.compile(r"^[0-9A-Za-z_]+$")  # semantic-kernel's rule


@dataclass(frozen=True, slots=True)
class ToolPolicy:
    """Lamina's policy fields for one semantic-kernel function.

    ``roles`` and ``scopes`` accept any iterable of names (kept as frozensets); a
    bare string is refused, as it would be read as a set of letters.
    """

    risk: RiskLevel = RiskLevel.READ
    roles: frozenset[str] = frozenset()
    """The caller needs at least one of these; empty means any authenticated caller."""
    timeout_s: float | None = None
    """``None``: the deployment's ``default_timeout_s``."""
    idempotent: bool | None = None
    """``None``: true for ``READ``, false otherwise."""
    scopes: frozenset[str] = frozenset()
    """The caller's token needs at least one of these delegated scopes; empty means none."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "risk", RiskLevel(self.risk))
        object.__setattr__(self, "roles", check_names("tool policy", "roles", self.roles))
        object.__setattr__(self, "scopes", check_names("tool policy", "scopes", self.scopes))
        if self.timeout_s is not None and self.timeout_s <= 0:
            raise ValueError("tool policy: timeout_s must be positive")


def tool_policy(
    *,
    risk: RiskLevel = RiskLevel.READ,
    roles: Iterable[str] = (),
    scopes: Iterable[str] = (),
    timeout_s: float | None = None,
    idempotent: bool | None = None,
) -> Callable[[F], F]:
    """Declare risk, roles and scopes of a ``@kernel_function`` method; stack it above or below.

    The arguments mean what they mean for :func:`~tools.plugins.tool`.
    """
    policy = ToolPolicy(
        risk=risk,
        roles=check_names("tool_policy", "roles", roles),
        scopes=check_names("tool_policy", "scopes", scopes),
        timeout_s=timeout_s,
        idempotent=idempotent,
    )

    def mark(method: F) -> F:
        setattr(method, _POLICY_ATTRIBUTE, policy)
        return method

    return mark


def is_kernel_plugin(candidate: object) -> bool:
    """Whether ``candidate`` is a class, or an instance of one, with ``@kernel_function`` methods.

    Reads the attributes semantic-kernel's decorator sets, so it imports nothing.
    """
    cls = candidate if isinstance(candidate, type) else type(candidate)
    return any(
        getattr(member, "__kernel_function__", False) is True
        for klass in cls.__mro__
        for member in vars(klass).values()
    )


class KernelFunctionTool(Tool):
    """One semantic-kernel function, run through semantic-kernel."""

    def __init__(self, function: KernelFunction, kernel: Kernel, policy: ToolPolicy) -> None:
        metadata = function.metadata
        name = check_tool_name(metadata.fully_qualified_name)
        self._function = function
        self._kernel = kernel
        self._is_async = bool(metadata.is_asynchronous)
        self.timeout_s = policy.timeout_s
        self.spec = ToolSpec(
            name=name,
            description=metadata.description or "",
            parameters=_parameters_schema(name, metadata.parameters),
            risk=policy.risk,
            required_roles=policy.roles,
            required_scopes=policy.scopes,
            idempotent=(
                (policy.risk is RiskLevel.READ) if policy.idempotent is None else policy.idempotent
            ),
            timeout_s=DEFAULT_TOOL_TIMEOUT_S if policy.timeout_s is None else policy.timeout_s,
            origin="semantic-kernel",
        )

    def __repr__(self) -> str:
        return f"KernelFunctionTool({self.spec.name!r}, risk={self.spec.risk.value})"

    async def invoke(self, arguments: Mapping[str, Any], caller: ToolCaller) -> JsonValue:
        from semantic_kernel.functions import KernelArguments

        kernel_arguments = KernelArguments(**arguments)
        if self._is_async:
            result = await self._function.invoke(self._kernel, kernel_arguments)
        else:
            # semantic-kernel calls a sync method on the running loop; a blocking
            # one would stall every request, so it gets a thread (and its own loop).
            result = await asyncio.to_thread(
                lambda: asyncio.run(self._function.invoke(self._kernel, kernel_arguments))
            )
        return None if result is None else to_jsonable_python(result.value)


def kernel_plugin_tools(
    plugin: object,
    *,
    plugin_name: str | None = None,
    policies: Mapping[str, ToolPolicy] | None = None,
) -> list[Tool]:
    """The tools of a semantic-kernel plugin: a class with a no-argument constructor, or one.

    Args:
        plugin: the plugin class or instance.
        plugin_name: prefix of the tool names (default: the class name); letters, digits, ``_``.
        policies: risk, roles and scopes by function name; overrides :func:`tool_policy`.
    """
    from semantic_kernel import Kernel
    from semantic_kernel.functions import KernelPlugin

    instance = plugin() if isinstance(plugin, type) else plugin
    name = plugin_name or type(instance).__name__
    if not _PLUGIN_NAME_PATTERN.fullmatch(name):
        # semantic-kernel would only say "Failed to create KernelFunctionMetadata".
        raise ValueError(f"invalid plugin name {name!r}: use letters, digits and '_' only")
    sk_plugin = KernelPlugin.from_object(name, instance)
    overrides = dict(policies or {})
    unknown = set(overrides) - {function.name for function in sk_plugin}
    if unknown:
        raise ValueError(
            f"policies name functions that plugin {sk_plugin.name!r} does not have: "
            + ", ".join(sorted(unknown))
        )
    # A bare kernel with no plugins in it: a function that asks for the kernel
    # must not be able to reach other tools around the policy.
    kernel = Kernel()
    return [
        KernelFunctionTool(
            function,
            kernel,
            overrides.get(function.name) or _declared_policy(function),
        )
        for function in sk_plugin
    ]


def _declared_policy(function: KernelFunction) -> ToolPolicy:
    method = getattr(function, "method", None)
    policy = getattr(method, _POLICY_ATTRIBUTE, None)
    return policy if isinstance(policy, ToolPolicy) else ToolPolicy()


def _parameters_schema(
    tool_name: str, parameters: Iterable[KernelParameterMetadata]
) -> dict[str, Any]:
    """The JSON schema of a function's parameters, from semantic-kernel's metadata.

    Where the metadata keeps the Python type, pydantic derives the schema, as it
    does for ``@tool`` functions: semantic-kernel's own ``schema_data`` turns a
    ``Literal`` into ``{"type": "object"}``, which no model could satisfy.
    Otherwise ``schema_data`` is used as it is.
    """
    fields: dict[str, tuple[Any, Any]] = {}
    for parameter in parameters:
        if not parameter.include_in_function_choices or parameter.name is None:
            continue
        annotation = annotated(
            _annotation_of(parameter), Field(description=parameter.description or None)
        )
        default = ... if parameter.is_required else parameter.default_value
        fields[parameter.name] = (annotation, default)
    return parameters_schema(arguments_model(tool_name, fields))


def _annotation_of(parameter: KernelParameterMetadata) -> Any:
    if parameter.type_object is not None:
        try:
            TypeAdapter(parameter.type_object).json_schema()
        except Exception:  # pydantic cannot describe every type semantic-kernel accepts
            pass
        else:
            return parameter.type_object
    return annotated(Any, WithJsonSchema(parameter.schema_data or {}))
