"""Where a measurement came from: the code that made it and the weights every network started from.
Every benchmark page and report page names both."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

from omegaconf import OmegaConf

from fgvc.config import flatten

ROOT = Path(__file__).resolve().parents[1]  # the checkout: recipes/, results/, runs/, weights/


def code_version() -> str:
    """The git commit of the code, marked when the work tree differs from it."""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!results"], cwd=ROOT,
                           capture_output=True, text=True).stdout.strip()  # results/ is what this writes
    return f"commit {commit or 'unknown'}" + (" (with local changes)" if dirty else "")


def starting_weights(run_dir: Path) -> str:
    """Every network's starting weights in a run's recipe (model.weights; the DCN's coarse and fine
    files), with the first 12 hex digits of each file's sha256; "random" when a network starts from none."""
    cfg = flatten(OmegaConf.to_container(OmegaConf.load(Path(run_dir) / "recipe.yaml"), resolve=True))
    arch = cfg.get("model.arch")
    keys = ["model.dcn.coarse_weights", "model.dcn.fine_weights"] if arch == "dcn" else ["model.weights"]
    parts = []
    for key in keys:
        value = cfg.get(key) or ""
        path = ROOT / value if value and not Path(value).is_absolute() else Path(value)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12] if value and path.is_file() else ""
        parts.append(f"{key.split('.')[-1]}: " + (f"`{value}` (sha256 {digest})" if digest else f"`{value}`" if value
                                                     else "random (timm init)"))
    return "; ".join(parts)
