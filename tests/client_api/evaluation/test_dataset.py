"""Question sets: the bundled one is sound, and a broken one is refused with the line named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from client_api.composition import sample_corpus
from client_api.evaluation.dataset import DatasetError, bundled_dataset, load_dataset
from intelligence.contracts import Principal
from knowledge.contracts import AccessFilter
from knowledge.ingestion.acl import AccessRules

GOOD = {
    "id": "leave",
    "question": "How many days of leave?",
    "gold_sources": ["./hr\\leave-policy.md"],
    "gold_answer": "27 days",
}


def write_lines(path: Path, *lines: str) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_the_bundled_set_covers_answers_restricted_documents_and_outside_questions() -> None:
    dataset = load_dataset(bundled_dataset())
    items = dataset.items
    assert 20 <= len(items) <= 40
    answerable = [i for i in items if not i.expect_refusal]
    declined = [i for i in items if i.expect_refusal]
    assert all(i.gold_sources and i.gold_answer for i in answerable)
    # Restricted questions are asked of the corpus by callers who may not read the answer;
    # outside questions have no answer in the corpus at all.
    assert {i.id.split("-")[0] for i in declined} == {"denied", "outside"}
    assert len(dataset.sha256) == 64


def test_every_gold_source_of_the_bundled_set_is_a_document_its_caller_may_read() -> None:
    corpus = sample_corpus()
    rules = AccessRules.load(corpus / "acl.yaml")
    for item in load_dataset(bundled_dataset()).items:
        caller = Principal(
            tenant_id=item.caller.tenant or "contoso",
            user_id=item.caller.user,
            groups=frozenset(item.caller.groups),
        )
        for source in item.gold_sources:
            assert (corpus / source).is_file(), f"{item.id}: {source} is not in the corpus"
            access = rules.access_for(source)
            assert access is not None, f"{item.id}: no access rule matches {source}"
            assert AccessFilter.for_caller(caller).allows(access), (
                f"{item.id}: {item.caller.user} may not read {source}"
            )


def test_gold_sources_are_normalised_to_the_index_paths(tmp_path: Path) -> None:
    dataset = load_dataset(write_lines(tmp_path / "qa.jsonl", json.dumps(GOOD)))
    assert dataset.items[0].gold_sources == ("hr/leave-policy.md",)
    assert dataset.items[0].caller.user == "eval@contoso.com"


def test_blank_and_comment_lines_are_skipped(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "qa.jsonl", "# the leave questions", "", json.dumps(GOOD))
    assert [i.id for i in load_dataset(path).items] == ["leave"]


def test_a_line_that_is_not_json_is_named(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "qa.jsonl", json.dumps(GOOD), '{"id": "two", "question": ')
    with pytest.raises(DatasetError, match=r"qa\.jsonl, line 2: not valid JSON"):
        load_dataset(path)


def test_a_missing_gold_answer_is_named_with_its_line(tmp_path: Path) -> None:
    line = json.dumps({"id": "x", "question": "Why?", "gold_sources": ["a.md"]})
    with pytest.raises(DatasetError, match=r"line 1: gold_answer is required unless"):
        load_dataset(write_lines(tmp_path / "qa.jsonl", line))


def test_an_unknown_field_is_named(tmp_path: Path) -> None:
    line = json.dumps({**GOOD, "gold_source": "typo.md"})
    with pytest.raises(DatasetError, match=r"line 1: gold_source: Extra inputs"):
        load_dataset(write_lines(tmp_path / "qa.jsonl", line))


def test_a_refusal_item_with_gold_data_is_refused(tmp_path: Path) -> None:
    line = json.dumps({**GOOD, "expect_refusal": True})
    with pytest.raises(DatasetError, match="expect_refusal has no gold_sources"):
        load_dataset(write_lines(tmp_path / "qa.jsonl", line))


def test_a_duplicate_id_names_both_lines(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "qa.jsonl", json.dumps(GOOD), "", json.dumps(GOOD))
    with pytest.raises(DatasetError, match=r"line 3: duplicate id 'leave' \(first used on line 1"):
        load_dataset(path)


def test_a_line_that_is_not_an_object_is_named(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="line 1: expected a JSON object, got list"):
        load_dataset(write_lines(tmp_path / "qa.jsonl", "[1, 2]"))


def test_an_empty_or_missing_set_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="holds no questions"):
        load_dataset(write_lines(tmp_path / "qa.jsonl", "# nothing yet"))
    with pytest.raises(DatasetError, match="cannot read the question set"):
        load_dataset(tmp_path / "missing.jsonl")
