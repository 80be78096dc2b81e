"""The listing behind ``lamina tools list``: the installed tools as the server builds
them, and which of them a given caller may use."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from tools.contracts import RiskLevel, ToolSpec
from tools.listing import (
    ANY_SIGNED_IN_USER,
    ListedTool,
    ToolCatalog,
    load_catalog,
    who_may_use,
)
from tools.registry import PluginSource
from tools.settings import TenantToolSettings, ToolsSettings

if TYPE_CHECKING:
    from tests.tools.conftest import PluginInstaller

PLUGIN = '''
from dataclasses import replace

from tools.contracts import RiskLevel
from tools.plugins import tool


@tool
def open_tool() -> str:
    """Open to everyone.

    Details, for the JSON listing only.
    """
    return "open"


@tool(risk=RiskLevel.WRITE, roles={"hr"}, scopes={"Hr.Write"}, timeout_s=3)
def update_salary(person: str, amount: int) -> str:
    """Update a salary."""
    return person


@tool
def contoso_news() -> str:
    """Company news."""
    return "news"


# As an MCP or OpenAPI source limited to some tenants sets it.
contoso_news.spec = replace(contoso_news.spec, tenants=frozenset({"contoso"}))

TOOLS = [open_tool, update_salary, contoso_news]


def broken():
    raise RuntimeError("no HR backend configured")
'''


def spec(
    roles: set[str] | None = None, scopes: set[str] | None = None, tenants: set[str] | None = None
) -> ToolSpec:
    return ToolSpec(
        name="t",
        description="T.",
        parameters={"type": "object"},
        required_roles=frozenset(roles or ()),
        required_scopes=frozenset(scopes or ()),
        tenants=frozenset(tenants or ()),
    )


def test_who_may_use_in_words() -> None:
    assert who_may_use(spec()) == ANY_SIGNED_IN_USER == "any signed-in user"
    assert who_may_use(spec(roles={"hr", "admin"}, scopes={"Hr.Write"}, tenants={"contoso"})) == (
        "roles: admin or hr; scopes: Hr.Write; tenants: contoso"
    )


def test_catalog_loads_installed_plugins_as_the_server_does(plugins: PluginInstaller) -> None:
    module = plugins.install({"hr": "{module}:TOOLS", "hr-broken": "{module}:broken"}, PLUGIN)

    catalog = load_catalog(ToolsSettings(default_timeout_s=7), group=plugins.group)

    listed = {tool.spec.name: tool for tool in catalog.tools}
    assert list(listed) == ["open_tool", "update_salary", "contoso_news"]
    assert listed["open_tool"].spec.timeout_s == 7, "the deployment's default timeout"
    assert listed["update_salary"].spec.timeout_s == 3, "the tool's own timeout"
    assert listed["update_salary"].source == PluginSource("hr", f"{module}:TOOLS", module)
    (error,) = catalog.load_errors
    assert error.entry_point == f"hr-broken = {module}:broken"
    assert error.error == "RuntimeError: no HR backend configured"
    assert (catalog.not_installed, catalog.connected_sources) == ((), ())


def test_catalog_honours_enabled_and_load_entry_points(plugins: PluginInstaller) -> None:
    plugins.install({"hr": "{module}:TOOLS"}, PLUGIN)

    enabled = load_catalog(
        ToolsSettings(
            enabled=["update_salary", "not_a_tool"],
            tenants={"fabrikam": TenantToolSettings(disabled=["retired_tool"])},
        ),
        group=plugins.group,
    )
    off = load_catalog(ToolsSettings(load_entry_points=False), group=plugins.group)

    assert [tool.spec.name for tool in enabled.tools] == ["update_salary"]
    assert enabled.not_installed == ("not_a_tool", "retired_tool")
    assert off.tools == ()


def test_catalog_names_connected_sources_without_connecting() -> None:
    settings = ToolsSettings.model_validate(
        {
            "load_entry_points": False,
            # Neither exists: the listing must not try to reach them.
            "mcp_servers": [{"name": "files", "command": "/nonexistent/mcp-server"}],
            "openapi": [{"name": "crm", "spec": "http://127.0.0.1:9/openapi.json"}],
        }
    )
    assert load_catalog(settings).connected_sources == ("mcp:files", "openapi:crm")


def names(tools: Iterable[ListedTool]) -> list[str]:
    return [listed.spec.name for listed in tools]


def test_usable_by_a_caller_in_a_tenant_is_what_the_server_lists_them(
    plugins: PluginInstaller,
) -> None:
    plugins.install({"hr": "{module}:TOOLS"}, PLUGIN)
    catalog = load_catalog(
        ToolsSettings(tenants={"fabrikam": TenantToolSettings(disabled=["open_tool"])}),
        group=plugins.group,
    )

    def hr_writer_in(tenant_id: str) -> list[str]:
        return names(catalog.usable_by(roles={"hr"}, scopes={"Hr.Write"}, tenant_id=tenant_id))

    assert hr_writer_in("contoso") == ["open_tool", "update_salary", "contoso_news"]
    assert hr_writer_in("fabrikam") == ["update_salary"], (
        "fabrikam's settings disable open_tool, and contoso_news is contoso's alone"
    )
    assert names(catalog.usable_by(roles={"hr"}, tenant_id="contoso")) == [
        "open_tool",
        "contoso_news",
    ], "update_salary also needs the Hr.Write scope"


def test_usable_by_a_caller_in_any_tenant_checks_roles_and_scopes_only(
    plugins: PluginInstaller,
) -> None:
    plugins.install({"hr": "{module}:TOOLS"}, PLUGIN)
    catalog = load_catalog(
        ToolsSettings(tenants={"fabrikam": TenantToolSettings(disabled=["open_tool"])}),
        group=plugins.group,
    )

    assert names(catalog.usable_by(roles={"employee"})) == ["open_tool", "contoso_news"]
    assert names(catalog.usable_by(roles={"hr"}, scopes={"Hr.Write"})) == [
        "open_tool",
        "update_salary",
        "contoso_news",
    ]


def test_json_rows_have_stable_keys(plugins: PluginInstaller) -> None:
    module = plugins.install({"hr": "{module}:TOOLS"}, PLUGIN)
    catalog: ToolCatalog = load_catalog(ToolsSettings(), group=plugins.group)

    rows = [tool.as_json() for tool in catalog.tools]

    assert rows[1] == {
        "name": "update_salary",
        "description": "Update a salary.",
        "origin": "python",
        "plugin": "hr",
        "distribution": module,
        "risk": RiskLevel.WRITE.value,
        "idempotent": False,
        "timeout_s": 3,
        "roles": ["hr"],
        "scopes": ["Hr.Write"],
        "tenants": [],
    }
    assert rows[0]["description"] == "Open to everyone.\n\nDetails, for the JSON listing only."
    assert rows[2]["tenants"] == ["contoso"]
    assert list(rows[0]) == list(rows[1]) == list(rows[2])
