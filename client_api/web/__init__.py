"""The web chat page: ``GET /`` and its assets under ``/static``.

The page needs no build step: HTML, CSS and one ES module, served as files. What it
must know about this deployment (how to sign in) is written into the HTML as JSON
when the page is served, so there is no unauthenticated configuration API: the page
carries only what any sign-in page shows (the SPA's client id, authority and scopes)
or, in dev mode, the picker's sample users, who exist only in a demo.
"""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import urlsplit

from fastapi import FastAPI
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

from client_api.settings import LaminaSettings

WEB_DIR = Path(__file__).resolve().parent
STATIC_DIR = WEB_DIR / "static"
CONFIG_SLOT = "<!--lamina-config-->"
"""Where :func:`render_page` writes the page's configuration into ``index.html``."""


def page_config(settings: LaminaSettings) -> dict[str, object]:
    """How the page signs in: the picker's users in dev mode, MSAL's settings in jwt mode
    (``configured`` false when the SPA's client id or authority is missing, so the page
    can say which settings to set instead of failing at sign-in)."""
    web = settings.web
    if settings.auth.mode == "dev":
        return {
            "auth": "dev",
            "tenant": settings.auth.dev_tenant,
            "users": [user.model_dump() for user in web.dev_users],
        }
    return {
        "auth": "jwt",
        "configured": bool(web.client_id and web.authority),
        "clientId": web.client_id,
        "authority": web.authority,
        "scopes": web.api_scopes,
    }


def embed_json(value: object) -> str:
    """``value`` as JSON that is safe inside a ``<script>`` element: ``<``, ``>`` and ``&``
    become ``\\u`` escapes, so no string in it can close the element or open a comment
    (``json.dumps`` already escapes every non-ASCII character, U+2028/9 included)."""
    text = json.dumps(value)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def render_page(settings: LaminaSettings) -> str:
    template = (WEB_DIR / "index.html").read_text(encoding="utf-8")
    if template.count(CONFIG_SLOT) != 1:
        raise RuntimeError(f"index.html must contain {CONFIG_SLOT} exactly once")
    return template.replace(CONFIG_SLOT, embed_json(page_config(settings)))


def security_headers(settings: LaminaSettings) -> dict[str, str]:
    """A content security policy that allows this origin only, plus the Entra authority
    in jwt mode (MSAL fetches its metadata and tokens there, and renews them in a hidden
    frame): an injected script or style has nowhere to load from or send to."""
    sign_in = ""
    if settings.auth.mode == "jwt" and settings.web.authority:
        parts = urlsplit(settings.web.authority)
        sign_in = f" {parts.scheme}://{parts.netloc}"
    policy = (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        f"connect-src 'self'{sign_in}; frame-src 'self'{sign_in}; object-src 'none'; "
        "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    )
    return {
        "Content-Security-Policy": policy,
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        # The page is rendered from settings: revalidate, never serve a stale sign-in.
        "Cache-Control": "no-cache",
    }


def mount_web(app: FastAPI, settings: LaminaSettings) -> None:
    """Serve the page at ``/`` and its assets at ``/static`` (both without
    authentication: the page holds no data; everything it shows comes from the API
    with the user's credentials)."""
    if not settings.web.enabled:
        return
    page = render_page(settings)
    headers = security_headers(settings)

    @app.get("/", include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page, headers=headers)

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
