"""Access rules for an ingested corpus, read from a YAML file beside it.

The first rule whose gitignore-style glob matches a file's path (relative to
the corpus root) decides who may read it. A file no rule matches gets no
access at all and is not indexed: default deny.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pathspec
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from knowledge.contracts import AccessControl, AccessRulesError


class _RuleModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    match: str = Field(min_length=1)
    tenant: str | None = Field(default=None, min_length=1)
    public: bool = False
    users: list[str] = Field(default_factory=list)
    groups: list[str] = Field(default_factory=list)

    @field_validator("match")
    @classmethod
    def _positive_pattern(cls, value: str) -> str:
        if value.strip().startswith("!"):
            raise ValueError("negated patterns are not allowed; order rules instead")
        return value

    @field_validator("users", "groups")
    @classmethod
    def _no_blank_principals(cls, values: list[str]) -> list[str]:
        if any(not value.strip() for value in values):
            raise ValueError("names must not be empty")
        return values

    @model_validator(mode="after")
    def _grants_someone(self) -> _RuleModel:
        if not (self.public or self.users or self.groups):
            raise ValueError("a rule must set public: true or list users or groups")
        return self


class _FileModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    tenant: str | None = Field(default=None, min_length=1)
    rules: list[_RuleModel] = Field(min_length=1)

    @model_validator(mode="after")
    def _every_rule_has_a_tenant(self) -> _FileModel:
        if self.tenant is None:
            for position, rule in enumerate(self.rules):
                if rule.tenant is None:
                    raise ValueError(f"rule {position} ({rule.match!r}) has no tenant")
        return self


@dataclass(frozen=True, slots=True)
class _CompiledRule:
    spec: pathspec.GitIgnoreSpec
    access: AccessControl


class AccessRules:
    """Ordered path rules mapping a corpus-relative path to its :class:`AccessControl`."""

    def __init__(self, rules: list[tuple[str, AccessControl]]) -> None:
        self._rules = tuple(
            _CompiledRule(pathspec.GitIgnoreSpec.from_lines([pattern]), access)
            for pattern, access in rules
        )

    @classmethod
    def load(cls, path: Path) -> AccessRules:
        """Read and validate an ACL file. Blocking; raises :class:`AccessRulesError`."""
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError as exc:
            raise AccessRulesError(f"ACL file not found: {path.name}") from exc
        except (OSError, UnicodeDecodeError) as exc:
            raise AccessRulesError(f"{path.name}: cannot read ACL file ({exc})") from exc
        return cls.parse(text, source=path.name)

    @classmethod
    def parse(cls, text: str, *, source: str = "ACL file") -> AccessRules:
        """Validate ACL YAML text; ``source`` names the file in error messages."""
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise AccessRulesError(f"{source}: not valid YAML ({exc})") from exc
        try:
            model = _FileModel.model_validate(raw)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(part) for part in error['loc']) or 'file'}: {error['msg']}"
                for error in exc.errors()
            )
            raise AccessRulesError(f"{source}: {problems}") from exc
        return cls(
            [
                (
                    rule.match,
                    AccessControl(
                        tenant_id=rule.tenant or model.tenant or "",
                        public=rule.public,
                        users=frozenset(rule.users),
                        groups=frozenset(rule.groups),
                    ),
                )
                for rule in model.rules
            ]
        )

    @property
    def tenants(self) -> frozenset[str]:
        """Every tenant some rule grants to."""
        return frozenset(rule.access.tenant_id for rule in self._rules)

    def access_for(self, relative_path: str) -> AccessControl | None:
        """Access of the first rule matching ``relative_path`` ('/'-separated), or ``None``."""
        for rule in self._rules:
            if rule.spec.match_file(relative_path):
                return rule.access
        return None
