"""Versioned prompt files, rendered with a sandboxed Jinja2 environment.

A prompt file is YAML with ``name``, ``version``, ``description`` and
``template``; files are named ``<name>.v<version>.yaml``. The newest version
is used unless a version is pinned.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml
from jinja2 import StrictUndefined
from jinja2.sandbox import SandboxedEnvironment
from pydantic import BaseModel, ValidationError

_FILE_NAME = re.compile(r"^(?P<name>[a-z0-9_]+)\.v(?P<version>\d+)\.ya?ml$")


class PromptError(Exception):
    """A prompt file is missing or malformed."""


class _PromptFile(BaseModel):
    name: str
    version: int
    description: str = ""
    template: str


@dataclass(frozen=True, slots=True)
class Prompt:
    name: str
    version: int
    description: str
    template: str

    @property
    def id(self) -> str:
        """Stable identifier recorded with answers and used in cache keys."""
        return f"{self.name}@v{self.version}"


class PromptLibrary:
    def __init__(self, directory: Path) -> None:
        self._directory = directory
        self._env = SandboxedEnvironment(
            undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True, autoescape=False
        )
        self._prompts: dict[str, dict[int, Prompt]] = {}
        # Compiling a template costs milliseconds (the grounded answer's, several): once
        # per template text, not once per turn.
        self._compile = lru_cache(maxsize=256)(self._env.from_string)
        self._load()

    @staticmethod
    def bundled_directory() -> Path:
        """``prompts/`` beside the installed packages (the repository root in development)."""
        return Path(__file__).resolve().parent.parent / "prompts"

    def _load(self) -> None:
        if not self._directory.is_dir():
            raise PromptError(f"prompt directory not found: {self._directory}")
        for path in sorted(self._directory.iterdir()):
            match = _FILE_NAME.match(path.name)
            if not match:
                continue
            try:
                data = _PromptFile.model_validate(yaml.safe_load(path.read_text("utf-8")))
            except (yaml.YAMLError, ValidationError) as exc:
                raise PromptError(f"{path.name}: not a valid prompt file: {exc}") from exc
            if (data.name, data.version) != (match["name"], int(match["version"])):
                raise PromptError(f"{path.name}: name/version inside differ from the file name")
            self._prompts.setdefault(data.name, {})[data.version] = Prompt(
                data.name, data.version, data.description, data.template
            )

    def get(self, name: str, version: int | None = None) -> Prompt:
        versions = self._prompts.get(name)
        if not versions:
            raise PromptError(f"no prompt named {name!r} in {self._directory}")
        chosen = max(versions) if version is None else version
        if chosen not in versions:
            raise PromptError(f"prompt {name!r} has no version {version}")
        return versions[chosen]

    def render(self, prompt: Prompt, **variables: Any) -> str:
        return self._compile(prompt.template).render(**variables).strip()
