"""The contract every ``UsageLedger`` passes (mix into a test class that provides a
``ledger`` fixture: an opened, empty ledger).

The records fall inside whole UTC hours of the recent past, and ``since`` is always
on the hour: ledgers that keep hourly totals (Redis) count exactly what ledgers that
keep every record count.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from inferencing.gateway.metering import (
    ERASED_USER,
    GROUPINGS,
    GroupBy,
    UsageLedger,
    UsageRecord,
    UsageRow,
    totals,
)

HOUR = timedelta(hours=1)


THIS_HOUR = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
"""Fixed once, so that a test running across the turn of an hour still sees one timeline."""


def hours_ago(n: int) -> datetime:
    """The start of the UTC hour ``n`` hours before this one."""
    return THIS_HOUR - n * HOUR


def usage(
    at: datetime,
    tenant: str = "contoso",
    user: str = "alice",
    *,
    deployment: str = "gpt4o-east",
    model: str = "gpt-4o",
    version: str | None = "2024-08-06",
    tokens: tuple[int, int] = (100, 50),
    cost: float = 0.0125,
) -> UsageRecord:
    return UsageRecord(
        at=at,
        tenant_id=tenant,
        user_id=user,
        deployment=deployment,
        model=model,
        model_version=version,
        prompt_version="answer-v3",
        input_tokens=tokens[0],
        output_tokens=tokens[1],
        cost=cost,
        outcome="ok",
    )


def mini_usage(at: datetime, tenant: str, *, tokens: tuple[int, int], cost: float) -> UsageRecord:
    return usage(
        at, tenant, deployment="mini", model="gpt-4o-mini", version=None, tokens=tokens, cost=cost
    )


def sample() -> list[UsageRecord]:
    """Three hours of traffic: two tenants, four users, three deployments, two models."""
    start = hours_ago(5)
    minutes = timedelta(minutes=1)
    return [
        usage(start + 10 * minutes),
        mini_usage(
            start + 59 * minutes + timedelta(seconds=59.5),
            "contoso",
            tokens=(1000, 200),
            cost=0.00027,
        ),
        usage(start + HOUR + 5 * minutes, user="bob", deployment="gpt4o-west", cost=0.0345),
        usage(start + HOUR + 6 * minutes, user="bob", tokens=(7, 3), cost=0.00000042),
        mini_usage(start + 2 * HOUR + 59 * minutes, "fabrikam", tokens=(10, 10), cost=0.000015),
        usage(start + 2 * HOUR, "fabrikam", "carol", tokens=(2000, 900), cost=0.0211),
    ]


class UsageLedgerContract:
    @pytest.fixture
    def ledger(self) -> UsageLedger:
        """Overridden by each ledger's test class: an opened, empty ledger."""
        raise NotImplementedError("a ledger's test class must provide the ledger fixture")

    async def test_an_empty_ledger_sums_to_nothing(self, ledger: UsageLedger) -> None:
        for by in GROUPINGS:
            assert await ledger.summarize(by, hours_ago(24)) == []
        await ledger.append([])
        assert await ledger.summarize("tenant", hours_ago(24)) == []

    @pytest.mark.parametrize("by", GROUPINGS)
    async def test_totals_by_each_grouping(self, ledger: UsageLedger, by: GroupBy) -> None:
        records = sample()
        await ledger.append(records[:2])
        await ledger.append(records[2:])
        assert await ledger.summarize(by, hours_ago(24)) == totals(records, by)

    async def test_group_keys(self, ledger: UsageLedger) -> None:
        await ledger.append(sample())
        since = hours_ago(24)
        assert {r.key for r in await ledger.summarize("tenant", since)} == {"contoso", "fabrikam"}
        assert {r.key for r in await ledger.summarize("user", since)} == {
            "contoso/alice",
            "contoso/bob",
            "fabrikam/alice",
            "fabrikam/carol",
        }
        assert {r.key for r in await ledger.summarize("model", since)} == {
            "gpt-4o@2024-08-06",
            "gpt-4o-mini",
        }
        assert {r.key for r in await ledger.summarize("deployment", since)} == {
            "gpt4o-east",
            "gpt4o-west",
            "mini",
        }

    async def test_since_keeps_later_hours_only(self, ledger: UsageLedger) -> None:
        records = sample()
        await ledger.append(records)
        since = hours_ago(4)
        later = [r for r in records if r.at >= since]
        assert len(later) == 4
        assert await ledger.summarize("user", since) == totals(later, "user")
        assert await ledger.summarize("user", hours_ago(1)) == []

    async def test_tenant_filter(self, ledger: UsageLedger) -> None:
        records = sample()
        await ledger.append(records)
        fabrikam = [r for r in records if r.tenant_id == "fabrikam"]
        rows = await ledger.summarize("user", hours_ago(24), tenant_id="fabrikam")
        assert rows == totals(fabrikam, "user")
        assert [r.key for r in rows] == ["fabrikam/carol", "fabrikam/alice"]
        assert await ledger.summarize("user", hours_ago(24), tenant_id="nobody") == []
        since = hours_ago(3)
        assert await ledger.summarize("model", since, tenant_id="contoso") == []

    async def test_costs_calls_and_tokens_are_summed(self, ledger: UsageLedger) -> None:
        at = hours_ago(2) + timedelta(minutes=30)
        for cost in (0.0125, 0.00000042, 0.1, 0.2):
            await ledger.append([usage(at, tokens=(10, 1), cost=cost)])
        rows = await ledger.summarize("tenant", hours_ago(3))
        assert rows == [UsageRow("contoso", 4, 40, 4, 0.312500)]

    async def test_costliest_first_then_most_tokens_then_by_key(self, ledger: UsageLedger) -> None:
        at = hours_ago(1) + timedelta(minutes=1)
        await ledger.append(
            [
                usage(at, user="cheap", tokens=(5000, 5000), cost=0.001),
                usage(at, user="pricey", tokens=(1, 1), cost=0.5),
                usage(at, user="tie-b", tokens=(10, 10), cost=0.01),
                usage(at, user="tie-a", tokens=(10, 10), cost=0.01),
                usage(at, user="tie-big", tokens=(100, 10), cost=0.01),
            ]
        )
        rows = await ledger.summarize("user", hours_ago(2))
        assert [r.key.split("/")[1] for r in rows] == [
            "pricey",
            "tie-big",
            "tie-a",
            "tie-b",
            "cheap",
        ]

    # --- a person's usage: export and erasure ---------------------------------------------

    async def test_user_detail_is_the_persons_usage_oldest_first(self, ledger: UsageLedger) -> None:
        records = sample()
        await ledger.append(records)
        bobs = [r for r in records if r.tenant_id == "contoso" and r.user_id == "bob"]

        detail = await ledger.user_detail("contoso", "bob")

        assert [d.at for d in detail] == sorted(d.at for d in detail)
        assert sum(d.calls for d in detail) == len(bobs) == 2
        assert sum(d.input_tokens for d in detail) == sum(r.input_tokens for r in bobs)
        assert sum(d.output_tokens for d in detail) == sum(r.output_tokens for r in bobs)
        assert sum(d.cost for d in detail) == pytest.approx(sum(r.cost for r in bobs))
        assert {d.deployment for d in detail} == {"gpt4o-east", "gpt4o-west"}
        assert all(d.at.hour == hours_ago(4).hour for d in detail)
        assert await ledger.user_detail("fabrikam", "bob") == []

    async def test_forget_user_keeps_every_total_but_the_persons(self, ledger: UsageLedger) -> None:
        records = sample()
        await ledger.append(records)
        since = hours_ago(24)
        before = {by: await ledger.summarize(by, since) for by in ("tenant", "model", "deployment")}

        # contoso/alice made two calls; fabrikam/alice is someone else.
        assert await ledger.forget_user("contoso", "alice") == 2

        for by, rows in before.items():
            assert await ledger.summarize(by, since) == rows
        users = {r.key: r for r in await ledger.summarize("user", since)}
        assert "contoso/alice" not in users
        [alices] = totals(
            [r for r in records if (r.tenant_id, r.user_id) == ("contoso", "alice")], "tenant"
        )
        assert users[f"contoso/{ERASED_USER}"] == replace(alices, key=f"contoso/{ERASED_USER}")
        assert "fabrikam/alice" in users
        assert await ledger.user_detail("contoso", "alice") == []
        assert await ledger.forget_user("contoso", "alice") == 0, "a second erasure finds nothing"

    async def test_forgetting_the_erased_user_changes_nothing(self, ledger: UsageLedger) -> None:
        await ledger.append([usage(hours_ago(1), user="alice")])
        await ledger.forget_user("contoso", "alice")
        assert await ledger.forget_user("contoso", ERASED_USER) == 0
        assert [r.key for r in await ledger.summarize("user", hours_ago(2))] == [
            f"contoso/{ERASED_USER}"
        ]
