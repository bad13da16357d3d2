"""The main command uses the cores it has: `accelerate launch` without a GPU or config sets one thread."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT, TINY_DATA

from fgvc.engine.threads import cores_per_process, launcher_forced_one_thread

LAUNCHED = {"ACCELERATE_DYNAMO_BACKEND": "NO", "OMP_NUM_THREADS": "1"}


def test_one_thread_from_accelerate_default_is_undone():
    assert launcher_forced_one_thread(LAUNCHED, b"PATH=/bin\0HOME=/root\0", b"accelerate\0launch\0train.py\0")


@pytest.mark.parametrize("parent_env, parent_cmd", [
    (b"PATH=/bin\0OMP_NUM_THREADS=1\0", b"accelerate\0launch\0train.py\0"),  # the user set it
    (b"PATH=/bin\0", b"accelerate\0launch\0--num_cpu_threads_per_process\0001\0train.py\0"),  # asked on the line
    (b"PATH=/bin\0", b"accelerate\0launch\0--num_cpu_threads_per_process=1\0train.py\0"),
    (None, None),  # no /proc: cannot tell
])
def test_one_thread_the_user_asked_for_is_kept(parent_env, parent_cmd):
    assert not launcher_forced_one_thread(LAUNCHED, parent_env, parent_cmd)


def test_not_launched_by_accelerate_or_not_one_thread():
    assert not launcher_forced_one_thread({"OMP_NUM_THREADS": "1"}, b"", b"python\0train.py\0")
    assert not launcher_forced_one_thread({**LAUNCHED, "OMP_NUM_THREADS": "2"}, b"", b"accelerate\0")


def test_cores_shared_by_local_processes():
    cores = len(os.sched_getaffinity(0))
    assert cores_per_process({}) == cores
    assert cores_per_process({"LOCAL_WORLD_SIZE": str(cores * 2)}) == 1


@pytest.mark.slow
def test_main_command_trains_on_every_core(tmp_path):
    """`accelerate launch fgvc/train.py ...` as a user types it (no OMP_NUM_THREADS, no config)."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env["HF_HOME"] = str(tmp_path / "hf")  # no accelerate config file
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", str(ROOT / "fgvc" / "train.py"),
           *TINY_DATA, f"data.root={tmp_path / 'data'}", "train.epochs=1", f"output_dir={out}"]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    threads = json.loads((out / "metrics.json").read_text())["cpu_threads"]
    assert threads == len(os.sched_getaffinity(0))
