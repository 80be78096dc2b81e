"""Azure AI Content Safety over REST: Prompt Shields and text moderation.

Why REST and not the ``azure-ai-contentsafety`` SDK: the package index this project
installs from serves 1.0.0, which has no Prompt Shields call (``shield_prompt``
arrived in 1.1.0, per the SDK's changelog). Both calls are a single JSON POST each.
The ``httpx`` client we already use gives one timeout and one error mapping for both,
and no azure-core pipeline on the request path.

Service limits (Content Safety overview, "Input requirements") and how they are met:

- Prompt Shields: a user prompt of at most 10,000 characters, and at most five
  documents totalling 10,000 characters per call. Longer prompts are cut into
  overlapping windows. Documents are cut into pieces and packed into as many calls as
  needed, which run concurrently. A prompt or document is an attack when any of its
  windows is.
- Text analysis: at most 10,000 characters per call. Longer texts are cut into
  windows, and each category gets the highest severity of any window.

Authentication: the ``Ocp-Apim-Subscription-Key`` header when a key is configured,
else a Microsoft Entra token for ``https://cognitiveservices.azure.com/.default``
from ``DefaultAzureCredential``. ``azure.identity`` is imported only then.

Any failure (timeout, connection error, non-2xx, an answer of the wrong shape)
raises :class:`~inferencing.contracts.SafetyServiceUnavailable` with a generic
message. Only the HTTP status and the service's error code go to ``details`` for the
logs; the raw response never does.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import httpx

from inferencing.contracts import (
    ModerationResult,
    SafetyServiceUnavailable,
    ShieldResult,
    ShieldVerdict,
)
from inferencing.settings import ContentSafetySettings

log = logging.getLogger(__name__)

TokenProvider = Callable[[], Awaitable[str]]
"""Returns a bearer token for the Content Safety resource (e.g. from azure-identity)."""

MAX_PROMPT_CHARS = 10_000
MAX_DOCUMENTS_PER_CALL = 5
MAX_DOCUMENT_CHARS_PER_CALL = 10_000
MAX_ANALYZE_CHARS = 10_000
# Windows overlap so that an attack phrase cut by a window edge is still seen whole.
_OVERLAP_CHARS = 200
_ERROR_CODE = re.compile(r"^[A-Za-z][A-Za-z0-9_.\-]{0,63}$")
_UNAVAILABLE = "The content-safety service is unavailable."


def windows(text: str, size: int, overlap: int = _OVERLAP_CHARS) -> list[str]:
    """``text`` cut into pieces of at most ``size`` characters, each overlapping the
    previous one by ``overlap``; one piece for a short (or empty) text."""
    if len(text) <= size:
        return [text]
    step = size - overlap
    return [text[start : start + size] for start in range(0, len(text) - overlap, step)]


def pack_documents(pieces: Sequence[tuple[int, str]]) -> list[list[tuple[int, str]]]:
    """Group (document index, text) pieces into calls of at most five documents and
    10,000 characters, in order."""
    batches: list[list[tuple[int, str]]] = []
    current: list[tuple[int, str]] = []
    size = 0
    for index, text in pieces:
        if current and (
            len(current) == MAX_DOCUMENTS_PER_CALL or size + len(text) > MAX_DOCUMENT_CHARS_PER_CALL
        ):
            batches.append(current)
            current, size = [], 0
        current.append((index, text))
        size += len(text)
    if current:
        batches.append(current)
    return batches


class AzureContentSafety:
    """Azure AI Content Safety as a :class:`~inferencing.contracts.PromptShield` (Prompt
    Shields) and a :class:`~inferencing.contracts.ContentModerator` (text analysis).

    ``client`` and ``token_provider`` are for tests and for sharing a connection pool;
    by default the adapter opens its own client and, without a key, asks
    ``DefaultAzureCredential`` for tokens. Close it with :meth:`aclose`.
    """

    def __init__(
        self,
        settings: ContentSafetySettings,
        *,
        client: httpx.AsyncClient | None = None,
        token_provider: TokenProvider | None = None,
    ) -> None:
        if settings.endpoint is None:
            raise ValueError("AzureContentSafety needs settings.endpoint")
        self._settings = settings
        self._endpoint = settings.endpoint
        self._owns_client = client is None
        self._client = client or httpx.AsyncClient(
            timeout=httpx.Timeout(settings.timeout_s, connect=min(settings.timeout_s, 5.0))
        )
        self._token_provider = token_provider
        self._close_credential: Callable[[], Awaitable[None]] | None = None

    @property
    def name(self) -> str:
        return "azure_content_safety"

    async def aclose(self) -> None:
        if self._owns_client:
            await self._client.aclose()
        if self._close_credential is not None:
            await self._close_credential()

    # --- Prompt Shields ----------------------------------------------------------

    async def shield(self, prompt: str | None, documents: Sequence[str] = ()) -> ShieldResult:
        prompt_windows = [] if prompt is None else windows(prompt, MAX_PROMPT_CHARS)
        pieces = [
            (index, piece)
            for index, document in enumerate(documents)
            if document.strip()
            for piece in windows(document, MAX_DOCUMENT_CHARS_PER_CALL)
        ]
        batches = pack_documents(pieces)
        bodies: list[dict[str, Any]] = []
        for k in range(max(len(prompt_windows), len(batches))):
            body: dict[str, Any] = {}
            if k < len(prompt_windows):
                body["userPrompt"] = prompt_windows[k]
            if k < len(batches):
                body["documents"] = [text for _, text in batches[k]]
            bodies.append(body)
        answers = await asyncio.gather(*(self._post("text:shieldPrompt", b) for b in bodies))

        prompt_attack = False
        document_attack = [False] * len(documents)
        for k, answer in enumerate(answers):
            if k < len(prompt_windows):
                analysis = answer.get("userPromptAnalysis")
                prompt_attack |= _attack_detected(analysis)
            if k < len(batches):
                analyses = answer.get("documentsAnalysis")
                if not isinstance(analyses, list) or len(analyses) != len(batches[k]):
                    raise _unexpected("documentsAnalysis does not match the documents sent")
                for (index, _), analysis in zip(batches[k], analyses, strict=True):
                    document_attack[index] |= _attack_detected(analysis)
        return ShieldResult(
            detector=self.name,
            prompt=None if prompt is None else _verdict(prompt_attack, "user prompt attack"),
            documents=tuple(_verdict(a, "document attack") for a in document_attack),
        )

    # --- text moderation ---------------------------------------------------------

    async def moderate(self, text: str) -> ModerationResult:
        categories: list[str] = list(self._settings.categories)
        answers = await asyncio.gather(
            *(
                self._post(
                    "text:analyze",
                    {"text": piece, "categories": categories, "outputType": "FourSeverityLevels"},
                )
                for piece in windows(text, MAX_ANALYZE_CHARS)
                if piece.strip()
            )
        )
        severities: dict[str, int] = dict.fromkeys(categories, 0)
        for answer in answers:
            analyses = answer.get("categoriesAnalysis")
            if not isinstance(analyses, list):
                raise _unexpected("categoriesAnalysis is missing")
            for item in analyses:
                if not isinstance(item, Mapping):
                    raise _unexpected("a category analysis is not an object")
                category, severity = item.get("category"), item.get("severity")
                if not isinstance(category, str) or not isinstance(severity, int):
                    raise _unexpected("a category analysis lacks category or severity")
                severities[category] = max(severities.get(category, 0), severity)
        threshold = self._settings.severity_threshold
        flagged = tuple(c for c, s in severities.items() if s >= threshold)
        return ModerationResult(severities=severities, flagged=flagged)

    # --- transport ---------------------------------------------------------------

    async def _post(self, operation: str, body: Mapping[str, Any]) -> Mapping[str, Any]:
        url = f"{self._endpoint}/contentsafety/{operation}"
        try:
            headers = await self._auth_headers()
            response = await self._client.post(
                url, params={"api-version": self._settings.api_version}, json=body, headers=headers
            )
        except httpx.TimeoutException:
            raise SafetyServiceUnavailable(
                _UNAVAILABLE, retryable=True, details={"operation": operation, "kind": "timeout"}
            ) from None
        except httpx.HTTPError as exc:
            raise SafetyServiceUnavailable(
                _UNAVAILABLE,
                retryable=True,
                details={"operation": operation, "kind": type(exc).__name__},
            ) from None
        if response.status_code != 200:
            raise SafetyServiceUnavailable(
                _UNAVAILABLE,
                retryable=response.status_code == 429 or response.status_code >= 500,
                details={
                    "operation": operation,
                    "status": response.status_code,
                    "code": _error_code(response),
                },
            )
        try:
            answer = response.json()
        except ValueError:
            raise _unexpected("the answer is not JSON") from None
        if not isinstance(answer, Mapping):
            raise _unexpected("the answer is not an object")
        return answer

    async def _auth_headers(self) -> dict[str, str]:
        if self._settings.api_key is not None:
            return {"Ocp-Apim-Subscription-Key": self._settings.api_key.get_secret_value()}
        if self._token_provider is None:
            self._token_provider = self._entra_token_provider()
        try:
            token = await self._token_provider()
        except Exception as exc:
            # azure-identity raises several types (no credential found, refused, network);
            # for the caller they all mean the service cannot be used now.
            log.warning("no Entra token for Content Safety: %s", type(exc).__name__)
            raise SafetyServiceUnavailable(
                _UNAVAILABLE, details={"kind": "authentication"}
            ) from None
        return {"Authorization": f"Bearer {token}"}

    def _entra_token_provider(self) -> TokenProvider:
        # Imported here: azure-identity costs import time and only keyless set-ups need it.
        from azure.identity.aio import DefaultAzureCredential, get_bearer_token_provider

        credential = DefaultAzureCredential()
        self._close_credential = credential.close
        return get_bearer_token_provider(credential, self._settings.ad_scope)


def _attack_detected(analysis: object) -> bool:
    if not isinstance(analysis, Mapping) or not isinstance(analysis.get("attackDetected"), bool):
        raise _unexpected("an analysis lacks attackDetected")
    return bool(analysis["attackDetected"])


def _verdict(attack: bool, reason: str) -> ShieldVerdict:
    return ShieldVerdict(
        attack=attack, score=1.0 if attack else 0.0, reasons=(reason,) if attack else ()
    )


def _unexpected(why: str) -> SafetyServiceUnavailable:
    log.warning("unexpected answer from Content Safety: %s", why)
    return SafetyServiceUnavailable(_UNAVAILABLE, details={"kind": "unexpected_answer"})


def _error_code(response: httpx.Response) -> str | None:
    """The service's error code (``{"error": {"code": ...}}``) when it is a plain
    identifier; the message is left out, as it may echo what was sent."""
    try:
        body = response.json()
    except ValueError:
        return None
    error = body.get("error") if isinstance(body, Mapping) else None
    code = error.get("code") if isinstance(error, Mapping) else None
    return code if isinstance(code, str) and _ERROR_CODE.match(code) else None
