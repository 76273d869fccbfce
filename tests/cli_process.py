"""Running `python -m mrs.cli` in a fresh process, for tests of exit codes, help and stdin."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable


def run_mrs(
    *args: str,
    env: dict | None = None,
    stdin: str | None = None,
    timeout: float = 120,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess:
    """`python -m mrs.cli ARGS` in a fresh process (for exit codes, help, real terminals)."""
    full_env = {**os.environ, "JAX_PLATFORMS": "cpu", "PAGER": "less", **(env or {})}
    return subprocess.run(
        [PYTHON, "-m", "mrs.cli", *args],
        check=False,
        capture_output=True,
        text=True,
        env=full_env,
        input=stdin,
        timeout=timeout,
        cwd=cwd or REPO,
    )
