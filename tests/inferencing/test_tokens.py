"""Token counting: exact o200k_base from the bundled file, offline; the approximate fallback."""

from __future__ import annotations

import gzip
import hashlib
import importlib
import logging
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from types import MappingProxyType

import pytest
import tiktoken

from inferencing import tokens
from inferencing.contracts import ChatMessage, InferenceError, Role, ToolCall, ToolDefinition
from inferencing.tokens import (
    O200K_BASE_FILE,
    O200K_BASE_SHA256,
    ApproximateCounter,
    TiktokenCounter,
    TokenEncodingError,
    default_counter,
)

# Where tiktoken itself would download o200k_base from; its cache is keyed by this URL.
O200K_BASE_URL = "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken"


@pytest.fixture(scope="module")
def counter() -> TiktokenCounter:
    return TiktokenCounter()


@pytest.fixture
def fresh_encoding_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loads in this test start from the file, and do not stay in memory (~75 MB each)."""
    monkeypatch.setattr(tokens, "_encodings", {})


@pytest.fixture
def network_attempts(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[object]:
    """Refuses every connection and name lookup, recording the attempts.

    tiktoken's download cache is an empty directory and proxies point nowhere, so
    nothing cached or configured on this machine can stand in for the network.
    """
    attempts: list[object] = []

    def refuse(*args: object, **kwargs: object) -> None:
        attempts.append(args)
        raise OSError("network access refused by the test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    cache = tmp_path / "tiktoken-cache"
    cache.mkdir()
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    for proxy in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.setenv(proxy, "http://127.0.0.1:9")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    return attempts


# --- it is o200k_base -------------------------------------------------------------

# Ids as published for o200k_base independently of this code (e.g. in other
# tokenizer projects' test suites); the code line's ids were read off this encoding.
KNOWN_IDS = [
    ("hello world", [24912, 2375]),
    ("Hello world", [13225, 2375]),
    ("Hello, world!", [13225, 11, 2375, 0]),
    ("你好世界", [177519, 28428]),
    ("Hello 🌍 World!", [13225, 130321, 235, 5922, 0]),
    (
        "def add(a, b):\n    return a + b\n",
        [1314, 1147, 6271, 11, 287, 1883, 271, 622, 261, 659, 287, 198],
    ),
]


@pytest.mark.parametrize(("text", "ids"), KNOWN_IDS)
def test_counts_are_o200k_base(counter: TiktokenCounter, text: str, ids: list[int]) -> None:
    assert counter.encoding.encode_ordinary(text) == ids
    assert counter.count(text) == len(ids)


def test_hello_world_is_two_tokens(counter: TiktokenCounter) -> None:
    assert counter.count("hello world") == 2
    assert counter.count("") == 0
    assert counter.name == "tiktoken:o200k_base"


def test_built_exactly_as_tiktoken_builds_o200k_base(
    counter: TiktokenCounter, network_attempts: list[object], tmp_path: Path
) -> None:
    # Seed tiktoken's own cache with the bundled file, so its own o200k_base() runs offline.
    cache = tmp_path / "tiktoken-cache"
    cache_key = hashlib.sha1(O200K_BASE_URL.encode()).hexdigest()
    (cache / cache_key).write_bytes(gzip.decompress(O200K_BASE_FILE.read_bytes()))
    openai_public = importlib.import_module("tiktoken_ext.openai_public")
    reference = tiktoken.Encoding(**openai_public.o200k_base())

    ours = counter.encoding
    assert network_attempts == []
    assert ours.name == reference.name
    assert ours._pat_str == reference._pat_str
    assert ours._special_tokens == reference._special_tokens
    assert ours._special_tokens == {"<|endoftext|>": 199999, "<|endofprompt|>": 200018}
    assert ours.n_vocab == reference.n_vocab
    for text, _ in KNOWN_IDS:
        assert ours.encode_ordinary(text) == reference.encode_ordinary(text)
    source = Path(tokens.__file__).read_text()
    assert ours.encode_ordinary(source) == reference.encode_ordinary(source)


# --- offline, verified, shared ---------------------------------------------------


def test_the_network_trap_springs(network_attempts: list[object]) -> None:
    with pytest.raises(OSError, match="refused by the test"):
        socket.create_connection(("openaipublic.blob.core.windows.net", 443))
    assert network_attempts


@pytest.mark.usefixtures("fresh_encoding_cache")
def test_loading_never_touches_the_network(network_attempts: list[object]) -> None:
    counter = TiktokenCounter()
    counter.warm_up()
    assert counter.count("hello world") == 2
    assert network_attempts == []


def _flip_a_compressed_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _alter_the_content(path: Path) -> None:
    # A well-formed archive whose content differs: only the SHA-256 check can catch it.
    content = bytearray(gzip.decompress(path.read_bytes()))
    content[1000] ^= 0x01
    path.write_bytes(gzip.compress(bytes(content)))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:100_000])


def _delete(path: Path) -> None:
    path.unlink()


@pytest.mark.usefixtures("fresh_encoding_cache")
@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        (_flip_a_compressed_byte, "cannot be read"),
        (_alter_the_content, "fails its SHA-256 check"),
        (_truncate, "cannot be read"),
        (_delete, "cannot be read"),
    ],
)
def test_a_damaged_file_gives_a_clear_error(
    tmp_path: Path, damage: Callable[[Path], None], problem: str
) -> None:
    damaged = tmp_path / "o200k_base.tiktoken.gz"
    shutil.copyfile(O200K_BASE_FILE, damaged)
    damage(damaged)
    counter = TiktokenCounter(damaged)

    with pytest.raises(TokenEncodingError, match=problem) as raised:
        counter.count("hello world")
    error = raised.value
    assert isinstance(error, InferenceError)
    assert not error.retryable
    assert "o200k_base.tiktoken.gz" in error.message
    assert "installation is damaged" in error.message
    assert str(tmp_path) not in error.message  # the message may reach a user
    assert error.details["path"] == str(damaged)
    if damage is _alter_the_content:
        assert error.details["expected"] == O200K_BASE_SHA256
        assert error.details["sha256"] != O200K_BASE_SHA256
    # Not remembered as loaded: a second use fails the same way.
    with pytest.raises(TokenEncodingError):
        counter.warm_up()


def test_the_bundled_file_has_the_pinned_hash() -> None:
    content = gzip.decompress(O200K_BASE_FILE.read_bytes())
    assert hashlib.sha256(content).hexdigest() == O200K_BASE_SHA256


def test_counters_share_one_encoding(counter: TiktokenCounter) -> None:
    assert TiktokenCounter().encoding is TiktokenCounter().encoding is counter.encoding


@pytest.mark.usefixtures("fresh_encoding_cache")
def test_concurrent_first_uses_load_once(monkeypatch: pytest.MonkeyPatch) -> None:
    loads: list[Path] = []
    load = tokens._load_o200k_base

    def counting_load(path: Path) -> tiktoken.Encoding:
        loads.append(path)
        return load(path)

    monkeypatch.setattr(tokens, "_load_o200k_base", counting_load)
    barrier = threading.Barrier(8)
    counts: list[int] = []

    def first_use() -> None:
        barrier.wait()
        counts.append(TiktokenCounter().count("hello world"))

    threads = [threading.Thread(target=first_use) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert counts == [2] * 8
    assert loads == [O200K_BASE_FILE]


def test_importing_the_module_does_not_import_tiktoken() -> None:
    script = "import sys, inferencing.tokens; sys.exit('tiktoken' in sys.modules)"
    subprocess.run([sys.executable, "-c", script], check=True, cwd=Path(tokens.__file__).parents[1])


# --- user text with special-token markup --------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [("<|endoftext|>", 7), ("<|endofprompt|>", 7), ("see <|endoftext|> here", 9)],
)
def test_special_token_markup_is_counted_as_text(
    counter: TiktokenCounter, text: str, expected: int
) -> None:
    assert counter.count(text) == expected
    message = ChatMessage(Role.USER, text)
    assert counter.count_messages([message]) == 3 + 1 + expected + 3


# --- chat accounting -------------------------------------------------------------


def test_every_message_is_framed_and_the_reply_primed(counter: TiktokenCounter) -> None:
    assert counter.count_messages([]) == 3
    # 3 framing + 1 for "user" + 2 for "hello world", then 3 priming the reply.
    assert counter.count_messages([ChatMessage(Role.USER, "hello world")]) == 9
    conversation = [
        ChatMessage(Role.SYSTEM, "Hello, world!"),
        ChatMessage(Role.USER, "hello world"),
        ChatMessage(Role.ASSISTANT, "你好世界"),
    ]
    assert counter.count_messages(conversation) == (3 + 1 + 4) + (3 + 1 + 2) + (3 + 1 + 2) + 3


def test_tool_calls_and_results_count(counter: TiktokenCounter) -> None:
    call = ToolCall(id="call_1", name="lookup_employee", arguments='{"name": "Adele"}')
    asked = ChatMessage(Role.ASSISTANT, None, tool_calls=(call,))
    answered = ChatMessage(Role.TOOL, '{"office": "Redmond"}', tool_call_id="call_1")

    call_tokens = sum(map(counter.count, (call.id, call.name, call.arguments)))
    assert counter.count_messages([asked]) == 3 + 1 + call_tokens + 3
    assert counter.count_messages([answered]) == (
        3 + 1 + counter.count(answered.content or "") + counter.count("call_1") + 3
    )
    two_calls = ChatMessage(Role.ASSISTANT, None, tool_calls=(call, call))
    assert counter.count_messages([two_calls]) == 3 + 1 + 2 * call_tokens + 3


def test_tools_add_their_definitions(counter: TiktokenCounter) -> None:
    messages = [ChatMessage(Role.USER, "Where does Adele work?")]
    tool = ToolDefinition(
        name="lookup_employee",
        description="Find an employee in the directory.",
        parameters=MappingProxyType(
            {
                "type": "object",
                "properties": MappingProxyType({"name": {"type": "string"}}),
                "required": ["name"],
            }
        ),
    )
    schema = (
        '{"name":"lookup_employee","description":"Find an employee in the directory.",'
        '"parameters":{"type":"object","properties":{"name":{"type":"string"}},"required":["name"]}}'
    )
    without = counter.count_messages(messages)
    assert counter.count_messages(messages, [tool]) == without + counter.count(schema)
    assert counter.count_messages(messages, [tool, tool]) == without + 2 * counter.count(schema)


# --- the approximate fallback ------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [("", 0), ("a", 1), ("abcd", 1), ("abcde", 2), ("hello world", 3), ("<|endoftext|>", 4)],
)
def test_approximate_counts_four_characters_a_token_rounded_up(text: str, expected: int) -> None:
    assert ApproximateCounter().count(text) == expected


def test_approximate_frames_messages_the_same_way() -> None:
    counter = ApproximateCounter()
    counter.warm_up()
    assert counter.name == "approximate"
    assert counter.count_messages([]) == 3
    # 3 framing + 1 for the role + ceil(11/4) for "hello world", then 3 priming.
    assert counter.count_messages([ChatMessage(Role.USER, "hello world")]) == 3 + 1 + 3 + 3
    call = ToolCall(id="c1", name="f", arguments="{}")
    asked = ChatMessage(Role.ASSISTANT, None, tool_calls=(call,))
    # The role is one token, as in o200k_base; each of "c1", "f", "{}" is 1.
    assert counter.count_messages([asked]) == 3 + 1 + 3 + 3


def test_approximate_is_in_the_right_range_for_english(counter: TiktokenCounter) -> None:
    text = Path(tokens.__file__).read_text()
    assert 0.75 <= ApproximateCounter().count(text) / counter.count(text) <= 1.33


# --- choosing a counter --------------------------------------------------------------


def test_default_is_tiktoken_when_installed() -> None:
    assert isinstance(default_counter(), TiktokenCounter)


def test_default_falls_back_when_tiktoken_is_missing(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "tiktoken", None)  # makes `import tiktoken` raise
    with caplog.at_level(logging.WARNING, logger="inferencing.tokens"):
        chosen = default_counter()
    assert isinstance(chosen, ApproximateCounter)
    assert "approximate" in caplog.text
