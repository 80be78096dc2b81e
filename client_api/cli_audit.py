"""``lamina audit``: list the audit log's entries and verify its hash chains, across every
tenant, for operators (auditors of one tenant use ``GET /v1/audit``)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Coroutine, Sequence
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from client_api.settings import LaminaSettings, SettingsError, load_settings
from intelligence.contracts import AuditEntry, AuditLog, AuditQuery, StoreUnavailable

audit_app = typer.Typer(
    name="audit",
    help="The hash-chained audit log: list its entries, verify its chains. It lives where "
    "LAMINA_AUDIT__* says (default LAMINA_DATA_DIR/audit.db): run these with the server's "
    "settings.",
    no_args_is_help=True,
)
console = Console()
errors = Console(stderr=True)

BROKEN = 1
"""Exit code of ``verify`` when a chain does not check out."""
STORE_DOWN = 3
"""Exit code when the audit log cannot be reached: worth retrying, unlike the others."""


def _settings() -> LaminaSettings:
    try:
        return load_settings()
    except SettingsError as exc:
        errors.print(f"[red]{escape(str(exc))}[/red]")
        raise typer.Exit(2) from None


def _run(work: Coroutine[Any, Any, int]) -> None:
    """Run a command's coroutine and exit with its code."""
    try:
        code = asyncio.run(work)
    except StoreUnavailable as exc:
        errors.print(f"[red]The audit log cannot be reached: {escape(exc.message)}[/red]")
        code = STORE_DOWN
    raise typer.Exit(code)


async def _tenants(log: AuditLog, tenant: str | None) -> list[str]:
    return [tenant] if tenant is not None else await log.tenants()


# --- lamina audit list -----------------------------------------------------------------------


async def _list(
    settings: LaminaSettings, query: AuditQuery, tenant: str | None, limit: int, as_json: bool
) -> int:
    from contextlib import AsyncExitStack

    from client_api.composition import open_audit_log

    shown: list[AuditEntry] = []
    async with AsyncExitStack() as stack:
        log = await open_audit_log(settings, stack)
        for name in await _tenants(log, tenant):
            after = 0
            while len(shown) < limit:
                page = await log.query(
                    dataclasses.replace(
                        query,
                        tenant_id=name,
                        after_seq=after,
                        limit=min(query.limit, limit - len(shown)),
                    )
                )
                shown += page.entries
                if page.next_after_seq is None:
                    break
                after = page.next_after_seq
    if as_json:
        _print_json_lines(shown)
    elif shown:
        for name in dict.fromkeys(e.record.tenant_id for e in shown):
            console.print(_table(name, [e for e in shown if e.record.tenant_id == name]))
    else:
        console.print("No audit entries match.")
    if len(shown) == limit:
        errors.print(
            f"Showing the first {limit} entries; more may match: raise --limit, or narrow "
            "with --since, --event or --user."
        )
    return 0


def _print_json_lines(entries: Sequence[AuditEntry]) -> None:
    from client_api.routes.audit import AuditEntryView

    for entry in entries:
        view = AuditEntryView.of(entry).model_dump(mode="json")
        typer.echo(json.dumps({"tenant_id": entry.record.tenant_id, **view}, ensure_ascii=False))


def _table(tenant: str, entries: Sequence[AuditEntry]) -> Table:
    """One tenant's entries; correlation ids and hashes are in ``--json``."""
    table = Table(title=f"Audit log of tenant {escape(tenant)}")
    for column in ("seq", "at (UTC)", "event", "user"):
        table.add_column(column, no_wrap=True)
    table.add_column("data", overflow="fold")  # a long id is folded, not cut off
    for entry in entries:
        record = entry.record
        table.add_row(
            str(entry.seq),
            f"{record.at:%Y-%m-%d %H:%M:%S}",
            escape(record.event),
            escape(record.user_id),
            escape(json.dumps(dict(record.data), ensure_ascii=False)),
        )
    return table


@audit_app.command("list")
def audit_list(
    tenant: Annotated[str | None, typer.Option(help="Only this tenant (default: all)")] = None,
    event: Annotated[
        str | None, typer.Option(help="An event (chat.turn), or a prefix ending in '.' (tool.)")
    ] = None,
    user: Annotated[str | None, typer.Option(help="Only this user id")] = None,
    correlation_id: Annotated[str | None, typer.Option(help="Only this request")] = None,
    since: Annotated[
        str | None, typer.Option(help="From: 7d, 24h, 30m ago, or an ISO date (UTC if no zone)")
    ] = None,
    until: Annotated[
        str | None, typer.Option(help="Before (exclusive): a span ago, or an ISO date")
    ] = None,
    limit: Annotated[int, typer.Option(min=1, help="Most entries to show")] = 50,
    as_json: Annotated[
        bool, typer.Option("--json", help="JSON lines (with hash and prev_hash), not a table")
    ] = False,
) -> None:
    """Entries in chain order, tenant by tenant."""
    from client_api.routes.audit import MAX_PAGE, audit_query

    try:
        # Each tenant's query is this one with its tenant.
        query = audit_query(
            tenant or "",
            event=event,
            user_id=user,
            correlation_id=correlation_id,
            since=since,
            until=until,
            limit=min(limit, MAX_PAGE),
        )
    except ValueError as exc:
        errors.print(f"[red]{escape(str(exc))}[/red]")
        raise typer.Exit(2) from None
    _run(_list(_settings(), query, tenant, limit, as_json))


# --- lamina audit verify ---------------------------------------------------------------------


async def _verify(settings: LaminaSettings, tenant: str | None) -> int:
    from contextlib import AsyncExitStack

    from client_api.composition import open_audit_log

    async with AsyncExitStack() as stack:
        log = await open_audit_log(settings, stack)
        tenants = await _tenants(log, tenant)
        if not tenants:
            console.print("The audit log has no entries yet.")
            return 0
        broken = 0
        for name in tenants:
            result = await log.verify(name)
            if not result.intact:
                broken += 1
                errors.print(
                    f"[red]{escape(name)}: BROKEN at entry {result.first_bad_seq}: "
                    f"{escape(result.problem or '')}[/red]",
                    soft_wrap=True,
                )
            elif result.entries == 0:
                console.print(f"{escape(name)}: no entries")
            else:
                # The head's hash vouches for the whole chain up to it: kept somewhere else,
                # it exposes even a rewrite of the chain's tail.
                [head] = (
                    await log.query(AuditQuery(name, after_seq=result.entries - 1, limit=1))
                ).entries
                count = "1 entry" if result.entries == 1 else f"{result.entries} entries"
                # Soft wrap: the hash stays on one line, to be copied whole.
                console.print(
                    f"{escape(name)}: {count} intact; head #{head.seq} {head.hash}", soft_wrap=True
                )
    return BROKEN if broken else 0


@audit_app.command("verify")
def audit_verify(
    tenant: Annotated[str | None, typer.Option(help="Only this tenant (default: all)")] = None,
) -> None:
    """Recompute the hash chains; exit 1 naming the first bad entry when one is broken."""
    _run(_verify(_settings(), tenant))
