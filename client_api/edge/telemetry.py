"""What the edge records: the ``lamina.authenticate`` and ``lamina.admission`` spans, and
the ``lamina.edge.refusals`` counter.

Written against the OpenTelemetry API only. The tracer, meter and counter exist from
import on and bind to the SDK providers once :mod:`client_api.telemetry` installs them;
until then, and when telemetry is off, they record nothing and cost next to nothing.

A refusal (401, 403, 413, 429, a quota) is the edge doing its job, not a fault: its span
says ``refused`` with the reason and keeps an OK status, so that error views show only
what actually broke.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from enum import StrEnum
from typing import Any

import fastapi.routing
from opentelemetry import metrics, trace
from opentelemetry.trace import Span, Status, StatusCode
from starlette.routing import BaseRoute, Match
from starlette.types import Scope

TRACER = trace.get_tracer("lamina.client_api")
METER = metrics.get_meter("lamina.client_api")

AUTH_METHOD = "lamina.auth.method"
AUTH_OUTCOME = "lamina.auth.outcome"
TENANT_ID = "lamina.tenant.id"
POLICY_CHECK = "lamina.policy.check"
POLICY_OUTCOME = "lamina.policy.outcome"
POLICY_REASON = "lamina.policy.reason"
HTTP_ROUTE = "http.route"

UNMATCHED_ROUTE = "unmatched"
"""The ``http.route`` of a request no route matches: never the raw path, whose values
are unbounded."""


class RefusalReason(StrEnum):
    """Why the edge refused a request: the ``lamina.policy.reason`` of its span and of
    ``lamina.edge.refusals``."""

    RATE_LIMITED = "rate_limited"
    QUOTA_EXCEEDED = "quota_exceeded"
    TOO_LARGE = "too_large"
    UNAUTHENTICATED = "unauthenticated"
    FORBIDDEN = "forbidden"


class AdmissionCheck(StrEnum):
    """Which policy a ``lamina.admission`` span checked (``lamina.policy.check``)."""

    REQUESTS = "requests_per_minute"
    CAPS = "caps"
    TOKENS = "tokens"


REFUSALS = METER.create_counter(
    "lamina.edge.refusals",
    unit="{refusal}",
    description="Requests the edge refused, by reason and route",
)


def record_refusal(reason: RefusalReason, route: str) -> None:
    """Count one refusal. Only the reason and the route template: never who was refused,
    whose values are unbounded (the spans carry the tenant)."""
    REFUSALS.add(1, {POLICY_REASON: reason.value, HTTP_ROUTE: route})


def route_of(scope: Scope) -> str:
    """The route template of a request (``/v1/conversations/{conversation_id}``).

    After routing, the route the router chose; before it (a middleware refusing early),
    the first of the app's routes that matches, as the router will pick it."""
    chosen = scope.get("route")
    if isinstance(chosen, BaseRoute):
        return getattr(chosen, "path", UNMATCHED_ROUTE)
    for route in _matchable(getattr(scope.get("app"), "routes", [])):
        match, _ = route.matches(scope)
        if match is not Match.NONE:
            return getattr(route, "path", None) or UNMATCHED_ROUTE
    return UNMATCHED_ROUTE


def _matchable(routes: list[BaseRoute]) -> Iterable[Any]:
    """The app's routes with their full paths. FastAPI 0.137 nests the routes of an
    included router in one node without a path; since 0.137.2 it flattens them for us
    (before 0.137 they are flat already)."""
    contexts = getattr(fastapi.routing, "iter_route_contexts", None)
    return routes if contexts is None else contexts(routes)


Classify = Callable[[Exception], RefusalReason | None]
"""The refusal an exception stands for; ``None``: it is a failure, not a refusal."""


def authentication_span(refusal: Classify) -> AbstractContextManager[Span]:
    """``lamina.authenticate`` around establishing who the caller is; the caller sets
    ``lamina.auth.method`` and, once known, ``lamina.tenant.id``. Never the credential."""
    if _unsampled_trace():
        return _UNRECORDED  # as _decision would yield, without its generator's cost
    return _decision("lamina.authenticate", {}, AUTH_OUTCOME, "authenticated", refusal)


def admission_span(check: AdmissionCheck, refusal: Classify) -> AbstractContextManager[Span]:
    """``lamina.admission`` around one policy check: admitted, or refused and why."""
    if _unsampled_trace():
        return _UNRECORDED
    attributes = {POLICY_CHECK: check.value}
    return _decision("lamina.admission", attributes, POLICY_OUTCOME, "admitted", refusal)


_UNRECORDED: AbstractContextManager[Span] = nullcontext(trace.INVALID_SPAN)
"""The span of a check in an unsampled trace: none. ``nullcontext`` keeps no state, so
one serves every request."""


@contextmanager
def _decision(
    name: str, attributes: dict[str, str], outcome: str, passed: str, refusal: Classify
) -> Iterator[Span]:
    if _unsampled_trace():
        # A child follows its parent's sampling decision: this span would not be
        # recorded either, and starting it costs more than the check it times.
        yield trace.INVALID_SPAN
        return
    with TRACER.start_as_current_span(
        name, attributes=attributes, record_exception=False, set_status_on_exception=False
    ) as span:
        try:
            yield span
        except Exception as exc:
            reason = refusal(exc)
            if reason is None:
                span.set_attribute(outcome, "failed")
                span.record_exception(exc)
                span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
            else:
                span.set_attributes({outcome: "refused", POLICY_REASON: reason.value})
            raise
        span.set_attribute(outcome, passed)


def _unsampled_trace() -> bool:
    """Whether the current span belongs to a trace that was not sampled (and is not
    recorded): under the parent-based samplers Lamina installs (and the SDK's default),
    its children are not sampled either. Outside any trace (a Teams turn) it is False:
    a root span gets a sampling decision of its own."""
    current = trace.get_current_span()
    context = current.get_span_context()
    return context.is_valid and not context.trace_flags.sampled and not current.is_recording()
