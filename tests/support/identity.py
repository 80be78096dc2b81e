"""A real OpenID Connect metadata + JWKS server on loopback, and tokens signed for it.

Tokens look like Entra ID's: ``iss`` names the token's tenant (v2 form on this
server, or Entra's v1 form ``https://sts.windows.net/{tid}/``), ``tid``, ``oid``,
and ``scp`` for delegated (user) tokens or ``idtyp: app`` for app-only ones.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from jwt.algorithms import RSAAlgorithm

AUDIENCE = "api://lamina-test"
CLIENT_ID = "6f1c0a52-0000-4000-8000-00000000a11a"
"""The API's client id: Entra v2 tokens carry it as ``aud``, v1 tokens the App ID URI."""
TENANT = "contoso"
USER_SCOPE = "access_as_user"
V1_ISSUER = "https://sts.windows.net/{tenantid}/"


@dataclass
class SigningKey:
    kid: str
    private: rsa.RSAPrivateKey = field(
        default_factory=lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048)
    )

    def jwk(self) -> dict[str, Any]:
        public: dict[str, Any] = json.loads(RSAAlgorithm.to_jwk(self.private.public_key()))
        return {**public, "kid": self.kid, "use": "sig", "alg": "RS256"}

    def public_pem(self) -> bytes:
        """The public key as PEM: what a key-confusion attack keys HMAC with."""
        return self.private.public_key().public_bytes(
            Encoding.PEM, PublicFormat.SubjectPublicKeyInfo
        )


@dataclass
class IdentityProvider:
    """Serves ``/.well-known/openid-configuration`` and ``/keys``; mints tokens.

    ``multi_tenant`` publishes the issuer as Entra's ``organizations`` metadata
    does: with a ``{tenantid}`` placeholder instead of one tenant.
    """

    base_url: str = ""
    keys: list[SigningKey] = field(default_factory=lambda: [SigningKey(kid="key-1")])
    multi_tenant: bool = False
    jwks_requests: int = 0

    @property
    def issuer(self) -> str:
        """The issuer the metadata publishes."""
        return self.issuer_for("{tenantid}" if self.multi_tenant else TENANT)

    @property
    def v2_issuer_template(self) -> str:
        return f"{self.base_url}/{{tenantid}}/v2.0"

    def issuer_for(self, tenant: str, version: Literal[1, 2] = 2) -> str:
        template = V1_ISSUER if version == 1 else self.v2_issuer_template
        return template.replace("{tenantid}", tenant)

    @property
    def config_url(self) -> str:
        return f"{self.base_url}/.well-known/openid-configuration"

    def claims(
        self,
        user: str,
        *,
        groups: tuple[str, ...] = (),
        roles: tuple[str, ...] = (),
        scopes: tuple[str, ...] = (USER_SCOPE,),
        app_only: bool = False,
        tenant: str = TENANT,
        audience: str = AUDIENCE,
        issuer: str | None = None,
        version: Literal[1, 2] = 2,
        expires_in: int = 600,
        extra: Mapping[str, Any] | None = None,
        omit: tuple[str, ...] = (),
    ) -> dict[str, Any]:
        """The payload :meth:`token` signs; ``omit`` drops claims (after ``extra``)."""
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": issuer or self.issuer_for(tenant, version),
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
            "ver": "1.0" if version == 1 else "2.0",
        }
        if app_only:
            claims["idtyp"] = "app"
        elif scopes:
            claims["scp"] = " ".join(scopes)
        claims.update(extra or {})
        for name in omit:
            claims.pop(name, None)
        return claims

    def token(self, user: str, *, key: SigningKey | None = None, **claims: Any) -> str:
        """A token signed like Entra's; keyword arguments as for :meth:`claims`."""
        signer = key or self.keys[0]
        return sign(self.claims(user, **claims), signer)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        provider = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body: dict[str, Any]
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


def sign(claims: Mapping[str, Any], key: SigningKey) -> str:
    return jwt.encode(dict(claims), key.private, algorithm="RS256", headers={"kid": key.kid})


def forge(header: dict[str, Any], claims: dict[str, Any], secret: bytes | None = None) -> str:
    """A JWT assembled by hand: signed with HMAC-SHA256 keyed by ``secret``, or unsigned
    when ``None`` — the forgeries a validator must refuse."""
    signing_input = ".".join(
        b64url(json.dumps(part, separators=(",", ":")).encode()) for part in (header, claims)
    )
    if secret is None:
        return f"{signing_input}."
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(mac)}"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@contextmanager
def running_identity_provider(*, multi_tenant: bool = False) -> Iterator[IdentityProvider]:
    provider = IdentityProvider(multi_tenant=multi_tenant)
    server = ThreadingHTTPServer(("127.0.0.1", 0), provider._handler())
    provider.base_url = f"http://127.0.0.1:{server.server_address[1]}"
    # A short poll interval: shutdown() waits for the serving loop to notice.
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield provider
    finally:
        server.shutdown()
        server.server_close()
