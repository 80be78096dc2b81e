"""Roles → permissions at the edge, and the API-key hook, over real HTTP.

The real Lamina app runs on loopback with JWT authentication against a loopback
identity provider; the API-key tests use a small app built from the same
dependencies, with a tiny in-test key store.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from client_api.app import create_app
from client_api.auth.dependencies import (
    ApiKeyAuthenticator,
    Authenticator,
    ChatCaller,
    UsageAdmin,
)
from client_api.auth.jwt import JwtValidator
from client_api.auth.permissions import (
    ADMIN_ROLE,
    USER_ROLE,
    Permission,
    PermissionDenied,
    PermissionPolicy,
)
from client_api.problems import install_problem_handlers
from client_api.settings import AuthSettings, LaminaSettings, SettingsError, load_settings
from intelligence.contracts import Principal
from tests.support.identity import AUDIENCE, TENANT, IdentityProvider, running_identity_provider
from tests.support.processes import app_in_thread

READER_ROLE = "Lamina.Reader"


@dataclass
class Lamina:
    base_url: str
    idp: IdentityProvider

    def call(self, method: str, path: str, token: str, **kwargs: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token}"}
        return httpx.request(
            method, f"{self.base_url}{path}", headers=headers, timeout=30, **kwargs
        )

    def chat(self, token: str) -> httpx.Response:
        return self.call("POST", "/v1/chat", token, json={"message": "When is the cafeteria open?"})


@pytest.fixture(scope="module")
def idp() -> Iterator[IdentityProvider]:
    with running_identity_provider() as provider:
        yield provider


def serve(idp: IdentityProvider, data_dir: Path, **auth: Any) -> Iterator[Lamina]:
    settings = LaminaSettings(
        data_dir=data_dir,
        log_level="WARNING",
        auth={"mode": "jwt", "openid_config_url": idp.config_url, "audience": AUDIENCE, **auth},
    )
    with app_in_thread(create_app(settings)) as base_url:
        yield Lamina(base_url, idp)


@pytest.fixture(scope="module")
def lamina(idp: IdentityProvider, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lamina]:
    yield from serve(idp, tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def strict(idp: IdentityProvider, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lamina]:
    """A deployment that requires the API's scope and knows a read-only role."""
    yield from serve(
        idp,
        tmp_path_factory.mktemp("strict"),
        required_scopes=["access_as_user"],
        role_permissions={
            ADMIN_ROLE: [p.value for p in Permission],
            USER_ROLE: ["chat", "conversations", "models"],
            READER_ROLE: ["conversations"],
        },
    )


def assert_forbidden(response: httpx.Response, permission: str) -> None:
    assert response.status_code == 403, response.text
    body = response.json()
    if response.url.path in ("/v1/models", "/v1/chat/completions"):
        # The OpenAI-compatible routes answer in OpenAI's error shape, for OpenAI clients.
        assert body["error"]["type"] == "permission_error"
        assert repr(permission) in body["error"]["message"]
        return
    assert response.headers["content-type"] == "application/problem+json"
    assert body["missing_permission"] == permission
    assert repr(permission) in body["detail"]


# --- the routes' permissions ------------------------------------------------------------


def test_a_signed_in_user_without_app_roles_gets_the_user_permissions(lamina: Lamina) -> None:
    token = lamina.idp.token("ursula")  # delegated, no roles: what the demo sends
    assert lamina.chat(token).status_code == 200
    assert lamina.call("GET", "/v1/conversations", token).status_code == 200
    assert lamina.call("GET", "/v1/models", token).status_code == 200
    assert_forbidden(lamina.call("GET", "/v1/usage", token), "usage.read")


def test_usage_needs_the_admin_role(lamina: Lamina) -> None:
    admin = lamina.idp.token("adele", roles=(ADMIN_ROLE,))
    response = lamina.call("GET", "/v1/usage", admin)
    assert response.status_code == 200, response.text
    assert response.json()["tenant_id"] == TENANT


def test_an_app_only_token_without_roles_may_not_chat(lamina: Lamina) -> None:
    daemon = lamina.idp.token("daemon", app_only=True)
    assert_forbidden(lamina.chat(daemon), "chat")
    stream = lamina.call("POST", "/v1/chat/stream", daemon, json={"message": "hi"})
    assert_forbidden(stream, "chat")  # refused before any event is sent
    assert_forbidden(lamina.call("GET", "/v1/models", daemon), "models")
    assert_forbidden(lamina.call("GET", "/v1/conversations", daemon), "conversations")
    # Given the role, the same daemon may.
    assigned = lamina.idp.token("daemon", app_only=True, roles=(USER_ROLE,))
    assert lamina.chat(assigned).status_code == 200


def test_a_role_meant_for_a_tool_does_not_take_the_default_away(lamina: Lamina) -> None:
    token = lamina.idp.token("ann", roles=("employee",))
    assert lamina.chat(token).status_code == 200


def test_a_mapped_role_replaces_the_default(strict: Lamina) -> None:
    reader = strict.idp.token("rita", roles=(READER_ROLE,))
    assert strict.call("GET", "/v1/conversations", reader).status_code == 200
    assert_forbidden(strict.chat(reader), "chat")


def test_a_delegated_token_without_a_required_scope_is_refused(strict: Lamina) -> None:
    wrong_scope = strict.idp.token("ursula", scopes=("Files.Read",))
    response = strict.chat(wrong_scope)
    assert response.status_code == 403
    assert response.json()["required_scopes"] == ["access_as_user"]
    assert 'error="insufficient_scope"' in response.headers["www-authenticate"]
    right_scope = strict.idp.token("ursula", scopes=("Files.Read", "access_as_user"))
    assert strict.chat(right_scope).status_code == 200
    # App-only tokens carry roles, never scopes: the scope rule is not theirs.
    daemon = strict.idp.token("daemon", app_only=True, roles=(USER_ROLE,))
    assert strict.chat(daemon).status_code == 200


# --- the policy, for callers the JWT app cannot produce ----------------------------------


def policy(**settings: Any) -> PermissionPolicy:
    return PermissionPolicy.from_settings(AuthSettings(**settings))


def test_dev_mode_users_get_the_default_roles_and_keys_do_not() -> None:
    default = policy()
    dev = Principal(tenant_id=TENANT, user_id="dana", auth_method="dev")
    assert default.permissions(dev) == {
        Permission.CHAT,
        Permission.CONVERSATIONS,
        Permission.MODELS,
    }
    key = Principal(tenant_id=TENANT, user_id="svc", auth_method="api_key")
    assert default.permissions(key) == frozenset()
    with pytest.raises(PermissionDenied, match="'chat'"):
        default.check(key, Permission.CHAT)
    admin_key = Principal(tenant_id=TENANT, user_id="svc", roles=frozenset({ADMIN_ROLE}))
    # Every permission but reading the audit log: that is the auditor's alone.
    assert default.permissions(admin_key) == frozenset(Permission) - {Permission.AUDIT_READ}


def test_no_default_roles_means_only_assigned_users() -> None:
    assigned_only = policy(default_roles=[])
    user = Principal(tenant_id=TENANT, user_id="u", scopes=frozenset({"access_as_user"}))
    with pytest.raises(PermissionDenied):
        assigned_only.check(user, Permission.CHAT)


def test_role_permissions_must_name_known_permissions(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    for name in list(os.environ):
        if name.startswith("LAMINA_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("LAMINA_AUTH__ROLE_PERMISSIONS", '{"Lamina.User": ["chat", "chatt"]}')
    with pytest.raises(SettingsError) as caught:
        load_settings()
    assert "LAMINA_AUTH__ROLE_PERMISSIONS" in str(caught.value)
    assert "'chatt'" in str(caught.value)
    monkeypatch.setenv("LAMINA_AUTH__ROLE_PERMISSIONS", '{"Ops": ["usage.read"]}')
    assert load_settings().auth.role_permissions == {"Ops": ["usage.read"]}


def test_the_replaced_admin_role_setting_says_what_replaced_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    for name in list(os.environ):
        if name.startswith("LAMINA_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("LAMINA_AUTH__ADMIN_ROLE", "Ops")
    with pytest.raises(SettingsError, match="role_permissions"):
        load_settings()


# --- API keys ----------------------------------------------------------------------------


@dataclass
class KeyRing:
    """An in-test ``ApiKeyAuthenticator``: known keys and who they belong to."""

    keys: dict[str, Principal]
    presented: list[str] = field(default_factory=list)

    async def authenticate(self, presented: str) -> Principal | None:
        self.presented.append(presented)
        return self.keys.get(presented)


SERVICE_KEY = "lam_service_0123456789abcdef"
ADMIN_KEY = "lam_admin_0123456789abcdef"
BARE_KEY = "lam_noroles_0123456789abcdef"
SNEAKY_KEY = "lam_sneaky_0123456789abcdef"


def key_ring() -> KeyRing:
    return KeyRing(
        {
            SERVICE_KEY: Principal(
                tenant_id=TENANT, user_id="svc-reporting", roles=frozenset({USER_ROLE})
            ),
            ADMIN_KEY: Principal(
                tenant_id=TENANT, user_id="svc-ops", roles=frozenset({ADMIN_ROLE})
            ),
            BARE_KEY: Principal(tenant_id=TENANT, user_id="svc-bare"),
            # A store that mislabels its principal as a delegated token gets no defaults.
            SNEAKY_KEY: Principal(
                tenant_id=TENANT, user_id="svc-x", scopes=frozenset({"access_as_user"})
            ),
        }
    )


def edge_app(auth: AuthSettings, api_keys: ApiKeyAuthenticator | None) -> FastAPI:
    """Only the edge: authentication, permissions and problem responses."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with httpx.AsyncClient() as http:
            validator = JwtValidator(auth, http) if auth.mode == "jwt" else None
            app.state.authenticator = Authenticator(auth, validator, api_keys=api_keys)
            yield

    app = FastAPI(lifespan=lifespan)
    install_problem_handlers(app)

    @app.get("/readyz")
    async def ready() -> dict[str, str]:
        return {"status": "ready"}

    @app.get("/chat")
    async def chat(principal: ChatCaller) -> dict[str, str]:
        return {"user": principal.user_id, "auth_method": principal.auth_method}

    @app.get("/usage")
    async def usage(principal: UsageAdmin) -> dict[str, str]:
        return {"user": principal.user_id}

    return app


@pytest.fixture(scope="module")
def keys() -> KeyRing:
    return key_ring()


@pytest.fixture(scope="module")
def keyed(idp: IdentityProvider, keys: KeyRing) -> Iterator[str]:
    auth = AuthSettings(openid_config_url=idp.config_url, audience=AUDIENCE)
    with app_in_thread(edge_app(auth, keys)) as base_url:
        yield base_url


def get(base_url: str, path: str, **headers: str) -> httpx.Response:
    return httpx.get(f"{base_url}{path}", headers=headers, timeout=10)


def test_an_api_key_as_bearer_token_authenticates(keyed: str, keys: KeyRing) -> None:
    response = get(keyed, "/chat", Authorization=f"Bearer {SERVICE_KEY}")
    assert response.status_code == 200, response.text
    assert response.json() == {"user": "svc-reporting", "auth_method": "api_key"}
    assert keys.presented[-1] == SERVICE_KEY


@pytest.mark.parametrize("header", ["api-key", "X-API-Key"])
def test_an_api_key_header_authenticates(keyed: str, header: str) -> None:
    response = get(keyed, "/chat", **{header: SERVICE_KEY})
    assert response.json()["user"] == "svc-reporting"


def test_an_unknown_api_key_is_refused(keyed: str, keys: KeyRing) -> None:
    for headers in ({"Authorization": "Bearer lam_revoked"}, {"api-key": "revoked-or-unknown"}):
        response = get(keyed, "/chat", **headers)
        assert response.status_code == 401
        assert response.headers["content-type"] == "application/problem+json"
        assert response.json()["detail"] == "The API key is not valid."
    assert keys.presented[-2:] == ["lam_revoked", "revoked-or-unknown"]


def test_an_api_key_holds_only_the_roles_it_was_given(keyed: str) -> None:
    assert get(keyed, "/chat", **{"api-key": BARE_KEY}).status_code == 403
    assert get(keyed, "/chat", **{"api-key": SNEAKY_KEY}).status_code == 403
    assert get(keyed, "/usage", **{"api-key": SERVICE_KEY}).status_code == 403
    assert get(keyed, "/usage", **{"api-key": ADMIN_KEY}).status_code == 200


def test_a_bearer_token_and_an_api_key_together_are_refused(
    keyed: str, idp: IdentityProvider
) -> None:
    jwt = idp.token("ursula")
    both = get(keyed, "/chat", Authorization=f"Bearer {jwt}", **{"api-key": SERVICE_KEY})
    assert both.status_code == 401
    two_keys = get(keyed, "/chat", **{"api-key": SERVICE_KEY, "X-API-Key": ADMIN_KEY})
    assert two_keys.status_code == 401
    # JWTs still work beside the keys.
    assert get(keyed, "/chat", Authorization=f"Bearer {jwt}").json()["auth_method"] == "jwt"


def test_api_keys_work_in_dev_mode_too() -> None:
    with app_in_thread(edge_app(AuthSettings(mode="dev"), key_ring())) as base_url:
        by_key = get(base_url, "/chat", **{"X-API-Key": SERVICE_KEY})
        assert by_key.json() == {"user": "svc-reporting", "auth_method": "api_key"}
        assert get(base_url, "/chat", **{"api-key": "lam_nope"}).status_code == 401
        dev_user = get(base_url, "/chat", **{"X-Lamina-User": "dana"})
        assert dev_user.json() == {"user": "dana", "auth_method": "dev"}
        assert get(base_url, "/usage", **{"X-Lamina-User": "dana"}).status_code == 403
        dev_admin = get(
            base_url, "/usage", **{"X-Lamina-User": "dana", "X-Lamina-Roles": ADMIN_ROLE}
        )
        assert dev_admin.status_code == 200


def test_without_a_key_store_api_keys_are_refused(idp: IdentityProvider) -> None:
    auth = AuthSettings(openid_config_url=idp.config_url, audience=AUDIENCE)
    with app_in_thread(edge_app(auth, None)) as base_url:
        response = get(base_url, "/chat", Authorization=f"Bearer {SERVICE_KEY}")
        assert response.status_code == 401
        assert "API keys" in response.json()["detail"]
