"""Writing one answer into a Teams conversation: streamed in a 1:1 chat, one message
elsewhere.

Teams streams only in personal chats: an informative update (``typing``, streamType
``informative``), cumulative text chunks (``typing``, streamType ``streaming``) with an
increasing ``streamSequence`` and the ``streamId`` Teams returned for the first post,
then the ``message`` that ends the stream (streamType ``final``, no sequence) carrying
the citations. A stream must end within two minutes: past the configured limit it is
ended with the text so far, and the rest of the answer follows as a normal message.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from microsoft_agents.activity import Activity, Attachment, Entity, StreamInfo
from microsoft_agents.hosting.core import TurnContext

from client_api.teams.messages import ai_label_entity, citation_entity
from intelligence.contracts import Citation

INFORMATIVE_TEXT = "Searching what you may read…"


class TeamsReply:
    """One answer on its way; ``add`` the text as it comes, then ``finish`` (or ``fail``)."""

    def __init__(
        self,
        context: TurnContext,
        *,
        streaming: bool,
        interval_s: float,
        limit_s: float,
        feedback: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._context = context
        self._streaming = streaming
        self._interval_s = interval_s
        self._limit_s = limit_s
        self._feedback = feedback
        self._clock = clock
        self._text = ""
        self._sequence = 0
        self._stream_id: str | None = None
        self._started_at = 0.0
        self._last_post_at = 0.0
        self._streamed = 0
        """How much of the text went out in the stream (it all must be re-sent at the end)."""
        self._stream_ended_at: int | None = None
        """Where the text stood when the stream was cut at the time limit."""

    async def start(self) -> None:
        if not self._streaming:
            return
        self._started_at = self._clock()
        await self._post_stream_update("informative", INFORMATIVE_TEXT)

    async def add(self, text: str) -> None:
        if self._stream_open() and self._clock() - self._started_at >= self._limit_s:
            # Ended with the text before this piece: everything after it is the rest.
            await self._end_stream_early()
        self._text += text
        if not self._stream_open():
            return
        now = self._clock()
        if now - self._last_post_at >= self._interval_s and len(self._text) > self._streamed:
            self._streamed = len(self._text)
            await self._post_stream_update("streaming", self._text)

    async def finish(self, answer: str, citations: Sequence[Citation]) -> tuple[str, ...]:
        """Send the answer (as the final message of the stream, or as one message) with
        its citations. Returns the ids of the Teams messages that carry it (the stream's
        and the final message's), which feedback on it names."""
        response = None
        self._give_up_stream_past_limit()
        if self._stream_open():
            response = await self._send(self._final(answer, citations, stream_end=True))
        elif self._stream_ended_at is not None:
            rest = answer[self._stream_ended_at :].strip()
            if rest:
                response = await self._send(self._final(rest, citations, stream_end=False))
        else:
            response = await self._send(self._final(answer, citations, stream_end=False))
        ids = [self._stream_id, getattr(response, "id", None)]
        return tuple(dict.fromkeys(i for i in ids if i))

    async def ask_approval(self, text: str, card: Attachment) -> None:
        """End the reply with an approval card (a stream is ended with ``text`` first:
        the card goes out as a message of its own)."""
        self._give_up_stream_past_limit()
        if self._stream_open():
            await self._send(
                Activity(type="message", text=text, entities=[self._stream_info("final")])
            )
            text = ""
        await self._send(Activity(type="message", text=text or None, attachments=[card]))

    async def fail(self, message: str) -> None:
        """End the reply with a message the user may read (a stream is ended with it)."""
        activity = Activity(type="message", text=message)
        self._give_up_stream_past_limit()
        if self._stream_open():
            activity.entities = [self._stream_info("final")]
        await self._send(activity)

    def _give_up_stream_past_limit(self) -> None:
        """A stream that went quiet past the limit (searches and tools, no text) may be
        closed by Teams already: the whole answer then goes as a normal message."""
        if self._stream_open() and self._clock() - self._started_at >= self._limit_s:
            self._stream_ended_at = 0

    def _stream_open(self) -> bool:
        return self._streaming and self._stream_id is not None and self._stream_ended_at is None

    async def _end_stream_early(self) -> None:
        self._stream_ended_at = len(self._text)
        text = self._text.strip() or INFORMATIVE_TEXT
        await self._send(Activity(type="message", text=text, entities=[self._stream_info("final")]))

    async def _post_stream_update(self, stream_type: str, text: str) -> None:
        self._sequence += 1
        info = self._stream_info(stream_type, sequence=self._sequence)
        response = await self._send(Activity(type="typing", text=text, entities=[info]))
        self._last_post_at = self._clock()
        if self._stream_id is None:
            # Teams names the stream after the first post; without an id there is no stream.
            if response is None or not response.id:
                self._streaming = False
                return
            self._stream_id = response.id

    def _stream_info(self, stream_type: str, *, sequence: int | None = None) -> StreamInfo:
        fields: dict[str, Any] = {"stream_type": stream_type}
        if sequence is not None:
            fields["stream_sequence"] = sequence
        if self._stream_id is not None:
            fields["stream_id"] = self._stream_id
        return StreamInfo(**fields)

    def _final(self, text: str, citations: Sequence[Citation], *, stream_end: bool) -> Activity:
        entities: list[Entity] = []
        if stream_end:
            entities.append(self._stream_info("final"))
        entities.append(citation_entity(text, citations) or ai_label_entity())
        activity = Activity(type="message", text=text, text_format="markdown", entities=entities)
        if self._feedback:
            activity.channel_data = {"feedbackLoopEnabled": True}
        return activity

    async def _send(self, activity: Activity) -> Any:
        return await self._context.send_activity(activity)
