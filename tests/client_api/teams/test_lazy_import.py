"""The Agents SDK is an optional extra: nothing loads it unless Teams is enabled."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.support.processes import REPO

_PROBE = """
import sys
from pathlib import Path
from pathlib import Path
import client_api.app
from client_api.app import create_app
from client_api.settings import LaminaSettings
create_app(LaminaSettings(data_dir=Path(sys.argv[1]), auth={"mode": "dev"}))
loaded = sorted(m for m in sys.modules if m.startswith(("microsoft_agents", "client_api.teams")))
print(",".join(loaded))
"""


def test_the_app_does_not_import_the_agents_sdk_when_teams_is_disabled(tmp_path: Path) -> None:
    probe = subprocess.run(
        [sys.executable, "-c", _PROBE, str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip() == ""
