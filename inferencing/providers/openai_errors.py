"""Translation of ``openai`` SDK exceptions into the inferencing error hierarchy.

The user-facing ``message`` is always one of our own sentences; whatever the
provider said (its message, error body, request id) goes to ``details`` for logs.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from email.utils import parsedate_to_datetime
from typing import Any

import openai

from inferencing.contracts import (
    ContextWindowExceeded,
    InferenceError,
    InvalidModelRequest,
    ProviderAuthenticationFailed,
    ProviderRateLimited,
    ProviderTimeout,
    ProviderUnavailable,
    StreamInterrupted,
)

RATE_LIMITED = "The model is busy right now. Please try again shortly."
TIMED_OUT = "The model took too long to answer."
UNAVAILABLE = "The model service is unavailable right now."
REFUSED = "The model could not process this request."
TOO_LONG = "The conversation is too long for the model."
FILTERED = "The request was blocked by the model provider's content filter."
NOT_AUTHORIZED = "The model service refused the configured credentials."
NOT_FOUND = "The configured model or deployment was not found."
INTERRUPTED = "The model's answer was interrupted."
MALFORMED = "The model returned a malformed answer."


def provider_error(exc: openai.OpenAIError) -> InferenceError:
    """Our typed error for an SDK exception raised before any output reached the caller."""
    details = error_details(exc)
    if isinstance(exc, openai.APITimeoutError):
        return ProviderTimeout(TIMED_OUT, retryable=True, details=details)
    if isinstance(exc, openai.APIConnectionError):
        return ProviderUnavailable(UNAVAILABLE, retryable=True, details=details)
    if isinstance(exc, openai.APIStatusError):
        return _status_error(exc, details)
    # Undecodable responses, errors announced inside a stream, SDK misuse.
    return ProviderUnavailable(UNAVAILABLE, retryable=False, details=details)


def stream_interrupted(exc: openai.OpenAIError | None, **extra: Any) -> StreamInterrupted:
    """The error for a stream that broke after part of the answer was delivered."""
    details = error_details(exc) if exc is not None else {}
    details.update(extra)
    return StreamInterrupted(INTERRUPTED, retryable=False, details=details)


def _status_error(exc: openai.APIStatusError, details: dict[str, Any]) -> InferenceError:
    return status_error(exc.status_code, exc.code, exc.response.headers, details)


def status_error(
    status: int, code: str | None, headers: Mapping[str, str], details: dict[str, Any]
) -> InferenceError:
    """Our typed error for an HTTP error ``status`` (and OpenAI error ``code``) of the
    chat completions API, whichever client received it."""
    if status == 429:
        return ProviderRateLimited(
            RATE_LIMITED,
            retryable=True,
            details=details,
            retry_after_s=retry_after_seconds(headers),
        )
    if status in (401, 403):
        return ProviderAuthenticationFailed(NOT_AUTHORIZED, retryable=False, details=details)
    if status == 404:
        # A missing deployment is a configuration fault; another deployment may have it.
        return ProviderUnavailable(NOT_FOUND, retryable=False, details=details)
    if status == 408:
        return ProviderTimeout(TIMED_OUT, retryable=True, details=details)
    if status == 409 or status >= 500:
        return ProviderUnavailable(UNAVAILABLE, retryable=True, details=details)
    if status in (400, 413, 422):
        code = (code or "").lower()
        if code == "context_length_exceeded":
            # Its own type: the gateway answers it with a larger-context deployment.
            return ContextWindowExceeded(TOO_LONG, retryable=False, details=details)
        message = FILTERED if code == "content_filter" else REFUSED
        return InvalidModelRequest(message, retryable=False, details=details)
    return ProviderUnavailable(UNAVAILABLE, retryable=False, details=details)


def retry_after_seconds(headers: Mapping[str, str]) -> float | None:
    """Seconds to wait from ``retry-after-ms`` or ``Retry-After`` (seconds or HTTP date)."""
    milliseconds = headers.get("retry-after-ms")
    if milliseconds is not None:
        try:
            value = float(milliseconds) / 1000.0
        except ValueError:
            value = math.nan
        if math.isfinite(value) and value >= 0:
            return value
    raw = headers.get("retry-after")
    if raw is None:
        return None
    try:
        seconds = float(raw)
    except ValueError:
        try:
            when = parsedate_to_datetime(raw)
        except (TypeError, ValueError):
            return None
        return max(0.0, when.timestamp() - time.time())
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def error_details(exc: openai.OpenAIError) -> dict[str, Any]:
    """What the provider said, for logs only."""
    details: dict[str, Any] = {"provider_error": type(exc).__name__, "provider_message": str(exc)}
    if isinstance(exc, openai.APIError):
        details["provider_body"] = exc.body
        if exc.code is not None:
            details["provider_code"] = exc.code
    if isinstance(exc, openai.APIStatusError):
        details["status_code"] = exc.status_code
        if exc.request_id:
            details["request_id"] = exc.request_id
    return details
