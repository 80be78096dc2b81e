"""Asks the questions of a set through ``POST /v1/chat``, as each item's caller.

Latency is measured here, on the client side, from sending the request to
having the whole answer: what a user of the JSON API waits. A question that
fails (HTTP error, timeout, unreadable body) is recorded with its error and the
run goes on.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import httpx
from pydantic import BaseModel, ValidationError

from client_api.evaluation.dataset import Caller, EvalItem


@dataclass(frozen=True, slots=True)
class ApiTarget:
    """A Lamina API to ask. Without ``api_key`` or ``token`` it must run in dev auth
    mode: each question is then asked as its item's caller (``X-Lamina-*`` headers)."""

    base_url: str
    api_key: str | None = None
    token: str | None = None

    @property
    def impersonates(self) -> bool:
        """Whether each item's caller is honoured (dev identity headers, no credential)."""
        return self.api_key is None and self.token is None

    def headers(self, caller: Caller) -> dict[str, str]:
        if self.token is not None:
            return {"Authorization": f"Bearer {self.token}"}
        if self.api_key is not None:
            return {"X-API-Key": self.api_key}
        headers = {
            "X-Lamina-User": caller.user,
            "X-Lamina-Groups": ",".join(caller.groups),
            "X-Lamina-Roles": ",".join(caller.roles),
        }
        if caller.tenant is not None:
            headers["X-Lamina-Tenant"] = caller.tenant
        return headers


@dataclass(frozen=True, slots=True)
class CitedPassage:
    ref: int
    source: str
    chunk_id: str
    snippet: str


@dataclass(frozen=True, slots=True)
class ApiAnswer:
    answer: str
    citations: tuple[CitedPassage, ...]
    conversation_id: str
    message_id: str
    model: str | None
    """``deployment (model@version)`` of the route that answered, when reported."""


@dataclass(frozen=True, slots=True)
class ItemRun:
    """One question as asked: its answer, or the error that took its place."""

    item: EvalItem
    answer: ApiAnswer | None
    latency_s: float | None
    error: str | None = None


ItemDone = Callable[[ItemRun], None]


async def ask_all(
    target: ApiTarget,
    items: Sequence[EvalItem],
    *,
    concurrency: int = 4,
    timeout_s: float = 120.0,
    on_done: ItemDone | None = None,
) -> list[ItemRun]:
    """Ask every item, at most ``concurrency`` at a time, each within ``timeout_s``;
    the runs come back in the items' order."""
    if concurrency < 1:
        raise ValueError("concurrency must be at least 1")
    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(
        base_url=target.base_url, timeout=timeout_s, limits=limits
    ) as http:

        async def one(item: EvalItem) -> ItemRun:
            async with gate:
                run = await ask(http, target, item, timeout_s=timeout_s)
            if on_done is not None:
                on_done(run)
            return run

        return list(await asyncio.gather(*(one(item) for item in items)))


async def ask(
    http: httpx.AsyncClient, target: ApiTarget, item: EvalItem, *, timeout_s: float
) -> ItemRun:
    started = time.perf_counter()
    try:
        async with asyncio.timeout(timeout_s):
            response = await http.post(
                "/v1/chat", json={"message": item.question}, headers=target.headers(item.caller)
            )
    except (TimeoutError, httpx.TimeoutException):
        return ItemRun(item, None, None, f"no answer within {timeout_s:g} s")
    except httpx.HTTPError as exc:
        return ItemRun(
            item, None, None, f"cannot reach {target.base_url}: {type(exc).__name__} {exc}"
        )
    latency = time.perf_counter() - started
    if response.status_code != 200:
        return ItemRun(item, None, latency, _http_error(response))
    try:
        body = _ChatAnswerView.model_validate_json(response.content)
    except ValidationError as exc:
        return ItemRun(item, None, latency, f"the response is not a chat answer: {exc.errors()[0]}")
    if body.approval is not None:
        return ItemRun(item, None, latency, "the turn paused for a person's approval")
    return ItemRun(item, body.typed(), latency)


async def fetch_prompt_ids(target: ApiTarget, runs: Sequence[ItemRun]) -> dict[str, str]:
    """The versioned prompts of the first answered turn, from the API's turn explanation;
    empty when the API does not explain turns to this caller."""
    for run in runs:
        if run.answer is None:
            continue
        path = (
            f"/v1/conversations/{run.answer.conversation_id}/turns/{run.answer.message_id}/explain"
        )
        try:
            async with httpx.AsyncClient(base_url=target.base_url, timeout=10.0) as http:
                response = await http.get(path, headers=target.headers(run.item.caller))
            explained = _ExplanationView.model_validate_json(response.content)
        except (httpx.HTTPError, ValidationError):
            return {}
        return explained.prompts if response.status_code == 200 else {}
    return {}


def _http_error(response: httpx.Response) -> str:
    detail = ""
    if response.headers.get("content-type", "").startswith("application/problem+json"):
        try:
            problem = _ProblemView.model_validate_json(response.content)
        except ValidationError:
            pass
        else:
            detail = problem.detail or problem.title or ""
    return f"HTTP {response.status_code}" + (f": {detail}" if detail else "")


# Lenient views of the API's bodies: a deployment of another version still reads.


class _CitationView(BaseModel):
    ref: int
    source: str
    chunk_id: str = ""
    snippet: str = ""


class _RouteView(BaseModel):
    deployment: str
    model: str
    model_version: str | None = None


class _ChatAnswerView(BaseModel):
    conversation_id: str
    message_id: str
    answer: str
    citations: list[_CitationView] = []
    route: _RouteView | None = None
    approval: dict[str, object] | None = None

    def typed(self) -> ApiAnswer:
        model = None
        if self.route is not None:
            version = f"@{self.route.model_version}" if self.route.model_version else ""
            model = f"{self.route.deployment} ({self.route.model}{version})"
        return ApiAnswer(
            answer=self.answer,
            citations=tuple(
                CitedPassage(c.ref, c.source, c.chunk_id, c.snippet) for c in self.citations
            ),
            conversation_id=self.conversation_id,
            message_id=self.message_id,
            model=model,
        )


class _ProblemView(BaseModel):
    title: str | None = None
    detail: str | None = None


class _ExplanationView(BaseModel):
    prompts: dict[str, str] = {}
