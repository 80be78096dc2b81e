"""The reply's shape: mentions stripped, citations as Teams shows them, and the stream's
sequence (informative first, cumulative chunks, a final message), on a fake clock."""

from __future__ import annotations

import itertools
from typing import Any

from microsoft_agents.activity import Activity, ResourceResponse

from client_api.teams.messages import MAX_CITATIONS, citation_entity, question_text
from client_api.teams.replies import TeamsReply
from intelligence.contracts import Citation


def _citation(ref: int, **fields: Any) -> Citation:
    values: dict[str, Any] = {
        "ref": ref,
        "chunk_id": f"c{ref}",
        "document_id": f"d{ref}",
        "source": f"handbook/doc{ref}.md",
        "title": f"Document {ref}",
        "snippet": f"What document {ref} says.",
    }
    values.update(fields)
    return Citation(**values)


def _json(activity: Activity) -> dict[str, Any]:
    # How the SDK's connector client serialises an activity.
    return activity.model_dump(by_alias=True, exclude_unset=True, mode="json")


class RecordingContext:
    """Just the part of a TurnContext a reply uses: the stream id is the first post's id."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []

    async def send_activity(self, activity: Activity) -> ResourceResponse:
        self.sent.append(_json(activity))
        return ResourceResponse(id=f"activity-{len(self.sent)}")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _stream_info(activity: dict[str, Any]) -> dict[str, Any] | None:
    return next((e for e in activity.get("entities", []) if e["type"] == "streaminfo"), None)


def test_every_mention_is_stripped_with_its_entity() -> None:
    activity = Activity.model_validate(
        {
            "type": "message",
            "text": "<at>Lamina</at> when does the <at>Ana Lopez</at> cafeteria open?",
            "entities": [
                {"type": "mention", "text": "<at>Lamina</at>", "mentioned": {"id": "28:bot"}},
                {"type": "mention", "text": "<at>Ana Lopez</at>", "mentioned": {"id": "29:ana"}},
                {"type": "clientInfo", "locale": "en-US"},
            ],
        }
    )
    assert question_text(activity) == "when does the cafeteria open?"
    assert [e.type for e in activity.entities or []] == ["clientInfo"]


def test_citations_follow_the_markers_within_teams_limits() -> None:
    answer = "Leave is 25 days [1], carried over until March [3]."
    citations = [
        _citation(1, title="T" * 200, snippet="S" * 500),
        _citation(2),
        _citation(3, source="https://contoso.example/leave"),
    ]
    entity = citation_entity(answer, citations)
    assert entity is not None
    data = entity.model_dump(by_alias=True, exclude_unset=True, mode="json")
    assert data["@type"] == "Message"
    assert data["additionalType"] == ["AIGeneratedContent"]
    claims = data["citation"]
    assert [c["position"] for c in claims] == [1, 3]  # [2] is not cited in the text
    assert all(c["@type"] == "Claim" for c in claims)
    first, third = claims[0]["appearance"], claims[1]["appearance"]
    assert first["@type"] == "DigitalDocument"
    assert len(first["name"]) <= 80 and len(first["abstract"]) <= 160
    assert "url" not in first
    assert third["url"] == "https://contoso.example/leave"

    many = " ".join(f"[{n}]" for n in range(1, 31))
    capped = citation_entity(many, [_citation(n) for n in range(1, 31)])
    assert capped is not None
    assert len(capped.model_dump(by_alias=True)["citation"]) == MAX_CITATIONS


async def test_a_personal_chat_streams_then_ends_with_the_final_message() -> None:
    context, clock = RecordingContext(), Clock()
    reply = TeamsReply(
        context,  # type: ignore[arg-type]
        streaming=True,
        interval_s=1.0,
        limit_s=100.0,
        clock=clock,
    )
    await reply.start()
    for piece in ["Leave ", "is 25 ", "days ", "[1]."]:
        clock.now += 0.6
        await reply.add(piece)
    await reply.finish("Leave is 25 days [1].", [_citation(1)])

    kinds = [(a["type"], (_stream_info(a) or {}).get("streamType")) for a in context.sent]
    assert kinds[0] == ("typing", "informative")
    assert kinds[-1] == ("message", "final")
    assert set(kinds[1:-1]) == {("typing", "streaming")}
    assert len(kinds) == 4  # two chunks, at most one a second
    sequences = [_stream_info(a)["streamSequence"] for a in context.sent[:-1]]  # type: ignore[index]
    assert sequences == sorted(set(sequences)) and sequences[0] == 1
    stream_ids = {_stream_info(a).get("streamId") for a in context.sent[1:]}  # type: ignore[union-attr]
    assert stream_ids == {"activity-1"}
    chunks = [a["text"] for a in context.sent[1:-1]]
    assert all(later.startswith(earlier) for earlier, later in itertools.pairwise(chunks))
    final = context.sent[-1]
    assert "streamSequence" not in _stream_info(final)  # type: ignore[operator]
    assert final["text"] == "Leave is 25 days [1]."
    cited = next(e for e in final["entities"] if e.get("@type") == "Message")
    assert [c["position"] for c in cited["citation"]] == [1]


async def test_past_the_time_limit_the_rest_goes_as_a_normal_message() -> None:
    context, clock = RecordingContext(), Clock()
    reply = TeamsReply(
        context,  # type: ignore[arg-type]
        streaming=True,
        interval_s=1.0,
        limit_s=5.0,
        clock=clock,
    )
    await reply.start()
    clock.now += 2
    await reply.add("First part [1]. ")
    clock.now += 4
    await reply.add("Second part [2].")
    await reply.finish("First part [1]. Second part [2].", [_citation(1), _citation(2)])

    last_streamed, rest = context.sent[-2], context.sent[-1]
    assert _stream_info(last_streamed)["streamType"] == "final"  # type: ignore[index]
    assert _stream_info(rest) is None
    assert rest["text"] == "Second part [2]."
    cited = next(e for e in rest["entities"] if e.get("@type") == "Message")
    assert [c["position"] for c in cited["citation"]] == [2]


async def test_a_group_chat_gets_one_message() -> None:
    context = RecordingContext()
    reply = TeamsReply(context, streaming=False, interval_s=1.0, limit_s=100.0)  # type: ignore[arg-type]
    await reply.start()
    await reply.add("Leave is 25 days [1].")
    await reply.finish("Leave is 25 days [1].", [_citation(1)])
    assert len(context.sent) == 1
    assert context.sent[0]["type"] == "message"
    assert _stream_info(context.sent[0]) is None


async def test_a_stream_quiet_past_the_limit_gives_the_whole_answer_as_a_normal_message() -> None:
    context, clock = RecordingContext(), Clock()
    reply = TeamsReply(context, streaming=True, interval_s=1.5, limit_s=110, clock=clock)  # type: ignore[arg-type]
    await reply.start()
    clock.now += 130  # searches and tools ran past Teams' cap with no text streamed
    await reply.finish("The answer [1].", [_citation(1)])
    informative, answer = context.sent
    assert _stream_info(informative) is not None
    # Teams may have closed the stream: the answer is not sent as its final message.
    assert answer["type"] == "message" and answer["text"] == "The answer [1]."
    assert _stream_info(answer) is None


def test_a_connector_error_is_logged_without_the_bots_token() -> None:
    import aiohttp
    from multidict import CIMultiDict, CIMultiDictProxy
    from yarl import URL

    from client_api.teams.adapter import _described

    url = URL("https://smba.trafficmanager.net/teams/v3/conversations/c/activities/a")
    info = aiohttp.RequestInfo(
        url, "POST", CIMultiDictProxy(CIMultiDict({"Authorization": "Bearer eyJsecret"})), url
    )
    error = aiohttp.ClientResponseError(info, (), status=403, message="Forbidden")
    assert "eyJsecret" in repr(error)  # why the log must never repr it
    described = _described(error)
    assert "eyJsecret" not in described and "403" in described
