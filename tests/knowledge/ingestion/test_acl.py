from __future__ import annotations

from pathlib import Path

import pytest

from knowledge.contracts import AccessControl, AccessRulesError
from knowledge.ingestion.acl import AccessRules

CORPUS_ACL = Path(__file__).resolve().parents[3] / "samples" / "corpus" / "acl.yaml"

EXAMPLE = """
tenant: contoso            # default tenant for every rule
rules:                     # first matching rule wins
  - match: "hr/**"
    groups: [hr]
    users: [ceo@contoso.com]
  - match: "product/**"
    public: true
  - match: "partners/**"
    tenant: fabrikam
    groups: [partners]
  - match: "*.md"
    groups: [writers]
"""


def test_paths_get_the_access_of_the_first_matching_rule() -> None:
    rules = AccessRules.parse(EXAMPLE)

    assert rules.access_for("hr/leave.md") == AccessControl(
        "contoso", groups=frozenset({"hr"}), users=frozenset({"ceo@contoso.com"})
    )
    assert rules.access_for("hr/2025/deep/file.pdf") == rules.access_for("hr/leave.md")
    assert rules.access_for("product/faq.txt") == AccessControl("contoso", public=True)
    assert rules.access_for("partners/deal.docx") == AccessControl(
        "fabrikam", groups=frozenset({"partners"})
    )
    # hr/** came first, so the *.md rule never applies under hr/.
    assert rules.access_for("notes/todo.md") == AccessControl(
        "contoso", groups=frozenset({"writers"})
    )
    assert rules.tenants == {"contoso", "fabrikam"}


@pytest.mark.parametrize("path", ["README.txt", "hrx/leave.pdf", "finance/memo.docx", "x/hr/a"])
def test_a_path_no_rule_matches_gets_no_access(path: str) -> None:
    assert AccessRules.parse(EXAMPLE).access_for(path) is None


def test_the_sample_corpus_rules() -> None:
    rules = AccessRules.load(CORPUS_ACL)
    finance = rules.access_for("finance/project-falcon-budget-memo.docx")
    assert finance == AccessControl(
        "contoso", groups=frozenset({"finance"}), users=frozenset({"megan.bowen@contoso.com"})
    )
    assert rules.access_for("hr/leave-policy.md") == AccessControl(
        "contoso", groups=frozenset({"hr", "employees"})
    )
    assert rules.access_for("engineering/oncall-runbook.md") == AccessControl(
        "contoso", groups=frozenset({"engineering"})
    )
    assert rules.access_for("product/atlas-faq.txt") == AccessControl("contoso", public=True)
    assert rules.access_for("README.md") is None


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        pytest.param("rules: [{match: 'a/**', groups: [g]}]", "has no tenant", id="no-tenant"),
        pytest.param("tenant: t\nrules: []", "rules: List should have at least 1", id="no-rules"),
        pytest.param("tenant: t", "rules: Field required", id="rules-missing"),
        pytest.param(
            "tenant: t\nrules: [{match: 'a/**'}]",
            "rules.0: Value error, a rule must set public: true or list users or groups",
            id="rule-grants-nobody",
        ),
        pytest.param(
            "tenant: t\nrules: [{match: 'a/**', public: false, users: []}]",
            "a rule must set public",
            id="rule-grants-nobody-explicitly",
        ),
        pytest.param(
            "tenant: t\nrules: [{match: 'a/**', group: [hr]}]",
            "rules.0.group: Extra inputs are not permitted",
            id="misspelt-key",
        ),
        pytest.param(
            "tenant: t\nrules: [{match: 'a/**', groups: hr}]",
            "rules.0.groups: Input should be a valid list",
            id="groups-not-a-list",
        ),
        pytest.param(
            "tenant: t\nrules: [{match: '', public: true}]", "rules.0.match", id="empty-match"
        ),
        pytest.param(
            "tenant: t\nrules: [{match: '!a/**', public: true}]",
            "negated patterns are not allowed",
            id="negated-match",
        ),
        pytest.param(
            "tenant: t\nrules: [{match: 'a', users: ['  ']}]", "names must not be empty", id="blank"
        ),
        pytest.param("tenant: ''\nrules: [{match: a, public: true}]", "tenant", id="blank-tenant"),
        pytest.param("- just\n- a list", "Input should be a valid dictionary", id="not-a-mapping"),
        pytest.param("", "Input should be a valid dictionary", id="empty-file"),
        pytest.param("tenant: [unclosed", "not valid YAML", id="bad-yaml"),
    ],
)
def test_a_malformed_file_names_the_problem(text: str, problem: str) -> None:
    with pytest.raises(AccessRulesError) as raised:
        AccessRules.parse(text, source="acl.yaml")
    message = str(raised.value)
    assert message.startswith("acl.yaml: ")
    assert problem in message


def test_a_missing_file_is_an_access_rules_error(tmp_path: Path) -> None:
    with pytest.raises(AccessRulesError, match=r"ACL file not found: acl\.yaml"):
        AccessRules.load(tmp_path / "acl.yaml")


def test_a_rule_tenant_alone_is_enough(tmp_path: Path) -> None:
    path = tmp_path / "acl.yaml"
    path.write_text("rules:\n  - match: '**'\n    tenant: fabrikam\n    public: true\n")
    assert AccessRules.load(path).access_for("any/file.md") == AccessControl(
        "fabrikam", public=True
    )
