"""The one-dependency authorization of the OpenAI-compatible routes matches the chain of
security schemes it stands in for: the same bearer token read from the same headers, and
the same security requirements in the OpenAPI document."""

from __future__ import annotations

import pytest
from fastapi import FastAPI, Request
from fastapi.security import HTTPBearer
from starlette.datastructures import Headers

from client_api.auth.dependencies import CREDENTIALS_OPENAPI, ChatCaller, bearer_token
from client_api.routes import openai_compat

AUTHORIZATION_VALUES = [
    None,
    "",
    " ",
    "Bearer",
    "Bearer ",
    "Bearer   ",
    "Bearer abc",
    "bearer abc",
    "BEARER abc",
    "Bearer  abc  ",
    "Bearer a b",
    "Basic dXNlcjpwYXNz",
    "Token abc",
    "abc",
    " Bearer abc",
    "Bearer\tabc",
    "Bearer lam_0123456789abcdef",
]


def _request(authorization: str | None) -> Request:
    headers = Headers({"Authorization": authorization} if authorization is not None else {})
    return Request({"type": "http", "method": "POST", "headers": headers.raw, "path": "/"})


@pytest.mark.parametrize("authorization", AUTHORIZATION_VALUES)
async def test_the_bearer_token_is_read_as_fastapis_http_bearer_reads_it(
    authorization: str | None,
) -> None:
    credentials = await HTTPBearer(auto_error=False)(_request(authorization))
    expected = credentials.credentials if credentials is not None else None
    assert bearer_token(_request(authorization)) == expected


def test_the_openai_routes_declare_the_security_of_the_scheme_chain() -> None:
    """A route authorized through the security schemes as dependencies, and the
    OpenAI-compatible routes with ``CREDENTIALS_OPENAPI``, document the same security."""
    app = FastAPI()

    @app.get("/chained")
    async def chained(principal: ChatCaller) -> None:
        """Authorized through the dependency chain."""

    app.include_router(openai_compat.router)
    paths = app.openapi()["paths"]
    chain_security = paths["/chained"]["get"]["security"]
    assert chain_security == CREDENTIALS_OPENAPI["security"]
    assert paths["/v1/chat/completions"]["post"]["security"] == chain_security
    assert paths["/v1/models"]["get"]["security"] == chain_security
