"""Reading an OpenAPI 3 document into the operations Lamina offers as tools.

Pure functions on the parsed document: parse (JSON or YAML), validate
(``openapi-spec-validator``), resolve ``$ref`` (``referencing``; only references
inside the document, so loading a document never fetches anything else), and
describe each operation: its parameters as one JSON schema, and how each argument
goes on the wire.

The arguments schema of an operation (type ``object``, no other properties):

- one property per path, query and header parameter, named as the parameter
  (``<in>_<name>`` if two parameters share a name);
- the JSON request body, whole, as the ``body`` property (``request_body`` if a
  parameter is already called ``body``). It is not flattened: the body keeps its
  own schema (an array, a ``oneOf`` ...), and never clashes with a parameter.

OpenAPI 3.0 schemas are turned into JSON Schema 2020-12 (``nullable``, boolean
``exclusiveMinimum``/``exclusiveMaximum``, ``example``), which is what the execution
policy validates arguments with. Titles and vendor extensions are dropped: they
cost tokens in every request that offers the tool.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Hashable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx
import yaml

HTTP_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
ParameterLocation = Literal["path", "query", "header"]

_LOCATIONS: dict[str, ParameterLocation] = {"path": "path", "query": "query", "header": "header"}
_IGNORED_HEADERS = frozenset(
    {"accept", "content-type", "authorization", "host", "content-length", "connection", "cookie"}
)
"""Header parameters the client sets itself (the first three OpenAPI says to ignore)."""
_SCHEMA_MAPS = frozenset({"properties", "patternProperties", "$defs", "definitions"})
_SCHEMA_LISTS = frozenset({"allOf", "anyOf", "oneOf", "prefixItems"})
_SCHEMA_VALUES = frozenset(
    {
        "items",
        "additionalItems",
        "additionalProperties",
        "not",
        "if",
        "then",
        "else",
        "contains",
        "propertyNames",
        "unevaluatedItems",
        "unevaluatedProperties",
        "contentSchema",
    }
)
_DROPPED_KEYWORDS = frozenset({"title", "xml", "externalDocs", "discriminator"})
_MAX_DESCRIPTION = 1024
_MAX_ERROR = 300
_DOCUMENT_URI = "urn:lamina:openapi-document"


class InvalidDocument(ValueError):
    """The document cannot be read, is not valid OpenAPI 3, or uses what is not supported."""


@dataclass(frozen=True, slots=True)
class ParameterBinding:
    """Where one argument goes in the request."""

    argument: str
    """The property of the tool's arguments."""
    name: str
    """The parameter's name on the wire."""
    location: ParameterLocation
    explode: bool = True
    """Query arrays: one ``name=value`` per item (else one comma-separated value)."""
    json_encoded: bool = False
    """A parameter described with ``content`` rather than ``schema``: sent as JSON text."""


@dataclass(frozen=True, slots=True)
class Operation:
    """One operation of the document, ready to become a tool."""

    key: str
    """Its ``operationId``, or ``<method>_<path>`` made of safe characters if it has none;
    what ``OpenApiSourceSettings.operations`` and ``operation_risks`` name."""
    method: str
    """Upper case: ``GET``."""
    path: str
    """The path template: ``/orders/{order_id}``."""
    description: str
    parameters: dict[str, Any]
    """The arguments' JSON schema (type ``object``)."""
    bindings: tuple[ParameterBinding, ...]
    body_argument: str | None = None
    body_media_type: str | None = None


@dataclass(frozen=True, slots=True)
class SkippedOperation:
    key: str
    reason: str


@dataclass(frozen=True, slots=True)
class ParsedDocument:
    title: str
    operations: tuple[Operation, ...]
    skipped: tuple[SkippedOperation, ...]
    server_url: str | None
    """The first server's URL, absolute (relative ones resolved against the document's
    URL), or ``None`` if it cannot be known."""


# --- parsing and validation ---------------------------------------------------------


def parse_document(raw: bytes) -> dict[str, Any]:
    """The document as JSON-compatible data (JSON, or YAML)."""
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise InvalidDocument("the document is not UTF-8 text") from None
    data: object
    if text.lstrip().startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InvalidDocument(f"the document is not valid JSON: {exc}") from None
    else:
        loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
        try:
            data = yaml.load(text, Loader=loader)  # a safe loader: no Python objects
        except yaml.YAMLError as exc:
            where = getattr(exc, "problem_mark", None)
            line = f" (line {where.line + 1})" if where is not None else ""
            problem = getattr(exc, "problem", None) or "syntax error"
            raise InvalidDocument(f"the document is not valid YAML: {problem}{line}") from None
        # YAML has dates and integer keys (status codes); JSON, and so every
        # consumer downstream, has neither.
        data = json.loads(json.dumps(data, default=str))
    if not isinstance(data, dict):
        raise InvalidDocument("the document is not a JSON or YAML object")
    return data


def validate_document(data: Mapping[str, Any]) -> None:
    """Raise :class:`InvalidDocument` unless ``data`` is a valid OpenAPI 3.0 or 3.1 document."""
    version = data.get("openapi")
    if not isinstance(version, str):
        if "swagger" in data:
            raise InvalidDocument(
                f"it is a Swagger {data['swagger']} document; convert it to OpenAPI 3"
            )
        raise InvalidDocument("it is not an OpenAPI 3 document (it has no 'openapi: 3.x')")
    if not re.match(r"3\.[01](\.|$)", version):
        raise InvalidDocument(f"OpenAPI {version} is not supported (3.0 and 3.1 are)")

    # Imported here: only start-up with an OpenAPI source pays for it.
    from jsonschema_path import SchemaPath
    from openapi_spec_validator import OpenAPIV30SpecValidator, OpenAPIV31SpecValidator
    from referencing.exceptions import PointerToNowhere, Unresolvable

    validator_class = (
        OpenAPIV31SpecValidator if version.startswith("3.1") else OpenAPIV30SpecValidator
    )
    spec: dict[Hashable, Any] = {key: value for key, value in data.items()}
    # No handlers: a $ref to another file or URL is refused, never fetched.
    schema_path = SchemaPath.from_dict(spec, handlers={})
    try:
        error = next(iter(validator_class(schema_path).iter_errors()), None)
    except PointerToNowhere as exc:  # its ref is the pointer, without the '#'
        raise InvalidDocument(_unresolvable(f"#{exc.ref}")) from None
    except Unresolvable as exc:
        raise InvalidDocument(_unresolvable(str(exc.ref))) from None
    if error is not None:
        where = "/".join(str(part) for part in error.absolute_path)
        message = _shorten(error.message, _MAX_ERROR)
        raise InvalidDocument(
            f"it is not a valid OpenAPI {version} document: {message}"
            + (f" (at {where})" if where else "")
        )


def _unresolvable(ref: str) -> str:
    if not ref.startswith("#"):
        return f"the $ref {ref!r} points outside the document; bundle the document into one file"
    return f"the $ref {ref!r} points to nothing in the document"


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --- $ref resolution and schema conversion -------------------------------------------


class _References:
    """Looks up ``$ref`` inside the document and inlines schemas as JSON Schema."""

    def __init__(self, document: Mapping[str, Any]) -> None:
        from referencing import Registry, Resource

        self._openapi30 = str(document.get("openapi", "")).startswith("3.0")
        registry: Registry[Any] = Registry().with_resource(_DOCUMENT_URI, Resource.opaque(document))
        self._resolver = registry.resolver(base_uri=_DOCUMENT_URI)

    def lookup(self, ref: object) -> Any:
        from referencing.exceptions import Unresolvable

        if not isinstance(ref, str) or not ref.startswith("#"):
            raise InvalidDocument(_unresolvable(str(ref)))
        try:
            return self._resolver.lookup(ref).contents
        except Unresolvable:
            raise InvalidDocument(_unresolvable(ref)) from None

    def follow(self, node: Any) -> Any:
        """``node``, or what its ``$ref`` chain ends at (parameters, bodies, path items)."""
        seen: set[str] = set()
        while isinstance(node, Mapping) and "$ref" in node:
            ref = node["$ref"]
            if ref in seen:
                raise InvalidDocument(f"the $ref {ref!r} refers to itself")
            seen.add(ref)
            node = self.lookup(ref)
        return node

    def schema(self, node: Any, expanding: tuple[str, ...] = ()) -> Any:
        """``node`` as a self-contained JSON Schema: references inlined (a recursive
        one becomes an unconstrained schema where it recurs), 3.0 keywords converted."""
        if isinstance(node, bool):
            return node
        if not isinstance(node, Mapping):
            return {}
        if "$ref" in node:
            ref = node["$ref"]
            if ref in expanding:
                return {"description": "(recursive: the same structure as above)"}
            target = self.schema(self.lookup(ref), (*expanding, ref))
            siblings = {key: value for key, value in node.items() if key != "$ref"}
            if not siblings:
                return target
            merged = dict(target) if isinstance(target, Mapping) else {"allOf": [target]}
            merged.update(self.schema(siblings, expanding))
            return merged
        converted: dict[str, Any] = {}
        for key, value in node.items():
            if key in _DROPPED_KEYWORDS or key.startswith("x-"):
                continue
            if key in _SCHEMA_MAPS and isinstance(value, Mapping):
                converted[key] = {name: self.schema(sub, expanding) for name, sub in value.items()}
            elif key in _SCHEMA_LISTS and isinstance(value, list):
                converted[key] = [self.schema(sub, expanding) for sub in value]
            elif key in _SCHEMA_VALUES:
                converted[key] = (
                    [self.schema(sub, expanding) for sub in value]
                    if isinstance(value, list)
                    else self.schema(value, expanding)
                )
            else:
                converted[key] = value
        return self._from_openapi30(converted) if self._openapi30 else _examples(converted)

    def _from_openapi30(self, schema: dict[str, Any]) -> dict[str, Any]:
        if schema.pop("nullable", False):
            kind = schema.get("type")
            if isinstance(kind, str):
                schema["type"] = [kind, "null"]
            if isinstance(schema.get("enum"), list) and None not in schema["enum"]:
                schema["enum"] = [*schema["enum"], None]
            if "type" not in schema and "enum" not in schema:
                schema = {"anyOf": [schema, {"type": "null"}]}
        for bound, exclusive in (("minimum", "exclusiveMinimum"), ("maximum", "exclusiveMaximum")):
            flag = schema.get(exclusive)
            if isinstance(flag, bool):
                del schema[exclusive]
                if flag and bound in schema:
                    schema[exclusive] = schema.pop(bound)
        return _examples(schema)


def _examples(schema: dict[str, Any]) -> dict[str, Any]:
    """``example`` (OpenAPI) becomes ``examples`` (JSON Schema)."""
    if "example" in schema:
        example = schema.pop("example")
        schema.setdefault("examples", [example])
    return schema


# --- operations -----------------------------------------------------------------------


def _operation_key(operation_id: object, method: str, path: str) -> str:
    if isinstance(operation_id, str) and operation_id.strip():
        return operation_id
    slug = re.sub(r"[^A-Za-z0-9]+", "_", path).strip("_")
    return f"{method}_{slug}" if slug else method


def tool_name(source: str, key: str, taken: set[str]) -> str:
    """``<source>-<key>`` within ``^[a-zA-Z0-9_-]{1,64}$``; shortened or disambiguated
    with a hash of ``key`` where needed, so the same document always gives the same names."""
    slug = re.sub(r"[^A-Za-z0-9_-]+", "_", key).strip("_-") or "operation"
    room = 64 - len(source) - 1
    name = f"{source}-{slug}"
    if len(slug) > room or name in taken:
        digest = hashlib.sha256(key.encode()).hexdigest()[:8]
        name = f"{source}-{slug[: room - 9]}_{digest}"
    if name in taken:
        raise InvalidDocument(f"two operations would both be called {name!r}")
    return name


def _description(operation: Mapping[str, Any], method: str, path: str) -> str:
    parts = [
        str(operation[key]).strip()
        for key in ("summary", "description")
        if isinstance(operation.get(key), str) and operation[key].strip()
    ]
    if len(parts) == 2 and parts[1].startswith(parts[0]):
        parts = parts[1:]
    text = "\n\n".join(parts) or f"{method} {path}"
    if operation.get("deprecated"):
        text = f"(Deprecated.) {text}"
    return _shorten(text, _MAX_DESCRIPTION)


def _json_media_type(content: Mapping[str, Any]) -> str | None:
    types = list(content)
    for media in types:
        if media.split(";")[0].strip().lower() == "application/json":
            return media
    for media in types:
        if media.split(";")[0].strip().lower().endswith("+json"):
            return media
    return None


@dataclass
class _Arguments:
    """The arguments schema of one operation, as it is built."""

    properties: dict[str, Any] = field(default_factory=dict)
    required: list[str] = field(default_factory=list)
    bindings: list[ParameterBinding] = field(default_factory=list)

    def unique(self, name: str, location: str) -> str:
        candidate = name
        if candidate in self.properties:
            candidate = f"{location}_{name}"
        suffix = 2
        while candidate in self.properties:
            candidate = f"{location}_{name}_{suffix}"
            suffix += 1
        return candidate

    def add(self, name: str, schema: Any, *, required: bool) -> None:
        self.properties[name] = schema
        if required:
            self.required.append(name)

    def schema(self) -> dict[str, Any]:
        schema: dict[str, Any] = {
            "type": "object",
            "properties": self.properties,
            "additionalProperties": False,
        }
        if self.required:
            schema["required"] = self.required
        return schema


class _OperationReader:
    def __init__(self, references: _References, reserved_headers: frozenset[str]) -> None:
        self._refs = references
        self._ignored_headers = _IGNORED_HEADERS | reserved_headers

    def read(
        self, method: str, path: str, path_item: Mapping[str, Any], operation: Mapping[str, Any]
    ) -> Operation | SkippedOperation:
        key = _operation_key(operation.get("operationId"), method, path)
        arguments = _Arguments()
        declared: dict[tuple[str, str], Mapping[str, Any]] = {}
        # Operation-level parameters override path-level ones with the same name and place.
        for raw in [*path_item.get("parameters", []), *operation.get("parameters", [])]:
            parameter = self._refs.follow(raw)
            if isinstance(parameter, Mapping):
                declared[(str(parameter.get("name")), str(parameter.get("in")))] = parameter
        for (name, location), parameter in declared.items():
            problem = self._add_parameter(arguments, name, location, parameter)
            if problem:
                return SkippedOperation(key, problem)

        body_argument = body_media_type = None
        if "requestBody" in operation:
            body = self._refs.follow(operation["requestBody"])
            content = body.get("content", {}) if isinstance(body, Mapping) else {}
            body_media_type = _json_media_type(content)
            required = bool(body.get("required", False)) if isinstance(body, Mapping) else False
            if body_media_type is None:
                if required:
                    return SkippedOperation(
                        key, f"its request body is {', '.join(content) or 'empty'}; only JSON is"
                    )
            else:
                schema = self._refs.schema(content[body_media_type].get("schema", {}))
                text = body.get("description") if isinstance(body, Mapping) else None
                if isinstance(text, str) and text.strip() and isinstance(schema, dict):
                    schema = {**schema, "description": text.strip()}
                body_argument = arguments.unique("body", "request")
                arguments.add(body_argument, schema, required=required)

        return Operation(
            key=key,
            method=method.upper(),
            path=path,
            description=_description(operation, method.upper(), path),
            parameters=arguments.schema(),
            bindings=tuple(arguments.bindings),
            body_argument=body_argument,
            body_media_type=body_media_type,
        )

    def _add_parameter(
        self, arguments: _Arguments, name: str, location: str, parameter: Mapping[str, Any]
    ) -> str | None:
        """Add one parameter; a reason if the operation cannot be offered."""
        required = location == "path" or bool(parameter.get("required", False))
        place = _LOCATIONS.get(location)
        if place is None:  # a cookie
            return f"its required parameter {name!r} is a {location}" if required else None
        if place == "header" and name.lower() in self._ignored_headers:
            return None
        json_encoded = "schema" not in parameter and isinstance(parameter.get("content"), Mapping)
        if json_encoded:
            media: object = next(iter(parameter["content"].values()), {})
            raw_schema = media.get("schema", {}) if isinstance(media, Mapping) else {}
        else:
            raw_schema = parameter.get("schema", {})
        schema = self._refs.schema(raw_schema)
        text = parameter.get("description")
        if isinstance(text, str) and text.strip() and isinstance(schema, dict):
            schema = {**schema, "description": text.strip()}
        style = parameter.get("style", "form" if location == "query" else "simple")
        argument = arguments.unique(name, location)
        arguments.add(argument, schema, required=required)
        arguments.bindings.append(
            ParameterBinding(
                argument=argument,
                name=name,
                location=place,
                explode=bool(parameter.get("explode", style == "form")),
                json_encoded=json_encoded,
            )
        )
        return None


def _operations(
    document: Mapping[str, Any], reserved_headers: frozenset[str]
) -> Iterator[Operation | SkippedOperation]:
    references = _References(document)
    reader = _OperationReader(references, reserved_headers)
    paths = document.get("paths") or {}
    for path, raw_item in paths.items():
        path_item = references.follow(raw_item)
        if not isinstance(path_item, Mapping):
            continue
        for method in HTTP_METHODS:
            operation = path_item.get(method)
            if isinstance(operation, Mapping):
                yield reader.read(method, str(path), path_item, operation)


def server_url(document: Mapping[str, Any], document_url: str | None) -> str | None:
    """The first server's URL with its variables' defaults, made absolute if possible."""
    servers = document.get("servers")
    first: Mapping[str, Any] = (
        servers[0]
        if isinstance(servers, list) and servers and isinstance(servers[0], Mapping)
        else {}
    )
    url = str(first.get("url") or "/")
    variables = first.get("variables")
    for name, variable in variables.items() if isinstance(variables, Mapping) else ():
        if isinstance(variable, Mapping):
            url = url.replace("{" + str(name) + "}", str(variable.get("default", "")))
    if httpx.URL(url).is_absolute_url:
        return url
    if document_url is None:
        return None
    return str(httpx.URL(document_url).join(url))


def read_document(
    raw: bytes, document_url: str | None = None, *, reserved_headers: Iterable[str] = ()
) -> ParsedDocument:
    """Parse, validate and describe a document; :class:`InvalidDocument` if it cannot be used.

    ``reserved_headers`` are set by Lamina (the source's credential header): a header
    parameter of that name is left out of the arguments, never the model's to choose.
    """
    data = parse_document(raw)
    validate_document(data)
    operations: list[Operation] = []
    skipped: list[SkippedOperation] = []
    seen: set[str] = set()
    for item in _operations(data, frozenset(name.lower() for name in reserved_headers)):
        if item.key in seen:
            raise InvalidDocument(f"the operationId {item.key!r} is used twice")
        seen.add(item.key)
        if isinstance(item, Operation):
            operations.append(item)
        else:
            skipped.append(item)
    info = data.get("info")
    return ParsedDocument(
        title=str(info.get("title", "")) if isinstance(info, Mapping) else "",
        operations=tuple(operations),
        skipped=tuple(skipped),
        server_url=server_url(data, document_url),
    )
