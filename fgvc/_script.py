"""Imported by the entry scripts in fgvc/ (train.py, evaluate.py, ...) only when they run as files.

Python then puts the script's own folder, fgvc/, first on sys.path, where modules named like
top-level packages elsewhere (evaluate, config, ...) would shadow them; importing this module puts
the repository root in its place, which makes `import fgvc` work with or without `pip install -e .`.
Installed console scripts (`fgvc-train`, ...) import the same modules as `fgvc.train` and skip this.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))
