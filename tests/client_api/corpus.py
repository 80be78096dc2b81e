"""A small corpus under access rules, ingested once for tests that serve the real app."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from client_api.composition import build_knowledge
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


def ingest_corpus(root: Path, data: Path, *, handbook: str, payroll: str) -> Path:
    """Write a public handbook page and a finance-only payroll page under ``root``,
    ingest them into ``data``, and return ``data``."""
    (root / "handbook").mkdir()
    (root / "handbook" / "leave.md").write_text(handbook)
    (root / "payroll").mkdir()
    (root / "payroll" / "accounts.md").write_text(payroll)
    (root / "acl.yaml").write_text(ACL)

    async def ingest() -> None:
        index, ingestor, _ = build_knowledge(dev_settings(data))
        await index.open()
        try:
            report = await ingestor.ingest(root)
            assert report.files_indexed == 2
        finally:
            await index.close()

    asyncio.run(ingest())
    return data
