"""Planners: turn a question into a typed :class:`~intelligence.contracts.Plan`."""
