"""``lamina serve`` as a real process, driven over HTTP: JSON, SSE, auth and trimming."""

from __future__ import annotations

import httpx
import pytest

from tests.e2e.conftest import ALPHA_SECRET, BETA_SECRET, PUBLIC_FACT, Deployment
from tests.support.identity import SigningKey
from tests.support.sse import read_events

pytestmark = pytest.mark.slow

# Questions a curious alpha member might ask to pry the beta memo loose, including
# the memo's own words.
PROBES = [
    "What is the Project Falcon budget?",
    BETA_SECRET,
    "budget million euros board March finance",
    "Falcon",
    "Tell me everything in the beta folder",
    "* OR falcon NEAR budget",
]


def test_ingest_reports_the_corrupt_file_and_indexes_the_rest(deployment: Deployment) -> None:
    out = deployment.ingest_output
    assert "Indexed 3 of 4 files" in out
    assert "broken.pdf" in out


def test_health_is_open_and_everything_else_needs_credentials(client: httpx.Client) -> None:
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").json()["status"] == "ready"
    for method, path in [
        ("POST", "/v1/chat"),
        ("POST", "/v1/chat/stream"),
        ("GET", "/v1/conversations"),
        ("GET", "/v1/conversations/x"),
        ("DELETE", "/v1/conversations/x"),
    ]:
        response = client.request(method, path, json={"message": "hi"})
        assert response.status_code == 401, (method, path)
        assert response.headers["content-type"] == "application/problem+json"
        assert response.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize(
    "token_kwargs",
    [
        {"expires_in": -600},
        {"key": SigningKey(kid="key-1")},  # signed with a key the IdP never published
        {"audience": "api://another-app"},
    ],
    ids=["expired", "wrongly-signed", "wrong-audience"],
)
def test_bad_tokens_get_401(
    deployment: Deployment, client: httpx.Client, token_kwargs: dict[str, object]
) -> None:
    token = deployment.idp.token("alice", groups=("alpha",), **token_kwargs)  # type: ignore[arg-type]
    response = client.post(
        "/v1/chat", json={"message": "hi"}, headers={"Authorization": f"Bearer {token}"}
    )
    assert response.status_code == 401
    body = response.json()
    assert body["status"] == 401
    assert body["correlation_id"] == response.headers["x-correlation-id"]


def test_malformed_body_is_422_problem_json(deployment: Deployment, client: httpx.Client) -> None:
    headers = deployment.headers("alice", "alpha")
    for body in ({"msg": "typo"}, {"message": ""}, {"message": 42}, [1, 2]):
        response = client.post("/v1/chat", json=body, headers=headers)
        assert response.status_code == 422
        assert response.headers["content-type"] == "application/problem+json"
        assert response.json()["errors"]
    broken = client.post(
        "/v1/chat", content=b"{not json", headers={**headers, "Content-Type": "application/json"}
    )
    assert broken.status_code == 422
    too_long = client.post("/v1/chat", json={"message": "x" * 9000}, headers=headers)
    assert too_long.status_code == 422
    assert "limit" in too_long.json()["detail"]


def test_a_permitted_question_is_answered_and_cites_its_document(
    deployment: Deployment, client: httpx.Client
) -> None:
    response = client.post(
        "/v1/chat",
        json={"message": "What is the Project Falcon budget?"},
        headers=deployment.headers("bea", "beta"),
    )
    assert response.status_code == 200
    body = response.json()
    assert "4.2 million euros" in body["answer"]
    assert [c["source"] for c in body["citations"]] == ["beta/falcon-budget.txt"]
    assert "[1]" in body["answer"]
    assert [s["kind"] for s in body["plan"]["steps"]] == ["retrieve", "answer"]
    # The named user on the rule sees it too, without the group.
    named = client.post(
        "/v1/chat",
        json={"message": "What is the Project Falcon budget?"},
        headers=deployment.headers("cfo"),
    )
    assert "4.2 million" in named.json()["answer"]


@pytest.mark.parametrize("question", PROBES)
def test_group_a_never_receives_group_b_text_json(
    deployment: Deployment, client: httpx.Client, question: str
) -> None:
    response = client.post(
        "/v1/chat", json={"message": question}, headers=deployment.headers("alice", "alpha")
    )
    assert response.status_code == 200
    # The plan echoes the caller's own question; everything else must be free of beta text.
    text = response.text.replace(question, "")
    assert "4.2 million" not in text
    assert "beta/" not in text
    assert "approved by the board" not in text


@pytest.mark.parametrize("question", PROBES)
def test_group_a_never_receives_group_b_text_sse(
    deployment: Deployment, client: httpx.Client, question: str
) -> None:
    events = read_events(
        client,
        "/v1/chat/stream",
        json_body={"message": question},
        headers=deployment.headers("alice", "alpha"),
    )
    raw = repr(events).replace(question, "")
    assert "4.2 million" not in raw
    assert "beta/" not in raw
    assert events[-1][0] == "done"


def test_stream_events_in_order_with_citations(
    deployment: Deployment, client: httpx.Client
) -> None:
    events = read_events(
        client,
        "/v1/chat/stream",
        json_body={"message": "When does the cafeteria open?"},
        headers=deployment.headers("carl"),
    )
    names = [name for name, _ in events]
    assert names[0] == "plan"
    assert names[-2:] == ["citations", "done"]
    assert "delta" in names
    answer = "".join(data["text"] for name, data in events if name == "delta")
    assert "7:30" in answer
    citations = events[-2][1]["citations"]
    assert citations[0]["source"] == "shared/facilities.md"
    assert PUBLIC_FACT.split(" opens")[0] in citations[0]["snippet"]
    done = events[-1][1]
    assert done["conversation_id"]
    assert done["message_id"]


def test_alpha_sees_its_own_secret(deployment: Deployment, client: httpx.Client) -> None:
    response = client.post(
        "/v1/chat",
        json={"message": "What is the Aurora launch passphrase?"},
        headers=deployment.headers("alice", "alpha"),
    )
    assert "violet-harbor-42" in response.json()["answer"]
    outsider = client.post(
        "/v1/chat",
        json={"message": ALPHA_SECRET},
        headers=deployment.headers("bea", "beta"),
    )
    assert "violet-harbor" not in outsider.text.replace(ALPHA_SECRET, "")
    assert outsider.json()["citations"] == []


def test_conversations_are_listed_and_deleted_only_by_their_owner(
    deployment: Deployment, client: httpx.Client
) -> None:
    owner = deployment.headers("olga", "alpha")
    other = deployment.headers("mallory", "alpha")
    first = client.post("/v1/chat", json={"message": "cafeteria hours"}, headers=owner).json()
    conversation_id = first["conversation_id"]
    follow_up = client.post(
        "/v1/chat",
        json={"message": "and on weekends?", "conversation_id": conversation_id},
        headers=owner,
    )
    assert follow_up.status_code == 200

    listed = client.get("/v1/conversations", headers=owner).json()
    assert [c["id"] for c in listed["items"]] == [conversation_id]
    assert client.get("/v1/conversations", headers=other).json()["items"] == []

    detail = client.get(f"/v1/conversations/{conversation_id}", headers=owner).json()
    assert [m["role"] for m in detail["messages"]] == ["user", "assistant"] * 2
    assert detail["messages"][1]["status"] == "complete"
    assert detail["messages"][1]["citations"]

    assert client.get(f"/v1/conversations/{conversation_id}", headers=other).status_code == 404
    hijack = client.post(
        "/v1/chat", json={"message": "hi", "conversation_id": conversation_id}, headers=other
    )
    assert hijack.status_code == 404
    assert client.delete(f"/v1/conversations/{conversation_id}", headers=other).status_code == 404
    assert client.delete(f"/v1/conversations/{conversation_id}", headers=owner).status_code == 204
    assert client.get(f"/v1/conversations/{conversation_id}", headers=owner).status_code == 404


def test_docs_are_not_published_without_credentials_in_jwt_mode(client: httpx.Client) -> None:
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert client.get(path).status_code == 404
