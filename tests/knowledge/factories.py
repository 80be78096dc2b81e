"""Small builders shared by the knowledge-layer tests."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from knowledge.contracts import AccessControl, AccessFilter, Chunk


@dataclass(frozen=True)
class Caller:
    """A minimal ``KnowledgeCaller``."""

    tenant_id: str
    user_id: str
    groups: frozenset[str] = field(default_factory=frozenset)

    @property
    def access(self) -> AccessFilter:
        return AccessFilter.for_caller(self)


def access(
    tenant: str = "contoso",
    *,
    public: bool = False,
    users: Iterable[str] = (),
    groups: Iterable[str] = (),
) -> AccessControl:
    return AccessControl(tenant, public=public, users=frozenset(users), groups=frozenset(groups))


def caller_filter(tenant: str, user: str, *groups: str) -> AccessFilter:
    return AccessFilter(tenant_id=tenant, user_id=user, groups=frozenset(groups))


def make_chunks(
    document_id: str,
    *texts: str,
    acl: AccessControl,
    title: str = "Untitled",
    page: int | None = None,
    section: str | None = None,
) -> list[Chunk]:
    """One chunk per text, ids ``<document_id>-<ordinal>``, all with access ``acl``."""
    return [
        Chunk(
            chunk_id=f"{document_id}-{ordinal}",
            document_id=document_id,
            source=f"{document_id}.md",
            title=title,
            text=text,
            ordinal=ordinal,
            access=acl,
            page=page,
            section=section,
        )
        for ordinal, text in enumerate(texts)
    ]
