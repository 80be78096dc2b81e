"""ModelPlanner: the model's function calls, made through semantic-kernel, become a Plan."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any

import pytest

from inferencing.contracts import (
    ChatDelta,
    ChatMessage,
    ChatRequest,
    ChatResponse,
    InferenceCaller,
    ModelCapabilities,
    ProviderRateLimited,
    Role,
    ToolCall,
    ToolDefinition,
)
from intelligence.contracts import (
    ConversationMessage,
    PlanningContext,
    Principal,
    StepKind,
    StepResult,
)
from intelligence.planning.model_planner import (
    SEARCH_KNOWLEDGE,
    SEARCH_KNOWLEDGE_PARAMETERS,
    ModelPlanner,
)
from tools.contracts import ToolCaller, ToolResult, ToolSpec

# --- fakes -----------------------------------------------------------------------


class ScriptedChatModel:
    """A ChatModel that records every request and answers from a script."""

    def __init__(self, *replies: ChatResponse | Exception) -> None:
        self._replies = list(replies)
        self.requests: list[ChatRequest] = []
        self.callers: list[InferenceCaller] = []

    @property
    def name(self) -> str:
        return "fake-model"

    @property
    def capabilities(self) -> ModelCapabilities:
        return ModelCapabilities(tool_calls=True)

    async def complete(self, request: ChatRequest, caller: InferenceCaller) -> ChatResponse:
        self.requests.append(request)
        self.callers.append(caller)
        reply = self._replies.pop(0)
        if isinstance(reply, Exception):
            raise reply
        return reply

    async def stream(
        self, request: ChatRequest, caller: InferenceCaller
    ) -> AsyncIterator[ChatDelta]:
        raise AssertionError("planning does not stream")
        yield ChatDelta()  # pragma: no cover

    async def aclose(self) -> None:
        return None


def calls(*tool_calls: ToolCall, text: str | None = None) -> ChatResponse:
    return ChatResponse(
        message=ChatMessage(role=Role.ASSISTANT, content=text, tool_calls=tool_calls),
        finish_reason="tool_calls" if tool_calls else "stop",
        model="fake-model-2025",
    )


LOOKUP_SCHEMA: Mapping[str, Any] = {
    "type": "object",
    "description": "Which employee to look up.",
    "properties": {
        "employee_id": {"type": "string", "pattern": "^E[0-9]+$"},
        "fields": {"type": "array", "items": {"$ref": "#/$defs/field"}},
    },
    "required": ["employee_id"],
    "additionalProperties": False,
    "$defs": {"field": {"enum": ["email", "phone", "manager"]}},
}

PAYROLL_SCHEMA: Mapping[str, Any] = MappingProxyType(
    {
        "type": "object",
        "properties": {"month": {"type": "string", "format": "date"}},
        "required": ["month"],
    }
)

LOOKUP = ToolSpec(name="lookup_employee", description="Find an employee.", parameters=LOOKUP_SCHEMA)
PAYROLL = ToolSpec(
    name="payroll.report",
    description="Payroll figures for a month.",
    parameters=PAYROLL_SCHEMA,
    required_roles=frozenset({"hr"}),
)


class RoleFilteredToolset:
    """Lists a tool only to callers holding one of its roles (or any caller if it needs none)."""

    def __init__(self, *tools: ToolSpec) -> None:
        self._tools = tools
        self.listed_for: list[ToolCaller] = []

    def list_tools(self, caller: ToolCaller) -> Sequence[ToolSpec]:
        self.listed_for.append(caller)
        return [t for t in self._tools if not t.required_roles or t.required_roles & caller.roles]

    async def call(self, name: str, arguments: Mapping[str, Any], caller: ToolCaller) -> ToolResult:
        raise AssertionError("a planner never runs a tool")


@dataclass(frozen=True)
class Context:
    question: str
    history: Sequence[ConversationMessage] = ()
    principal: Principal = field(
        default_factory=lambda: Principal(tenant_id="contoso", user_id="alice")
    )
    rounds: Sequence[Sequence[StepResult]] = ()


HR = Principal(tenant_id="contoso", user_id="bob", roles=frozenset({"hr"}))


def message(role: str, content: str) -> ConversationMessage:
    assert role in ("user", "assistant")
    return ConversationMessage(
        id=f"m-{content[:8]}",
        conversation_id="c1",
        role=role,  # type: ignore[arg-type]
        content=content,
        created_at=datetime(2025, 1, 1, tzinfo=UTC),
    )


def render(context: PlanningContext) -> str:
    return f"You plan answers for {context.principal.user_id}."


def planner(model: ScriptedChatModel, *tools: ToolSpec, max_steps: int = 6) -> ModelPlanner:
    return ModelPlanner(model, RoleFilteredToolset(*tools), render, max_steps=max_steps)


def offered(request: ChatRequest) -> dict[str, ToolDefinition]:
    return {tool.name: tool for tool in request.tools}


# --- the request the model sees -------------------------------------------------------


async def test_request_carries_instructions_history_question_and_tools() -> None:
    model = ScriptedChatModel(calls())
    history = [message("user", "Who is my manager?"), message("assistant", "Carol [1].")]

    await planner(model, LOOKUP).plan(Context("And her phone number?", history))

    assert len(model.requests) == 1, "semantic-kernel must not loop on its own"
    request = model.requests[0]
    assert [(m.role, m.content) for m in request.messages] == [
        (Role.SYSTEM, "You plan answers for alice."),
        (Role.USER, "Who is my manager?"),
        (Role.ASSISTANT, "Carol [1]."),
        (Role.USER, "And her phone number?"),
    ]
    tools = offered(request)
    assert list(tools) == [SEARCH_KNOWLEDGE, "lookup_employee"]
    assert tools[SEARCH_KNOWLEDGE].parameters == SEARCH_KNOWLEDGE_PARAMETERS
    assert tools["lookup_employee"].parameters == LOOKUP_SCHEMA
    assert tools["lookup_employee"].description == "Find an employee."
    assert model.callers == [Context("").principal]


async def test_question_already_in_history_is_not_sent_twice() -> None:
    model = ScriptedChatModel(calls())
    history = [message("assistant", "Hello."), message("user", "What is the travel policy?")]

    await planner(model).plan(Context("What is the travel policy?", history))

    contents = [m.content for m in model.requests[0].messages]
    assert contents == ["You plan answers for alice.", "Hello.", "What is the travel policy?"]


async def test_only_tools_the_caller_may_list_are_offered() -> None:
    toolset = RoleFilteredToolset(LOOKUP, PAYROLL)
    model = ScriptedChatModel(calls(), calls())
    plan_for = ModelPlanner(model, toolset, render).plan

    await plan_for(Context("q"))
    await plan_for(Context("q", principal=HR))

    assert list(offered(model.requests[0])) == [SEARCH_KNOWLEDGE, "lookup_employee"]
    hr_tools = offered(model.requests[1])
    # "payroll.report" is not a valid function name for model APIs; it is offered sanitised.
    assert list(hr_tools) == [SEARCH_KNOWLEDGE, "lookup_employee", "payroll_report"]
    assert hr_tools["payroll_report"].parameters == dict(PAYROLL_SCHEMA)
    assert toolset.listed_for == [Context("").principal, HR]


async def test_a_tool_named_like_the_retrieval_function_is_not_offered() -> None:
    model = ScriptedChatModel(calls())
    impostor = ToolSpec(name=SEARCH_KNOWLEDGE, description="not retrieval", parameters={})

    await planner(model, impostor).plan(Context("q"))

    [search] = model.requests[0].tools
    assert search.parameters == SEARCH_KNOWLEDGE_PARAMETERS


# --- from function calls to a plan -----------------------------------------------------


async def test_function_calls_become_steps_then_an_answer() -> None:
    model = ScriptedChatModel(
        calls(
            ToolCall(id="call-1", name=SEARCH_KNOWLEDGE, arguments='{"query": "travel policy"}'),
            ToolCall(id="call-2", name="lookup_employee", arguments='{"employee_id": "E42"}'),
            ToolCall(id="call-3", name="payroll_report", arguments='{"month": "2025-01-01"}'),
            text="Check the policy and the employee.",
        )
    )

    plan = await planner(model, LOOKUP, PAYROLL).plan(Context("Can E42 travel?", principal=HR))

    assert plan.planner == "model:fake-model"
    assert plan.rationale == "Check the policy and the employee."
    s1, s2, s3, s4 = plan.steps
    assert (s1.id, s1.kind, s1.query, s1.tool_call_id) == (
        "s1",
        StepKind.RETRIEVE,
        "travel policy",
        "call-1",
    )
    assert (s2.id, s2.kind, s2.tool, s2.arguments, s2.tool_call_id) == (
        "s2",
        StepKind.CALL_TOOL,
        "lookup_employee",
        {"employee_id": "E42"},
        "call-2",
    )
    # Planned under the tool's own name, not the name the model saw.
    assert (s3.tool, s3.arguments, s3.tool_call_id) == (
        "payroll.report",
        {"month": "2025-01-01"},
        "call-3",
    )
    assert (s4.id, s4.kind, s4.depends_on) == ("s4", StepKind.ANSWER, ("s1", "s2", "s3"))
    assert all(step.depends_on == () for step in (s1, s2, s3))


async def test_no_function_call_grounds_on_the_question() -> None:
    model = ScriptedChatModel(calls(text="I can answer that directly."))

    plan = await planner(model, LOOKUP).plan(Context("What is Lamina?"))

    retrieve, answer = plan.steps
    assert (retrieve.id, retrieve.kind, retrieve.query) == (
        "s1",
        StepKind.RETRIEVE,
        "What is Lamina?",
    )
    assert retrieve.description == "Search the documents the user may see"
    assert retrieve.tool_call_id is None
    assert (answer.id, answer.kind, answer.depends_on) == ("s2", StepKind.ANSWER, ("s1",))
    assert plan.planner == "model:fake-model"


async def test_invalid_json_arguments_keep_the_step_with_empty_arguments() -> None:
    model = ScriptedChatModel(
        calls(
            ToolCall(id="c1", name="lookup_employee", arguments='{"employee_id": "E4'),
            ToolCall(id="c2", name="lookup_employee", arguments='["E42"]'),
            ToolCall(id="c3", name=SEARCH_KNOWLEDGE, arguments="not json"),
        )
    )

    plan = await planner(model, LOOKUP).plan(Context("Who is E42?"))

    broken, not_an_object, search, _answer = plan.steps
    assert (broken.kind, broken.tool, broken.arguments, broken.tool_call_id) == (
        StepKind.CALL_TOOL,
        "lookup_employee",
        {},
        "c1",
    )
    assert "not valid JSON" in broken.description
    assert not_an_object.arguments == {}
    assert "not a JSON object" in not_an_object.description
    assert (search.kind, search.query) == (StepKind.RETRIEVE, "Who is E42?")
    assert "not valid JSON" in search.description


@pytest.mark.parametrize(
    "arguments",
    ['{"employee_id": "E42", "amount": NaN}', '{"amount": -Infinity}', '{"amount": 1e999}'],
)
async def test_non_finite_numbers_in_arguments_are_not_valid_json(arguments: str) -> None:
    model = ScriptedChatModel(calls(ToolCall(id="c1", name="lookup_employee", arguments=arguments)))

    plan = await planner(model, LOOKUP).plan(Context("Who is E42?"))

    step = plan.steps[0]
    assert (step.kind, step.tool, step.arguments) == (StepKind.CALL_TOOL, "lookup_employee", {})
    assert "not valid JSON" in step.description


async def test_empty_arguments_are_an_empty_object() -> None:
    model = ScriptedChatModel(calls(ToolCall(id="c1", name="lookup_employee", arguments="")))

    plan = await planner(model, LOOKUP).plan(Context("q"))

    assert plan.steps[0].arguments == {}
    assert plan.steps[0].description == "Call the tool lookup_employee"


async def test_unknown_function_is_kept_for_the_tools_policy_to_refuse() -> None:
    model = ScriptedChatModel(
        calls(ToolCall(id="c9", name="delete_everything", arguments='{"really": true}'))
    )

    plan = await planner(model, LOOKUP).plan(Context("q"))

    step = plan.steps[0]
    assert (step.kind, step.tool, step.arguments, step.tool_call_id) == (
        StepKind.CALL_TOOL,
        "delete_everything",
        {"really": True},
        "c9",
    )
    assert "not among the functions offered" in step.description


async def test_a_tool_called_by_its_own_name_maps_to_that_tool() -> None:
    model = ScriptedChatModel(calls(ToolCall(id="c1", name="payroll.report", arguments="{}")))

    plan = await planner(model, PAYROLL).plan(Context("q", principal=HR))

    assert (plan.steps[0].tool, plan.steps[0].description) == (
        "payroll.report",
        "Call the tool payroll.report",
    )


async def test_steps_are_capped_at_max_steps_answer_included() -> None:
    many = [
        ToolCall(id=f"c{i}", name=SEARCH_KNOWLEDGE, arguments=f'{{"query": "q{i}"}}')
        for i in range(9)
    ]
    model = ScriptedChatModel(calls(*many))

    plan = await planner(model, max_steps=4).plan(Context("q"))

    assert [step.id for step in plan.steps] == ["s1", "s2", "s3", "s4"]
    assert [step.query for step in plan.steps[:3]] == ["q0", "q1", "q2"]
    assert plan.steps[-1].kind == StepKind.ANSWER
    assert "9 calls" in plan.rationale


def test_max_steps_leaves_room_for_an_action_and_the_answer() -> None:
    with pytest.raises(ValueError, match="max_steps"):
        planner(ScriptedChatModel(), max_steps=1)


async def test_model_errors_propagate_unchanged() -> None:
    error = ProviderRateLimited(message="busy", retryable=True, retry_after_s=2.0)
    model = ScriptedChatModel(error)

    with pytest.raises(ProviderRateLimited) as raised:
        await planner(model, LOOKUP).plan(Context("q"))

    assert raised.value is error


# --- import cost -----------------------------------------------------------------------


def test_importing_the_planner_does_not_import_semantic_kernel() -> None:
    script = textwrap.dedent(
        """
        import sys
        import intelligence.planning.model_planner
        loaded = sorted(m for m in sys.modules if m.split(".")[0] == "semantic_kernel")
        print(loaded)
        sys.exit(1 if loaded else 0)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
