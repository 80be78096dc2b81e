"""The composition root offers configured MCP servers' and OpenAPI services' tools,
behind the execution policy, next to the installed plugins."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from client_api.composition import build_services
from client_api.settings import load_settings
from intelligence.contracts import Principal
from tests.support.orders_api import API_KEY, OrdersService
from tests.support.processes import app_in_thread
from tools.contracts import ToolApprovalRequired, ToolPermissionDenied

MCP_FIXTURE = Path(__file__).parents[1] / "support" / "mcp_stdio_server.py"
CLERK = Principal(tenant_id="contoso", user_id="ann", roles=frozenset({"sales", "employee"}))
GUEST = Principal(tenant_id="contoso", user_id="gus")


@pytest.fixture(scope="module")
def orders() -> Iterator[tuple[OrdersService, str, dict[str, object]]]:
    service = OrdersService()
    with app_in_thread(service.app()) as base:
        yield service, base, httpx.get(f"{base}/openapi.json").json()


async def test_mcp_and_openapi_tools_are_served_behind_the_policy(
    tmp_path: Path, orders: tuple[OrdersService, str, dict[str, object]]
) -> None:
    service, base, document = orders
    spec = tmp_path / "orders.json"
    spec.write_text(json.dumps(document))
    settings = load_settings(
        data_dir=tmp_path / "data",
        tools={
            "mcp_servers": [
                {
                    "name": "notes",
                    "command": sys.executable,
                    "args": [str(MCP_FIXTURE)],
                    "roles": ["sales"],
                    "tool_risks": {"crash": "high"},
                }
            ],
            "openapi": [
                {
                    "name": "orders",
                    "spec": str(spec),
                    "base_url": base,
                    "auth": "api_key",
                    "api_key": API_KEY,
                    "trusted_private_network": True,
                    "roles": ["sales"],
                }
            ],
        },
    )
    services = await build_services(settings)
    try:
        names = {spec.name for spec in services.toolset.list_tools(CLERK)}
        assert {"notes-echo", "notes-record", "lookup_employee"} <= names
        assert {"orders-getOrder", "orders-createOrder"} <= names
        assert not any(n.startswith(("notes-", "orders-")) for n in _names(services, GUEST))

        echoed = await services.toolset.call("notes-echo", {"text": "hello"}, CLERK)
        assert echoed.output == "hello"
        with pytest.raises(ToolPermissionDenied):
            await services.toolset.call("notes-echo", {"text": "hello"}, GUEST)
        with pytest.raises(ToolApprovalRequired):
            await services.toolset.call("notes-crash", {}, CLERK)

        order = await services.toolset.call("orders-getOrder", {"order_id": 2}, CLERK)
        assert order.output["item"] == "gadget"
        assert service.requests[-1].get("x-api-key") == API_KEY
        assert services.approvals is not None
    finally:
        await services.aclose()


def _names(services: object, caller: Principal) -> set[str]:
    toolset = services.toolset  # type: ignore[attr-defined]
    return {spec.name for spec in toolset.list_tools(caller)}
