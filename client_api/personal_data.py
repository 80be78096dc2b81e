"""Holders of personal data kept by lower layers' concrete stores, for
:class:`~intelligence.personal_data.PersonalData` (the composition root lists them)."""

from __future__ import annotations

from typing import Any

from inferencing.gateway.metering import UsageLedger, UsageMeter
from intelligence.contracts import Principal
from intelligence.personal_data import json_ready


class UsageData:
    """What the caller's model calls used, in the usage ledger.

    Erasure keeps the usage, re-attributed to
    :data:`~inferencing.gateway.metering.ERASED_USER`: the tenant's, models' and
    deployments' totals stay right for chargeback, and only the per-person detail goes.
    Through the gateway's meter when there is one, so that records still buffered
    are covered too.
    """

    name = "usage"

    def __init__(self, ledger: UsageLedger, meter: UsageMeter | None = None) -> None:
        self._ledger = ledger
        self._meter = meter

    async def export_user(self, principal: Principal) -> Any:
        source = self._meter or self._ledger
        return json_ready(await source.user_detail(principal.tenant_id, principal.user_id))

    async def erase_user(self, principal: Principal) -> int:
        source = self._meter or self._ledger
        return await source.forget_user(principal.tenant_id, principal.user_id)
