"""A REST-level fake of Azure AI Search, served over HTTP on loopback for the real SDK.

It implements what the index adapter sends: index create / update / get
(``/indexes('name')``), document batches (``docs/search.index``: upload, merge,
mergeOrUpload, delete, with per-document statuses and 207), document lookup
(``docs('key')``) and search (``docs/search.post.search``: ``search``, ``filter``,
``vectorQueries``, ``top``, ``skip``, ``count``, ``select``, ``orderby``, ``facets``,
``queryType``/``semanticConfiguration``, ``vectorFilterMode``).

What it checks, as the service would, so a wrong request fails a test:

- the ``api-key`` header;
- the schema: one key field, vector fields sized and tied to a declared HNSW profile,
  semantic fields that exist, no change to an existing field's type or dimensions;
- documents: known fields only, vectors of the declared size;
- the OData filter is *evaluated* by a small parser of exactly the subset the adapter
  emits (``eq``, ``and``, ``or``, parentheses, ``true``/``false``, string literals with
  doubled quotes, integers, ``field/any(v: …)`` over collections, ``search.in(v,
  'list', 'delimiters')``); anything else is a 400;
- search text must be plain words (the adapter strips query-syntax operators);
  anything else is a 400.

Text ranking is BM25 over ``content`` and ``title``; vectors rank by cosine among the
chunks the filter admits (a pre-filter); hybrid fuses both with Reciprocal Rank
Fusion (k = 60), as the service does. ``fail_next`` injects whole-request failures
(429 / 503 with ``Retry-After``, 500) and ``fail_documents`` per-document ones.
"""

from __future__ import annotations

import json
import math
import re
import threading
from collections import Counter
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

_WORD = re.compile(r"\w+")
_PLAIN_TEXT = re.compile(r"^[\w\s]*$")
_SEARCH_KEYS = frozenset(
    {
        "search",
        "filter",
        "top",
        "skip",
        "count",
        "select",
        "orderby",
        "facets",
        "vectorQueries",
        "vectorFilterMode",
        "queryType",
        "semanticConfiguration",
    }
)
_RRF_K = 60


class ODataError(ValueError):
    """A filter outside the supported subset (answered with 400)."""


# --- OData filters ---------------------------------------------------------------------

_TOKEN = re.compile(
    r"\s*(?:(?P<string>'(?:[^']|'')*')|(?P<number>-?\d+)|(?P<func>search\.in)"
    r"|(?P<name>[A-Za-z_]\w*)|(?P<punct>[()/:,]))"
)

Predicate = Callable[[Mapping[str, Any]], bool]


class _FilterParser:
    """Recursive descent over the supported subset; builds a predicate on a document."""

    def __init__(self, text: str) -> None:
        self.tokens: list[tuple[str, str]] = []
        position = 0
        while position < len(text):
            if text[position:].strip() == "":
                break
            match = _TOKEN.match(text, position)
            if match is None:
                raise ODataError(f"Invalid expression near {text[position : position + 20]!r}")
            kind = match.lastgroup or ""
            self.tokens.append((kind, match.group(kind)))
            position = match.end()
        self.index = 0

    def parse(self) -> Predicate:
        predicate = self.disjunction(None)
        if self.index != len(self.tokens):
            raise ODataError(f"Invalid expression: unexpected {self.tokens[self.index][1]!r}")
        return predicate

    def peek(self) -> tuple[str, str] | None:
        return self.tokens[self.index] if self.index < len(self.tokens) else None

    def take(self, kind: str | None = None, text: str | None = None) -> str:
        token = self.peek()
        if token is None or (kind and token[0] != kind) or (text and token[1] != text):
            raise ODataError(f"Invalid expression: expected {text or kind}, got {token}")
        self.index += 1
        return token[1]

    def word(self, text: str) -> bool:
        if self.peek() == ("name", text):
            self.index += 1
            return True
        return False

    def disjunction(self, variable: str | None) -> Predicate:
        parts = [self.conjunction(variable)]
        while self.word("or"):
            parts.append(self.conjunction(variable))
        return parts[0] if len(parts) == 1 else lambda d: any(p(d) for p in parts)

    def conjunction(self, variable: str | None) -> Predicate:
        parts = [self.primary(variable)]
        while self.word("and"):
            parts.append(self.primary(variable))
        return parts[0] if len(parts) == 1 else lambda d: all(p(d) for p in parts)

    def primary(self, variable: str | None) -> Predicate:
        token = self.peek()
        if token == ("punct", "("):
            self.take()
            inner = self.disjunction(variable)
            self.take("punct", ")")
            return inner
        if token is not None and token[0] == "func":
            return self.search_in(variable)
        if self.word("true"):
            return lambda d: True
        if self.word("false"):
            return lambda d: False
        name = self.take("name")
        if self.peek() == ("punct", "/"):
            return self.any_of(name, variable)
        self.take("name", "eq")
        literal = self.literal()
        if name == variable:
            return lambda d: d["$it"] == literal
        return lambda d: _scalar(d, name) == literal

    def any_of(self, name: str, outer: str | None) -> Predicate:
        if outer is not None:
            raise ODataError("nested lambda expressions are not supported")
        self.take("punct", "/")
        self.take("name", "any")
        self.take("punct", "(")
        variable = self.take("name")
        self.take("punct", ":")
        body = self.disjunction(variable)
        self.take("punct", ")")

        def predicate(document: Mapping[str, Any]) -> bool:
            values = document.get(name)
            if values is not None and not isinstance(values, list):
                raise ODataError(f"any() needs a collection, {name} is not one")
            return any(body({"$it": value}) for value in values or [])

        return predicate

    def search_in(self, variable: str | None) -> Predicate:
        self.take("func")
        self.take("punct", "(")
        name = self.take("name")
        self.take("punct", ",")
        listed = self.string()
        delimiters = " ,"
        if self.peek() == ("punct", ","):
            self.take()
            delimiters = self.string()
        self.take("punct", ")")
        values = set(filter(None, re.split("[" + re.escape(delimiters) + "]", listed)))
        if name == variable:
            return lambda d: d["$it"] in values
        return lambda d: _scalar(d, name) in values

    def string(self) -> str:
        text = self.take("string")
        return text[1:-1].replace("''", "'")

    def literal(self) -> object:
        token = self.peek()
        if token is None:
            raise ODataError("Invalid expression: missing literal")
        if token[0] == "string":
            return self.string()
        if token[0] == "number":
            self.take()
            return int(token[1])
        if self.word("true"):
            return True
        if self.word("false"):
            return False
        raise ODataError(f"Invalid literal {token[1]!r}")


def _scalar(document: Mapping[str, Any], name: str) -> object:
    value = document.get(name)
    if isinstance(value, list):
        raise ODataError(f"{name} is a collection: compare it with any()")
    return value


def parse_filter(text: str) -> Predicate:
    """The predicate of an OData filter of the supported subset (``ODataError`` else)."""
    return _FilterParser(text).parse()


# --- the service --------------------------------------------------------------------------


@dataclass(frozen=True)
class Recorded:
    """One request as the fake saw it."""

    method: str
    path: str
    body: dict[str, Any] | None


@dataclass
class _Index:
    schema: dict[str, Any]
    documents: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return next(f["name"] for f in self.schema["fields"] if f.get("key"))

    def field(self, name: str) -> dict[str, Any] | None:
        return next((f for f in self.schema["fields"] if f["name"] == name), None)


class _Reply(Exception):
    def __init__(self, status: int, message: str = "", headers: Mapping[str, str] = {}) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = dict(headers)


@dataclass
class FakeSearchService:
    api_key: str = "fake-admin-key"
    endpoint: str = ""
    ca_file: str = ""
    indexes: dict[str, _Index] = field(default_factory=dict)
    requests: list[Recorded] = field(default_factory=list)
    _failures: list[tuple[int, dict[str, str], str]] = field(default_factory=list)
    _document_failures: dict[str, list[int]] = field(default_factory=dict)
    _lock: threading.RLock = field(default_factory=threading.RLock)

    def fail_next(
        self, status: int, *, times: int = 1, retry_after: str | None = None, path: str = ""
    ) -> None:
        """Answer the next ``times`` requests whose path contains ``path`` with ``status``."""
        headers = {"Retry-After": retry_after} if retry_after is not None else {}
        with self._lock:
            self._failures.extend([(status, headers, path)] * times)

    def fail_documents(self, key: str, *statuses: int) -> None:
        """Fail the document ``key`` in the next indexing batches with ``statuses``, in turn."""
        with self._lock:
            self._document_failures.setdefault(key, []).extend(statuses)

    def searches(self) -> list[dict[str, Any]]:
        """Bodies of the search requests received so far."""
        return [r.body or {} for r in self.requests if r.path.endswith("search.post.search")]

    # --- dispatch ----------------------------------------------------------------------

    def handle(
        self, method: str, path: str, headers: Mapping[str, str], body: bytes
    ) -> tuple[int, Any, dict[str, str]]:
        with self._lock:
            parsed = json.loads(body) if body else None
            self.requests.append(Recorded(method, path, parsed))
            try:
                if headers.get("api-key") != self.api_key:
                    raise _Reply(403, "Forbidden: a valid api-key is required")
                for position, (status, extra, fragment) in enumerate(self._failures):
                    if fragment in path:
                        del self._failures[position]
                        raise _Reply(status, "injected failure", extra)
                return self._route(method, path, parsed)
            except _Reply as reply:
                error = {"error": {"code": str(reply.status), "message": reply.message}}
                return reply.status, error, reply.headers
            except ODataError as error:
                return (
                    400,
                    {"error": {"code": "InvalidRequestParameter", "message": str(error)}},
                    {},
                )

    def _route(self, method: str, path: str, body: Any) -> tuple[int, Any, dict[str, str]]:
        match = re.fullmatch(r"/indexes\('([^']+)'\)(/.*)?", path)
        if match is None:
            raise _Reply(404, f"no such resource {path}")
        name, rest = match.group(1), match.group(2) or ""
        if rest == "":
            if method == "PUT":
                return self._put_index(name, body)
            if method == "GET":
                return 200, self._index(name).schema, {}
            raise _Reply(405, method)
        index = self._index(name)
        if rest == "/docs/search.index" and method == "POST":
            return self._index_batch(index, body)
        if rest == "/docs/search.post.search" and method == "POST":
            return 200, self._search(index, body), {}
        document = re.fullmatch(r"/docs\('([^']*)'\)", rest)
        if document is not None and method == "GET":
            stored = index.documents.get(unquote(document.group(1)))
            if stored is None:
                raise _Reply(404, "document not found")
            return 200, self._retrievable(index, stored), {}
        raise _Reply(404, f"no such resource {path}")

    def _index(self, name: str) -> _Index:
        if name not in self.indexes:
            raise _Reply(404, f"The index '{name}' was not found")
        return self.indexes[name]

    # --- schema ------------------------------------------------------------------------

    def _put_index(self, name: str, schema: dict[str, Any]) -> tuple[int, Any, dict[str, str]]:
        fields = schema.get("fields") or []
        if schema.get("name") != name or sum(1 for f in fields if f.get("key")) != 1:
            raise _Reply(400, "an index needs its name and exactly one key field")
        profiles = {p["name"]: p for p in (schema.get("vectorSearch") or {}).get("profiles", [])}
        algorithms = {a["name"] for a in (schema.get("vectorSearch") or {}).get("algorithms", [])}
        names = {f["name"] for f in fields}
        for definition in fields:
            if definition["type"] == "Collection(Edm.Single)":
                profile = profiles.get(definition.get("vectorSearchProfile") or "")
                if not definition.get("dimensions") or profile is None:
                    raise _Reply(
                        400, f"vector field {definition['name']} needs dimensions and a profile"
                    )
                if profile["algorithm"] not in algorithms:
                    raise _Reply(400, f"profile {profile['name']} names no declared algorithm")
        for configuration in (schema.get("semantic") or {}).get("configurations", []):
            prioritized = configuration["prioritizedFields"]
            used = [
                prioritized.get("titleField") or {},
                *prioritized.get("prioritizedContentFields", []),
            ]
            if any(u and u["fieldName"] not in names for u in used):
                raise _Reply(400, "a semantic configuration names an unknown field")
        existing = self.indexes.get(name)
        if existing is not None:
            for definition in existing.schema["fields"]:
                new = next((f for f in fields if f["name"] == definition["name"]), None)
                if (
                    new is None
                    or new["type"] != definition["type"]
                    or new.get("dimensions") != definition.get("dimensions")
                ):
                    raise _Reply(400, f"Existing field '{definition['name']}' cannot be changed")
            existing.schema = schema
            return 200, schema, {}
        self.indexes[name] = _Index(schema)
        return 201, schema, {}

    # --- documents -----------------------------------------------------------------------

    def _index_batch(self, index: _Index, body: dict[str, Any]) -> tuple[int, Any, dict[str, str]]:
        results = []
        for action in body["value"]:
            document = dict(action)
            verb = document.pop("@search.action", "upload")
            key = document.get(index.key)
            if not isinstance(key, str) or not re.fullmatch(r"[A-Za-z0-9_\-=]+", key):
                raise _Reply(400, f"invalid document key {key!r}")
            for name, value in document.items():
                definition = index.field(name)
                if definition is None:
                    raise _Reply(
                        400, f"The property '{name}' does not exist on type 'search.documentFields'"
                    )
                if definition.get("dimensions") and len(value) != definition["dimensions"]:
                    raise _Reply(400, f"{name} must have {definition['dimensions']} dimensions")
            planned = self._document_failures.get(key)
            if planned:
                status = planned.pop(0)
                results.append(_result(key, status, "injected document failure"))
                continue
            if verb in ("upload", "mergeOrUpload"):
                base = index.documents.get(key, {}) if verb == "mergeOrUpload" else {}
                index.documents[key] = {**base, **document}
            elif verb == "merge":
                if key not in index.documents:
                    results.append(_result(key, 404, "Document not found."))
                    continue
                index.documents[key].update(document)
            elif verb == "delete":
                index.documents.pop(key, None)
            else:
                raise _Reply(400, f"unknown action {verb}")
            results.append(_result(key, 200 if verb != "upload" else 201, None))
        status = 200 if all(r["status"] for r in results) else 207
        return status, {"value": results}, {}

    def _retrievable(self, index: _Index, document: Mapping[str, Any]) -> dict[str, Any]:
        hidden = {f["name"] for f in index.schema["fields"] if f.get("retrievable") is False}
        return {k: v for k, v in document.items() if k not in hidden}

    # --- search --------------------------------------------------------------------------

    def _search(self, index: _Index, body: dict[str, Any]) -> dict[str, Any]:
        unknown = set(body) - _SEARCH_KEYS
        if unknown:
            raise _Reply(400, f"unsupported search parameters {sorted(unknown)}")
        admitted = [
            d
            for d in index.documents.values()
            if body.get("filter") is None or parse_filter(body["filter"])(d)
        ]
        text = body.get("search")
        if text is not None and not _PLAIN_TEXT.match(text) and text != "*":
            raise _Reply(400, f"the fake accepts plain words only, got {text!r}")
        if body.get("queryType") == "semantic":
            names = {
                c["name"] for c in (index.schema.get("semantic") or {}).get("configurations", [])
            }
            if not text or body.get("semanticConfiguration") not in names:
                raise _Reply(400, "semantic queries need search text and a known configuration")
        rankings: list[list[tuple[str, float]]] = []
        weights: list[float] = []
        if text and text != "*":
            rankings.append(_bm25(index, admitted, text))
            weights.append(1.0)
        for query in body.get("vectorQueries") or []:
            if (
                query.get("kind") != "vector"
                or body.get("vectorFilterMode", "preFilter") != "preFilter"
            ):
                raise _Reply(400, "the fake serves pre-filtered vector queries only")
            rankings.append(_nearest(index, admitted, query))
            weights.append(float(query.get("weight", 1.0)))
        if not rankings:
            ranked = [(d[index.key], 1.0) for d in admitted]
        elif len(rankings) == 1:
            ranked = rankings[0]
        else:
            fused: Counter[str] = Counter()
            for ranking, weight in zip(rankings, weights, strict=True):
                for rank, (key, _) in enumerate(ranking, start=1):
                    fused[key] += weight / (_RRF_K + rank)
            ranked = sorted(fused.items(), key=lambda item: (-item[1], item[0]))
        if body.get("orderby"):
            name, _, direction = str(body["orderby"]).partition(" ")
            ranked.sort(
                key=lambda item: index.documents[item[0]].get(name) or "",
                reverse=direction == "desc",
            )
        answer: dict[str, Any] = {}
        if body.get("count"):
            answer["@odata.count"] = len(ranked)
        if body.get("facets"):
            answer["@search.facets"] = _facets(index, [k for k, _ in ranked], body["facets"])
        skip, top = (
            int(body.get("skip") or 0),
            int(body.get("top") if body.get("top") is not None else 50),
        )
        selected = body.get("select")
        chosen = selected.split(",") if selected else None
        rows = []
        for key, score in ranked[skip : skip + top]:
            document = self._retrievable(index, index.documents[key])
            if chosen is not None:
                document = {k: v for k, v in document.items() if k in chosen}
            row = {**document, "@search.score": score}
            if body.get("queryType") == "semantic":
                row["@search.rerankerScore"] = 4.0 * score / (1 + score)
            rows.append(row)
        answer["value"] = rows
        return answer


def _result(key: str, status: int, message: str | None) -> dict[str, Any]:
    return {"key": key, "status": status < 300, "errorMessage": message, "statusCode": status}


def _bm25(index: _Index, admitted: list[dict[str, Any]], text: str) -> list[tuple[str, float]]:
    terms = set(_WORD.findall(text.casefold()))
    bags = {
        d[index.key]: Counter(
            _WORD.findall(f"{d.get('title') or ''} {d.get('content') or ''}".casefold())
        )
        for d in index.documents.values()
        if d.get("content") is not None
    }
    if not bags:
        return []
    average = sum(sum(bag.values()) for bag in bags.values()) / len(bags)
    scored = []
    for document in admitted:
        bag = bags.get(document[index.key])
        if bag is None:
            continue
        length, score = sum(bag.values()), 0.0
        for term in terms & set(bag):
            frequency = sum(1 for other in bags.values() if term in other)
            idf = math.log(1 + (len(bags) - frequency + 0.5) / (frequency + 0.5))
            tf = bag[term]
            score += idf * tf * 2.2 / (tf + 1.2 * (0.25 + 0.75 * length / average))
        if score > 0:
            scored.append((document[index.key], score))
    return sorted(scored, key=lambda item: (-item[1], item[0]))


def _nearest(
    index: _Index, admitted: list[dict[str, Any]], query: Mapping[str, Any]
) -> list[tuple[str, float]]:
    definition = index.field(str(query.get("fields")))
    if definition is None or not definition.get("dimensions"):
        raise _Reply(400, f"{query.get('fields')!r} is not a vector field")
    vector = query["vector"]
    if len(vector) != definition["dimensions"]:
        raise _Reply(400, f"the query vector must have {definition['dimensions']} dimensions")
    scored = []
    for document in admitted:
        stored = document.get(definition["name"])
        if stored is None:
            continue
        norm = math.sqrt(sum(x * x for x in stored)) * math.sqrt(sum(x * x for x in vector))
        cosine = sum(a * b for a, b in zip(stored, vector, strict=True)) / norm if norm else 0.0
        scored.append((document[index.key], 1 / (2 - cosine)))
    scored.sort(key=lambda item: (-item[1], item[0]))
    return scored[: int(query.get("k") or 50)]


def _facets(index: _Index, keys: list[str], requested: list[str]) -> dict[str, Any]:
    answer = {}
    for facet in requested:
        name, _, options = facet.partition(",")
        cap = int(options.removeprefix("count:")) if options else 10
        counts: Counter[str] = Counter()
        for key in keys:
            value = index.documents[key].get(name)
            counts.update(value if isinstance(value, list) else [value])
        answer[name] = [{"value": v, "count": c} for v, c in counts.most_common(cap)]
    return answer


def _app(fake: FakeSearchService) -> Starlette:
    async def endpoint(request: Request) -> Response:
        raw_path = request.scope.get("raw_path") or request.url.path.encode()
        path = unquote(raw_path.decode().split("?")[0])
        headers = {k.lower(): v for k, v in request.headers.items()}
        status, answer, extra = fake.handle(request.method, path, headers, await request.body())
        return Response(
            json.dumps(answer), status_code=status, headers=extra, media_type="application/json"
        )

    methods = ["GET", "POST", "PUT", "DELETE"]
    return Starlette(routes=[Route("/{path:path}", endpoint, methods=methods)])


@contextmanager
def serve_search(fake: FakeSearchService | None = None) -> Iterator[FakeSearchService]:
    """Serve ``fake`` (or a new one) over HTTPS on a free loopback port; sets ``endpoint``
    and ``ca_file`` (its self-signed certificate, for the client's ``connection_verify``:
    the SDK refuses any credential over plain HTTP)."""
    fake = fake or FakeSearchService()
    with serve_https(_app(fake), "the Azure AI Search fake") as (port, cert):
        fake.endpoint = f"https://127.0.0.1:{port}"
        fake.ca_file = str(cert)
        yield fake
