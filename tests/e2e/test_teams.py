"""The Teams bot in a real ``lamina serve`` process: the Bot Framework channel, the bot's
Entra tenant (an https token endpoint with its own CA, trusted through
``REQUESTS_CA_BUNDLE``) and the Bot Connector as servers on loopback, and the simulator
as the model, slow enough that a 1:1 answer streams in several chunks."""

from __future__ import annotations

import itertools
import json
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from inferencing.simulator import (
    ScriptedReply,
    ScriptedToolCall,
    SimulatorConfig,
    SimulatorServer,
)
from tests.support.bot_framework import (
    APP_ID,
    APP_SECRET,
    BOT_TENANT,
    BotConnector,
    BotFrameworkChannel,
    ConnectorCall,
    EntraTenant,
    _serving,
    running_channel,
    running_entra_tenant,
)
from tests.support.identity import SigningKey
from tests.support.processes import free_port, lamina_process, run_lamina
from tests.support.simulator import simulator_env

pytestmark = pytest.mark.slow

TENANT = "contoso"
FACT = "The cafeteria on floor three opens at 7:30 every weekday."
ANSWER = (
    "The cafeteria on floor three opens at 7:30 every weekday [1], so breakfast is "
    "served before the first meetings of the morning."
)
TOKENS_PER_SECOND = 10.0
"""Slow enough that the answer takes seconds, and the stream has several updates."""


@dataclass
class TimedConnector(BotConnector):
    """A Bot Connector that notes when each call arrived (``time.perf_counter``)."""

    arrivals: list[float] = field(default_factory=list)

    def handle(
        self, method: str, path: str, headers: Mapping[str, str], body: bytes
    ) -> tuple[int, Any]:
        arrived = time.perf_counter()
        with self._lock:
            self.arrivals.append(arrived)
        return super().handle(method, path, headers, body)


@dataclass
class Served:
    url: str
    channel: BotFrameworkChannel
    tenant: EntraTenant
    connector: TimedConnector
    simulator: SimulatorServer
    client: httpx.Client

    def post(self, activity: dict[str, Any], authorization: str | None) -> httpx.Response:
        headers = {"Authorization": authorization} if authorization is not None else {}
        return self.client.post("/api/messages", json=activity, headers=headers)

    def calls_of(self, conversation: str) -> list[ConnectorCall]:
        with self.connector._lock:
            return [c for c in self.connector.calls if c.conversation_id == conversation]

    def final_reply(self, conversation: str) -> list[ConnectorCall]:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            calls = self.calls_of(conversation)
            if any(c.body["type"] == "message" for c in calls):
                return calls
            time.sleep(0.05)
        raise AssertionError(f"no reply in {conversation}: {self.calls_of(conversation)}")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("teams")
    corpus, data = root / "corpus", root / "data"
    (corpus / "shared").mkdir(parents=True)
    data.mkdir()
    (corpus / "shared" / "facilities.md").write_text(f"# Facilities\n\n## Cafeteria\n\n{FACT}\n")
    (corpus / "acl.yaml").write_text(
        f'tenant: {TENANT}\nrules:\n  - match: "shared/**"\n    public: true\n'
    )
    connector = TimedConnector()
    port = free_port()
    with (
        SimulatorServer(SimulatorConfig(tokens_per_second=TOKENS_PER_SECOND)) as simulator,
        running_channel() as channel,
        running_entra_tenant() as tenant,
        _serving(connector),
    ):
        env = simulator_env(
            simulator,
            data,
            LAMINA_TEAMS__ENABLED="true",
            LAMINA_TEAMS__APP_ID=APP_ID,
            LAMINA_TEAMS__APP_SECRET=APP_SECRET,
            LAMINA_TEAMS__APP_TENANT_ID=BOT_TENANT,
            LAMINA_TEAMS__OPENID_CONFIG_URL=channel.config_url,
            LAMINA_TEAMS__TOKEN_URL=tenant.token_url,
            LAMINA_TEAMS__STREAM_INTERVAL_S="0.5",
            # MSAL (through requests) trusts the fake tenant's CA; no setting of Lamina's.
            REQUESTS_CA_BUNDLE=tenant.ca_file,
        )
        ingest = run_lamina("ingest", str(corpus), env=env)
        assert ingest.returncode == 0, ingest.stderr
        url = f"http://127.0.0.1:{port}"
        with (
            lamina_process("serve", "--port", str(port), env=env, ready_url=f"{url}/readyz"),
            httpx.Client(base_url=url, timeout=30) as client,
        ):
            yield Served(url, channel, tenant, connector, simulator, client)


def _activity(served: Served, text: str, *, kind: str = "personal") -> dict[str, Any]:
    user = f"user-{uuid.uuid4().hex[:8]}"
    return {
        "type": "message",
        "id": f"1{uuid.uuid4().int % 10**12}",
        "channelId": "msteams",
        "serviceUrl": served.connector.service_url,
        "from": {"id": f"29:{user}", "name": user, "aadObjectId": user},
        "recipient": {"id": f"28:{APP_ID}", "name": "Lamina"},
        "conversation": {
            "id": f"a:{uuid.uuid4().hex}",
            "conversationType": kind,
            "tenantId": TENANT,
        },
        "text": text,
    }


def _stream_info(call: ConnectorCall) -> dict[str, Any] | None:
    entities = call.body.get("entities") or []
    return next((e for e in entities if e.get("type") == "streaminfo"), None)


def _citations(call: ConnectorCall) -> list[dict[str, Any]]:
    entities = call.body.get("entities") or []
    message = next((e for e in entities if e.get("@type") == "Message"), {})
    return list(message.get("citation") or [])


def _script_a_cited_answer(simulator: SimulatorServer) -> None:
    simulator.reset()
    simulator.script(
        ScriptedReply(
            tool_calls=[ScriptedToolCall(name="search_knowledge", arguments={"query": "cafeteria"})]
        ),
        ScriptedReply(content="Done."),  # planning again, seeing the search results
        ScriptedReply(content=ANSWER),
    )


def test_a_personal_chat_answer_streams_after_the_channel_got_its_202(served: Served) -> None:
    _script_a_cited_answer(served.simulator)
    activity = _activity(served, "When does the cafeteria open?")
    conversation = activity["conversation"]["id"]
    authorization = served.channel.authorization(served.connector.service_url)
    sent = time.perf_counter()
    response = served.post(activity, authorization)
    acked = time.perf_counter()
    assert response.status_code == 202

    calls = served.final_reply(conversation)
    with served.connector._lock:
        first_call = min(served.connector.arrivals)
    # The channel was answered before the bot made its first call to the Bot Connector.
    assert acked < first_call
    print(
        f"\nTeams ack latency (lamina serve, loopback): {(acked - sent) * 1000:.1f} ms; "
        f"first Bot Connector call {(first_call - sent) * 1000:.0f} ms after the post"
    )

    informative, *updates, final = calls
    assert informative.body["type"] == "typing"
    assert (_stream_info(informative) or {}).get("streamType") == "informative"
    assert len(updates) >= 2
    assert all(c.body["type"] == "typing" for c in updates)
    infos = [_stream_info(c) or {} for c in updates]
    assert all(i.get("streamType") == "streaming" for i in infos)
    sequences = [(_stream_info(c) or {})["streamSequence"] for c in [informative, *updates]]
    assert all(a < b for a, b in itertools.pairwise(sequences))
    # Each update carries the text so far: it only grows.
    texts = [c.body["text"] for c in updates]
    assert all(b.startswith(a) and len(b) > len(a) for a, b in itertools.pairwise(texts))
    stream_ids = {i.get("streamId") for i in [*infos, _stream_info(final) or {}]}
    assert len(stream_ids) == 1 and None not in stream_ids

    assert final.body["type"] == "message"
    info = _stream_info(final)
    assert info is not None and info["streamType"] == "final" and "streamSequence" not in info
    assert final.body["text"] == ANSWER
    citations = _citations(final)
    assert 1 <= len(citations) <= 20
    for claim in citations:
        assert f"[{claim['position']}]" in final.body["text"]
        assert len(claim["appearance"]["name"]) <= 80
        assert len(claim["appearance"]["abstract"]) <= 160
    issued = {f"Bearer {token}" for token in served.tenant.issued}
    assert all(c.authorization in issued for c in calls)


def _refusals(served: Served) -> dict[str, tuple[dict[str, Any], str | None]]:
    """Each way a request may fail the channel's authentication: its activity and header."""
    url = served.connector.service_url
    channel = served.channel

    def signed(**claims: Any) -> str:
        return f"Bearer {channel.token(url, **claims)}"

    impostor = SigningKey(kid=channel.keys[0].kid)  # the channel's key id, another key
    return {
        "wrong audience": (_activity(served, "hi"), signed(app_id=str(uuid.uuid4()))),
        "wrong issuer": (_activity(served, "hi"), signed(issuer="https://api.example.com")),
        "wrong key": (_activity(served, "hi"), signed(key=impostor)),
        "expired": (_activity(served, "hi"), signed(expires_in=-3600)),
        "missing header": (_activity(served, "hi"), None),
        "serviceurl mismatch": (
            {**_activity(served, "hi"), "serviceUrl": "http://127.0.0.1:9/"},
            signed(),
        ),
    }


def test_requests_the_channel_did_not_sign_are_refused_over_http(served: Served) -> None:
    cases = _refusals(served)
    for case, (activity, authorization) in cases.items():
        response = served.post(activity, authorization)
        assert response.status_code == 401, (case, response.text)
        assert response.headers["content-type"].startswith("application/problem+json"), case
        assert response.headers["WWW-Authenticate"].startswith("Bearer"), case
        assert json.loads(response.text)["status"] == 401, case
    # A signed request in another conversation is answered after them: had any refused
    # one started a turn, its reply would be there first.
    _script_a_cited_answer(served.simulator)
    accepted = _activity(served, "When does the cafeteria open?", kind="groupChat")
    authorization = served.channel.authorization(served.connector.service_url)
    assert served.post(accepted, authorization).status_code == 202
    served.final_reply(accepted["conversation"]["id"])
    refused = {activity["conversation"]["id"] for activity, _ in cases.values()}
    with served.connector._lock:
        assert not refused & {c.conversation_id for c in served.connector.calls}
