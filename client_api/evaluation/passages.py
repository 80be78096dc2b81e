"""The text of the passages an answer cites, which groundedness is checked against.

The API returns a snippet of each cited passage: its opening, cut to a few
hundred characters. An answer may quote the rest of the passage, so when the
evaluation started the server itself it reads the cited chunks' full text from
that server's index instead, as the item's caller (security-trimmed like any
retrieval). Against a deployment only the snippets are available, and a
sentence taken from the unseen part of a passage counts as unsupported.
"""

from __future__ import annotations

from typing import Literal, Protocol

from client_api.evaluation.client import ApiAnswer
from client_api.evaluation.dataset import Caller
from intelligence.contracts import Principal
from knowledge.contracts import Retriever


class PassageSource(Protocol):
    @property
    def kind(self) -> Literal["index", "snippets"]: ...

    async def passages(self, answer: ApiAnswer, caller: Caller) -> dict[int, str]:
        """Each citation's ``[n]`` to the text of its passage."""
        ...


class CitationSnippets:
    """The snippets the API returned with the citations."""

    @property
    def kind(self) -> Literal["snippets"]:
        return "snippets"

    async def passages(self, answer: ApiAnswer, caller: Caller) -> dict[int, str]:
        return {c.ref: c.snippet for c in answer.citations}


class IndexedPassages:
    """The cited chunks' full text from the index the server answered from; a chunk
    no longer there (or not visible to the caller) falls back to its snippet."""

    def __init__(self, retriever: Retriever, *, dev_tenant: str) -> None:
        self._retriever = retriever
        self._dev_tenant = dev_tenant

    @property
    def kind(self) -> Literal["index"]:
        return "index"

    async def passages(self, answer: ApiAnswer, caller: Caller) -> dict[int, str]:
        principal = Principal(
            tenant_id=caller.tenant or self._dev_tenant,
            user_id=caller.user,
            groups=frozenset(caller.groups),
            roles=frozenset(caller.roles),
            auth_method="dev",
        )
        found: dict[int, str] = {}
        for citation in answer.citations:
            chunk = await self._retriever.get_chunk(citation.chunk_id, principal)
            found[citation.ref] = citation.snippet if chunk is None else chunk.text
        return found
