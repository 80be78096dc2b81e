"""The ``lamina`` command line as a real process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.e2e.conftest import write_corpus
from tests.support.processes import lamina_env, run_lamina
from tests.tools.conftest import PluginInstaller

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    corpus = tmp_path_factory.mktemp("corpus")
    write_corpus(corpus)
    environment = lamina_env(LAMINA_DATA_DIR=str(tmp_path_factory.mktemp("data")))
    result = run_lamina("ingest", str(corpus), env=environment)
    assert result.returncode == 0, result.stderr
    return environment


def test_ask_streams_a_cited_answer_for_a_permitted_user(env: dict[str, str]) -> None:
    result = run_lamina(
        "ask", "What is the Project Falcon budget?", "--user", "bea", "--groups", "beta", env=env
    )
    assert result.returncode == 0, result.stderr
    assert "4.2 million euros" in result.stdout
    assert "beta/falcon-budget.txt" in result.stdout


def test_ask_trims_for_a_user_who_may_not_see(env: dict[str, str]) -> None:
    result = run_lamina(
        "ask", "What is the Project Falcon budget?", "--user", "al", "--groups", "alpha", env=env
    )
    assert result.returncode == 0, result.stderr
    assert "4.2 million" not in result.stdout
    assert "beta/" not in result.stdout


def test_ask_on_an_empty_index_says_what_to_do(tmp_path: Path) -> None:
    result = run_lamina(
        "ask", "anything", "--user", "u", env=lamina_env(LAMINA_DATA_DIR=str(tmp_path))
    )
    assert result.returncode == 1
    assert "lamina ingest" in result.stderr


def test_a_wrong_setting_stops_start_up_and_names_the_variable(tmp_path: Path) -> None:
    result = run_lamina(
        "serve",
        env=lamina_env(LAMINA_DATA_DIR=str(tmp_path), LAMINA_INFERENCING__PROVIDER="gpt5"),
        timeout_s=60,
    )
    assert result.returncode == 2
    assert "LAMINA_INFERENCING__PROVIDER" in result.stderr
    assert "'extractive'" in result.stderr


def test_serving_jwt_mode_without_an_identity_provider_is_refused(tmp_path: Path) -> None:
    result = run_lamina("serve", env=lamina_env(LAMINA_DATA_DIR=str(tmp_path)), timeout_s=60)
    assert result.returncode == 2
    assert "LAMINA_AUTH__OPENID_CONFIG_URL" in result.stderr
    assert "LAMINA_AUTH__MODE=dev" in result.stderr


def test_config_lists_every_variable(tmp_path: Path) -> None:
    result = run_lamina("config", env=lamina_env(COLUMNS="200"))
    assert result.returncode == 0
    assert "LAMINA_KNOWLEDGE__TOP_K" in result.stdout
    assert "LAMINA_AUTH__AUDIENCE" in result.stdout


def test_ingest_of_a_corpus_with_a_broken_acl_file_fails_clearly(tmp_path: Path) -> None:
    (tmp_path / "acl.yaml").write_text("rules: [oops")
    (tmp_path / "a.txt").write_text("hello")
    result = run_lamina(
        "ingest", str(tmp_path), env=lamina_env(LAMINA_DATA_DIR=str(tmp_path / "data"))
    )
    assert result.returncode == 1
    assert "Ingestion failed" in result.stderr


# --- lamina tools list ------------------------------------------------------------------------

HR_PLUGIN = '''
from tools.contracts import RiskLevel
from tools.plugins import tool


@tool
def holiday_calendar() -> list[str]:
    """Public holidays of the year.

    Details only the JSON listing carries.
    """
    return []


@tool(risk=RiskLevel.WRITE, roles={"hr"}, scopes={"Hr.Write"}, timeout_s=3)
def update_salary(person: str, amount: int) -> str:
    """Update a salary."""
    return person


TOOLS = [holiday_calendar, update_salary]


def broken():
    raise RuntimeError("no HR backend configured")
'''


@pytest.fixture(scope="module")
def hr_plugin(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """An environment whose Python path holds an installed HR plugin with a broken entry point."""
    root = tmp_path_factory.mktemp("plugins")
    PluginInstaller(root).install(
        {"hr": "{module}:TOOLS", "hr-broken": "{module}:broken"},
        HR_PLUGIN,
        group="lamina.tools",
        dist_name="contoso-hr",
    )
    return lamina_env(PYTHONPATH=str(root), COLUMNS="200")


def test_tools_list_shows_each_tool_with_who_may_use_it(hr_plugin: dict[str, str]) -> None:
    result = run_lamina("tools", "list", env=hr_plugin)

    assert result.returncode == 0, result.stderr
    rows = {line.split()[1]: line for line in result.stdout.splitlines() if line.startswith("│ ")}
    assert "any signed-in user" in rows["holiday_calendar"]
    assert "Public holidays of the year." in rows["holiday_calendar"]
    assert "roles: hr; scopes: Hr.Write" in rows["update_salary"]
    assert " write " in rows["update_salary"] and " 3 s " in rows["update_salary"]
    assert "roles: employee" in rows["lookup_employee"], "Lamina's own sample plugin is there too"
    skipped = result.stdout.index("Plugin hr-broken")
    assert skipped > result.stdout.index("update_salary"), "load errors follow the table"
    assert "(package contoso-hr) was skipped: RuntimeError: no HR backend configured" in (
        result.stdout
    )
    assert "Traceback" not in result.stderr


def test_tools_list_strict_fails_on_a_skipped_plugin(hr_plugin: dict[str, str]) -> None:
    result = run_lamina("tools", "list", "--strict", "--json", env=hr_plugin)

    assert result.returncode == 1
    assert "hr-broken" in result.stderr
    assert "update_salary" in [tool["name"] for tool in json.loads(result.stdout)]


def test_tools_list_as_a_caller_shows_only_what_they_may_use(hr_plugin: dict[str, str]) -> None:
    with_scope = run_lamina(
        "tools", "list", "--json", "--as-roles", "hr", "--scopes", "Hr.Write", env=hr_plugin
    )
    without_scope = run_lamina("tools", "list", "--json", "--as-roles", "hr", env=hr_plugin)

    assert with_scope.returncode == 0, with_scope.stderr
    assert sorted(tool["name"] for tool in json.loads(with_scope.stdout)) == [
        "holiday_calendar",
        "update_salary",
    ]
    assert [tool["name"] for tool in json.loads(without_scope.stdout)] == ["holiday_calendar"]


def test_tools_list_honours_enabled_and_names_sources_it_does_not_connect(
    hr_plugin: dict[str, str],
) -> None:
    env = {
        **hr_plugin,
        "LAMINA_TOOLS__ENABLED": '["update_salary", "no_such_tool"]',
        "LAMINA_TOOLS__MCP_SERVERS": '[{"name": "files", "command": "/nonexistent/mcp"}]',
        "LAMINA_TOOLS__OPENAPI": '[{"name": "crm", "spec": "http://127.0.0.1:9/openapi.json"}]',
    }
    result = run_lamina("tools", "list", "--json", env=env)

    assert result.returncode == 0, result.stderr
    assert [tool["name"] for tool in json.loads(result.stdout)] == ["update_salary"]
    assert "not installed: no_such_tool" in result.stderr
    assert "mcp:files, openapi:crm" in " ".join(result.stderr.split())
