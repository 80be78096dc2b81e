"""The intelligence layer's telemetry: its tracer, its meter, and the instruments of turns
and of answer quality.

Everything here uses the OpenTelemetry API only. Instruments are made at import; until the
composition root installs the SDK's providers they record nothing, and then the API's
proxies bind to them. Metric attributes stay bounded (prompt ids, planner names, outcomes):
never a user id, a conversation id or any text.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from opentelemetry import metrics, trace
from opentelemetry.metrics import CallbackOptions, Observation

tracer = trace.get_tracer("lamina.intelligence")
meter = metrics.get_meter("lamina.intelligence")

# Span names and attributes of the orchestrator's spans.
TURN_SPAN = "lamina.turn"
PLAN_SPAN = "lamina.plan"
STEP_SPAN = "lamina.step"

CONVERSATION_ID = "lamina.conversation.id"
TURN_ID = "lamina.turn.id"
TURN_STATUS = "lamina.turn.status"
TURN_RUN = "lamina.turn.run"
TURN_QUESTION = "lamina.turn.question"
TENANT_ID = "lamina.tenant.id"
PROMPT_ID = "lamina.prompt.id"
PLANNER = "lamina.planner"
PLAN_STEPS = "lamina.plan.steps"
PLAN_ROUND = "lamina.plan.round"
STEP_ID = "lamina.step.id"
STEP_KIND = "lamina.step.kind"
STEP_STATUS = "lamina.step.status"
TOOL_NAME = "gen_ai.tool.name"
ERROR_TYPE = "error.type"
TURN_OUTCOME = "lamina.turn.outcome"
FEEDBACK_RATING = "lamina.feedback.rating"

_SECONDS = (0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 8.0, 13.0, 21.0, 34.0, 55.0)
# Scores are on the index's own scale: a cosine or fused score below 1, a BM25 score above.
_SCORES = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 2.0, 5.0, 10.0)

turn_time_to_first_token = meter.create_histogram(
    "lamina.turn.time_to_first_token",
    unit="s",
    description="From the start of a turn's run to the first answer text sent",
    explicit_bucket_boundaries_advisory=_SECONDS,
)
quality_retrieval_score = meter.create_histogram(
    "lamina.quality.retrieval_score",
    unit="1",
    description="The best retrieval score of each answered turn, per answer prompt",
    explicit_bucket_boundaries_advisory=_SCORES,
)
quality_turns = meter.create_counter(
    "lamina.quality.turns",
    unit="{turn}",
    description="Finished turns by outcome (answered, no_answer, refused, failed), per prompt",
)
quality_feedback = meter.create_counter(
    "lamina.quality.feedback",
    unit="{rating}",
    description="Users' ratings of answers (positive, negative), per answer prompt",
)


class QualityReadings(Protocol):
    """What the drift gauges read at each collection: one observation per prompt id."""

    def no_answer_ratios(self) -> Iterable[Observation]: ...

    def feedback_positive_ratios(self) -> Iterable[Observation]: ...

    def retrieval_score_medians(self) -> Iterable[Observation]: ...


class _Reported:
    """The readings the gauges report: the process's quality monitor, once exposed."""

    readings: QualityReadings | None = None


def report_quality(readings: QualityReadings | None) -> None:
    """Let the drift gauges read ``readings`` (``None``: report nothing). A process has one
    quality monitor; the composition root exposes it."""
    _Reported.readings = readings


def _no_answer(options: CallbackOptions) -> Iterable[Observation]:
    readings = _Reported.readings
    return readings.no_answer_ratios() if readings is not None else ()


def _feedback_positive(options: CallbackOptions) -> Iterable[Observation]:
    readings = _Reported.readings
    return readings.feedback_positive_ratios() if readings is not None else ()


def _score_median(options: CallbackOptions) -> Iterable[Observation]:
    readings = _Reported.readings
    return readings.retrieval_score_medians() if readings is not None else ()


meter.create_observable_gauge(
    "lamina.quality.no_answer_ratio",
    callbacks=[_no_answer],
    unit="1",
    description="Share of answers over the drift window that found nothing to cite, per prompt",
)
meter.create_observable_gauge(
    "lamina.quality.feedback_positive_ratio",
    callbacks=[_feedback_positive],
    unit="1",
    description="Share of positive ratings over the drift window, per prompt",
)
meter.create_observable_gauge(
    "lamina.quality.retrieval_score_median",
    callbacks=[_score_median],
    unit="1",
    description="Median of turns' best retrieval scores over the drift window, per prompt",
)
