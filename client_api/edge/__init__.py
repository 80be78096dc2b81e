"""Edge policies: what the API checks before a request reaches the intelligence layer.

- :mod:`client_api.edge.caps`: per-request caps (prompt tokens, history, output, body).
- :mod:`client_api.edge.limits`: requests and tokens per minute, and token quotas per
  day and month, per user and per tenant, held across replicas through Redis.
"""
