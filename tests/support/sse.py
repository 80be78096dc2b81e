"""Read a server-sent-event stream into (event, data) pairs."""

from __future__ import annotations

import json
from typing import Any

import httpx
from httpx_sse import connect_sse


def read_events(
    client: httpx.Client, url: str, *, json_body: dict[str, Any], headers: dict[str, str]
) -> list[tuple[str, dict[str, Any]]]:
    with connect_sse(client, "POST", url, json=json_body, headers=headers) as source:
        source.response.raise_for_status()
        return [(e.event, json.loads(e.data)) for e in source.iter_sse() if e.data]
