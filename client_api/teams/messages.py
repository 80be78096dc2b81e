"""What Lamina reads from a Teams message and what it writes back: the question without
its mentions, and the answer's citations as Teams shows them."""

from __future__ import annotations

import re
from collections.abc import Sequence

from microsoft_agents.activity import (
    Activity,
    AIEntity,
    ClientCitation,
    ClientCitationAppearance,
    Entity,
)

from intelligence.contracts import Citation

MAX_CITATIONS = 20
"""Teams shows at most 20 citations on a message."""
_NAME_CHARS = 80
_ABSTRACT_CHARS = 160
_AT_TAG = re.compile(r"<at\b[^>]*>.*?</at>", re.IGNORECASE | re.DOTALL)
_MARKER = re.compile(r"\[(\d+)\]")


def question_text(activity: Activity) -> str:
    """The message's text without any ``<at>…</at>`` mention (the bot's own, which Teams
    puts in every group-chat and channel message to the bot, and anyone else's), and
    with the mention entities gone too, so nothing downstream sees them."""
    text = _AT_TAG.sub(" ", activity.text or "")
    if activity.entities:
        activity.entities = [e for e in activity.entities if e.type != "mention"]
    return " ".join(text.split())


def citation_entity(answer: str, citations: Sequence[Citation]) -> Entity | None:
    """The AI-generated-content entity listing the sources the answer cites as ``[n]``
    (``position`` = n), at most :data:`MAX_CITATIONS`; ``None`` when it cites none."""
    cited = cited_refs(answer)
    claims = [
        ClientCitation(
            position=c.ref,
            appearance=_appearance(c),
        )
        for c in sorted(citations, key=lambda c: c.ref)
        if c.ref in cited
    ][:MAX_CITATIONS]
    if not claims:
        return None
    # Every field set explicitly: the connector client sends only the fields that were set.
    return AIEntity(
        type="https://schema.org/Message",
        id="",
        additional_type=["AIGeneratedContent"],
        citation=claims,
    )


def ai_label_entity() -> Entity:
    """The AI-generated label alone, for an answer that cites nothing."""
    return AIEntity(
        type="https://schema.org/Message", id="", additional_type=["AIGeneratedContent"]
    )


def cited_refs(text: str) -> set[int]:
    return {int(n) for n in _MARKER.findall(text)}


def _appearance(citation: Citation) -> ClientCitationAppearance:
    name = citation.title or citation.source or f"Source {citation.ref}"
    if citation.page is not None:
        name = f"{name}, p. {citation.page}"
    appearance = ClientCitationAppearance(
        name=_clip(name, _NAME_CHARS), abstract=_clip(citation.snippet, _ABSTRACT_CHARS)
    )
    if citation.source.startswith(("https://", "http://")):
        appearance.url = citation.source
    return appearance


def _clip(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"
