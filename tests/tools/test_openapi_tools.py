"""OpenAPI operations as tools, against a real FastAPI "orders" service on loopback.

The service is reached as ``orders.test`` (resolved to 127.0.0.1, a trusted private
host as ``trusted_private_network`` makes it). Every connection goes through a
:class:`LoopbackConnector`, so even a guard that failed could not send a packet
anywhere but loopback.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from azure.core.credentials import AccessToken
from jsonschema.validators import Draft202012Validator

from tests.support.network import PUBLIC_IP, FakeResolver, LoopbackConnector
from tests.support.orders_api import API_KEY, BEARER_TOKEN, ENTRA_TOKEN, OrdersService
from tests.support.processes import app_in_thread
from tools.contracts import (
    RiskLevel,
    ToolApprovalRequired,
    ToolExecutionFailed,
    Toolset,
    ToolTimeout,
)
from tools.openapi import OpenApiSourceError, OpenApiTools, load_openapi_tools
from tools.openapi.document import read_document, tool_name
from tools.policy import PolicyEnforcedToolset, build_toolset
from tools.settings import HttpSettings, OpenApiSourceSettings, ToolsSettings
from tools.testing import StaticCaller

CALLER = StaticCaller(roles={"employee"})


@pytest.fixture(scope="module")
def service() -> OrdersService:
    return OrdersService()


@pytest.fixture(scope="module")
def port(service: OrdersService) -> Iterator[int]:
    with app_in_thread(service.app()) as base:
        yield httpx.URL(base).port or 80


@pytest.fixture
def resolver() -> FakeResolver:
    return FakeResolver(
        {
            "orders.test": ["127.0.0.1"],
            "api.test": [PUBLIC_IP],
            "intranet.test": ["10.0.0.5"],
        }
    )


@pytest.fixture
def connector() -> LoopbackConnector:
    return LoopbackConnector()


def orders_source(port: int, **overrides: Any) -> OpenApiSourceSettings:
    settings: dict[str, Any] = {
        "name": "orders",
        "spec": f"http://orders.test:{port}/openapi.json",
        "trusted_private_network": True,
        "operation_risks": {"deleteOrder": "high"},
        "auth": "api_key",
        "api_key": API_KEY,
        "roles": ["employee"],
    }
    settings.update(overrides)
    return OpenApiSourceSettings.model_validate(settings)


async def load(
    source: OpenApiSourceSettings,
    resolver: FakeResolver,
    connector: LoopbackConnector,
    http: HttpSettings | None = None,
    **kwargs: Any,
) -> OpenApiTools:
    return await load_openapi_tools(
        source, http or HttpSettings(), resolver=resolver, connector=connector, **kwargs
    )


def toolset(tools: OpenApiTools) -> Toolset:
    return build_toolset(ToolsSettings(load_entry_points=False), extra=[tools])


# --- importing ----------------------------------------------------------------------


async def test_operations_become_tools_with_schemas_risks_and_origin(
    port: int, resolver: FakeResolver, connector: LoopbackConnector
) -> None:
    async with await load(orders_source(port), resolver, connector) as tools:
        specs = {tool.spec.name: tool.spec for tool in tools}
    assert set(specs) == {
        "orders-getOrder",
        "orders-listOrders",
        "orders-createOrder",
        "orders-deleteOrder",
        "orders-getFile",
        "orders-dailyReport",
        "orders-failHard",
        "orders-echoAuth",
        "orders-getMoved",
    }
    get_order = specs["orders-getOrder"]
    assert get_order.description == "Get one order"
    assert get_order.parameters == {
        "type": "object",
        "properties": {"order_id": {"type": "integer"}},
        "required": ["order_id"],
        "additionalProperties": False,
    }
    assert (get_order.risk, get_order.idempotent) == (RiskLevel.READ, True)
    assert get_order.origin == "openapi:orders"
    assert get_order.required_roles == frozenset({"employee"})

    listing = specs["orders-listOrders"]
    assert "newest first" in listing.description
    properties = listing.parameters["properties"]
    assert set(properties) == {"status", "limit", "x-tenant"}
    assert properties["limit"]["maximum"] == 50
    assert properties["x-tenant"]["description"] == "Tenant to scope to"
    assert "required" not in listing.parameters

    create = specs["orders-createOrder"]
    assert create.parameters["required"] == ["body"]
    body = create.parameters["properties"]["body"]
    assert body["required"] == ["item", "quantity"]
    assert body["properties"]["quantity"]["minimum"] == 1
    assert "title" not in body  # titles cost tokens and say nothing the names do not
    assert (create.risk, create.idempotent) == (RiskLevel.WRITE, False)

    delete = specs["orders-deleteOrder"]
    assert (delete.risk, delete.idempotent) == (RiskLevel.HIGH, True)
    # The API key header is the source's to set, never an argument a model fills in.
    assert set(delete.parameters["properties"]) == {"order_id"}
    assert connector.connected == [("127.0.0.1", port)]


async def test_the_same_document_from_a_json_or_yaml_file(
    port: int,
    service: OrdersService,
    resolver: FakeResolver,
    connector: LoopbackConnector,
    tmp_path: Path,
) -> None:
    document = service.app().openapi()
    (tmp_path / "orders.json").write_text(json.dumps(document))
    (tmp_path / "orders.yaml").write_text(yaml.safe_dump(document))
    names = []
    for file in ("orders.json", "orders.yaml"):
        source = orders_source(
            port, spec=str(tmp_path / file), base_url=f"http://orders.test:{port}/"
        )
        async with await load(source, resolver, connector) as tools:
            names.append(sorted(tool.spec.name for tool in tools))
            result = await toolset(tools).call("orders-getOrder", {"order_id": 1}, CALLER)
            assert result.output["item"] == "widget"
    assert names[0] == names[1]
    assert "orders-getOrder" in names[0]


async def test_only_the_selected_operations_are_offered(
    port: int, resolver: FakeResolver, connector: LoopbackConnector
) -> None:
    source = orders_source(port, operations=["listOrders", "getOrder"])
    async with await load(source, resolver, connector) as tools:
        assert [tool.spec.name for tool in tools] == ["orders-getOrder", "orders-listOrders"]


# --- calling through the execution policy --------------------------------------------


async def test_calls_reach_the_live_service(
    port: int, service: OrdersService, resolver: FakeResolver, connector: LoopbackConnector
) -> None:
    async with await load(orders_source(port), resolver, connector) as tools:
        tools_ = toolset(tools)
        got = await tools_.call("orders-getOrder", {"order_id": 2}, CALLER)
        assert got.output == {
            "id": 2,
            "item": "gadget",
            "quantity": 1,
            "note": None,
            "status": "shipped",
        }

        listed = await tools_.call(
            "orders-listOrders", {"status": "open", "limit": 5, "x-tenant": "contoso"}, CALLER
        )
        assert {order["status"] for order in listed.output} == {"open"}
        assert service.requests[-1]["x-tenant"] == "contoso"

        created = await tools_.call(
            "orders-createOrder", {"body": {"item": "sprocket", "quantity": 3}}, CALLER
        )
        new_id = created.output["id"]
        assert service.orders[new_id].item == "sprocket"
        assert service.requests[-1]["x-api-key"] == API_KEY

        # Deleting is high risk: refused on a plain call, run once a person approved it.
        with pytest.raises(ToolApprovalRequired):
            await tools_.call("orders-deleteOrder", {"order_id": new_id}, CALLER)
        assert new_id in service.orders
        assert isinstance(tools_, PolicyEnforcedToolset)
        deleted = await tools_.call_approved("orders-deleteOrder", {"order_id": new_id}, CALLER)
        assert deleted.output == {"status": 204}
        assert new_id not in service.orders


async def test_path_values_cannot_step_out_of_their_segment(
    port: int, resolver: FakeResolver, connector: LoopbackConnector
) -> None:
    async with await load(orders_source(port), resolver, connector) as tools:
        tools_ = toolset(tools)
        for name in ("..", "a b?c#d&e=f", "100%", "ünïcödé"):
            result = await tools_.call("orders-getFile", {"name": name}, CALLER)
            assert result.output == {"name": name}


# --- authentication ------------------------------------------------------------------


class FakeCredential:
    """An async azure-identity credential: hands out ``token``, counting requests."""

    def __init__(self, token: str, lifetime_s: int = 3600) -> None:
        self.token = token
        self.lifetime_s = lifetime_s
        self.scopes: list[tuple[str, ...]] = []

    async def get_token(self, *scopes: str, **_: Any) -> AccessToken:
        self.scopes.append(scopes)
        return AccessToken(self.token, int(time.time()) + self.lifetime_s)


@pytest.mark.parametrize(
    ("auth", "expected"),
    [
        ({"auth": "api_key", "api_key": API_KEY}, ("x-api-key", API_KEY)),
        (
            {"auth": "api_key", "api_key": API_KEY, "api_key_header": "X-Other-Key"},
            ("x-other-key", API_KEY),
        ),
        (
            {"auth": "bearer", "bearer_token": BEARER_TOKEN},
            ("authorization", f"Bearer {BEARER_TOKEN}"),
        ),
        ({"auth": "none"}, None),
    ],
)  # fmt: skip
async def test_static_credentials_are_sent(
    auth: dict[str, str],
    expected: tuple[str, str] | None,
    port: int,
    service: OrdersService,
    resolver: FakeResolver,
    connector: LoopbackConnector,
) -> None:
    source = orders_source(port, **{"api_key": None, **auth})
    async with await load(source, resolver, connector) as tools:
        await toolset(tools).call("orders-getOrder", {"order_id": 1}, CALLER)
    seen = service.requests[-1]
    if expected is None:
        assert "authorization" not in seen and "x-api-key" not in seen
    else:
        assert seen[expected[0]] == expected[1]


async def test_a_call_without_accepted_credentials_reports_the_refusal(
    port: int, resolver: FakeResolver, connector: LoopbackConnector
) -> None:
    source = orders_source(port, auth="none", api_key=None)
    async with await load(source, resolver, connector) as tools:
        tools_ = toolset(tools)
        assert isinstance(tools_, PolicyEnforcedToolset)
        with pytest.raises(ToolExecutionFailed, match="401") as failed:
            await tools_.call_approved("orders-deleteOrder", {"order_id": 1}, CALLER)
    assert "missing or wrong credentials" in failed.value.message


async def test_entra_tokens_are_sent_and_reused_until_near_expiry(
    port: int, service: OrdersService, resolver: FakeResolver, connector: LoopbackConnector
) -> None:
    credential = FakeCredential(ENTRA_TOKEN)
    scope = "api://orders/.default"
    source = orders_source(port, auth="entra", api_key=None, entra_scope=scope)
    async with await load(source, resolver, connector, credential=credential) as tools:
        tools_ = toolset(tools)
        for order_id in (1, 2):
            await tools_.call("orders-getOrder", {"order_id": order_id}, CALLER)
            assert service.requests[-1]["authorization"] == f"Bearer {ENTRA_TOKEN}"
        created = await tools_.call(
            "orders-createOrder", {"body": {"item": "widget", "quantity": 1}}, CALLER
        )
        assert isinstance(tools_, PolicyEnforcedToolset)
        await tools_.call_approved("orders-deleteOrder", {"order_id": created.output["id"]}, CALLER)
    # One token for the document and every call: it was valid for an hour.
    assert credential.scopes == [(scope,)]

    expiring = FakeCredential(ENTRA_TOKEN, lifetime_s=60)
    async with await load(source, resolver, connector, credential=expiring) as tools:
        tools_ = toolset(tools)
        await tools_.call("orders-getOrder", {"order_id": 1}, CALLER)
        await tools_.call("orders-getOrder", {"order_id": 1}, CALLER)
    assert len(expiring.scopes) == 3, "a token about to expire is renewed, not reused"


# --- failures as a model sees them ---------------------------------------------------


async def test_api_errors_become_safe_tool_failures(
    port: int, resolver: FakeResolver, connector: LoopbackConnector
) -> None:
    async with await load(orders_source(port), resolver, connector) as tools:
        tools_ = toolset(tools)

        with pytest.raises(ToolExecutionFailed) as not_found:
            await tools_.call("orders-getOrder", {"order_id": 999}, CALLER)
        assert "404 Not Found" in not_found.value.message
        assert "order 999 not found" in not_found.value.message

        with pytest.raises(ToolExecutionFailed) as invalid:
            await tools_.call(
                "orders-createOrder", {"body": {"item": "unicorn", "quantity": 1}}, CALLER
            )
        assert "422" in invalid.value.message and "unknown item 'unicorn'" in invalid.value.message

        with pytest.raises(ToolExecutionFailed) as broken:
            await tools_.call("orders-failHard", {}, CALLER)
        assert "500 Internal Server Error" in broken.value.message
        assert "hunter2" not in broken.value.message and "10.1.2.3" not in broken.value.message

        with pytest.raises(ToolExecutionFailed) as echoed:
            await tools_.call("orders-echoAuth", {}, CALLER)
        assert "400" in echoed.value.message
        assert API_KEY not in echoed.value.message
        assert "[redacted]" in echoed.value.message


async def test_a_redirect_to_a_private_address_is_refused(
    port: int, resolver: FakeResolver, connector: LoopbackConnector
) -> None:
    async with await load(orders_source(port), resolver, connector) as tools:
        with pytest.raises(ToolExecutionFailed, match="refused") as refused:
            await toolset(tools).call("orders-getMoved", {}, CALLER)
    assert "169.254" not in refused.value.message
    assert {address for address, _ in connector.connected} == {"127.0.0.1"}


async def test_a_slow_api_times_out(
    port: int, resolver: FakeResolver, connector: LoopbackConnector
) -> None:
    http = HttpSettings(timeout_s=0.5)
    async with await load(orders_source(port), resolver, connector, http) as tools:
        with pytest.raises(ToolTimeout):
            await toolset(tools).call("orders-dailyReport", {}, CALLER)


# --- documents and sources that are refused at start-up --------------------------------


def write(tmp_path: Path, name: str, content: str) -> str:
    path = tmp_path / name
    path.write_text(content)
    return str(path)


MINIMAL = {"openapi": "3.1.0", "info": {"title": "t", "version": "1"}}


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ("openapi: [3.1\n  bad", "not valid YAML"),
        ('{"openapi": "3.1.0",', "not valid JSON"),
        ("- just\n- a list\n", "not a JSON or YAML object"),
        (json.dumps({"swagger": "2.0", "info": {}, "paths": {}}), "Swagger 2.0"),
        (json.dumps({"info": {"title": "t"}}), "not an OpenAPI 3 document"),
        (json.dumps({**MINIMAL, "openapi": "4.0.0"}), "not supported"),
        (json.dumps({"openapi": "3.1.0", "paths": {}}), "not a valid OpenAPI 3.1.0 document"),
        (
            json.dumps({**MINIMAL, "paths": {"/a": {"get": {"parameters": [
                {"$ref": "https://elsewhere.example/params.json#/p"}],
                "responses": {"200": {"description": "ok"}}}}}}),
            "points outside the document",
        ),
        (
            json.dumps({**MINIMAL, "paths": {"/a": {"get": {"responses": {"200": {
                "description": "ok", "content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/Missing"}}}}}}}}}),
            "points to nothing",
        ),
        (json.dumps({**MINIMAL, "paths": {}}), "no operation to offer"),
    ],
)  # fmt: skip
async def test_unusable_documents_are_refused_naming_the_source(
    content: str,
    reason: str,
    tmp_path: Path,
    resolver: FakeResolver,
    connector: LoopbackConnector,
) -> None:
    source = OpenApiSourceSettings(
        name="broken", spec=write(tmp_path, "doc.txt", content), base_url="http://api.test/"
    )
    with pytest.raises(OpenApiSourceError, match=reason) as refused:
        await load(source, resolver, connector)
    assert str(refused.value).startswith("OpenAPI source 'broken': ")
    assert connector.connected == []


async def test_unreachable_or_missing_documents_are_refused(
    port: int, tmp_path: Path, resolver: FakeResolver, connector: LoopbackConnector
) -> None:
    cases = {
        str(tmp_path / "absent.json"): "cannot read",
        f"http://orders.test:{port}/no-such.json": "answered 404",
        "http://intranet.test/openapi.json": "non-public address",
        "ftp://orders.test/openapi.json": "file path or an http",
    }
    for spec, reason in cases.items():
        source = OpenApiSourceSettings(name="orders", spec=spec, trusted_private_network=False)
        if "orders.test:" in spec:
            source = orders_source(port, spec=spec)
        with pytest.raises(OpenApiSourceError, match=reason):
            await load(source, resolver, connector)


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"operations": ["getOrder", "getOrdr"]}, r"operations names .*'getOrdr'"),
        ({"operation_risks": {"deleteOrdr": "high"}}, r"operation_risks names .*'deleteOrdr'"),
        ({"base_url": "http://10.0.0.5:8080/"}, "trusted_private_network"),
        ({"base_url": "http://intranet.test/"}, "trusted_private_network"),
        ({"base_url": "ftp://orders.test/"}, "not an http"),
    ],
)
async def test_misconfigured_sources_are_refused(
    overrides: dict[str, Any],
    reason: str,
    port: int,
    service: OrdersService,
    tmp_path: Path,
    resolver: FakeResolver,
    connector: LoopbackConnector,
) -> None:
    spec = write(tmp_path, "orders.json", json.dumps(service.app().openapi()))
    settings = {"spec": spec, "base_url": "http://api.test/", "trusted_private_network": False}
    source = orders_source(port, **{**settings, **overrides})
    with pytest.raises(OpenApiSourceError, match=reason):
        await load(source, resolver, connector)


async def test_a_base_url_off_the_allow_list_is_refused(
    port: int, service: OrdersService, tmp_path: Path, resolver: FakeResolver
) -> None:
    spec = write(tmp_path, "orders.json", json.dumps(service.app().openapi()))
    source = orders_source(
        port, spec=spec, base_url="http://api.test/", trusted_private_network=False
    )
    http = HttpSettings(allowed_hosts=["*.partner.test"])
    with pytest.raises(OpenApiSourceError, match="LAMINA_TOOLS__HTTP__ALLOWED_HOSTS"):
        await load(source, resolver, LoopbackConnector(), http)
    async with await load(
        source, resolver, LoopbackConnector(), HttpSettings(allowed_hosts=["api.test"])
    ) as tools:
        assert len(tools) > 0


# --- OpenAPI 3.0 documents ------------------------------------------------------------

LEGACY = """
openapi: 3.0.3
info: {title: Inventory, version: "2"}
servers:
  - url: https://{region}.inventory.test/v{major}
    variables:
      region: {default: eu}
      major: {default: "2"}
paths:
  /things/{thing_id}:
    parameters:
      - $ref: '#/components/parameters/ThingId'
    get:
      summary: Get a thing
      x-internal: true
      parameters:
        - {name: session, in: cookie, required: false, schema: {type: string}}
        - name: fields
          in: query
          style: form
          explode: false
          schema: {type: array, items: {type: string}}
      responses:
        "200":
          description: ok
          content:
            application/json:
              schema: {$ref: '#/components/schemas/Thing'}
    put:
      operationId: replaceThing
      requestBody:
        required: true
        content:
          application/json:
            schema: {$ref: '#/components/schemas/Thing'}
      responses: {"200": {description: ok}}
  /uploads:
    post:
      operationId: upload
      requestBody:
        required: true
        content:
          multipart/form-data:
            schema: {type: object}
      responses: {"200": {description: ok}}
  /tracked:
    get:
      operationId: tracked
      parameters:
        - {name: tracker, in: cookie, required: true, schema: {type: string}}
      responses: {"200": {description: ok}}
components:
  parameters:
    ThingId:
      name: thing_id
      in: path
      required: true
      description: The thing's id
      schema: {type: integer, minimum: 0, exclusiveMinimum: true}
  schemas:
    Thing:
      title: Thing
      type: object
      required: [name]
      properties:
        name: {type: string, example: bolt}
        title: {type: string, nullable: true, description: "a property called title"}
        parent:
          $ref: '#/components/schemas/Thing'
        kind: {type: string, enum: [a, b], nullable: true}
"""


def test_an_openapi_30_document_is_converted_to_json_schema() -> None:
    parsed = read_document(LEGACY.encode())
    assert parsed.title == "Inventory"
    assert parsed.server_url == "https://eu.inventory.test/v2"
    by_key = {operation.key: operation for operation in parsed.operations}
    assert set(by_key) == {"get_things_thing_id", "replaceThing"}
    assert {item.key: item.reason for item in parsed.skipped} == {
        "upload": "its request body is multipart/form-data; only JSON is",
        "tracked": "its required parameter 'tracker' is a cookie",
    }

    get = by_key["get_things_thing_id"]
    assert get.parameters["properties"]["thing_id"] == {
        "type": "integer",
        "exclusiveMinimum": 0,
        "description": "The thing's id",
    }
    assert get.parameters["required"] == ["thing_id"]
    assert "session" not in get.parameters["properties"]  # an optional cookie is left out
    assert [b.explode for b in get.bindings if b.name == "fields"] == [False]

    body = by_key["replaceThing"].parameters["properties"]["body"]
    assert "title" not in body
    assert body["properties"]["title"] == {
        "type": ["string", "null"],
        "description": "a property called title",
    }
    assert body["properties"]["name"] == {"type": "string", "examples": ["bolt"]}
    assert body["properties"]["kind"] == {"type": ["string", "null"], "enum": ["a", "b", None]}
    assert body["properties"]["parent"] == {
        "description": "(recursive: the same structure as above)"
    }
    for operation in parsed.operations:
        Draft202012Validator.check_schema(operation.parameters)
    validator = Draft202012Validator(by_key["replaceThing"].parameters)
    thing = {"name": "bolt", "title": None, "parent": {"x": 1}}
    assert validator.is_valid({"thing_id": 1, "body": thing})
    assert not validator.is_valid({"thing_id": 1, "body": {"title": "no name"}})


async def test_30_tools_register_and_call_with_form_style_queries(
    tmp_path: Path, resolver: FakeResolver
) -> None:
    source = OpenApiSourceSettings(
        name="inventory",
        spec=write(tmp_path, "inventory.yaml", LEGACY),
        base_url="http://api.test/",
    )
    async with await load(source, resolver, LoopbackConnector()) as tools:
        names = [tool.spec.name for tool in tools]
        assert names == ["inventory-get_things_thing_id", "inventory-replaceThing"]
        assert [tool.spec.risk for tool in tools] == [RiskLevel.READ, RiskLevel.WRITE]
        build_toolset(ToolsSettings(load_entry_points=False), extra=[tools])


def test_tool_names_are_safe_short_and_stable() -> None:
    long_id = "a" * 40 + ".with spaces/and-symbols!" + "b" * 40
    first = tool_name("source_name_of_thirty_two_chars_", long_id, set())
    assert first == tool_name("source_name_of_thirty_two_chars_", long_id, set())
    assert len(first) <= 64
    assert first.startswith("source_name_of_thirty_two_chars_-aaaa")
    assert all(c.isalnum() or c in "_-" for c in first)
    clash = tool_name("src", "get.thing", {"src-get_thing"})
    assert clash != "src-get_thing" and clash.startswith("src-get_thing_")
