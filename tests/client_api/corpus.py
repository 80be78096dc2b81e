"""A small corpus under access rules, ingested once for tests that serve the real app."""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest

from client_api.composition import open_knowledge
from client_api.settings import LaminaSettings

ACL = """
tenant: contoso
rules:
  - match: "handbook/**"
    public: true
  - match: "payroll/**"
    groups: [finance]
"""


def dev_settings(data: Path, **overrides: Any) -> LaminaSettings:
    """Settings of an app in dev identity mode, with its stores in ``data``."""
    return LaminaSettings(data_dir=data, log_level="WARNING", auth={"mode": "dev"}, **overrides)


def dev_headers(
    user: str, *, groups: str = "", roles: str = "", tenant: str = "contoso"
) -> dict[str, str]:
    """The identity of a caller, as an app in dev identity mode reads it from headers."""
    return {
        "X-Lamina-User": user,
        "X-Lamina-Groups": groups,
        "X-Lamina-Roles": roles,
        "X-Lamina-Tenant": tenant,
    }


def ingest_corpus(tmp_path_factory: pytest.TempPathFactory, *, handbook: str, payroll: str) -> Path:
    """Write a public handbook page and a finance-only payroll page into a new folder,
    ingest them into a new data folder, and return the data folder."""
    root, data = tmp_path_factory.mktemp("corpus"), tmp_path_factory.mktemp("data")
    (root / "handbook").mkdir()
    (root / "handbook" / "leave.md").write_text(handbook)
    (root / "payroll").mkdir()
    (root / "payroll" / "accounts.md").write_text(payroll)
    (root / "acl.yaml").write_text(ACL)

    async def ingest() -> None:
        async with AsyncExitStack() as stack:
            _, ingestor, _ = await open_knowledge(dev_settings(data), stack)
            report = await ingestor.ingest(root)
            assert report.files_indexed == 2

    asyncio.run(ingest())
    return data
