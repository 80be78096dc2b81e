"""Intelligence layer: orchestrator, planning, conversations and prompts (see ``contracts``)."""
