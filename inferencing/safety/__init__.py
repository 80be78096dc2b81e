"""Safety models behind the inferencing layer's ``PromptShield`` and ``ContentModerator``.

- :class:`HeuristicPromptShield`: offline, the default, and the fallback while the
  Content Safety service is down.
- :class:`AzureContentSafety`: Azure AI Content Safety (Prompt Shields and text
  moderation) over REST.

Only the composition root imports this package; callers use the contracts.
"""

from inferencing.safety.azure_content_safety import AzureContentSafety
from inferencing.safety.heuristic import HeuristicPromptShield

__all__ = ["AzureContentSafety", "HeuristicPromptShield"]
