"""What a Teams user reads when the edge refuses their message.

A Teams message is acknowledged before its turn runs, so a refusal cannot be an HTTP
status: it becomes a reply in the conversation, in plain words, without the setting
names and status codes an API caller gets.
"""

from __future__ import annotations

import math

from client_api.edge.caps import CapExceeded
from client_api.edge.limits import RateLimited
from inferencing.contracts import LimitState, TokenQuotaExceeded, TokenRateLimited

EdgeRefusal = RateLimited | CapExceeded | TokenRateLimited | TokenQuotaExceeded
"""What :func:`client_api.edge.admission.admit_turn` raises."""

EDGE_REFUSALS = (RateLimited, CapExceeded, TokenRateLimited, TokenQuotaExceeded)


def refusal_text(refusal: EdgeRefusal) -> str:
    """The reply for a message the edge refused."""
    match refusal:
        case RateLimited():
            return (
                f"{_who(refusal.state)} sent too many messages; "
                f"try again in {_seconds(refusal.retry_after_s)}."
            )
        case CapExceeded(cap="max_prompt_tokens", measured=int(), limit=int()):
            return (
                f"That message is too long ({refusal.measured:,} tokens; the limit is "
                f"{refusal.limit:,}). Please shorten it."
            )
        case CapExceeded():
            return "That message is more than I can take. Please shorten it."
        case TokenRateLimited(retryable=True):
            return (
                f"{_who(refusal.state)} used up this minute's share of the assistant; "
                f"try again in {_seconds(refusal.retry_after_s)}."
            )
        case _:  # a quota, or more tokens than a whole minute allows: its own words
            return refusal.message


def _who(state: LimitState | None) -> str:
    if state is not None and state.name.startswith("tenant-"):
        return "Your organization has"
    return "You've"


def _seconds(seconds: float) -> str:
    return f"{max(1, math.ceil(seconds))} s"
