"""Audit of the tools layer: secret redaction and a sink that never fails a call.

Every tool call and every approval step writes a
:class:`~tools.contracts.ToolAuditRecord`. Arguments go into the record only
through :func:`redact_arguments`, which replaces secret-looking values with
``"[redacted]"``: values under a secret-looking key (``password``, ``api_key``,
``authorization`` …, at any depth), and strings that look like a secret whatever
their key (JWTs, ``Bearer`` tokens, Lamina API keys, PEM private keys, cloud access
keys, passwords in URLs and connection strings, long random tokens).

Redaction errs on the side of hiding: a random-looking identifier may be redacted
too. Ordinary text, hexadecimal ids (UUIDs, hashes) and paths are kept.
"""

from __future__ import annotations

import logging
import math
import re
from collections import Counter
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from tools.contracts import JsonValue, ToolAuditRecord, ToolAuditSink

logger = logging.getLogger(__name__)

REDACTED = "[redacted]"

_MAX_DEPTH = 32
"""Deeper values are redacted whole: arguments are JSON a model wrote, not deep trees."""

# A key is compared in "compact" form: lower case, letters and digits only, so
# ``apiKey``, ``API-KEY`` and ``api_key`` are one key.
_SECRET_KEY_PARTS = (
    "password",
    "passwd",
    "passphrase",
    "secret",
    "apikey",
    "authorization",
    "credential",
    "privatekey",
    "connectionstring",
    "connstr",
    "cookie",
    "accesskey",
    "signingkey",
    "sessionkey",
)
_SECRET_KEY_SUFFIXES = ("token", "pwd", "sessionid")
"""``access_token`` or ``sessionId`` but not ``max_tokens`` or ``token_count``."""
_SECRET_KEY_WORDS = frozenset({"auth", "pwd", "pin", "otp", "sig"})
"""Secret only as a whole word of the key: ``auth`` but not ``author``."""
_INNOCENT_KEY_PARTS = ("secretar",)
"""Removed before matching: a ``secretary`` is a person, not a secret."""

_WORD = re.compile(r"[A-Z]?[a-z]+|[A-Z]+(?![a-z])|\d+")
_NOT_ALPHANUMERIC = re.compile(r"[^a-z0-9]")

# Secrets recognised by their shape, whatever key they are under; only the matching
# part of a longer string is replaced, so the rest stays readable.
_SECRET_PATTERNS: tuple[re.Pattern[str], ...] = (
    # PEM private keys, up to their END line (or the end of the text, if cut off).
    re.compile(
        r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----"
        r"(?:.*?-----END (?:[A-Z0-9]+ )*PRIVATE KEY-----|.*)",
        re.DOTALL,
    ),
    # JSON Web Tokens: base64url JSON header and payload ('{"' encodes as eyJ).
    re.compile(r"\beyJ[A-Za-z0-9_-]{6,}\.[A-Za-z0-9_-]{6,}\.[A-Za-z0-9_-]*"),
    # Authorization header values.
    re.compile(r"(?i)\bbearer\s+[A-Za-z0-9._~+/=-]{12,}"),
    re.compile(r"^Basic [A-Za-z0-9+/]{8,}={0,2}$"),
    # Lamina API keys: lam_<key id>_<secret>.
    re.compile(r"\blam_[A-Za-z0-9]{6,}_[A-Za-z0-9_-]{16,}"),
    # Cloud and SaaS keys with a recognisable prefix.
    re.compile(r"\b(?:AKIA|ASIA|AGPA|AIDA|AROA|ANPA|ANVA|AIPA)[A-Z0-9]{16}\b"),
    re.compile(r"\bAIza[0-9A-Za-z_-]{35}\b"),
    re.compile(r"\b(?:gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{30,})"),
    re.compile(r"\bxox[abposr]-[A-Za-z0-9-]{10,}"),
    re.compile(r"\bsk-(?:[A-Za-z0-9]+-)*[A-Za-z0-9_-]{20,}"),
)
# A secret that is one part of a longer value: only the secret part is replaced.
_SECRET_ASSIGNMENTS: tuple[re.Pattern[str], ...] = (
    # Connection strings: Password=...; AccountKey=...; SharedAccessSignature=...
    re.compile(
        r"(?i)\b((?:password|pwd|accountkey|sharedaccesskey|sharedaccesssignature"
        r"|client_?secret|api_?key|access_?token|sig)=)([^;&\s]+)"
    ),
    # Credentials in a URL: scheme://user:password@host
    re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://[^\s:/@]*:)([^\s/@]+)(?=@)"),
)

# Long random tokens (secrets without a known shape): a run of base64-ish characters
# that mixes upper case, lower case and digits, has a long unbroken stretch, high
# entropy, few word-like runs and few vowels. Identifiers, CamelCase names, product
# codes and paths fail at least one of these; hexadecimal (ids, hashes) has no upper
# case. A best effort: it catches most random tokens of 24+ characters, and keys
# (``client_secret`` …) catch the secrets that sit where a secret is expected.
_CANDIDATE_TOKEN = re.compile(r"[A-Za-z0-9+/=_-]{24,}")
_ALPHANUMERIC_RUN = re.compile(r"[A-Za-z0-9]+")
_WORDLIKE = re.compile(r"[A-Z][a-z]{2,}|[a-z]{4,}|[A-Z]{4,}")
_VOWELS = frozenset("aeiouAEIOU")
_MIN_TOKEN_CHARS = 24
_MIN_UNBROKEN_CHARS = 16
_MIN_TOKEN_ENTROPY_BITS = 4.0
_MAX_WORDLIKE_SHARE = 0.5
_MAX_VOWEL_SHARE = 0.3


def _compact_key(key: str) -> str:
    return _NOT_ALPHANUMERIC.sub("", key.lower())


def is_secret_key(key: str) -> bool:
    """Whether values under ``key`` are treated as secrets (``password``, ``apiKey`` …)."""
    compact = _compact_key(key)
    for innocent in _INNOCENT_KEY_PARTS:
        compact = compact.replace(innocent, "")
    if any(part in compact for part in _SECRET_KEY_PARTS):
        return True
    if compact.endswith(_SECRET_KEY_SUFFIXES):
        return True
    return any(word.lower() in _SECRET_KEY_WORDS for word in _WORD.findall(key))


def _entropy_bits(text: str) -> float:
    counts = Counter(text)
    total = len(text)
    return -sum(n / total * math.log2(n / total) for n in counts.values())


def _looks_random(token: str) -> bool:
    core = token.strip("=")
    if len(core) < _MIN_TOKEN_CHARS:
        return False
    if not (
        any(c.islower() for c in core)
        and any(c.isupper() for c in core)
        and any(c.isdigit() for c in core)
    ):
        return False
    if max(len(run) for run in _ALPHANUMERIC_RUN.findall(core)) < _MIN_UNBROKEN_CHARS:
        return False
    letters = [c for c in core if c.isalpha()]
    vowel_share = sum(c in _VOWELS for c in letters) / len(letters)
    wordlike_share = sum(len(word) for word in _WORDLIKE.findall(core)) / len(core)
    return (
        wordlike_share < _MAX_WORDLIKE_SHARE
        and vowel_share < _MAX_VOWEL_SHARE
        and _entropy_bits(core) >= _MIN_TOKEN_ENTROPY_BITS
    )


def redact_text(text: str) -> str:
    """``text`` with every part that looks like a secret replaced by ``"[redacted]"``."""
    for pattern in _SECRET_PATTERNS:
        text = pattern.sub(REDACTED, text)
    for pattern in _SECRET_ASSIGNMENTS:
        text = pattern.sub(lambda m: m.group(1) + REDACTED, text)
    return _CANDIDATE_TOKEN.sub(
        lambda m: REDACTED if _looks_random(m.group(0)) else m.group(0), text
    )


def _redact(value: Any, depth: int) -> JsonValue:
    if depth > _MAX_DEPTH:
        return REDACTED
    if isinstance(value, str):
        return redact_text(value)
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, Mapping):
        return {
            str(key): (
                REDACTED
                if is_secret_key(str(key)) and item is not None
                else _redact(item, depth + 1)
            )
            for key, item in value.items()
        }
    if isinstance(value, list | tuple | set | frozenset):
        return [_redact(item, depth + 1) for item in value]
    return redact_text(str(value))


def redact_arguments(arguments: Mapping[str, Any]) -> dict[str, JsonValue]:
    """A JSON-ready copy of ``arguments`` safe to audit and show: the values of
    secret-looking keys (at any depth, in dicts and lists) and secret-looking strings
    (whatever their key) replaced by ``"[redacted]"``. ``None`` stays ``None``: that a
    value was not given is no secret."""
    redacted = _redact(arguments, 0)
    return redacted if isinstance(redacted, dict) else {}


def utc_now() -> datetime:
    return datetime.now(UTC)


async def record_safely(sink: ToolAuditSink | None, entry: ToolAuditRecord) -> None:
    """Write ``entry`` to ``sink``, if there is one. A failing sink is logged and never
    fails the call or decision being audited: the work has happened either way."""
    if sink is None:
        return
    try:
        await sink.record(entry)
    except Exception:
        logger.exception(
            "tool audit sink failed to record %s of %s (approval %s)",
            entry.event,
            entry.tool,
            entry.approval_id,
        )
