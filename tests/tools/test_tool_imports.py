"""Importing the tools layer stays cheap: semantic-kernel loads only when an SK plugin is built."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_tools_modules_do_not_import_semantic_kernel() -> None:
    script = (
        "import sys\n"
        "import tools.registry, tools.policy, tools.plugins, tools.sk_adapter, tools.samples\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] == 'semantic_kernel')\n"
        "assert not loaded, loaded\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    completed = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
