"""The inferencing gateway: every model call in Lamina goes through here.

:class:`Gateway` is itself a :class:`~inferencing.contracts.ChatModel`, so the
layers above see one model. Behind it, each call is routed to a chain of
deployments (:mod:`~inferencing.gateway.routing`), admitted by each
deployment's circuit breaker (:mod:`~inferencing.gateway.breaker`), retried
with full-jitter backoff that honours ``Retry-After`` within a per-request
budget, failed over along the chain, bounded by connect, first-token and total
timeouts, and metered (:mod:`~inferencing.gateway.metering`). Each call is one
span, its attempts events on it, and feeds the layer's metrics
(:mod:`inferencing.telemetry`).

A streamed answer falls back to another deployment only before its first
delta has reached the caller; after that a failure ends the stream with
:class:`~inferencing.contracts.StreamInterrupted`, and the tokens used so far
are still metered.

With a :class:`~inferencing.contracts.TokenBudget`, each call reserves its prompt
plus ``max_tokens`` once, before its first attempt (so a refusal reaches no
provider), and reconciles the reservation to the tokens metered after its last.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime
from typing import Any, TypeVar, cast

from inferencing.contracts import (
    ChatDelta,
    ChatMessage,
    ChatRequest,
    ChatResponse,
    ContextWindowExceeded,
    InferenceCaller,
    InferenceError,
    InvalidModelRequest,
    ModelCapabilities,
    NoDeploymentAvailable,
    ProviderAuthenticationFailed,
    ProviderRateLimited,
    ProviderTimeout,
    Role,
    RouteInfo,
    StreamInterrupted,
    TokenBudget,
    TokenQuotaExceeded,
    TokenRateLimited,
    TokenReservation,
    ToolCall,
    UnknownDeployment,
    Usage,
)
from inferencing.gateway.breaker import Admission, BreakerState, BreakerStore
from inferencing.gateway.metering import UsageMeter, UsageRecord, cost_of
from inferencing.gateway.routing import ComplexityClassifier, Deployment, RoutePlan, Router
from inferencing.settings import (
    BreakerSettings,
    InferencingSettings,
    RetrySettings,
    TimeoutSettings,
)
from inferencing.telemetry import ModelCall, ModelTarget
from inferencing.tokens import TokenCounter

log = logging.getLogger(__name__)

_T = TypeVar("_T")

_NOTHING_FITS = "No model deployment can take this request."
_ALL_OPEN = "The model service is recovering from errors. Please try again shortly."
_SLOW = "The model did not answer in time."
_DEFAULT_MAX_TOKENS: int = InferencingSettings.model_fields["max_output_tokens"].default


@dataclass
class _Call:
    """The state of one request's attempts."""

    plan: RoutePlan
    telemetry: ModelCall
    attempts: list[tuple[str, str]] = field(default_factory=list)
    waited_s: float = 0.0
    last_error: InferenceError | None = None
    used_tokens: int = 0
    """Input plus output tokens, as metered: what a token reservation is reconciled to."""

    def attempted(self, deployment: str, outcome: str) -> None:
        self.attempts.append((deployment, outcome))
        self.telemetry.attempt(deployment, outcome)


@dataclass
class _Opened:
    """A stream that delivered its first delta."""

    deltas: AsyncIterator[ChatDelta]
    first: ChatDelta


class Gateway:
    """Routes, retries, fails over, times out and meters every model call."""

    def __init__(
        self,
        deployments: Sequence[Deployment],
        *,
        counter: TokenCounter,
        breakers: BreakerStore,
        meter: UsageMeter | None = None,
        retry: RetrySettings | None = None,
        breaker: BreakerSettings | None = None,
        timeouts: TimeoutSettings | None = None,
        classifier: ComplexityClassifier | None = None,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        today: Callable[[], date] | None = None,
        rng: random.Random | None = None,
        budget: TokenBudget | None = None,
        default_max_tokens: int | None = None,
        capture_content: bool = False,
    ) -> None:
        """``budget`` charges every call's tokens; ``default_max_tokens`` is what a
        request without ``max_tokens`` reserves for its output (the providers' default
        cap on answer length). ``capture_content`` puts prompts and completions in the
        calls' spans (``LAMINA_TELEMETRY__CAPTURE_CONTENT``); off, spans carry no text."""
        if not deployments:
            raise ValueError("the gateway needs at least one deployment")
        self._router = Router(deployments, classifier)
        self._counter = counter
        self._breakers = breakers
        self._meter = meter
        self._retry = retry or RetrySettings()
        self._breaker_policy = breaker or BreakerSettings()
        self._timeouts = timeouts or TimeoutSettings()
        self._clock = clock
        self._sleep = sleep
        self._today = today or (lambda: datetime.now(UTC).date())
        self._rng = rng or random.Random()
        self._budget = budget
        self._default_max_tokens = default_max_tokens or _DEFAULT_MAX_TOKENS
        self._capture_content = capture_content
        models = [d.model.capabilities for d in deployments]
        windows = [c.context_window for c in models]
        self._capabilities = ModelCapabilities(
            streaming=True,
            tool_calls=any(c.tool_calls for c in models),
            json_schema=any(c.json_schema for c in models),
            generative=any(c.generative for c in models),
            context_window=None if None in windows else max(w for w in windows if w),
        )
        self._name = deployments[0].model.name if len(deployments) == 1 else "gateway"
        # Telemetry's name of each deployment, built once rather than twice per call.
        self._targets = {d.name: ModelTarget.of(d.settings) for d in deployments}

    @property
    def name(self) -> str:
        return self._name

    @property
    def capabilities(self) -> ModelCapabilities:
        return self._capabilities

    @property
    def deployments(self) -> list[Deployment]:
        return self._router.deployments

    @property
    def meter(self) -> UsageMeter | None:
        return self._meter

    @property
    def budget(self) -> TokenBudget | None:
        return self._budget

    async def warm_up(self) -> None:
        """Load the token encoding now, off the event loop, so no request pays for it."""
        await asyncio.to_thread(self._counter.warm_up)

    async def breaker_states(self) -> dict[str, BreakerState]:
        now = self._clock()
        return {
            d.name: await self._breakers.state(d.name, now, self._breaker_policy)
            for d in self.deployments
        }

    # --- calls ----------------------------------------------------------------------

    async def complete(self, request: ChatRequest, caller: InferenceCaller) -> ChatResponse:
        with self._observed(request) as telemetry, telemetry.current():
            call = self._plan(request, telemetry)
            if self._budget is None:
                response = await self._complete(call, request, caller)
            else:
                response = await self._charged(
                    self._budget,
                    call,
                    request,
                    caller,
                    lambda: self._complete(call, request, caller),
                )
            telemetry.answered(finish_reasons=(response.finish_reason,), output=response.message)
            return response

    async def _complete(
        self, call: _Call, request: ChatRequest, caller: InferenceCaller
    ) -> ChatResponse:
        async def attempt(deployment: Deployment, _: Admission) -> ChatResponse:
            async with asyncio.timeout(self._timeouts.total_s):
                return await deployment.model.complete(request, caller)

        deployment, admission, response = await self._route(call, request, attempt)
        usage = response.usage or Usage(
            call.plan.prompt_tokens, self._counter.count(response.message.content or "")
        )
        route = await self._succeeded(
            call,
            request,
            caller,
            deployment,
            admission,
            response.model,
            usage,
            estimated=response.usage is None,
        )
        return replace(response, route=route, usage=usage)

    async def forward(
        self, payload: Mapping[str, Any], request: ChatRequest, caller: InferenceCaller
    ) -> tuple[dict[str, Any], RouteInfo]:
        """Send ``payload``, a chat completion body in OpenAI's wire format, as it is
        (but for ``model``) to the deployments the router picks for ``request``, its
        typed reading. A deployment whose model does not take the wire format answers
        ``request``, rendered in that format. Returns the response body and the route."""
        with self._observed(request) as telemetry, telemetry.current():
            call = self._plan(request, telemetry)
            if self._budget is None:
                body, route = await self._forward(call, payload, request, caller)
            else:
                body, route = await self._charged(
                    self._budget,
                    call,
                    request,
                    caller,
                    lambda: self._forward(call, payload, request, caller),
                )
            telemetry.answered(
                finish_reasons=_wire_finish_reasons(body),
                # Only a span that captures content shows the text.
                output=ChatMessage(Role.ASSISTANT, _wire_text(body))
                if self._capture_content
                else None,
            )
            return body, route

    async def _forward(
        self,
        call: _Call,
        payload: Mapping[str, Any],
        request: ChatRequest,
        caller: InferenceCaller,
    ) -> tuple[dict[str, Any], RouteInfo]:
        async def attempt(deployment: Deployment, _: Admission) -> dict[str, Any]:
            async with asyncio.timeout(self._timeouts.total_s):
                model = deployment.model
                # Not isinstance(model, ChatForwarder): a Protocol check costs more
                # than the rest of the attempt.
                if (forward := getattr(model, "forward", None)) is not None:
                    return cast(dict[str, Any], await forward(payload, caller))
                from inferencing.providers.openai_wire import completion_body

                return completion_body(await model.complete(request, caller))

        deployment, admission, body = await self._route(call, request, attempt)
        usage = _wire_usage(body)
        estimated = usage is None
        if usage is None:
            usage = Usage(call.plan.prompt_tokens, self._counter.count(_wire_text(body)))
        route = await self._succeeded(
            call,
            request,
            caller,
            deployment,
            admission,
            str(body.get("model") or ""),
            usage,
            estimated=estimated,
        )
        return body, route

    async def stream(
        self, request: ChatRequest, caller: InferenceCaller
    ) -> AsyncIterator[ChatDelta]:
        # The span is made current only around awaits of the gateway's own: between
        # deltas the consumer runs, and the span must not be current in its code.
        with self._observed(request, stream=True) as telemetry:
            call = self._plan(request, telemetry)
            budget = self._budget
            with telemetry.current():
                reservation = (
                    await self._reserve(budget, call, request, caller)
                    if budget is not None
                    else None
                )
            try:
                with telemetry.current():
                    deployment, admission, opened = await self._route(
                        call, request, self._opener(request, caller)
                    )
                telemetry.first_token()
                deltas = opened.deltas
                route = self._route_info(deployment, deployment.settings.model, call)
                output: list[str] = []
                tool_calls: list[ToolCall] = []
                usage: Usage | None = None
                finish_reason: str | None = None
                outcome = "cancelled"
                try:
                    delta: ChatDelta | None = opened.first
                    deadline = asyncio.get_running_loop().time() + self._timeouts.total_s
                    while delta is not None:
                        output.append(delta.content)
                        tool_calls.extend(delta.tool_calls)
                        usage = delta.usage or usage
                        finish_reason = delta.finish_reason or finish_reason
                        yield replace(delta, route=route) if delta.finish_reason else delta
                        delta = await _next(deltas, deadline)
                    outcome = "ok"
                except InferenceError:
                    outcome = "interrupted"
                    raise
                finally:
                    with suppress(Exception):
                        await deltas.aclose()  # type: ignore[attr-defined]
                    if outcome != "cancelled" or admission.probe:
                        # A caller hanging up says nothing about the deployment's health.
                        await self._record(deployment, admission, ok=outcome != "interrupted")
                    metered = usage or Usage(
                        call.plan.prompt_tokens, self._counter.count("".join(output))
                    )
                    # Cut or closed midway, the stream has used what was delivered so far.
                    call.used_tokens = metered.input_tokens + metered.output_tokens
                    self._meter_usage(
                        call, caller, request, deployment, metered, outcome, usage is None
                    )
                    telemetry.routed(route)
                    telemetry.answered(
                        finish_reasons=(finish_reason,) if finish_reason else (),
                        output=ChatMessage(Role.ASSISTANT, "".join(output), tuple(tool_calls)),
                    )
            finally:
                if reservation is not None:
                    assert budget is not None
                    await budget.reconcile(reservation, call.used_tokens)

    async def aclose(self) -> None:
        for deployment in self.deployments:
            await deployment.model.aclose()
        if self._meter is not None:
            await self._meter.aclose()

    # --- token budget ---------------------------------------------------------------

    async def _reserve(
        self, budget: TokenBudget, call: _Call, request: ChatRequest, caller: InferenceCaller
    ) -> TokenReservation:
        # The prompt was counted for routing already; the output can be up to max_tokens.
        tokens = call.plan.prompt_tokens + (request.max_tokens or self._default_max_tokens)
        try:
            return await budget.reserve(caller, tokens)
        except (TokenRateLimited, TokenQuotaExceeded) as refusal:
            call.telemetry.refused(refusal, caller.tenant_id)
            raise

    async def _charged(
        self,
        budget: TokenBudget,
        call: _Call,
        request: ChatRequest,
        caller: InferenceCaller,
        run: Callable[[], Awaitable[_T]],
    ) -> _T:
        """``run`` the call's attempts between one reservation and its reconciliation."""
        reservation = await self._reserve(budget, call, request, caller)
        # Cancelled while a provider works on it, the call is most likely finished (and
        # billed) upstream anyway: the reservation stands.
        used = reservation.tokens
        try:
            result = await run()
        except Exception:
            used = 0  # failed: the contract settles it to nothing
            raise
        else:
            used = call.used_tokens
            return result
        finally:
            await budget.reconcile(reservation, used)

    # --- routing and attempts ---------------------------------------------------------

    def _observed(self, request: ChatRequest, *, stream: bool = False) -> ModelCall:
        return ModelCall(
            "chat", request=request, stream=stream, capture_content=self._capture_content
        )

    def _plan(self, request: ChatRequest, telemetry: ModelCall) -> _Call:
        prompt_tokens = request.prompt_tokens
        if prompt_tokens is None:
            prompt_tokens = self._counter.count_messages(request.messages, request.tools)
        try:
            plan = self._router.plan(request, prompt_tokens, self._today())
        except KeyError:
            raise UnknownDeployment(
                f"There is no model deployment named {request.deployment!r}.",
                details={"deployment": request.deployment},
            ) from None
        if not plan.chain:
            largest = self._capabilities.context_window
            too_long = largest is not None and prompt_tokens + (request.max_tokens or 0) > largest
            error = ContextWindowExceeded if too_long else NoDeploymentAvailable
            raise error(
                _NOTHING_FITS, details={"route": list(plan.reasons), "prompt_tokens": prompt_tokens}
            )
        log.debug("route for %d prompt tokens: %s", prompt_tokens, "; ".join(plan.reasons))
        telemetry.routed_to(self._targets[plan.chain[0].name])
        return _Call(plan, telemetry)

    def _opener(
        self, request: ChatRequest, caller: InferenceCaller
    ) -> Callable[[Deployment, Admission], Awaitable[_Opened]]:
        async def attempt(deployment: Deployment, _: Admission) -> _Opened:
            deltas = aiter(deployment.model.stream(request, caller))
            try:
                async with asyncio.timeout(self._timeouts.first_token_s):
                    first = await anext(deltas)
            except BaseException:
                with suppress(Exception):
                    await deltas.aclose()  # type: ignore[attr-defined]
                raise
            return _Opened(deltas, first)

        return attempt

    async def _route(
        self,
        call: _Call,
        request: ChatRequest,
        attempt: Callable[[Deployment, Admission], Awaitable[_T]],
    ) -> tuple[Deployment, Admission, _T]:
        """Try the chain, round after round, until one attempt succeeds or the attempts,
        the retry budget or the usable deployments run out; then raise the last error."""
        chain = list(call.plan.chain)
        for round_number in range(self._retry.max_attempts):
            retry_after: float | None = None
            refused_for: list[float] = []
            for deployment in list(chain):
                if len(call.attempts) >= self._retry.max_attempts:
                    break
                if deployment not in chain:  # pruned by an earlier failure of this round
                    continue
                admission = await self._admit(deployment)
                if not admission.allowed:
                    refused_for.append(admission.retry_in_s)
                    call.attempted(deployment.name, f"breaker {admission.state.value}")
                    continue
                try:
                    result = await attempt(deployment, admission)
                except TimeoutError:
                    error: InferenceError = ProviderTimeout(_SLOW, retryable=True)
                except InferenceError as exc:
                    error = exc
                else:
                    call.attempted(deployment.name, "ok")
                    return deployment, admission, result
                call.attempted(deployment.name, type(error).__name__)
                call.last_error = error
                if not await self._after_failure(deployment, admission, error, chain):
                    raise self._final(call)
                if isinstance(error, ProviderRateLimited) and error.retry_after_s is not None:
                    retry_after = max(retry_after or 0.0, error.retry_after_s)
            if not chain or len(call.attempts) >= self._retry.max_attempts:
                break
            if call.last_error is None and refused_for:
                # Every deployment's breaker is open: waiting here would only hold the caller.
                break
            delay = self._backoff(round_number, retry_after)
            if call.waited_s + delay > self._retry.budget_s:
                break
            call.waited_s += delay
            await self._sleep(delay)
        raise self._final(call)

    async def _after_failure(
        self,
        deployment: Deployment,
        admission: Admission,
        error: InferenceError,
        chain: list[Deployment],
    ) -> bool:
        """Record a failed attempt and prune the chain; False when nothing else may help."""
        log.warning(
            "model call to %s failed: %s",
            deployment.name,
            error.message,
            extra={"deployment": deployment.name, "error": type(error).__name__},
        )
        if isinstance(error, ContextWindowExceeded):
            # Not the deployment's fault. Only a larger window can help.
            await self._record(deployment, admission, ok=True)
            window = deployment.model.capabilities.context_window or 0
            chain[:] = [d for d in chain if (d.model.capabilities.context_window or 0) > window]
            return bool(chain)
        if isinstance(error, InvalidModelRequest):
            await self._record(deployment, admission, ok=True)
            return False
        await self._record(deployment, admission, ok=False)
        if isinstance(error, ProviderAuthenticationFailed) or not error.retryable:
            chain.remove(deployment)
        return bool(chain)

    def _backoff(self, round_number: int, retry_after: float | None) -> float:
        ceiling = min(self._retry.max_delay_s, self._retry.base_delay_s * 2**round_number)
        return max(self._rng.uniform(0, ceiling), retry_after or 0.0)

    def _final(self, call: _Call) -> InferenceError:
        error = call.last_error or NoDeploymentAvailable(_ALL_OPEN, retryable=True)
        error.details = {**error.details, "attempts": [list(a) for a in call.attempts]}
        return error

    async def _admit(self, deployment: Deployment) -> Admission:
        return await self._breakers.admit(deployment.name, self._clock(), self._breaker_policy)

    async def _record(self, deployment: Deployment, admission: Admission, *, ok: bool) -> None:
        await self._breakers.record(
            deployment.name, self._clock(), self._breaker_policy, ok=ok, probe=admission.probe
        )

    # --- metadata -------------------------------------------------------------------

    async def _succeeded(
        self,
        call: _Call,
        request: ChatRequest,
        caller: InferenceCaller,
        deployment: Deployment,
        admission: Admission,
        model: str,
        usage: Usage,
        *,
        estimated: bool,
    ) -> RouteInfo:
        await self._record(deployment, admission, ok=True)
        call.used_tokens = usage.input_tokens + usage.output_tokens
        self._meter_usage(call, caller, request, deployment, usage, "ok", estimated)
        route = self._route_info(deployment, model, call)
        call.telemetry.routed(route)
        return route

    def _route_info(self, deployment: Deployment, model: str, call: _Call) -> RouteInfo:
        return RouteInfo(
            deployment=deployment.name,
            model=model or deployment.settings.model,
            model_version=deployment.settings.model_version,
            reasons=call.plan.reasons,
            attempts=tuple(call.attempts),
        )

    def _meter_usage(
        self,
        call: _Call,
        caller: InferenceCaller,
        request: ChatRequest,
        deployment: Deployment,
        usage: Usage,
        outcome: str,
        estimated: bool,
    ) -> None:
        settings = deployment.settings
        cost = cost_of(
            usage.input_tokens,
            usage.output_tokens,
            settings.input_price_per_1k,
            settings.output_price_per_1k,
        )
        call.telemetry.routed_to(self._targets[settings.name])
        call.telemetry.used(usage, tenant_id=caller.tenant_id, cost_usd=cost, estimated=estimated)
        if self._meter is None:
            return
        self._meter.record(
            UsageRecord(
                at=datetime.now(UTC),
                tenant_id=caller.tenant_id,
                user_id=caller.user_id,
                deployment=settings.name,
                model=settings.model,
                model_version=settings.model_version,
                prompt_version=request.prompt_version,
                input_tokens=usage.input_tokens,
                output_tokens=usage.output_tokens,
                cost=cost,
                outcome=outcome,
                estimated=estimated,
            )
        )


async def _next(deltas: AsyncIterator[ChatDelta], deadline: float) -> ChatDelta | None:
    remaining = deadline - asyncio.get_running_loop().time()
    try:
        async with asyncio.timeout(max(remaining, 0.0)):
            return await anext(deltas)
    except StopAsyncIteration:
        return None
    except TimeoutError:
        raise StreamInterrupted(
            "The answer took too long and was cut short.", details={"reason": "total timeout"}
        ) from None


def _wire_usage(body: Mapping[str, Any]) -> Usage | None:
    usage = body.get("usage")
    if not isinstance(usage, dict):
        return None
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    if isinstance(prompt, int) and isinstance(completion, int):
        return Usage(prompt, completion)
    return None


def _wire_text(body: Mapping[str, Any]) -> str:
    choices = body.get("choices") or []
    message = choices[0].get("message") if choices and isinstance(choices[0], dict) else None
    content = message.get("content") if isinstance(message, dict) else None
    return content if isinstance(content, str) else ""


def _wire_finish_reasons(body: Mapping[str, Any]) -> tuple[str, ...]:
    choices = body.get("choices") or []
    return tuple(
        reason
        for choice in choices
        if isinstance(choice, dict) and isinstance(reason := choice.get("finish_reason"), str)
    )
