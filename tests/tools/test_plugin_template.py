"""Template: the tests every Lamina tool should have (see docs/plugins.md).

Copy this file next to your plugin's tests, point ``TOOL`` at your tool and
replace the arguments and expectations with yours. It checks what a reviewer
asks of a tool:

1. the schema a model is shown: names, types, required, descriptions;
2. the behaviour, called as production calls it: through the execution
   policy (``build_toolset``), on behalf of a caller;
3. the policy on the tool: its risk, who may use it, which arguments are refused.

This copy tests the sample ``lookup_employee`` tool.
"""

from __future__ import annotations

import pytest

from tools.contracts import (
    InvalidToolArguments,
    RiskLevel,
    ToolPermissionDenied,
    Toolset,
)
from tools.policy import build_toolset
from tools.samples import lookup_employee  # <- your tool
from tools.settings import ToolsSettings
from tools.testing import StaticCaller

TOOL = lookup_employee
ALLOWED = StaticCaller(tenant_id="contoso", user_id="megan", roles={"employee"})
NOT_ALLOWED = StaticCaller(tenant_id="contoso", user_id="guest", roles={"guest"})


@pytest.fixture
def toolset() -> Toolset:
    # Only this tool, behind the real policy; no entry points are loaded.
    return build_toolset(ToolsSettings(load_entry_points=False), [TOOL])


def test_schema_shown_to_the_model() -> None:
    parameters = TOOL.spec.parameters
    assert TOOL.spec.name == "lookup_employee"
    assert TOOL.spec.description.startswith("Find colleagues")
    assert parameters["required"] == ["query"]
    assert set(parameters["properties"]) == {"query", "department", "limit"}
    assert all(prop.get("description") for prop in parameters["properties"].values()), (
        "every parameter is described for the model"
    )


def test_risk_and_roles() -> None:
    assert TOOL.spec.risk is RiskLevel.READ
    assert TOOL.spec.required_roles == frozenset({"employee"})


async def test_returns_what_the_caller_asked_for(toolset: Toolset) -> None:
    result = await toolset.call("lookup_employee", {"query": "lee"}, ALLOWED)
    assert result.output == [
        {
            "name": "Lee Gu",
            "email": "lee.gu@contoso.com",
            "department": "Engineering",
            "manager": "Adele Vance",
            "phone_ext": "4202",
        }
    ]


async def test_hidden_from_and_refused_to_callers_without_the_role(toolset: Toolset) -> None:
    assert [spec.name for spec in toolset.list_tools(NOT_ALLOWED)] == []
    with pytest.raises(ToolPermissionDenied):
        await toolset.call("lookup_employee", {"query": "lee"}, NOT_ALLOWED)


@pytest.mark.parametrize(
    "arguments",
    [
        {},
        {"query": "l"},
        {"query": "lee", "limit": 0},
        {"query": "lee", "department": "Marketing"},
        {"query": "lee", "unexpected": True},
    ],
)
async def test_refuses_bad_arguments(toolset: Toolset, arguments: dict[str, object]) -> None:
    with pytest.raises(InvalidToolArguments) as caught:
        await toolset.call("lookup_employee", arguments, ALLOWED)
    assert caught.value.errors, "errors tell the model what to fix"
