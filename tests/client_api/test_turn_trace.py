"""One turn through the real app is one trace: edge, plan, steps, retrieval and the model
call, each a span under the request's, with the GenAI attributes and no prompt text
unless the operator allows it.

A real Lamina app on loopback in this process (so its spans reach the session's in-memory
exporter), the real SQLite index, and the OpenAI-compatible simulator as the model.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from opentelemetry.sdk.trace import ReadableSpan

from client_api.app import create_app
from client_api.problems import CORRELATION_HEADER
from inferencing.simulator import ScriptedReply, SimulatorServer
from tests.client_api.corpus import dev_headers, dev_settings, ingest_corpus
from tests.support.processes import app_in_thread
from tests.support.simulator import simulated_inferencing
from tests.support.telemetry import InMemorySpanExporter

QUESTION = "How many days of annual leave do I get?"
HANDBOOK = "# Leave\n\nEvery employee gets twenty-seven days of annual leave a year."
ANSWER = "You get twenty-seven days of annual leave a year [1]."


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ingest_corpus(
        tmp_path_factory, handbook=HANDBOOK, payroll="# Payroll\n\nAccounts close monthly."
    )


@contextmanager
def _serve(corpus: Path, simulator: SimulatorServer, **telemetry: object) -> Iterator[str]:
    settings = dev_settings(
        corpus,
        inferencing=simulated_inferencing(simulator),
        # Rules plan, so the one model call of the turn is the answer's.
        intelligence={"planner": "deterministic"},
        telemetry={"exporters": [], **telemetry},
    )
    with app_in_thread(create_app(settings)) as base:
        yield base


def _ask(base: str, simulator: SimulatorServer) -> httpx.Response:
    simulator.script(ScriptedReply(content=ANSWER))
    response = httpx.post(
        f"{base}/v1/chat",
        json={"message": QUESTION},
        headers=dev_headers("adele"),
        timeout=30,
    )
    assert response.status_code == 200, response.text
    return response


def _trace(spans: InMemorySpanExporter, trace_id: int) -> list[ReadableSpan]:
    return [s for s in spans.get_finished_spans() if s.context and s.context.trace_id == trace_id]


def _one(trace: Sequence[ReadableSpan], name: str, *, under: str | None = None) -> ReadableSpan:
    found = [
        s for s in trace if s.name == name and (under is None or under in _ancestors(s, trace))
    ]
    assert len(found) == 1, f"{name}: {[s.name for s in trace]}"
    return found[0]


def _ancestors(span: ReadableSpan, trace: Sequence[ReadableSpan]) -> list[str]:
    by_id = {s.context.span_id: s for s in trace if s.context}
    names: list[str] = []
    parent = span.parent
    while parent is not None and parent.span_id in by_id:
        ancestor = by_id[parent.span_id]
        names.append(ancestor.name)
        parent = ancestor.parent
    return names


def _texts(trace: Sequence[ReadableSpan]) -> str:
    """Every attribute value of the trace's spans and their events, as one text."""
    values: list[str] = []
    for span in trace:
        values.extend(str(v) for v in (span.attributes or {}).values())
        for event in span.events:
            values.extend(str(v) for v in (event.attributes or {}).values())
    return "\n".join(values)


def test_one_turn_is_one_trace_with_genai_attributes_and_no_prompt_text(
    corpus: Path, simulator: SimulatorServer, spans: InMemorySpanExporter
) -> None:
    with _serve(corpus, simulator) as base:
        response = _ask(base, simulator)
    correlation = response.headers[CORRELATION_HEADER]
    trace = _trace(spans, int(correlation, 16))
    names = {s.name for s in trace}

    # The server span is the root: a caller's traceparent is not continued by default.
    assert _one(trace, "POST /v1/chat").parent is None
    for name in ("lamina.authenticate", "lamina.turn", "lamina.plan"):
        assert "POST /v1/chat" in _ancestors(_one(trace, name), trace), name
    admissions = [s for s in trace if s.name == "lamina.admission"]
    assert admissions, names
    assert all("POST /v1/chat" in _ancestors(s, trace) for s in admissions)

    retrieve = _one(trace, "lamina.retrieve")
    assert _ancestors(retrieve, trace)[:2] == ["lamina.step", "lamina.turn"]
    assert retrieve.attributes is not None
    assert retrieve.attributes["lamina.retrieval.returned"] >= 1
    assert retrieve.attributes["lamina.retrieval.trimmed"] >= 0
    assert retrieve.attributes["lamina.retrieval.index"]

    model = _one(trace, "chat gpt-sim")
    assert _ancestors(model, trace)[:2] == ["lamina.step", "lamina.turn"]
    attributes = model.attributes or {}
    assert attributes["gen_ai.operation.name"] == "chat"
    assert attributes["gen_ai.request.model"] == "gpt-sim"
    assert attributes["gen_ai.usage.input_tokens"] > 0
    assert attributes["gen_ai.usage.output_tokens"] > 0
    assert tuple(attributes["gen_ai.response.finish_reasons"]) == ("stop",)
    assert attributes["lamina.gen_ai.deployment"]
    assert names >= {"lamina.step", "lamina.retrieve"}

    texts = _texts(trace)
    assert QUESTION not in texts
    assert "twenty-seven" not in texts, "neither the passages nor the answer are in spans"


def test_prompt_text_appears_only_when_allowed(
    corpus: Path, simulator: SimulatorServer, spans: InMemorySpanExporter
) -> None:
    with _serve(corpus, simulator, capture_content=True) as base:
        response = _ask(base, simulator)
    trace = _trace(spans, int(response.headers[CORRELATION_HEADER], 16))
    model = _one(trace, "chat gpt-sim", under="lamina.step")
    attributes = model.attributes or {}
    assert QUESTION in str(attributes["gen_ai.input.messages"])
    assert "twenty-seven days" in str(attributes["gen_ai.output.messages"])
