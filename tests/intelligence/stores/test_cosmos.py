"""The Cosmos DB conversation store through the real ``azure-cosmos`` SDK, against a
protocol-level fake of the service on loopback (tests/support/cosmos_fake.py)."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import SecretStr

from intelligence.contracts import AnswerRating, Principal, RetentionPolicy
from intelligence.settings import CosmosSettings
from tests.intelligence.stores.conversation_contract import (
    ALICE,
    BOB,
    RETENTION,
    ConversationStoreContract,
    finished_turn,
    new_turn,
)
from tests.support.cosmos_fake import FakeCosmos, serve_cosmos
from tests.support.processes import free_port

pytest.importorskip("azure.cosmos")

from azure.core.credentials import AccessToken

from intelligence.stores.cosmos import (
    PARTITION_KEY_PATHS,
    ConversationStoreUnavailable,
    CosmosConversationStore,
)

DATABASE, CONTAINER = "lamina", "conversations"
ENTRA_TOKEN = "entra-token-for-tests"


@pytest.fixture(scope="module")
def cosmos() -> Iterator[FakeCosmos]:
    with serve_cosmos() as fake:
        yield fake


def settings_for(fake: FakeCosmos, **changes: Any) -> CosmosSettings:
    values: dict[str, Any] = {
        "endpoint": fake.endpoint,
        "key": SecretStr(fake.key) if fake.key else None,
        "database": DATABASE,
        "container": CONTAINER,
        "create_if_missing": True,
    }
    return CosmosSettings(**(values | changes))


@pytest.fixture
async def store(cosmos: FakeCosmos) -> AsyncIterator[CosmosConversationStore]:
    cosmos.reset()
    store = CosmosConversationStore(settings_for(cosmos), retention=RETENTION)
    await store.open()
    yield store
    await store.close()


class TestCosmosConversationStore(ConversationStoreContract):
    pass


def items_of(
    fake: FakeCosmos, tenant: str, user: str
) -> list[tuple[tuple[str, ...], dict[str, Any]]]:
    return [
        (pk, doc) for pk, doc in fake.documents(DATABASE, CONTAINER) if pk[:2] == (tenant, user)
    ]


class StaticToken:
    """An async credential that hands out one fixed Entra token and remembers what for."""

    def __init__(self, token: str) -> None:
        self.token = token
        self.scopes: list[tuple[str, ...]] = []
        self.closed = False

    async def get_token(self, *scopes: str, **_: Any) -> AccessToken:
        self.scopes.append(scopes)
        return AccessToken(self.token, int(time.time()) + 3600)

    async def close(self) -> None:
        self.closed = True

    async def __aenter__(self) -> StaticToken:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()


# --- layout ----------------------------------------------------------------------------------


async def test_items_live_in_the_callers_hierarchical_partitions(
    store: CosmosConversationStore, cosmos: FakeCosmos
) -> None:
    record = await store.begin_turn(ALICE, new_turn(key="k1", request_hash="h1"))
    await store.begin_turn(BOB, new_turn(key="k1"))
    cid = record.conversation.id

    alices = items_of(cosmos, "contoso", "alice")
    conversation, keys = ("contoso", "alice", cid), ("contoso", "alice", "~keys")
    [(_, claim)] = [(pk, doc) for pk, doc in alices if doc["type"] == "turnKey"]
    assert sorted((pk, doc["type"], doc["id"]) for pk, doc in alices) == sorted(
        [
            (conversation, "session", cid),
            (conversation, "message", record.user_message.id),
            (conversation, "message", record.reply.id),
            (keys, "turnKey", claim["id"]),
        ]
    )
    for pk, doc in alices:
        assert (doc["tenantId"], doc["userId"], doc["sessionId"]) == pk
    # The key is hashed into the id (a client's key may hold / ? #), and kept whole inside.
    assert claim["id"].startswith("key-") and "k1" not in claim["id"]
    assert (claim["idempotencyKey"], claim["replyId"]) == ("k1", record.reply.id)
    assert {pk[:2] for pk, _ in cosmos.documents(DATABASE, CONTAINER)} == {
        ("contoso", "alice"),
        ("contoso", "bob"),
    }


async def test_a_turn_is_one_transactional_batch_in_its_conversations_partition(
    store: CosmosConversationStore, cosmos: FakeCosmos
) -> None:
    cosmos.requests.clear()
    first = await store.begin_turn(ALICE, new_turn(key="k1"))
    cid = first.conversation.id

    [batch] = [r for r in cosmos.requests if r.operation == "batch"]
    assert batch.partition_key == ("contoso", "alice", cid)
    assert [(op["operationType"], op["resourceBody"]["id"]) for op in batch.body] == [
        ("Create", cid),
        ("Create", first.user_message.id),
        ("Create", first.reply.id),
    ]
    # Outside the batch only the key's claim is written, in the caller's keys partition.
    writes = [r for r in cosmos.requests if r.operation in ("create", "replace", "patch", "delete")]
    assert [(r.operation, r.partition_key) for r in writes] == [
        ("create", ("contoso", "alice", "~keys"))
    ]

    cosmos.requests.clear()
    second = await store.begin_turn(ALICE, new_turn("And sick days?", conversation_id=cid))
    [batch] = [r for r in cosmos.requests if r.operation == "batch"]
    session_update, question, reply = batch.body
    # The session's update is conditional on what was read: its seq orders the messages.
    assert session_update["operationType"] == "Replace" and session_update["ifMatch"]
    assert (question["resourceBody"]["seq"], reply["resourceBody"]["seq"]) == (3, 4)
    assert reply["resourceBody"]["id"] == second.reply.id
    assert not [r for r in cosmos.requests if r.operation in ("create", "replace", "patch")]


async def test_a_turn_whose_claimer_died_is_written_by_the_next_call_with_its_key(
    store: CosmosConversationStore, cosmos: FakeCosmos
) -> None:
    # The claim is written, then the batch is lost: as if the process died in between.
    cosmos.fail_next("batch", 500)
    with pytest.raises(ConversationStoreUnavailable):
        await store.begin_turn(ALICE, new_turn("Leave?", key="k1", request_hash="h1"))
    assert await store.find_turn(ALICE, "k1") is None
    assert (await store.list_conversations(ALICE)).items == ()

    again = await store.begin_turn(ALICE, new_turn("Other body", key="k1", request_hash="h2"))

    assert not again.created
    assert (again.user_message.content, again.request_hash) == ("Leave?", "h1")
    stored = await store.messages(ALICE, again.conversation.id)
    assert [m.id for m in stored] == [again.user_message.id, again.reply.id]
    found = await store.find_turn(ALICE, "k1")
    assert found is not None and found.reply.id == again.reply.id
    # The turn carries the run the claim planned, so the usual lease and fencing apply.
    [(_, claim)] = [
        (pk, doc) for pk, doc in items_of(cosmos, "contoso", "alice") if doc["type"] == "turnKey"
    ]
    assert again.attempt is not None and again.attempt == claim["attempt"] == found.attempt
    later = datetime.now(UTC) + timedelta(minutes=5)
    assert await store.renew_turn(ALICE, again.reply.id, "half", later, attempt=again.attempt)
    assert not await store.renew_turn(ALICE, again.reply.id, "x", later, attempt="another-run")


async def test_a_cursor_the_service_does_not_know_is_a_value_error(
    store: CosmosConversationStore,
) -> None:
    forged = base64.urlsafe_b64encode(json.dumps({"cosmos": "made-up"}).encode()).decode()
    with pytest.raises(ValueError, match="cursor"):
        await store.list_conversations(ALICE, cursor=forged)


# --- retention ---------------------------------------------------------------------------------


async def test_retention_is_a_per_item_ttl_the_service_applies(cosmos: FakeCosmos) -> None:
    cosmos.reset()
    thirty_days = 30 * 86_400
    store = CosmosConversationStore(
        settings_for(cosmos),
        retention=RetentionPolicy(default_s=thirty_days, tenants={"fabrikam": None}),
    )
    await store.open()
    try:
        alices = await store.begin_turn(ALICE, new_turn(key="k1"))
        kept = await store.begin_turn(Principal("fabrikam", "bob"), new_turn(key="k1"))
        ttls = {doc["type"]: doc.get("ttl") for _, doc in items_of(cosmos, "contoso", "alice")}
        assert ttls == {
            "session": thirty_days + 86_400,
            "message": thirty_days,
            "turnKey": thirty_days,
        }
        assert all("ttl" not in doc for _, doc in items_of(cosmos, "fabrikam", "bob"))

        cosmos.advance(thirty_days + 1)

        cid = alices.conversation.id
        assert await store.messages(ALICE, cid) == []
        assert await store.find_turn(ALICE, "k1") is None
        assert await store.get(ALICE, cid) is not None  # emptied, until the sweep
        later = datetime.now(UTC) + timedelta(seconds=thirty_days + 1)
        assert await store.purge_expired(later) == 0  # the service deleted the messages
        assert await store.get(ALICE, cid) is None
        assert (await store.begin_turn(ALICE, new_turn(key="k1"))).created  # the key is free
        bobs = Principal("fabrikam", "bob")
        assert len(await store.messages(bobs, kept.conversation.id)) == 2
    finally:
        await store.close()


async def test_a_summary_expires_with_the_newest_message_it_covers(cosmos: FakeCosmos) -> None:
    cosmos.reset()
    thirty_days = 30 * 86_400
    store = CosmosConversationStore(
        settings_for(cosmos),
        retention=RetentionPolicy(default_s=thirty_days, tenants={"fabrikam": None}),
    )
    await store.open()
    try:
        written = time.time()
        first = await finished_turn(store, ALICE, "Leave?", "27 days")
        done = time.time()
        cid = first.conversation.id
        await store.save_summary(ALICE, cid, "Alice asked about leave.", first.reply.id)
        bobs = Principal("fabrikam", "bob")
        kept = await finished_turn(store, bobs, "Leave?", "27 days")
        await store.save_summary(bobs, kept.conversation.id, "kept", kept.reply.id)

        def session_of(tenant: str, user: str, conversation_id: str) -> dict[str, Any]:
            return next(
                doc
                for _, doc in items_of(cosmos, tenant, user)
                if doc["type"] == "session" and doc["id"] == conversation_id
            )

        # The reply's time to live counts from its last write, which the finish made.
        expires = datetime.fromisoformat(session_of("contoso", "alice", cid)["summaryExpiresAt"])
        assert written - 1 <= expires.timestamp() - thirty_days <= done
        assert session_of("fabrikam", "bob", kept.conversation.id)["summaryExpiresAt"] is None

        cosmos.advance(thirty_days + 1)
        await finished_turn(store, ALICE, "Sick days?", "10", conversation_id=cid)
        later = datetime.now(UTC) + timedelta(seconds=thirty_days + 1)
        assert await store.purge_expired(later) == 0

        session = session_of("contoso", "alice", cid)
        assert (session["summary"], session["summaryThrough"]) == ("", None)
        assert len(await store.messages(ALICE, cid)) == 2  # the conversation goes on
        assert session_of("fabrikam", "bob", kept.conversation.id)["summary"] == "kept"
    finally:
        await store.close()


async def test_a_rating_does_not_lengthen_how_long_its_answer_is_kept(
    cosmos: FakeCosmos,
) -> None:
    cosmos.reset()
    hour = 3600.0
    store = CosmosConversationStore(settings_for(cosmos), retention=RetentionPolicy(hour))
    await store.open()
    try:
        done = await finished_turn(store, ALICE, "Leave?", "27 days")
        finished = time.time()  # the reply's last write was just before
        # The service counts a TTL from an item's last write, in whole seconds: rate well
        # after the finish, so that a rating restarting the count would show.
        await asyncio.sleep(2.5)
        rating = AnswerRating("positive", None, datetime.now(UTC))
        assert await store.rate(ALICE, done.conversation.id, done.reply.id, rating)

        # Past the hour after the finish (and the second a TTL's whole seconds may add),
        # though not yet an hour after the rating.
        cosmos.advance(finished + hour + 1.3 - time.time())
        assert await store.messages(ALICE, done.conversation.id) == []
    finally:
        await store.close()


async def test_a_container_without_time_to_live_cannot_keep_a_retention_period(
    cosmos: FakeCosmos,
) -> None:
    cosmos.reset()
    cosmos.create_container(
        DATABASE, CONTAINER, partition_key_paths=list(PARTITION_KEY_PATHS), default_ttl=None
    )
    store = CosmosConversationStore(settings_for(cosmos), retention=RETENTION)
    with pytest.raises(ConversationStoreUnavailable, match="time to live"):
        await store.open()
    # Without a retention period, time to live is not needed.
    keeping = CosmosConversationStore(settings_for(cosmos))
    await keeping.open()
    await keeping.close()


# --- authentication and set-up ------------------------------------------------------------------


async def test_the_account_key_signs_every_request(
    store: CosmosConversationStore, cosmos: FakeCosmos
) -> None:
    cosmos.requests.clear()
    await store.begin_turn(ALICE, new_turn(key="k1"))
    await store.list_conversations(ALICE)
    assert cosmos.requests and {r.auth for r in cosmos.requests} == {"master"}
    assert not cosmos.refused


async def test_a_wrong_account_key_is_refused_at_open(cosmos: FakeCosmos) -> None:
    cosmos.reset()
    wrong = base64.b64encode(b"not the key" * 6).decode()
    store = CosmosConversationStore(settings_for(cosmos, key=SecretStr(wrong)))
    with pytest.raises(ConversationStoreUnavailable, match="LAMINA_CONVERSATIONS__COSMOS__KEY"):
        await store.open()
    assert cosmos.refused  # the fake checked the signature, and it did not match


async def test_entra_id_tokens_authenticate_when_no_key_is_set() -> None:
    with serve_cosmos(FakeCosmos(key=None, token=ENTRA_TOKEN)) as fake:
        # Data-plane RBAC cannot create containers: infra/ does, before the service starts.
        fake.create_container(DATABASE, CONTAINER, partition_key_paths=list(PARTITION_KEY_PATHS))
        credential = StaticToken(ENTRA_TOKEN)
        store = CosmosConversationStore(
            settings_for(fake, key=None, create_if_missing=False),
            retention=RETENTION,
            credential=credential,
        )
        await store.open()
        record = await store.begin_turn(ALICE, new_turn(key="k1"))
        assert (await store.find_turn(ALICE, "k1")) is not None
        await store.close()

        assert record.created
        assert fake.requests and {r.auth for r in fake.requests} == {"aad"}
        assert credential.scopes and set(credential.scopes) == {("https://127.0.0.1/.default",)}
        assert not credential.closed  # a credential passed in stays its owner's to close


async def test_entra_id_cannot_create_the_container_and_says_what_to_do() -> None:
    with serve_cosmos(FakeCosmos(key=None, token=ENTRA_TOKEN)) as fake:
        store = CosmosConversationStore(
            settings_for(fake, key=None), credential=StaticToken(ENTRA_TOKEN)
        )
        with pytest.raises(ConversationStoreUnavailable, match="CREATE_IF_MISSING=false"):
            await store.open()


async def test_an_entra_token_the_account_does_not_accept_is_refused_at_open() -> None:
    with serve_cosmos(FakeCosmos(key=None, token=ENTRA_TOKEN)) as fake:
        fake.create_container(DATABASE, CONTAINER, partition_key_paths=list(PARTITION_KEY_PATHS))
        store = CosmosConversationStore(
            settings_for(fake, key=None, create_if_missing=False),
            credential=StaticToken("someone-elses-token"),
        )
        with pytest.raises(ConversationStoreUnavailable, match="refused an Entra ID token"):
            await store.open()


async def test_an_unreachable_account_fails_open_with_a_clear_error() -> None:
    endpoint = f"https://127.0.0.1:{free_port()}/"
    key = SecretStr(base64.b64encode(b"k" * 64).decode())
    store = CosmosConversationStore(CosmosSettings(endpoint=endpoint, key=key))
    with pytest.raises(
        ConversationStoreUnavailable, match=f"cannot reach Azure Cosmos DB at {endpoint}"
    ):
        await store.open()


async def test_open_names_what_is_missing(cosmos: FakeCosmos) -> None:
    with pytest.raises(
        ConversationStoreUnavailable, match="LAMINA_CONVERSATIONS__COSMOS__ENDPOINT"
    ):
        await CosmosConversationStore(CosmosSettings()).open()
    cosmos.reset()
    absent = CosmosConversationStore(settings_for(cosmos, create_if_missing=False))
    with pytest.raises(ConversationStoreUnavailable, match="CREATE_IF_MISSING=true"):
        await absent.open()
    cosmos.create_container(DATABASE, CONTAINER, partition_key_paths=["/tenantId"])
    misshapen = CosmosConversationStore(settings_for(cosmos, create_if_missing=False))
    with pytest.raises(ConversationStoreUnavailable, match="hierarchical key"):
        await misshapen.open()
