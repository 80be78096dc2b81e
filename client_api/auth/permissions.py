"""What an authenticated caller may do: app roles mapped to permissions, checked per route.

Entra ID puts the caller's app roles in the token's ``roles`` claim. Each route
needs one :class:`Permission`; the operator maps roles to permissions
(``LAMINA_AUTH__ROLE_PERMISSIONS``). Signed-in users who hold none of the mapped
roles get the default roles (``LAMINA_AUTH__DEFAULT_ROLES``): Entra sends no
``roles`` at all when app-role assignment is not required, and a role meant for
a tool (``employee``) should not lock a user out of chat. App-only tokens and
API keys get no default: a daemon or a key holds exactly what it was granted.

Default roles widen only this edge check; the principal passed down keeps the
roles the token carried, so a tool's own role check is never widened by them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from enum import StrEnum
from typing import TYPE_CHECKING

from intelligence.contracts import Principal

if TYPE_CHECKING:
    from client_api.settings import AuthSettings

log = logging.getLogger(__name__)


class Permission(StrEnum):
    """One thing a route lets a caller do."""

    CHAT = "chat"
    """POST /v1/chat and /v1/chat/stream."""
    CONVERSATIONS = "conversations"
    """List, read and delete one's own conversations."""
    MODELS = "models"
    """The OpenAI-compatible /v1/chat/completions and /v1/models."""
    USAGE_READ = "usage.read"
    """GET /v1/usage: the tenant's token usage and cost."""
    KEYS_MANAGE = "keys.manage"
    """Create, list and revoke API keys."""
    INGEST = "ingest"
    """POST /v1/jobs/ingest: put uploaded documents into the tenant's knowledge index."""
    AUDIT_READ = "audit.read"
    """GET /v1/audit: read and verify the tenant's audit log."""


ADMIN_ROLE = "Lamina.Admin"
USER_ROLE = "Lamina.User"
CONTENT_OWNER_ROLE = "Lamina.ContentOwner"
AUDITOR_ROLE = "Lamina.Auditor"

_USER_PERMISSIONS = (Permission.CHAT, Permission.CONVERSATIONS, Permission.MODELS)

ROLE_PERMISSIONS: Mapping[str, tuple[Permission, ...]] = {
    # Separation of duties: administrators do not read the audit log of their own actions.
    ADMIN_ROLE: tuple(p for p in Permission if p is not Permission.AUDIT_READ),
    AUDITOR_ROLE: (Permission.AUDIT_READ,),
    USER_ROLE: _USER_PERMISSIONS,
    # A content owner is a user too: holding only this role must not lock them out of chat.
    CONTENT_OWNER_ROLE: (Permission.INGEST, *_USER_PERMISSIONS),
}
"""The default mapping of ``LAMINA_AUTH__ROLE_PERMISSIONS``."""


class PermissionDenied(Exception):
    """The caller is authenticated but may not do this (403); the message is safe to return."""

    def __init__(
        self,
        message: str,
        *,
        permission: Permission | None = None,
        required_scopes: tuple[str, ...] = (),
    ) -> None:
        super().__init__(message)
        self.message = message
        self.permission = permission
        self.required_scopes = required_scopes


def is_signed_in_user(principal: Principal) -> bool:
    """A person, not a daemon or a key: a delegated token (it carries ``scp``) or dev mode."""
    if principal.auth_method == "dev":
        return True
    return principal.auth_method == "jwt" and bool(principal.scopes)


class PermissionPolicy:
    """Decides whether a principal holds a permission; one per app, built from settings."""

    def __init__(
        self,
        role_permissions: Mapping[str, Iterable[str]],
        *,
        default_roles: Iterable[str] = (),
        required_scopes: Iterable[str] = (),
    ) -> None:
        self._grants = {
            role: frozenset(Permission(p) for p in permissions)
            for role, permissions in role_permissions.items()
        }
        self._default_roles = frozenset(default_roles)
        self._required_scopes = tuple(dict.fromkeys(required_scopes))
        unmapped = sorted(self._default_roles - self._grants.keys())
        if unmapped:
            # Likely a typo: such a default grants nothing, so users would get 403s.
            log.warning("default roles %s grant no permission: not in role_permissions", unmapped)

    @classmethod
    def from_settings(cls, settings: AuthSettings) -> PermissionPolicy:
        return cls(
            settings.role_permissions,
            default_roles=settings.default_roles,
            required_scopes=settings.required_scopes,
        )

    def roles(self, principal: Principal) -> frozenset[str]:
        """The roles the check counts: the principal's, or the defaults for a user without any."""
        if self._grants.keys().isdisjoint(principal.roles) and is_signed_in_user(principal):
            return principal.roles | self._default_roles
        return principal.roles

    def permissions(self, principal: Principal) -> frozenset[Permission]:
        granted: set[Permission] = set()
        for role in self.roles(principal):
            granted |= self._grants.get(role, frozenset())
        return frozenset(granted)

    def check(self, principal: Principal, permission: Permission) -> None:
        """Return if ``principal`` may use ``permission``; raise :class:`PermissionDenied`."""
        if (
            self._required_scopes
            and principal.auth_method == "jwt"
            and principal.scopes
            and principal.scopes.isdisjoint(self._required_scopes)
        ):
            raise PermissionDenied(
                "The token was not issued for this API: it needs one of the scopes "
                + ", ".join(repr(s) for s in self._required_scopes)
                + ".",
                required_scopes=self._required_scopes,
            )
        if permission not in self.permissions(principal):
            raise PermissionDenied(
                f"This needs the {permission.value!r} permission, which your roles do not grant.",
                permission=permission,
            )
