"""A plugin in an installed package is discovered through its ``lamina.tools`` entry point,
and is callable only by a user with its required role.

Installed two ways: a ``*.dist-info`` written on ``sys.path`` (the ``plugins`` fixture),
and a wheel really installed by pip into a ``--target`` directory. The tools are then
loaded as the server loads them: ``build_toolset(ToolsSettings())`` and ``lamina tools list``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.support.processes import lamina_env, run_lamina
from tests.tools.conftest import pip_install_plugin
from tools.contracts import RiskLevel, ToolPermissionDenied, Toolset
from tools.policy import build_toolset
from tools.settings import ToolsSettings
from tools.testing import StaticCaller

if TYPE_CHECKING:
    from tests.tools.conftest import PluginInstaller

PLUGIN_SOURCE = '''
from typing import Annotated

from tools.contracts import RiskLevel, ToolCaller
from tools.plugins import tool


@tool(risk=RiskLevel.WRITE, roles={"facilities.booker"}, timeout_s=5)
def book_parking(
    caller: ToolCaller, space: Annotated[str, "Parking space, e.g. 'P2-14'"]
) -> dict[str, str]:
    """Book a parking space for the caller, for today."""
    return {"space": space, "booked_by": caller.user_id, "tenant": caller.tenant_id}


@tool(risk=RiskLevel.WRITE, roles={"facilities.booker"}, scopes={"Parking.Write"})
def release_parking(space: str) -> str:
    """Release a booked parking space."""
    return f"{space} released"


TOOLS = [book_parking, release_parking]
'''
PIP_DIST = "contoso-parking"
PIP_MODULE = "contoso_parking_tools"

BOOKER = StaticCaller(tenant_id="contoso", user_id="ann", roles={"employee", "facilities.booker"})
EMPLOYEE = StaticCaller(tenant_id="contoso", user_id="bob", roles={"employee"})


@pytest.fixture(scope="module")
def pip_target(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory pip installed the plugin package into (once for this module)."""
    target = tmp_path_factory.mktemp("pip") / "site"
    pip_install_plugin(
        target,
        dist_name=PIP_DIST,
        module=PIP_MODULE,
        module_source=PLUGIN_SOURCE,
        entry_points={"parking": f"{PIP_MODULE}:TOOLS"},
    )
    return target


@pytest.fixture(params=["dist-info", "pip"])
def installed(
    request: pytest.FixtureRequest, plugins: PluginInstaller, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The parking plugin, installed in the real ``lamina.tools`` group for this test."""
    if request.param == "pip":
        monkeypatch.syspath_prepend(str(request.getfixturevalue("pip_target")))
    else:
        plugins.install({"parking": "{module}:TOOLS"}, PLUGIN_SOURCE, group="lamina.tools")


@pytest.fixture
def toolset(installed: None) -> Toolset:
    # Exactly what the composition root builds: discovery on, every installed tool.
    return build_toolset(ToolsSettings())


def test_discovered_and_listed_for_a_user_with_the_role(toolset: Toolset) -> None:
    listed = {spec.name: spec for spec in toolset.list_tools(BOOKER)}

    assert "book_parking" in listed
    spec = listed["book_parking"]
    assert (spec.risk, spec.required_roles, spec.timeout_s) == (
        RiskLevel.WRITE,
        frozenset({"facilities.booker"}),
        5,
    )
    assert spec.parameters["properties"]["space"]["description"] == "Parking space, e.g. 'P2-14'"


async def test_callable_by_a_user_with_the_role(toolset: Toolset) -> None:
    result = await toolset.call("book_parking", {"space": "P2-14"}, BOOKER)

    assert result.output == {"space": "P2-14", "booked_by": "ann", "tenant": "contoso"}


async def test_hidden_from_and_refused_to_a_user_without_the_role(toolset: Toolset) -> None:
    assert "book_parking" not in [spec.name for spec in toolset.list_tools(EMPLOYEE)]
    with pytest.raises(ToolPermissionDenied):
        await toolset.call("book_parking", {"space": "P2-14"}, EMPLOYEE)


async def test_a_scope_the_plugin_declares_is_required_too(toolset: Toolset) -> None:
    signed_in_with_scope = StaticCaller(
        user_id="ann", roles={"facilities.booker"}, scopes={"Parking.Write"}
    )

    assert "release_parking" not in [spec.name for spec in toolset.list_tools(BOOKER)]
    with pytest.raises(ToolPermissionDenied):
        await toolset.call("release_parking", {"space": "P2-14"}, BOOKER)
    result = await toolset.call("release_parking", {"space": "P2-14"}, signed_in_with_scope)
    assert result.output == "P2-14 released"


@pytest.mark.slow  # three `lamina` processes, each importing semantic-kernel for the samples
def test_lamina_tools_list_shows_the_pip_installed_plugin(pip_target: Path) -> None:
    env = lamina_env(PYTHONPATH=str(pip_target))

    everything = run_lamina("tools", "list", "--json", env=env)
    as_booker = run_lamina("tools", "list", "--json", "--as-roles", "facilities.booker", env=env)
    as_employee = run_lamina("tools", "list", "--json", "--as-roles", "employee", env=env)

    assert everything.returncode == 0, everything.stderr
    listed = {tool["name"]: tool for tool in json.loads(everything.stdout)}
    assert listed["book_parking"] == {
        "name": "book_parking",
        "description": "Book a parking space for the caller, for today.",
        "origin": "python",
        "plugin": "parking",
        "distribution": PIP_DIST,
        "risk": "write",
        "idempotent": False,
        "timeout_s": 5,
        "roles": ["facilities.booker"],
        "scopes": [],
        "tenants": [],
    }
    assert "book_parking" in [tool["name"] for tool in json.loads(as_booker.stdout)]
    assert "book_parking" not in [tool["name"] for tool in json.loads(as_employee.stdout)]
