"""Token counting for caps, quota reservations and context-window routing.

The gateway counts a prompt before sending it, and counts streamed output when a
provider's stream breaks before it reports usage. :class:`TiktokenCounter` counts
exactly as OpenAI's ``o200k_base`` encoding (GPT-4o, GPT-4.1, o-series) does. Its
BPE file ships inside this package (``inferencing/encodings``), so counting never
downloads anything: tiktoken would fetch the file from the internet at first use,
which air-gapped deployments cannot do. :class:`ApproximateCounter` needs nothing
and serves when tiktoken is not installed.

The first count loads the encoding (about half a second, blocking); call
``warm_up()`` at startup, off the event loop (``await asyncio.to_thread(counter.warm_up)``),
so no request pays for it. After that, counting costs roughly 0.3 to 0.6 ms per
thousand tokens on the calling thread: nothing for a typical prompt, but count
texts of a hundred thousand tokens in a worker thread (tiktoken releases the GIL
while it encodes).
"""

from __future__ import annotations

import gzip
import hashlib
import importlib
import json
import logging
import threading
import time
import types
import zlib
from base64 import b64decode
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from inferencing.contracts import ChatMessage, InferenceError, ToolDefinition

if TYPE_CHECKING:
    from tiktoken import Encoding

log = logging.getLogger(__name__)

O200K_BASE_FILE = Path(__file__).parent / "encodings" / "o200k_base.tiktoken.gz"
"""The bundled ``o200k_base`` BPE ranks, gzipped (see ``encodings/README.md``)."""

O200K_BASE_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
"""SHA-256 of the *uncompressed* file: the ``expected_hash`` tiktoken pins for it."""

# OpenAI's published accounting for chat models: each message is framed as
# <|start|>{role}<|message|>{content}<|end|>, three tokens beyond its fields, and
# every reply is primed with <|start|>assistant<|message|>, three more.
TOKENS_PER_MESSAGE = 3
REPLY_PRIMING_TOKENS = 3


class TokenEncodingError(InferenceError):
    """The bundled encoding file is missing or damaged: a broken installation."""


class TokenCounter(Protocol):
    """Counts tokens as a model family does. ``count`` runs on every request: it must be fast."""

    @property
    def name(self) -> str: ...

    def count(self, text: str) -> int:
        """Tokens of ``text`` as plain text: special-token markup counts as ordinary text."""
        ...

    def count_messages(
        self, messages: Sequence[ChatMessage], tools: Sequence[ToolDefinition] = ()
    ) -> int:
        """Prompt tokens of a chat request, framing and the reply's priming included.

        Messages follow OpenAI's published accounting (see :data:`TOKENS_PER_MESSAGE`);
        the role, content, tool-call id and each tool call's id, name and arguments
        count as text. Tools are an estimate: each adds the tokens of its definition
        as compact JSON. OpenAI renders tool definitions in a terser, TypeScript-like
        form the caller cannot see, so the estimate usually errs high, the safe side
        for caps and reservations.
        """
        ...

    def warm_up(self) -> None:
        """Do any one-time loading now, so the first request does not pay for it."""
        ...


class TiktokenCounter:
    """Exact ``o200k_base`` counts from the bundled BPE file; never touches the network.

    The encoding loads at first use, once per process: instances share it. Before
    use the file is checked against :data:`O200K_BASE_SHA256`; a damaged file
    raises :class:`TokenEncodingError`. ``encoding_file`` exists for tests.
    """

    def __init__(self, encoding_file: Path = O200K_BASE_FILE) -> None:
        self._encoding_file = encoding_file
        self._encoding: Encoding | None = None

    @property
    def name(self) -> str:
        return "tiktoken:o200k_base"

    @property
    def encoding(self) -> Encoding:
        """The loaded ``tiktoken.Encoding``, for callers that need token ids (truncation)."""
        return self._loaded()

    def warm_up(self) -> None:
        self._loaded()

    def count(self, text: str) -> int:
        # encode_ordinary: "<|endoftext|>" typed by a user is text, not a reason to raise.
        return len(self._loaded().encode_ordinary(text))

    def count_messages(
        self, messages: Sequence[ChatMessage], tools: Sequence[ToolDefinition] = ()
    ) -> int:
        return _count_chat(self.count, messages, tools)

    def _loaded(self) -> Encoding:
        if self._encoding is None:
            self._encoding = _shared_encoding(self._encoding_file)
        return self._encoding


class ApproximateCounter:
    """About four characters a token, rounded up, with the same per-message framing.

    Needs no dependency; for when tiktoken is not installed. Against ``o200k_base``
    it is within about a quarter either way for English and European prose and for
    code (measured: German prose 26% high, Markdown 12% low, Python 5% high). It
    badly undercounts scripts that take about a token a character or more: Chinese
    and Japanese 2.5 to 4 times too few, emoji up to 7 times. Leave generous
    headroom when enforcing caps with it.
    """

    CHARS_PER_TOKEN = 4

    @property
    def name(self) -> str:
        return "approximate"

    def warm_up(self) -> None:
        pass

    def count(self, text: str) -> int:
        return -(-len(text) // self.CHARS_PER_TOKEN)

    def count_messages(
        self, messages: Sequence[ChatMessage], tools: Sequence[ToolDefinition] = ()
    ) -> int:
        return _count_chat(self.count, messages, tools)


def default_counter() -> TokenCounter:
    """A :class:`TiktokenCounter` if tiktoken imports, else an :class:`ApproximateCounter`."""
    try:
        import tiktoken  # noqa: F401
    except ImportError:
        log.warning("tiktoken is not installed: token counts are approximate (~4 characters each)")
        return ApproximateCounter()
    log.info("token counts use tiktoken o200k_base, from the bundled encoding file")
    return TiktokenCounter()


# --- accounting -----------------------------------------------------------------


def _count_chat(
    count: Callable[[str], int],
    messages: Sequence[ChatMessage],
    tools: Sequence[ToolDefinition],
) -> int:
    total = REPLY_PRIMING_TOKENS
    for message in messages:
        # Every role name is one token in o200k_base (and cl100k_base).
        total += TOKENS_PER_MESSAGE + 1
        if message.content:
            total += count(message.content)
        if message.tool_call_id:
            total += count(message.tool_call_id)
        for call in message.tool_calls:
            total += count(call.id) + count(call.name) + count(call.arguments)
    for tool in tools:
        total += count(_tool_json(tool))
    return total


def _tool_json(tool: ToolDefinition) -> str:
    definition = {"name": tool.name, "description": tool.description, "parameters": tool.parameters}
    return json.dumps(definition, ensure_ascii=False, separators=(",", ":"), default=_jsonable)


def _jsonable(value: object) -> object:
    # Schemas may hold read-only mappings (MappingProxyType), which json refuses.
    return dict(value) if isinstance(value, Mapping) else str(value)


# --- loading the bundled encoding ---------------------------------------------

_encodings: dict[Path, Encoding] = {}
_load_lock = threading.Lock()


def _shared_encoding(path: Path) -> Encoding:
    encoding = _encodings.get(path)
    if encoding is None:
        with _load_lock:
            encoding = _encodings.get(path)
            if encoding is None:
                encoding = _encodings[path] = _load_o200k_base(path)
    return encoding


def _load_o200k_base(path: Path) -> Encoding:
    started = time.perf_counter()
    ranks = _read_ranks(path)
    import tiktoken

    pat_str, special_tokens = _tiktoken_o200k_definition(ranks)
    encoding = tiktoken.Encoding(
        name="o200k_base",
        pat_str=pat_str,
        mergeable_ranks=ranks,
        special_tokens=special_tokens,
    )
    log.info("loaded o200k_base from %s in %.0f ms", path, (time.perf_counter() - started) * 1e3)
    return encoding


def _read_ranks(path: Path) -> dict[bytes, int]:
    """The verified ``token -> rank`` table of a gzipped ``.tiktoken`` file."""
    try:
        data = gzip.decompress(path.read_bytes())
    except (OSError, EOFError, zlib.error) as exc:
        # gzip.BadGzipFile (a damaged archive) is an OSError too.
        raise _damaged(path, "cannot be read", error=repr(exc)) from exc
    actual = hashlib.sha256(data).hexdigest()
    if actual != O200K_BASE_SHA256:
        raise _damaged(path, "fails its SHA-256 check", sha256=actual, expected=O200K_BASE_SHA256)
    # Each line is "<base64 token> <rank>"; the hash has vouched for the format.
    return {b64decode(token): int(rank) for token, rank in map(bytes.split, data.splitlines())}


def _damaged(path: Path, problem: str, **details: str) -> TokenEncodingError:
    # The message may reach a user: it names the file within the package, the
    # absolute path and the cause go to details, for the logs.
    return TokenEncodingError(
        f"The token encoding file {path.name} {problem}: the installation is damaged. "
        "Reinstall the package (inferencing/encodings/README.md tells how to verify the file).",
        details={"path": str(path), **details},
    )


def _tiktoken_o200k_definition(ranks: dict[bytes, int]) -> tuple[str, dict[str, int]]:
    """tiktoken's own split pattern and special tokens for ``o200k_base``.

    ``tiktoken_ext.openai_public.o200k_base`` builds them inline and fetches the
    ranks through its module global ``load_tiktoken_bpe``, which downloads. We run
    that same function with just that global bound to one handing over our ranks,
    so the definition stays tiktoken's (no copied regex) and no download can start.
    Rebinding the global in the module itself would race with other threads calling
    ``tiktoken.get_encoding``. It also cross-checks our pin against tiktoken's.
    """
    # importlib rather than `import`: tiktoken_ext ships no type information.
    openai_public = importlib.import_module("tiktoken_ext.openai_public")

    def bundled_ranks(blobpath: str, expected_hash: str | None = None) -> dict[bytes, int]:
        if expected_hash != O200K_BASE_SHA256:
            raise TokenEncodingError(
                f"tiktoken pins o200k_base at SHA-256 {expected_hash}, but the bundled file "
                f"is {O200K_BASE_SHA256}: update inferencing/encodings and O200K_BASE_SHA256."
            )
        return ranks

    try:
        tiktoken_definition = openai_public.ENCODING_CONSTRUCTORS["o200k_base"]
        offline = types.FunctionType(
            tiktoken_definition.__code__,
            {**vars(openai_public), "load_tiktoken_bpe": bundled_ranks},
        )
        spec = offline()
        pat_str, special_tokens = spec["pat_str"], spec["special_tokens"]
        understood = spec["mergeable_ranks"] is ranks and isinstance(pat_str, str)
    except (AttributeError, KeyError, TypeError) as exc:
        raise _unrecognised_tiktoken() from exc
    if not understood:
        raise _unrecognised_tiktoken()
    return pat_str, dict(special_tokens)


def _unrecognised_tiktoken() -> TokenEncodingError:
    return TokenEncodingError(
        "This tiktoken version defines o200k_base in a way inferencing.tokens does not "
        "recognise; pin tiktoken to a known version or update the loader."
    )
