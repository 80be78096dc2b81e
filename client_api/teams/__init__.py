"""Microsoft Teams: the bot endpoint ``POST /api/messages`` on the Microsoft 365 Agents SDK.

Nothing here is imported unless ``LAMINA_TEAMS__ENABLED`` is set: the SDK is an optional
extra (``lamina[teams]``) and slow to import.
"""
