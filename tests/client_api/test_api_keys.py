"""API keys: the store contract on SQLite and on a real Redis, the authenticator, and
``lamina keys`` as a real process."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from uuid import uuid4

import aiosqlite
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis

from client_api.auth.api_keys import (
    API_KEY_PREFIX,
    ApiKey,
    ApiKeyAuthenticator,
    ApiKeyNotActive,
    ApiKeyStatus,
    ApiKeyStore,
    DuplicateApiKeyName,
    IssuedApiKey,
    KeyStoreUnavailable,
    RedisApiKeyStore,
    SqliteApiKeyStore,
    UnknownApiKey,
    looks_like_api_key,
    open_api_key_store,
    parse_api_key,
    parse_duration,
)
from client_api.settings import load_settings
from inferencing.gateway.redis_state import redis_client
from intelligence.contracts import Principal
from tests.support.processes import free_port, lamina_env, run_lamina
from tests.support.redis_server import RedisServer, private_redis

KEY_SHAPE = re.compile(r"lam_[a-z2-7]{12}_[A-Za-z0-9_-]{43}")
ALPHABET = "abcdefghijklmnopqrstuvwxyz234567"


@dataclass
class ManualClock:
    """The stores' clock, moved by the test instead of sleeping."""

    now: datetime = field(default_factory=lambda: datetime(2030, 1, 1, 9, 0, tzinfo=UTC))

    def __call__(self) -> datetime:
        return self.now

    def advance(self, by: timedelta) -> None:
        self.now += by


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    """A private Redis for this module (the outage test brings its own)."""
    with private_redis() as server:
        yield server


@pytest.fixture
async def redis(redis_server: RedisServer) -> AsyncIterator[Redis]:
    client = redis_client(redis_server.url, connect_timeout_s=2.0, command_timeout_s=2.0)
    yield client
    await client.aclose()


@pytest.fixture
def prefix() -> str:
    return f"test:{uuid4().hex}:apikeys:"


def other_secret(key: str) -> str:
    """The same key id with a different, well-formed secret."""
    head, secret = key[:17], key[17:]
    return head + ("A" if secret[0] != "A" else "B") + secret[1:]


# --- the contract every ApiKeyStore passes -----------------------------------------------


RawStorage = Callable[[], Awaitable[str]]

SHARED_STORE = [HealthCheck.function_scoped_fixture, HealthCheck.differing_executors]
"""For the property tests: one store and one key for all of a test's examples is the point
(every text is tried against a real key), and the same contract method runs for each
backend's subclass, which is what a contract suite is."""


class ApiKeyStoreContract:
    """Mixed into a test class that provides ``store`` and ``second_store`` (another
    instance on the same data, as a second replica or the CLI beside the server), both
    on the ``clock`` fixture, and ``raw_storage``: reads everything the store keeps,
    bypassing it, as text."""

    @pytest.fixture
    def clock(self) -> ManualClock:
        return ManualClock()

    @pytest.fixture
    async def issued(self, store: ApiKeyStore) -> IssuedApiKey:
        return await store.create("contoso", "svc")

    # -- create, get, list ------------------------------------------------------------

    async def test_a_created_key_has_the_documented_shape_and_verifies(
        self, store: ApiKeyStore, clock: ManualClock
    ) -> None:
        issued = await store.create(
            "contoso", "billing-svc", roles=["Lamina.User"], groups=["finance", "audit"]
        )
        record = issued.record
        assert KEY_SHAPE.fullmatch(issued.key)
        assert issued.key.startswith(f"{API_KEY_PREFIX}{record.key_id}_")
        assert issued.key not in repr(issued)
        assert record == ApiKey(
            key_id=record.key_id,
            name="billing-svc",
            tenant_id="contoso",
            roles=frozenset({"Lamina.User"}),
            groups=frozenset({"finance", "audit"}),
            created_at=clock.now,
        )
        assert await store.get(record.key_id) == record
        assert await store.verify(issued.key) == record
        assert record.status(clock.now) is ApiKeyStatus.ACTIVE

    async def test_only_a_hash_of_the_key_is_stored(
        self, store: ApiKeyStore, raw_storage: RawStorage
    ) -> None:
        issued = await store.create("contoso", "billing-svc", roles=["Lamina.User"])
        rotated = await store.rotate(issued.record.key_id, timedelta(hours=1))
        stored = await raw_storage()
        assert issued.record.key_id in stored  # the raw view does see the records
        for key in (issued.key, rotated.key):
            secret = key.split("_", 2)[2]
            assert secret not in stored
            assert key not in stored
            assert hashlib.sha256(key.encode()).hexdigest() in stored

    async def test_list_is_per_tenant_oldest_first_and_get_of_unknown_is_none(
        self, store: ApiKeyStore, clock: ManualClock
    ) -> None:
        first = await store.create("contoso", "a")
        clock.advance(timedelta(minutes=1))
        second = await store.create("contoso", "b")
        clock.advance(timedelta(minutes=1))
        other = await store.create("fabrikam", "a")
        await store.revoke(first.record.key_id)
        first_now = await store.get(first.record.key_id)
        assert first_now is not None
        assert await store.list_keys("contoso") == [first_now, second.record]
        assert await store.list_keys("fabrikam") == [other.record]
        assert await store.list_keys() == [first_now, second.record, other.record]
        assert await store.list_keys("nobody") == []
        assert await store.get("aaaaaaaaaaaa") is None

    @pytest.mark.parametrize(
        ("tenant", "name", "roles", "expires_in"),
        [
            ("", "svc", [], None),
            ("  ", "svc", [], None),
            ("contoso", "", [], None),
            ("contoso", "has space", [], None),
            ("contoso", "-leading-dash", [], None),
            ("contoso", "x" * 65, [], None),
            ("contoso", "svc", [""], None),
            ("contoso", "svc", ["ok", "bad\nrole"], None),
            ("contoso", "svc", [], timedelta(0)),
            ("contoso", "svc", [], timedelta(days=-1)),
        ],
    )
    async def test_create_refuses_what_cannot_work(
        self,
        store: ApiKeyStore,
        clock: ManualClock,
        tenant: str,
        name: str,
        roles: list[str],
        expires_in: timedelta | None,
    ) -> None:
        expires_at = None if expires_in is None else clock.now + expires_in
        with pytest.raises(ValueError, match=r"tenant|name|roles|expires_at"):
            await store.create(tenant, name, roles=roles, expires_at=expires_at)
        assert await store.list_keys() == []

    async def test_a_naive_expiry_is_refused(self, store: ApiKeyStore) -> None:
        with pytest.raises(ValueError, match="time zone"):
            await store.create("contoso", "svc", expires_at=datetime(2099, 1, 1))

    async def test_a_tenant_has_one_active_key_per_name(self, store: ApiKeyStore) -> None:
        first = await store.create("contoso", "svc")
        with pytest.raises(DuplicateApiKeyName, match=first.record.key_id):
            await store.create("contoso", "svc")
        await store.create("fabrikam", "svc")  # another tenant, another client
        await store.revoke(first.record.key_id)
        await store.create("contoso", "svc")  # the name is free again

    async def test_two_writers_cannot_both_create_one_name(
        self, store: ApiKeyStore, second_store: ApiKeyStore
    ) -> None:
        results = await asyncio.gather(
            store.create("contoso", "svc"),
            second_store.create("contoso", "svc"),
            return_exceptions=True,
        )
        assert sorted(type(r).__name__ for r in results) == [
            "DuplicateApiKeyName",
            "IssuedApiKey",
        ]
        assert len(await store.list_keys("contoso")) == 1

    # -- verify -------------------------------------------------------------------------

    async def test_verify_refuses_a_wrong_secret(self, store: ApiKeyStore) -> None:
        issued = await store.create("contoso", "svc")
        assert await store.verify(other_secret(issued.key)) is None
        assert await store.verify(issued.key) is not None

    async def test_verify_refuses_a_secret_presented_with_another_id(
        self, store: ApiKeyStore
    ) -> None:
        one = await store.create("contoso", "one")
        two = await store.create("contoso", "two")
        secret_of_one = one.key.split("_", 2)[2]
        assert await store.verify(f"lam_{two.record.key_id}_{secret_of_one}") is None
        unknown = "a" * 12 if one.record.key_id != "a" * 12 else "b" * 12
        assert await store.verify(f"lam_{unknown}_{secret_of_one}") is None

    @pytest.mark.parametrize(
        "mangle",
        [
            lambda k: "",
            lambda k: API_KEY_PREFIX,
            lambda k: k[:-1],
            lambda k: k + "A",
            lambda k: k + "\n",
            lambda k: " " + k,
            lambda k: k.upper(),
            lambda k: "Bearer " + k,
            lambda k: k.replace("_", "-", 1),
            lambda k: "lem" + k[3:],
            lambda k: k[:20] + "é" + k[21:],
            lambda k: k[:20] + "\udcff" + k[21:],  # a lone surrogate: not even encodable
            lambda k: k[:20] + "\x00" + k[21:],
            lambda k: k.split("_", 2)[2],
        ],
    )
    async def test_verify_refuses_malformed_text(
        self, store: ApiKeyStore, issued: IssuedApiKey, mangle: Callable[[str], str]
    ) -> None:
        presented = mangle(issued.key)
        assert presented != issued.key
        assert parse_api_key(presented) in (None, issued.record.key_id)
        assert await store.verify(presented) is None

    @settings(
        max_examples=150,
        deadline=None,
        suppress_health_check=SHARED_STORE,
    )
    @given(text=st.text() | st.from_regex(KEY_SHAPE, fullmatch=True))
    async def test_arbitrary_text_never_raises_and_never_verifies(
        self, store: ApiKeyStore, issued: IssuedApiKey, text: str
    ) -> None:
        assert text != issued.key
        assert await store.verify(text) is None

    @settings(
        max_examples=150,
        deadline=None,
        suppress_health_check=SHARED_STORE,
    )
    @given(data=st.data())
    async def test_a_one_character_change_never_verifies(
        self, store: ApiKeyStore, issued: IssuedApiKey, data: st.DataObject
    ) -> None:
        key = issued.key
        position = data.draw(st.integers(min_value=0, max_value=len(key) - 1))
        other = data.draw(
            st.sampled_from(ALPHABET + "ABXYZ0189-_").filter(lambda c: c != key[position])
        )
        assert await store.verify(key[:position] + other + key[position + 1 :]) is None

    # -- revoke, expire -----------------------------------------------------------------

    async def test_a_revoked_key_is_refused_and_revoking_again_keeps_the_first_time(
        self, store: ApiKeyStore, clock: ManualClock
    ) -> None:
        issued = await store.create("contoso", "svc")
        revoked_at = clock.now
        assert await store.revoke(issued.record.key_id) is True
        assert await store.verify(issued.key) is None
        clock.advance(timedelta(hours=1))
        assert await store.revoke(issued.record.key_id) is True
        record = await store.get(issued.record.key_id)
        assert record is not None
        assert record.revoked_at == revoked_at
        assert record.status(clock.now) is ApiKeyStatus.REVOKED
        assert await store.revoke("aaaaaaaaaaaa") is False
        assert await store.revoke("not an id") is False

    async def test_a_key_works_until_it_expires(
        self, store: ApiKeyStore, clock: ManualClock
    ) -> None:
        issued = await store.create("contoso", "svc", expires_at=clock.now + timedelta(days=3))
        assert issued.record.status(clock.now) is ApiKeyStatus.EXPIRING  # within 7 days
        clock.advance(timedelta(days=3) - timedelta(seconds=1))
        assert await store.verify(issued.key) == issued.record
        clock.advance(timedelta(seconds=1))
        assert await store.verify(issued.key) is None
        assert issued.record.status(clock.now) is ApiKeyStatus.EXPIRED

    # -- rotate -------------------------------------------------------------------------

    async def test_rotation_keeps_the_old_key_for_the_grace_period_only(
        self, store: ApiKeyStore, clock: ManualClock
    ) -> None:
        old = await store.create("contoso", "svc", roles=["Lamina.User"], groups=["finance"])
        clock.advance(timedelta(days=1))
        new = await store.rotate(old.record.key_id, timedelta(hours=24))
        assert new.key != old.key
        assert KEY_SHAPE.fullmatch(new.key)
        assert (new.record.name, new.record.tenant_id) == ("svc", "contoso")
        assert (new.record.roles, new.record.groups) == (old.record.roles, old.record.groups)
        assert new.record.rotated_from == old.record.key_id
        assert new.record.created_at == clock.now
        retired = await store.get(old.record.key_id)
        assert retired is not None
        assert retired.replaced_by == new.record.key_id
        assert retired.expires_at == clock.now + timedelta(hours=24)
        assert retired.status(clock.now) is ApiKeyStatus.EXPIRING

        clock.advance(timedelta(hours=24) - timedelta(seconds=1))
        assert await store.verify(old.key) is not None
        assert await store.verify(new.key) == new.record
        clock.advance(timedelta(seconds=1))
        assert await store.verify(old.key) is None
        assert await store.verify(new.key) == new.record

    async def test_rotation_without_grace_revokes_the_old_key_at_once(
        self, store: ApiKeyStore, clock: ManualClock
    ) -> None:
        old = await store.create("contoso", "svc")
        new = await store.rotate(old.record.key_id, timedelta(0))
        assert await store.verify(old.key) is None
        assert await store.verify(new.key) == new.record
        retired = await store.get(old.record.key_id)
        assert retired is not None
        assert retired.status(clock.now) is ApiKeyStatus.REVOKED

    async def test_rotation_carries_the_lifetime_over_and_never_extends_the_old_key(
        self, store: ApiKeyStore, clock: ManualClock
    ) -> None:
        old = await store.create("contoso", "svc", expires_at=clock.now + timedelta(days=90))
        clock.advance(timedelta(days=89, hours=12))
        new = await store.rotate(old.record.key_id, timedelta(days=2))
        assert new.record.expires_at == clock.now + timedelta(days=90)
        retired = await store.get(old.record.key_id)
        assert retired is not None
        assert retired.expires_at == old.record.expires_at  # 12 hours left, not 2 days

    async def test_only_an_active_key_can_be_rotated(
        self, store: ApiKeyStore, clock: ManualClock
    ) -> None:
        with pytest.raises(UnknownApiKey, match="aaaaaaaaaaaa"):
            await store.rotate("aaaaaaaaaaaa", timedelta(hours=1))
        revoked = await store.create("contoso", "revoked")
        await store.revoke(revoked.record.key_id)
        with pytest.raises(ApiKeyNotActive, match="revoked"):
            await store.rotate(revoked.record.key_id, timedelta(hours=1))
        rotated = await store.create("contoso", "rotated")
        successor = await store.rotate(rotated.record.key_id, timedelta(hours=1))
        with pytest.raises(ApiKeyNotActive, match=successor.record.key_id):
            await store.rotate(rotated.record.key_id, timedelta(hours=1))
        expiring = await store.create("contoso", "short", expires_at=clock.now + timedelta(hours=1))
        clock.advance(timedelta(hours=1))
        with pytest.raises(ApiKeyNotActive, match="expired"):
            await store.rotate(expiring.record.key_id, timedelta(hours=1))
        with pytest.raises(ValueError, match="negative"):
            await store.rotate(successor.record.key_id, timedelta(seconds=-1))
        assert len(await store.list_keys("contoso")) == 4  # nothing half-made

    async def test_two_writers_cannot_both_rotate_one_key(
        self, store: ApiKeyStore, second_store: ApiKeyStore
    ) -> None:
        old = await store.create("contoso", "svc")
        results = await asyncio.gather(
            store.rotate(old.record.key_id, timedelta(hours=1)),
            second_store.rotate(old.record.key_id, timedelta(hours=1)),
            return_exceptions=True,
        )
        assert sorted(type(r).__name__ for r in results) == ["ApiKeyNotActive", "IssuedApiKey"]
        assert len(await store.list_keys("contoso")) == 2

    # -- replicas -----------------------------------------------------------------------

    async def test_another_instance_sees_creation_revocation_and_rotation(
        self, store: ApiKeyStore, second_store: ApiKeyStore
    ) -> None:
        issued = await store.create("contoso", "svc")
        assert await second_store.verify(issued.key) == issued.record
        rotated = await second_store.rotate(issued.record.key_id, timedelta(0))
        assert await store.verify(issued.key) is None
        assert await store.verify(rotated.key) == rotated.record
        await store.revoke(rotated.record.key_id)
        assert await second_store.verify(rotated.key) is None

    # -- the authenticator ----------------------------------------------------------------

    async def test_the_authenticator_gives_the_service_client_principal(
        self, store: ApiKeyStore
    ) -> None:
        issued = await store.create(
            "contoso", "billing-svc", roles=["Lamina.User"], groups=["finance"]
        )
        authenticator = ApiKeyAuthenticator(store)
        expected = Principal(
            tenant_id="contoso",
            user_id="key:billing-svc",
            groups=frozenset({"finance"}),
            roles=frozenset({"Lamina.User"}),
            name="billing-svc",
            scopes=frozenset(),
            auth_method="api_key",
        )
        assert await authenticator.authenticate(issued.key) == expected
        assert await authenticator.authenticate(f" {issued.key} ") == expected
        # Quotas and usage follow the client, not the key: the same principal after rotation.
        rotated = await store.rotate(issued.record.key_id, timedelta(0))
        assert await authenticator.authenticate(rotated.key) == expected
        assert await authenticator.authenticate(issued.key) is None
        assert await authenticator.authenticate("eyJhbGciOiJSUzI1NiJ9.e30.sig") is None
        assert looks_like_api_key(rotated.key)
        assert not looks_like_api_key("eyJhbGciOiJSUzI1NiJ9.e30.sig")


class TestSqliteApiKeyStore(ApiKeyStoreContract):
    @pytest.fixture
    async def store(self, tmp_path: Path, clock: ManualClock) -> AsyncIterator[SqliteApiKeyStore]:
        store = SqliteApiKeyStore(tmp_path / "api_keys.db", clock=clock)
        await store.open()
        yield store
        await store.aclose()

    @pytest.fixture
    async def second_store(
        self, tmp_path: Path, clock: ManualClock
    ) -> AsyncIterator[SqliteApiKeyStore]:
        store = SqliteApiKeyStore(tmp_path / "api_keys.db", clock=clock)
        await store.open()
        yield store
        await store.aclose()

    @pytest.fixture
    def raw_storage(self, tmp_path: Path) -> RawStorage:
        path = tmp_path / "api_keys.db"

        async def read() -> str:
            async with aiosqlite.connect(path) as db:
                rows = await (await db.execute("SELECT * FROM api_keys")).fetchall()
            # The files' bytes too (database and write-ahead log): nothing may hold a key.
            files = (path, path.with_name(path.name + "-wal"))
            contents = await asyncio.gather(*(asyncio.to_thread(_bytes_of, p) for p in files))
            return repr(rows) + "".join(c.decode("latin-1") for c in contents)

        return read


def _bytes_of(path: Path) -> bytes:
    return path.read_bytes() if path.exists() else b""


class TestRedisApiKeyStore(ApiKeyStoreContract):
    @pytest.fixture
    def store(self, redis: Redis, prefix: str, clock: ManualClock) -> RedisApiKeyStore:
        return RedisApiKeyStore(redis, prefix=prefix, clock=clock)

    @pytest.fixture
    async def second_store(
        self, redis_server: RedisServer, prefix: str, clock: ManualClock
    ) -> AsyncIterator[RedisApiKeyStore]:
        client = redis_client(redis_server.url, connect_timeout_s=2.0, command_timeout_s=2.0)
        yield RedisApiKeyStore(client, prefix=prefix, clock=clock)
        await client.aclose()

    @pytest.fixture
    def raw_storage(self, redis: Redis, prefix: str) -> RawStorage:
        async def read() -> str:
            dump: list[object] = []
            async for name in redis.scan_iter(match=f"{prefix}*"):
                kind = (await redis.type(name)).decode()
                value = await redis.hgetall(name) if kind == "hash" else await redis.smembers(name)
                dump.append((name, value))
            return repr(dump)

        return read


# --- backend specifics ------------------------------------------------------------------


async def test_sqlite_store_that_cannot_open_says_where(tmp_path: Path) -> None:
    (tmp_path / "not-a-dir").write_text("a file where the data directory should be")
    store = SqliteApiKeyStore(tmp_path / "not-a-dir" / "api_keys.db")
    with pytest.raises(KeyStoreUnavailable, match="not-a-dir"):
        await store.open()


async def test_a_damaged_record_fails_closed(tmp_path: Path) -> None:
    store = SqliteApiKeyStore(tmp_path / "api_keys.db")
    await store.open()
    try:
        issued = await store.create("contoso", "svc")
        async with aiosqlite.connect(tmp_path / "api_keys.db") as db:
            await db.execute("UPDATE api_keys SET created_at = 'yesterday'")
            await db.commit()
        with pytest.raises(KeyStoreUnavailable, match="damaged"):
            await store.verify(issued.key)
    finally:
        await store.aclose()


async def test_redis_outage_denies_with_key_store_unavailable_not_a_refusal() -> None:
    with RedisServer() as server:
        client = redis_client(server.url, connect_timeout_s=0.5, command_timeout_s=0.5)
        try:
            store = RedisApiKeyStore(client)
            issued = await store.create("contoso", "svc")
            authenticator = ApiKeyAuthenticator(store)
            assert await authenticator.authenticate(issued.key) is not None
            server.stop()
            with pytest.raises(KeyStoreUnavailable, match="unreachable"):
                await authenticator.authenticate(issued.key)
            with pytest.raises(KeyStoreUnavailable):
                await store.create("contoso", "other")
            with pytest.raises(KeyStoreUnavailable):
                await store.rotate(issued.record.key_id, timedelta(0))
            with pytest.raises(KeyStoreUnavailable):
                await store.list_keys()
            # Malformed text is refused without asking the store, outage or not.
            assert await store.verify("not a key") is None
        finally:
            await client.aclose()


# --- opening the configured store -------------------------------------------------------


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)  # no stray .env
    for name in list(os.environ):
        if name.startswith("LAMINA_"):
            monkeypatch.delenv(name)


@pytest.mark.usefixtures("clean_env")
async def test_open_uses_sqlite_in_the_data_dir_without_redis(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    async with AsyncExitStack() as stack:
        store = await open_api_key_store(load_settings(data_dir=data_dir), stack)
        assert isinstance(store, SqliteApiKeyStore)
        issued = await store.create("contoso", "svc")
    assert (data_dir / "api_keys.db").exists()
    async with AsyncExitStack() as stack:  # a later process (the server) sees the key
        store = await open_api_key_store(load_settings(data_dir=data_dir), stack)
        assert await store.verify(issued.key) == issued.record


@pytest.mark.usefixtures("clean_env")
async def test_open_with_redis_configured_never_falls_back_to_the_local_file(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "data"
    settings = load_settings(data_dir=data_dir, redis={"url": "redis://127.0.0.1:1/0"})
    async with AsyncExitStack() as stack:
        down = await open_api_key_store(settings, stack)  # opening does not need Redis
        assert isinstance(down, RedisApiKeyStore)
        with pytest.raises(KeyStoreUnavailable):
            await down.verify("lam_aaaaaaaaaaaa_" + "A" * 43)
    assert not (data_dir / "api_keys.db").exists()


# --- durations --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("90d", timedelta(days=90)),
        ("24h", timedelta(hours=24)),
        ("30m", timedelta(minutes=30)),
        ("45s", timedelta(seconds=45)),
        ("2w", timedelta(weeks=2)),
        (" 0 ", timedelta(0)),
        ("0h", timedelta(0)),
    ],
)
def test_durations(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["", "d", "90", "1.5h", "-1d", "3y", "90 d", "999999999w"])
def test_bad_durations_say_what_is_accepted(text: str) -> None:
    with pytest.raises(ValueError, match=r"90d|too long"):
        parse_duration(text)


# --- lamina keys, as a real process -------------------------------------------------------


def keys_env(data_dir: Path, **more: str) -> dict[str, str]:
    # A wide terminal, so that rich does not fold the table's cells.
    return lamina_env(LAMINA_DATA_DIR=str(data_dir), COLUMNS="200", **more)


def created_key(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    key = result.stdout.strip()
    assert KEY_SHAPE.fullmatch(key), result.stdout  # stdout holds the key and nothing else
    return key


async def verify_in(data_dir: Path, key: str) -> ApiKey | None:
    store = SqliteApiKeyStore(data_dir / "api_keys.db")
    await store.open()
    try:
        return await store.verify(key)
    finally:
        await store.aclose()


@pytest.mark.slow
async def test_cli_create_list_revoke(tmp_path: Path) -> None:
    env = keys_env(tmp_path)
    created = run_lamina(
        "keys", "create", "--tenant", "contoso", "--name", "billing-svc",
        "--role", "Lamina.User", "--group", "finance", "--group", "audit",
        "--expires", "90d",
        env=env,
    )  # fmt: skip
    key = created_key(created)
    key_id = key.split("_")[1]
    assert key_id in created.stderr
    assert "shown only this once" in created.stderr
    record = await verify_in(tmp_path, key)
    assert record is not None
    assert (record.tenant_id, record.name) == ("contoso", "billing-svc")
    assert record.groups == {"finance", "audit"} and record.roles == {"Lamina.User"}
    assert record.expires_at is not None

    listed = run_lamina("keys", "list", env=env)
    assert listed.returncode == 0, listed.stderr
    row = next(line for line in listed.stdout.splitlines() if key_id in line)
    assert "billing-svc" in row and "contoso" in row and "active" in row
    secret = key.split("_", 2)[2]
    assert secret not in listed.stdout
    assert hashlib.sha256(key.encode()).hexdigest() not in listed.stdout

    revoked = run_lamina("keys", "revoke", key_id, env=env)
    assert revoked.returncode == 0, revoked.stderr
    assert "Revoked" in revoked.stdout
    listed = run_lamina("keys", "list", "--tenant", "contoso", env=env)
    row = next(line for line in listed.stdout.splitlines() if key_id in line)
    assert "revoked" in row
    assert await verify_in(tmp_path, key) is None


@pytest.mark.slow
async def test_cli_rotate_prints_a_new_key_and_keeps_the_old_one_for_the_grace(
    tmp_path: Path,
) -> None:
    env = keys_env(tmp_path)
    old = created_key(run_lamina("keys", "create", "--tenant", "t", "--name", "svc", env=env))
    rotated = run_lamina("keys", "rotate", old.split("_")[1], "--grace", "1h", env=env)
    new = created_key(rotated)
    assert new != old
    assert "keeps working until" in rotated.stderr
    assert await verify_in(tmp_path, old) is not None
    assert await verify_in(tmp_path, new) is not None

    again = run_lamina("keys", "rotate", new.split("_")[1], "--grace", "0", env=env)
    newest = created_key(again)
    assert "revoked now" in again.stderr
    assert await verify_in(tmp_path, new) is None
    assert await verify_in(tmp_path, newest) is not None


@pytest.mark.slow
def test_cli_unknown_key_and_bad_input_exit_codes(tmp_path: Path) -> None:
    env = keys_env(tmp_path)
    for command in (("revoke", "nosuchkey123"), ("rotate", "nosuchkey123")):
        result = run_lamina("keys", *command, env=env)
        assert result.returncode == 1, result.stderr
        assert "nosuchkey123" in result.stderr
        assert "lamina keys list" in result.stderr
    bad = run_lamina("keys", "create", "--tenant", "t", "--name", "s", "--expires", "3y", env=env)
    assert bad.returncode == 2
    assert "90d" in bad.stderr
    created_key(run_lamina("keys", "create", "--tenant", "t", "--name", "s", env=env))
    duplicate = run_lamina("keys", "create", "--tenant", "t", "--name", "s", env=env)
    assert duplicate.returncode == 1
    assert "already has an active key" in duplicate.stderr
    assert duplicate.stdout == ""


@pytest.mark.slow
async def test_cli_uses_redis_when_configured(
    tmp_path: Path, redis_server: RedisServer, redis: Redis
) -> None:
    env = keys_env(tmp_path, LAMINA_REDIS__URL=redis_server.url)
    key = created_key(run_lamina("keys", "create", "--tenant", "t", "--name", "redis-svc", env=env))
    assert await RedisApiKeyStore(redis).verify(key) is not None
    assert not (tmp_path / "api_keys.db").exists()


@pytest.mark.slow
def test_cli_with_redis_down_exits_3_and_falls_back_to_nothing(tmp_path: Path) -> None:
    env = keys_env(tmp_path, LAMINA_REDIS__URL=f"redis://127.0.0.1:{free_port()}/0")
    result = run_lamina("keys", "create", "--tenant", "t", "--name", "svc", env=env)
    assert result.returncode == 3
    assert "unreachable" in result.stderr
    assert result.stdout == ""
    assert not (tmp_path / "api_keys.db").exists()
