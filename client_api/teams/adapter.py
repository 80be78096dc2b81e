"""``POST /api/messages``: the Teams bot, on the Microsoft 365 Agents SDK.

The channel's request is authenticated (:class:`BotFrameworkTokenValidator`), answered
at once with 202, and the turn runs in the background: Teams retries a request that is
not answered within a few seconds, and a grounded answer takes longer. The background
task runs the activity through the SDK's ``CloudAdapter`` (``process_activity`` with the
identity the channel proved, a connector client holding the bot's own token) into an
``AgentApplication`` whose message route answers it; the reply goes back through the turn
context, threaded under the user's message, streamed in a 1:1 chat and as one message
elsewhere.

Who asks: the activity's ``from.aadObjectId`` in ``conversation.tenantId``, the default
signed-in roles, and the groups the edge's :class:`GroupResolver` reads from Microsoft
Graph (a Teams activity carries none). Without a resolver (dev identity mode) the user
has no groups and sees only what is public or granted to them by name.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import aclosing, asynccontextmanager

import aiohttp
import httpx
from asgi_correlation_id import correlation_id
from fastapi import APIRouter, FastAPI, Request, Response
from microsoft_agents.activity import Activity, DeliveryModes
from microsoft_agents.hosting.core import (
    AgentApplication,
    ApplicationOptions,
    ClaimsIdentity,
    MemoryStorage,
    Storage,
    TurnContext,
    TurnState,
)
from microsoft_agents.hosting.core.authorization import Connections
from microsoft_agents.hosting.fastapi import CloudAdapter
from pydantic import ValidationError

from client_api.auth.groups import GroupResolver, GroupsUnavailable
from client_api.auth.permissions import Permission, PermissionDenied, PermissionPolicy
from client_api.composition import Services
from client_api.edge.admission import admit_turn
from client_api.problems import Problem
from client_api.settings import LaminaSettings
from client_api.teams.auth import (
    BotFrameworkTokenValidator,
    TeamsAuthError,
    check_teams_settings,
    claims_identity,
    served_tenants,
)
from client_api.teams.conversations import ConversationLink
from client_api.teams.invokes import TeamsInvokes
from client_api.teams.messages import question_text
from client_api.teams.refusals import EDGE_REFUSALS, refusal_text
from client_api.teams.relay import relay_turn
from client_api.teams.replies import TeamsReply
from client_api.teams.tokens import BotTokenError, connection_manager
from intelligence.contracts import (
    ConversationNotFound,
    IntelligenceError,
    Principal,
    ResumedTurn,
    StartedTurn,
    TurnEvent,
    TurnRequest,
)

log = logging.getLogger(__name__)

MESSAGES_PATH = "/api/messages"
_SORRY = "Sorry, I could not answer that. Please try again in a moment."
_NO_GROUPS = "I cannot check what you may read right now. Please try again in a moment."


class _NoTurnState(TurnState):
    """Turn state that loads nothing: what the bot remembers (the conversation map, the
    replies to rate) it keeps itself, so a turn has only the SDK's in-memory temp scope,
    and the SDK's storage is never read or written for conversation or user state."""

    async def load(self, context: TurnContext, storage: Storage) -> TurnState:
        return self


def _agent_application(connections: Connections) -> AgentApplication[TurnState]:
    """The SDK's application the message turns run through: no sign-in, no typing timer
    (a 1:1 answer streams its own updates), the activity's text left as it came
    (:func:`question_text` removes the bot's mention itself)."""
    options = ApplicationOptions(
        storage=MemoryStorage(),  # required by the SDK; holds nothing (see _NoTurnState)
        start_typing_timer=False,
        remove_recipient_mention=False,
        turn_state_factory=_NoTurnState,
    )
    return AgentApplication[TurnState](options, connection_manager=connections)


class TeamsBot:
    """The bot: authenticates the channel's requests, runs each turn in the background
    (tracked, and cancelled at shutdown) through the SDK's application and replies
    through the turn's context."""

    def __init__(
        self,
        settings: LaminaSettings,
        services: Services,
        http: httpx.AsyncClient,
        *,
        groups: GroupResolver | None,
    ) -> None:
        self._settings = settings
        self._teams = settings.teams
        self._services = services
        self._groups = groups
        self._policy = PermissionPolicy.from_settings(settings.auth)
        self._validator = BotFrameworkTokenValidator(settings.teams, http)
        assert services.teams_conversations is not None, "built when Teams is enabled"
        self._conversations = services.teams_conversations
        self._invokes = TeamsInvokes(
            services.assistant,
            self._conversations,
            principal=self._principal,
            resume=self._resume,
        )
        connections = connection_manager(settings.teams)
        self._adapter = CloudAdapter(connection_manager=connections)
        # The SDK's default handler sends the raw exception text to the user. The
        # application has no error handler of its own, so a failing turn ends up here.
        self._adapter.on_turn_error = self._on_turn_error
        self._app = _agent_application(connections)
        self._app.message()(self._on_message)
        self._tasks: set[asyncio.Task[None]] = set()
        self._in_flight: set[tuple[str, str]] = set()
        if groups is None:
            log.warning(
                "Teams users get no groups: no group resolver (LAMINA_AUTH__MODE is not jwt); "
                "they see only public documents and those granted to them by name"
            )

    async def aclose(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def handle(self, request: Request) -> Response:
        try:
            activity = Activity.model_validate(await request.json())
        except (ValueError, ValidationError):
            raise Problem(
                400, "Invalid activity", "The body is not a Bot Framework activity."
            ) from None
        try:
            claims = await self._validator.validate(
                request.headers.get("Authorization"), activity.service_url, activity.channel_id
            )
        except TeamsAuthError as exc:
            raise Problem(
                401, "Unauthorized", str(exc), headers={"WWW-Authenticate": "Bearer"}
            ) from None
        if activity.type == "invoke" and _addressable(activity):
            # Feedback, card clicks: answered in this response, which Teams waits for.
            return await self._invokes.handle(claims_identity(claims), activity)
        if activity.type != "message" or not _addressable(activity):
            # Conversation updates, reactions, …: nothing to answer.
            return Response(status_code=202)
        if not activity.id:
            # Its id is the turn's idempotency key: without one, redeliveries could not be
            # told apart from new questions.
            raise Problem(400, "Invalid activity", "A message activity needs an id.")
        key = (activity.conversation.id, activity.id)
        if key in self._in_flight:  # the channel retried while the turn still runs
            return Response(status_code=202)
        self._in_flight.add(key)
        self._spawn(self._reply(claims_identity(claims), activity), key)
        return Response(status_code=202)

    def _spawn(self, work: Awaitable[None], key: tuple[str, str]) -> None:
        # Each background turn has its own correlation id (the task's context is a copy,
        # so the request's is untouched): in the turn's logs, audit and TurnRequest.
        cid = uuid.uuid4().hex
        log.info("Teams turn %s: activity %s in conversation %s", cid, key[1], key[0])

        async def run() -> None:
            correlation_id.set(cid)
            try:
                await work
            except asyncio.CancelledError:
                raise
            except BotTokenError as exc:
                log.error("Teams turn %s: no token to reply with: %s", cid, exc)
            except aiohttp.ClientError as exc:
                log.error("Teams turn %s: the Bot Connector failed: %s", cid, _described(exc))
            except Exception:
                log.exception("Teams turn %s failed (conversation %s)", cid, key[0])
            finally:
                self._in_flight.discard(key)

        task = asyncio.create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _reply(self, identity: ClaimsIdentity, activity: Activity) -> None:
        # The channel has had its 202: replies can only go through the Bot Connector,
        # never back in the response (expectReplies would buffer them to no one).
        activity.delivery_mode = DeliveryModes.normal
        # A reactive turn: each reply threads under the user's message (replyToId).
        await self._adapter.process_activity(identity, activity, self._app.on_turn)

    async def _on_message(self, context: TurnContext, state: TurnState) -> None:
        """The application's message route."""
        await self._answer(context, context.activity)

    async def _answer(self, context: TurnContext, activity: Activity) -> None:
        personal = activity.conversation.conversation_type in (None, "personal")
        reply = TeamsReply(
            context,
            streaming=personal,
            interval_s=self._teams.stream_interval_s,
            limit_s=self._teams.stream_limit_s,
            feedback=self._teams.feedback,
        )
        question = question_text(activity)
        if not question:
            await context.send_activity("Ask me a question about your documents.")
            return
        try:
            principal = await self._principal(activity)
        except GroupsUnavailable as exc:
            log.error("Teams: group memberships unavailable: %s", exc)
            await context.send_activity(_NO_GROUPS)
            return
        except PermissionDenied as exc:
            await context.send_activity(str(exc))
            return
        try:
            # Requests per minute, caps and token budget, as for a web request; not for a
            # redelivery of a message already admitted (its turn is replayed or joined).
            key = _idempotency_key(activity.conversation.id, activity.id or "")
            if await self._services.conversations.find_turn(principal, key) is None:
                await admit_turn(self._services.limiter, self._services.caps, principal, question)
        except EDGE_REFUSALS as refusal:
            log.info("Teams turn %s refused at the edge: %s", correlation_id.get(), refusal)
            await context.send_activity(refusal_text(refusal))
            return
        try:
            started = await self._start(principal, activity, question)
        except IntelligenceError as exc:
            await context.send_activity(exc.message)
            return
        if started.idempotency in ("replayed", "joined"):
            # The first delivery of this activity answered (or is answering) already.
            await started.events.aclose()
            return
        await reply.start()
        await self._relay(started.events, reply, activity)

    async def _principal(self, activity: Activity) -> Principal:
        tenant = activity.conversation.tenant_id or ""
        user = activity.from_property.aad_object_id if activity.from_property else None
        if not tenant or not user:
            raise PermissionDenied("Only members of a Microsoft Entra tenant can ask me.")
        # An allow-list, or else the bot's own tenant only (check_teams_settings refuses
        # a multi-tenant bot without one).
        if tenant not in served_tenants(self._teams, self._settings.auth):
            raise PermissionDenied("Your organisation is not served by this assistant.")
        groups = await self._groups.groups(tenant, user) if self._groups else frozenset()
        principal = Principal(
            tenant_id=tenant,
            user_id=user,
            groups=groups,
            roles=frozenset(self._settings.auth.default_roles),
            name=activity.from_property.name if activity.from_property else None,
            auth_method="teams",
        )
        self._policy.check(principal, Permission.CHAT)
        return principal

    async def _start(self, principal: Principal, activity: Activity, question: str) -> StartedTurn:
        teams_id, activity_id = activity.conversation.id, activity.id or ""
        link = await self._conversations.find(principal.tenant_id, teams_id, principal.user_id)
        # The activity that created the Lamina conversation is asked, every time it is
        # delivered, exactly as it was the first time: its idempotency key must match.
        first = link is None or link.first_activity_id == activity_id
        request = TurnRequest(
            message=question,
            conversation_id=None if first or link is None else link.conversation_id,
            idempotency_key=_idempotency_key(teams_id, activity_id),
            correlation_id=correlation_id.get(),
        )
        try:
            started = await self._services.assistant.start_turn(request, principal)
        except ConversationNotFound:
            if link is None or first:
                raise
            # The Lamina conversation was deleted (by its owner, or by retention): this
            # Teams chat starts a new one with this message.
            await self._conversations.unlink(principal.tenant_id, teams_id, principal.user_id)
            link = None
            request = dataclasses.replace(request, conversation_id=None)
            started = await self._services.assistant.start_turn(request, principal)
        if link is None:
            await self._conversations.link(
                principal.tenant_id,
                teams_id,
                principal.user_id,
                ConversationLink(started.conversation_id, activity_id),
            )
        return started

    async def _relay(
        self, events: AsyncGenerator[TurnEvent, None], reply: TeamsReply, activity: Activity
    ) -> None:
        posted = await relay_turn(events, reply)
        tenant = activity.conversation.tenant_id
        if posted is not None and posted.teams_message_ids and tenant:
            # Feedback on these Teams messages rates this reply.
            await self._conversations.remember_reply(
                tenant, activity.conversation.id, posted.teams_message_ids, posted.reply
            )

    def _resume(self, identity: ClaimsIdentity, activity: Activity, resumed: ResumedTurn) -> None:
        """Carry a turn resumed from an approval card on in the background. An approver
        deciding for someone else sees none of its answer (it is stored in the
        requester's conversation)."""
        key = (activity.conversation.id, activity.id or "")
        if resumed.for_requester:
            self._spawn(self._reply_resumed(identity, activity, resumed), key)
        else:
            self._spawn(_drain(resumed.events), key)

    async def _reply_resumed(
        self, identity: ClaimsIdentity, activity: Activity, resumed: ResumedTurn
    ) -> None:
        continuation = activity.get_conversation_reference().get_continuation_activity()
        # The answer threads under the card that was clicked.
        continuation.id = activity.reply_to_id or activity.id

        async def answer(context: TurnContext) -> None:
            reply = TeamsReply(
                context,
                streaming=activity.conversation.conversation_type in (None, "personal"),
                interval_s=self._teams.stream_interval_s,
                limit_s=self._teams.stream_limit_s,
                feedback=self._teams.feedback,
            )
            await reply.start()
            await self._relay(resumed.events, reply, activity)

        try:
            await self._adapter.continue_conversation_with_claims(identity, continuation, answer)
        finally:
            await resumed.events.aclose()  # never started if the reply could not begin

    async def _on_turn_error(self, context: TurnContext, error: Exception) -> None:
        cid = correlation_id.get()
        if isinstance(error, BotTokenError | aiohttp.ClientError):
            log.error("Teams turn %s: replying failed: %s", cid, _described(error))
        else:
            log.error("Teams turn %s failed: %s", cid, _described(error), exc_info=error)
        try:
            await context.send_activity(_SORRY)
        except (BotTokenError, aiohttp.ClientError) as exc:
            # The reply path itself is down: the user cannot be told; the log says why.
            log.error("Teams turn %s: could not tell the user: %s", cid, _described(exc))


def _described(error: BaseException) -> str:
    """An error as the log may show it. Never ``repr`` a connector error: aiohttp's shows
    the request's headers, and they carry the bot's bearer token."""
    if isinstance(error, aiohttp.ClientResponseError):
        return f"{type(error).__name__}: HTTP {error.status} from {error.request_info.real_url}"
    return f"{type(error).__name__}: {error}"


async def _drain(events: AsyncGenerator[TurnEvent, None]) -> None:
    """Run a resumed turn to its end unseen (it stores its own answer)."""
    async with aclosing(events) as stream:
        async for _ in stream:
            pass


def _addressable(activity: Activity) -> bool:
    return bool(activity.conversation and activity.conversation.id and activity.service_url)


def _idempotency_key(teams_conversation_id: str, activity_id: str) -> str:
    # Activity ids are unique within a conversation only; the key's length is bounded.
    digest = hashlib.sha256(f"{teams_conversation_id}\n{activity_id}".encode()).hexdigest()
    return f"teams-{digest[:48]}"


def mount_teams(app: FastAPI, settings: LaminaSettings, bot: Callable[[], TeamsBot | None]) -> None:
    """Serve ``POST /api/messages``; ``bot`` gives the running bot (built at start-up).
    Settings that cannot work stop the app here, before it listens."""
    check_teams_settings(settings.teams, settings.auth)
    router = APIRouter(tags=["teams"])

    @router.post(
        MESSAGES_PATH,
        status_code=202,
        summary="Bot Framework activities from Microsoft Teams",
        description="Authenticated with the Bot Framework channel's token; a message is "
        "answered with 202 at once, the reply following through the Bot Connector; an invoke "
        "(feedback, an approval card's button) is answered in the response.",
    )
    async def messages(request: Request) -> Response:
        running = bot()
        if running is None:
            raise Problem(503, "Teams bot not running", "The bot is starting or stopping.")
        return await running.handle(request)

    app.include_router(router)


@asynccontextmanager
async def running_bot(
    settings: LaminaSettings,
    services: Services,
    http: httpx.AsyncClient,
    *,
    groups: GroupResolver | None,
) -> AsyncIterator[TeamsBot]:
    """The bot for the app's lifetime; its background turns are cancelled at shutdown."""
    bot = TeamsBot(settings, services, http, groups=groups)
    try:
        yield bot
    finally:
        await bot.aclose()
