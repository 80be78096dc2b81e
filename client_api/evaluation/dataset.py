"""Question sets for ``lamina eval``: one JSON object per line, validated line by line.

A line reads::

    {"id": "leave-days", "question": "How many days of annual leave do I get?",
     "gold_sources": ["hr/leave-policy.md"], "gold_answer": "27 days",
     "caller": {"user": "diego@contoso.com", "groups": ["employees"]},
     "expect_refusal": false}

``gold_sources`` are document paths as the index records them (relative to the
ingested folder, ``/`` separators): citations are compared by document, never by
chunk. An item with ``expect_refusal`` is one the assistant must decline: its
answer is outside the documents the caller may read (restricted, or not in the
corpus at all), so it carries neither gold sources nor a gold answer.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class DatasetError(Exception):
    """A question set that cannot be read; the message names the file and line."""


class Caller(BaseModel):
    """Who asks the question: sent as the dev identity headers of the API."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    user: str = Field(default="eval@contoso.com", min_length=1)
    groups: tuple[str, ...] = ()
    roles: tuple[str, ...] = ()
    tenant: str | None = Field(default=None, description="None: the server's dev tenant")


class EvalItem(BaseModel):
    """One question with what a correct answer looks like."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$")
    question: str = Field(min_length=1)
    gold_sources: tuple[str, ...] = ()
    gold_answer: str = ""
    caller: Caller = Caller()
    expect_refusal: bool = False

    @field_validator("gold_sources")
    @classmethod
    def _document_paths(cls, sources: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(normalize_source(s) for s in sources)

    @model_validator(mode="after")
    def _consistent(self) -> EvalItem:
        if self.expect_refusal and (self.gold_sources or self.gold_answer):
            raise ValueError(
                "an item with expect_refusal has no gold_sources or gold_answer: "
                "nothing the caller may read answers it"
            )
        if not self.expect_refusal and not self.gold_answer.strip():
            raise ValueError("gold_answer is required unless expect_refusal is true")
        return self


def normalize_source(source: str) -> str:
    """A document path as the index records it: ``/`` separators, no leading ``./``."""
    path = source.strip().replace("\\", "/")
    while path.startswith("./"):
        path = path[2:]
    return path.lstrip("/")


@dataclass(frozen=True, slots=True)
class Dataset:
    path: Path
    items: tuple[EvalItem, ...]
    sha256: str
    """Of the file's bytes: two runs on the same hash asked the same questions."""


def load_dataset(path: Path) -> Dataset:
    """Read and validate a JSONL question set. Blank lines and lines starting with ``#``
    are skipped; any other problem raises :class:`DatasetError` naming the line."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DatasetError(f"cannot read the question set {path}: {exc.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise DatasetError(f"{path} is not UTF-8 text") from None
    items: list[EvalItem] = []
    first_line: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        where = f"{path}, line {number}"
        try:
            data = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{where}: not valid JSON ({exc.msg}, column {exc.colno})") from None
        if not isinstance(data, dict):
            raise DatasetError(f"{where}: expected a JSON object, got {type(data).__name__}")
        try:
            item = EvalItem.model_validate(data)
        except ValidationError as exc:
            raise DatasetError(f"{where}: {_describe(exc)}") from None
        if item.id in first_line:
            raise DatasetError(
                f"{where}: duplicate id {item.id!r} (first used on line {first_line[item.id]})"
            )
        first_line[item.id] = number
        items.append(item)
    if not items:
        raise DatasetError(f"{path} holds no questions")
    return Dataset(path=path, items=tuple(items), sha256=hashlib.sha256(raw).hexdigest())


def bundled_dataset() -> Path:
    """The question set over the sample corpus (``samples/qa/corpus_qa.jsonl``)."""
    return Path(__file__).resolve().parents[2] / "samples" / "qa" / "corpus_qa.jsonl"


def _describe(exc: ValidationError) -> str:
    problems = []
    for error in exc.errors():
        field = ".".join(str(part) for part in error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        problems.append(f"{field}: {message}" if field else message)
    return "; ".join(problems)
