"""The inferencing gateway: routing, resilience and metering in front of every model.

The composition root builds one with :func:`build_gateway` and passes it to the
layers above as their :class:`~inferencing.contracts.ChatModel`.
"""

from __future__ import annotations

from inferencing.contracts import TokenBudget
from inferencing.gateway.breaker import BreakerStore, InProcessBreakerStore
from inferencing.gateway.core import Gateway
from inferencing.gateway.metering import UsageLedger, UsageMeter
from inferencing.gateway.routing import ComplexityClassifier, Deployment
from inferencing.providers import AzureTokenProvider, build_chat_model
from inferencing.settings import InferencingSettings
from inferencing.tokens import TokenCounter, default_counter

__all__ = ["Gateway", "build_gateway"]


def build_gateway(
    settings: InferencingSettings,
    *,
    breakers: BreakerStore | None = None,
    ledger: UsageLedger | None = None,
    counter: TokenCounter | None = None,
    classifier: ComplexityClassifier | None = None,
    azure_token_provider: AzureTokenProvider | None = None,
    budget: TokenBudget | None = None,
    capture_content: bool = False,
) -> Gateway:
    """A gateway over every deployment of ``settings.registry()``.

    ``breakers`` default to in-process state; without a ``ledger`` nothing is metered;
    without a ``budget`` no call is held against token limits or quotas; with
    ``capture_content`` the calls' spans carry their prompts and completions.
    Raises ``ValueError`` naming the setting when a deployment cannot be built.
    """
    deployments = [
        Deployment(
            entry,
            build_chat_model(
                entry,
                timeouts=settings.timeouts,
                http_client=settings.http_client,
                max_output_tokens=settings.max_output_tokens,
                temperature=settings.temperature,
                azure_token_provider=azure_token_provider,
            ),
        )
        for entry in settings.registry()
    ]
    return Gateway(
        deployments,
        counter=counter or default_counter(),
        breakers=breakers or InProcessBreakerStore(),
        meter=UsageMeter(ledger, flush_every_s=settings.usage_flush_s) if ledger else None,
        retry=settings.retry,
        breaker=settings.breaker,
        timeouts=settings.timeouts,
        classifier=classifier,
        budget=budget,
        default_max_tokens=settings.max_output_tokens,
        capture_content=capture_content,
    )
