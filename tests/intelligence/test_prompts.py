"""The prompt library renders each prompt with the variables of each call.

Compiled templates are reused across turns (compiling one costs milliseconds); these
tests pin that reuse never mixes two calls' variables or two prompts' templates.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from jinja2 import UndefinedError

from intelligence.prompts import Prompt, PromptLibrary


@pytest.fixture
def library(tmp_path: Path) -> PromptLibrary:
    (tmp_path / "greet.v1.yaml").write_text(
        "name: greet\nversion: 1\ntemplate: 'Hello {{ who }}.'\n", "utf-8"
    )
    (tmp_path / "greet.v2.yaml").write_text(
        "name: greet\nversion: 2\ntemplate: 'Good day, {{ who }}!'\n", "utf-8"
    )
    return PromptLibrary(tmp_path)


def test_each_render_uses_its_own_variables(library: PromptLibrary) -> None:
    prompt = library.get("greet", 1)
    assert library.render(prompt, who="Ada") == "Hello Ada."
    assert library.render(prompt, who="Grace") == "Hello Grace."


def test_versions_and_ad_hoc_prompts_render_their_own_templates(library: PromptLibrary) -> None:
    assert library.render(library.get("greet"), who="Ada") == "Good day, Ada!"
    assert library.render(library.get("greet", 1), who="Ada") == "Hello Ada."
    ad_hoc = Prompt("other", 1, "", "Bye {{ who }}.")
    assert library.render(ad_hoc, who="Ada") == "Bye Ada."


def test_a_missing_variable_still_fails_after_a_successful_render(library: PromptLibrary) -> None:
    prompt = library.get("greet", 1)
    library.render(prompt, who="Ada")
    with pytest.raises(UndefinedError):
        library.render(prompt)
