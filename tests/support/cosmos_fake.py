"""A protocol-level fake of Azure Cosmos DB for NoSQL, served over HTTPS on loopback.

It speaks enough of the REST API for what the real ``azure-cosmos`` SDK sends on behalf of
the conversation store and the audit log: the database account (``GET /``), databases and
containers (read, create), partition key ranges, documents (create, upsert, read, replace,
patch, delete, with ETags and 404 / 409 / 412), transactional batches (all or nothing: the
failed operation carries its status, the others 424), SQL queries (single-partition,
hierarchical-prefix by effective partition key range, and cross-partition filters the gateway
serves itself, and ``DISTINCT`` ones through a query plan, as the service does), continuation
tokens, and time-to-live expiry.

What it checks, as the service would:

- every request is signed: ``type=master`` with a valid HMAC of verb, resource type,
  resource link and ``x-ms-date`` under the account key, or ``type=aad`` with the token
  the fake was told to accept. An Entra token may not create databases or containers
  (data-plane RBAC has no such action), as in the service.
- a document's partition key values match the partition key header; ids are strings
  without ``/ \\ ? #``; ``ttl`` is a non-zero integer or -1 (never null or a fraction);
  an item's ``ttl`` counts only when the container has a ``defaultTtl``.
- SQL is evaluated by a tiny interpreter of exactly the shapes the stores issue
  (``SELECT [TOP n] * | [DISTINCT] c.a, c.b | [DISTINCT] VALUE c.a FROM c
  [WHERE c.x op v AND ...] [ORDER BY c.x [DESC]]``); anything else is a 400, so a query
  the fake cannot vouch for fails a test instead of passing by accident. A cross-partition
  ``DISTINCT`` query is refused by the gateway with substatus 1004 (not directly
  servable), as by the service: the SDK then asks for the query plan, runs the query on
  each partition key range and merges the ranges' distinct results itself. Cross-partition
  queries with ``ORDER BY`` or ``TOP`` would need plans the fake does not make, and are
  refused.

Time to live is measured from the exact instant of the last write (the service measures
from ``_ts``, in whole seconds); ``advance(seconds)`` moves the fake's clock forward.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import hmac
import json
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tests.support.https import serve_https

_PAGE_SIZE = 100
"""Items per query page when the request names no page size."""
_MAX_BATCH = 100
_ID_FORBIDDEN = re.compile(r"[/\\?#]")
_MAX_TTL = 2_147_483_647
_PRECONDITION = (
    "Operation cannot be performed because one of the specified precondition is not met."
)
_CROSS_PARTITION_NOT_SERVABLE = 1004
_NOT_SERVABLE = (
    "The provided cross partition query can not be directly served by the gateway. This is a "
    "first chance (internal) exception that all newer clients will know how to handle "
    "gracefully."
)


# --- effective partition keys (MurmurHash3 x64 128, as the service hashes V2 keys) ------


def _rotl(value: int, shift: int) -> int:
    return ((value << shift) | (value >> (64 - shift))) & 0xFFFFFFFFFFFFFFFF


def _fmix(value: int) -> int:
    value ^= value >> 33
    value = (value * 0xFF51AFD7ED558CCD) & 0xFFFFFFFFFFFFFFFF
    value ^= value >> 33
    value = (value * 0xC4CEB9FE1A85EC53) & 0xFFFFFFFFFFFFFFFF
    value ^= value >> 33
    return value


def murmurhash3_128(data: bytes) -> tuple[int, int]:
    """MurmurHash3 x64 128 with seed 0: the two 64-bit halves (h1, h2)."""
    mask = 0xFFFFFFFFFFFFFFFF
    c1, c2 = 0x87C37B91114253D5, 0x4CF5AD432745937F
    h1 = h2 = 0
    blocks = len(data) // 16
    for i in range(blocks):
        k1 = int.from_bytes(data[i * 16 : i * 16 + 8], "little")
        k2 = int.from_bytes(data[i * 16 + 8 : i * 16 + 16], "little")
        k1 = (_rotl((k1 * c1) & mask, 31) * c2) & mask
        h1 = ((_rotl(h1 ^ k1, 27) + h2) * 5 + 0x52DCE729) & mask
        k2 = (_rotl((k2 * c2) & mask, 33) * c1) & mask
        h2 = ((_rotl(h2 ^ k2, 31) + h1) * 5 + 0x38495AB5) & mask
    tail = data[blocks * 16 :]
    k1 = int.from_bytes(tail[:8], "little") if tail else 0
    k2 = int.from_bytes(tail[8:], "little") if len(tail) > 8 else 0
    if len(tail) > 8:
        h2 ^= (_rotl((k2 * c2) & mask, 33) * c1) & mask
    if tail:
        h1 ^= (_rotl((k1 * c1) & mask, 31) * c2) & mask
    h1 ^= len(data)
    h2 ^= len(data)
    h1 = (h1 + h2) & mask
    h2 = (h2 + h1) & mask
    h1, h2 = _fmix(h1), _fmix(h2)
    h1 = (h1 + h2) & mask
    h2 = (h2 + h1) & mask
    return h1, h2


def effective_partition_key(values: list[Any]) -> str:
    """The hex effective partition key of a hierarchical (MultiHash, V2) key: one 128-bit
    hash per component, each with its two top bits cleared (a one-path Hash V2 key is
    hashed as its one component)."""
    parts: list[str] = []
    for value in values:
        if not isinstance(value, str):
            raise ValueError("the fake hashes string partition key components only")
        h1, h2 = murmurhash3_128(b"\x08" + value.encode() + b"\xff")
        digest = bytearray(reversed(h1.to_bytes(8, "little") + h2.to_bytes(8, "little")))
        digest[0] &= 0x3F
        parts.append(digest.hex().upper())
    return "".join(parts)


# --- SQL: the shapes the store issues, and nothing else -------------------------------------


class SqlError(ValueError):
    pass


_TOKEN = re.compile(
    r"\s*(?:(?P<string>'(?:[^'\\]|\\.)*')|(?P<number>-?\d+(?:\.\d+)?)"
    r"|(?P<param>@\w+)|(?P<op><=|>=|!=|<>|=|<|>)|(?P<punct>[*,().])|(?P<word>[A-Za-z_]\w*))"
)
_UNDEFINED = object()


@dataclass(frozen=True)
class _Comparison:
    path: tuple[str, ...]
    op: str
    values: tuple[Any, ...]
    """Parameter names (``@x``) resolve at evaluation; other values are literals."""


@dataclass(frozen=True)
class _Query:
    top: Any | None
    distinct: bool
    projection: tuple[tuple[str, ...], ...] | None
    """None: ``*``."""
    value: tuple[str, ...] | None
    """``SELECT VALUE`` of this path (then ``projection`` is None)."""
    where: tuple[_Comparison, ...]
    order_by: tuple[tuple[str, ...], bool] | None
    """(path, descending)."""


class _Parser:
    def __init__(self, text: str) -> None:
        self.tokens: list[tuple[str, str]] = []
        position = 0
        text = text.strip()
        while position < len(text):
            match = _TOKEN.match(text, position)
            if match is None or match.end() == position:
                raise SqlError(f"Syntax error near {text[position : position + 20]!r}")
            kind = match.lastgroup or ""
            self.tokens.append((kind, match.group(kind)))
            position = match.end()
        self.index = 0
        self.alias = ""

    def peek(self) -> tuple[str, str] | None:
        return self.tokens[self.index] if self.index < len(self.tokens) else None

    def take(self) -> tuple[str, str]:
        token = self.peek()
        if token is None:
            raise SqlError("Syntax error: unexpected end of query")
        self.index += 1
        return token

    def keyword(self, word: str) -> bool:
        token = self.peek()
        if token is not None and token[0] == "word" and token[1].upper() == word:
            self.index += 1
            return True
        return False

    def expect_keyword(self, word: str) -> None:
        if not self.keyword(word):
            raise SqlError(f"Syntax error: expected {word}")

    def expect(self, punct: str) -> None:
        if self.take() != ("punct", punct):
            raise SqlError(f"Syntax error: expected {punct!r}")

    def path(self) -> tuple[str, ...]:
        kind, word = self.take()
        if kind != "word" or word != self.alias:
            raise SqlError(f"Syntax error: expected a property of {self.alias}")
        parts: list[str] = []
        while self.peek() == ("punct", "."):
            self.index += 1
            kind, name = self.take()
            if kind != "word":
                raise SqlError("Syntax error: expected a property name")
            parts.append(name)
        if not parts:
            raise SqlError("the fake evaluates properties only, not whole documents")
        return tuple(parts)

    def value(self) -> Any:
        kind, text = self.take()
        if kind == "param":
            return text
        if kind == "string":
            return ("literal", re.sub(r"\\(.)", r"\1", text[1:-1]))
        if kind == "number":
            return ("literal", float(text) if "." in text else int(text))
        if kind == "word" and text.lower() in ("true", "false", "null"):
            return ("literal", {"true": True, "false": False, "null": None}[text.lower()])
        raise SqlError(f"Syntax error: unexpected {text!r}")

    def parse(self) -> _Query:
        # The alias is the word after FROM; look it up first so paths can be checked.
        words = [t[1] for t in self.tokens]
        upper = [w.upper() for w in words]
        if "FROM" not in upper or upper.index("FROM") + 1 >= len(words):
            raise SqlError("Syntax error: expected FROM <alias>")
        self.alias = words[upper.index("FROM") + 1]
        self.expect_keyword("SELECT")
        top = None
        if self.keyword("TOP"):
            top = self.value()
        distinct = self.keyword("DISTINCT")
        projection: tuple[tuple[str, ...], ...] | None = None
        value: tuple[str, ...] | None = None
        if self.keyword("VALUE"):
            value = self.path()
        elif self.peek() == ("punct", "*"):
            if distinct:
                raise SqlError("Syntax error: DISTINCT takes properties or VALUE, not *")
            self.index += 1
        else:
            paths = [self.path()]
            while self.peek() == ("punct", ","):
                self.index += 1
                paths.append(self.path())
            projection = tuple(paths)
        self.expect_keyword("FROM")
        self.take()  # the alias
        where: list[_Comparison] = []
        if self.keyword("WHERE"):
            where.append(self.comparison())
            while self.keyword("AND"):
                where.append(self.comparison())
        order_by = None
        if self.keyword("ORDER"):
            self.expect_keyword("BY")
            path = self.path()
            descending = self.keyword("DESC")
            if not descending:
                self.keyword("ASC")
            order_by = (path, descending)
        rest = self.peek()
        if rest is not None:
            raise SqlError(f"Syntax error: unexpected {rest[1]!r}")
        return _Query(top, distinct, projection, value, tuple(where), order_by)

    def comparison(self) -> _Comparison:
        path = self.path()
        if self.keyword("IN"):
            self.expect("(")
            values = [self.value()]
            while self.peek() == ("punct", ","):
                self.index += 1
                values.append(self.value())
            self.expect(")")
            return _Comparison(path, "IN", tuple(values))
        kind, op = self.take()
        if kind != "op":
            raise SqlError(f"Syntax error: expected a comparison, got {op!r}")
        return _Comparison(path, "!=" if op == "<>" else op, (self.value(),))


def _type_rank(value: Any) -> int:
    if value is _UNDEFINED:
        return 0
    if value is None:
        return 1
    if isinstance(value, bool):
        return 2
    if isinstance(value, int | float):
        return 3
    if isinstance(value, str):
        return 4
    return 5


def _lookup(document: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    value: Any = document
    for part in path:
        if not isinstance(value, Mapping) or part not in value:
            return _UNDEFINED
        value = value[part]
    return value


def _compare(left: Any, op: str, right: Any) -> bool:
    """Cosmos semantics: comparing different types (or an undefined property) is undefined,
    which a WHERE clause treats as false."""
    if left is _UNDEFINED or _type_rank(left) != _type_rank(right):
        return False
    if op == "=":
        return bool(left == right)
    if op == "!=":
        return bool(left != right)
    if _type_rank(left) not in (3, 4):
        return False
    ordered = {
        "<": left < right,
        "<=": left <= right,
        ">": left > right,
        ">=": left >= right,
    }
    return bool(ordered[op])


def _resolve(value: Any, parameters: Mapping[str, Any]) -> Any:
    if isinstance(value, tuple):
        return value[1]
    if value not in parameters:
        raise SqlError(f"The parameter {value} is not defined")
    return parameters[value]


# --- the account's state ----------------------------------------------------------------


@dataclass
class _Document:
    body: dict[str, Any]
    partition_key: tuple[str, ...]
    epk: str
    etag: str
    written_at: float
    rid: str


@dataclass
class _Container:
    properties: dict[str, Any]
    documents: dict[tuple[tuple[str, ...], str], _Document] = field(default_factory=dict)
    next_document: int = 1

    @property
    def paths(self) -> list[str]:
        return list(self.properties["partitionKey"]["paths"])


@dataclass
class _Database:
    properties: dict[str, Any]
    containers: dict[str, _Container] = field(default_factory=dict)


@dataclass(frozen=True)
class CosmosRequest:
    """One request as the fake saw it (after authentication)."""

    method: str
    path: str
    resource_type: str
    operation: str
    """``account``, ``read``, ``create``, ``upsert``, ``replace``, ``patch``, ``delete``,
    ``query``, ``batch``, ``pkranges``, ``query-plan``."""
    auth: str
    """``master`` or ``aad``."""
    partition_key: tuple[str, ...] | None
    headers: dict[str, str]
    """Header names in lower case."""
    body: Any
    status: int
    results: int | None = None
    """How many results (items or values) a query answered with."""


class _Reply(Exception):
    """An error answer, raised from deep inside a handler; ``substatus`` goes in
    ``x-ms-substatus``."""

    def __init__(self, status: int, code: str, message: str, substatus: int | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.substatus = substatus


def _check_etag(document: _Document, if_match: str | None) -> _Document:
    """``document``, unless the request's If-Match names an etag it no longer has (412)."""
    if if_match is not None and if_match != document.etag:
        raise _Reply(412, "PreconditionFailed", _PRECONDITION)
    return document


@dataclass
class FakeCosmos:
    """An account with one endpoint. Give it ``key`` (base64, as Azure issues them) to
    accept master-key signatures, ``token`` to accept that Entra token; None refuses."""

    key: str | None = field(
        default_factory=lambda: base64.b64encode(uuid.uuid4().bytes * 4).decode()
    )
    token: str | None = None
    endpoint: str = ""
    offset_s: float = 0.0
    clock: Callable[[], float] = time.time
    requests: list[CosmosRequest] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    """Why each refused request (401 / 403) was refused."""
    failures: dict[str, list[int]] = field(default_factory=dict)
    """Statuses the next requests of an operation answer with (see :meth:`fail_next`)."""
    _databases: dict[str, _Database] = field(default_factory=dict)
    _lock: threading.RLock = field(default_factory=threading.RLock)

    # --- for tests -------------------------------------------------------------------------

    def now(self) -> float:
        return self.clock() + self.offset_s

    def advance(self, seconds: float) -> None:
        """Move the fake's clock forward (items expire as if that much time had passed)."""
        with self._lock:
            self.offset_s += seconds

    def reset(self) -> None:
        """Forget every database and request (a fresh account for the next test)."""
        with self._lock:
            self._databases.clear()
            self.requests.clear()
            self.refused.clear()
            self.failures.clear()
            self.offset_s = 0.0

    def create_container(
        self,
        database: str,
        container: str,
        *,
        partition_key_paths: list[str],
        default_ttl: int | None = -1,
        kind: str = "MultiHash",
    ) -> None:
        """What infra/ does before the service starts (Entra callers cannot create it).
        ``kind`` ``Hash`` is a plain key of one path."""
        with self._lock:
            db = self._databases.get(database) or self._new_database(database)
            body: dict[str, Any] = {
                "id": container,
                "partitionKey": {"paths": partition_key_paths, "kind": kind, "version": 2},
            }
            if default_ttl is not None:
                body["defaultTtl"] = default_ttl
            self._new_container(db, body)

    def documents(
        self, database: str, container: str
    ) -> list[tuple[tuple[str, ...], dict[str, Any]]]:
        """Every live document of a container with its partition key, in write order."""
        with self._lock:
            found = self._databases[database].containers[container]
            self._expire(found)
            docs = sorted(found.documents.values(), key=lambda d: d.rid)
            return [(d.partition_key, copy.deepcopy(d.body)) for d in docs]

    def fail_next(self, operation: str, status: int = 503, *, times: int = 1) -> None:
        """Answer the next ``times`` requests of ``operation`` (e.g. ``batch``) with
        ``status``, writing nothing: a request the service lost, or a writer that died."""
        with self._lock:
            self.failures.setdefault(operation, []).extend([status] * times)

    def count(self, operation: str) -> int:
        with self._lock:
            return sum(1 for r in self.requests if r.operation == operation)

    # --- authentication -------------------------------------------------------------------

    def _authenticate(self, method: str, segments: list[str], headers: Mapping[str, str]) -> str:
        raw = headers.get("authorization")
        if raw is None:
            raise _Reply(401, "Unauthorized", "Required Header authorization is missing.")
        fields = dict(part.split("=", 1) for part in unquote(raw).split("&") if "=" in part)
        kind, signature = fields.get("type"), fields.get("sig", "")
        if fields.get("ver") != "1.0" or kind not in ("master", "aad"):
            raise _Reply(401, "Unauthorized", "The authorization header is malformed.")
        if kind == "aad":
            if self.token is None or not hmac.compare_digest(signature, self.token):
                raise _Reply(401, "Unauthorized", "The AAD token is not valid for this account.")
            return "aad"
        if self.key is None:
            raise _Reply(401, "Unauthorized", "Local authorization is disabled.")
        date = headers.get("x-ms-date")
        if not date:
            raise _Reply(401, "Unauthorized", "The x-ms-date header is missing.")
        resource_type, link = _resource_of(segments)
        text = f"{method.lower()}\n{resource_type.lower()}\n{link}\n{date.lower()}\n\n"
        expected = base64.b64encode(
            hmac.new(base64.b64decode(self.key), text.encode(), hashlib.sha256).digest()
        ).decode()
        if not hmac.compare_digest(signature, expected):
            raise _Reply(
                401,
                "Unauthorized",
                "The input authorization token can't serve the request. The wrong key is being "
                f"used or the expected payload is not built as per the protocol: {text!r}",
            )
        return "master"

    # --- dispatch ---------------------------------------------------------------------------

    def handle(
        self, method: str, segments: list[str], headers: Mapping[str, str], raw_body: bytes
    ) -> tuple[int, Any, dict[str, str]]:
        with self._lock:
            try:
                auth = self._authenticate(method, segments, headers)
            except _Reply as reply:
                self.refused.append(reply.message)
                return reply.status, {"code": reply.code, "message": reply.message}, {}
            body: Any = None
            if raw_body:
                try:
                    body = json.loads(raw_body)
                except json.JSONDecodeError:
                    return 400, {"code": "BadRequest", "message": "The body is not JSON."}, {}
            operation = _operation(method, segments, headers)
            pk_header = headers.get("x-ms-documentdb-partitionkey")
            partition_key = tuple(json.loads(pk_header)) if pk_header else None
            try:
                pending = self.failures.get(operation)
                if pending:
                    failed = pending.pop(0)
                    raise _Reply(failed, "ServiceUnavailable", "Injected failure.")
                status, answer, extra = self._route(
                    method, segments, headers, body, auth, operation, partition_key
                )
            except _Reply as reply:
                status, answer, extra = (
                    reply.status,
                    {"code": reply.code, "message": reply.message},
                    {} if reply.substatus is None else {"x-ms-substatus": str(reply.substatus)},
                )
                if status == 403:
                    self.refused.append(reply.message)
            self.requests.append(
                CosmosRequest(
                    method,
                    "/" + "/".join(segments),
                    _resource_of(segments)[0],
                    operation,
                    auth,
                    partition_key,
                    dict(headers),
                    body,
                    status,
                    int(extra["x-ms-item-count"]) if "x-ms-item-count" in extra else None,
                )
            )
            return status, answer, extra

    def _route(
        self,
        method: str,
        segments: list[str],
        headers: Mapping[str, str],
        body: Any,
        auth: str,
        operation: str,
        partition_key: tuple[str, ...] | None,
    ) -> tuple[int, Any, dict[str, str]]:
        n = len(segments)
        if n == 0 and method == "GET":
            return 200, self._account(), {}
        if segments[0] != "dbs":
            raise _Reply(404, "NotFound", "Resource Not Found")
        if n == 1 and method == "POST":
            if auth == "aad":
                raise _Reply(403, "Forbidden", _RBAC_MANAGEMENT)
            return self._create_database(body)
        if n == 1:
            raise _Reply(405, "MethodNotAllowed", "Method not allowed")
        database = self._databases.get(segments[1])
        if database is None:
            raise _Reply(404, "NotFound", f"Database {segments[1]} does not exist.")
        if n == 2 and method == "GET":
            return 200, database.properties, {"etag": database.properties["_etag"]}
        if n == 3 and segments[2] == "colls" and method == "POST":
            if auth == "aad":
                raise _Reply(403, "Forbidden", _RBAC_MANAGEMENT)
            return self._create_container(database, body)
        if n < 4 or segments[2] != "colls":
            raise _Reply(404, "NotFound", "Resource Not Found")
        container = database.containers.get(segments[3])
        if container is None:
            raise _Reply(404, "NotFound", f"Container {segments[3]} does not exist.")
        self._expire(container)
        if n == 4 and method == "GET":
            return 200, container.properties, {"etag": container.properties["_etag"]}
        if n == 5 and segments[4] == "pkranges" and method == "GET":
            return self._partition_key_ranges(container, headers)
        if n < 5 or segments[4] != "docs":
            raise _Reply(404, "NotFound", "Resource Not Found")
        if n == 5 and method == "POST":
            if operation == "query-plan":
                return self._query_plan(body)
            if operation == "batch":
                return self._batch(container, partition_key, headers, body)
            if operation == "query":
                return self._query(container, partition_key, headers, body)
            if partition_key is None:
                raise _Reply(400, "BadRequest", "The partition key header is missing.")
            document = self._write(
                container,
                partition_key,
                body,
                upsert=operation == "upsert",
                if_match=headers.get("if-match"),
            )
            return (
                (201 if document[1] else 200),
                self._render(container, document[0]),
                {"etag": document[0].etag},
            )
        if n == 6:
            if partition_key is None:
                raise _Reply(400, "BadRequest", "The partition key header is missing.")
            item_id = segments[5]
            if method == "GET":
                found = self._find(container, partition_key, item_id)
                return 200, self._render(container, found), {"etag": found.etag}
            if method == "PUT":
                if not isinstance(body, dict) or body.get("id") != item_id:
                    raise _Reply(400, "BadRequest", "The id in the body differs from the URL.")
                updated = self._replace(container, partition_key, body, headers.get("if-match"))
                return 200, self._render(container, updated), {"etag": updated.etag}
            if method == "PATCH":
                updated = self._patch(
                    container, partition_key, item_id, body, headers.get("if-match")
                )
                return 200, self._render(container, updated), {"etag": updated.etag}
            if method == "DELETE":
                self._delete(container, partition_key, item_id, headers.get("if-match"))
                return 204, None, {}
        raise _Reply(405, "MethodNotAllowed", "Method not allowed")

    # --- databases, containers, ranges -------------------------------------------------------

    def _account(self) -> dict[str, Any]:
        location = {"name": "Fake Region", "databaseAccountEndpoint": self.endpoint}
        return {
            "_self": "",
            "id": "fake",
            "_rid": "fake.documents.azure.com",
            "media": "//media/",
            "addresses": "//addresses/",
            "_dbs": "//dbs/",
            "writableLocations": [location],
            "readableLocations": [location],
            "enableMultipleWriteLocations": False,
            "userReplicationPolicy": {"asyncReplication": False, "minReplicaSetSize": 1},
            "userConsistencyPolicy": {"defaultConsistencyLevel": "Session"},
            "systemReplicationPolicy": {"minReplicaSetSize": 1, "maxReplicasetSize": 4},
            "readPolicy": {"primaryReadCoefficient": 1, "secondaryReadCoefficient": 1},
            "queryEngineConfiguration": json.dumps({"maxSqlQueryInputLength": 262144}),
        }

    def _new_database(self, name: str) -> _Database:
        rid = base64.b64encode((len(self._databases) + 1).to_bytes(4, "big")).decode()
        database = _Database(
            {
                "id": name,
                "_rid": rid,
                "_self": f"dbs/{rid}/",
                "_etag": f'"{uuid.uuid4()}"',
                "_colls": "colls/",
                "_users": "users/",
                "_ts": int(self.now()),
            }
        )
        self._databases[name] = database
        return database

    def _create_database(self, body: Any) -> tuple[int, Any, dict[str, str]]:
        name = body.get("id") if isinstance(body, dict) else None
        if not isinstance(name, str) or not name:
            raise _Reply(400, "BadRequest", "A database needs an id.")
        if name in self._databases:
            raise _Reply(409, "Conflict", "Resource with specified id or name already exists.")
        return 201, self._new_database(name).properties, {}

    def _new_container(self, database: _Database, body: dict[str, Any]) -> _Container:
        key = body.get("partitionKey")
        paths = key.get("paths") if isinstance(key, dict) else None
        kind = key.get("kind") if isinstance(key, dict) else None
        if (
            not isinstance(paths, list)
            or not 1 <= len(paths) <= (1 if kind == "Hash" else 3)
            or kind not in ("MultiHash", "Hash")
            or key.get("version") != 2  # type: ignore[union-attr]
        ):
            raise _Reply(
                400,
                "BadRequest",
                "The fake serves hierarchical (MultiHash v2) keys and one-path Hash v2 keys only.",
            )
        ttl = body.get("defaultTtl")
        if ttl is not None and (not isinstance(ttl, int) or ttl == 0 or ttl < -1):
            raise _Reply(400, "BadRequest", "defaultTtl must be a non-zero integer or -1.")
        db_rid = base64.b64decode(database.properties["_rid"])
        rid = base64.b64encode(
            db_rid + (len(database.containers) + 1 | 0x80000000).to_bytes(4, "big")
        ).decode()
        properties = {
            **body,
            "indexingPolicy": body.get("indexingPolicy") or {"indexingMode": "consistent"},
            "_rid": rid,
            "_self": f"dbs/{database.properties['_rid']}/colls/{rid}/",
            "_etag": f'"{uuid.uuid4()}"',
            "_docs": "docs/",
            "_sprocs": "sprocs/",
            "_triggers": "triggers/",
            "_udfs": "udfs/",
            "_conflicts": "conflicts/",
            "_ts": int(self.now()),
        }
        container = _Container(properties)
        database.containers[body["id"]] = container
        return container

    def _create_container(self, database: _Database, body: Any) -> tuple[int, Any, dict[str, str]]:
        name = body.get("id") if isinstance(body, dict) else None
        if not isinstance(name, str) or not name:
            raise _Reply(400, "BadRequest", "A container needs an id.")
        if name in database.containers:
            raise _Reply(409, "Conflict", "Resource with specified id or name already exists.")
        return 201, self._new_container(database, body).properties, {}

    def _partition_key_ranges(
        self, container: _Container, headers: Mapping[str, str]
    ) -> tuple[int, Any, dict[str, str]]:
        # One physical partition covering every effective partition key; its ETag never
        # changes, so the SDK's change-feed drain ends on a 304.
        etag = f'"{container.properties["_rid"]}-ranges"'
        if headers.get("if-none-match") == etag:
            return 304, None, {"etag": etag}
        ranges = [
            {
                "id": "0",
                "_rid": container.properties["_rid"] + "AgAAAAAAAAA=",
                "minInclusive": "",
                "maxExclusive": "FF",
                "ridPrefix": 0,
                "throughputFraction": 1.0,
                "status": "online",
                "parents": [],
                "_etag": etag,
                "_ts": int(self.now()),
            }
        ]
        body = {"_rid": container.properties["_rid"], "PartitionKeyRanges": ranges, "_count": 1}
        return 200, body, {"etag": etag}

    # --- documents ----------------------------------------------------------------------------

    def _expire(self, container: _Container) -> None:
        default = container.properties.get("defaultTtl")
        if default is None:
            return  # time to live is off: an item's own ttl does not count
        now = self.now()
        for slot, document in list(container.documents.items()):
            ttl = document.body.get("ttl", default)
            if ttl != -1 and document.written_at + ttl <= now:
                del container.documents[slot]

    def _find(
        self, container: _Container, partition_key: tuple[str, ...], item_id: str
    ) -> _Document:
        found = container.documents.get((partition_key, item_id))
        if found is None:
            raise _Reply(
                404, "NotFound", "Entity with the specified id does not exist in the system."
            )
        return found

    def _checked(
        self, container: _Container, partition_key: tuple[str, ...], body: Any
    ) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise _Reply(400, "BadRequest", "A document must be a JSON object.")
        item_id = body.get("id")
        if not isinstance(item_id, str) or not item_id or _ID_FORBIDDEN.search(item_id):
            raise _Reply(400, "BadRequest", f"The id {item_id!r} is not a valid document id.")
        if len(item_id) > 255:
            raise _Reply(400, "BadRequest", "The id is longer than 255 characters.")
        values = tuple(body.get(path.lstrip("/")) for path in container.paths)
        if values != partition_key:
            raise _Reply(
                400,
                "BadRequest",
                "PartitionKey extracted from document doesn't match the one specified in the "
                "header.",
            )
        if "ttl" in body:
            ttl = body["ttl"]
            if (
                isinstance(ttl, bool)
                or not isinstance(ttl, int)
                or ttl == 0
                or ttl < -1
                or ttl > _MAX_TTL
            ):
                raise _Reply(400, "BadRequest", f"The ttl {ttl!r} is not a non-zero integer or -1.")
        return {k: v for k, v in body.items() if not k.startswith("_")}

    def _store(
        self,
        container: _Container,
        partition_key: tuple[str, ...],
        body: dict[str, Any],
        rid: str | None,
    ) -> _Document:
        if rid is None:
            rid = base64.b64encode(
                base64.b64decode(container.properties["_rid"])
                + container.next_document.to_bytes(8, "big")
            ).decode()
            container.next_document += 1
        document = _Document(
            body=body,
            partition_key=partition_key,
            epk=effective_partition_key(list(partition_key)),
            etag=f'"{uuid.uuid4()}"',
            written_at=self.now(),
            rid=rid,
        )
        container.documents[(partition_key, body["id"])] = document
        return document

    def _write(
        self,
        container: _Container,
        partition_key: tuple[str, ...],
        body: Any,
        *,
        upsert: bool,
        if_match: str | None,
    ) -> tuple[_Document, bool]:
        checked = self._checked(container, partition_key, body)
        existing = container.documents.get((partition_key, checked["id"]))
        if existing is not None and not upsert:
            raise _Reply(
                409, "Conflict", "Entity with the specified id already exists in the system."
            )
        if existing is not None:
            _check_etag(existing, if_match)
        return self._store(
            container, partition_key, checked, existing.rid if existing else None
        ), existing is None

    def _replace(
        self, container: _Container, partition_key: tuple[str, ...], body: Any, if_match: str | None
    ) -> _Document:
        checked = self._checked(container, partition_key, body)
        existing = _check_etag(self._find(container, partition_key, checked["id"]), if_match)
        return self._store(container, partition_key, checked, existing.rid)

    def _patch(
        self,
        container: _Container,
        partition_key: tuple[str, ...],
        item_id: str,
        body: Any,
        if_match: str | None,
    ) -> _Document:
        existing = _check_etag(self._find(container, partition_key, item_id), if_match)
        operations = body.get("operations") if isinstance(body, dict) else None
        if not isinstance(operations, list) or not operations or "condition" in body:
            raise _Reply(400, "BadRequest", "The fake patches with a list of operations only.")
        patched = copy.deepcopy(existing.body)
        for operation in operations:
            op, path = operation.get("op"), operation.get("path", "")
            name = path[1:] if isinstance(path, str) and path.startswith("/") else ""
            if not name or "/" in name or name == "id" or f"/{name}" in container.paths:
                raise _Reply(400, "BadRequest", f"The fake cannot patch {path!r}.")
            if op in ("set", "add", "replace"):
                if op == "replace" and name not in patched:
                    raise _Reply(400, "BadRequest", f"{path} does not exist.")
                patched[name] = operation.get("value")
            elif op == "remove":
                if name not in patched:
                    raise _Reply(400, "BadRequest", f"{path} does not exist.")
                del patched[name]
            elif op == "incr":
                patched[name] = patched.get(name, 0) + operation.get("value", 0)
            else:
                raise _Reply(400, "BadRequest", f"The fake does not patch with {op!r}.")
        # The id cannot be patched, so this replaces the document just checked.
        return self._replace(container, partition_key, patched, None)

    def _delete(
        self,
        container: _Container,
        partition_key: tuple[str, ...],
        item_id: str,
        if_match: str | None,
    ) -> None:
        _check_etag(self._find(container, partition_key, item_id), if_match)
        del container.documents[(partition_key, item_id)]

    def _render(self, container: _Container, document: _Document) -> dict[str, Any]:
        return {
            **copy.deepcopy(document.body),
            "_rid": document.rid,
            "_self": f"{container.properties['_self']}docs/{document.rid}/",
            "_etag": document.etag,
            "_attachments": "attachments/",
            "_ts": int(document.written_at),
        }

    # --- transactional batch ---------------------------------------------------------------------

    def _batch(
        self,
        container: _Container,
        partition_key: tuple[str, ...] | None,
        headers: Mapping[str, str],
        body: Any,
    ) -> tuple[int, Any, dict[str, str]]:
        if partition_key is None:
            raise _Reply(400, "BadRequest", "A batch needs the partition key header.")
        if headers.get("x-ms-cosmos-batch-atomic", "").lower() != "true":
            raise _Reply(400, "BadRequest", "The fake runs atomic batches only.")
        if not isinstance(body, list) or not body or len(body) > _MAX_BATCH:
            raise _Reply(400, "BadRequest", f"A batch holds 1 to {_MAX_BATCH} operations.")
        saved = dict(container.documents), container.next_document
        results: list[dict[str, Any]] = []
        for index, operation in enumerate(body):
            kind = operation.get("operationType")
            try:
                if_match = operation.get("ifMatch")
                if kind in ("Create", "Upsert"):
                    document, created = self._write(
                        container,
                        partition_key,
                        operation.get("resourceBody"),
                        upsert=kind == "Upsert",
                        if_match=if_match,
                    )
                    status = 201 if created else 200
                elif kind == "Replace":
                    resource = operation.get("resourceBody")
                    if not isinstance(resource, dict) or resource.get("id") != operation.get("id"):
                        raise _Reply(
                            400, "BadRequest", "The id in the body differs from the operation's."
                        )
                    document, status = (
                        self._replace(container, partition_key, resource, if_match),
                        200,
                    )
                elif kind == "Read":
                    document, status = (
                        self._find(container, partition_key, operation.get("id")),
                        200,
                    )
                elif kind == "Patch":
                    document = self._patch(
                        container,
                        partition_key,
                        operation.get("id"),
                        operation.get("resourceBody"),
                        if_match,
                    )
                    status = 200
                elif kind == "Delete":
                    self._delete(container, partition_key, operation.get("id"), if_match)
                    results.append({"statusCode": 204, "requestCharge": 1.0})
                    continue
                else:
                    raise _Reply(400, "BadRequest", f"Unknown batch operation {kind!r}.")
            except _Reply as failure:
                # All or nothing: undo, and report the failure with 424 for the rest.
                container.documents, container.next_document = saved
                answer = [
                    {"statusCode": failure.status if i == index else 424, "requestCharge": 0.0}
                    for i in range(len(body))
                ]
                return 207, answer, {}
            results.append(
                {
                    "statusCode": status,
                    "requestCharge": 1.0,
                    "eTag": document.etag,
                    "resourceBody": self._render(container, document),
                }
            )
        return 200, results, {}

    # --- queries -------------------------------------------------------------------------------

    def _query(
        self,
        container: _Container,
        partition_key: tuple[str, ...] | None,
        headers: Mapping[str, str],
        body: Any,
    ) -> tuple[int, Any, dict[str, str]]:
        if not isinstance(body, dict) or not isinstance(body.get("query"), str):
            raise _Reply(400, "BadRequest", "A query body needs a query.")
        text = body["query"]
        parameters = {p["name"]: p["value"] for p in body.get("parameters") or []}
        try:
            query = _Parser(text).parse()
        except SqlError as exc:
            raise _Reply(400, "BadRequest", f"{exc} in {text!r}") from None
        range_id = headers.get("x-ms-documentdb-partitionkeyrangeid")
        cross = headers.get("x-ms-documentdb-query-enablecrosspartition", "").lower() == "true"
        candidates = sorted(container.documents.values(), key=lambda d: d.rid)
        if partition_key is not None:
            candidates = [d for d in candidates if d.partition_key == partition_key]
        elif range_id is not None:
            if range_id.split(",")[-1] != "0":
                raise _Reply(410, "Gone", "The partition key range is gone.")
            start, end = headers.get("x-ms-start-epk"), headers.get("x-ms-end-epk")
            if start is not None and end is not None:
                candidates = [d for d in candidates if start <= d.epk < end]
        elif cross:
            if query.order_by is not None or query.top is not None:
                raise _Reply(
                    400,
                    "BadRequest",
                    "The provided cross partition query can not be directly served by the "
                    "gateway (the fake serves no query plans for ORDER BY or TOP).",
                )
            if query.distinct:
                raise _Reply(400, "BadRequest", _NOT_SERVABLE, _CROSS_PARTITION_NOT_SERVABLE)
        else:
            raise _Reply(400, "BadRequest", "Cross partition query is required but disabled.")
        try:
            matched = [
                d.body | {"_rid": d.rid, "_ts": int(d.written_at), "_etag": d.etag}
                for d in candidates
                if all(_matches(_lookup(d.body, c.path), c, parameters) for c in query.where)
            ]
            if query.order_by is not None:
                path, descending = query.order_by
                matched.sort(
                    key=lambda doc: (_type_rank(_lookup(doc, path)), _sortable(_lookup(doc, path))),
                    reverse=descending,
                )
            documents = self._results(container, query, matched)
            if query.top is not None:
                top = _resolve(query.top, parameters)
                if not isinstance(top, int) or isinstance(top, bool) or top < 0:
                    raise SqlError("TOP takes a non-negative integer")
                documents = documents[:top]
        except SqlError as exc:
            raise _Reply(400, "BadRequest", str(exc)) from None
        # The token pins the query and its scope, so a token from another query is refused.
        scope = json.dumps(
            [
                text,
                sorted(parameters.items()),
                partition_key,
                range_id,
                headers.get("x-ms-start-epk"),
            ],
            default=str,
        )
        digest = hashlib.sha256(scope.encode()).hexdigest()[:16]
        offset = 0
        continuation = headers.get("x-ms-continuation")
        if continuation:
            try:
                state = json.loads(base64.b64decode(continuation, validate=True))
                offset = int(state["offset"])
                if state["query"] != digest or offset < 0:
                    raise ValueError
            except (ValueError, KeyError, TypeError):
                raise _Reply(400, "BadRequest", "Invalid continuation token.") from None
        size = int(headers.get("x-ms-max-item-count", "-1"))
        size = _PAGE_SIZE if size <= 0 else size
        page = documents[offset : offset + size]
        extra = {"x-ms-item-count": str(len(page))}
        if offset + size < len(documents):
            token = {"query": digest, "offset": offset + size}
            extra["x-ms-continuation"] = base64.b64encode(json.dumps(token).encode()).decode()
        answer = {"_rid": container.properties["_rid"], "Documents": page, "_count": len(page)}
        return 200, answer, extra

    def _results(
        self, container: _Container, query: _Query, matched: list[dict[str, Any]]
    ) -> list[Any]:
        """What the query selects of each matched document, in order: ``SELECT VALUE``
        leaves out documents without the property (undefined); ``DISTINCT`` keeps the
        first of equal results."""
        if query.value is not None:
            found = [_lookup(doc, query.value) for doc in matched]
            results = [copy.deepcopy(v) for v in found if v is not _UNDEFINED]
        else:
            results = [self._project(container, doc, query.projection) for doc in matched]
        if query.distinct:
            seen: set[str] = set()
            kept: list[Any] = []
            for result in results:
                key = json.dumps(_distinct_form(result), sort_keys=True)
                if key not in seen:
                    seen.add(key)
                    kept.append(result)
            results = kept
        return results

    def _query_plan(self, body: Any) -> tuple[int, Any, dict[str, str]]:
        """The plan the SDK asks for after a 1004: the fake plans what it refuses with
        1004 (``DISTINCT`` without ``ORDER BY`` or ``TOP``), in the shape the service
        answers, over the one partition key range it has."""
        if not isinstance(body, dict) or not isinstance(body.get("query"), str):
            raise _Reply(400, "BadRequest", "A query plan request needs a query.")
        try:
            query = _Parser(body["query"]).parse()
        except SqlError as exc:
            raise _Reply(400, "BadRequest", str(exc)) from None
        if not query.distinct or query.order_by is not None or query.top is not None:
            raise _Reply(400, "BadRequest", "The fake plans DISTINCT queries only.")
        plan = {
            "partitionedQueryExecutionInfoVersion": 2,
            "queryInfo": {
                "distinctType": "Unordered",
                "top": None,
                "offset": None,
                "limit": None,
                "orderBy": [],
                "orderByExpressions": [],
                "groupByExpressions": [],
                "groupByAliases": [],
                "aggregates": [],
                "groupByAliasToAggregateType": {},
                "rewrittenQuery": "",
                "hasSelectValue": query.value is not None,
                "dCountInfo": None,
                "hasNonStreamingOrderBy": False,
            },
            "queryRanges": [
                {"min": "", "max": "FF", "isMinInclusive": True, "isMaxInclusive": False}
            ],
        }
        return 200, plan, {}

    def _project(
        self,
        container: _Container,
        document: dict[str, Any],
        projection: tuple[tuple[str, ...], ...] | None,
    ) -> dict[str, Any]:
        if projection is None:
            return {
                **copy.deepcopy(document),
                "_self": f"{container.properties['_self']}docs/{document['_rid']}/",
                "_attachments": "attachments/",
            }
        projected: dict[str, Any] = {}
        for path in projection:
            value = _lookup(document, path)
            if value is not _UNDEFINED:
                projected[path[-1]] = copy.deepcopy(value)
        return projected


def _matches(value: Any, comparison: _Comparison, parameters: Mapping[str, Any]) -> bool:
    candidates = [_resolve(v, parameters) for v in comparison.values]
    if comparison.op == "IN":
        return any(_compare(value, "=", c) for c in candidates)
    return _compare(value, comparison.op, candidates[0])


def _distinct_form(value: Any) -> Any:
    """``value`` as DISTINCT compares it: numbers by value (1 equals 1.0), objects by
    content whatever the order of their properties."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, dict):
        return {k: _distinct_form(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_distinct_form(v) for v in value]
    return value  # a string, a boolean or null


def _sortable(value: Any) -> Any:
    if value is _UNDEFINED or value is None:
        return 0
    if isinstance(value, dict | list):
        return json.dumps(value, sort_keys=True)
    return value


_RBAC_MANAGEMENT = (
    "Request blocked by Auth: the given request [POST /dbs] cannot be authorized by AAD "
    "token in data plane. Use the control plane (Azure Resource Manager) to create "
    "databases and containers."
)


def _resource_of(segments: list[str]) -> tuple[str, str]:
    """(resource type, resource link) of a path, as the key signature names them: a feed
    (``dbs/d/colls``) is its parent's link with the feed's type, an item its own link."""
    if not segments:
        return "", ""
    if len(segments) % 2:
        return segments[-1], "/".join(segments[:-1])
    return segments[-2], "/".join(segments)


def _operation(method: str, segments: list[str], headers: Mapping[str, str]) -> str:
    if not segments:
        return "account"
    if segments[-1] == "pkranges":
        return "pkranges"
    if segments[-1] == "docs" and method == "POST":
        if headers.get("x-ms-cosmos-is-batch-request", "").lower() == "true":
            return "batch"
        if headers.get("x-ms-cosmos-is-query-plan-request", "").lower() == "true":
            return "query-plan"
        if headers.get("x-ms-documentdb-isquery", "").lower() == "true":
            return "query"
        if headers.get("x-ms-documentdb-is-upsert", "").lower() == "true":
            return "upsert"
        return "create"
    return {
        "GET": "read",
        "POST": "create",
        "PUT": "replace",
        "PATCH": "patch",
        "DELETE": "delete",
    }.get(method, method.lower())


# --- the server -------------------------------------------------------------------------------


def _app(fake: FakeCosmos) -> Starlette:
    async def endpoint(request: Request) -> Response:
        raw_path = request.scope.get("raw_path") or request.url.path.encode()
        segments = [unquote(s) for s in raw_path.decode().split("?")[0].split("/") if s]
        headers = {k.lower(): v for k, v in request.headers.items()}
        status, answer, extra = fake.handle(request.method, segments, headers, await request.body())
        response_headers = {
            "x-ms-request-charge": "1",
            "x-ms-activity-id": str(uuid.uuid4()),
            **extra,
        }
        if answer is None:
            return Response(status_code=status, headers=response_headers)
        return Response(
            json.dumps(answer),
            status_code=status,
            headers=response_headers,
            media_type="application/json",
        )

    methods = ["GET", "POST", "PUT", "PATCH", "DELETE"]
    return Starlette(
        routes=[
            Route("/", endpoint, methods=methods),
            Route("/{path:path}", endpoint, methods=methods),
        ]
    )


@contextmanager
def serve_cosmos(fake: FakeCosmos | None = None) -> Iterator[FakeCosmos]:
    """Serve ``fake`` (or a new one) over HTTPS on a free loopback port; sets its
    ``endpoint``. The certificate is self-signed: the SDK does not verify TLS for
    ``127.0.0.1`` (as for the emulator), and bearer tokens need HTTPS."""
    fake = fake or FakeCosmos()
    with serve_https(_app(fake), "the Cosmos DB fake") as (port, _):
        fake.endpoint = f"https://127.0.0.1:{port}/"
        yield fake
