"""Fixtures of the tools layer's tests."""

from __future__ import annotations

import importlib
import textwrap
import tomllib
import uuid
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
