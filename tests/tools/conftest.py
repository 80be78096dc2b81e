"""Fixtures of the tools layer's tests."""

from __future__ import annotations

import base64
import hashlib
import importlib
import subprocess
import sys
import textwrap
import tomllib
import uuid
import zipfile
from collections.abc import Mapping
from importlib.metadata import entry_points
from pathlib import Path

import pytest


class PluginInstaller:
    """Installs throwaway distributions that declare tool entry points.

    Each is a real ``*.dist-info`` directory (METADATA + entry_points.txt) on
    ``sys.path``, found by ``importlib.metadata`` exactly like a pip-installed
    package. Entry points go to :attr:`group`, unique to the test, so whatever
    else is installed never leaks in.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.group = f"lamina.tools.test_{uuid.uuid4().hex[:8]}"

    def install(
        self,
        entry_points: Mapping[str, str],
        module_source: str = "",
        *,
        group: str | None = None,
        dist_name: str | None = None,
    ) -> str:
        """Write a module holding ``module_source`` and a distribution declaring
        ``entry_points``, where ``{module}`` in a value stands for the module's name."""
        module = f"lamina_test_plugin_{uuid.uuid4().hex[:12]}"
        (self.root / f"{module}.py").write_text(textwrap.dedent(module_source))
        dist = dist_name or module
        dist_info = self.root / f"{dist}-1.0.dist-info"
        dist_info.mkdir()
        (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
        lines = [f"{name} = {value.format(module=module)}" for name, value in entry_points.items()]
        (dist_info / "entry_points.txt").write_text(
            f"[{group or self.group}]\n" + "\n".join(lines) + "\n"
        )
        importlib.invalidate_caches()
        return module


def pip_install_plugin(
    target: Path,
    *,
    dist_name: str,
    module: str,
    module_source: str,
    entry_points: Mapping[str, str],
    group: str = "lamina.tools",
) -> None:
    """Build a wheel of one module declaring ``entry_points``, and ``pip install`` it
    into ``target`` (``--target``, no index, no dependencies).

    pip installs it as it installs any package, so ``target`` on ``sys.path`` (or on
    ``PYTHONPATH``) holds a distribution exactly as a plugin author's users get it.
    The wheel is written here, not built from a source tree by a PEP 517 backend:
    setuptools needs the ``wheel`` package for that, which Lamina does not install.
    """
    stem = f"{dist_name.replace('-', '_')}-1.0"  # the wheel's name for the distribution
    declared = "".join(f"{name} = {value}\n" for name, value in entry_points.items())
    files = {
        f"{module}.py": textwrap.dedent(module_source),
        f"{stem}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {dist_name}\nVersion: 1.0\n",
        f"{stem}.dist-info/WHEEL": (
            "Wheel-Version: 1.0\nGenerator: lamina-tests\nRoot-Is-Purelib: true\n"
            "Tag: py3-none-any\n"
        ),
        f"{stem}.dist-info/entry_points.txt": f"[{group}]\n{declared}",
    }
    record = []
    for path, text in files.items():
        data = text.encode()
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}\n")
    files[f"{stem}.dist-info/RECORD"] = "".join(record) + f"{stem}.dist-info/RECORD,,\n"
    wheel = target.parent / f"{stem}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, text in files.items():
            archive.writestr(path, text)
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--no-index",
            "--disable-pip-version-check",
            "--target",
            str(target),
            str(wheel),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    importlib.invalidate_caches()


@pytest.fixture
def plugins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> PluginInstaller:
    monkeypatch.syspath_prepend(str(tmp_path))
    return PluginInstaller(tmp_path)


REPO_ROOT = Path(__file__).resolve().parents[2]


def declared_entry_points() -> dict[str, str]:
    """The ``lamina.tools`` entry points ``pyproject.toml`` declares."""
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    declared: dict[str, str] = pyproject["project"]["entry-points"]["lamina.tools"]
    return declared


@pytest.fixture
def lamina_entry_points(plugins: PluginInstaller) -> dict[str, str]:
    """Lamina's own ``lamina.tools`` entry points, as ``pyproject.toml`` declares them.

    With the project installed (``pip install -e .``) the real ones are used;
    otherwise a ``lamina`` distribution declaring the same ones goes on the path.
    """
    declared = declared_entry_points()
    if not entry_points(group="lamina.tools", name="directory"):
        plugins.install(declared, group="lamina.tools", dist_name="lamina")
    return declared
