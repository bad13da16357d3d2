"""The console scripts of pyproject.toml and the fgvc/*.py files run the same `main`."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest
from conftest import ROOT, run_script

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def test_every_entry_script_has_a_console_script():
    files = {p.stem for p in (ROOT / "fgvc").glob("*.py") if not p.stem.startswith("_")}
    entry_files = {f for f in files if "if __name__ == \"__main__\":" in (ROOT / "fgvc" / f"{f}.py").read_text()}
    assert {f"fgvc-{f}" for f in entry_files} == set(SCRIPTS)
    for name, target in SCRIPTS.items():
        module, func = target.split(":")
        assert callable(getattr(importlib.import_module(module), func)), name


@pytest.mark.parametrize("how", ["file", "module"])
def test_train_help_runs_as_a_file_and_as_the_console_scripts_module(how):
    if how == "file":
        proc = run_script("train.py", "--help", timeout=120)
    else:  # what `fgvc-train` imports: fgvc.train, without fgvc/_script.py
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        code = "import sys, fgvc.train; assert '_script' not in sys.modules; sys.exit(fgvc.train.main(['--help']))"
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT / "tests",
                              timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "accelerate launch fgvc/train.py" in proc.stdout
