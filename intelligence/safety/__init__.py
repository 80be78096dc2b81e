"""Safety checks of the intelligence layer.

- :class:`SafetyPolicy`: refuses injection attempts before anything is stored, fences
  or drops flagged passages and tool outputs, and guards the answer stream (PII
  redaction, content moderation).
- :class:`PiiRedactor` and :class:`StreamingRedactor`: offline PII recognizers, and
  redaction of a streamed text that never releases half of an item.

The detectors themselves (a ``PromptShield``, a ``ContentModerator``) come from the
inferencing layer's contract; the composition root chooses them.
"""

from intelligence.safety.pii import PiiMatch, PiiRedactor, StreamingRedactor
from intelligence.safety.policy import (
    AnswerGuard,
    AnswerStopped,
    SafetyPolicy,
    ScreenedContext,
    TurnScope,
    fence,
)

__all__ = [
    "AnswerGuard",
    "AnswerStopped",
    "PiiMatch",
    "PiiRedactor",
    "SafetyPolicy",
    "ScreenedContext",
    "StreamingRedactor",
    "TurnScope",
    "fence",
]
