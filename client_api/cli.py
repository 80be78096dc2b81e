"""The ``lamina`` command line: serve, ingest, ask, usage, config, demo, keys, tools, eval,
audit."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Coroutine, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from client_api.cli_audit import audit_app
from client_api.cli_replay import replay
from client_api.evaluation.cli import eval_app
from client_api.settings import LaminaSettings, SettingsError, load_settings

if TYPE_CHECKING:
    from client_api.telemetry import Telemetry
    from tools.listing import ListedTool, ToolCatalog

app = typer.Typer(
    name="lamina",
    help="Lamina: an enterprise assistant backend. Run 'lamina demo' to try it.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = Console()
errors = Console(stderr=True)


def _settings(**overrides: Any) -> LaminaSettings:
    try:
        return load_settings(**overrides)
    except SettingsError as exc:
        errors.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None


def _serve(settings: LaminaSettings) -> None:
    import uvicorn

    from client_api.app import create_app

    try:
        application = create_app(settings)
    except SettingsError as exc:
        errors.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None
    uvicorn.run(
        application,
        host=settings.api.host,
        port=settings.api.port,
        log_level=settings.log_level.lower(),
        # Access lines are logged at INFO: above it, uvicorn would still format each
        # request's client address and path only for the logger to drop them.
        access_log=settings.log_level in ("DEBUG", "INFO"),
    )


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Bind address")] = None,
    port: Annotated[int | None, typer.Option(help="Port (0 picks a free one)")] = None,
) -> None:
    """Run the API server (settings from LAMINA_* variables and .env)."""
    api: dict[str, Any] = {}
    if host is not None:
        api["host"] = host
    if port is not None:
        api["port"] = port
    _serve(_settings(**({"api": api} if api else {})))


async def _ingest(
    settings: LaminaSettings, path: Path, acl: Path | None, *, sync: bool = False
) -> None:
    from contextlib import AsyncExitStack

    from client_api.composition import open_knowledge

    async with AsyncExitStack() as stack:
        index, ingestor, _ = await open_knowledge(settings, stack)
        with Progress(
            TextColumn("[bold]Ingesting[/bold]"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.description}"),
            console=console,
            transient=True,
        ) as progress:
            task = progress.add_task("", total=None)

            def advance(name: str, done: int, total: int) -> None:
                progress.update(task, completed=done, total=total, description=name)

            report = await ingestor.ingest(path, acl_file=acl, progress=advance, sync=sync)
        total_chunks = await index.count_chunks()
    console.print(
        f"Indexed [bold]{report.files_indexed}[/bold] of {report.files_seen} files "
        f"({report.chunks_indexed} chunks; {total_chunks} in the index)."
    )
    summary = Table("files", "count", title="Summary")
    summary.add_row("indexed (new or changed)", str(report.files_indexed))
    summary.add_row("unchanged", str(report.files_unchanged))
    summary.add_row("ACL updated (not re-embedded)", str(report.access_updated))
    if sync:
        summary.add_row("removed (file gone)", str(report.files_removed))
    summary.add_row("skipped", str(len(report.skipped)))
    console.print(summary)
    if report.skipped:
        table = Table("skipped file", "reason", title=f"{len(report.skipped)} skipped")
        for skipped in report.skipped:
            table.add_row(skipped.path, skipped.reason)
        console.print(table)


@app.command()
def ingest(
    path: Annotated[Path, typer.Argument(exists=True, file_okay=False, help="Corpus folder")],
    acl: Annotated[
        Path | None, typer.Option(help="ACL file (default: acl.yaml in the corpus folder)")
    ] = None,
    sync: Annotated[
        bool, typer.Option(help="Also remove indexed documents whose file is gone")
    ] = False,
) -> None:
    """Parse, chunk and index a folder of documents with its access rules.

    Incremental: unchanged files are skipped, ACL-only changes update permissions
    without re-embedding, and an interrupted run is finished by running it again."""
    from knowledge.contracts import KnowledgeError

    try:
        asyncio.run(_ingest(_settings(), path, acl, sync=sync))
    except KnowledgeError as exc:
        errors.print(f"[red]Ingestion failed: {exc}[/red]")
        raise typer.Exit(1) from None


async def _ask(settings: LaminaSettings, question: str, principal: Any) -> int:
    from client_api.composition import build_services
    from intelligence.contracts import (
        AnswerDelta,
        CitationsEvent,
        ErrorEvent,
        PlanEvent,
        StepEvent,
        StepKind,
        TurnRequest,
    )

    services = await build_services(settings)
    try:
        if await services.index.count_chunks() == 0:
            errors.print("The index is empty: run 'lamina ingest PATH' first.")
            return 1
        started = await services.assistant.start_turn(TurnRequest(question), principal)
        async for event in started.events:
            match event:
                case PlanEvent():
                    steps = " → ".join(s.kind.value for s in event.plan.steps)
                    console.print(f"[dim]plan ({event.plan.planner}): {steps}[/dim]")
                case StepEvent(outcome=outcome) if outcome is not None:
                    if event.step.kind is StepKind.ANSWER:
                        console.print()  # end the streamed answer's line
                    else:
                        console.print(f"[dim]  {event.step.kind.value}: {outcome.summary}[/dim]")
                case AnswerDelta():
                    console.print(event.text, end="", soft_wrap=True, highlight=False)
                case CitationsEvent():
                    for c in event.citations:
                        where = f", page {c.page}" if c.page else ""
                        where += f", {c.section}" if c.section else ""
                        console.print(f"[cyan][{c.ref}][/cyan] {c.title} — {c.source}{where}")
                case ErrorEvent():
                    errors.print(f"\n[red]{event.message}[/red]")
                    return 1
        return 0
    finally:
        await services.aclose()


@app.command()
def ask(
    question: Annotated[str, typer.Argument(help="The question")],
    user: Annotated[str, typer.Option(help="Ask as this user id")],
    groups: Annotated[str, typer.Option(help="Comma-separated groups of the user")] = "",
    roles: Annotated[str, typer.Option(help="Comma-separated roles of the user")] = "",
    tenant: Annotated[str, typer.Option(help="Tenant of the user")] = "contoso",
) -> None:
    """Ask a question as a given user, streaming the answer to the terminal."""
    from intelligence.contracts import Principal

    principal = Principal(
        tenant_id=tenant,
        user_id=user,
        groups=frozenset(g.strip() for g in groups.split(",") if g.strip()),
        roles=frozenset(r.strip() for r in roles.split(",") if r.strip()),
    )
    settings = _settings()
    telemetry = _telemetry(settings)
    try:
        code = asyncio.run(_ask(settings, question, principal))
    finally:
        telemetry.flush()
    raise typer.Exit(code)


def _telemetry(settings: LaminaSettings) -> Telemetry:
    """Traces and metrics of a command that runs turns, as the server records them."""
    from client_api.telemetry import configure_telemetry

    try:
        return configure_telemetry(settings.telemetry)
    except SettingsError as exc:
        errors.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None


app.command()(replay)


@app.command()
def config(
    markdown: Annotated[
        bool, typer.Option("--markdown", help="Print the reference page (docs/configuration.md)")
    ] = False,
) -> None:
    """List every setting: environment variable, default and meaning."""
    from client_api.settings import describe_settings

    if markdown:
        from client_api.settings_reference import render_markdown

        sys.stdout.write(render_markdown())
        return
    table = Table("variable", "default", "meaning", title="Lamina settings (also read from .env)")
    for row in describe_settings():
        table.add_row(*row)
    console.print(table)


async def _usage(settings: LaminaSettings, by: str, since: str, tenant: str | None) -> int:
    from contextlib import AsyncExitStack

    from client_api.composition import build_gateway_state
    from inferencing.gateway.metering import GROUPINGS, parse_since

    if by not in GROUPINGS:
        errors.print(f"[red]--by must be one of {', '.join(GROUPINGS)}; got {by!r}[/red]")
        return 2
    try:
        start = parse_since(since)
    except ValueError as exc:
        errors.print(f"[red]{exc}[/red]")
        return 2
    except OverflowError:
        errors.print(f"[red]--since {since!r} reaches past the calendar: give a shorter span[/red]")
        return 2
    async with AsyncExitStack() as stack:
        state = await build_gateway_state(settings, stack)
        stack.push_async_callback(state.ledger.aclose)
        rows = await state.ledger.summarize(by, start, tenant_id=tenant)
    table = Table(
        by,
        "calls",
        "input tokens",
        "output tokens",
        "cost",
        title=f"Model usage since {start:%Y-%m-%d %H:%M} UTC"
        + (f", tenant {tenant}" if tenant else ""),
    )
    for row in rows:
        table.add_row(
            row.key,
            str(row.calls),
            f"{row.input_tokens:,}",
            f"{row.output_tokens:,}",
            f"{row.cost:,.4f}",
        )
    if rows:
        table.add_section()
        table.add_row(
            "total",
            str(sum(r.calls for r in rows)),
            f"{sum(r.input_tokens for r in rows):,}",
            f"{sum(r.output_tokens for r in rows):,}",
            f"{sum(r.cost for r in rows):,.4f}",
        )
    console.print(table)
    return 0


@app.command()
def usage(
    by: Annotated[str, typer.Option(help="tenant, user, model or deployment")] = "tenant",
    since: Annotated[str, typer.Option(help="7d, 24h, 30m, or an ISO date")] = "30d",
    tenant: Annotated[str | None, typer.Option(help="Only this tenant")] = None,
) -> None:
    """Chargeback: tokens and cost of model calls, grouped, from the usage ledger."""
    raise typer.Exit(asyncio.run(_usage(_settings(), by, since, tenant)))


@app.command()
def demo(
    port: Annotated[int, typer.Option(help="Port to serve on")] = 8000,
) -> None:
    """Ingest the bundled sample corpus and serve it on 127.0.0.1 in dev auth mode."""
    from client_api.composition import sample_corpus

    data_dir = Path(os.environ.get("LAMINA_DATA_DIR", ".lamina/demo"))
    settings = _settings(
        data_dir=data_dir, auth={"mode": "dev"}, api={"host": "127.0.0.1", "port": port}
    )
    asyncio.run(_ingest(settings, sample_corpus(), None))
    base = f"http://127.0.0.1:{port}"
    console.print(
        f"\n[bold green]Lamina demo[/bold green] on {base}  (API docs: {base}/docs)\n"
        "Dev auth: identity comes from X-Lamina-User / X-Lamina-Groups headers.\n"
        "Try, as an engineer and then as someone in finance:\n"
        f"  curl -s {base}/v1/chat -H 'X-Lamina-User: dana' -H 'X-Lamina-Groups: engineering' "
        "-H 'Content-Type: application/json' -d '{\"message\": \"What is the budget of Project "
        "Falcon?\"}'\n"
        f"  curl -N {base}/v1/chat/stream -H 'X-Lamina-User: fin' -H 'X-Lamina-Groups: finance' "
        "-H 'Content-Type: application/json' -d '{\"message\": \"What is the budget of Project "
        "Falcon?\"}'\n",
        soft_wrap=True,  # keep each command on one line, so it can be copied
    )
    sys.stdout.flush()
    _serve(settings)


# --- lamina keys: API keys of service clients ------------------------------------------------

keys_app = typer.Typer(
    name="keys",
    help="API keys for service clients: create, list, revoke, rotate. Keys live in Redis "
    "when LAMINA_REDIS__URL is set, else in LAMINA_DATA_DIR/api_keys.db: run these with "
    "the server's settings.",
    no_args_is_help=True,
)
app.add_typer(keys_app)

KEY_STORE_DOWN = 3
"""Exit code when the key store cannot answer: unlike 1 (no such key), worth retrying."""


def _when(moment: datetime | None) -> str:
    return "never" if moment is None else f"{moment:%Y-%m-%d %H:%M} UTC"


def _keys_run(work: Coroutine[Any, Any, int]) -> None:
    """Run a ``lamina keys`` coroutine and exit with its code; an unreachable key store
    (or audit log, which records every change) exits with :data:`KEY_STORE_DOWN`."""
    from rich.markup import escape

    from client_api.auth.api_keys import KeyStoreUnavailable
    from intelligence.contracts import StoreUnavailable

    try:
        code = asyncio.run(work)
    except KeyStoreUnavailable as exc:
        errors.print(f"[red]{escape(str(exc))}[/red]")
        code = KEY_STORE_DOWN
    except StoreUnavailable as exc:
        errors.print(f"[red]The audit log cannot be reached: {escape(exc.message)}[/red]")
        code = KEY_STORE_DOWN
    raise typer.Exit(code)


def _show_new_key(key: str) -> None:
    errors.print(
        "[yellow]Store this key now, in a secret store: it is shown only this once "
        "and cannot be recovered.[/yellow]"
    )
    # Alone on stdout, so that `KEY=$(lamina keys create ...)` captures exactly the key.
    typer.echo(key)


async def _keys_create(
    settings: LaminaSettings,
    tenant: str,
    name: str,
    roles: list[str],
    groups: list[str],
    lifetime: timedelta | None,
) -> int:
    from contextlib import AsyncExitStack

    from rich.markup import escape

    from client_api.audit_events import operator, record_operator_action
    from client_api.auth.api_keys import DuplicateApiKeyName, open_api_key_store
    from client_api.composition import open_audit_log

    async with AsyncExitStack() as stack:
        # Opened first: a change that could not be recorded is not made.
        audit = await open_audit_log(settings, stack)
        store = await open_api_key_store(settings, stack)
        try:
            issued = await store.create(
                tenant,
                name,
                roles=roles,
                groups=groups,
                expires_at=None if lifetime is None else datetime.now(UTC) + lifetime,
            )
        except ValueError as exc:
            errors.print(f"[red]{escape(str(exc))}[/red]")
            return 2
        except DuplicateApiKeyName as exc:
            errors.print(f"[red]{escape(str(exc))}[/red]")
            return 1
        record = issued.record
        await record_operator_action(
            audit,
            "admin.key_created",
            tenant_id=record.tenant_id,
            user_id=operator(),
            data={
                "key_id": record.key_id,
                "name": record.name,
                "roles": sorted(record.roles),
                "groups": sorted(record.groups),
                "expires_at": record.expires_at,
            },
        )
        where = store.describe()
    errors.print(
        f"Created API key [bold]{record.key_id}[/bold] ({escape(record.name)}) for tenant "
        f"{escape(record.tenant_id)}; roles: {escape(', '.join(sorted(record.roles)) or '-')}; "
        f"groups: {escape(', '.join(sorted(record.groups)) or '-')}; "
        f"expires: {_when(record.expires_at)}. Stored in {escape(where)}."
    )
    _show_new_key(issued.key)
    return 0


@keys_app.command("create")
def keys_create(
    tenant: Annotated[str, typer.Option(help="Tenant the client acts in")],
    name: Annotated[str, typer.Option(help="Client name; its user id is key:<name>")],
    role: Annotated[list[str] | None, typer.Option(help="App role (repeat for more)")] = None,
    group: Annotated[
        list[str] | None, typer.Option(help="Group, for document access (repeat for more)")
    ] = None,
    expires: Annotated[
        str | None, typer.Option(help="Lifetime such as 90d, 24h or 2w (default: none)")
    ] = None,
) -> None:
    """Create a key and print it, once."""
    from client_api.auth.api_keys import parse_duration

    lifetime: timedelta | None = None
    if expires is not None:
        try:
            lifetime = parse_duration(expires)
        except ValueError as exc:
            errors.print(f"[red]--expires: {exc}[/red]")
            raise typer.Exit(2) from None
    _keys_run(_keys_create(_settings(), tenant, name, role or [], group or [], lifetime))


async def _keys_list(settings: LaminaSettings, tenant: str | None) -> int:
    from contextlib import AsyncExitStack

    from client_api.auth.api_keys import ApiKeyStatus, open_api_key_store

    async with AsyncExitStack() as stack:
        store = await open_api_key_store(settings, stack)
        keys = await store.list_keys(tenant)
        where = store.describe()
    now = datetime.now(UTC)
    colours = {
        ApiKeyStatus.ACTIVE: "green",
        ApiKeyStatus.EXPIRING: "yellow",
        ApiKeyStatus.REVOKED: "red",
        ApiKeyStatus.EXPIRED: "dim",
    }
    table = Table(title=f"API keys in {where}" + (f", tenant {tenant}" if tenant else ""))
    for column in ("id", "name", "tenant", "roles", "groups", "created", "expires", "status"):
        table.add_column(column, no_wrap=column in ("id", "status"))
    for key in keys:
        status = key.status(now)
        shown = status.value
        if key.replaced_by is not None:
            shown += f" (rotated to {key.replaced_by})"
        table.add_row(
            key.key_id,
            key.name,
            key.tenant_id,
            ", ".join(sorted(key.roles)) or "-",
            ", ".join(sorted(key.groups)) or "-",
            _when(key.created_at),
            _when(key.expires_at),
            f"[{colours[status]}]{shown}[/{colours[status]}]",
        )
    console.print(table if keys else f"No API keys in {where}.")
    return 0


@keys_app.command("list")
def keys_list(
    tenant: Annotated[str | None, typer.Option(help="Only this tenant's keys")] = None,
) -> None:
    """List keys with their status (never their secrets)."""
    _keys_run(_keys_list(_settings(), tenant))


async def _keys_revoke(settings: LaminaSettings, key_id: str) -> int:
    from contextlib import AsyncExitStack

    from rich.markup import escape

    from client_api.audit_events import operator, record_operator_action
    from client_api.auth.api_keys import open_api_key_store
    from client_api.composition import open_audit_log

    async with AsyncExitStack() as stack:
        audit = await open_audit_log(settings, stack)
        store = await open_api_key_store(settings, stack)
        before = await store.get(key_id)
        if before is None or not await store.revoke(key_id):
            errors.print(
                f"[red]There is no API key {escape(repr(key_id))} in {escape(store.describe())}"
                "; 'lamina keys list' shows the keys.[/red]"
            )
            return 1
        if before.revoked_at is None:
            await record_operator_action(
                audit,
                "admin.key_revoked",
                tenant_id=before.tenant_id,
                user_id=operator(),
                data={"key_id": key_id, "name": before.name},
            )
    if before.revoked_at is not None:
        console.print(f"API key {key_id} was already revoked on {_when(before.revoked_at)}.")
    else:
        console.print(
            f"Revoked API key {key_id} ({escape(before.name)}, tenant "
            f"{escape(before.tenant_id)}): it is refused from now on."
        )
    return 0


@keys_app.command("revoke")
def keys_revoke(key_id: Annotated[str, typer.Argument(help="The key's id")]) -> None:
    """Revoke a key at once."""
    _keys_run(_keys_revoke(_settings(), key_id))


async def _keys_rotate(settings: LaminaSettings, key_id: str, grace: timedelta) -> int:
    from contextlib import AsyncExitStack

    from rich.markup import escape

    from client_api.audit_events import operator, record_operator_action
    from client_api.auth.api_keys import ApiKeyNotActive, UnknownApiKey, open_api_key_store
    from client_api.composition import open_audit_log

    async with AsyncExitStack() as stack:
        audit = await open_audit_log(settings, stack)
        store = await open_api_key_store(settings, stack)
        try:
            issued = await store.rotate(key_id, grace)
        except (UnknownApiKey, ApiKeyNotActive) as exc:
            errors.print(f"[red]{escape(str(exc))}; 'lamina keys list' shows the keys.[/red]")
            return 1
        old = await store.get(key_id)
        record = issued.record
        await record_operator_action(
            audit,
            "admin.key_rotated",
            tenant_id=record.tenant_id,
            user_id=operator(),
            data={
                "key_id": key_id,
                "new_key_id": record.key_id,
                "name": record.name,
                "grace_s": grace.total_seconds(),
                "old_key_expires_at": None if old is None else old.expires_at,
            },
        )
    until = (
        "was revoked now"
        if old is None or old.revoked_at is not None
        else f"keeps working until {_when(old.expires_at)}"
    )
    errors.print(
        f"Rotated API key {key_id} to [bold]{record.key_id}[/bold] "
        f"({escape(record.name)}, tenant {escape(record.tenant_id)}); the old key {until}. "
        f"The new key expires: {_when(record.expires_at)}."
    )
    _show_new_key(issued.key)
    return 0


@keys_app.command("rotate")
def keys_rotate(
    key_id: Annotated[str, typer.Argument(help="The key's id")],
    grace: Annotated[
        str, typer.Option(help="How long the old key keeps working: 24h, 30m, 0 (none)")
    ] = "24h",
) -> None:
    """Replace a key with a new one (same tenant, name, roles, groups) and print it."""
    from client_api.auth.api_keys import parse_duration

    try:
        period = parse_duration(grace)
    except ValueError as exc:
        errors.print(f"[red]--grace: {exc}[/red]")
        raise typer.Exit(2) from None
    _keys_run(_keys_rotate(_settings(), key_id, period))


# --- lamina audit: the hash-chained audit log (client_api/cli_audit.py) ---------------------

app.add_typer(audit_app)


# --- lamina tools: the tools the assistant may call -------------------------------------------

tools_app = typer.Typer(
    name="tools",
    help="The tools the assistant may call, loaded from the installed plugins exactly as the "
    "server loads them: run these with the server's settings.",
    no_args_is_help=True,
)
app.add_typer(tools_app)


def _names(option: str | None) -> frozenset[str]:
    return frozenset(name.strip() for name in (option or "").split(",") if name.strip())


def _tools_notes(catalog: ToolCatalog) -> list[str]:
    """What the tool table cannot show: skipped plugins, unknown names, unconnected sources."""
    notes: list[str] = []
    for failure in catalog.load_errors:
        package = f" (package {failure.distribution})" if failure.distribution else ""
        notes.append(f"Plugin {failure.entry_point}{package} was skipped: {failure.error}")
    if catalog.not_installed:
        notes.append(
            "LAMINA_TOOLS__ENABLED or LAMINA_TOOLS__TENANTS name tools that are not "
            "installed: " + ", ".join(catalog.not_installed)
        )
    if catalog.connected_sources:
        notes.append(
            "Not listed: the tools of "
            + ", ".join(catalog.connected_sources)
            + " (LAMINA_TOOLS__MCP_SERVERS, LAMINA_TOOLS__OPENAPI), which the server "
            "learns by connecting at start-up; this command does not connect."
        )
    return notes


def _tools_table(listed: Sequence[ListedTool], title: str) -> Table:
    from rich.text import Text

    from tools.listing import who_may_use

    colours = {"read": "green", "write": "yellow", "high": "red"}
    table = Table(title=title)
    table.add_column("name", overflow="fold")
    table.add_column("origin")
    for column in ("risk", "idempotent", "timeout"):
        table.add_column(column, no_wrap=True)
    table.add_column("who may use it")
    table.add_column("description")
    for tool in listed:
        spec = tool.spec
        summary = spec.description.strip().splitlines()
        origin = Text(spec.origin)
        if tool.source is not None:  # the entry point, so a tool can be traced to its package
            origin.append(f"\nplugin {tool.source.entry_point}", style="dim")
        # Text cells: a description's "[...]" is shown as written, not read as markup.
        table.add_row(
            Text(spec.name),
            origin,
            Text(spec.risk.value, style=colours.get(spec.risk.value, "")),
            "yes" if spec.idempotent else "no",
            f"{spec.timeout_s:g} s",
            Text(who_may_use(spec)),
            Text(summary[0] if summary else ""),
        )
    return table


@tools_app.command("list")
def tools_list(
    as_json: Annotated[
        bool, typer.Option("--json", help="Print a JSON list (stable keys) for scripts")
    ] = False,
    strict: Annotated[
        bool,
        typer.Option(
            help="Exit 1 if a plugin failed to load or the settings name a tool that is "
            "not installed"
        ),
    ] = False,
    as_roles: Annotated[
        str | None,
        typer.Option(
            "--as-roles",
            help="Show only what a caller with these comma-separated roles may use "
            "(with --scopes and --tenant; a caller without --scopes has none)",
        ),
    ] = None,
    scopes: Annotated[
        str | None, typer.Option(help="The caller's comma-separated delegated scopes")
    ] = None,
    tenant: Annotated[
        str | None,
        typer.Option(help="The caller's tenant, whose tool settings then apply (default: any)"),
    ] = None,
) -> None:
    """List the installed tools: risk, timeout, and who may use each."""
    import json
    import logging

    from rich.text import Text

    from tools.listing import load_catalog

    # The command reports skipped plugins and unknown tool names itself; the
    # warnings logged about them (with tracebacks) would only repeat that on stderr.
    for logger_name in ("tools.registry", "tools.policy"):
        logging.getLogger(logger_name).setLevel(logging.ERROR)

    catalog = load_catalog(_settings().tools)
    filtered = as_roles is not None or scopes is not None or tenant is not None
    listed = (
        catalog.usable_by(roles=_names(as_roles), scopes=_names(scopes), tenant_id=tenant)
        if filtered
        else catalog.tools
    )
    notes = _tools_notes(catalog)
    if as_json:
        # stdout carries the JSON alone, so a script can parse it.
        typer.echo(json.dumps([tool.as_json() for tool in listed], indent=2))
        for note in notes:
            errors.print(Text(note))
    else:
        title = f"{len(listed)} of {len(catalog.tools)} tools" if filtered else "Tools"
        console.print(_tools_table(listed, title) if listed else "No tools.")
        for note in notes:
            console.print(Text(note))
    failed = bool(catalog.load_errors or catalog.not_installed)
    raise typer.Exit(1 if strict and failed else 0)


# --- lamina eval: answer quality on a question set, through the API ---------------------------

app.add_typer(eval_app)


if __name__ == "__main__":
    app()
