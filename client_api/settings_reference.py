"""The configuration reference (``docs/configuration.md``), generated from the settings
classes so that it cannot drift from them.

    python -m client_api.settings_reference > docs/configuration.md

(or ``lamina config --markdown``). ``tests/client_api/test_configuration_doc.py`` fails,
naming this command, when the committed page differs from what the classes say.
"""

from __future__ import annotations

import re
import sys
import typing
from collections.abc import Iterator

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from client_api.settings import (
    ENV_NESTING,
    ENV_PREFIX,
    LaminaSettings,
    describe_settings,
    env_name,
)

COMMAND = "python -m client_api.settings_reference > docs/configuration.md"

_INTRO = f"""\
# Configuration reference

<!-- Generated from the settings classes by `{COMMAND}`. Do not edit by hand. -->

Lamina reads its settings from environment variables and from a `.env` file in the
working directory. Every variable starts with `{ENV_PREFIX}`; nested settings join their
names with `{ENV_NESTING}` (`LAMINA_INFERENCING__RETRY__MAX_ATTEMPTS`). Lists and objects
are given as JSON (`LAMINA_TOOLS__ENABLED='["directory"]'`). An empty default means the
setting is unset. A value that does not fit stops start-up with a message naming the
variable and what it expects. `lamina config` prints the same table in a terminal.

How these settings map to an Azure deployment: [deployment.md](deployment.md); which of
them decide where shared state lives: [scaling.md](scaling.md).
"""


def render_markdown() -> str:
    """The whole reference page, one section per settings class."""
    rows = describe_settings()
    sections = [(name, info.annotation) for name, info in LaminaSettings.model_fields.items()]
    parts = [_INTRO, "## General\n", _table(r for r in rows if _section_of(r[0]) is None)]
    for name, annotation in sections:
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            continue
        prefix = env_name((name,)) + ENV_NESTING
        parts.append(f"## `{prefix}*`\n")
        summary = _summary(annotation)
        if summary:
            parts.append(summary + "\n")
        parts.append(_table(r for r in rows if r[0].startswith(prefix)))
        for location, entry in _entry_models(annotation, (name,)):
            parts.append(f"### Each entry of `{env_name(location)}`\n")
            summary = _summary(entry)
            if summary:
                parts.append(summary + "\n")
            parts.append(_entry_table(entry))
    return "\n".join(parts)


def _section_of(variable: str) -> str | None:
    rest = variable.removeprefix(ENV_PREFIX)
    return rest.split(ENV_NESTING, 1)[0] if ENV_NESTING in rest else None


def _summary(model: type[BaseModel]) -> str:
    """The class docstring's first paragraph, in Markdown: the meaning of the section.
    Pydantic gives a class without a docstring BaseModel's own, which says nothing here."""
    doc = model.__doc__ if "__doc__" in vars(model) else None
    if not doc:
        return ""
    first = doc.strip().split("\n\n", 1)[0]
    return re.sub(r"``(.+?)``", r"`\1`", " ".join(first.split()))


def _entry_models(
    model: type[BaseModel], location: tuple[str, ...]
) -> Iterator[tuple[tuple[str, ...], type[BaseModel]]]:
    """Settings that are lists or maps of objects (a model registry, MCP servers, ...),
    whose entries have fields of their own to document."""
    for name, info in model.model_fields.items():
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from _entry_models(annotation, (*location, name))
            continue
        for argument in _flatten(annotation):
            if isinstance(argument, type) and issubclass(argument, BaseModel):
                yield (*location, name), argument


def _flatten(annotation: object) -> Iterator[object]:
    for argument in typing.get_args(annotation):
        yield argument
        yield from _flatten(argument)


def _table(rows: typing.Iterable[tuple[str, str, str]]) -> str:
    lines = ["| variable | default | meaning |", "|---|---|---|"]
    for variable, default, meaning in rows:
        shown = f"`{_cell(default)}`" if default else ""
        lines.append(f"| `{variable}` | {shown} | {_prose(meaning)} |")
    return "\n".join(lines) + "\n"


def _entry_table(model: type[BaseModel]) -> str:
    lines = ["| field | default | meaning |", "|---|---|---|"]
    for name, info in model.model_fields.items():
        if info.is_required():
            shown = "required"
        else:
            default = info.get_default(call_default_factory=True)
            shown = (
                ""
                if default is None or default is PydanticUndefined
                else f"`{_cell(str(default))}`"
            )
        lines.append(f"| `{name}` | {shown} | {_prose(info.description or '')} |")
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    # A pipe would end the cell; a line break would end the row.
    return " ".join(text.split()).replace("|", "\\|")


def _prose(text: str) -> str:
    # Outside code spans, "<tenant>" would be read as an HTML tag and vanish.
    return _cell(text).replace("<", "&lt;")


def main() -> None:
    sys.stdout.write(render_markdown())


if __name__ == "__main__":
    main()
