"""Where tests and benchmarks find the programs they start: the virtualenv's scripts, the
repository (for PYTHONPATH) and the faulty plugin's command line."""

from __future__ import annotations

import sys
from pathlib import Path

VENV_BIN = Path(sys.executable).parent
REPO_ROOT = Path(__file__).resolve().parents[2]
FAULTY_PLUGIN = [sys.executable, "-m", "tests.harness.faulty_plugin"]
