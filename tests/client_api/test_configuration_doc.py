"""docs/configuration.md is generated from the settings classes; this fails, with the
command that regenerates it, as soon as a setting changes without the page."""

from __future__ import annotations

import difflib
from pathlib import Path

from typer.testing import CliRunner

from client_api.cli import app
from client_api.settings import describe_settings
from client_api.settings_reference import COMMAND, render_markdown

PAGE = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def test_the_configuration_page_is_up_to_date() -> None:
    expected = render_markdown()
    committed = PAGE.read_text() if PAGE.exists() else ""
    if committed != expected:
        diff = "".join(
            list(
                difflib.unified_diff(
                    committed.splitlines(keepends=True),
                    expected.splitlines(keepends=True),
                    "docs/configuration.md",
                    "from the settings classes",
                )
            )[:40]
        )
        raise AssertionError(f"docs/configuration.md is stale; run:\n  {COMMAND}\n\n{diff}")


def test_the_page_documents_every_setting_once_in_its_section() -> None:
    page = render_markdown()
    sections = page.split("\n## ")
    for variable, _, _ in describe_settings():
        assert page.count(f"| `{variable}` |") == 1, variable
        [section] = [s for s in sections if f"| `{variable}` |" in s]
        nested = variable.removeprefix("LAMINA_").split("__")
        heading = section.splitlines()[0]
        assert heading == ("General" if len(nested) == 1 else f"`LAMINA_{nested[0]}__*`"), variable
    # Entries of list settings are documented field by field, required ones marked.
    registry = page.split("### Each entry of `LAMINA_INFERENCING__DEPLOYMENTS`", 1)[1]
    assert "| `name` | required |" in registry.split("\n## ", 1)[0]


def test_lamina_config_markdown_prints_the_page() -> None:
    result = CliRunner().invoke(app, ["config", "--markdown"])
    assert result.exit_code == 0, result.output
    assert result.output == render_markdown()
