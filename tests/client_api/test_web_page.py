"""The web chat page and the API routes only it needed: ``GET /`` and ``/static`` served
without credentials, the page's accessibility basics and its safely embedded
configuration, ``GET /v1/chunks/{id}`` (a cited passage, ACL-checked) and
``PATCH /v1/conversations/{id}`` (rename).

A real Lamina app on loopback (the extractive answerer) over a small corpus whose
payroll page only finance may read. The page driven by a browser is
``tests/e2e/test_web_browser.py``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from html.parser import HTMLParser
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from client_api.app import create_app
from client_api.settings import DevUser, LaminaSettings
from client_api.web import STATIC_DIR, render_page, security_headers
from tests.client_api.corpus import dev_headers, dev_settings, ingest_corpus
from tests.support.processes import app_in_thread

HANDBOOK = "# Leave\n\nEvery employee gets 26 days of annual leave a year.\n"
PAYROLL = "# Payroll\n\nSalaries are paid on the 25th; the payroll cutoff is the 18th.\n"
FINANCE = dev_headers("fay", groups="finance")
OTHER = dev_headers("otto", groups="engineering")


@pytest.fixture(scope="module")
def lamina(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    data = ingest_corpus(tmp_path_factory, handbook=HANDBOOK, payroll=PAYROLL)
    with app_in_thread(create_app(dev_settings(data))) as base:
        yield base


class PageParser(HTMLParser):
    """What the accessibility checks need from the page: the root language, the form
    controls and buttons, the labels, and the embedded configuration."""

    def __init__(self) -> None:
        super().__init__()
        self.lang: str | None = None
        self.controls: list[dict[str, str | None]] = []
        self.label_targets: set[str] = set()
        self.landmarks: set[str] = set()
        self.live_regions: list[str] = []
        self._in_config = False
        self.config_text = ""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if tag == "html":
            self.lang = found.get("lang")
        if tag in {"input", "select", "textarea"}:
            self.controls.append(found)
        if tag == "label" and found.get("for"):
            self.label_targets.add(str(found["for"]))
        if tag in {"header", "nav", "main", "aside"}:
            self.landmarks.add(tag)
        if found.get("aria-live"):
            self.live_regions.append(str(found.get("id")))
        self._in_config = tag == "script" and found.get("id") == "lamina-config"

    def handle_endtag(self, tag: str) -> None:
        if tag == "script":
            self._in_config = False

    def handle_data(self, data: str) -> None:
        if self._in_config:
            self.config_text += data


def parse(html: str) -> PageParser:
    parser = PageParser()
    parser.feed(html)
    return parser


# --- the page -------------------------------------------------------------------------------


def test_the_page_and_its_assets_are_served_without_credentials(lamina: str) -> None:
    page = httpx.get(f"{lamina}/", timeout=10)
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "frame-ancestors 'none'" in policy
    for asset, kind in [
        ("app.js", "javascript"),
        ("styles.css", "text/css"),
        ("vendor/msal-browser/msal-browser.min.js", "javascript"),
    ]:
        response = httpx.get(f"{lamina}/static/{asset}", timeout=10)
        assert response.status_code == 200, asset
        assert kind in response.headers["content-type"], asset
    licence = httpx.get(f"{lamina}/static/vendor/msal-browser/LICENSE", timeout=10)
    assert licence.text.startswith("MIT License")
    # The API behind the page is not open: the page holds no data of its own.
    assert httpx.get(f"{lamina}/v1/conversations", timeout=10).status_code == 401


def test_the_page_is_labelled_for_assistive_technology(lamina: str) -> None:
    page = parse(httpx.get(f"{lamina}/", timeout=10).text)
    assert page.lang == "en"
    assert {"header", "nav", "main", "aside"} <= page.landmarks
    unlabelled = [c for c in page.controls if c.get("id") not in page.label_targets]
    assert page.controls and unlabelled == []
    assert "status" in page.live_regions


def test_dev_mode_embeds_the_pickers_users(lamina: str) -> None:
    config = json.loads(parse(httpx.get(f"{lamina}/", timeout=10).text).config_text)
    assert config["auth"] == "dev" and config["tenant"] == "contoso"
    by_id = {user["id"]: user for user in config["users"]}
    assert by_id["dana"]["groups"] == ["engineering"]
    assert by_id["megan.bowen@contoso.com"]["groups"] == ["finance"]
    assert all("employee" in user["roles"] for user in config["users"])


def test_embedded_configuration_cannot_break_out_of_its_script_element(
    tmp_path: Any,
) -> None:
    hostile = "</script><script>alert(1)</script><!-- & \u2028"
    settings = dev_settings(
        tmp_path, web={"dev_users": [DevUser(id="x", name=hostile, groups=[hostile])]}
    )
    html = render_page(settings)
    assert "<script>alert" not in html and "<!-- &" not in html
    # Still the same data once parsed as the browser would.
    config = json.loads(parse(html).config_text)
    assert config["users"][0]["name"] == hostile
    assert config["users"][0]["groups"] == [hostile]


def test_jwt_mode_embeds_msal_settings_and_allows_the_authority(tmp_path: Any) -> None:
    settings = LaminaSettings(
        data_dir=tmp_path,
        auth={"openid_config_url": "https://login.example/v2.0/.well-known", "audience": "api"},
        web={
            "client_id": "spa-client",
            "authority": "https://login.microsoftonline.com/contoso-tenant",
            "api_scopes": ["api://lamina/Chat"],
        },
    )
    page = TestClient(create_app(settings)).get("/")
    assert page.status_code == 200
    config = json.loads(parse(page.text).config_text)
    assert config == {
        "auth": "jwt",
        "configured": True,
        "clientId": "spa-client",
        "authority": "https://login.microsoftonline.com/contoso-tenant",
        "scopes": ["api://lamina/Chat"],
    }
    policy = page.headers["content-security-policy"]
    assert "connect-src 'self' https://login.microsoftonline.com;" in policy
    unconfigured = LaminaSettings(data_dir=tmp_path, auth={"openid_config_url": "x"})
    assert "login" not in security_headers(unconfigured)["Content-Security-Policy"]


def test_the_page_can_be_switched_off(tmp_path: Any) -> None:
    client = TestClient(create_app(dev_settings(tmp_path, web={"enabled": False})))
    assert client.get("/").status_code == 404
    assert client.get("/static/app.js").status_code == 404


def _channel(hex_colour: str, offset: int) -> float:
    value = int(hex_colour[offset : offset + 2], 16) / 255
    return value / 12.92 if value <= 0.03928 else ((value + 0.055) / 1.055) ** 2.4


def contrast(foreground: str, background: str) -> float:
    """The WCAG 2 contrast ratio of two ``#rrggbb`` colours."""

    def luminance(colour: str) -> float:
        r, g, b = (_channel(colour, i) for i in (1, 3, 5))
        return 0.2126 * r + 0.7152 * g + 0.0722 * b

    lighter, darker = sorted((luminance(foreground), luminance(background)), reverse=True)
    return (lighter + 0.05) / (darker + 0.05)


def test_text_colours_meet_wcag_aa_contrast() -> None:
    css = (STATIC_DIR / "styles.css").read_text()
    colours = dict(re.findall(r"--([\w-]+):\s*(#[0-9a-fA-F]{6});", css))
    pairs = [
        ("text", "background"),
        ("text", "surface"),
        ("text", "accent-soft"),
        ("text", "warning-background"),
        ("muted", "background"),
        ("muted", "surface"),
        ("accent", "background"),
        ("accent", "surface"),
        ("accent", "accent-soft"),
        ("accent-text", "accent"),
        ("danger", "background"),
        ("warning-text", "warning-background"),
    ]
    failing = {
        pair: round(ratio, 2)
        for pair in pairs
        if (ratio := contrast(colours[pair[0]], colours[pair[1]])) < 4.5
    }
    assert failing == {}
    # The focus ring must stand out against the page (non-text contrast, 3:1).
    assert contrast(colours["focus"], colours["background"]) >= 3


# --- GET /v1/chunks/{chunk_id} ---------------------------------------------------------------


def cited(base: str, headers: dict[str, str], question: str) -> list[dict[str, Any]]:
    response = httpx.post(
        f"{base}/v1/chat", json={"message": question}, headers=headers, timeout=30
    )
    assert response.status_code == 200, response.text
    citations: list[dict[str, Any]] = response.json()["citations"]
    return citations


def test_a_cited_passage_is_readable_by_whoever_may_see_it(lamina: str) -> None:
    [payroll] = [
        c
        for c in cited(lamina, FINANCE, "When is the payroll cutoff?")
        if c["source"] == "payroll/accounts.md"
    ]
    response = httpx.get(f"{lamina}/v1/chunks/{payroll['chunk_id']}", headers=FINANCE, timeout=10)
    assert response.status_code == 200, response.text
    passage = response.json()
    assert passage["chunk_id"] == payroll["chunk_id"]
    assert passage["source"] == "payroll/accounts.md"
    assert passage["title"] == payroll["title"]
    assert "the payroll cutoff is the 18th" in passage["text"]


def test_a_hidden_passage_is_the_same_404_as_a_missing_one(lamina: str) -> None:
    [payroll] = [
        c
        for c in cited(lamina, FINANCE, "When is the payroll cutoff?")
        if c["source"] == "payroll/accounts.md"
    ]
    # Someone outside finance asking the same question is never shown the payroll page...
    assert all(c["source"] != "payroll/accounts.md" for c in cited(lamina, OTHER, "payroll cutoff"))
    # ...nor can they read it by its id, and cannot tell it exists.
    hidden = httpx.get(f"{lamina}/v1/chunks/{payroll['chunk_id']}", headers=OTHER, timeout=10)
    missing = httpx.get(f"{lamina}/v1/chunks/{'0' * 32}-00000", headers=OTHER, timeout=10)
    assert hidden.status_code == missing.status_code == 404
    assert hidden.headers["content-type"].startswith("application/problem+json")
    strip = {"correlation_id"}

    def comparable(body: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in body.items() if k not in strip}

    assert comparable(hidden.json()) == comparable(missing.json())
    unauthenticated = httpx.get(f"{lamina}/v1/chunks/{payroll['chunk_id']}", timeout=10)
    assert unauthenticated.status_code == 401


# --- PATCH /v1/conversations/{id} ------------------------------------------------------------


def test_the_owner_renames_a_conversation_and_nobody_else_can(lamina: str) -> None:
    owner = dev_headers("rena")
    started = httpx.post(
        f"{lamina}/v1/chat", json={"message": "How much annual leave?"}, headers=owner, timeout=30
    )
    conversation = started.json()["conversation_id"]
    url = f"{lamina}/v1/conversations/{conversation}"

    renamed = httpx.patch(url, json={"title": "  Leave 2025  "}, headers=owner, timeout=10)
    assert renamed.status_code == 200, renamed.text
    assert (renamed.json()["id"], renamed.json()["title"]) == (conversation, "Leave 2025")
    listed = httpx.get(f"{lamina}/v1/conversations", headers=owner, timeout=10).json()
    assert [(c["id"], c["title"]) for c in listed["items"]] == [(conversation, "Leave 2025")]

    stranger = httpx.patch(url, json={"title": "Mine now"}, headers=OTHER, timeout=10)
    assert stranger.status_code == 404
    unknown = httpx.patch(
        f"{lamina}/v1/conversations/{'0' * 32}", json={"title": "x"}, headers=owner, timeout=10
    )
    assert unknown.status_code == 404
    for body in ({"title": "   "}, {"title": ""}, {"title": "x" * 201}, {"name": "x"}):
        assert httpx.patch(url, json=body, headers=owner, timeout=10).status_code == 422, body
    after = httpx.get(url, headers=owner, timeout=10).json()
    assert after["title"] == "Leave 2025"
