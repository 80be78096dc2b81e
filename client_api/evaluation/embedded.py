"""A Lamina server for one evaluation run: the sample (or a given) corpus ingested
into a temporary data folder, served on a free loopback port in dev auth mode.

It is configured from the environment (``LAMINA_*`` and ``.env``) like
``lamina serve``, so it evaluates the model, prompts and retrieval settings in
force, except where it keeps to itself: its own data folder and embedded stores,
no Redis, no Teams. An evaluation thus never writes to a shared store.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import uvicorn

from client_api.settings import LaminaSettings, load_settings
from knowledge.contracts import IngestionReport, IngestProgress, Retriever

STARTUP_TIMEOUT_S = 120.0


class EmbeddedServerError(Exception):
    """The embedded server could not be prepared or did not start."""


@dataclass(frozen=True, slots=True)
class EmbeddedLamina:
    base_url: str
    settings: LaminaSettings
    ingested: IngestionReport
    retriever: Retriever
    """The server's index, read by the evaluation for the full text of cited passages."""


def embedded_settings(data_dir: Path) -> LaminaSettings:
    """The environment's settings, with every store inside ``data_dir`` and dev auth.
    Raises :class:`~client_api.settings.SettingsError` on an invalid environment."""
    return load_settings(
        data_dir=data_dir,
        log_level="ERROR",
        auth={"mode": "dev"},
        redis={"url": None},
        knowledge={"index_path": None},
        intelligence={"conversations_path": None},
        conversations={"backend": "sqlite"},
        audit={"backend": "sqlite", "path": None},
        jobs={"path": None, "uploads_path": None},
        tools={"approvals": {"backend": "sqlite", "path": None}},
        answer_cache={"backend": "in-process"},
        teams={"enabled": False},
    )


@asynccontextmanager
async def embedded_lamina(
    corpus: Path,
    data_dir: Path,
    *,
    acl: Path | None = None,
    progress: IngestProgress | None = None,
) -> AsyncIterator[EmbeddedLamina]:
    """Ingest ``corpus`` (under ``acl``, default its own ``acl.yaml``) into ``data_dir``
    and serve it until the block ends."""
    # Imported here: the app and its adapters are needed only for an embedded run.
    from client_api.app import create_app
    from client_api.composition import open_knowledge

    settings = embedded_settings(data_dir)
    async with AsyncExitStack() as stack:
        _, ingestor, retriever = await open_knowledge(settings, stack)
        report = await ingestor.ingest(corpus, acl_file=acl, progress=progress)
        if report.files_indexed == 0:
            reasons = "; ".join(f"{s.path}: {s.reason}" for s in report.skipped[:5])
            raise EmbeddedServerError(
                f"no document of {corpus} was indexed" + (f" ({reasons})" if reasons else "")
            )
        app = create_app(settings)
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        port = int(listener.getsockname()[1])
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        thread = threading.Thread(
            target=server.run, kwargs={"sockets": [listener]}, name="lamina-eval", daemon=True
        )
        thread.start()
        try:
            base_url = f"http://127.0.0.1:{port}"
            await _until_ready(server, thread, base_url)
            yield EmbeddedLamina(base_url, settings, report, retriever)
        finally:
            server.should_exit = True
            await asyncio.to_thread(thread.join, 30)
            listener.close()


async def _until_ready(server: uvicorn.Server, thread: threading.Thread, base_url: str) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    async with httpx.AsyncClient(base_url=base_url, timeout=5.0) as http:
        while time.monotonic() < deadline:
            if not thread.is_alive():
                raise EmbeddedServerError(
                    "the embedded Lamina server stopped while starting (its log says why)"
                )
            if server.started:
                try:
                    if (await http.get("/readyz")).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
            await asyncio.sleep(0.05)
    raise EmbeddedServerError(
        f"the embedded Lamina server was not ready within {STARTUP_TIMEOUT_S:g} s"
    )
