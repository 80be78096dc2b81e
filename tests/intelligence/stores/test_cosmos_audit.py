"""The Cosmos DB audit log through the real ``azure-cosmos`` SDK, against the protocol-level
fake of the service on loopback (tests/support/cosmos_fake.py): the contract suite, with
tampering done through the SDK with the account key (the adapter offers no such call),
and what is the adapter's own: layout, races between replicas, start-up errors."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack
from datetime import datetime
from typing import Any

import pytest
from pydantic import SecretStr

from intelligence.contracts import AuditEntry, AuditLog
from intelligence.settings import AuditCosmosSettings
from intelligence.stores.stamps import stamp
from tests.intelligence.stores.audit_contract import AuditLogContract, record
from tests.intelligence.stores.test_cosmos import ENTRA_TOKEN, StaticToken
from tests.support.cosmos_fake import FakeCosmos, serve_cosmos
from tests.support.lifecycle import opened

pytest.importorskip("azure.cosmos")

from azure.cosmos.aio import ContainerProxy, CosmosClient

from intelligence.stores.cosmos_audit import (
    PARTITION_KEY_PATH,
    AuditLogUnavailable,
    CosmosAuditLog,
)

DATABASE, CONTAINER = "lamina", "audit"
_FIELDS = {"event": "event", "user_id": "userId", "at": "at", "data": "data"}


@pytest.fixture(scope="module")
def cosmos() -> Iterator[FakeCosmos]:
    with serve_cosmos() as fake:
        yield fake


def settings_for(fake: FakeCosmos, **changes: Any) -> AuditCosmosSettings:
    values: dict[str, Any] = {
        "endpoint": fake.endpoint,
        "key": SecretStr(fake.key) if fake.key else None,
        "database": DATABASE,
        "container": CONTAINER,
        "create_if_missing": True,
    }
    return AuditCosmosSettings(**(values | changes))


class CosmosTamperer:
    """Edits items with the SDK and the account key: whoever holds the key can."""

    def __init__(self, container: ContainerProxy) -> None:
        self.container = container

    async def _item(self, tenant: str, seq: int) -> dict[str, Any]:
        item = await self.container.read_item(str(seq), partition_key=tenant)
        return {k: v for k, v in item.items() if not k.startswith("_")}

    async def set(self, tenant: str, seq: int, field: str, value: Any) -> None:
        item = await self._item(tenant, seq)
        item[{"prev_hash": "prevHash", **_FIELDS}[field]] = (
            stamp(value) if isinstance(value, datetime) else value
        )
        await self.container.replace_item(item["id"], item)

    async def remove(self, tenant: str, seq: int) -> None:
        await self.container.delete_item(str(seq), partition_key=tenant)

    async def swap(self, tenant: str, a: int, b: int) -> None:
        first, second = await self._item(tenant, a), await self._item(tenant, b)
        await self.container.replace_item(str(a), {**second, "id": str(a), "seq": a})
        await self.container.replace_item(str(b), {**first, "id": str(b), "seq": b})

    async def put(self, entry: AuditEntry) -> None:
        r = entry.record
        await self.container.create_item(
            {
                "id": str(entry.seq),
                "tenantId": r.tenant_id,
                "seq": entry.seq,
                "at": stamp(r.at),
                "event": r.event,
                "userId": r.user_id,
                "correlationId": r.correlation_id,
                "data": dict(r.data),
                "prevHash": entry.prev_hash,
                "hash": entry.hash,
            }
        )


@pytest.fixture
async def log(cosmos: FakeCosmos) -> AsyncIterator[CosmosAuditLog]:
    cosmos.reset()
    async with opened(CosmosAuditLog(settings_for(cosmos))) as log:
        yield log


class TestCosmosAuditLog(AuditLogContract):
    @pytest.fixture
    async def replicas(
        self, cosmos: FakeCosmos, log: CosmosAuditLog
    ) -> AsyncIterator[list[AuditLog]]:
        async with AsyncExitStack() as stack:
            yield [
                await stack.enter_async_context(opened(CosmosAuditLog(settings_for(cosmos))))
                for _ in range(3)
            ]

    @pytest.fixture
    async def tamper(
        self, cosmos: FakeCosmos, log: CosmosAuditLog
    ) -> AsyncIterator[CosmosTamperer]:
        async with CosmosClient(cosmos.endpoint, cosmos.key) as client:
            container = client.get_database_client(DATABASE).get_container_client(CONTAINER)
            yield CosmosTamperer(container)


# --- layout ----------------------------------------------------------------------------------


async def test_an_entry_is_one_item_named_by_its_position_in_the_tenants_partition(
    log: CosmosAuditLog, cosmos: FakeCosmos
) -> None:
    entry = await log.append(record(correlation_id="c-1", tool="lookup"))
    [(partition, item)] = cosmos.documents(DATABASE, CONTAINER)
    assert partition == ("contoso",)
    assert {k: v for k, v in item.items() if not k.startswith("_")} == {
        "id": "1",
        "tenantId": "contoso",
        "seq": 1,
        "at": stamp(entry.record.at),
        "event": "chat.turn",
        "userId": "alice",
        "correlationId": "c-1",
        "data": {"tool": "lookup"},
        "prevHash": entry.prev_hash,
        "hash": entry.hash,
    }


async def test_an_uncontended_append_is_one_request(
    log: CosmosAuditLog, cosmos: FakeCosmos
) -> None:
    await log.append(record())
    cosmos.requests.clear()
    await log.append(record(minute=1))
    assert [r.operation for r in cosmos.requests] == ["create"]


async def test_a_replica_that_lost_the_race_links_after_the_winner(
    log: CosmosAuditLog, cosmos: FakeCosmos
) -> None:
    async with opened(CosmosAuditLog(settings_for(cosmos))) as other:
        await log.append(record(minute=0))  # both replicas now know head 1 ...
        await other.append(record(minute=1))
        cosmos.requests.clear()
        late = await log.append(record(minute=2))  # ... so this one tries 2 first
    assert late.seq == 3
    creates = [r.status for r in cosmos.requests if r.operation == "create"]
    assert creates == [409, 201]
    assert (await log.verify("contoso")).intact


async def test_tenants_come_back_once_each_not_once_per_entry(
    log: CosmosAuditLog, cosmos: FakeCosmos
) -> None:
    for minute in range(5):
        await log.append(record(minute=minute))
    await log.append(record(tenant="fabrikam"))
    cosmos.requests.clear()

    assert await log.tenants() == ["contoso", "fabrikam"]

    # The gateway cannot serve a cross-partition DISTINCT (1004): the SDK gets the query
    # plan, queries each partition key range and merges what the ranges answer.
    ranged = "x-ms-documentdb-partitionkeyrangeid"
    queries = [
        (r.operation, r.status, r.body["query"], ranged in r.headers, r.results)
        for r in cosmos.requests
        if r.operation in ("query", "query-plan")
    ]
    distinct = "SELECT DISTINCT VALUE c.tenantId FROM c"
    assert queries == [
        ("query", 400, distinct, False, None),
        ("query-plan", 200, distinct, False, None),
        ("query", 200, distinct, True, 2),
    ]


# --- start-up ------------------------------------------------------------------------------------


async def test_open_names_what_is_missing(cosmos: FakeCosmos) -> None:
    with pytest.raises(AuditLogUnavailable, match="LAMINA_AUDIT__COSMOS__ENDPOINT"):
        await CosmosAuditLog(AuditCosmosSettings()).open()
    cosmos.reset()
    absent = CosmosAuditLog(settings_for(cosmos, create_if_missing=False))
    with pytest.raises(AuditLogUnavailable, match="LAMINA_AUDIT__COSMOS__CREATE_IF_MISSING=true"):
        await absent.open()


async def test_a_container_of_another_shape_is_refused(cosmos: FakeCosmos) -> None:
    cosmos.reset()
    cosmos.create_container(
        DATABASE, CONTAINER, partition_key_paths=["/tenantId", "/userId", "/sessionId"]
    )
    with pytest.raises(AuditLogUnavailable, match=f"'{PARTITION_KEY_PATH}'"):
        await CosmosAuditLog(settings_for(cosmos, create_if_missing=False)).open()


async def test_a_container_that_expires_items_is_refused(cosmos: FakeCosmos) -> None:
    cosmos.reset()
    cosmos.create_container(
        DATABASE, CONTAINER, partition_key_paths=[PARTITION_KEY_PATH], kind="Hash", default_ttl=3600
    )
    with pytest.raises(AuditLogUnavailable, match="time to live"):
        await CosmosAuditLog(settings_for(cosmos, create_if_missing=False)).open()


async def test_a_wrong_account_key_is_refused_at_open(cosmos: FakeCosmos) -> None:
    cosmos.reset()
    wrong = SecretStr(base64.b64encode(b"not the key" * 6).decode())
    with pytest.raises(AuditLogUnavailable, match="LAMINA_AUDIT__COSMOS__KEY"):
        await CosmosAuditLog(settings_for(cosmos, key=wrong)).open()


async def test_entra_id_tokens_authenticate_when_no_key_is_set() -> None:
    with serve_cosmos(FakeCosmos(key=None, token=ENTRA_TOKEN)) as fake:
        fake.create_container(
            DATABASE, CONTAINER, partition_key_paths=[PARTITION_KEY_PATH], kind="Hash"
        )
        credential = StaticToken(ENTRA_TOKEN)
        settings = settings_for(fake, key=None, create_if_missing=False)
        async with opened(CosmosAuditLog(settings, credential=credential)) as log:
            await log.append(record())
            assert (await log.verify("contoso")).intact
        assert fake.requests and {r.auth for r in fake.requests} == {"aad"}
        assert not credential.closed  # a credential passed in stays its owner's to close
