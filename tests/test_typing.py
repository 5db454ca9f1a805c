"""The public API is typed for users: mypy --strict accepts correct use
(tests/typing_check.py) and rejects a handler whose payload type is wrong.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent


def _mypy(*paths: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", "--config-file=", *paths],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_users_file_passes_mypy_strict(tmp_path: Path) -> None:
    wrong = tmp_path / "wrong_handler.py"
    wrong.write_text(
        "from flask_ploints import Event, PlointsWebhooks\n"
        "from flask_ploints.payloads import PointsEarned\n"
        "webhooks = PlointsWebhooks()\n"
        "@webhooks.on('points.earned', model=PointsEarned)\n"
        "def award(event: Event, payload: int) -> None: ...\n"
    )
    good = _mypy("tests/typing_check.py")
    assert good.returncode == 0, good.stdout
    bad = _mypy(str(wrong))
    assert bad.returncode == 1
    assert (
        'wrong_handler.py:4: error: Argument 1 has incompatible type "Callable[[Event, int], None]"'
        in bad.stdout
    )
