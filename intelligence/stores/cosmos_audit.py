"""Azure Cosmos DB adapter of the audit log (``LAMINA_AUDIT__BACKEND=cosmos``).

Layout: one container partitioned by ``/tenantId``; a tenant's hash chain
(:mod:`intelligence.audit_chain`) is its logical partition, one item per entry with
``id`` = its ``seq`` as text. Every read of a chain is a query inside that partition.

Appends from any number of replicas never fork a chain: the position *is* the item's id,
so of two replicas that both read head ``n`` and create entry ``n + 1``, exactly one
create succeeds and the other gets 409, reads the head again and links after it. Each
replica remembers the heads it wrote or read, so an uncontended append is one request.

The adapter has no update or delete. The container must not expire items (no default
time to live, or -1): :meth:`CosmosAuditLog.open` refuses one that would.

Authentication as for the conversation store (:mod:`intelligence.stores.cosmos_account`):
the account key when ``LAMINA_AUDIT__COSMOS__KEY`` is set, else an Entra ID token with
the "Cosmos DB Built-in Data Contributor" data-plane role. The SDK is imported only when
the log is opened.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar

from intelligence.audit_chain import GENESIS, ChainCheck, event_bounds, link
from intelligence.contracts import (
    AuditEntry,
    AuditPage,
    AuditQuery,
    AuditRecord,
    ChainVerification,
    StoreUnavailable,
)
from intelligence.settings import AuditCosmosSettings
from intelligence.stores.cosmos_account import (
    call_cosmos,
    open_account,
)
from intelligence.stores.stamps import stamp

if TYPE_CHECKING:
    from azure.core.credentials_async import AsyncTokenCredential
    from azure.cosmos.aio import ContainerProxy, CosmosClient

Item = dict[str, Any]
T = TypeVar("T")

PARTITION_KEY_PATH = "/tenantId"
"""The container's partition key (infra/ defines the container with it)."""

INDEXING_POLICY: dict[str, Any] = {
    "indexingMode": "consistent",
    "automatic": True,
    "includedPaths": [{"path": "/*"}],
    # Filtered on: seq, event, userId, correlationId, at. Never: the rest.
    "excludedPaths": [
        {"path": "/data/*"},
        {"path": "/hash/?"},
        {"path": "/prevHash/?"},
        {"path": '/"_etag"/?'},
    ],
}
"""The container's indexing policy (what :meth:`CosmosAuditLog.open` creates)."""

_VARIABLES = "LAMINA_AUDIT__COSMOS"
_ATTEMPTS = 64
"""Rounds of an append that lose the race for the next position. Each lost round means
another replica appended, so this bounds contention, not waiting."""
_VERIFY_PAGE = 1000

_Q_HEAD = "SELECT TOP 1 c.seq, c.hash FROM c ORDER BY c.seq DESC"
_Q_TENANTS = "SELECT DISTINCT VALUE c.tenantId FROM c"


class AuditLogUnavailable(StoreUnavailable):
    """Azure Cosmos DB cannot serve the audit log: unreachable, refusing the credentials,
    or not set up as the log needs (the message says which, and what to change)."""


class CosmosAuditLog:
    """The audit log in Azure Cosmos DB, one partition per tenant's chain. Build it,
    ``await open()`` (connects, checks or creates the container), ``await close()``."""

    def __init__(
        self, settings: AuditCosmosSettings, *, credential: AsyncTokenCredential | None = None
    ) -> None:
        self._settings = settings
        self._credential = credential
        self._owned_credential: AsyncTokenCredential | None = None
        self._client: CosmosClient | None = None
        self._container_proxy: ContainerProxy | None = None
        self._heads: dict[str, tuple[int, str]] = {}
        """The last entry (seq, hash) this replica wrote or read, per tenant."""
        self._appending: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        """Appends of one tenant from this replica queue here instead of racing each other."""

    # --- lifecycle --------------------------------------------------------------------

    async def open(self) -> None:
        """Connect, and check the container (or create it, with ``create_if_missing``).
        Raises :class:`AuditLogUnavailable` with what to fix."""
        if self._container_proxy is not None:
            return
        self._client, self._container_proxy, self._owned_credential = await open_account(
            self._settings,
            self._credential,
            self._connect,
            variables=_VARIABLES,
            what="the Cosmos DB audit log",
            unavailable=AuditLogUnavailable,
        )

    async def _connect(self, client: CosmosClient) -> ContainerProxy:
        from azure.cosmos import PartitionKey

        settings = self._settings
        await client.__aenter__()  # reads the account: the first request that can fail
        if settings.create_if_missing:
            database = await client.create_database_if_not_exists(settings.database)
            container = await database.create_container_if_not_exists(
                id=settings.container,
                partition_key=PartitionKey(path=PARTITION_KEY_PATH),
                indexing_policy=INDEXING_POLICY,
            )
        else:
            database = client.get_database_client(settings.database)
            container = database.get_container_client(settings.container)
        self._check_container(await container.read())
        return container

    def _check_container(self, properties: Item) -> None:
        name = f"container {self._settings.container!r}"
        key = properties.get("partitionKey") or {}
        if list(key.get("paths") or ()) != [PARTITION_KEY_PATH] or key.get("kind") != "Hash":
            raise AuditLogUnavailable(
                f"{name} is partitioned by {key.get('paths')} ({key.get('kind')}); the audit "
                f"log needs the partition key {PARTITION_KEY_PATH!r} (Hash)"
            )
        if properties.get("defaultTtl") not in (None, -1):
            raise AuditLogUnavailable(
                f"{name} expires items after {properties['defaultTtl']} s, which would delete "
                "audit entries: turn its time to live off"
            )

    async def close(self) -> None:
        client, self._client, self._container_proxy = self._client, None, None
        if client is not None:
            await client.close()
        if self._owned_credential is not None:
            await self._owned_credential.close()
            self._owned_credential = None

    @property
    def _container(self) -> ContainerProxy:
        if self._container_proxy is None:
            raise RuntimeError("audit log is not open")
        return self._container_proxy

    # --- the port -----------------------------------------------------------------------

    async def append(self, record: AuditRecord) -> AuditEntry:
        tenant = record.tenant_id
        async with self._appending[tenant]:
            head = self._heads.get(tenant) or await self._head(tenant, at_least=0)
            for _ in range(_ATTEMPTS):
                entry = link(record, head[0] + 1, head[1])
                if await self._create(_item(entry)):
                    self._heads[tenant] = (entry.seq, entry.hash)
                    return entry
                # Another replica stored an entry at this position first: link after it.
                head = await self._head(tenant, at_least=entry.seq)
        raise AuditLogUnavailable(f"too many concurrent appends to the audit log of {tenant!r}")

    async def query(self, query: AuditQuery) -> AuditPage:
        conditions = ["c.seq > @after"]
        parameters: dict[str, Any] = {"@after": query.after_seq}
        if query.event is not None:
            bounds = event_bounds(query.event)
            if bounds is None:
                conditions.append("c.event = @event")
                parameters["@event"] = query.event
            else:
                conditions += ["c.event >= @low", "c.event < @high"]
                parameters["@low"], parameters["@high"] = bounds
        for field, value in (("userId", query.user_id), ("correlationId", query.correlation_id)):
            if value is not None:
                conditions.append(f"c.{field} = @{field}")
                parameters[f"@{field}"] = value
        if query.since is not None:
            conditions.append("c.at >= @since")
            parameters["@since"] = stamp(query.since)
        if query.until is not None:
            conditions.append("c.at < @until")
            parameters["@until"] = stamp(query.until)
        limit = max(1, query.limit)
        parameters["@top"] = limit + 1
        found = await self._query(
            f"SELECT TOP @top * FROM c WHERE {' AND '.join(conditions)} ORDER BY c.seq",
            parameters,
            query.tenant_id,
        )
        entries = tuple(_entry(item) for item in found[:limit])
        return AuditPage(entries, entries[-1].seq if len(found) > limit else None)

    async def verify(self, tenant_id: str) -> ChainVerification:
        check = ChainCheck(tenant_id)
        after = 0
        while True:
            page = await self._query(
                "SELECT TOP @top * FROM c WHERE c.seq > @after ORDER BY c.seq",
                {"@top": _VERIFY_PAGE, "@after": after},
                tenant_id,
            )
            for item in page:
                try:
                    entry = _entry(item)
                except (KeyError, TypeError, ValueError):
                    check.add_unreadable(_seq_of(item, after))
                    return check.result()
                if not check.add(entry):
                    return check.result()
                after = entry.seq
            if len(page) < _VERIFY_PAGE:
                return check.result()

    async def tenants(self) -> list[str]:
        # Over every entry, not just first entries: a chain whose first entry was removed
        # must still be listed, and verified. Each tenant comes back once (the SDK merges
        # the partition key ranges' distinct values), not once per entry.
        found = await self._results(_Q_TENANTS, {}, None)
        return sorted(tenant for tenant in found if isinstance(tenant, str))

    # --- the chain's head -----------------------------------------------------------------

    async def _head(self, tenant: str, *, at_least: int) -> tuple[int, str]:
        """The tenant's last entry (seq, hash), (0, GENESIS) before the first. After a
        lost race for position ``at_least`` that entry exists: if the query does not
        show it yet (a replica that has not caught up), read it by its id."""
        found = await self._query(_Q_HEAD, {}, tenant)
        head = (found[0]["seq"], found[0]["hash"]) if found else (0, GENESIS)
        if head[0] < at_least:
            item = await self._read(tenant, str(at_least))
            if item is None:
                raise AuditLogUnavailable(
                    f"the audit log of {tenant!r} refused entry {at_least} as taken, "
                    "but does not show it"
                )
            head = (item["seq"], item["hash"])
        self._heads[tenant] = head
        return head

    # --- the SDK, and what its errors mean here ----------------------------------------------

    async def _call(self, action: str, call: Callable[[], Awaitable[T]], *expected: int) -> T | int:
        """Run one SDK call; a status in ``expected`` comes back as an int, any other
        failure raises :class:`AuditLogUnavailable`."""
        return await call_cosmos(action, call, expected, AuditLogUnavailable)

    async def _create(self, item: Item) -> bool:
        """False when an item with its id (its position) exists already (409)."""
        result = await self._call(
            "append to the audit log", lambda: self._container.create_item(body=item), 409
        )
        return not isinstance(result, int)

    async def _read(self, tenant: str, item_id: str) -> Item | None:
        result = await self._call(
            "read the audit log",
            lambda: self._container.read_item(item=item_id, partition_key=tenant),
            404,
        )
        return None if isinstance(result, int) else dict(result)

    async def _query(self, query: str, parameters: dict[str, Any], tenant: str) -> list[Item]:
        """Every item the query selects in the tenant's partition."""
        return [dict(item) for item in await self._results(query, parameters, tenant)]

    async def _results(
        self, query: str, parameters: dict[str, Any], tenant: str | None
    ) -> list[Any]:
        """Every result (items, or values of a ``SELECT VALUE``), in the tenant's partition
        (None: across all)."""
        params = [{"name": k, "value": v} for k, v in parameters.items()]

        async def run() -> list[Any]:
            if tenant is None:
                found = self._container.query_items(query=query, parameters=params)
            else:
                found = self._container.query_items(
                    query=query, parameters=params, partition_key=tenant
                )
            return [result async for result in found]

        result = await self._call("query the audit log", run)
        assert not isinstance(result, int)
        return result


def _item(entry: AuditEntry) -> Item:
    record = entry.record
    return {
        "id": str(entry.seq),
        "tenantId": record.tenant_id,
        "seq": entry.seq,
        "at": stamp(record.at),
        "event": record.event,
        "userId": record.user_id,
        "correlationId": record.correlation_id,
        "data": dict(record.data),
        "prevHash": entry.prev_hash,
        "hash": entry.hash,
    }


def _entry(item: Item) -> AuditEntry:
    """The stored entry; ``KeyError``, ``TypeError`` or ``ValueError`` when the item is
    not what an append writes (it was edited)."""
    data = item["data"]
    if not isinstance(data, dict):
        raise TypeError("an audit entry's data is an object")
    return AuditEntry(
        record=AuditRecord(
            event=item["event"],
            tenant_id=item["tenantId"],
            user_id=item["userId"],
            correlation_id=item.get("correlationId"),
            data=data,
            at=datetime.fromisoformat(item["at"]),
        ),
        seq=item["seq"],
        prev_hash=item["prevHash"],
        hash=item["hash"],
    )


def _seq_of(item: Item, after: int) -> int:
    seq = item.get("seq")
    return seq if isinstance(seq, int) and not isinstance(seq, bool) else after + 1
