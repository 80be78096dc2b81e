"""A real OpenID Connect metadata + JWKS server on loopback, and tokens signed for it."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

AUDIENCE = "api://lamina-test"
TENANT = "contoso"


@dataclass
class SigningKey:
    kid: str
    private: rsa.RSAPrivateKey = field(
        default_factory=lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048)
    )

    def jwk(self) -> dict[str, Any]:
        public: dict[str, Any] = json.loads(RSAAlgorithm.to_jwk(self.private.public_key()))
        return {**public, "kid": self.kid, "use": "sig", "alg": "RS256"}


@dataclass
class IdentityProvider:
    """Serves ``/.well-known/openid-configuration`` and ``/keys``; mints tokens."""

    base_url: str = ""
    keys: list[SigningKey] = field(default_factory=lambda: [SigningKey(kid="key-1")])
    jwks_requests: int = 0

    @property
    def issuer(self) -> str:
        return f"{self.base_url}/{TENANT}/v2.0"

    @property
    def config_url(self) -> str:
        return f"{self.base_url}/.well-known/openid-configuration"

    def token(
        self,
        user: str,
        *,
        groups: tuple[str, ...] = (),
        roles: tuple[str, ...] = (),
        tenant: str = TENANT,
        audience: str = AUDIENCE,
        issuer: str | None = None,
        expires_in: int = 600,
        key: SigningKey | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> str:
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": issuer or self.issuer,
            "aud": audience,
            "sub": user,
            "oid": user,
            "tid": tenant,
            "groups": list(groups),
            "roles": list(roles),
            "iat": now,
            "nbf": now - 5,
            "exp": now + expires_in,
            "jti": uuid.uuid4().hex,
            **(extra or {}),
        }
        signer = key or self.keys[0]
        return jwt.encode(claims, signer.private, algorithm="RS256", headers={"kid": signer.kid})

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        provider = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/.well-known/openid-configuration":
                    body = {
                        "issuer": provider.issuer,
                        "jwks_uri": f"{provider.base_url}/keys",
                        "id_token_signing_alg_values_supported": ["RS256"],
                    }
                elif self.path == "/keys":
                    provider.jwks_requests += 1
                    body = {"keys": [k.jwk() for k in provider.keys]}
                else:
                    self.send_error(404)
                    return
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler


@contextmanager
def running_identity_provider() -> Iterator[IdentityProvider]:
    provider = IdentityProvider()
    server = ThreadingHTTPServer(("127.0.0.1", 0), provider._handler())
    provider.base_url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield provider
    finally:
        server.shutdown()
        server.server_close()
