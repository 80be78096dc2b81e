"""The web chat page in a real browser: Debian's headless Chromium, driven by Playwright,
loads the page from a ``lamina serve`` process (dev identity mode, the model played by
the scripted simulator through the real ``openai`` client) over a corpus with a
finance-only document.

In one browser session: a finance user asks, sees the streamed answer with a [1]
citation, opens it and reads the passage; an engineer asks the same and the finance
document is neither cited nor shown to the model; the engineer asks for a service-desk
ticket, approves the high-risk call on its card, and the answer continues.

Screenshots of each stage go to ``test-artifacts/web/`` at the repository root (or
``$LAMINA_TEST_ARTIFACTS/web/``).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, BrowserContext, Page, expect, sync_playwright

from inferencing.simulator import Fault, ScriptedReply, ScriptedToolCall, SimulatorServer
from tests.support.processes import REPO, free_port, ingest_corpus, lamina_process
from tests.support.simulator import simulator_env

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

BUDGET = "The Project Falcon budget is 4.2 million euros, approved by the board in March."
LEAVE = "Every employee gets 26 days of annual leave a year."
ACL = """
tenant: contoso
rules:
  - match: "finance/**"
    groups: [finance]
  - match: "handbook/**"
    public: true
"""
USERS = [
    {"id": "fay", "name": "Fay (finance)", "groups": ["finance"], "roles": ["employee"]},
    {"id": "eli", "name": "Eli (engineering)", "groups": ["engineering"], "roles": ["employee"]},
]
TICKET = {"title": "Broken laptop screen", "description": "The screen is cracked."}


def artifacts() -> Path:
    root = Path(os.environ.get("LAMINA_TEST_ARTIFACTS") or REPO / "test-artifacts")
    folder = root / "web"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@dataclass
class Service:
    url: str
    simulator: SimulatorServer


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    root = tmp_path_factory.mktemp("web")
    corpus, data = root / "corpus", root / "data"
    (corpus / "finance").mkdir(parents=True)
    (corpus / "handbook").mkdir()
    data.mkdir()
    (corpus / "acl.yaml").write_text(ACL)
    (corpus / "finance" / "falcon-budget.md").write_text(f"# Falcon budget\n\n{BUDGET}\n")
    (corpus / "handbook" / "leave.md").write_text(f"# Leave\n\n{LEAVE}\n")
    with SimulatorServer() as simulator:
        env = simulator_env(simulator, data, LAMINA_WEB__DEV_USERS=json.dumps(USERS))
        ingest_corpus(corpus, env)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        with lamina_process("serve", "--port", str(port), env=env, ready_url=f"{url}/readyz"):
            yield Service(url, simulator)


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrowserContext]:
    if not CHROMIUM.exists():
        pytest.fail(
            f"{CHROMIUM} is missing: install Debian's Chromium with "
            "'sudo apt-get install chromium' to run the browser tests"
        )
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")),
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_ARGS,
        )
        try:
            yield context
        finally:
            context.close()


@pytest.fixture
def page(browser: Browser | BrowserContext, service: Service) -> Iterator[Page]:
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(service.url)
    expect(page.locator("body")).to_have_attribute("data-ready", "true")
    yield page
    page.close()
    assert errors == [], errors


def search_then_answer(simulator: SimulatorServer, query: str, answer: str) -> None:
    """The model searches the knowledge base, is done planning, then answers."""
    simulator.script(
        ScriptedReply(
            tool_calls=[ScriptedToolCall(name="search_knowledge", arguments={"query": query})]
        ),
        ScriptedReply(content="I have what I need."),
        ScriptedReply(content=answer),
    )


def ask(page: Page, question: str) -> None:
    """Type the question and send it the keyboard way (Enter)."""
    page.get_by_label("Your question").fill(question)
    page.get_by_label("Your question").press("Enter")


def texts_sent_to_model(simulator: SimulatorServer) -> str:
    requests: list[Any] = [
        r.body for r in simulator.requests() if r.path.endswith("/chat/completions")
    ]
    return json.dumps(requests)


def test_ask_cite_trim_and_approve_in_a_real_browser(page: Page, service: Service) -> None:
    shots = artifacts()
    simulator = service.simulator

    # 1. Someone in finance asks; the answer streams in with a [1] citation.
    page.get_by_label("Act as").select_option(label="Fay (finance)")
    simulator.reset()
    search_then_answer(simulator, "Falcon budget", "The Falcon budget is 4.2 million euros [1].")
    ask(page, "What is the budget of Project Falcon?")
    answer = page.locator(".answer").last
    expect(answer).to_have_class("answer complete")
    expect(answer.locator(".answer-text")).to_contain_text("4.2 million euros")
    citation = answer.locator(".answer-text button.cite")
    expect(citation).to_have_text("[1]")
    expect(citation).to_have_attribute("aria-label", "Source 1: Falcon budget")
    expect(answer.locator(".sources")).to_contain_text("finance/falcon-budget.md")
    answer.get_by_text("How I answered").click()
    expect(answer.locator(".steps")).to_contain_text(re.compile(r"[1-9]\d* passage\(s\) found"))
    expect(answer.locator(".step-status").first).to_have_attribute("data-status", "ok")
    page.screenshot(path=str(shots / "1-streamed-answer.png"), full_page=True)

    # 2. The citation opens the passage, served through the ACL-checked route.
    citation.click()
    panel = page.get_by_role("complementary", name="Falcon budget")
    expect(panel).to_be_visible()
    expect(panel).to_be_focused()
    expect(panel.locator("#passage-text")).to_have_text(BUDGET)
    expect(panel.locator("#passage-source")).to_contain_text("finance/falcon-budget.md")
    page.screenshot(path=str(shots / "2-cited-passage.png"), full_page=True)
    page.keyboard.press("Escape")
    expect(panel).to_be_hidden()
    expect(citation).to_be_focused()

    # 3. An engineer asks the same: the finance document is not cited, not shown to
    #    the model, and not on the page.
    page.get_by_label("Act as").select_option(label="Eli (engineering)")
    expect(page.locator(".turn")).to_have_count(0)
    simulator.reset()
    search_then_answer(simulator, "Falcon budget", "I found no budget for Project Falcon [1].")
    ask(page, "What is the budget of Project Falcon?")
    answer = page.locator(".answer").last
    expect(answer).to_have_class("answer complete")
    # The finance memo is not among what the engineer's search found: any [1] cites a
    # page they may read; the explanation neither names nor counts the withheld match.
    expect(answer.locator(".answer-text")).to_contain_text("I found no budget for Project Falcon")
    expect(answer.locator(".sources")).not_to_contain_text("finance/")
    answer.get_by_text("How I answered").click()
    expect(answer.locator(".explain")).to_contain_text("passage(s) considered")
    expect(answer.locator(".explain")).not_to_contain_text("withheld")
    expect(answer.locator(".sources")).not_to_contain_text("falcon-budget")
    assert "4.2 million" not in page.locator("#messages").inner_text()
    assert "4.2 million" not in texts_sent_to_model(simulator)
    page.screenshot(path=str(shots / "3-restricted-not-cited.png"), full_page=True)

    # 4. A high-risk tool: the turn pauses on an approval card; approving resumes it.
    simulator.reset()
    simulator.script(
        ScriptedReply(
            tool_calls=[ScriptedToolCall(name="servicedesk-create_ticket", arguments=TICKET)]
        )
    )
    ask(page, "Please open a service-desk ticket: my laptop screen is cracked.")
    card = page.get_by_role("group", name="Approval needed")
    expect(card).to_be_visible()
    expect(card).to_contain_text("servicedesk-create_ticket")
    expect(card).to_contain_text("Broken laptop screen")
    page.screenshot(path=str(shots / "4-approval-card.png"), full_page=True)
    simulator.script(
        ScriptedReply(content="Done."), ScriptedReply(content="Ticket SD-1001 is open.")
    )
    card.get_by_role("button", name="Approve").click()
    answer = page.locator(".answer").last
    expect(answer).to_have_class("answer complete")
    expect(answer.locator(".answer-text")).to_have_text("Ticket SD-1001 is open.")
    expect(answer.locator(".decision")).to_have_text("servicedesk-create_ticket: approved")
    answer.get_by_text("How I answered").click()
    tool_step = answer.locator(".steps li", has_text="servicedesk-create_ticket")
    expect(tool_step.locator(".step-status")).to_have_attribute("data-status", "ok")
    expect(card).to_have_count(0)
    # The tool really ran: the model was given the ticket the tool created.
    assert "SD-1001" in texts_sent_to_model(simulator)
    page.screenshot(path=str(shots / "5-approved-and-answered.png"), full_page=True)

    # 5. The model fails while answering: a friendly error with the correlation id.
    simulator.reset()
    simulator.script(
        ScriptedReply(
            tool_calls=[ScriptedToolCall(name="search_knowledge", arguments={"query": "leave"})]
        ),
        ScriptedReply(content="I have what I need."),
        ScriptedReply(fault=Fault(kind="unavailable")),
    )
    ask(page, "How many days of annual leave do I get?")
    problem = page.locator(".answer").last.get_by_role("alert")
    expect(problem).to_contain_text("Reference for support:")
    expect(problem.locator("code")).to_have_text(re.compile(r"^\S{8,}$"))
    assert "Traceback" not in (problem.text_content() or "")
    page.screenshot(path=str(shots / "6-error-with-correlation-id.png"), full_page=True)

    # 6. The conversation is renamed from the keyboard, then deleted.
    conversations = page.get_by_role("navigation", name="Conversations")
    conversations.get_by_role("button", name="Rename").first.click()
    title = conversations.get_by_role("textbox")
    expect(title).to_be_focused()
    title.fill("Falcon and tickets")
    title.press("Enter")
    expect(conversations.locator(".conversation-open")).to_have_text(["Falcon and tickets"])
    page.once("dialog", lambda dialog: dialog.accept())
    conversations.get_by_role("button", name="Delete Falcon and tickets").click()
    expect(conversations.locator(".conversation-open")).to_have_count(0)
    expect(page.locator(".turn")).to_have_count(0)
