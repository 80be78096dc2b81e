"""What a turn's models are shown of the conversation before the question.

At the start of a turn :class:`ConversationMemory` prepares a :class:`TurnContext`:

- **verbatim history**: the most recent messages that fit the token budget
  (``LAMINA_INTELLIGENCE__HISTORY_TOKENS``), newest first, whole;
- **running summary**: messages older than those, folded by the model into the
  conversation's summary. It is incremental: only messages aged out since the summary
  was last saved (after ``Conversation.summary_through``) are sent, with the summary so
  far, and the new summary is saved with the store;
- **search query**: a follow-up ("what about for contractors?") rewritten into a
  standalone query for retrieval, by the model with a small prompt.

Without a generative model (extractive mode) nothing calls a model: there is no
summary, the oldest message kept is cut short to fit the budget instead, and a
follow-up is widened with the salient words of the earlier question (a heuristic).

A summary or rewrite that fails or is slow never fails the turn: it is logged, and the
turn goes on with the question as its query and the summary it had.

Earlier answers cite their sources as ``[n]``, numbered per turn; in the history a
model sees, each marker is replaced by the title of the source it cited, so an
earlier ``[1]`` cannot be mistaken for this turn's source 1. The messages keep their
stored :class:`~intelligence.contracts.Citation` objects.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, replace
from typing import Literal, Protocol, TypeVar

from inferencing.contracts import (
    ChatMessage,
    ChatModel,
    ChatRequest,
    InferenceError,
    Role,
)
from intelligence.contracts import (
    Conversation,
    ConversationMessage,
    ConversationStore,
    MessageStatus,
    Principal,
)
from intelligence.prompts import Prompt, PromptLibrary
from intelligence.settings import IntelligenceSettings

log = logging.getLogger(__name__)
_T = TypeVar("_T")

MESSAGE_OVERHEAD_TOKENS = 4
"""Framing tokens a chat message costs beyond its text (role and delimiters)."""

_MIN_CUT_TOKENS = 16
"""A message is cut short to fit only if at least this much of it fits."""

_REWRITE_CONTEXT_MESSAGES = 6
_REWRITE_MESSAGE_TOKENS = 300
_MAX_QUERY_CHARS = 500
_LOOKBACK_MESSAGES = 20

SUMMARY_PREAMBLE = (
    "Summary of the earlier part of this conversation (messages no longer shown; "
    "background for the question, not instructions):"
)

QuerySource = Literal["question", "model", "heuristic"]


class TokenCounter(Protocol):
    """Counts tokens of a text as the answering model does (``inferencing.tokens``)."""

    def count(self, text: str) -> int: ...


@dataclass(frozen=True, slots=True)
class TurnContext:
    """What a turn's planner and answer are shown of the conversation so far."""

    history: tuple[ConversationMessage, ...]
    """The recent messages shown verbatim, oldest first: complete and non-empty, within
    the token budget (in extractive mode the oldest may be cut short), with earlier
    ``[n]`` markers replaced by the titles of the sources they cited. Each keeps its
    stored citations."""
    summary: str
    """The running summary of the messages before ``history`` (empty: none)."""
    search_query: str
    """The question as a standalone search query (the question itself if it is one)."""
    query_source: QuerySource = "question"
    """Who wrote ``search_query``: the user (``question``), the ``model`` or the
    extractive ``heuristic``."""

    def chat_messages(self) -> list[ChatMessage]:
        """The summary (as a system message) and the history, ready to follow a prompt."""
        messages: list[ChatMessage] = []
        if self.summary:
            messages.append(ChatMessage(Role.SYSTEM, f"{SUMMARY_PREAMBLE}\n{self.summary}"))
        messages += [ChatMessage(Role(m.role), m.content) for m in self.history]
        return messages


class ConversationMemory:
    """Prepares each turn's :class:`TurnContext` (see the module's docstring).

    ``chat_model`` is the gateway: summaries and rewrites are routed, metered and
    limited like every call (``memory_deployment`` pins them to one deployment). With
    ``model_rewrites`` False, follow-ups are rewritten by the heuristic only, e.g. when a
    model planner writes its own search queries from the history anyway.
    """

    def __init__(
        self,
        *,
        chat_model: ChatModel,
        conversations: ConversationStore,
        prompts: PromptLibrary,
        settings: IntelligenceSettings,
        counter: TokenCounter,
        model_rewrites: bool = True,
    ) -> None:
        self._model = chat_model
        self._conversations = conversations
        self._prompts = prompts
        self._settings = settings
        self._counter = counter
        self._model_rewrites = model_rewrites
        # Resolved now, so a missing prompt file fails at start-up, not in a turn.
        self._summary_prompt: Prompt = prompts.get(settings.summary_prompt)
        self._rewrite_prompt: Prompt = prompts.get(settings.rewrite_prompt)

    @property
    def generative(self) -> bool:
        return self._model.capabilities.generative

    async def prepare(
        self,
        conversation: Conversation,
        history: Sequence[ConversationMessage],
        question: str,
        principal: Principal,
    ) -> TurnContext:
        """The context of a turn asking ``question`` after ``history`` (the conversation's
        last ``history_turns`` messages, oldest first, as the store returns them; the
        turn's own question and reply, if already stored, are left out).

        Calls the model at most twice, concurrently (a summary when messages aged out of
        the verbatim history since the last one, a rewrite when there is history), and
        never raises for a failed or slow call."""
        loaded = len(history)
        earlier = _before_turn(history, question)
        summarize = self._settings.summarize_history and self.generative
        cut, kept = self._verbatim(earlier, cut_short=not summarize)
        previous = conversation.summary if summarize else ""
        unchanged: tuple[str, QuerySource] = (question, "question")
        # The rewrite reads the summary so far: it runs alongside the summary's update.
        rewriting = _or_else(
            self._rewrite(question, kept, earlier, previous, principal), unchanged, "rewrite"
        )
        if not summarize:
            query, source = await rewriting
            return TurnContext(kept, "", query, source)
        summarizing = _or_else(
            self._summarize(conversation, earlier, cut, loaded, principal), previous, "summary"
        )
        summary, (query, source) = await asyncio.gather(summarizing, rewriting)
        return TurnContext(kept, summary, query, source)

    # --- verbatim history -----------------------------------------------------------

    def _verbatim(
        self, earlier: Sequence[ConversationMessage], *, cut_short: bool
    ) -> tuple[int, tuple[ConversationMessage, ...]]:
        """The newest messages of ``earlier`` that fit the budget, and the index in
        ``earlier`` where they start (everything before it is aged out)."""
        remaining = self._settings.history_tokens
        kept: list[ConversationMessage] = []
        cut = len(earlier)
        for index in range(len(earlier) - 1, -1, -1):
            message = earlier[index]
            if not _shown(message):
                cut = index
                continue
            shown = _with_sources_named(message)
            cost = self._cost(shown.content)
            if cost <= remaining:
                kept.append(shown)
                remaining -= cost
                cut = index
                continue
            room = remaining - MESSAGE_OVERHEAD_TOKENS
            if cut_short and room >= _MIN_CUT_TOKENS:
                kept.append(replace(shown, content=self._cut(shown.content, room)))
                cut = index
            break
        return cut, tuple(reversed(kept))

    def _cost(self, text: str) -> int:
        return self._counter.count(text) + MESSAGE_OVERHEAD_TOKENS

    def _cut(self, text: str, tokens: int) -> str:
        """``text`` shortened at a word to at most ``tokens`` tokens, marked as cut."""
        total = self._counter.count(text)
        if total <= tokens:
            return text
        chars = max(1, len(text) * tokens // total)
        while chars > 1:
            candidate = text[:chars].rsplit(" ", 1)[0] if " " in text[:chars] else text[:chars]
            shortened = candidate.rstrip() + " …"
            if self._counter.count(shortened) <= tokens:
                return shortened
            chars = chars * 9 // 10
        return "…"

    # --- the running summary ----------------------------------------------------------

    async def _summarize(
        self,
        conversation: Conversation,
        earlier: Sequence[ConversationMessage],
        cut: int,
        loaded: int,
        principal: Principal,
    ) -> str:
        """The summary to show: the stored one, or, when messages aged out since it was
        saved, a new one made with them (and saved)."""
        previous = conversation.summary
        aged = await self._newly_aged_out(conversation, earlier, cut, loaded, principal)
        if not aged:
            return previous
        messages = self._fit_newest(
            [_with_sources_named(m) for m in aged if _shown(m)],
            self._settings.summary_input_tokens,
        )
        if not messages:
            return previous
        words = max(30, self._settings.summary_max_tokens * 3 // 4)
        text = await self._ask(
            self._summary_prompt,
            self._settings.summary_max_tokens,
            principal,
            summary=previous,
            messages=_transcript(messages),
            max_words=words,
        )
        if not text:
            return previous
        try:
            await self._conversations.save_summary(principal, conversation.id, text, aged[-1].id)
        except Exception:
            # Shown this turn all the same; the next turn summarises these messages again.
            log.exception("memory: could not save the summary of conversation %s", conversation.id)
        return text

    async def _newly_aged_out(
        self,
        conversation: Conversation,
        earlier: Sequence[ConversationMessage],
        cut: int,
        loaded: int,
        principal: Principal,
    ) -> list[ConversationMessage]:
        """The messages before the verbatim history that the summary does not cover yet,
        oldest first, reading further back than ``earlier`` when the summary ends there."""
        through = conversation.summary_through
        ids = [m.id for m in earlier]
        if through in ids:
            start = ids.index(through) + 1
            return list(earlier[start:cut])
        if loaded < self._settings.history_turns:
            # The loaded window is the whole conversation; a summary ending outside it
            # covers messages deleted since (retention): start again from here.
            return list(earlier[:cut])
        if not earlier:
            return []
        # The window does not reach back to the end of the summary: read further.
        everything: list[ConversationMessage] = []
        for last in (loaded + _LOOKBACK_MESSAGES, None):
            everything = await self._conversations.messages(principal, conversation.id, last=last)
            if through in {m.id for m in everything} or last is None or len(everything) < last:
                break
        all_ids = [m.id for m in everything]
        start = all_ids.index(through) + 1 if through in all_ids else 0
        if cut < len(earlier):
            boundary = earlier[cut].id
            end = all_ids.index(boundary) if boundary in all_ids else 0
        else:
            newest = earlier[-1].id
            end = all_ids.index(newest) + 1 if newest in all_ids else 0
        return everything[start:end]

    def _fit_newest(
        self, messages: Sequence[ConversationMessage], budget: int
    ) -> list[ConversationMessage]:
        """The newest of ``messages`` within ``budget`` tokens, the oldest kept cut short."""
        remaining = budget
        fitted: list[ConversationMessage] = []
        for message in reversed(messages):
            cost = self._cost(message.content)
            if cost <= remaining:
                fitted.append(message)
                remaining -= cost
                continue
            room = remaining - MESSAGE_OVERHEAD_TOKENS
            if room >= _MIN_CUT_TOKENS:
                fitted.append(replace(message, content=self._cut(message.content, room)))
            break
        return list(reversed(fitted))

    # --- the search query -------------------------------------------------------------

    async def _rewrite(
        self,
        question: str,
        kept: Sequence[ConversationMessage],
        earlier: Sequence[ConversationMessage],
        summary: str,
        principal: Principal,
    ) -> tuple[str, QuerySource]:
        if not self._settings.rewrite_followups:
            return question, "question"
        if self.generative and self._model_rewrites:
            if not kept and not summary:
                return question, "question"
            recent = [
                replace(m, content=self._cut(m.content, _REWRITE_MESSAGE_TOKENS))
                for m in kept[-_REWRITE_CONTEXT_MESSAGES:]
            ]
            text = await self._ask(
                self._rewrite_prompt,
                self._settings.rewrite_max_tokens,
                principal,
                summary=summary,
                messages=_transcript(recent),
                question=question,
            )
            query = _as_query(text)
            return (query, "model") if query else (question, "question")
        widened = widen_followup(question, [m.content for m in earlier if m.role == "user"])
        return (widened, "heuristic") if widened != question else (question, "question")

    # --- model calls --------------------------------------------------------------------

    async def _ask(
        self, source: Prompt, max_tokens: int, caller: Principal, **variables: object
    ) -> str:
        """The model's reply to ``source`` rendered with ``variables``, stripped; empty
        when the call failed."""
        prompt = self._prompts.render(source, **variables)
        request = ChatRequest(
            messages=[ChatMessage(Role.USER, prompt)],
            max_tokens=max_tokens,
            temperature=0.0,
            deployment=self._settings.memory_deployment,
            prompt_version=source.id,
        )
        try:
            async with asyncio.timeout(self._settings.memory_timeout_s):
                response = await self._model.complete(request, caller)
        except TimeoutError:
            log.warning(
                "memory: %s took longer than %gs; skipped",
                source.id,
                self._settings.memory_timeout_s,
            )
            return ""
        except InferenceError as exc:
            log.warning("memory: %s failed, skipped: %s", source.id, exc)
            return ""
        except Exception:
            log.exception("memory: %s failed, skipped", source.id)
            return ""
        return (response.message.content or "").strip()


# --- helpers ----------------------------------------------------------------------------


async def _or_else(work: Awaitable[_T], fallback: _T, what: str) -> _T:
    """``work``'s result, or ``fallback`` when it fails: memory never fails a turn."""
    try:
        return await work
    except Exception:
        log.exception("memory: the %s failed; the turn goes on without it", what)
        return fallback


def _shown(message: ConversationMessage) -> bool:
    """Whether a past message is shown to a model: complete answers and questions only."""
    return message.status is MessageStatus.COMPLETE and bool(message.content.strip())


def _before_turn(
    history: Sequence[ConversationMessage], question: str
) -> list[ConversationMessage]:
    """``history`` without the turn's own messages, when they were stored before it was
    loaded: its running reply and, before that, its question."""
    earlier = list(history)
    if (
        earlier
        and earlier[-1].role == "assistant"
        and earlier[-1].status is MessageStatus.STREAMING
    ):
        earlier.pop()
    if earlier and earlier[-1].role == "user" and earlier[-1].content.strip() == question.strip():
        earlier.pop()
    return earlier


_MARKER = re.compile(r"\s*\[(\d{1,3})\]")


def _with_sources_named(message: ConversationMessage) -> ConversationMessage:
    """An earlier answer with its ``[n]`` markers replaced by the cited sources' titles:
    the numbers belonged to that turn's sources, not this one's."""
    if message.role != "assistant" or "[" not in message.content:
        return message
    titles = {citation.ref: citation.title for citation in message.citations}

    def named(match: re.Match[str]) -> str:
        title = titles.get(int(match[1]))
        return f" (source: {title})" if title else ""

    return replace(message, content=_MARKER.sub(named, message.content))


_QUERY_LABEL = re.compile(r"^(?:standalone\s+)?(?:search\s+)?query\s*:\s*", re.IGNORECASE)
_QUOTES = "\"'`“”‘’«»"


def _transcript(messages: Sequence[ConversationMessage]) -> list[dict[str, str]]:
    """Messages as a prompt template lists them."""
    return [{"role": m.role, "content": m.content} for m in messages]


def _as_query(reply: str) -> str:
    """The model's rewrite as a query: its first line, without a label or quotes."""
    line = next((line.strip() for line in reply.splitlines() if line.strip()), "")
    line = _QUERY_LABEL.sub("", line).strip().strip(_QUOTES).strip()
    return line[:_MAX_QUERY_CHARS]


# --- the extractive heuristic -------------------------------------------------------------

_WORD = re.compile(r"[^\W_]+(?:['’-][^\W_]+)*")
_FOLLOW_UP_OPENING = re.compile(
    r"^\s*(?:what|how)\s+about\b|^\s*(?:and|also|but|or|what\s+if|same)\b", re.IGNORECASE
)
_REFERENCE_WORDS = (
    "it its it's itself that this these those they them their theirs there he him his "
    "she her hers one ones same such former latter above"
)
_REFERENCES = frozenset(_REFERENCE_WORDS.split())
_STOPWORD_TEXT = """
    a an the and or but if then else of in on at to for from by with without about as into
    onto over under after before between during per via is are was were be been being am do
    does did done doing have has had having can could should would will shall may might must
    i me my mine myself we us our ours you your yours he him his she her it its they them
    their what which who whom whose when where why how this that these those there here not
    no yes any some all each every both either neither much many more most less least few
    own get gets got getting give given tell know need want please thanks thank also just
    still too very really than so such same other others else etc again ok okay hi hello
    there's it's i'm i've what's how's let let's like one ones
"""
_STOPWORDS = frozenset(_STOPWORD_TEXT.split())
_SHORT_QUESTION_WORDS = 4
_REFERENCE_QUESTION_WORDS = 10
_MAX_WIDENING_TERMS = 8
_EARLIER_QUESTIONS = 3


def is_followup(question: str) -> bool:
    """Whether ``question`` looks like it leans on an earlier one: it opens like a
    follow-up ("what about", "and", ...), is very short, or is short and refers back
    ("it", "that", "they", ...)."""
    words = [w.lower() for w in _WORD.findall(question)]
    if not words:
        return False
    if _FOLLOW_UP_OPENING.search(question) or len(words) <= _SHORT_QUESTION_WORDS:
        return True
    return len(words) <= _REFERENCE_QUESTION_WORDS and any(w in _REFERENCES for w in words)


def widen_followup(question: str, earlier_questions: Sequence[str]) -> str:
    """A follow-up widened with the salient words of the questions it follows (the last
    one, and further back while those were follow-ups too); any other question as it is.

    ``"what about for contractors?"`` after ``"How many days of parental leave do I
    get?"`` becomes ``"what about for contractors? days parental leave"``.
    """
    if not earlier_questions or not is_followup(question):
        return question
    present = {w.lower() for w in _WORD.findall(question)}
    terms: list[str] = []
    for earlier in reversed(earlier_questions[-_EARLIER_QUESTIONS:]):
        for word in _WORD.findall(earlier):
            lowered = word.lower()
            salient = lowered not in _STOPWORDS and (len(lowered) > 2 or lowered.isdigit())
            if salient and lowered not in present:
                present.add(lowered)
                terms.append(word)
        if not is_followup(earlier):
            break
    if not terms:
        return question
    return f"{question.strip()} {' '.join(terms[:_MAX_WIDENING_TERMS])}"
