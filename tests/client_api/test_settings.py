from __future__ import annotations

from pathlib import Path

import pytest

from client_api.settings import (
    LaminaSettings,
    SettingsError,
    load_settings,
    require_serving_settings,
)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)  # no stray .env
    for name in list(__import__("os").environ):
        if name.startswith("LAMINA_"):
            monkeypatch.delenv(name)


def test_defaults_are_embedded_and_offline() -> None:
    settings = load_settings()
    assert settings.inferencing.provider == "extractive"
    assert settings.auth.mode == "jwt"
    assert settings.knowledge_index_path() == Path(".lamina/knowledge.db")


def test_nested_environment_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LAMINA_KNOWLEDGE__TOP_K", "9")
    monkeypatch.setenv("LAMINA_INFERENCING__PROVIDER", "openai")
    monkeypatch.setenv("LAMINA_TOOLS__ENABLED", '["lookup_employee"]')
    settings = load_settings()
    assert settings.knowledge.top_k == 9
    assert settings.inferencing.provider == "openai"
    assert settings.tools.enabled == ["lookup_employee"]


def test_dotenv_file_is_read(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("LAMINA_AUTH__MODE=dev\nLAMINA_DATA_DIR=/srv/lamina\n")
    settings = load_settings()
    assert settings.auth.mode == "dev"
    assert settings.data_dir == Path("/srv/lamina")


def test_a_wrong_value_names_the_variable_and_what_it_expects(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LAMINA_INFERENCING__PROVIDER", "gpt5")
    monkeypatch.setenv("LAMINA_KNOWLEDGE__TOP_K", "many")
    with pytest.raises(SettingsError) as caught:
        load_settings()
    message = str(caught.value)
    assert "LAMINA_INFERENCING__PROVIDER" in message
    assert "'extractive', 'openai' or 'azure_openai'" in message
    assert "'gpt5'" in message
    assert "LAMINA_KNOWLEDGE__TOP_K" in message
    assert "integer" in message


def test_azure_needs_an_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LAMINA_INFERENCING__PROVIDER", "azure_openai")
    with pytest.raises(SettingsError, match="azure_endpoint is required"):
        load_settings()


def test_serving_with_jwt_needs_openid_metadata_and_audience() -> None:
    with pytest.raises(SettingsError) as caught:
        require_serving_settings(LaminaSettings())
    assert "LAMINA_AUTH__OPENID_CONFIG_URL" in str(caught.value)
    assert "LAMINA_AUTH__AUDIENCE" in str(caught.value)
    require_serving_settings(LaminaSettings(auth={"mode": "dev"}))  # type: ignore[arg-type]


def test_readme_documents_every_setting() -> None:
    from client_api.settings import describe_settings

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    rows: dict[str, tuple[str, str]] = {}
    for line in readme.splitlines():
        if line.startswith("| `LAMINA_"):
            env, default, description = line.strip("| ").split(" | ", 2)
            rows[env.strip("`")] = (default, description)

    def plain(text: str) -> str:
        # The README may quote code in backticks where the settings use quotes or none.
        return text.replace("`", "").replace("'", "").strip()

    missing = [env for env, _, _ in describe_settings() if env not in rows]
    assert missing == []
    # Default and description as the settings classes say them (the demo's users, too
    # long for a table cell, are summarised).
    summarised = {"LAMINA_WEB__DEV_USERS"}
    stale = [
        env
        for env, default, description in describe_settings()
        if plain(rows[env][1]) != plain(description)
        or (env not in summarised and plain(rows[env][0]) != plain(default))
    ]
    assert stale == []


def test_a_retention_period_must_be_positive_or_null(monkeypatch: pytest.MonkeyPatch) -> None:
    # -1 means "never expire" to Cosmos DB; here it would delete a tenant's messages at once.
    monkeypatch.setenv("LAMINA_CONVERSATIONS__TENANT_RETENTION_DAYS", '{"contoso": -1}')
    with pytest.raises(SettingsError) as caught:
        load_settings()
    assert "LAMINA_CONVERSATIONS__TENANT_RETENTION_DAYS" in str(caught.value)
    monkeypatch.setenv("LAMINA_CONVERSATIONS__TENANT_RETENTION_DAYS", '{"contoso": null}')
    assert load_settings().conversations.retention().seconds_for("contoso") is None
