"""The LiteLLM proxy as a gateway benchmark target, in a virtualenv of its own.

LiteLLM is not a dependency of Lamina: the benchmark installs ``litellm[proxy]``, pinned
to :data:`LITELLM_VERSION`, into a separate virtualenv cached outside the repository
(``~/.cache/lamina-bench/litellm-<version>``, reused by later runs), so that its many
dependencies never touch the project's environment.

Supply-chain guard: releases publicly reported as compromised are refused before
anything is installed (:func:`refuse_compromised`), and after every install, and on
every reuse of the cache, the virtualenv's ``site-packages`` is checked for ``.pth``
files that run code at interpreter start-up (:func:`audit_startup_hooks`); the
benchmark refuses to start LiteLLM when it finds one it does not know.

What the proxy is given (:func:`litellm_config`), mirroring Lamina's set-up:

- one deployment ``bench`` (``openai/<model>`` at the stub's ``api_base``);
- authentication: a ``master_key``, sent by the load generator as the bearer token
  (no database, so no virtual keys);
- rate limiting without a database, two limiters that run on every request:
  ``general_settings.global_max_parallel_requests`` (the proxy's parallel-request
  limiter, an in-memory counter) and the deployment's ``rpm``/``tpm`` enforced by
  ``router_settings.optional_pre_call_checks: [enforce_model_rate_limits]`` (in-memory
  per-minute counters). The limits are far above what the benchmark can send;
- one uvicorn worker, telemetry to LiteLLM off, the bundled model cost map (no fetch).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path

from bench.processes import Child, free_port, running
from bench.stub_upstream import MODEL as UPSTREAM_MODEL
from bench.targets import DEPLOYMENT, UPSTREAM_KEY, BenchFailed, Target

LITELLM_VERSION = "1.103.7"
"""Pinned. Newer releases (1.103.8 on) require a certifi newer than the package index
here serves; 1.107.* and 1.82.7/1.82.8 are refused anyway (:data:`COMPROMISED`)."""

COMPROMISED = frozenset({"1.82.7", "1.82.8"})
COMPROMISED_SERIES = ("1.107.",)
"""Releases publicly reported as compromised: never installed, never run."""

MASTER_KEY = "sk-lamina-bench-master"
MAX_PARALLEL_REQUESTS = 10_000
DEPLOYMENT_RPM = 100_000_000
DEPLOYMENT_TPM = 10_000_000_000

# .pth files that hold an ``import`` line in an ordinary virtualenv: setuptools' and
# virtualenv's own. Any other one runs code on every interpreter start.
KNOWN_STARTUP_PTH = frozenset({"distutils-precedence.pth", "_virtualenv.pth"})
_IMPORT_LINE = re.compile(r"^\s*import[\s.]")


def refuse_compromised(version: str) -> None:
    """Raise :class:`BenchFailed` for a release publicly reported as compromised."""
    if version in COMPROMISED or version.startswith(COMPROMISED_SERIES):
        raise BenchFailed(f"litellm {version} is a release reported as compromised: refused")


def cache_dir(version: str) -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "lamina-bench" / f"litellm-{version}"


def audit_startup_hooks(site_packages: Path) -> None:
    """Refuse a virtualenv whose ``site-packages`` runs unknown code at start-up: a
    ``litellm_init.pth``, or any ``.pth`` with an ``import`` line other than the
    well-known ones (:data:`KNOWN_STARTUP_PTH`)."""
    for pth in sorted(site_packages.glob("*.pth")):
        if pth.name == "litellm_init.pth":
            raise BenchFailed(f"{pth} exists (a known malicious start-up hook): refused")
        if pth.name in KNOWN_STARTUP_PTH:
            continue
        lines = pth.read_text(errors="replace").splitlines()
        if any(_IMPORT_LINE.match(line) for line in lines):
            raise BenchFailed(f"{pth} runs code at interpreter start-up: refused")


def _venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def _query(python: Path, code: str) -> str:
    done = subprocess.run(
        [str(python), "-c", code], capture_output=True, text=True, check=False, timeout=120
    )
    return done.stdout.strip() if done.returncode == 0 else ""


def installed_version(python: Path) -> str:
    return _query(
        python,
        "import importlib.metadata as m\ntry: print(m.version('litellm'))\nexcept Exception: pass",
    )


def ensure_litellm(version: str = LITELLM_VERSION) -> Path:
    """The cached virtualenv with ``litellm[proxy]==version``, created and installed when
    missing (pip's output shown: it is a long download), audited every time."""
    refuse_compromised(version)
    venv = cache_dir(version)
    python = _venv_python(venv)
    if not python.exists():
        print(f"creating the LiteLLM virtualenv {venv}", flush=True)
        base = getattr(sys, "_base_executable", None) or sys.executable
        subprocess.run([base, "-m", "venv", str(venv)], check=True)
    if installed_version(python) != version:
        print(f"installing litellm[proxy]=={version} into {venv} (a long download)", flush=True)
        install = [str(python), "-m", "pip", "install", "--disable-pip-version-check"]
        done = subprocess.run([*install, f"litellm[proxy]=={version}"], check=False)
        if done.returncode != 0:
            raise BenchFailed(f"pip could not install litellm[proxy]=={version} into {venv}")
    found = installed_version(python)
    if found != version:
        raise BenchFailed(f"{venv} holds litellm {found or 'nothing'}, expected {version}")
    refuse_compromised(found)
    site = _query(python, "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    if not site:
        raise BenchFailed(f"cannot find site-packages of {venv}")
    audit_startup_hooks(Path(site))
    return venv


def litellm_config(upstream: Target) -> dict[str, object]:
    """The proxy's config: one deployment at the stub, master key, two limiters on."""
    return {
        "model_list": [
            {
                "model_name": DEPLOYMENT,
                "litellm_params": {
                    "model": f"openai/{UPSTREAM_MODEL}",
                    "api_base": upstream.base_url,
                    "api_key": UPSTREAM_KEY,
                    "rpm": DEPLOYMENT_RPM,
                    "tpm": DEPLOYMENT_TPM,
                },
            }
        ],
        "router_settings": {"optional_pre_call_checks": ["enforce_model_rate_limits"]},
        "litellm_settings": {"telemetry": False, "drop_params": True, "num_retries": 0},
        "general_settings": {
            "master_key": MASTER_KEY,
            "global_max_parallel_requests": MAX_PARALLEL_REQUESTS,
        },
    }


def _litellm_env(venv: Path) -> dict[str, str]:
    # No database and no provider credentials from the developer's environment.
    dropped = ("DATABASE_URL", "LITELLM_", "OPENAI_", "REDIS_", "PYTHONPATH", "VIRTUAL_ENV")
    env = {k: v for k, v in os.environ.items() if not k.startswith(dropped)}
    return env | {
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # the bundled map: no fetch at start-up
        "LITELLM_LOG": "ERROR",
        "PATH": f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}",
    }


def start_litellm(
    stack: ExitStack, workdir: Path, upstream: Target, version: str = LITELLM_VERSION
) -> Target:
    """``litellm --config`` on a free loopback port, one uvicorn worker."""
    venv = ensure_litellm(version)
    config = workdir / "litellm_config.yaml"
    # JSON is YAML: the project needs no YAML writer for this.
    config.write_text(json.dumps(litellm_config(upstream), indent=2))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    command = [
        str(venv / "bin" / "litellm"),
        *("--config", str(config), "--host", "127.0.0.1", "--port", str(port)),
        *("--num_workers", "1", "--telemetry", "False"),
    ]
    child: Child = stack.enter_context(
        running(
            "litellm",
            command,
            ready_url=f"{base}/health/liveliness",
            cwd=workdir,
            log_dir=workdir,
            env=_litellm_env(venv),
            ready_timeout_s=180.0,
        )
    )
    description = (
        f"litellm[proxy]=={version}: one uvicorn worker, master key, "
        "global_max_parallel_requests + enforce_model_rate_limits (deployment rpm/tpm)"
    )
    return Target("litellm", description, f"{base}/v1", DEPLOYMENT, MASTER_KEY, child)
