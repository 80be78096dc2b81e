"""Azure Cosmos DB adapter of the conversation store (``LAMINA_CONVERSATIONS__BACKEND=cosmos``).

Layout: one container, hierarchical partition key ``/tenantId``, ``/userId``, ``/sessionId``.

- A conversation is one logical partition, ``[tenant, user, conversation id]``. It holds
  the conversation's *session* item (``id`` = the conversation id: title, timestamps,
  summary, and ``seq``, the number of its last message) and its *message* items (``id`` =
  ``<conversation id>.<random>``, ordered by ``seq``). A message id names its conversation,
  so every read and write is a point operation in the caller's own partition: another
  caller's item is not found, never filtered out afterwards.
- A caller's idempotency keys are *claim* items in one more partition of theirs,
  ``[tenant, user, "~keys"]``, with ``id`` = a hash of the key.

A turn is durable before the model runs. ``begin_turn`` writes the session update (or the
new session), the user message and the running reply in **one transactional batch** in
the conversation's partition; the reply carries the idempotency key and request hash.
Writes that depend on what is stored are conditional on its ETag (``if-match``): the
session's ``seq`` (so messages keep their order under concurrent writers), ``renew_turn``,
``retry_turn`` and ``resume_turn`` (of racing claims exactly one replaces the reply it read),
the sweeps.

The reply carries ``attempt``, the token of the run that owns it: ``begin_turn`` sets it and
each ``retry_turn`` or ``resume_turn`` replaces it. ``renew_turn`` and ``finish_message``
with an attempt read the reply, check that it still names their run, and replace it
conditional on that read's ETag, so a run that lost its turn to a retry (or a paused run
whose turn was resumed) can no longer write over the new run's answer.

Idempotency: a claim item before the batch, not an idempotency item inside it. A batch is
confined to one logical partition, but a key must be unique across all of a caller's
conversations (one key can arrive with a conversation id and without), and a new
conversation's partition is only chosen by the call that creates it. Deriving the new
conversation's id from the key would make racers collide, but would also give a
conversation erased by the user its old id back when the key is used again. So:

1. ``create_item`` of the claim is the one point of decision: of racing calls exactly one
   gets 201, the others 409.
2. The claim records the whole planned turn (its ids, question, title, lease, run). Whoever
   finds a claim whose turn is not written yet (a racer that lost, or a retry after the
   claimer died between its two writes) writes *that* turn itself. The batch creates the
   messages under the claim's ids, so only one batch ever lands, and a key can never stay
   claimed without its turn. ``created`` is true only for the call that made the claim.
3. ``find_turn`` is a point read of the claim plus point reads of the turn: no query
   across partitions on the request path.

Retention: messages and claims carry a per-item ``ttl`` (the tenant's period, in whole
seconds; the container's ``defaultTtl`` must be -1 so that item TTLs apply, which
:meth:`open` checks). Cosmos DB counts a TTL from an item's last write, so a reply expires
its period after it was finished. A session outlives its last message (a conversation
whose old messages expired may still be continued until the sweep) and carries
``expiresAt``, the moment its newest message expires: :meth:`purge_expired` deletes the
sessions left without messages, and returns 0 (Cosmos DB deleted the messages itself).
Sessions also get a TTL one day longer than the period, so even without the sweep an
emptied conversation's title goes. A running summary would keep what retention deleted, so
:meth:`save_summary` stores ``summaryExpiresAt``, the moment the message it runs through
expires (that message's ``_ts`` plus its ``ttl``; none when it is kept forever): reads show
an expired summary as none, and :meth:`purge_expired` clears it from the session.

Authentication: the account key when ``settings.key`` is set, else an Entra ID token (a
credential passed in, or ``DefaultAzureCredential``; the identity needs the "Cosmos DB
Built-in Data Contributor" data-plane role). The SDK is imported by the Cosmos DB adapters
only, and only when a store is opened.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import math
import re
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal, TypeVar, cast

from pydantic import TypeAdapter

from intelligence.contracts import (
    AnswerRating,
    Citation,
    Conversation,
    ConversationExport,
    ConversationMessage,
    ConversationPage,
    MessageStatus,
    NewTurn,
    Plan,
    Principal,
    RetentionPolicy,
    StoreUnavailable,
    TurnExplanation,
    TurnRecord,
)
from intelligence.settings import CosmosSettings
from intelligence.stores.cosmos_account import (
    call_cosmos,
    open_account,
)
from intelligence.stores.stamps import now_stamp, stamp

if TYPE_CHECKING:
    from azure.core.credentials_async import AsyncTokenCredential
    from azure.cosmos.aio import ContainerProxy, CosmosClient

Item = dict[str, Any]
T = TypeVar("T")

_KEEP_FOREVER = RetentionPolicy()

PARTITION_KEY_PATHS = ("/tenantId", "/userId", "/sessionId")
"""The container's hierarchical partition key (infra/ defines the container with it)."""

INDEXING_POLICY: dict[str, Any] = {
    "indexingMode": "consistent",
    "automatic": True,
    "includedPaths": [{"path": "/*"}],
    # Text is never filtered on: not indexing it makes every write cheaper.
    "excludedPaths": [
        {"path": "/content/?"},
        {"path": "/question/?"},
        {"path": "/title/?"},
        {"path": "/summary/?"},
        {"path": "/citations/*"},
        {"path": "/plan/*"},
        {"path": "/explanation/*"},
        {"path": '/"_etag"/?'},
    ],
}
"""The container's indexing policy (what :meth:`CosmosConversationStore.open` creates)."""

_SESSION, _MESSAGE, _CLAIM = "session", "message", "turnKey"
_KEYS = "~keys"
"""The ``sessionId`` of a caller's claims partition (never a conversation id: those are hex)."""
_CONVERSATION_ID = re.compile(r"[0-9a-f]{32}")
_MESSAGE_ID = re.compile(r"([0-9a-f]{32})\.[0-9a-f]{32}")
_SESSION_GRACE_S = 86_400
_MAX_TTL = 2_147_483_647
_ATTEMPTS = 16
"""Rounds of an ETag-conditional write before giving up (each lost round means another
writer succeeded, so this bounds contention, not waiting)."""
_DELETE_CONCURRENCY = 16
_PAGE_ROUNDS = 20

_CITATIONS = TypeAdapter(tuple[Citation, ...])
_PLAN: TypeAdapter[Plan | None] = TypeAdapter(Plan | None)
_EXPLANATION: TypeAdapter[TurnExplanation | None] = TypeAdapter(TurnExplanation | None)
_RATING: TypeAdapter[AnswerRating | None] = TypeAdapter(AnswerRating | None)
_RATEABLE = frozenset(
    s.value for s in (MessageStatus.COMPLETE, MessageStatus.INTERRUPTED, MessageStatus.FAILED)
)
"""Statuses of a reply its owner may rate: it no longer runs nor waits for an approval."""

_Q_SESSIONS_BY_RECENCY = "SELECT * FROM c WHERE c.type = @type ORDER BY c.updatedAt DESC"
_Q_OF_TYPE = "SELECT * FROM c WHERE c.type = @type"
_Q_MESSAGES = "SELECT * FROM c WHERE c.type = @type ORDER BY c.seq"
_Q_LAST_MESSAGES = "SELECT TOP @last * FROM c WHERE c.type = @type ORDER BY c.seq DESC"
_Q_ABANDONED = "SELECT * FROM c WHERE c.type = @type AND c.status = @status AND c.leaseUntil < @now"
_Q_EMPTIED = "SELECT * FROM c WHERE c.type = @type AND c.expiresAt < @now"
_Q_SUMMARY_EXPIRED = "SELECT * FROM c WHERE c.type = @type AND c.summaryExpiresAt <= @now"
_Q_IDS = "SELECT c.id, c.sessionId, c.type FROM c"
_Q_CLAIMS_OF = "SELECT c.id, c.sessionId, c.type FROM c WHERE c.conversationId = @conversation"


class ConversationStoreUnavailable(StoreUnavailable):
    """Azure Cosmos DB cannot serve the store: unreachable, refusing the credentials, or
    not set up as the store needs (the message says which, and what to change)."""


@dataclass(frozen=True, slots=True)
class _Failed:
    """A transactional batch that wrote nothing: the failed operation's status."""

    status: int
    index: int


@dataclass(frozen=True, slots=True)
class _PlannedTurn:
    """Everything a turn's batch writes, fixed before it is written (and kept in the
    claim, so that anyone can write the same turn)."""

    conversation_id: str
    new_conversation: bool
    title: str
    question: str
    user_message_id: str
    reply_id: str
    lease_until: str
    created_at: str
    idempotency_key: str | None
    request_hash: str | None
    attempt: str

    @classmethod
    def of_claim(cls, claim: Item) -> _PlannedTurn:
        return cls(
            conversation_id=claim["conversationId"],
            new_conversation=claim["newConversation"],
            title=claim["title"],
            question=claim["question"],
            user_message_id=claim["userMessageId"],
            reply_id=claim["replyId"],
            lease_until=claim["leaseUntil"],
            created_at=claim["createdAt"],
            idempotency_key=claim["idempotencyKey"],
            request_hash=claim.get("requestHash"),
            # A claim written before replies carried their run has none: whoever writes
            # its turn names one (only one batch lands, so the turn gets exactly one).
            attempt=claim.get("attempt") or _new_attempt(),
        )


class CosmosConversationStore:
    """Conversations in Azure Cosmos DB, each in its own ``[tenant, user, conversation]``
    partition. Build it, ``await open()`` (connects, checks or creates the container),
    and ``await close()`` when done."""

    def __init__(
        self,
        settings: CosmosSettings,
        *,
        retention: RetentionPolicy = _KEEP_FOREVER,
        credential: AsyncTokenCredential | None = None,
    ) -> None:
        self._settings = settings
        self._retention = retention
        self._credential = credential
        self._owned_credential: AsyncTokenCredential | None = None
        self._client: CosmosClient | None = None
        self._container_proxy: ContainerProxy | None = None

    # --- lifecycle --------------------------------------------------------------------------

    async def open(self) -> None:
        """Connect, and check the container (or create it, with ``create_if_missing``).
        Raises :class:`ConversationStoreUnavailable` with what to fix."""
        if self._container_proxy is not None:
            return
        self._client, self._container_proxy, self._owned_credential = await open_account(
            self._settings,
            self._credential,
            self._connect,
            variables="LAMINA_CONVERSATIONS__COSMOS",
            what="the Cosmos DB conversation store",
            unavailable=ConversationStoreUnavailable,
        )

    async def _connect(self, client: CosmosClient) -> ContainerProxy:
        from azure.cosmos import PartitionKey

        settings = self._settings
        await client.__aenter__()  # reads the account: the first request that can fail
        if settings.create_if_missing:
            database = await client.create_database_if_not_exists(settings.database)
            container = await database.create_container_if_not_exists(
                id=settings.container,
                partition_key=PartitionKey(path=list(PARTITION_KEY_PATHS), kind="MultiHash"),
                default_ttl=-1,
                indexing_policy=INDEXING_POLICY,
            )
        else:
            database = client.get_database_client(settings.database)
            container = database.get_container_client(settings.container)
        self._check_container(await container.read())
        return container

    async def close(self) -> None:
        client, self._client, self._container_proxy = self._client, None, None
        if client is not None:
            await client.close()
        if self._owned_credential is not None:
            await self._owned_credential.close()
            self._owned_credential = None

    def _check_container(self, properties: Item) -> None:
        name = f"container {self._settings.container!r}"
        key = properties.get("partitionKey") or {}
        if tuple(key.get("paths") or ()) != PARTITION_KEY_PATHS or key.get("kind") != "MultiHash":
            raise ConversationStoreUnavailable(
                f"{name} is partitioned by {key.get('paths')}; the conversation store needs the "
                f"hierarchical key {list(PARTITION_KEY_PATHS)} (MultiHash)"
            )
        policy = self._retention
        retains = policy.default_s is not None or any(
            v is not None for v in policy.tenants.values()
        )
        if retains and properties.get("defaultTtl") is None:
            raise ConversationStoreUnavailable(
                f"{name} has time to live off, so retention periods would never delete a "
                "message: set its default time to live to -1 (on, no default)"
            )

    @property
    def _container(self) -> ContainerProxy:
        if self._container_proxy is None:
            raise RuntimeError("store is not open")
        return self._container_proxy

    # --- conversations and messages ------------------------------------------------------------

    async def get(self, principal: Principal, conversation_id: str) -> Conversation | None:
        session = await self._session(principal, conversation_id)
        return _conversation(session) if session else None

    async def list_conversations(
        self, principal: Principal, *, limit: int = 20, cursor: str | None = None
    ) -> ConversationPage:
        token = _decode_cursor(cursor)
        limit = max(1, limit)
        found: list[Item] = []
        # A page may come back short of the limit with more to follow: ask again for the
        # rest, so callers see full pages.
        for _ in range(_PAGE_ROUNDS):
            page, token = await self._page(
                _Q_SESSIONS_BY_RECENCY,
                {"@type": _SESSION},
                [principal.tenant_id, principal.user_id],
                limit - len(found),
                token,
            )
            found += page
            if len(found) >= limit or token is None:
                break
        return ConversationPage(
            tuple(_conversation(s) for s in found), _encode_cursor(token) if token else None
        )

    async def delete(self, principal: Principal, conversation_id: str) -> bool:
        if not _CONVERSATION_ID.fullmatch(conversation_id):
            return False
        partition = _partition(principal, conversation_id)
        if await self._read(partition, conversation_id) is None:
            return False
        # Its keys' claims first: a claim left behind would let its key write the turn
        # again. Then the session: from then on the conversation is gone for every reader,
        # and what is left of it is only reachable for deletion.
        claims = await self._query(
            _Q_CLAIMS_OF, {"@conversation": conversation_id}, _partition(principal, _KEYS)
        )
        await self._delete_all(principal, claims)
        if not await self._delete(partition, conversation_id):
            return False
        await self._delete_all(principal, await self._query(_Q_IDS, {}, partition))
        return True

    async def rename(self, principal: Principal, conversation_id: str, title: str) -> bool:
        if not _CONVERSATION_ID.fullmatch(conversation_id):
            return False
        # A patch of the session in the caller's own partition: another user's id is a 404.
        return await self._patch(
            _partition(principal, conversation_id),
            conversation_id,
            [{"op": "set", "path": "/title", "value": title}],
        )

    async def finish_message(
        self,
        principal: Principal,
        message_id: str,
        content: str,
        status: MessageStatus,
        *,
        citations: Sequence[Citation] = (),
        plan: Plan | None = None,
        attempt: str | None = None,
        explanation: TurnExplanation | None = None,
    ) -> bool:
        located = _message_partition(principal, message_id)
        if located is None:
            return False
        final = {
            "content": content,
            "status": status.value,
            "citations": _dump_citations(citations),
            "plan": _PLAN.dump_python(plan, mode="json"),
            "explanation": _EXPLANATION.dump_python(explanation, mode="json"),
        }
        if attempt is None:
            return await self._patch(
                located,
                message_id,
                [{"op": "set", "path": f"/{name}", "value": v} for name, v in final.items()],
            )
        # Fenced: read, check the run, and replace only what was read (a retry that took
        # the turn over in between makes the replace fail, and the next read sees it).
        for _ in range(_ATTEMPTS):
            message = await self._read(located, message_id)
            if message is None or message.get("attempt") != attempt:
                return False
            finished = self._expiring({**message, **final}, _MESSAGE)
            if await self._replace(finished, message["_etag"]) is not None:
                return True
        return False

    async def messages(
        self, principal: Principal, conversation_id: str, *, last: int | None = None
    ) -> list[ConversationMessage]:
        if not _CONVERSATION_ID.fullmatch(conversation_id):
            return []
        partition = _partition(principal, conversation_id)
        parameters: dict[str, Any]
        if last is None:
            query, parameters = _Q_MESSAGES, {"@type": _MESSAGE}
        else:
            query, parameters = _Q_LAST_MESSAGES, {"@type": _MESSAGE, "@last": max(0, last)}
        session, items = await asyncio.gather(
            self._read(partition, conversation_id), self._query(query, parameters, partition)
        )
        if session is None:
            return []
        ordered = sorted(items, key=lambda m: m["seq"])
        return [_message(m) for m in ordered]

    async def rate(
        self, principal: Principal, conversation_id: str, message_id: str, rating: AnswerRating
    ) -> ConversationMessage | None:
        located = _message_partition(principal, message_id)
        if located is None or located[2] != conversation_id:
            return None
        for _ in range(_ATTEMPTS):
            reply = await self._read(located, message_id)
            if (
                reply is None
                or reply.get("role") != "assistant"
                or reply.get("status") not in _RATEABLE
            ):
                return None
            rated = {**reply, "feedback": _RATING.dump_python(rating, mode="json")}
            # Conditional on what was read: a racing rating makes this one read again.
            if await self._replace(_keeping_expiry(rated), reply["_etag"]) is not None:
                return _message(reply)
        raise ConversationStoreUnavailable("too many racing ratings of one answer")

    # --- turns ---------------------------------------------------------------------------------

    async def begin_turn(self, principal: Principal, turn: NewTurn) -> TurnRecord:
        key = turn.idempotency_key
        if turn.conversation_id is not None:
            conversation_id, new_conversation = turn.conversation_id, False
        else:
            conversation_id, new_conversation = uuid.uuid4().hex, True
        plan = _PlannedTurn(
            conversation_id=conversation_id,
            new_conversation=new_conversation,
            title=turn.title,
            question=turn.question,
            user_message_id=_new_message_id(conversation_id),
            reply_id=_new_message_id(conversation_id),
            lease_until=stamp(turn.lease_until),
            created_at=now_stamp(),
            idempotency_key=key,
            request_hash=turn.request_hash,
            attempt=_new_attempt(),
        )
        for attempt in range(_ATTEMPTS):
            if key is not None:
                if attempt:
                    # Our claim lost to one a read did not show yet: a replica that has not
                    # seen it (another client's session). Give it a moment.
                    await asyncio.sleep(min(0.5, 0.01 * 2**attempt))
                earlier = await self._turn_of_key(principal, key)
                if earlier is not None:
                    return earlier
            if not new_conversation and await self.get(principal, conversation_id) is None:
                raise LookupError("no such conversation for this caller")
            if key is not None and await self._create(self._claim_item(principal, plan)) is None:
                continue  # a racing call claimed the key first: its turn is the one
            record = await self._write_turn(principal, plan, created=True)
            if record is not None:
                return record
            # The conversation was deleted between the check and the batch.
            if key is not None:
                await self._delete(_partition(principal, _KEYS), _claim_id(key))
            raise LookupError("no such conversation for this caller")
        raise ConversationStoreUnavailable("too many racing turns with one idempotency key")

    async def find_turn(self, principal: Principal, idempotency_key: str) -> TurnRecord | None:
        claim = await self._read(_partition(principal, _KEYS), _claim_id(idempotency_key))
        if claim is None or claim.get("idempotencyKey") != idempotency_key:
            return None
        return await self._stored_turn(principal, _PlannedTurn.of_claim(claim), created=False)

    async def renew_turn(
        self,
        principal: Principal,
        reply_id: str,
        content: str,
        lease_until: datetime,
        *,
        attempt: str,
    ) -> bool:
        located = _message_partition(principal, reply_id)
        if located is None:
            return False
        for _ in range(_ATTEMPTS):
            reply = await self._read(located, reply_id)
            if reply is None or not _is_running_reply(reply) or reply.get("attempt") != attempt:
                return False
            renewed = {**reply, "content": content, "leaseUntil": stamp(lease_until)}
            if await self._replace(self._expiring(renewed, _MESSAGE), reply["_etag"]) is not None:
                return True
        return False

    async def retry_turn(
        self, principal: Principal, reply_id: str, lease_until: datetime, *, now: datetime
    ) -> TurnRecord | None:
        located = _message_partition(principal, reply_id)
        if located is None:
            return None
        reply = await self._read(located, reply_id)
        if reply is None or reply.get("role") != "assistant" or not reply.get("questionId"):
            return None
        status = reply.get("status")
        lease_ended = reply.get("leaseUntil", "") < stamp(now)
        if not (
            status in (MessageStatus.INTERRUPTED.value, MessageStatus.FAILED.value)
            or (status == MessageStatus.STREAMING.value and lease_ended)
        ):
            return None
        # Emptied: the turn runs again from the start.
        changes: Item = {
            "content": "",
            "citations": [],
            "plan": None,
            "explanation": None,
            "feedback": None,
        }
        return await self._claim(located, reply, lease_until, changes)

    async def resume_turn(
        self, principal: Principal, reply_id: str, lease_until: datetime
    ) -> TurnRecord | None:
        located = _message_partition(principal, reply_id)
        if located is None:
            return None
        reply = await self._read(located, reply_id)
        if (
            reply is None
            or reply.get("role") != "assistant"
            or not reply.get("questionId")
            or reply.get("status") != MessageStatus.AWAITING_APPROVAL.value
        ):
            return None
        # Text and plan stay: the resumed run continues the plan the approval was asked for.
        return await self._claim(located, reply, lease_until, {})

    async def _claim(
        self,
        located: list[str],
        reply: Item,
        lease_until: datetime,
        changes: Item,
    ) -> TurnRecord | None:
        """Give ``reply`` (as read) to a new run, leased: conditional on what was read, so
        of racing claims one replaces it and the others get 412 (``None``)."""
        claimed = {
            **reply,
            **changes,
            "status": MessageStatus.STREAMING.value,
            "leaseUntil": stamp(lease_until),
            "attempt": _new_attempt(),
        }
        written = await self._replace(self._expiring(claimed, _MESSAGE), reply["_etag"])
        if written is None:
            return None
        session, question = await asyncio.gather(
            self._read(located, located[2]), self._read(located, reply["questionId"])
        )
        if session is None or question is None:
            return None
        return _turn_record(session, question, written, created=True)

    async def interrupt_abandoned(self, now: datetime) -> int:
        moment = stamp(now)
        found = await self._query(
            _Q_ABANDONED,
            {"@type": _MESSAGE, "@status": MessageStatus.STREAMING.value, "@now": moment},
            None,
        )
        marked = 0
        for reply in found:
            partition = [reply["tenantId"], reply["userId"], reply["sessionId"]]
            for _ in range(_ATTEMPTS):
                interrupted = {**reply, "status": MessageStatus.INTERRUPTED.value}
                if await self._replace(interrupted, reply["_etag"]) is not None:
                    marked += 1
                    break
                # Changed since the query: renewed, finished, or already marked.
                current = await self._read(partition, reply["id"])
                if current is None or not (
                    _is_running_reply(current) and current.get("leaseUntil", "") < moment
                ):
                    break
                reply = current
        return marked

    # --- memory ---------------------------------------------------------------------------------

    async def save_summary(
        self, principal: Principal, conversation_id: str, summary: str, through_message_id: str
    ) -> None:
        if not _CONVERSATION_ID.fullmatch(conversation_id):
            return
        partition = _partition(principal, conversation_id)
        # The summary lives as long as the newest message it covers: read in the
        # conversation's own partition, so a message of another conversation is not found.
        covered = await self._read(partition, through_message_id)
        if covered is not None:
            expires_at = _expiry_of(covered)
        else:
            # Gone already (or never there): under a retention period, so is the summary.
            keeps = self._retention.seconds_for(principal.tenant_id) is None
            expires_at = None if keeps else now_stamp()
        # updatedAt stays: a summary is housekeeping, not activity that reorders the list.
        await self._patch(
            partition,
            conversation_id,
            [
                {"op": "set", "path": "/summary", "value": summary},
                {"op": "set", "path": "/summaryThrough", "value": through_message_id},
                {"op": "set", "path": "/summaryExpiresAt", "value": expires_at},
            ],
        )

    # --- retention and data-subject rights --------------------------------------------------------

    async def purge_expired(self, now: datetime) -> int:
        # Messages expire by their TTL. What is left is a session whose newest message has
        # expired (expiresAt passed): delete it once it holds no message.
        emptied = await self._query(_Q_EMPTIED, {"@type": _SESSION, "@now": stamp(now)}, None)
        for session in emptied:
            partition = [session["tenantId"], session["userId"], session["sessionId"]]
            left = await self._query(_Q_LAST_MESSAGES, {"@type": _MESSAGE, "@last": 1}, partition)
            if not left:
                # Conditional: a turn that continued the conversation meanwhile keeps it.
                await self._delete(partition, session["id"], etag=session["_etag"])
        await self._clear_expired_summaries(stamp(now))
        return 0

    async def _clear_expired_summaries(self, moment: str) -> None:
        """Clear every summary whose newest covered message has expired by ``moment``."""
        found = await self._query(_Q_SUMMARY_EXPIRED, {"@type": _SESSION, "@now": moment}, None)
        for session in found:
            partition = [session["tenantId"], session["userId"], session["sessionId"]]
            for _ in range(_ATTEMPTS):
                cleared = {
                    **session,
                    "summary": "",
                    "summaryThrough": None,
                    "summaryExpiresAt": None,
                }
                # Conditional: a summary saved since the query is a newer one, and stays.
                written = await self._replace(self._expiring(cleared, _SESSION), session["_etag"])
                if written is not None:
                    break
                current = await self._read(partition, session["id"])
                if current is None or not _summary_expired(current, moment):
                    break
                session = current

    async def export_user(self, principal: Principal) -> list[ConversationExport]:
        owner = [principal.tenant_id, principal.user_id]
        sessions, messages = await asyncio.gather(
            self._query(_Q_OF_TYPE, {"@type": _SESSION}, owner),
            self._query(_Q_OF_TYPE, {"@type": _MESSAGE}, owner),
        )
        by_conversation: dict[str, list[Item]] = {s["id"]: [] for s in sessions}
        for message in messages:
            by_conversation.get(message["sessionId"], []).append(message)
        ordered = sorted(sessions, key=lambda s: (s["createdAt"], s["id"]))
        return [
            ConversationExport(
                _conversation(s),
                tuple(
                    _message(m) for m in sorted(by_conversation[s["id"]], key=lambda m: m["seq"])
                ),
            )
            for s in ordered
        ]

    async def delete_user(self, principal: Principal) -> int:
        items = await self._query(_Q_IDS, {}, [principal.tenant_id, principal.user_id])
        deleted = await self._delete_all(principal, items)
        return sum(
            1
            for item, gone in zip(items, deleted, strict=True)
            if gone and item["type"] == _SESSION
        )

    # --- turns: the writes ------------------------------------------------------------------------

    async def _turn_of_key(self, principal: Principal, key: str) -> TurnRecord | None:
        """The turn already started with ``key``, written now if its claimer has not (yet);
        None when the key is free (never claimed, or its conversation is gone)."""
        keys = _partition(principal, _KEYS)
        claim = await self._read(keys, _claim_id(key))
        if claim is None or claim.get("idempotencyKey") != key:
            return None
        plan = _PlannedTurn.of_claim(claim)
        record = await self._stored_turn(principal, plan, created=False)
        if record is None:
            record = await self._write_turn(principal, plan, created=False)
        if record is None:
            # Claimed for a conversation deleted before the turn was written: free the key.
            await self._delete(keys, claim["id"], etag=claim["_etag"])
        return record

    async def _write_turn(
        self, principal: Principal, plan: _PlannedTurn, *, created: bool
    ) -> TurnRecord | None:
        """Write the planned turn in one batch; None when its conversation is gone."""
        partition = _partition(principal, plan.conversation_id)
        for _ in range(_ATTEMPTS):
            operations: list[tuple[str, tuple[Any, ...], dict[str, Any]]]
            if plan.new_conversation:
                session = self._session_item(
                    principal, plan.conversation_id, plan.title, plan.created_at, seq=2
                )
                operations = [("create", (session,), {})]
            else:
                current = await self._read(partition, plan.conversation_id)
                if current is None:
                    return None
                session = self._touched(current, current["seq"] + 2, now_stamp())
                operations = [
                    (
                        "replace",
                        (plan.conversation_id, session),
                        {"if_match_etag": current["_etag"]},
                    )
                ]
            seq = session["seq"]
            question = self._message_item(
                principal,
                plan.conversation_id,
                seq - 1,
                "user",
                plan.question,
                MessageStatus.COMPLETE,
                plan.created_at,
                message_id=plan.user_message_id,
            )
            reply = self._message_item(
                principal,
                plan.conversation_id,
                seq,
                "assistant",
                "",
                MessageStatus.STREAMING,
                plan.created_at,
                message_id=plan.reply_id,
                question_id=plan.user_message_id,
                lease_until=plan.lease_until,
                idempotency_key=plan.idempotency_key,
                request_hash=plan.request_hash,
                attempt=plan.attempt,
            )
            operations += [("create", (question,), {}), ("create", (reply,), {})]
            result = await self._batch(partition, operations)
            if not isinstance(result, _Failed):
                return _turn_record(result[0], result[1], result[2], created=created)
            if result.status == 409:
                # This very turn is written already (a racing call wrote the claim's plan).
                return await self._stored_turn(principal, plan, created=created)
            if result.status == 404:
                return None
            if result.status != 412:
                raise ConversationStoreUnavailable(f"writing a turn failed with {result.status}")
        raise ConversationStoreUnavailable("the conversation is too busy to start a turn")

    async def _stored_turn(
        self, principal: Principal, plan: _PlannedTurn, *, created: bool
    ) -> TurnRecord | None:
        partition = _partition(principal, plan.conversation_id)
        session, question, reply = await asyncio.gather(
            self._read(partition, plan.conversation_id),
            self._read(partition, plan.user_message_id),
            self._read(partition, plan.reply_id),
        )
        if session is None or question is None or reply is None:
            return None
        return _turn_record(session, question, reply, created=created)

    # --- items ------------------------------------------------------------------------------------

    def _expiring(self, item: Item, kind: str) -> Item:
        """``item`` with the time to live its tenant's retention gives its kind."""
        item = {k: v for k, v in item.items() if not k.startswith("_") and k != "ttl"}
        seconds = self._retention.seconds_for(item["tenantId"])
        if kind == _SESSION:
            item.pop("expiresAt", None)
        if seconds is None:
            return item
        ttl = max(1, math.ceil(seconds))
        if kind == _SESSION:
            ttl += _SESSION_GRACE_S
            updated = datetime.fromisoformat(item["updatedAt"])
            item["expiresAt"] = stamp(updated + timedelta(seconds=seconds))
        item["ttl"] = min(ttl, _MAX_TTL)
        return item

    def _session_item(
        self, principal: Principal, conversation_id: str, title: str, now: str, *, seq: int
    ) -> Item:
        return self._expiring(
            {
                "id": conversation_id,
                "tenantId": principal.tenant_id,
                "userId": principal.user_id,
                "sessionId": conversation_id,
                "type": _SESSION,
                "title": title,
                "createdAt": now,
                "updatedAt": now,
                "summary": "",
                "summaryThrough": None,
                "seq": seq,
            },
            _SESSION,
        )

    def _touched(self, session: Item, seq: int, now: str) -> Item:
        touched = {**session, "seq": seq, "updatedAt": max(now, session["updatedAt"])}
        return self._expiring(touched, _SESSION)

    def _message_item(
        self,
        principal: Principal,
        conversation_id: str,
        seq: int,
        role: Literal["user", "assistant"],
        content: str,
        status: MessageStatus,
        now: str,
        *,
        message_id: str,
        question_id: str | None = None,
        lease_until: str | None = None,
        idempotency_key: str | None = None,
        request_hash: str | None = None,
        attempt: str | None = None,
    ) -> Item:
        item: Item = {
            "id": message_id,
            "tenantId": principal.tenant_id,
            "userId": principal.user_id,
            "sessionId": conversation_id,
            "type": _MESSAGE,
            "seq": seq,
            "role": role,
            "content": content,
            "status": status.value,
            "citations": [],
            "plan": None,
            "createdAt": now,
        }
        if question_id is not None:
            item["questionId"] = question_id
        if lease_until is not None:
            item["leaseUntil"] = lease_until
        if idempotency_key is not None:
            item["idempotencyKey"] = idempotency_key
            item["requestHash"] = request_hash
        if attempt is not None:
            item["attempt"] = attempt
        return self._expiring(item, _MESSAGE)

    def _claim_item(self, principal: Principal, plan: _PlannedTurn) -> Item:
        assert plan.idempotency_key is not None
        return self._expiring(
            {
                "id": _claim_id(plan.idempotency_key),
                "tenantId": principal.tenant_id,
                "userId": principal.user_id,
                "sessionId": _KEYS,
                "type": _CLAIM,
                "idempotencyKey": plan.idempotency_key,
                "requestHash": plan.request_hash,
                "conversationId": plan.conversation_id,
                "newConversation": plan.new_conversation,
                "title": plan.title,
                "question": plan.question,
                "userMessageId": plan.user_message_id,
                "replyId": plan.reply_id,
                "leaseUntil": plan.lease_until,
                "createdAt": plan.created_at,
                "attempt": plan.attempt,
            },
            _CLAIM,
        )

    async def _session(self, principal: Principal, conversation_id: str) -> Item | None:
        if not _CONVERSATION_ID.fullmatch(conversation_id):
            return None
        return await self._read(_partition(principal, conversation_id), conversation_id)

    async def _delete_all(self, principal: Principal, items: Sequence[Item]) -> list[bool]:
        gate = asyncio.Semaphore(_DELETE_CONCURRENCY)

        async def delete(item: Item) -> bool:
            async with gate:
                return await self._delete(_partition(principal, item["sessionId"]), item["id"])

        return list(await asyncio.gather(*(delete(item) for item in items)))

    # --- the SDK, and what its errors mean here ---------------------------------------------------

    async def _call(self, action: str, call: Callable[[], Awaitable[T]], *expected: int) -> T | int:
        """Run one SDK call; a status in ``expected`` comes back as an int, any other
        failure raises :class:`ConversationStoreUnavailable`."""
        return await call_cosmos(action, call, expected, ConversationStoreUnavailable)

    async def _read(self, partition: list[str], item_id: str) -> Item | None:
        result = await self._call(
            "read an item",
            lambda: self._container.read_item(item=item_id, partition_key=partition),
            404,
        )
        return None if isinstance(result, int) else dict(result)

    async def _create(self, item: Item) -> Item | None:
        """The created item, or None when one with its id exists (409)."""
        result = await self._call(
            "create an item", lambda: self._container.create_item(body=item), 409
        )
        return None if isinstance(result, int) else dict(result)

    async def _replace(self, item: Item, etag: str) -> Item | None:
        """The replaced item, or None when it changed since ``etag`` or is gone."""
        from azure.core import MatchConditions

        body = {k: v for k, v in item.items() if not k.startswith("_")}
        result = await self._call(
            "replace an item",
            lambda: self._container.replace_item(
                item=body["id"], body=body, etag=etag, match_condition=MatchConditions.IfNotModified
            ),
            404,
            412,
        )
        return None if isinstance(result, int) else dict(result)

    async def _patch(self, partition: list[str], item_id: str, operations: list[Item]) -> bool:
        result = await self._call(
            "update an item",
            lambda: self._container.patch_item(
                item=item_id, partition_key=partition, patch_operations=operations
            ),
            404,
        )
        return not isinstance(result, int)

    async def _delete(self, partition: list[str], item_id: str, *, etag: str | None = None) -> bool:
        """False when the item is gone already (or changed since ``etag``)."""
        from azure.core import MatchConditions

        result = await self._call(
            "delete an item",
            lambda: self._container.delete_item(
                item=item_id,
                partition_key=partition,
                etag=etag,
                match_condition=MatchConditions.IfNotModified if etag else None,
            ),
            404,
            412,
        )
        return not isinstance(result, int)

    async def _batch(
        self, partition: list[str], operations: list[tuple[str, tuple[Any, ...], dict[str, Any]]]
    ) -> list[Item] | _Failed:
        """The items the batch wrote, in order; or how it failed (nothing was written)."""
        from azure.cosmos.exceptions import CosmosBatchOperationError

        async def run() -> list[Item] | _Failed:
            try:
                results = await self._container.execute_item_batch(
                    batch_operations=operations, partition_key=partition
                )
            except CosmosBatchOperationError as exc:
                return _Failed(int(exc.status_code or 0), exc.error_index)
            return [dict(r.get("resourceBody") or {}) for r in results]

        result = await self._call("write a batch", run)
        assert not isinstance(result, int)
        return result

    async def _query(
        self, query: str, parameters: dict[str, Any], partition: list[str] | None
    ) -> list[Item]:
        """Every result; ``partition`` a full key, a prefix, or None (all partitions)."""
        params = [{"name": k, "value": v} for k, v in parameters.items()]

        async def run() -> list[Item]:
            if partition is None:
                found = self._container.query_items(query=query, parameters=params)
            else:
                found = self._container.query_items(
                    query=query, parameters=params, partition_key=partition
                )
            return [dict(item) async for item in found]

        result = await self._call("run a query", run)
        assert not isinstance(result, int)
        return result

    async def _page(
        self,
        query: str,
        parameters: dict[str, Any],
        partition: list[str],
        size: int,
        continuation: str | None,
    ) -> tuple[list[Item], str | None]:
        """One page of at most ``size`` results and the token of the next (None: no more)."""
        params = [{"name": k, "value": v} for k, v in parameters.items()]

        async def run() -> tuple[list[Item], str | None]:
            pages = self._container.query_items(
                query=query, parameters=params, partition_key=partition, max_item_count=size
            ).by_page(continuation)
            try:
                page = await pages.__anext__()
            except StopAsyncIteration:
                return [], None
            items = [dict(item) async for item in page]
            return items, cast(str | None, getattr(pages, "continuation_token", None))

        try:
            result = await self._call("run a query", run, 400)
        except ValueError as exc:
            if continuation is None:
                raise
            raise ValueError("invalid cursor") from exc  # the SDK's own check of its token
        if isinstance(result, int):
            raise ValueError("invalid cursor: Azure Cosmos DB refused its continuation")
        return result


# --- helpers --------------------------------------------------------------------------------------


def _partition(principal: Principal, session_id: str) -> list[str]:
    return [principal.tenant_id, principal.user_id, session_id]


def _new_message_id(conversation_id: str) -> str:
    return f"{conversation_id}.{uuid.uuid4().hex}"


def _new_attempt() -> str:
    return uuid.uuid4().hex


def _message_partition(principal: Principal, message_id: str) -> list[str] | None:
    """The caller's partition the message would be in (its id names its conversation)."""
    match = _MESSAGE_ID.fullmatch(message_id)
    return _partition(principal, match.group(1)) if match else None


def _claim_id(key: str) -> str:
    # Hashed: a client's key may hold characters an item id may not (/ \ ? #).
    return "key-" + hashlib.sha256(key.encode()).hexdigest()


def _is_running_reply(item: Item) -> bool:
    return item.get("role") == "assistant" and item.get("status") == MessageStatus.STREAMING.value


def _dump_citations(citations: Sequence[Citation]) -> list[Any]:
    return cast(list[Any], _CITATIONS.dump_python(tuple(citations), mode="json"))


def _expiry_of(message: Item) -> str | None:
    """When the service deletes ``message``: its TTL counts from its last write (``_ts``,
    whole seconds). None when it is kept forever."""
    ttl = message.get("ttl")
    if not isinstance(ttl, int) or ttl < 0 or not isinstance(message.get("_ts"), int):
        return None
    return stamp(datetime.fromtimestamp(message["_ts"] + ttl, UTC))


def _keeping_expiry(message: Item) -> Item:
    """``message`` to write back with the moment it expires unchanged: the service counts
    a TTL from the last write, and a rating must not lengthen how long a reply is kept."""
    ttl, written = message.get("ttl"), message.get("_ts")
    if not isinstance(ttl, int) or ttl < 0 or not isinstance(written, int):
        return message
    left = written + ttl - math.floor(datetime.now(UTC).timestamp())
    return {**message, "ttl": max(1, left)}


def _summary_expired(session: Item, moment: str) -> bool:
    expires_at = session.get("summaryExpiresAt")
    return isinstance(expires_at, str) and expires_at <= moment


def _conversation(item: Item) -> Conversation:
    # A summary past its covered messages' retention is shown as none, even before the sweep.
    expired = _summary_expired(item, now_stamp())
    return Conversation(
        id=item["id"],
        tenant_id=item["tenantId"],
        user_id=item["userId"],
        title=item["title"],
        created_at=datetime.fromisoformat(item["createdAt"]),
        updated_at=datetime.fromisoformat(item["updatedAt"]),
        summary="" if expired else item.get("summary") or "",
        summary_through=None if expired else item.get("summaryThrough"),
    )


def _message(item: Item) -> ConversationMessage:
    return ConversationMessage(
        id=item["id"],
        conversation_id=item["sessionId"],
        role=item["role"],
        content=item["content"],
        created_at=datetime.fromisoformat(item["createdAt"]),
        status=MessageStatus(item["status"]),
        citations=_CITATIONS.validate_python(item.get("citations") or []),
        plan=_PLAN.validate_python(item["plan"]) if item.get("plan") else None,
        explanation=_EXPLANATION.validate_python(item.get("explanation")),
        feedback=_RATING.validate_python(item.get("feedback")),
    )


def _turn_record(session: Item, question: Item, reply: Item, *, created: bool) -> TurnRecord:
    message = _message(reply)
    lease = reply.get("leaseUntil")
    return TurnRecord(
        conversation=_conversation(session),
        user_message=_message(question),
        reply=message,
        idempotency_key=reply.get("idempotencyKey"),
        request_hash=reply.get("requestHash"),
        lease_until=(
            datetime.fromisoformat(lease)
            if lease and message.status is MessageStatus.STREAMING
            else None
        ),
        created=created,
        attempt=reply.get("attempt"),
    )


def _encode_cursor(token: str) -> str:
    # Wrapped: the service's token is JSON of its own making, awkward in a URL.
    return base64.urlsafe_b64encode(json.dumps({"cosmos": token}).encode()).decode()


def _decode_cursor(cursor: str | None) -> str | None:
    if not cursor:
        return None
    try:
        token = json.loads(base64.urlsafe_b64decode(cursor.encode()))["cosmos"]
    except (ValueError, KeyError, TypeError, binascii.Error, UnicodeDecodeError) as exc:
        raise ValueError("invalid cursor") from exc
    if not isinstance(token, str) or not token:
        raise ValueError("invalid cursor")
    return token
