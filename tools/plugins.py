"""Lamina's plugin API: the :class:`Tool` type and the ``@tool`` decorator.

A tool is a typed Python function. Its JSON schema comes from the type hints
(``Annotated[str, "description"]`` or ``Annotated[int, Field(description=...)]``
describe a parameter, also a field of a nested dataclass or model; defaults make
it optional; ``Literal`` becomes an enum), its description from the docstring.
Who may use it is declared with it: roles and delegated scopes. A parameter
annotated with
:class:`~tools.contracts.ToolCaller` is not part of the schema: the caller's
identity is passed in there, so a tool can scope what it returns.

Only the execution policy (:mod:`tools.policy`) runs tools; nothing here checks
roles, risk or timeouts.
"""

from __future__ import annotations

import asyncio
import inspect
import operator
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import (
    Annotated,
    Any,
    Generic,
    ParamSpec,
    TypeVar,
    get_args,
    get_origin,
    get_type_hints,
    overload,
)

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model
from pydantic.errors import PydanticUserError
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaValue
from pydantic_core import ErrorDetails, core_schema, to_jsonable_python

from tools.contracts import (
    DEFAULT_TOOL_TIMEOUT_S,
    InvalidToolArguments,
    JsonValue,
    RiskLevel,
    ToolCaller,
    ToolSpec,
)

P = ParamSpec("P")
R = TypeVar("R")

TOOL_NAME_PATTERN = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
"""Names every model API accepts for a function (OpenAI's rule, the strictest)."""


def check_tool_name(name: str) -> str:
    """Return ``name`` or raise ``ValueError`` if a model API would reject it."""
    if not TOOL_NAME_PATTERN.fullmatch(name):
        raise ValueError(
            f"invalid tool name {name!r}: use 1-64 letters, digits, '_' or '-' "
            "(the pattern ^[a-zA-Z0-9_-]{1,64}$)"
        )
    return name


def check_names(owner: str, what: str, names: Iterable[str]) -> frozenset[str]:
    """``names`` (roles, scopes, tenants) as a frozenset, or ``ValueError`` naming ``owner``.

    A bare string is refused: ``frozenset("admin")`` would be the letters a, d, m, i, n.
    """
    if isinstance(names, str):
        raise ValueError(f"{owner}: {what} must be a set of names, not a string ({names!r})")
    checked = frozenset(names)
    if not all(isinstance(name, str) and name for name in checked):
        raise ValueError(f"{owner}: {what} must be non-empty strings")
    return checked


class Tool(ABC):
    """A tool: what a model is told about it (:attr:`spec`) and how to run it.

    Implementations only run the tool. Validation, authorization, risk,
    timeout and output limits are the execution policy's job, and the policy
    is the only caller of :meth:`invoke`.
    """

    spec: ToolSpec
    timeout_s: float | None
    """The timeout the author declared; ``None`` means the deployment's default
    (``ToolsSettings.default_timeout_s``), which then replaces ``spec.timeout_s``."""

    @abstractmethod
    async def invoke(self, arguments: Mapping[str, Any], caller: ToolCaller) -> JsonValue:
        """Run the tool with arguments the policy has already checked; return a JSON value."""


# --- schema derivation ---------------------------------------------------------

_ARGUMENTS_CONFIG = ConfigDict(extra="forbid", protected_namespaces=())


class _ToolParametersJsonSchema(GenerateJsonSchema):
    """Pydantic's JSON schema, with two changes for tools.

    - No title on every property: titles like ``"Query"`` repeat the property
      name and cost tokens in every request that offers the tool.
    - ``Annotated[T, "text"]`` describes a field of a nested dataclass, model or
      TypedDict too, as it does a parameter: pydantic ignores bare strings, and
      nested types are the author's own classes, which cannot be rewritten.
    """

    def field_title_should_be_set(self, schema: object) -> bool:
        return False

    def dataclass_schema(self, schema: core_schema.DataclassSchema) -> JsonSchemaValue:
        return _describe_fields(super().dataclass_schema(schema), schema["cls"])

    def model_schema(self, schema: core_schema.ModelSchema) -> JsonSchemaValue:
        return _describe_fields(super().model_schema(schema), schema["cls"])

    def typed_dict_schema(self, schema: core_schema.TypedDictSchema) -> JsonSchemaValue:
        json_schema = super().typed_dict_schema(schema)
        cls = schema.get("cls")
        return json_schema if cls is None else _describe_fields(json_schema, cls)


def _describe_fields(json_schema: JsonSchemaValue, cls: type[Any]) -> JsonSchemaValue:
    """Add the descriptions written as ``Annotated[T, "text"]`` on ``cls``'s fields to the
    properties that have none (an explicit ``Field(description=...)`` wins)."""
    properties = json_schema.get("properties")
    if not isinstance(properties, dict):
        return json_schema
    try:
        hints = get_type_hints(cls, include_extras=True)
    except Exception:  # a hint that cannot be resolved here; pydantic resolved it already
        return json_schema
    for name, hint in hints.items():
        texts = _string_metadata(hint)
        prop = properties.get(name)
        if texts and isinstance(prop, dict) and "description" not in prop:
            prop["description"] = " ".join(texts)
    return json_schema


def _string_metadata(hint: Any) -> list[str]:
    if get_origin(hint) is not Annotated:
        return []
    return [item for item in get_args(hint)[1:] if isinstance(item, str)]


def parameters_schema(arguments_model: type[BaseModel]) -> dict[str, Any]:
    """The ``parameters`` JSON schema (type ``object``) of a tool's arguments model."""
    schema = arguments_model.model_json_schema(schema_generator=_ToolParametersJsonSchema)
    schema.pop("title", None)
    return schema


def arguments_model(tool_name: str, fields: Mapping[str, tuple[Any, Any]]) -> type[BaseModel]:
    """A pydantic model of a tool's arguments; unknown arguments are rejected."""
    model: type[BaseModel] = create_model(  # type: ignore[call-overload]
        f"{tool_name}_arguments", __config__=_ARGUMENTS_CONFIG, **fields
    )
    return model


def describe_validation_errors(error: ValidationError) -> tuple[str, ...]:
    """Pydantic errors as short lines a model can act on (``limit: Input should be ...``)."""
    return tuple(_describe_error(detail) for detail in error.errors(include_url=False))


def _describe_error(detail: ErrorDetails) -> str:
    path = ""
    for part in detail["loc"]:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return f"{path}: {detail['msg']}" if path else detail["msg"]


def annotated(base: Any, *metadata: Any) -> Any:
    """``Annotated[base, *metadata]`` built at run time."""
    return operator.getitem(Annotated, (base, *metadata))


def _with_string_descriptions(hint: Any) -> Any:
    """Turn ``Annotated[T, "text"]`` into ``Annotated[T, Field(description="text")]``.

    Pydantic ignores bare strings in ``Annotated``; semantic-kernel reads them as
    descriptions, so Lamina accepts both spellings. An explicit ``Field`` given
    alongside wins, because later metadata overrides earlier metadata.
    """
    texts = _string_metadata(hint)
    if not texts:
        return hint
    base, *metadata = get_args(hint)
    others = [item for item in metadata if not isinstance(item, str)]
    return annotated(base, Field(description=" ".join(texts)), *others)


def _is_caller_hint(hint: Any) -> bool:
    if get_origin(hint) is Annotated:
        hint = get_args(hint)[0]
    return hint is ToolCaller


def _resolve(annotation: Any, global_names: dict[str, Any], tool_name: str) -> Any:
    """Evaluate a string annotation (``from __future__ import annotations``).

    Only parameters are resolved: the return type may name a class local to a
    function, which no namespace could resolve, and the schema does not need it.
    """
    if not isinstance(annotation, str):
        return annotation
    try:
        return eval(annotation, global_names)
    except Exception as exc:
        raise TypeError(
            f"tool {tool_name!r}: cannot resolve the type hint {annotation!r} ({exc})"
        ) from exc


@dataclass(frozen=True, slots=True)
class _Parameter:
    name: str
    positional_only: bool
    is_caller: bool


def _parameters_of(
    fn: Callable[..., Any], tool_name: str
) -> tuple[tuple[_Parameter, ...], type[BaseModel], dict[str, Any]]:
    annotations = inspect.get_annotations(fn)
    global_names = getattr(inspect.unwrap(fn), "__globals__", {})
    parameters: list[_Parameter] = []
    fields: dict[str, tuple[Any, Any]] = {}
    for parameter in inspect.signature(fn).parameters.values():
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            raise TypeError(
                f"tool {tool_name!r}: *{parameter.name} has no JSON schema; "
                "declare each argument as a named, typed parameter"
            )
        if parameter.name not in annotations:
            raise TypeError(
                f"tool {tool_name!r}: parameter {parameter.name!r} needs a type annotation"
            )
        hint = _resolve(annotations[parameter.name], global_names, tool_name)
        is_caller = _is_caller_hint(hint)
        parameters.append(
            _Parameter(parameter.name, parameter.kind is parameter.POSITIONAL_ONLY, is_caller)
        )
        if not is_caller:
            default = ... if parameter.default is parameter.empty else parameter.default
            fields[parameter.name] = (_with_string_descriptions(hint), default)
    try:
        model = arguments_model(tool_name, fields)
        schema = parameters_schema(model)
    except (PydanticUserError, TypeError) as exc:
        # Pydantic names neither the tool nor, often, the parameter: say which tool.
        reason = str(exc).split("\n", 1)[0]
        raise TypeError(
            f"tool {tool_name!r}: no JSON schema can be derived from its parameters: {reason}"
        ) from exc
    return tuple(parameters), model, schema


# --- the decorator's product ---------------------------------------------------


class FunctionTool(Tool, Generic[P, R]):
    """A tool made from a plain typed function, sync or async.

    Calling it calls the function unchanged, so a decorated function stays
    usable (and unit-testable) as ordinary Python.
    """

    def __init__(
        self,
        function: Callable[P, R],
        *,
        name: str | None = None,
        description: str | None = None,
        risk: RiskLevel = RiskLevel.READ,
        roles: Iterable[str] = (),
        scopes: Iterable[str] = (),
        timeout_s: float | None = None,
        idempotent: bool | None = None,
    ) -> None:
        tool_name = check_tool_name(name or function.__name__)
        text = description or inspect.getdoc(function)
        if not text:
            raise ValueError(
                f"tool {tool_name!r} needs a description: add a docstring or pass description="
            )
        if timeout_s is not None and timeout_s <= 0:
            raise ValueError(f"tool {tool_name!r}: timeout_s must be positive")
        owner = f"tool {tool_name!r}"
        required_roles = check_names(owner, "roles", roles)
        required_scopes = check_names(owner, "scopes", scopes)
        risk = RiskLevel(risk)  # a plain "high" becomes the enum, or fails here
        self._function = function
        self._is_async = inspect.iscoroutinefunction(function)
        self._parameters, self._arguments_model, parameters = _parameters_of(function, tool_name)
        self.timeout_s = timeout_s
        self.spec = ToolSpec(
            name=tool_name,
            description=text,
            parameters=parameters,
            risk=risk,
            required_roles=required_roles,
            required_scopes=required_scopes,
            # A write is not assumed safe to retry unless its author says so.
            idempotent=(risk == RiskLevel.READ) if idempotent is None else idempotent,
            timeout_s=DEFAULT_TOOL_TIMEOUT_S if timeout_s is None else timeout_s,
            origin="python",
        )

    @property
    def function(self) -> Callable[P, R]:
        return self._function

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return self._function(*args, **kwargs)

    def __repr__(self) -> str:
        return f"FunctionTool({self.spec.name!r}, risk={self.spec.risk.value})"

    async def invoke(self, arguments: Mapping[str, Any], caller: ToolCaller) -> JsonValue:
        try:
            validated = self._arguments_model.model_validate(dict(arguments))
        except ValidationError as exc:
            errors = describe_validation_errors(exc)
            raise InvalidToolArguments(
                self.spec.name, "invalid arguments: " + "; ".join(errors), errors
            ) from None
        positional: list[Any] = []
        keyword: dict[str, Any] = {}
        for parameter in self._parameters:
            value = caller if parameter.is_caller else getattr(validated, parameter.name)
            if parameter.positional_only:
                positional.append(value)
            else:
                keyword[parameter.name] = value
        call: Callable[..., Any] = self._function
        if self._is_async:
            result = await call(*positional, **keyword)
        else:
            # A sync tool may block (file, socket, CPU): keep it off the event loop.
            result = await asyncio.to_thread(call, *positional, **keyword)
            if inspect.isawaitable(result):  # e.g. an object whose __call__ is async
                result = await result
        return to_jsonable_python(result)


@overload
def tool(function: Callable[P, R], /) -> FunctionTool[P, R]: ...


@overload
def tool(
    *,
    name: str | None = None,
    description: str | None = None,
    risk: RiskLevel = RiskLevel.READ,
    roles: Iterable[str] = (),
    scopes: Iterable[str] = (),
    timeout_s: float | None = None,
    idempotent: bool | None = None,
) -> Callable[[Callable[P, R]], FunctionTool[P, R]]: ...


def tool(
    function: Callable[P, R] | None = None,
    /,
    *,
    name: str | None = None,
    description: str | None = None,
    risk: RiskLevel = RiskLevel.READ,
    roles: Iterable[str] = (),
    scopes: Iterable[str] = (),
    timeout_s: float | None = None,
    idempotent: bool | None = None,
) -> FunctionTool[P, R] | Callable[[Callable[P, R]], FunctionTool[P, R]]:
    """Make a typed function a Lamina tool; use as ``@tool`` or ``@tool(risk=..., roles=...)``.

    Args:
        name: the tool's name (default: the function's name); ``^[a-zA-Z0-9_-]{1,64}$``.
        description: what the tool does, for the model (default: the docstring).
        risk: ``READ`` (default), ``WRITE``, or ``HIGH`` (never runs without approval).
        roles: the caller needs at least one of these; empty means any authenticated caller.
        scopes: the caller's token needs at least one of these delegated scopes (``scp``);
            empty means none is needed.
        timeout_s: per-call timeout; default ``ToolsSettings.default_timeout_s``.
        idempotent: safe to retry; default true for ``READ`` tools, false otherwise.
    """

    def decorate(fn: Callable[P, R]) -> FunctionTool[P, R]:
        return FunctionTool(
            fn,
            name=name,
            description=description,
            risk=risk,
            roles=roles,
            scopes=scopes,
            timeout_s=timeout_s,
            idempotent=idempotent,
        )

    return decorate if function is None else decorate(function)
