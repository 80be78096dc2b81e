"""The registry: explicit registration, the shapes a plugin may take, entry-point discovery."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import pytest

from tools.contracts import JsonValue, RiskLevel, ToolCaller, ToolSpec
from tools.plugins import FunctionTool, Tool, tool
from tools.registry import DuplicateToolName, PluginSource, ToolRegistry, collect_tools

if TYPE_CHECKING:
    from tests.tools.conftest import PluginInstaller


@tool
def ping() -> str:
    """Answer pong."""
    return "pong"


@tool(name="ping")
def another_ping() -> str:
    """Also answers."""
    return "pong too"


def names(registry: ToolRegistry) -> list[str]:
    return [spec.name for spec in registry.specs()]


def test_register_and_duplicate_names() -> None:
    registry = ToolRegistry()
    registry.register(ping)

    with pytest.raises(DuplicateToolName, match="a tool named 'ping' is already registered"):
        registry.register(another_ping)
    assert names(registry) == ["ping"]
    assert "ping" in registry
    assert len(registry) == 1


def test_register_function_wraps_a_plain_function() -> None:
    def close_ticket(ticket_id: str) -> str:
        """Close a ticket."""
        return ticket_id

    registry = ToolRegistry()
    registered = registry.register_function(
        close_ticket, risk=RiskLevel.WRITE, roles={"servicedesk.agent"}
    )

    assert isinstance(registered, FunctionTool)
    assert registered.spec.risk is RiskLevel.WRITE
    assert registered.spec.required_roles == frozenset({"servicedesk.agent"})
    assert registry.register_function(ping) is ping
    assert names(registry) == ["close_ticket", "ping"]


def test_register_function_accepts_a_bound_method() -> None:
    class Counter:
        def __init__(self) -> None:
            self.total = 0

        def add(self, amount: int) -> int:
            """Add to the total."""
            self.total += amount
            return self.total

    registry = ToolRegistry()
    registered = registry.register_function(Counter().add)
    assert list(registered.spec.parameters["properties"]) == ["amount"]


def test_add_is_all_or_nothing() -> None:
    registry = ToolRegistry()
    with pytest.raises(DuplicateToolName):
        registry.add([ping, another_ping])
    assert len(registry) == 0


@pytest.mark.parametrize(
    "source",
    [
        pytest.param(ping, id="tool"),
        pytest.param([ping], id="list"),
        pytest.param((t for t in [ping]), id="generator"),
        pytest.param(lambda: [ping], id="factory"),
        pytest.param(lambda: ping, id="factory-of-one"),
    ],
)
def test_collect_tools_accepts_every_plugin_shape(source: object) -> None:
    assert collect_tools(source) == [ping]


@pytest.mark.parametrize(
    "source",
    [
        pytest.param("ping", id="string"),
        pytest.param({"ping": ping}, id="mapping"),
        pytest.param(lambda: lambda: [ping], id="factory-of-factory"),
        pytest.param(lambda x: [ping], id="callable-with-arguments"),
        pytest.param(42, id="number"),
    ],
)
def test_collect_tools_refuses_other_shapes(source: object) -> None:
    with pytest.raises(TypeError, match="expected a Tool"):
        collect_tools(source)


def test_sealed_registry_hands_tools_out_once_and_accepts_no_more() -> None:
    registry = ToolRegistry()
    registry.register(ping)

    tools = registry.seal()

    assert dict(tools) == {"ping": ping}
    with pytest.raises(RuntimeError, match="sealed"):
        registry.seal()
    with pytest.raises(RuntimeError, match="sealed"):
        registry.register(another_ping)
    with pytest.raises(RuntimeError, match="sealed"):
        registry.discover()
    with pytest.raises(TypeError):
        tools["other"] = another_ping  # type: ignore[index]


# --- entry-point discovery ----------------------------------------------------------

PLUGIN_MODULE = '''
from semantic_kernel.functions import kernel_function
from tools.contracts import RiskLevel
from tools.plugins import tool
from tools.sk_adapter import tool_policy


@tool
def single() -> str:
    """A single tool."""
    return "single"


@tool
def first() -> str:
    """First of a list."""
    return "first"


@tool
def second() -> str:
    """Second of a list."""
    return "second"


LIST = [first, second]


def factory():
    @tool
    def made() -> str:
        """Made by a factory."""
        return "made"

    return [made]


class Calendar:
    @tool_policy(risk=RiskLevel.WRITE, roles={"employee"})
    @kernel_function(description="Book a room.")
    def book(self, room: str) -> str:
        return room



def exploding_factory():
    raise RuntimeError("cannot reach the plugin's backend")


NOT_A_TOOL = 42


@tool(name="single")
def clashing() -> str:
    """Has the name of another tool."""
    return "clash"
'''


def test_discover_loads_every_plugin_shape(plugins: PluginInstaller) -> None:
    plugins.install(
        {
            "one": "{module}:single",
            "many": "{module}:LIST",
            "factory": "{module}:factory",
            "sk-class": "{module}:Calendar",
        },
        PLUGIN_MODULE,
    )
    plugins.install(
        {"sk-instance": "{module}:PARKING"},
        """
        from semantic_kernel.functions import kernel_function


        class Parking:
            @kernel_function(description="Free parking spaces.")
            def free_spaces(self) -> int:
                return 3


        PARKING = Parking()
        """,
    )

    registry = ToolRegistry()
    loaded = registry.discover(plugins.group)

    assert registry.load_errors == []
    assert sorted(tool.spec.name for tool in loaded) == sorted(names(registry))
    assert sorted(names(registry)) == [
        "Calendar-book",
        "Parking-free_spaces",
        "first",
        "made",
        "second",
        "single",
    ]
    book = next(spec for spec in registry.specs() if spec.name == "Calendar-book")
    assert (book.risk, book.required_roles) == (RiskLevel.WRITE, frozenset({"employee"}))


def test_broken_entry_points_are_reported_and_skipped(
    plugins: PluginInstaller, caplog: pytest.LogCaptureFixture
) -> None:
    plugins.install(
        {
            "good": "{module}:single",
            "missing-module": "lamina_no_such_module:tools",
            "missing-attribute": "{module}:no_such_attribute",
            "raises": "{module}:exploding_factory",
            "wrong-shape": "{module}:NOT_A_TOOL",
            "clash": "{module}:clashing",
        },
        PLUGIN_MODULE,
    )

    registry = ToolRegistry()
    registry.discover(plugins.group)

    assert names(registry) == ["single"]
    errors = {error.entry_point.split(" = ")[0]: error.error for error in registry.load_errors}
    assert set(errors) == {"missing-module", "missing-attribute", "raises", "wrong-shape", "clash"}
    assert errors["missing-module"].startswith("ModuleNotFoundError")
    assert errors["missing-attribute"].startswith("AttributeError")
    assert errors["raises"] == "RuntimeError: cannot reach the plugin's backend"
    assert errors["wrong-shape"].startswith("TypeError: expected a Tool")
    assert "a tool named 'single' is already registered" in errors["clash"]
    assert sum("was skipped" in record.getMessage() for record in caplog.records) == 5


def test_discover_finds_lamina_sample_plugin(lamina_entry_points: dict[str, str]) -> None:
    assert lamina_entry_points == {"directory": "tools.samples:directory_plugin"}

    registry = ToolRegistry()
    registry.discover()

    assert registry.load_errors == []
    specs = {spec.name: spec for spec in registry.specs()}
    assert {"lookup_employee", "servicedesk-create_ticket"} <= set(specs)
    assert specs["servicedesk-create_ticket"].risk is RiskLevel.HIGH


def test_register_function_takes_scopes() -> None:
    def send_mail(to: str) -> str:
        """Send a mail."""
        return to

    registry = ToolRegistry()
    registered = registry.register_function(send_mail, roles={"employee"}, scopes={"Mail.Send"})
    assert registered.spec.required_scopes == frozenset({"Mail.Send"})


class HandWritten(Tool):
    """A Tool written by hand, whose spec nothing has checked yet."""

    def __init__(self, spec: ToolSpec) -> None:
        self.spec = spec
        self.timeout_s = None

    async def invoke(self, arguments: Mapping[str, Any], caller: ToolCaller) -> JsonValue:
        return None


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("required_roles", "admin"),
        ("required_scopes", "Tools.Write"),
        ("tenants", "contoso"),
        ("required_scopes", frozenset({""})),
    ],
)
def test_registry_refuses_a_hand_written_spec_with_bad_names(field: str, value: object) -> None:
    spec = ToolSpec(name="raw", description="Raw.", parameters={"type": "object"})
    with pytest.raises(ValueError, match=f"tool 'raw': {field} must be"):
        ToolRegistry().register(HandWritten(replace(spec, **{field: value})))


def test_entries_say_which_plugin_brought_each_tool(plugins: PluginInstaller) -> None:
    module = plugins.install({"many": "{module}:LIST"}, PLUGIN_MODULE, dist_name="contoso-tools")
    registry = ToolRegistry()
    registry.register(ping)

    registry.discover(plugins.group)

    entries = {entry.spec.name: entry for entry in registry.entries()}
    assert list(entries) == ["ping", "first", "second"]
    assert entries["ping"].source is None
    assert entries["first"].source == PluginSource(
        entry_point="many", value=f"{module}:LIST", distribution="contoso-tools"
    )
    assert entries["first"].spec is registry.specs()[1]


def test_load_errors_name_the_package(plugins: PluginInstaller) -> None:
    plugins.install({"broken": "lamina_no_such_module:tools"}, dist_name="contoso-broken")
    registry = ToolRegistry()
    registry.discover(plugins.group)

    (error,) = registry.load_errors
    assert error.entry_point == "broken = lamina_no_such_module:tools"
    assert error.distribution == "contoso-broken"
    assert error.error.startswith("ModuleNotFoundError")
