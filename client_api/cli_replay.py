"""``lamina replay``: answer a stored turn again from the sources it recorded, with the
answer prompt version it recorded, through today's model route, and compare the answers.

The sources are fetched again as the turn's owner may see them now (``--tenant``,
``--user``, ``--groups``): a passage that is gone, or that the owner may no longer read,
is listed as missing and left out. A drop in the similarity figure after a model or index
change shows the answer drifted.

The command line has no signed-in identity to resolve the owner's groups from, so
``--groups`` is trusted as given: pass the owner's current groups, or the replay reads as
someone the owner is not. The ``chat.replay`` audit record names the operator who ran it
(``cli:<login>``) and the owner, under a correlation id of its own.
"""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from collections import Counter
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from client_api.audit_events import operator
from client_api.settings import LaminaSettings, SettingsError, load_settings
from intelligence.contracts import Citation, IntelligenceError, Principal, ReplayedTurn

console = Console()
errors = Console(stderr=True)

NOT_REPLAYED = 1
"""Exit code when the turn cannot be replayed (no such finished turn, its prompt version
is gone, or the model failed)."""

_WORD = re.compile(r"\w+")


def token_f1(first: str, second: str) -> float:
    """Word-overlap F1 of two answers (lower-cased words, as a bag): 1.0 for the same
    words, 0.0 for none in common. Citation markers count as words, so a changed source
    shows too."""
    a = Counter(_WORD.findall(first.lower()))
    b = Counter(_WORD.findall(second.lower()))
    if not a and not b:
        return 1.0
    common = sum((a & b).values())
    if common == 0:
        return 0.0
    precision, recall = common / sum(b.values()), common / sum(a.values())
    return round(2 * precision * recall / (precision + recall), 4)


def as_json(replayed: ReplayedTurn) -> dict[str, Any]:
    """The comparison, with stable keys, for scripts."""
    original = replayed.original
    call = replayed.model_call
    return {
        "conversation_id": original.conversation_id,
        "turn_id": original.turn_id,
        "question": original.question,
        "prompt": original.prompts.get("answer"),
        "original": {
            "answer": replayed.original_answer,
            "citations": [_citation(c) for c in replayed.original_citations],
        },
        "replayed": {
            "answer": replayed.answer,
            "citations": [_citation(c) for c in replayed.citations],
            "deployment": call.deployment if call else None,
            "model": call.model if call else None,
            "model_version": call.model_version if call else None,
        },
        "missing_sources": list(replayed.missing_sources),
        "similarity": token_f1(replayed.original_answer, replayed.answer),
    }


def _citation(citation: Citation) -> dict[str, Any]:
    return {
        "ref": citation.ref,
        "chunk_id": citation.chunk_id,
        "title": citation.title,
        "source": citation.source,
    }


def _print(report: dict[str, Any]) -> None:
    console.print(f"[bold]Question[/bold] {escape(report['question'])}")
    console.print(f"[dim]answer prompt {report['prompt']}[/dim]\n")
    replayed = report["replayed"]
    model = " ".join(
        str(part) for part in (replayed["model"], replayed["model_version"]) if part is not None
    )
    answers = (("Original answer", report["original"]), (f"Replayed ({model})", replayed))
    for title, answer in answers:
        console.print(f"[bold]{escape(title)}[/bold]")
        console.print(escape(answer["answer"]) or "[dim](empty)[/dim]", soft_wrap=True)
        for c in answer["citations"]:
            where = f"{escape(c['title'])} — {escape(c['source'])}"
            console.print(f"  [cyan]\\[{c['ref']}][/cyan] {where}")
        console.print()
    if report["missing_sources"]:
        console.print(
            "[yellow]Missing sources[/yellow] (gone, or no longer visible to this user): "
            + ", ".join(report["missing_sources"])
        )
    console.print(f"[bold]Similarity[/bold] (token F1): {report['similarity']:.2f}")


async def _replay(
    settings: LaminaSettings, conversation_id: str, turn_id: str, principal: Principal
) -> ReplayedTurn:
    from client_api.composition import build_services

    services = await build_services(settings)
    try:
        return await services.assistant.replay(
            principal, conversation_id, turn_id, actor=operator(), correlation_id=uuid.uuid4().hex
        )
    finally:
        await services.aclose()


def replay(
    conversation_id: Annotated[str, typer.Argument(help="The conversation's id")],
    turn_id: Annotated[str, typer.Argument(help="The answer's message id")],
    user: Annotated[str, typer.Option(help="The conversation's owner (user id)")],
    tenant: Annotated[str, typer.Option(help="The owner's tenant")],
    groups: Annotated[
        str,
        typer.Option(
            help="The owner's current groups, comma-separated: trusted as given (nothing "
            "checks them), they decide which sources the replay may read"
        ),
    ] = "",
    as_json_output: Annotated[
        bool, typer.Option("--json", help="Print a JSON object (stable keys) for scripts")
    ] = False,
) -> None:
    """Replay a stored answer against the same sources and compare the two answers.

    The sources are read as the owner with the groups you pass, which nothing
    checks: give the owner's current groups (--groups is trusted as given).
    The replay is audited (chat.replay) with your login as the actor.
    """
    try:
        settings = load_settings()
    except SettingsError as exc:
        errors.print(f"[red]{escape(str(exc))}[/red]")
        raise typer.Exit(2) from None
    principal = Principal(
        tenant_id=tenant,
        user_id=user,
        groups=frozenset(g.strip() for g in groups.split(",") if g.strip()),
    )
    try:
        replayed = asyncio.run(_replay(settings, conversation_id, turn_id, principal))
    except IntelligenceError as exc:
        errors.print(f"[red]Not replayed: {escape(exc.message)}[/red]")
        raise typer.Exit(NOT_REPLAYED) from None
    report = as_json(replayed)
    if as_json_output:
        typer.echo(json.dumps(report, indent=2))
    else:
        _print(report)
