"""Planning by the model: it chooses which searches and tool calls a turn needs.

The model is asked once, through semantic-kernel's function-calling machinery
with auto-invocation switched off, and its function calls become a typed
:class:`~intelligence.contracts.Plan`. Semantic-kernel never executes anything:
the kernel's functions exist only to describe what the model may call, and the
chat service behind the kernel is :class:`ChatModel` (the gateway), so every
model call is routed, metered and protected like any other. Executing the plan
(retrieval with the caller's identity, tools through their policy) is the
orchestrator's job, not this module's.

semantic-kernel takes seconds to import, so it is imported lazily, off the
event loop, on the first plan (or in :meth:`ModelPlanner.warm_up`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import threading
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Final, Protocol

from inferencing.contracts import (
    ChatMessage,
    ChatModel,
    ChatRequest,
    ChatResponse,
    InferenceCaller,
    Role,
    ToolCall,
    ToolDefinition,
    Usage,
)
from intelligence.contracts import (
    SEARCH_KNOWLEDGE,
    Plan,
    PlanningContext,
    PlanStep,
    StepKind,
    StepResult,
)
from tools.contracts import Toolset, ToolSpec

logger = logging.getLogger(__name__)


SEARCH_KNOWLEDGE_DESCRIPTION: Final = (
    "Search the organisation's documents that the user is allowed to read. Use it whenever "
    "the answer may depend on internal knowledge; call it once per distinct sub-question."
)

SEARCH_KNOWLEDGE_PARAMETERS: Final[Mapping[str, Any]] = {
    "type": "object",
    "properties": {
        "query": {
            "type": "string",
            "description": "A focused search query in the words the documents would use.",
        }
    },
    "required": ["query"],
    "additionalProperties": False,
}

_PLUGIN_NAME: Final = "lamina"
# What both semantic-kernel (function names) and OpenAI-style APIs accept as a function name.
_INVALID_NAME_CHARS: Final = re.compile(r"[^0-9A-Za-z_-]")
_MAX_NAME_LENGTH: Final = 64
_VALID_PARAMETER_NAME: Final = re.compile(r"^[0-9A-Za-z_-]+$")

_RETRIEVE_DESCRIPTION: Final = "Search the documents the user may see"
_ANSWER_DESCRIPTION: Final = "Answer from the gathered results, with citations"


# --- what the planner and the semantic-kernel adapter exchange (no SK types) ---------


@dataclass(frozen=True, slots=True)
class _OfferedFunction:
    """A function offered to the model under ``name``; ``tool`` is None for retrieval."""

    name: str
    description: str
    parameters: Mapping[str, Any]
    tool: str | None


@dataclass(frozen=True, slots=True)
class _RequestedCall:
    call_id: str | None
    name: str
    arguments: str | Mapping[str, Any] | None


@dataclass(frozen=True, slots=True)
class _ModelTurn:
    text: str
    calls: tuple[_RequestedCall, ...]
    usage: Usage | None = None


@dataclass(frozen=True, slots=True)
class _PlanningCall:
    chat_model: ChatModel
    caller: InferenceCaller
    instructions: str
    history: tuple[ChatMessage, ...]
    question: str
    functions: tuple[_OfferedFunction, ...]
    rounds: tuple[tuple[tuple[ToolCall, str], ...], ...] = ()
    """Earlier rounds of this turn: each the calls the model made and their results."""


class _AskModel(Protocol):
    def __call__(self, call: _PlanningCall) -> Awaitable[_ModelTurn]: ...


# --- the planner ---------------------------------------------------------------------


class ModelPlanner:
    """A :class:`~intelligence.contracts.Planner` in which the model picks the steps.

    The model is offered ``search_knowledge(query)`` and every tool the caller may
    list. Each function it calls becomes a step (``s1``, ``s2``, ...), in the order it
    called them, followed by one answer step that depends on all of them. If it calls
    nothing, the plan grounds on the question (retrieve, then answer), as the
    deterministic planner does. At most ``max_steps`` steps, the answer included.

    Asked again after a round (``context.rounds``), the model sees its earlier calls
    and their results; more calls become the next steps (numbered on from the last
    round), no call means the plan is just the answer step. Each plan carries the
    tokens its model call used (:attr:`Plan.usage`), for the turn's token budget.

    Calls to functions that were not offered, and arguments that are not a JSON
    object, are kept as steps (with empty arguments and a note): the tools layer's
    policy refuses them with a structured error the orchestrator can report.
    Model failures (:class:`~inferencing.contracts.InferenceError`) propagate unchanged.
    """

    def __init__(
        self,
        chat_model: ChatModel,
        toolset: Toolset,
        render_instructions: Callable[[PlanningContext], str],
        max_steps: int = 6,
    ) -> None:
        if max_steps < 2:
            raise ValueError("max_steps must be at least 2 (one action and the answer)")
        self._chat_model = chat_model
        self._toolset = toolset
        self._render_instructions = render_instructions
        self._max_steps = max_steps

    @property
    def name(self) -> str:
        """Recorded as :attr:`Plan.planner`."""
        return f"model:{self._chat_model.name}"

    @staticmethod
    def warm_up() -> None:
        """Import semantic-kernel now (blocking, seconds), e.g. from a start-up thread."""
        _semantic_kernel_adapter()

    async def plan(self, context: PlanningContext) -> Plan:
        functions = _offered_functions(self._toolset.list_tools(context.principal))
        call = _PlanningCall(
            chat_model=self._chat_model,
            caller=context.principal,
            instructions=self._render_instructions(context),
            history=_history_messages(context),
            question=context.question,
            functions=functions,
            rounds=_earlier_rounds(context.rounds, functions),
        )
        ask_model = await _load_semantic_kernel_adapter()
        turn = await ask_model(call)
        first = 1 + sum(len(results) for results in context.rounds)
        # Any earlier round (its own calls, or rules' searches handed over) makes this a
        # follow-up: no call then means "ready to answer", not "ground on the question".
        follow_up = bool(context.rounds)
        return self._to_plan(turn, functions, context.question, first, follow_up=follow_up)

    def _to_plan(
        self,
        turn: _ModelTurn,
        functions: Sequence[_OfferedFunction],
        question: str,
        first: int = 1,
        *,
        follow_up: bool = False,
    ) -> Plan:
        by_name = {function.tool: function for function in functions if function.tool}
        by_name.update((function.name, function) for function in functions)
        rationale = [turn.text.strip()] if turn.text.strip() else []
        calls = turn.calls
        if not calls and not follow_up:
            grounding = {"query": question}
            calls = (_RequestedCall(call_id=None, name=SEARCH_KNOWLEDGE, arguments=grounding),)
            rationale.append("The model called no function: grounding on the question.")
        budget = self._max_steps - 1
        if len(calls) > budget:
            rationale.append(
                f"The model asked for {len(calls)} calls; only the first {budget} are planned."
            )
            calls = calls[:budget]

        steps = [
            _step(f"s{index}", requested, by_name.get(requested.name), question)
            for index, requested in enumerate(calls, start=first)
        ]
        steps.append(
            PlanStep(
                id=f"s{first + len(steps)}",
                kind=StepKind.ANSWER,
                description=_ANSWER_DESCRIPTION,
                depends_on=tuple(step.id for step in steps),
            )
        )
        return Plan(
            steps=tuple(steps), planner=self.name, rationale=" ".join(rationale), usage=turn.usage
        )


def _step(
    step_id: str, requested: _RequestedCall, offered: _OfferedFunction | None, question: str
) -> PlanStep:
    arguments, problem = _parse_arguments(requested.arguments)
    if offered is not None and offered.tool is None:
        query = arguments.get("query")
        if not isinstance(query, str) or not query.strip():
            query = question
            problem = problem or "the model gave no query"
        return PlanStep(
            id=step_id,
            kind=StepKind.RETRIEVE,
            description=_with_note(_RETRIEVE_DESCRIPTION, problem, "searching for the question"),
            query=query,
            tool_call_id=requested.call_id,
        )
    # A function that was not offered is planned under the model's name: the tools
    # policy refuses it as unknown, and the refusal can be fed back to the model.
    tool = offered.tool if offered is not None and offered.tool is not None else requested.name
    description = f"Call the tool {tool}"
    if offered is None:
        description += " (not among the functions offered)"
    return PlanStep(
        id=step_id,
        kind=StepKind.CALL_TOOL,
        description=_with_note(description, problem, "calling it with no arguments"),
        tool=tool,
        arguments=arguments,
        tool_call_id=requested.call_id,
    )


def _parse_arguments(raw: str | Mapping[str, Any] | None) -> tuple[dict[str, Any], str | None]:
    """The call's arguments as a dict, and what was wrong with them, if anything."""
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return {}, None
    if isinstance(raw, Mapping):
        return dict(raw), None
    try:
        # json.loads accepts NaN and Infinity (and 1e999 overflows to it), which are not
        # JSON: no tool's schema allows them, so such arguments are refused, not passed on.
        parsed = json.loads(raw, parse_constant=_not_json, parse_float=_finite)
    except ValueError:
        return {}, "the model's arguments were not valid JSON"
    if not isinstance(parsed, dict):
        return {}, "the model's arguments were not a JSON object"
    return parsed, None


def _not_json(constant: str) -> Any:
    raise ValueError(f"{constant} is not JSON")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is out of range")
    return value


def _with_note(description: str, problem: str | None, remedy: str) -> str:
    return f"{description} ({problem}; {remedy})" if problem else description


def _offered_functions(tools: Sequence[ToolSpec]) -> tuple[_OfferedFunction, ...]:
    """search_knowledge first, then the caller's tools under names any model API accepts."""
    offered = [
        _OfferedFunction(
            name=SEARCH_KNOWLEDGE,
            description=SEARCH_KNOWLEDGE_DESCRIPTION,
            parameters=SEARCH_KNOWLEDGE_PARAMETERS,
            tool=None,
        )
    ]
    used = {SEARCH_KNOWLEDGE}
    for spec in tools:
        if spec.name == SEARCH_KNOWLEDGE:
            logger.warning("tool %r is not offered: the name is reserved for retrieval", spec.name)
            continue
        name = _unique_function_name(spec.name, used)
        used.add(name)
        offered.append(
            _OfferedFunction(
                name=name,
                description=spec.description,
                parameters=_plain_json(spec.parameters),
                tool=spec.name,
            )
        )
    return tuple(offered)


def _plain_json(value: Any) -> Any:
    """The same JSON value built of plain dicts and lists (SK deep-copies what it holds)."""
    if isinstance(value, Mapping):
        return {key: _plain_json(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain_json(item) for item in value]
    return value


def _unique_function_name(tool_name: str, used: set[str]) -> str:
    base = _INVALID_NAME_CHARS.sub("_", tool_name)[:_MAX_NAME_LENGTH] or "tool"
    name, counter = base, 1
    while name in used:
        counter += 1
        suffix = f"_{counter}"
        name = base[: _MAX_NAME_LENGTH - len(suffix)] + suffix
    return name


def _earlier_rounds(
    rounds: Sequence[Sequence[StepResult]], functions: Sequence[_OfferedFunction]
) -> tuple[tuple[tuple[ToolCall, str], ...], ...]:
    """The model's own calls of earlier rounds, under the names it was offered, with results.

    Steps the model did not plan (no ``tool_call_id``) are not shown as its calls."""
    names = {function.tool: function.name for function in functions if function.tool}
    earlier: list[tuple[tuple[ToolCall, str], ...]] = []
    for results in rounds:
        calls: list[tuple[ToolCall, str]] = []
        for result in results:
            step = result.step
            if not step.tool_call_id:
                continue
            if step.kind is StepKind.RETRIEVE:
                name, arguments = SEARCH_KNOWLEDGE, {"query": step.query}
            else:
                tool = step.tool or ""
                name, arguments = names.get(tool, tool), dict(step.arguments or {})
            calls.append((ToolCall(step.tool_call_id, name, json.dumps(arguments)), result.content))
        if calls:
            earlier.append(tuple(calls))
    return tuple(earlier)


def _history_messages(context: PlanningContext) -> tuple[ChatMessage, ...]:
    history = [message for message in context.history if message.content.strip()]
    # The orchestrator may persist the question before planning; don't ask it twice.
    if history and history[-1].role == "user" and history[-1].content == context.question:
        history.pop()
    roles = {"user": Role.USER, "assistant": Role.ASSISTANT}
    return tuple(
        ChatMessage(role=roles[message.role], content=message.content) for message in history
    )


# --- the semantic-kernel adapter (imported lazily) -----------------------------------

_adapter: _AskModel | None = None
_adapter_lock = threading.Lock()


async def _load_semantic_kernel_adapter() -> _AskModel:
    """The adapter; the first time, semantic-kernel is imported in a thread, off the loop."""
    if _adapter is not None:
        return _adapter
    return await asyncio.to_thread(_semantic_kernel_adapter)


def _semantic_kernel_adapter() -> _AskModel:
    global _adapter
    with _adapter_lock:
        if _adapter is None:
            _adapter = _build_semantic_kernel_adapter()
        return _adapter


def _build_semantic_kernel_adapter() -> _AskModel:
    """Build the semantic-kernel side: a gateway chat service and the planning call."""
    from pydantic import PrivateAttr
    from semantic_kernel import Kernel
    from semantic_kernel.connectors.ai.chat_completion_client_base import (
        ChatCompletionClientBase,
    )
    from semantic_kernel.connectors.ai.function_call_choice_configuration import (
        FunctionCallChoiceConfiguration,
    )
    from semantic_kernel.connectors.ai.function_calling_utils import (
        kernel_function_metadata_to_function_call_format,
    )
    from semantic_kernel.connectors.ai.function_choice_behavior import FunctionChoiceBehavior
    from semantic_kernel.connectors.ai.function_choice_type import FunctionChoiceType
    from semantic_kernel.connectors.ai.prompt_execution_settings import PromptExecutionSettings
    from semantic_kernel.contents import (
        AuthorRole,
        ChatHistory,
        ChatMessageContent,
        FinishReason,
        FunctionCallContent,
        FunctionResultContent,
        TextContent,
    )
    from semantic_kernel.functions import (
        KernelFunctionFromMethod,
        KernelFunctionMetadata,
        KernelParameterMetadata,
        kernel_function,
    )

    schema_key = "lamina_json_schema"

    class GatewayExecutionSettings(PromptExecutionSettings):
        """What the gateway service sends besides the messages."""

        tools: list[ToolDefinition] | None = None
        tool_choice: str | None = None
        max_tokens: int | None = None
        temperature: float | None = None

    def tool_definition(metadata: KernelFunctionMetadata) -> ToolDefinition:
        # SK rebuilds a schema from per-parameter metadata, dropping top-level keywords
        # (additionalProperties, $defs, ...); the tool's own schema goes out unchanged.
        properties = metadata.additional_properties or {}
        schema = properties.get(schema_key)
        if not isinstance(schema, Mapping):
            schema = kernel_function_metadata_to_function_call_format(metadata)["function"][
                "parameters"
            ]
        return ToolDefinition(
            name=metadata.name, description=metadata.description or "", parameters=schema
        )

    def update_settings(
        configuration: FunctionCallChoiceConfiguration,
        settings: PromptExecutionSettings,
        choice: FunctionChoiceType,
    ) -> None:
        if isinstance(settings, GatewayExecutionSettings) and configuration.available_functions:
            settings.tools = [tool_definition(f) for f in configuration.available_functions]
            settings.tool_choice = choice.value if choice else None

    def to_chat_messages(history: ChatHistory) -> list[ChatMessage]:
        messages: list[ChatMessage] = []
        for message in history.messages:
            role = message.role
            if role in (AuthorRole.SYSTEM, AuthorRole.DEVELOPER):
                messages.append(ChatMessage(role=Role.SYSTEM, content=message.content))
            elif role == AuthorRole.USER:
                messages.append(ChatMessage(role=Role.USER, content=message.content))
            elif role == AuthorRole.ASSISTANT:
                calls = tuple(
                    ToolCall(
                        id=item.id or "",
                        name=item.function_name,
                        arguments=(
                            item.arguments
                            if isinstance(item.arguments, str)
                            else json.dumps(dict(item.arguments or {}))
                        ),
                    )
                    for item in message.items
                    if isinstance(item, FunctionCallContent)
                )
                messages.append(
                    ChatMessage(
                        role=Role.ASSISTANT, content=message.content or None, tool_calls=calls
                    )
                )
            elif role == AuthorRole.TOOL:
                messages.extend(
                    ChatMessage(role=Role.TOOL, content=str(item.result), tool_call_id=item.id)
                    for item in message.items
                    if isinstance(item, FunctionResultContent)
                )
        return messages

    class GatewayChatCompletion(ChatCompletionClientBase):
        """A semantic-kernel chat service whose every call goes through our ChatModel."""

        SUPPORTS_FUNCTION_CALLING: ClassVar[bool] = True
        # Collaborators, not data: private attributes stay out of pydantic validation.
        _chat_model: ChatModel = PrivateAttr()
        _caller: InferenceCaller = PrivateAttr()

        def __init__(self, chat_model: ChatModel, caller: InferenceCaller) -> None:
            super().__init__(ai_model_id=chat_model.name)
            self._chat_model = chat_model
            self._caller = caller

        def get_prompt_execution_settings_class(self) -> type[PromptExecutionSettings]:
            return GatewayExecutionSettings

        def _update_function_choice_settings_callback(
            self,
        ) -> Callable[
            [FunctionCallChoiceConfiguration, PromptExecutionSettings, FunctionChoiceType], None
        ]:
            return update_settings

        def _reset_function_choice_settings(self, settings: PromptExecutionSettings) -> None:
            if isinstance(settings, GatewayExecutionSettings):
                settings.tools = None
                settings.tool_choice = None

        async def _inner_get_chat_message_contents(
            self, chat_history: ChatHistory, settings: PromptExecutionSettings
        ) -> list[ChatMessageContent]:
            if not isinstance(settings, GatewayExecutionSettings):
                settings = GatewayExecutionSettings.from_prompt_execution_settings(settings)
            offer_tools = settings.tool_choice != FunctionChoiceType.NONE.value
            request = ChatRequest(
                messages=to_chat_messages(chat_history),
                tools=tuple(settings.tools or ()) if offer_tools else (),
                max_tokens=settings.max_tokens,
                temperature=settings.temperature,
            )
            response = await self._chat_model.complete(request, self._caller)
            items: list[Any] = []
            if response.message.content:
                items.append(TextContent(text=response.message.content))
            items.extend(
                FunctionCallContent(
                    id=call.id,
                    plugin_name=_PLUGIN_NAME,
                    function_name=call.name,
                    arguments=call.arguments,
                )
                for call in response.message.tool_calls
            )
            try:
                finish_reason: FinishReason | None = FinishReason(response.finish_reason)
            except ValueError:
                finish_reason = None
            return [
                ChatMessageContent(
                    role=AuthorRole.ASSISTANT,
                    items=items,
                    inner_content=response,
                    ai_model_id=response.model,
                    finish_reason=finish_reason,
                )
            ]

    def never_runs(name: str, description: str) -> Callable[..., Any]:
        def placeholder(**arguments: Any) -> None:
            # Auto-invocation is off: the plan is executed by the orchestrator, under policy.
            raise RuntimeError(f"{name} is planned, never invoked by semantic-kernel")

        method: Callable[..., Any] = kernel_function(
            placeholder, name=name, description=description
        )
        return method

    def parameters_metadata(schema: Mapping[str, Any]) -> list[KernelParameterMetadata]:
        properties = schema.get("properties")
        if not isinstance(properties, Mapping):
            return []
        required = schema.get("required")
        required_names = set(required) if isinstance(required, list) else set()
        return [
            KernelParameterMetadata(
                name=name,
                description=property_schema.get("description"),
                type_=None,
                is_required=name in required_names,
                schema_data=dict(property_schema),
            )
            for name, property_schema in properties.items()
            if isinstance(property_schema, Mapping) and _VALID_PARAMETER_NAME.match(name)
        ]

    # Callers are offered the same few sets of functions turn after turn: a kernel is
    # built once per set (SK only reads it: auto-invocation is off) and reused.
    kernels: dict[tuple[tuple[str, str, str | None, str], ...], Kernel] = {}
    kernels_lock = threading.Lock()
    max_kernels = 256

    def kernel_for(functions: Sequence[_OfferedFunction]) -> Kernel:
        key = tuple(
            (f.name, f.description, f.tool, json.dumps(f.parameters, sort_keys=True, default=str))
            for f in functions
        )
        with kernels_lock:
            kernel = kernels.get(key)
        if kernel is None:
            kernel = build_kernel(functions)
            with kernels_lock:
                if len(kernels) >= max_kernels:
                    kernels.pop(next(iter(kernels)))
                kernels[key] = kernel
        return kernel

    def build_kernel(functions: Sequence[_OfferedFunction]) -> Kernel:
        kernel = Kernel()
        for offered in functions:
            kernel.add_function(
                _PLUGIN_NAME,
                KernelFunctionFromMethod(
                    method=never_runs(offered.name, offered.description),
                    plugin_name=_PLUGIN_NAME,
                    parameters=parameters_metadata(offered.parameters),
                    additional_metadata={schema_key: offered.parameters},
                ),
            )
        return kernel

    async def ask_model(call: _PlanningCall) -> _ModelTurn:
        history = ChatHistory()
        history.add_system_message(call.instructions)
        for message in call.history:
            if message.role == Role.USER:
                history.add_user_message(message.content or "")
            else:
                history.add_assistant_message(message.content or "")
        history.add_user_message(call.question)
        for calls in call.rounds:
            history.add_message(
                ChatMessageContent(
                    role=AuthorRole.ASSISTANT,
                    items=[
                        FunctionCallContent(
                            id=tool_call.id,
                            plugin_name=_PLUGIN_NAME,
                            function_name=tool_call.name,
                            arguments=tool_call.arguments,
                        )
                        for tool_call, _ in calls
                    ],
                )
            )
            for tool_call, content in calls:
                history.add_message(
                    ChatMessageContent(
                        role=AuthorRole.TOOL,
                        items=[
                            FunctionResultContent(
                                id=tool_call.id,
                                plugin_name=_PLUGIN_NAME,
                                function_name=tool_call.name,
                                result=content,
                            )
                        ],
                    )
                )
        settings = GatewayExecutionSettings(
            function_choice_behavior=FunctionChoiceBehavior.Auto(auto_invoke=False)
        )
        service = GatewayChatCompletion(call.chat_model, call.caller)
        reply = await service.get_chat_message_content(
            history, settings, kernel=kernel_for(call.functions)
        )
        if reply is None:
            return _ModelTurn(text="", calls=())
        response = reply.inner_content
        return _ModelTurn(
            usage=response.usage if isinstance(response, ChatResponse) else None,
            text=reply.content,
            calls=tuple(
                _RequestedCall(
                    call_id=item.id,
                    name=item.function_name,
                    arguments=item.arguments,
                )
                for item in reply.items
                if isinstance(item, FunctionCallContent)
            ),
        )

    return ask_model
