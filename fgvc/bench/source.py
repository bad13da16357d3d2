"""Which code made a measurement: every benchmark page names it."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the checkout: recipes/, results/, runs/


def code_version() -> str:
    """The git commit of the code, marked when the work tree differs from it."""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!results"], cwd=ROOT,
                           capture_output=True, text=True).stdout.strip()  # results/ is what this writes
    return f"commit {commit or 'unknown'}" + (" (with local changes)" if dirty else "")
