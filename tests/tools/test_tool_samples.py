"""The sample tools: the tenant-scoped directory lookup and the service-desk plugin."""

from __future__ import annotations

import pytest

from tools.contracts import RiskLevel
from tools.samples import directory_plugin, lookup_employee
from tools.samples.service_desk import ServiceDeskPlugin
from tools.sk_adapter import kernel_plugin_tools
from tools.testing import StaticCaller

CONTOSO = StaticCaller(tenant_id="contoso", roles={"employee"})


async def test_lookup_matches_name_or_email_with_all_fields() -> None:
    found = await lookup_employee.invoke({"query": "ALEX.W"}, CONTOSO)
    assert found == [
        {
            "name": "Alex Wilber",
            "email": "alex.wilber@contoso.com",
            "department": "Sales",
            "manager": "Megan Bowen",
            "phone_ext": "4102",
        }
    ]


async def test_lookup_filters_by_department_and_limit() -> None:
    engineering = await lookup_employee.invoke(
        {"query": "@contoso", "department": "Engineering"}, CONTOSO
    )
    assert [person["name"] for person in engineering] == ["Adele Vance", "Lee Gu"]
    assert len(await lookup_employee.invoke({"query": "contoso", "limit": 3}, CONTOSO)) == 3


async def test_lookup_sees_only_the_callers_tenant() -> None:
    outsider = StaticCaller(tenant_id="fabrikam", roles={"employee"})
    assert await lookup_employee.invoke({"query": "megan"}, outsider) == []


def test_sample_policies() -> None:
    tools = {tool.spec.name: tool.spec for tool in directory_plugin()}
    assert set(tools) == {"lookup_employee", "servicedesk-create_ticket"}
    lookup, ticket = tools["lookup_employee"], tools["servicedesk-create_ticket"]
    assert (lookup.risk, lookup.required_roles, lookup.idempotent) == (
        RiskLevel.READ,
        frozenset({"employee"}),
        True,
    )
    assert (ticket.risk, ticket.required_roles, ticket.idempotent) == (
        RiskLevel.HIGH,
        frozenset({"employee", "servicedesk.agent"}),
        False,
    )
    assert ticket.parameters["properties"]["priority"]["enum"] == [
        "low",
        "normal",
        "high",
        "urgent",
    ]
    assert ticket.parameters["required"] == ["title", "description"]


async def test_create_ticket_through_semantic_kernel() -> None:
    plugin = ServiceDeskPlugin(first_number=7)
    (create,) = kernel_plugin_tools(plugin, plugin_name="servicedesk")

    output = await create.invoke({"title": "VPN down", "description": "Since 9:00"}, CONTOSO)

    assert output == {"id": "SD-7", "status": "new", "priority": "normal"}
    assert plugin.tickets["SD-7"]["title"] == "VPN down"


def test_without_semantic_kernel_only_the_lookup_is_offered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *args: None if name == "semantic_kernel" else real_find_spec(name, *args),
    )
    assert directory_plugin() == [lookup_employee]
