"""Drift and quality monitoring: how well answers do, per answer-prompt version, over a
sliding window.

Each finished turn reports its outcome and its best retrieval score, each new or changed
rating of an answer its direction (a user has one rating per answer; the same rating
again is not reported). Counters and a histogram record every event; three gauges
summarise the window (``settings.telemetry.drift_window_s``): the share of answers that
found nothing to cite, the share of positive ratings, and the median best retrieval
score. A new prompt version that answers less often, or an index whose scores sag, shows
as a moving gauge.

A changed rating counts once more in the counter, under its new direction (a counter only
goes up), while in the window it replaces the answer's earlier rating: the positive share
is over answers rated, each by its latest rating.

The summaries are kept in process: each replica reports its own, and a dashboard
aggregates them (the counters and the histogram sum across replicas exactly).
"""

from __future__ import annotations

import re
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from opentelemetry.metrics import Observation

from intelligence import telemetry
from intelligence.contracts import Citation, MessageStatus

TurnOutcome = Literal["answered", "no_answer", "refused", "failed"]
Rating = Literal["positive", "negative"]

REFUSAL_CODES = frozenset({"prompt_injection", "content_filtered"})
"""Error codes of turns a safety check refused (the others failed)."""

_NOTHING_FOUND = re.compile(
    r"\b(could not|couldn't|cannot|can't|can not|did not|didn't|was not able to|"
    r"wasn't able to|unable to) find\b|\bnothing in the (accessible )?documents answers\b",
    re.IGNORECASE,
)
"""How an answer admits it found nothing: the answer prompt tells a model to say it
"could not find it in the documents available", and the extractive answerer says "Nothing
in the accessible documents answers this question"."""


def turn_outcome(
    status: MessageStatus,
    error_code: str | None,
    answer: str,
    citations: Sequence[Citation],
    *,
    tool_results: int,
) -> TurnOutcome | None:
    """How a finished turn did, for quality monitoring; ``None`` for a turn that has not
    finished (paused for approval, still running) or that its client abandoned.

    A complete answer that cites no passage is ``no_answer``, unless tools gave it results
    to answer from (``tool_results``: how many calls ran) and it does not say it found
    nothing. A turn a safety check stopped is ``refused``; any other error ``failed``."""
    if status is MessageStatus.COMPLETE:
        if citations:
            return "answered"
        if tool_results and not _NOTHING_FOUND.search(answer):
            return "answered"
        return "no_answer"
    if error_code is None:
        # Running, paused for approval, or cut off because the client went away.
        return None
    return "refused" if error_code in REFUSAL_CODES else "failed"


@dataclass(frozen=True, slots=True)
class QualitySummary:
    """One prompt version over the window."""

    turns: int
    answered: int
    no_answer: int
    refused: int
    failed: int
    positive: int
    negative: int
    retrieval_score_median: float | None

    @property
    def no_answer_ratio(self) -> float | None:
        """Of the turns that produced an answer, the share that found nothing to cite."""
        produced = self.answered + self.no_answer
        return self.no_answer / produced if produced else None

    @property
    def feedback_positive_ratio(self) -> float | None:
        rated = self.positive + self.negative
        return self.positive / rated if rated else None


@dataclass
class _Window:
    """One prompt's events in the window, oldest first, each deque bounded."""

    outcomes: deque[tuple[float, TurnOutcome]]
    scores: deque[tuple[float, float]]
    ratings: deque[tuple[float, str, Rating]]
    """When, which answer (its message id), and how it was rated."""

    def prune(self, before: float) -> None:
        for events in (self.outcomes, self.scores, self.ratings):
            while events and events[0][0] < before:
                events.popleft()

    @property
    def empty(self) -> bool:
        return not (self.outcomes or self.scores or self.ratings)


@dataclass
class QualityMonitor:
    """Per-prompt quality over a sliding window of ``window_s`` seconds, each prompt's
    memory bounded by ``max_events`` events of each kind (the oldest go first).

    Fed from the event loop; the gauges are read from the metric exporter's thread, hence
    the lock."""

    window_s: float
    max_events: int = 10_000
    clock: Callable[[], float] = time.monotonic
    _windows: dict[str, _Window] = field(default_factory=dict, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)

    def __post_init__(self) -> None:
        if self.window_s <= 0:
            raise ValueError("window_s must be positive")
        if self.max_events < 1:
            raise ValueError("max_events must be at least 1")

    def expose(self) -> None:
        """Make this monitor the one the process's drift gauges report."""
        telemetry.report_quality(self)

    # --- feeding ---------------------------------------------------------------------

    def record_turn(self, prompt_id: str, outcome: TurnOutcome, top_score: float | None) -> None:
        """A finished turn answered with ``prompt_id``; ``top_score``: its best passage's
        score (``None``: nothing was retrieved)."""
        telemetry.quality_turns.add(
            1, {telemetry.PROMPT_ID: prompt_id, telemetry.TURN_OUTCOME: outcome}
        )
        if top_score is not None:
            telemetry.quality_retrieval_score.record(top_score, {telemetry.PROMPT_ID: prompt_id})
        now = self.clock()
        with self._lock:
            window = self._window(prompt_id, now)
            window.outcomes.append((now, outcome))
            if top_score is not None:
                window.scores.append((now, top_score))

    def record_feedback(self, prompt_id: str, rating: Rating, *, turn_id: str) -> None:
        """A new or changed rating of the answer ``turn_id``, given with ``prompt_id``:
        counted, and in the window in place of the answer's earlier rating."""
        telemetry.quality_feedback.add(
            1, {telemetry.PROMPT_ID: prompt_id, telemetry.FEEDBACK_RATING: rating}
        )
        now = self.clock()
        with self._lock:
            ratings = self._window(prompt_id, now).ratings
            for earlier in [r for r in ratings if r[1] == turn_id]:
                ratings.remove(earlier)
            ratings.append((now, turn_id, rating))

    def _window(self, prompt_id: str, now: float) -> _Window:
        window = self._windows.get(prompt_id)
        if window is None:
            window = self._windows[prompt_id] = _Window(
                deque(maxlen=self.max_events),
                deque(maxlen=self.max_events),
                deque(maxlen=self.max_events),
            )
        window.prune(now - self.window_s)
        return window

    # --- reading ---------------------------------------------------------------------

    def summaries(self) -> dict[str, QualitySummary]:
        """Every prompt with events in the window; prompts without any are forgotten."""
        now = self.clock()
        found: dict[str, QualitySummary] = {}
        with self._lock:
            for prompt_id, window in list(self._windows.items()):
                window.prune(now - self.window_s)
                if window.empty:
                    del self._windows[prompt_id]
                    continue
                found[prompt_id] = _summary(window)
        return found

    def no_answer_ratios(self) -> Iterable[Observation]:
        return self._observe(lambda s: s.no_answer_ratio)

    def feedback_positive_ratios(self) -> Iterable[Observation]:
        return self._observe(lambda s: s.feedback_positive_ratio)

    def retrieval_score_medians(self) -> Iterable[Observation]:
        return self._observe(lambda s: s.retrieval_score_median)

    def _observe(self, value: Callable[[QualitySummary], float | None]) -> list[Observation]:
        observed = []
        for prompt_id, summary in self.summaries().items():
            reading = value(summary)
            if reading is not None:
                observed.append(Observation(reading, {telemetry.PROMPT_ID: prompt_id}))
        return observed


def _summary(window: _Window) -> QualitySummary:
    outcomes = [outcome for _, outcome in window.outcomes]
    ratings = [rating for _, _, rating in window.ratings]
    scores = [score for _, score in window.scores]
    return QualitySummary(
        turns=len(outcomes),
        answered=outcomes.count("answered"),
        no_answer=outcomes.count("no_answer"),
        refused=outcomes.count("refused"),
        failed=outcomes.count("failed"),
        positive=ratings.count("positive"),
        negative=ratings.count("negative"),
        retrieval_score_median=statistics.median(scores) if scores else None,
    )
