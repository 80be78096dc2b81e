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
from typing import Any, ClassVar

import pytest

from inferencing.simulator import (
    ScriptedReply,
    ScriptedToolCall,
    SimulatorConfig,
    SimulatorServer,
)
from tests.support.bot_framework import (
    TEAMS_TENANT,
    BotConnector,
    ServedBot,
    citations,
    running_bot_connector,
    running_channel,
    running_entra_tenant,
    stream_info,
    teams_settings,
)
from tests.support.identity import SigningKey
from tests.support.processes import free_port, lamina_process, run_lamina
from tests.support.simulator import simulator_env

pytestmark = pytest.mark.slow

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
class Served(ServedBot[TimedConnector]):
    simulator: SimulatorServer
    reply_timeout_s: ClassVar[float] = 60.0


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("teams")
    corpus, data = root / "corpus", root / "data"
    (corpus / "shared").mkdir(parents=True)
    data.mkdir()
    (corpus / "shared" / "facilities.md").write_text(f"# Facilities\n\n## Cafeteria\n\n{FACT}\n")
    (corpus / "acl.yaml").write_text(
        f'tenant: {TEAMS_TENANT}\nrules:\n  - match: "shared/**"\n    public: true\n'
    )
    port = free_port()
    with (
        SimulatorServer(SimulatorConfig(tokens_per_second=TOKENS_PER_SECOND)) as simulator,
        running_channel() as channel,
        running_entra_tenant() as tenant,
        running_bot_connector(TimedConnector()) as connector,
    ):
        env = simulator_env(
            simulator,
            data,
            **teams_env(teams_settings(channel, tenant, stream_interval_s=0.5)),
            # MSAL (through requests) trusts the fake tenant's CA; no setting of Lamina's.
            REQUESTS_CA_BUNDLE=tenant.ca_file,
        )
        ingest = run_lamina("ingest", str(corpus), env=env)
        assert ingest.returncode == 0, ingest.stderr
        url = f"http://127.0.0.1:{port}"
        with lamina_process("serve", "--port", str(port), env=env, ready_url=f"{url}/readyz"):
            yield Served(url, channel, tenant, connector, data, simulator)


def teams_env(settings: dict[str, Any]) -> dict[str, str]:
    """``teams`` settings as the environment of a ``lamina`` process."""
    return {f"LAMINA_TEAMS__{name.upper()}": _env_value(v) for name, v in settings.items()}


def _env_value(value: Any) -> str:
    if value is True:
        return "true"
    return json.dumps(value) if isinstance(value, list) else str(value)


def _activity(served: Served, text: str, *, kind: str = "personal") -> dict[str, Any]:
    return served.activity(text, user=f"user-{uuid.uuid4().hex[:8]}", kind=kind)


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
    response = served.post_as(activity, authorization)
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
    assert (stream_info(informative) or {}).get("streamType") == "informative"
    assert len(updates) >= 2
    assert all(c.body["type"] == "typing" for c in updates)
    infos = [stream_info(c) or {} for c in updates]
    assert all(i.get("streamType") == "streaming" for i in infos)
    sequences = [(stream_info(c) or {})["streamSequence"] for c in [informative, *updates]]
    assert all(a < b for a, b in itertools.pairwise(sequences))
    # Each update carries the text so far: it only grows.
    texts = [c.body["text"] for c in updates]
    assert all(b.startswith(a) and len(b) > len(a) for a, b in itertools.pairwise(texts))
    stream_ids = {i.get("streamId") for i in [*infos, stream_info(final) or {}]}
    assert len(stream_ids) == 1 and None not in stream_ids

    assert final.body["type"] == "message"
    info = stream_info(final)
    assert info is not None and info["streamType"] == "final" and "streamSequence" not in info
    assert final.body["text"] == ANSWER
    claims = citations(final)
    assert 1 <= len(claims) <= 20
    for claim in claims:
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
        response = served.post_as(activity, authorization)
        assert response.status_code == 401, (case, response.text)
        assert response.headers["content-type"].startswith("application/problem+json"), case
        assert response.headers["WWW-Authenticate"].startswith("Bearer"), case
        assert json.loads(response.text)["status"] == 401, case
    # A signed request in another conversation is answered after them: had any refused
    # one started a turn, its reply would be there first.
    _script_a_cited_answer(served.simulator)
    accepted = _activity(served, "When does the cafeteria open?", kind="groupChat")
    assert served.post(accepted).status_code == 202
    served.final_reply(accepted["conversation"]["id"])
    refused = {activity["conversation"]["id"] for activity, _ in cases.values()}
    with served.connector._lock:
        assert not refused & {c.conversation_id for c in served.connector.calls}
