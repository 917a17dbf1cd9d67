"""The tree stays clean under the linter configured in pyproject.toml ([tool.ruff])."""

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("ruff")  # the `test` extra pins it

ROOT = Path(__file__).resolve().parent.parent


def test_ruff_clean():
    r = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "glmkit", "tests", "bench"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
