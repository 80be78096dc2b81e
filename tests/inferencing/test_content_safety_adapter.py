"""The Azure AI Content Safety adapter against a loopback fake of the REST API, through
the real httpx client."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
from pydantic import SecretStr, ValidationError

from inferencing.contracts import (
    ContentModerator,
    PromptShield,
    SafetyServiceUnavailable,
)
from inferencing.safety.azure_content_safety import AzureContentSafety, pack_documents, windows
from inferencing.settings import ContentSafetySettings
from tests.support.content_safety import (
    API_VERSION,
    LEAKY_ERROR_MESSAGE,
    FakeContentSafety,
    running_content_safety,
)

MARK = "ATTACK-MARKER"


@pytest.fixture(scope="module")
def server() -> Iterator[FakeContentSafety]:
    with running_content_safety() as fake:
        yield fake


@pytest.fixture
def fake(server: FakeContentSafety) -> FakeContentSafety:
    server.reset()
    server.api_key, server.bearer_token = "test-key", None
    return server


def settings_for(fake: FakeContentSafety, **overrides: object) -> ContentSafetySettings:
    values: dict[str, object] = {
        "endpoint": fake.base_url + "/",
        "api_key": SecretStr("test-key"),
        "timeout_s": 2.0,
    }
    values.update(overrides)
    return ContentSafetySettings.model_validate(values)


@pytest.fixture
async def adapter(fake: FakeContentSafety) -> AsyncIterator[AzureContentSafety]:
    client = AzureContentSafety(settings_for(fake))
    yield client
    await client.aclose()


async def test_it_is_a_prompt_shield_and_a_content_moderator(adapter: AzureContentSafety) -> None:
    assert isinstance(adapter, PromptShield)
    assert isinstance(adapter, ContentModerator)


async def test_an_attack_in_the_prompt_is_detected_with_key_version_and_body_as_specified(
    adapter: AzureContentSafety, fake: FakeContentSafety
) -> None:
    result = await adapter.shield(f"Hello {MARK} world", ["a clean document"])
    assert result.detector == "azure_content_safety"
    assert result.prompt is not None and result.prompt.attack and result.prompt.score == 1.0
    assert [d.attack for d in result.documents] == [False]

    [request] = fake.requests
    assert request.path == "/contentsafety/text:shieldPrompt"
    assert request.query == {"api-version": [API_VERSION]}
    assert request.headers["ocp-apim-subscription-key"] == "test-key"
    assert "authorization" not in request.headers
    assert request.headers["content-type"] == "application/json"
    assert request.body == {"userPrompt": f"Hello {MARK} world", "documents": ["a clean document"]}


async def test_a_clean_prompt_is_allowed(adapter: AzureContentSafety) -> None:
    result = await adapter.shield("How many days of leave do I get?")
    assert result.prompt is not None and not result.prompt.attack
    assert result.prompt.reasons == () and result.documents == ()


async def test_documents_only_send_no_user_prompt_and_keep_their_order(
    adapter: AzureContentSafety, fake: FakeContentSafety
) -> None:
    result = await adapter.shield(None, ["fine", f"planted {MARK}", "also fine"])
    assert result.prompt is None
    assert [d.attack for d in result.documents] == [False, True, False]
    assert "userPrompt" not in fake.requests[0].body


async def test_documents_beyond_the_service_limits_are_split_across_calls(
    adapter: AzureContentSafety, fake: FakeContentSafety
) -> None:
    # Seven documents (the limit is five a call) and one of 25,000 characters (the limit is
    # 10,000 a call in all) whose attack sits at its very end.
    long_document = "x" * 24_980 + f" {MARK}"
    documents = [f"doc {i}" for i in range(7)] + [long_document]
    result = await adapter.shield(None, documents)
    assert [d.attack for d in result.documents] == [False] * 7 + [True]
    assert len(fake.requests) >= 3
    for request in fake.requests:
        sent = request.body["documents"]
        assert len(sent) <= 5 and sum(len(d) for d in sent) <= 10_000


async def test_a_prompt_longer_than_the_limit_is_checked_in_windows(
    adapter: AzureContentSafety, fake: FakeContentSafety
) -> None:
    result = await adapter.shield("y" * 15_000 + MARK)
    assert result.prompt is not None and result.prompt.attack
    assert all(len(r.body["userPrompt"]) <= 10_000 for r in fake.requests)
    assert len(fake.requests) == 2


async def test_an_entra_token_is_sent_as_bearer_when_no_key_is_configured(
    fake: FakeContentSafety,
) -> None:
    fake.api_key, fake.bearer_token = None, "entra-token-123"
    calls = 0

    async def token() -> str:
        nonlocal calls
        calls += 1
        return "entra-token-123"

    adapter = AzureContentSafety(settings_for(fake, api_key=None), token_provider=token)
    try:
        result = await adapter.shield("hello")
    finally:
        await adapter.aclose()
    assert result.prompt is not None and not result.prompt.attack
    assert fake.requests[0].headers["authorization"] == "Bearer entra-token-123"
    assert "ocp-apim-subscription-key" not in fake.requests[0].headers
    assert calls == 1


async def test_moderation_flags_categories_at_or_above_the_threshold(
    adapter: AzureContentSafety, fake: FakeContentSafety
) -> None:
    fake.severities.update({"massacre": ("Violence", 6), "stupid": ("Hate", 2)})
    result = await adapter.moderate("a stupid plan for a massacre")
    assert result.severities == {"Hate": 2, "SelfHarm": 0, "Sexual": 0, "Violence": 6}
    assert result.flagged == ("Violence",)  # Hate at 2 is under the default threshold of 4
    [request] = fake.requests
    assert request.path == "/contentsafety/text:analyze"
    assert request.query == {"api-version": [API_VERSION]}
    assert request.body == {
        "text": "a stupid plan for a massacre",
        "categories": ["Hate", "SelfHarm", "Sexual", "Violence"],
        "outputType": "FourSeverityLevels",
    }


async def test_moderation_passes_clean_text(adapter: AzureContentSafety) -> None:
    result = await adapter.moderate("Employees receive 27 days of annual leave.")
    assert result.flagged == () and set(result.severities.values()) == {0}


async def test_long_text_is_moderated_in_windows_keeping_the_worst_severity(
    adapter: AzureContentSafety, fake: FakeContentSafety
) -> None:
    fake.severities["massacre"] = ("Violence", 4)
    result = await adapter.moderate("calm words " * 2_000 + "massacre")
    assert result.flagged == ("Violence",)
    assert len(fake.requests) == 3
    assert all(len(r.body["text"]) <= 10_000 for r in fake.requests)


async def test_an_error_response_is_a_typed_error_without_the_raw_body(
    adapter: AzureContentSafety, fake: FakeContentSafety
) -> None:
    fake.fail_with = 500
    with pytest.raises(SafetyServiceUnavailable) as caught:
        await adapter.shield("hello")
    error = caught.value
    assert error.retryable
    assert error.details == {
        "operation": "text:shieldPrompt",
        "status": 500,
        "code": "InternalServerError",
    }
    assert LEAKY_ERROR_MESSAGE not in str(error) and LEAKY_ERROR_MESSAGE not in str(error.details)
    assert str(error) == "The content-safety service is unavailable."


async def test_a_refused_key_is_unavailable_and_not_worth_retrying(
    fake: FakeContentSafety,
) -> None:
    adapter = AzureContentSafety(settings_for(fake, api_key=SecretStr("wrong")))
    try:
        with pytest.raises(SafetyServiceUnavailable) as caught:
            await adapter.moderate("hello")
    finally:
        await adapter.aclose()
    assert caught.value.details["status"] == 401 and not caught.value.retryable


async def test_a_slow_service_times_out_as_unavailable(fake: FakeContentSafety) -> None:
    fake.delay_s = 5.0
    adapter = AzureContentSafety(settings_for(fake, timeout_s=0.2))
    try:
        with pytest.raises(SafetyServiceUnavailable) as caught:
            await adapter.shield("hello")
    finally:
        await adapter.aclose()
    assert caught.value.details == {"operation": "text:shieldPrompt", "kind": "timeout"}


async def test_an_answer_of_the_wrong_shape_is_unavailable(
    adapter: AzureContentSafety, fake: FakeContentSafety
) -> None:
    fake.malformed = True
    with pytest.raises(SafetyServiceUnavailable):
        await adapter.shield("hello", ["doc"])
    with pytest.raises(SafetyServiceUnavailable):
        await adapter.moderate("hello")


async def test_an_unreachable_service_is_unavailable() -> None:
    from tests.support.processes import free_port

    settings = ContentSafetySettings(
        endpoint=f"http://127.0.0.1:{free_port()}", api_key=SecretStr("k"), timeout_s=2.0
    )
    adapter = AzureContentSafety(settings)
    try:
        with pytest.raises(SafetyServiceUnavailable) as caught:
            await adapter.shield("hello")
    finally:
        await adapter.aclose()
    assert caught.value.details["kind"] == "ConnectError"


def test_settings_validate_the_endpoint_and_say_when_the_service_is_on() -> None:
    assert not ContentSafetySettings().enabled
    assert ContentSafetySettings(endpoint="  ").endpoint is None
    on = ContentSafetySettings(endpoint="https://cs.cognitiveservices.azure.com/")
    assert on.enabled and on.endpoint == "https://cs.cognitiveservices.azure.com"
    with pytest.raises(ValidationError, match="http"):
        ContentSafetySettings(endpoint="cs.cognitiveservices.azure.com")
    with pytest.raises(ValidationError):
        ContentSafetySettings(categories=["Spam"])  # type: ignore[list-item]


def test_windows_cover_the_text_with_overlap_and_batches_respect_the_limits() -> None:
    text = "".join(chr(ord("a") + i % 26) for i in range(25_000))
    pieces = windows(text, 10_000)
    assert all(len(p) <= 10_000 for p in pieces)
    assert pieces[0] == text[:10_000] and text.endswith(pieces[-1])
    assert windows("short", 10_000) == ["short"]
    batches = pack_documents([(i, "x" * 3_000) for i in range(7)])
    assert [len(b) for b in batches] == [3, 3, 1]
