"""semantic-kernel plugin classes as Lamina tools: schema from SK metadata, calls through SK."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Annotated, Literal

import pytest
from semantic_kernel import Kernel
from semantic_kernel.functions import kernel_function

from tools.contracts import RiskLevel
from tools.sk_adapter import (
    KernelFunctionTool,
    ToolPolicy,
    is_kernel_plugin,
    kernel_plugin_tools,
    tool_policy,
)
from tools.testing import StaticCaller

CALLER = StaticCaller()


class WeatherPlugin:
    """An ordinary semantic-kernel plugin, plus Lamina's policy on one method."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []

    @kernel_function(description="Current weather in a city.")
    async def current(
        self,
        city: Annotated[str, "City name, e.g. 'Oslo'"],
        unit: Annotated[Literal["celsius", "fahrenheit"], "Temperature unit"] = "celsius",
        days: int = 1,
    ) -> dict[str, object]:
        self.calls.append(("current", threading.get_ident()))
        return {"city": city, "unit": unit, "days": days, "temperature": 21}

    @kernel_function
    def forecast_ready(self, region: Annotated[str, "Region code"]) -> bool:
        """Whether the forecast for a region is published."""
        self.calls.append(("forecast_ready", threading.get_ident()))
        return region == "eu"

    @tool_policy(risk=RiskLevel.WRITE, roles={"meteorologist"}, timeout_s=2)
    @kernel_function(description="Publish a forecast.")
    def publish(self, text: str) -> str:
        self.calls.append(("publish", text))
        return "published"

    @kernel_function(description="Needs the kernel semantic-kernel passes in.")
    def kernel_kind(self, kernel: Annotated[Kernel, {"include_in_function_choices": False}]) -> str:
        return type(kernel).__name__

    def helper(self) -> None:
        """Not a kernel function: not a tool."""


def tools_by_name(plugin: object, **options: object) -> dict[str, KernelFunctionTool]:
    tools = kernel_plugin_tools(plugin, **options)  # type: ignore[arg-type]
    return {tool.spec.name: tool for tool in tools}  # type: ignore[misc]


def test_every_kernel_function_becomes_a_tool_named_plugin_dash_function() -> None:
    tools = tools_by_name(WeatherPlugin(), plugin_name="weather")
    assert set(tools) == {
        "weather-current",
        "weather-forecast_ready",
        "weather-publish",
        "weather-kernel_kind",
    }
    assert set(tools_by_name(WeatherPlugin)) == {
        "WeatherPlugin-current",
        "WeatherPlugin-forecast_ready",
        "WeatherPlugin-publish",
        "WeatherPlugin-kernel_kind",
    }, "a class is instantiated; its name is the default plugin name"


def test_schema_comes_from_kernel_function_metadata() -> None:
    tools = tools_by_name(WeatherPlugin(), plugin_name="weather")
    current = tools["weather-current"].spec
    assert current.description == "Current weather in a city."
    assert current.parameters == {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "city": {"type": "string", "description": "City name, e.g. 'Oslo'"},
            # semantic-kernel's own schema_data says {"type": "object"} here.
            "unit": {
                "type": "string",
                "enum": ["celsius", "fahrenheit"],
                "description": "Temperature unit",
                "default": "celsius",
            },
            "days": {"type": "integer", "default": 1},
        },
        "required": ["city"],
    }
    assert tools["weather-forecast_ready"].spec.description == (
        "Whether the forecast for a region is published."
    )
    assert tools["weather-kernel_kind"].spec.parameters["properties"] == {}


def test_policy_defaults_decorator_and_mapping() -> None:
    tools = tools_by_name(WeatherPlugin(), plugin_name="weather")
    current = tools["weather-current"]
    assert (current.spec.risk, current.spec.required_roles, current.timeout_s) == (
        RiskLevel.READ,
        frozenset(),
        None,
    )
    publish = tools["weather-publish"]
    assert publish.spec.risk is RiskLevel.WRITE
    assert publish.spec.required_roles == frozenset({"meteorologist"})
    assert (publish.timeout_s, publish.spec.timeout_s, publish.spec.idempotent) == (2, 2, False)

    overridden = tools_by_name(
        WeatherPlugin(),
        plugin_name="weather",
        policies={"current": ToolPolicy(risk=RiskLevel.HIGH, roles=frozenset({"ops"}))},
    )["weather-current"]
    assert overridden.spec.risk is RiskLevel.HIGH
    assert overridden.spec.required_roles == frozenset({"ops"})


def test_tool_policy_works_below_kernel_function_too() -> None:
    class Plugin:
        @kernel_function(description="Delete.")
        @tool_policy(risk=RiskLevel.HIGH, roles={"admin"})
        def delete(self, key: str) -> None:
            pass

    (tool,) = kernel_plugin_tools(Plugin())
    assert tool.spec.risk is RiskLevel.HIGH
    assert tool.spec.required_roles == frozenset({"admin"})


def test_policies_naming_a_missing_function_are_refused() -> None:
    with pytest.raises(ValueError, match="does not have: curent"):
        kernel_plugin_tools(WeatherPlugin(), policies={"curent": ToolPolicy()})


def test_invalid_plugin_name_is_refused() -> None:
    with pytest.raises(ValueError, match="invalid plugin name 'weather plugin'"):
        kernel_plugin_tools(WeatherPlugin(), plugin_name="weather plugin")


async def test_invoke_goes_through_semantic_kernel() -> None:
    plugin = WeatherPlugin()
    tools = tools_by_name(plugin, plugin_name="weather")

    output = await tools["weather-current"].invoke({"city": "Oslo", "unit": "fahrenheit"}, CALLER)
    assert output == {"city": "Oslo", "unit": "fahrenheit", "days": 1, "temperature": 21}

    # semantic-kernel fills in the Kernel parameter: the call went through KernelFunction.invoke.
    assert await tools["weather-kernel_kind"].invoke({}, CALLER) == "Kernel"


async def test_sync_kernel_function_runs_off_the_event_loop() -> None:
    plugin = WeatherPlugin()
    tool = tools_by_name(plugin, plugin_name="weather")["weather-forecast_ready"]

    assert await tool.invoke({"region": "eu"}, CALLER) is True
    assert plugin.calls == [("forecast_ready", plugin.calls[0][1])]
    assert plugin.calls[0][1] != threading.get_ident()


async def test_errors_of_the_function_propagate_to_the_policy() -> None:
    class Failing:
        @kernel_function(description="Fails.")
        async def fail(self) -> str:
            raise LookupError("backend down")

    (tool,) = kernel_plugin_tools(Failing())
    with pytest.raises(LookupError, match="backend down"):
        await tool.invoke({}, CALLER)


def test_is_kernel_plugin_reads_decorator_attributes() -> None:
    assert is_kernel_plugin(WeatherPlugin)
    assert is_kernel_plugin(WeatherPlugin())
    assert not is_kernel_plugin(object())
    assert not is_kernel_plugin(test_is_kernel_plugin_reads_decorator_attributes)


def test_scopes_and_origin() -> None:
    class Mail:
        @tool_policy(risk=RiskLevel.WRITE, roles={"employee"}, scopes={"Mail.Send"})
        @kernel_function(description="Send a mail.")
        def send(self, to: str) -> str:
            return to

    (declared,) = kernel_plugin_tools(Mail())
    assert declared.spec.required_scopes == frozenset({"Mail.Send"})
    assert declared.spec.origin == "semantic-kernel"

    (overridden,) = kernel_plugin_tools(
        Mail(), policies={"send": ToolPolicy(scopes=frozenset({"Mail.Send.Shared"}))}
    )
    assert overridden.spec.required_scopes == frozenset({"Mail.Send.Shared"})
    assert overridden.spec.required_roles == frozenset(), "a mapping entry replaces the decorator"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"roles": "admin"}, "tool_policy: roles must be a set of names, not a string"),
        ({"scopes": "Mail.Send"}, "tool_policy: scopes must be a set of names, not a string"),
        ({"roles": {""}}, "tool_policy: roles must be non-empty strings"),
        ({"timeout_s": 0}, "timeout_s must be positive"),
    ],
)
def test_tool_policy_refuses_what_it_cannot_mean(options: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        tool_policy(**options)  # type: ignore[arg-type]


def test_tool_policy_value_normalises_and_checks_its_fields() -> None:
    policy = ToolPolicy(risk="high", roles={"ops"}, scopes=["Ops.Run"])  # type: ignore[arg-type]
    assert policy.risk is RiskLevel.HIGH
    assert (policy.roles, policy.scopes) == (frozenset({"ops"}), frozenset({"Ops.Run"}))
    with pytest.raises(ValueError, match="roles must be a set of names, not a string"):
        ToolPolicy(roles="ops")  # type: ignore[arg-type]


@dataclass
class Stop:
    city: Annotated[str, "City of the stop"]
    nights: int = 1


def test_nested_types_are_described_as_for_tool_functions() -> None:
    class Travel:
        @kernel_function(description="Plan a trip.")
        def plan(self, stops: Annotated[list[Stop], "The stops, in order"]) -> int:
            return len(stops)

    (planned,) = kernel_plugin_tools(Travel())
    schema = planned.spec.parameters
    assert schema["properties"]["stops"]["description"] == "The stops, in order"
    assert schema["$defs"]["Stop"]["properties"]["city"] == {
        "type": "string",
        "description": "City of the stop",
    }
