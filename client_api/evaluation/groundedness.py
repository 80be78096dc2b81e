"""Groundedness checks: is each sentence of an answer supported by a passage it cites?

``OverlapCheck`` runs offline (see :func:`~client_api.evaluation.metrics.overlap_groundedness`).
``ModelJudge`` asks a model, through Lamina's inferencing gateway, for a verdict on
every sentence: it reads paraphrase and negation, which word overlap cannot, at the
price of model calls and of trusting the judge.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from pydantic import BaseModel, ValidationError

from client_api.evaluation.metrics import Groundedness, overlap_groundedness, split_sentences
from inferencing.contracts import (
    ChatMessage,
    ChatModel,
    ChatRequest,
    InferenceError,
    ResponseSchema,
    Role,
)

if TYPE_CHECKING:
    from inferencing.settings import InferencingSettings


class GroundednessCheck(Protocol):
    @property
    def method(self) -> str:
        """``overlap`` or ``judge:<deployment>``, recorded in the summary."""
        ...

    async def check(self, answer: str, passages: Mapping[int, str]) -> Groundedness | None:
        """The answer's groundedness against its cited passages (``[n]`` to text);
        ``None`` when it has no sentence to check. Raises :class:`JudgeError` when no
        verdict could be had."""
        ...

    async def aclose(self) -> None: ...


class JudgeError(Exception):
    """The judge could not be set up, or gave no usable verdict."""


class OverlapCheck:
    @property
    def method(self) -> str:
        return "overlap"

    async def check(self, answer: str, passages: Mapping[int, str]) -> Groundedness | None:
        return overlap_groundedness(answer, passages)

    async def aclose(self) -> None:
        return None


JUDGE_PROMPT_ID = "groundedness_judge.v1"
JUDGE_INSTRUCTIONS = """\
You check whether an assistant's answer is supported by the passages it cites.
For each numbered sentence of the answer, decide whether the passages state what the
sentence says (supported), or not (unsupported: the passages do not say it, or say
something different). Judge only against the passages, never from your own knowledge.
Reply with JSON only, one verdict per sentence, in this form:
{"verdicts": [{"sentence": 1, "supported": true}, {"sentence": 2, "supported": false}]}"""

_VERDICT_SCHEMA = ResponseSchema(
    name="groundedness_verdicts",
    schema={
        "type": "object",
        "properties": {
            "verdicts": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "sentence": {"type": "integer"},
                        "supported": {"type": "boolean"},
                    },
                    "required": ["sentence", "supported"],
                    "additionalProperties": False,
                },
            }
        },
        "required": ["verdicts"],
        "additionalProperties": False,
    },
)
_JSON_OBJECT = re.compile(r"\{.*\}", re.DOTALL)


@dataclass(frozen=True, slots=True)
class _Evaluator:
    """Who the judge's model calls are metered to."""

    tenant_id: str = "lamina-eval"
    user_id: str = "groundedness-judge"


class ModelJudge:
    """Asks ``model`` (a gateway) for a verdict on each sentence of an answer."""

    def __init__(self, model: ChatModel, *, deployment: str) -> None:
        self._model = model
        self._deployment = deployment

    @property
    def method(self) -> str:
        return f"judge:{self._deployment}"

    async def check(self, answer: str, passages: Mapping[int, str]) -> Groundedness | None:
        sentences = split_sentences(answer)
        if not sentences:
            return None
        sources = "\n\n".join(f"[{ref}] {text}" for ref, text in sorted(passages.items()))
        numbered = "\n".join(
            f"{n}. {s.text}" + (f" (cites {', '.join(map(str, s.refs))})" if s.refs else "")
            for n, s in enumerate(sentences, start=1)
        )
        request = ChatRequest(
            messages=(
                ChatMessage(Role.SYSTEM, JUDGE_INSTRUCTIONS),
                ChatMessage(
                    Role.USER, f"Passages:\n\n{sources}\n\nSentences of the answer:\n{numbered}"
                ),
            ),
            temperature=0.0,
            response_format=_VERDICT_SCHEMA if self._model.capabilities.json_schema else None,
            prompt_version=JUDGE_PROMPT_ID,
        )
        try:
            response = await self._model.complete(request, _Evaluator())
        except InferenceError as exc:
            raise JudgeError(f"the judge model failed: {exc}") from None
        supported = _verdicts(response.message.content or "", len(sentences))
        unsupported = tuple(s.text for n, s in enumerate(sentences, start=1) if not supported[n])
        return Groundedness(
            (len(sentences) - len(unsupported)) / len(sentences), len(sentences), unsupported
        )

    async def aclose(self) -> None:
        await self._model.aclose()


def build_judge(settings: InferencingSettings, deployment: str | None = None) -> ModelJudge:
    """A judge on ``deployment`` of the model registry, by default its first generative
    deployment, through a gateway of its own (retries, timeouts, breaker)."""
    from inferencing.gateway import build_gateway

    registry = settings.registry()
    generative = [d for d in registry if d.provider != "extractive"]
    if deployment is not None:
        chosen = [d for d in registry if d.name == deployment]
        if not chosen:
            names = ", ".join(d.name for d in registry)
            raise JudgeError(f"--judge-deployment {deployment!r} is not in the registry ({names})")
        if chosen[0].provider == "extractive":
            raise JudgeError(f"deployment {deployment!r} is extractive: it cannot judge")
        generative = chosen
    if not generative:
        raise JudgeError(
            "--judge needs a model, and the registry has none (LAMINA_INFERENCING__PROVIDER "
            "is extractive): configure one, or leave --judge out for the offline check"
        )
    entry = generative[0]
    try:
        gateway = build_gateway(settings.model_copy(update={"deployments": [entry]}))
    except ValueError as exc:
        raise JudgeError(str(exc)) from None
    return ModelJudge(gateway, deployment=entry.name)


class _Verdict(BaseModel):
    sentence: int
    supported: bool


class _Verdicts(BaseModel):
    verdicts: list[_Verdict]


def _verdicts(reply: str, sentences: int) -> dict[int, bool]:
    found = _JSON_OBJECT.search(reply)
    try:
        parsed = _Verdicts.model_validate(json.loads(found.group(0) if found else reply))
    except (json.JSONDecodeError, ValidationError):
        raise JudgeError(f"the judge's reply is not the JSON asked for: {reply[:200]!r}") from None
    verdicts = {v.sentence: v.supported for v in parsed.verdicts}
    missing = [n for n in range(1, sentences + 1) if n not in verdicts]
    if missing:
        raise JudgeError(
            f"the judge gave no verdict on sentence(s) {', '.join(map(str, missing))} "
            f"of {sentences}"
        )
    return verdicts
