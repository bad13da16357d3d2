"""Shared start of the entry scripts in fgvc/ (train.py, evaluate.py, ...), run as files.

Python puts a script's own folder first on sys.path; fgvc/'s folder holds modules named like
top-level packages elsewhere (evaluate, config, ...), so it is removed and the repository root put
in its place, which makes `import fgvc` work with or without `pip install -e .`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def bootstrap() -> None:
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
    root = str(HERE.parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
