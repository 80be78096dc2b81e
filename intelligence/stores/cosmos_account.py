"""What the layer's Azure Cosmos DB adapters share: how they authenticate, and what a
failure to reach the account says to the operator, naming the adapter's own settings.

Imports the SDK only inside functions: callers import this module only when a Cosmos DB
adapter is configured, and the SDK costs import time.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Protocol, TypeVar

from pydantic import SecretStr

from intelligence.contracts import StoreUnavailable

if TYPE_CHECKING:
    from azure.core.credentials_async import AsyncTokenCredential
    from azure.cosmos.aio import ContainerProxy, CosmosClient


class CosmosAccountSettings(Protocol):
    """The settings every Cosmos DB adapter has (``LAMINA_<STORE>__COSMOS__*``)."""

    @property
    def endpoint(self) -> str | None: ...

    @property
    def key(self) -> SecretStr | None: ...

    @property
    def database(self) -> str: ...

    @property
    def container(self) -> str: ...


def account_credential(
    settings: CosmosAccountSettings, given: AsyncTokenCredential | None
) -> tuple[str | AsyncTokenCredential, AsyncTokenCredential | None]:
    """What the client signs with: the account key when set, else the credential passed
    in, else ``DefaultAzureCredential``; and the credential the adapter made (its own to
    close), if it made one."""
    if settings.key is not None:
        return settings.key.get_secret_value(), None
    if given is not None:
        return given, None
    from azure.identity.aio import DefaultAzureCredential

    owned = DefaultAzureCredential()
    return owned, owned


T = TypeVar("T")


async def open_account(
    settings: CosmosAccountSettings,
    given: AsyncTokenCredential | None,
    connect: Callable[[CosmosClient], Awaitable[ContainerProxy]],
    *,
    variables: str,
    what: str,
    unavailable: type[StoreUnavailable],
) -> tuple[CosmosClient, ContainerProxy, AsyncTokenCredential | None]:
    """Sign in to the account and ``connect`` to the adapter's container. Returns the
    client, the container and the credential made here (the adapter's to close). On any
    failure, closes what it opened and raises ``unavailable`` with what to fix, naming
    the adapter's settings (``variables``, e.g. ``LAMINA_AUDIT__COSMOS``)."""
    if not settings.endpoint:
        raise unavailable(
            f"{variables}__ENDPOINT is not set: {what} needs the account endpoint, e.g. "
            "https://<account>.documents.azure.com"
        )
    from azure.cosmos.aio import CosmosClient

    credential, owned = account_credential(settings, given)
    client: CosmosClient | None = None
    try:
        client = CosmosClient(settings.endpoint, credential, user_agent_suffix="lamina")
        return client, await connect(client), owned
    except BaseException as exc:
        if client is not None:
            await client.close()
        if owned is not None:
            await owned.close()
        failure = open_failure(exc, settings, variables=variables, unavailable=unavailable)
        if failure is None:
            raise
        raise failure from exc


async def call_cosmos(
    action: str,
    call: Callable[[], Awaitable[T]],
    expected: tuple[int, ...],
    unavailable: Callable[[str], Exception],
) -> T | int:
    """Run one SDK call: a status in ``expected`` comes back as an int; any other failure
    raises ``unavailable(message)``, the adapter's own error, with a message naming the
    action and never the response body."""
    from azure.core.exceptions import AzureError
    from azure.cosmos.exceptions import CosmosHttpResponseError

    try:
        return await call()
    except CosmosHttpResponseError as exc:
        if exc.status_code in expected:
            return int(exc.status_code)
        raise unavailable(
            f"Azure Cosmos DB refused to {action}: {exc.status_code} {reason(exc)}"
        ) from exc
    except AzureError as exc:
        raise unavailable(f"Azure Cosmos DB did not {action}: {reason(exc)}") from exc


def reason(exc: BaseException) -> str:
    """The first line of an SDK error, without the response body it may quote."""
    message = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    return str(message).strip().splitlines()[0][:300]


def open_failure(
    exc: BaseException,
    settings: CosmosAccountSettings,
    *,
    variables: str,
    unavailable: type[StoreUnavailable],
) -> StoreUnavailable | None:
    """What a failure to open says to an operator, as ``unavailable``; None to let it
    through unchanged. ``variables`` is the adapter's settings prefix
    (``LAMINA_CONVERSATIONS__COSMOS``), named in the advice."""
    from azure.core.exceptions import AzureError, ClientAuthenticationError
    from azure.cosmos.exceptions import CosmosHttpResponseError

    where = f"Azure Cosmos DB at {settings.endpoint}"
    auth = "the account key" if settings.key is not None else "an Entra ID token"
    if isinstance(exc, StoreUnavailable):
        return exc
    if isinstance(exc, ClientAuthenticationError):
        return unavailable(
            f"no Entra ID token for {where}: {reason(exc)} (or set {variables}__KEY)"
        )
    if isinstance(exc, CosmosHttpResponseError):
        return unavailable(
            _refusal(exc.status_code, settings, auth, variables)
            or f"{where} answered {exc.status_code}: {reason(exc)}"
        )
    if isinstance(exc, AzureError):
        return unavailable(f"cannot reach {where}: {reason(exc)}")
    if isinstance(exc, ValueError):  # an endpoint that is no URL, a key that is no base64
        return unavailable(f"cannot use {where} with {auth}: {exc}")
    return None


def _refusal(
    status: int | None, settings: CosmosAccountSettings, auth: str, variables: str
) -> str | None:
    where = f"Azure Cosmos DB at {settings.endpoint}"
    if status == 401:
        return (
            f"{where} refused {auth}: check {variables}__KEY, or the Entra ID "
            "identity and its tenant"
        )
    if status == 403:
        return (
            f"{where} forbade the request with {auth}: an Entra ID identity needs the data-plane "
            "role 'Cosmos DB Built-in Data Contributor', and cannot create databases or "
            f"containers (create them with infra/ and set {variables}__CREATE_IF_MISSING=false)"
        )
    if status == 404:
        return (
            f"{where} has no database {settings.database!r} with container "
            f"{settings.container!r}: create them (infra/) or set "
            f"{variables}__CREATE_IF_MISSING=true"
        )
    return None
