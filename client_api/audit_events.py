"""Audit records of what people do at the edge: API keys managed by an operator, documents
uploaded for ingestion, jobs cancelled, conversations deleted.

A record is appended after the action succeeded, and a failing audit log is not hidden:
the caller sees the error, so an action that could not be recorded does not pass as an
ordinary success. Never a secret: a key's id, never its text.
"""

from __future__ import annotations

import getpass
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from asgi_correlation_id import correlation_id

from intelligence.contracts import AuditLog, AuditRecord, Principal


async def record_action(
    audit: AuditLog, event: str, principal: Principal, data: Mapping[str, Any]
) -> None:
    """Record what a caller of the API did, with the request's correlation id."""
    await record_operator_action(
        audit, event, tenant_id=principal.tenant_id, user_id=principal.user_id, data=data
    )


async def record_operator_action(
    audit: AuditLog, event: str, *, tenant_id: str, user_id: str, data: Mapping[str, Any]
) -> None:
    """Record an action in ``tenant_id`` by ``user_id`` (a caller, or :func:`operator`)."""
    await audit.append(
        AuditRecord(
            event=event,
            tenant_id=tenant_id,
            user_id=user_id,
            correlation_id=correlation_id.get(),
            data=dict(data),
            at=datetime.now(UTC),
        )
    )


def operator() -> str:
    """Who runs a ``lamina`` command, as the audit log names them: ``cli:<login>``. The
    command line has no signed-in identity; the operating-system account is what is
    known (``cli:unknown`` where it has no name, as in some containers)."""
    try:
        login = getpass.getuser()
    except (KeyError, OSError):
        login = "unknown"
    return f"cli:{login}"
