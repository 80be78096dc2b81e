"""``lamina eval``: a question set asked through the real API, each answer scored.

Modules: ``dataset`` (the JSONL question sets), ``client`` (asking through
``POST /v1/chat``), ``embedded`` (a server started for a run), ``passages`` and
``groundedness`` (what an answer is checked against, and how), ``metrics`` (pure
scoring functions), ``scoring`` (per item and in aggregate), ``summary``,
``report`` and ``diff`` (what a run writes and how two runs compare), ``cli``.
Imports stay inside the modules that need them, so ``lamina`` starts fast.
"""
