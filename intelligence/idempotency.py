"""What a turn started with an idempotency key needs beyond the store: the request's
digest, the events of a turn still running in this process (so a retry can join it),
and a finished turn's stored answer played back as events.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field

from intelligence.contracts import (
    AnswerDelta,
    ApprovalRequiredEvent,
    CitationsEvent,
    DoneEvent,
    ErrorEvent,
    Plan,
    PlanEvent,
    PlanStep,
    Principal,
    StepKind,
    TurnEvent,
    TurnRecord,
)

_TERMINAL = (DoneEvent, ErrorEvent, ApprovalRequiredEvent)

INTERRUPTED = ErrorEvent(
    "interrupted",
    "The answer was interrupted before it finished. Send the request again with the same "
    "Idempotency-Key to finish it.",
    retryable=True,
)


def request_hash(question: str, conversation_id: str | None) -> str:
    """The digest kept with an idempotency key: what makes two requests "the same"."""
    body = json.dumps({"message": question, "conversation_id": conversation_id}, sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()


@dataclass
class TurnChannel:
    """The events of one running turn, kept so that a client retrying the request can
    join: a subscriber gets every event so far, then each new one as it comes."""

    events: list[TurnEvent] = field(default_factory=list)
    closed: bool = False
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    def publish(self, event: TurnEvent) -> None:
        self.events.append(event)
        self._wake()

    def close(self) -> None:
        self.closed = True
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def subscribe(self) -> AsyncGenerator[TurnEvent, None]:
        seen = 0
        while True:
            while seen < len(self.events):
                event = self.events[seen]
                seen += 1
                yield event
                if isinstance(event, _TERMINAL):
                    return
            if self.closed:
                # The turn ended without an outcome (its first client hung up).
                yield INTERRUPTED
                return
            await self._changed.wait()


class RunningTurns:
    """The turns running in this process, by (tenant, user, idempotency key)."""

    def __init__(self) -> None:
        self._channels: dict[tuple[str, str, str], TurnChannel] = {}

    @staticmethod
    def _key(principal: Principal, idempotency_key: str) -> tuple[str, str, str]:
        return principal.tenant_id, principal.user_id, idempotency_key

    def open(self, principal: Principal, idempotency_key: str) -> TurnChannel:
        channel = TurnChannel()
        self._channels[self._key(principal, idempotency_key)] = channel
        return channel

    def find(self, principal: Principal, idempotency_key: str) -> TurnChannel | None:
        return self._channels.get(self._key(principal, idempotency_key))

    def close(self, principal: Principal, idempotency_key: str, channel: TurnChannel) -> None:
        channel.close()
        key = self._key(principal, idempotency_key)
        if self._channels.get(key) is channel:
            del self._channels[key]


async def stored_answer(record: TurnRecord) -> AsyncGenerator[TurnEvent, None]:
    """A finished turn's stored reply, as the events of the turn that produced it."""
    reply = record.reply
    plan = reply.plan or Plan(
        steps=(PlanStep("s1", StepKind.ANSWER, "The stored answer"),), planner="stored"
    )
    yield PlanEvent(plan)
    if reply.content:
        yield AnswerDelta(reply.content)
    yield CitationsEvent(reply.citations)
    yield DoneEvent(record.conversation.id, reply.id)
