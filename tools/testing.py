"""Test doubles for tool authors and for Lamina's own tests."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class StaticCaller:
    """A fixed :class:`~tools.contracts.ToolCaller`: ``StaticCaller(roles={"employee"})``."""

    tenant_id: str = "contoso"
    user_id: str = "test-user"
    roles: frozenset[str] = field(default=frozenset())
    scopes: frozenset[str] = field(default=frozenset())

    def __init__(
        self,
        tenant_id: str = "contoso",
        user_id: str = "test-user",
        roles: Iterable[str] = (),
        scopes: Iterable[str] = (),
    ) -> None:
        object.__setattr__(self, "tenant_id", tenant_id)
        object.__setattr__(self, "user_id", user_id)
        object.__setattr__(self, "roles", frozenset(roles))
        object.__setattr__(self, "scopes", frozenset(scopes))
