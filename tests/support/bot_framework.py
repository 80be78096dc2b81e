"""The Bot Framework around a Teams bot, as real servers on loopback.

- :class:`BotFrameworkChannel` (http): the channel's OpenID metadata and JWKS, and
  inbound tokens signed like the channel's (``iss`` https://api.botframework.com,
  ``aud`` the bot's App ID, a ``serviceurl`` claim).
- :class:`EntraTenant` (https, with its own CA: MSAL accepts only https authorities):
  the bot's tenant with its OpenID metadata and JWKS (Entra-issued inbound tokens of a
  single-tenant bot) and the OAuth token endpoint (client credentials → distinct
  opaque tokens, every request recorded). Point ``LAMINA_TEAMS__TOKEN_URL`` at
  :attr:`EntraTenant.token_url` and trust :attr:`EntraTenant.ca_file` (the provider's
  ``ca_bundle``, or ``REQUESTS_CA_BUNDLE``).
- :class:`BotConnector` (http): records every call to ``/v3/conversations/...`` and
  answers ``{"id": ...}``; use its :attr:`~BotConnector.service_url` as the activity's
  ``serviceUrl``.

And the Lamina side of it: :func:`teams_settings` registers the bot with these fakes,
:func:`teams_activity` builds what the channel posts, and :class:`ServedBot` posts it
signed to a Lamina app and reads the replies the connector recorded.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import sqlite3
import ssl
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar
from urllib.parse import parse_qs, unquote

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from client_api.settings import TEAMS_SERVICE_URL_HOSTS
from tests.support.identity import SigningKey, sign

APP_ID = "5e2a7c1d-0000-4000-8000-0000000b0a11"
APP_SECRET = "bot-secret-for-tests"
BOT_TENANT = "7d1c6a3e-0000-4000-8000-00000000e17a"
CHANNEL_ISSUER = "https://api.botframework.com"
CONNECTOR_SCOPE = "https://api.botframework.com/.default"
TEAMS_TENANT = BOT_TENANT
"""The tenant the Teams activities come from: the bot's own, the only one a bot serves
without ``LAMINA_AUTH__ALLOWED_TENANTS``."""
CHANNEL_APP_ID = "0c4a9e52-0000-4000-8000-0000000c4a11"
"""The caller (``azp``/``appid``) of the Entra-issued inbound tokens :class:`EntraTenant`
mints, listed in ``LAMINA_TEAMS__CHANNEL_APP_IDS`` by :func:`teams_settings`."""
LOOPBACK_SERVICE_HOST = "http://127.0.0.1"
"""The fake connector's host, allowed as a ``serviceUrl`` by :func:`teams_settings`."""


class _Handler(BaseHTTPRequestHandler):
    """Routes every request to the server's ``fake.handle``."""

    fake: _Fake

    def _dispatch(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        status, payload = self.fake.handle(self.command, self.path, dict(self.headers), body)
        data = json.dumps(payload).encode() if payload is not None else b""
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_DELETE = _dispatch

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Fake:
    base_url: str = ""

    def handle(
        self, method: str, path: str, headers: Mapping[str, str], body: bytes
    ) -> tuple[int, Any]:
        raise NotImplementedError


@contextmanager
def _serving(fake: _Fake, *, tls: ssl.SSLContext | None = None) -> Iterator[None]:
    handler = type("Handler", (_Handler,), {"fake": fake})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    scheme = "https" if tls is not None else "http"
    fake.base_url = f"{scheme}://127.0.0.1:{server.server_address[1]}"
    # A short poll interval: shutdown() waits for the serving loop to notice.
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()


# --- the channel ---------------------------------------------------------------------------


@dataclass
class BotFrameworkChannel(_Fake):
    """The Bot Framework channel's OpenID metadata + JWKS; mints inbound tokens."""

    keys: list[SigningKey] = field(default_factory=lambda: [SigningKey(kid="bf-key-1")])
    jwks_requests: int = 0

    @property
    def config_url(self) -> str:
        return f"{self.base_url}/v1/.well-known/openidconfiguration"

    def claims(
        self,
        service_url: str,
        *,
        app_id: str = APP_ID,
        issuer: str = CHANNEL_ISSUER,
        expires_in: int = 600,
        not_before_in: int = -5,
        extra: Mapping[str, Any] | None = None,
        omit: tuple[str, ...] = (),
    ) -> dict[str, Any]:
        """The payload :meth:`token` signs; ``omit`` drops claims (after ``extra``)."""
        now = int(time.time())
        claims: dict[str, Any] = {
            "serviceurl": service_url,
            "nbf": now + not_before_in,
            "exp": now + expires_in,
            "iss": issuer,
            "aud": app_id,
        }
        claims.update(extra or {})
        for name in omit:
            claims.pop(name, None)
        return claims

    def token(self, service_url: str, *, key: SigningKey | None = None, **claims: Any) -> str:
        """A token signed like the channel's; keyword arguments as for :meth:`claims`."""
        return sign(self.claims(service_url, **claims), key or self.keys[0])

    def authorization(self, service_url: str, **claims: Any) -> str:
        """The ``Authorization`` header the channel sends."""
        return f"Bearer {self.token(service_url, **claims)}"

    def handle(
        self, method: str, path: str, headers: Mapping[str, str], body: bytes
    ) -> tuple[int, Any]:
        if method == "GET" and path == "/v1/.well-known/openidconfiguration":
            return 200, {
                "issuer": CHANNEL_ISSUER,
                "jwks_uri": f"{self.base_url}/v1/.well-known/keys",
                "id_token_signing_alg_values_supported": ["RS256"],
            }
        if method == "GET" and path == "/v1/.well-known/keys":
            self.jwks_requests += 1
            return 200, {"keys": [{**k.jwk(), "endorsements": ["msteams"]} for k in self.keys]}
        return 404, {"error": "not found"}


@contextmanager
def running_channel() -> Iterator[BotFrameworkChannel]:
    channel = BotFrameworkChannel()
    with _serving(channel):
        yield channel


# --- the bot's Entra tenant ----------------------------------------------------------------


@dataclass(frozen=True)
class TokenRequest:
    """One form POST to the token endpoint."""

    grant_type: str | None
    client_id: str | None
    client_secret: str | None
    scope: str | None
    issued: str | None
    """The access token answered; ``None`` when the credentials were refused."""


@dataclass
class EntraTenant(_Fake):
    """The bot's tenant: OpenID metadata, JWKS and the client-credentials token endpoint."""

    tenant: str = BOT_TENANT
    client_id: str = APP_ID
    client_secret: str = APP_SECRET
    expires_in: int = 3600
    """``expires_in`` of the tokens issued; set it to change the next ones."""
    keys: list[SigningKey] = field(default_factory=lambda: [SigningKey(kid="entra-key-1")])
    token_requests: list[TokenRequest] = field(default_factory=list)
    ca_file: str = ""
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def authority(self) -> str:
        return f"{self.base_url}/{self.tenant}"

    @property
    def token_url(self) -> str:
        return f"{self.authority}/oauth2/v2.0/token"

    @property
    def config_url(self) -> str:
        return f"{self.authority}/v2.0/.well-known/openid-configuration"

    @property
    def issued(self) -> list[str]:
        """Every access token issued, oldest first."""
        return [r.issued for r in self.token_requests if r.issued is not None]

    def token(
        self,
        service_url: str | None = None,
        *,
        version: int = 2,
        app_id: str = APP_ID,
        caller: str = CHANNEL_APP_ID,
        expires_in: int = 600,
        key: SigningKey | None = None,
    ) -> str:
        """An inbound token issued by Entra for this tenant (single-tenant bots), requested
        by the application ``caller`` (``azp`` in v2, ``appid`` in v1)."""
        now = int(time.time())
        issuer = (
            f"https://login.microsoftonline.com/{self.tenant}/v2.0"
            if version == 2
            else f"https://sts.windows.net/{self.tenant}/"
        )
        claims: dict[str, Any] = {
            "iss": issuer,
            "aud": app_id,
            "tid": self.tenant,
            "nbf": now - 5,
            "exp": now + expires_in,
            "ver": f"{version}.0",
            ("azp" if version == 2 else "appid"): caller,
        }
        if service_url is not None:
            claims["serviceurl"] = service_url
        return sign(claims, key or self.keys[0])

    def handle(
        self, method: str, path: str, headers: Mapping[str, str], body: bytes
    ) -> tuple[int, Any]:
        prefix = f"/{self.tenant}"
        if (
            method == "GET"
            and path.split("?")[0] == f"{prefix}/v2.0/.well-known/openid-configuration"
        ):
            return 200, {
                "issuer": f"https://login.microsoftonline.com/{self.tenant}/v2.0",
                "authorization_endpoint": f"{self.authority}/oauth2/v2.0/authorize",
                "token_endpoint": self.token_url,
                "jwks_uri": f"{self.authority}/discovery/v2.0/keys",
                "id_token_signing_alg_values_supported": ["RS256"],
            }
        if method == "GET" and path == f"{prefix}/discovery/v2.0/keys":
            return 200, {"keys": [k.jwk() for k in self.keys]}
        if method == "POST" and path.split("?")[0] == f"{prefix}/oauth2/v2.0/token":
            return self._token(body)
        return 404, {"error": "not_found"}

    def _token(self, body: bytes) -> tuple[int, Any]:
        form = {k: v[0] for k, v in parse_qs(body.decode()).items()}
        granted = (
            form.get("grant_type") == "client_credentials"
            and form.get("client_id") == self.client_id
            and form.get("client_secret") == self.client_secret
        )
        with self._lock:
            issued = f"bot-token-{len(self.token_requests) + 1}-{uuid.uuid4().hex[:8]}"
            self.token_requests.append(
                TokenRequest(
                    grant_type=form.get("grant_type"),
                    client_id=form.get("client_id"),
                    client_secret=form.get("client_secret"),
                    scope=form.get("scope"),
                    issued=issued if granted else None,
                )
            )
        if not granted:
            return 401, {
                "error": "invalid_client",
                "error_description": "AADSTS7000215: Invalid client secret provided.",
            }
        return 200, {
            "token_type": "Bearer",
            "expires_in": self.expires_in,
            "ext_expires_in": self.expires_in,
            "access_token": issued,
        }


@contextmanager
def running_entra_tenant(**options: Any) -> Iterator[EntraTenant]:
    tenant = EntraTenant(**options)
    with tempfile.TemporaryDirectory() as directory:
        tls = _loopback_tls(Path(directory))
        tenant.ca_file = str(Path(directory) / "ca.pem")
        with _serving(tenant, tls=tls):
            yield tenant


def _loopback_tls(directory: Path) -> ssl.SSLContext:
    """A CA (written to ``ca.pem``) and a server certificate for 127.0.0.1 it signed."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Lamina test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    (directory / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_file, key_file = directory / "server.pem", directory / "server.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)
    return context


# --- the Bot Connector ---------------------------------------------------------------------


@dataclass(frozen=True)
class ConnectorCall:
    """One request to the Bot Connector."""

    method: str
    path: str
    conversation_id: str
    activity_id: str | None
    """The activity replied to / updated / deleted; ``None`` for a new activity."""
    authorization: str | None
    body: Any


@dataclass
class BotConnector(_Fake):
    """Records ``/v3/conversations/{id}/activities[/{activityId}]`` and answers ``{"id"}``."""

    calls: list[ConnectorCall] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _ids: int = 0

    @property
    def service_url(self) -> str:
        return f"{self.base_url}/"

    def handle(
        self, method: str, path: str, headers: Mapping[str, str], body: bytes
    ) -> tuple[int, Any]:
        parts = path.split("?")[0].split("/")
        # ["", "v3", "conversations", id, "activities", (activityId)]
        if len(parts) not in (5, 6) or parts[1:3] != ["v3", "conversations"]:
            return 404, {"error": {"code": "NotFound", "message": path}}
        if parts[4] != "activities":
            return 404, {"error": {"code": "NotFound", "message": path}}
        activity_id = unquote(parts[5]) if len(parts) == 6 else None
        if activity_id is None and method != "POST":
            return 405, {"error": {"code": "MethodNotAllowed", "message": method}}
        authorization = next((v for k, v in headers.items() if k.lower() == "authorization"), None)
        with self._lock:
            self._ids += 1
            new_id = f"activity-{self._ids}"
            self.calls.append(
                ConnectorCall(
                    method=method,
                    path=path,
                    conversation_id=unquote(parts[3]),
                    activity_id=activity_id,
                    authorization=authorization,
                    body=json.loads(body) if body else None,
                )
            )
        if method == "DELETE":
            return 200, None
        if method == "PUT" and activity_id is not None:
            return 200, {"id": activity_id}
        return 200, {"id": new_id}


AnyConnector = TypeVar("AnyConnector", bound=BotConnector)


@contextmanager
def running_bot_connector(connector: AnyConnector) -> Iterator[AnyConnector]:
    """Serves ``connector`` (a :class:`BotConnector`, or one that fails or waits on cue)."""
    with _serving(connector):
        yield connector


# --- Lamina as the channel sees it ---------------------------------------------------------


def teams_settings(
    channel: BotFrameworkChannel | None = None,
    tenant: EntraTenant | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Lamina's ``teams`` settings for the bot registered with these fakes: inbound tokens
    from ``channel``, and (a single-tenant bot) replies with tokens from ``tenant``; the
    fake connector on loopback is an allowed ``serviceUrl``."""
    values: dict[str, Any] = {
        "enabled": True,
        "app_id": APP_ID,
        "app_secret": APP_SECRET,
        "channel_app_ids": [CHANNEL_APP_ID],
        "service_url_hosts": [*TEAMS_SERVICE_URL_HOSTS, LOOPBACK_SERVICE_HOST],
    }
    if channel is not None:
        values["openid_config_url"] = channel.config_url
    if tenant is not None:
        values |= {"app_tenant_id": BOT_TENANT, "token_url": tenant.token_url}
    return values | overrides


def teams_activity(
    service_url: str,
    text: str | None = None,
    *,
    user: str = "ana",
    conversation: str | None = None,
    kind: str = "personal",
    tenant: str = TEAMS_TENANT,
    **fields: Any,
) -> dict[str, Any]:
    """A Teams activity from ``user`` (a new conversation unless named); ``fields`` set
    type, value, entities, … ."""
    activity: dict[str, Any] = {
        "type": "message",
        "id": f"1{uuid.uuid4().int % 10**12}",
        "timestamp": "2025-01-01T10:00:00.000Z",
        "channelId": "msteams",
        "serviceUrl": service_url,
        "from": {"id": f"29:{user}", "name": user.title(), "aadObjectId": user},
        "recipient": {"id": f"28:{APP_ID}", "name": "Lamina"},
        "conversation": {
            "id": conversation or f"a:{uuid.uuid4().hex}",
            "conversationType": kind,
            "tenantId": tenant,
        },
    }
    if text is not None:
        activity["text"] = text
    return activity | fields


def stream_info(call: ConnectorCall) -> dict[str, Any] | None:
    """The ``streaminfo`` entity of a streamed reply; ``None`` on a plain message."""
    entities = call.body.get("entities") or []
    return next((e for e in entities if e.get("type") == "streaminfo"), None)


def citations(call: ConnectorCall) -> list[dict[str, Any]]:
    """The ``Claim`` citations of a reply's ``Message`` entity."""
    entities = call.body.get("entities") or []
    message = next((e for e in entities if e.get("@type") == "Message"), {})
    return list(message.get("citation") or [])


@dataclass
class ServedBot(Generic[AnyConnector]):
    """A Lamina app serving the Teams bot at ``base_url``, with the Bot Framework fakes
    around it and its data directory."""

    base_url: str
    channel: BotFrameworkChannel
    tenant: EntraTenant
    connector: AnyConnector
    data: Path
    reply_timeout_s: ClassVar[float] = 30.0

    def activity(self, text: str | None = None, **options: Any) -> dict[str, Any]:
        """:func:`teams_activity` with replies going to this bot's connector."""
        return teams_activity(self.connector.service_url, text, **options)

    def post(self, activity: dict[str, Any]) -> httpx.Response:
        """Posts ``activity`` signed like the channel's, for its ``serviceUrl``."""
        return self.post_as(activity, self.channel.authorization(activity["serviceUrl"]))

    def post_as(self, activity: dict[str, Any], authorization: str | None) -> httpx.Response:
        """Posts ``activity`` with this ``Authorization`` header (none when ``None``)."""
        headers = {"Authorization": authorization} if authorization is not None else {}
        return httpx.post(
            f"{self.base_url}/api/messages", json=activity, headers=headers, timeout=30
        )

    def calls_of(self, conversation: str) -> list[ConnectorCall]:
        with self.connector._lock:
            return [c for c in self.connector.calls if c.conversation_id == conversation]

    def final_reply(self, conversation: str) -> list[ConnectorCall]:
        """The conversation's calls, once its answer (a ``message``) has arrived."""
        deadline = time.monotonic() + self.reply_timeout_s
        while time.monotonic() < deadline:
            calls = self.calls_of(conversation)
            if any(c.body["type"] == "message" for c in calls):
                return calls
            time.sleep(0.05)
        raise AssertionError(f"no reply in {conversation}: {self.calls_of(conversation)}")

    def questions(self) -> list[str]:
        """Every user message Lamina stored."""
        with sqlite3.connect(self.data / "conversations.db") as db:
            return [r[0] for r in db.execute("SELECT content FROM messages WHERE role = 'user'")]
