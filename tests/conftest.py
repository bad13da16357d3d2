"""Shared fixtures: offline, headless, tiny. A tiny synthetic set and a tiny trained run are made
once per session and shared by the tests that only read them."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TINY_DATA = ["data.synthetic.num_classes=4", "data.synthetic.train_per_class=10", "data.synthetic.test_per_class=5",
             "data.synthetic.image_size=48", "data.image_size=32", "data.num_workers=0", "train.batch_size=8",
             "data.val_fraction=0.25"]


def run_script(script: str, *args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run an entry script of fgvc/ as a user would, capturing its output."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, str(ROOT / "fgvc" / script), *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout, cwd=ROOT)


def accelerate_launch(script: str, *args: str, num_processes: int = 2, timeout: int = 900,
                      launcher: str = "accelerate.commands.launch") -> subprocess.CompletedProcess:
    """Two connected CPU processes (plain `--cpu --num_processes 2` starts only one); `launcher`
    "fgvc.launch" starts them through `fgvc-launch` instead of `accelerate launch`."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", launcher, "--multi_gpu", "--num_processes", str(num_processes),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(port), str(ROOT / "fgvc" / script), *args]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)


def execute_notebook(name: str, env: dict[str, str]):
    """Execute notebooks/NAME with extra environment variables; returns the executed notebook."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(ROOT / "notebooks" / name, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")  # stripped in git
    old = os.environ.copy()
    os.environ.update(env)
    try:
        nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                resources={"metadata": {"path": str(ROOT)}}).execute()
    finally:
        os.environ.clear()
        os.environ.update(old)
    return nb


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    """A folder shared by every test that trains on the tiny synthetic set."""
    return tmp_path_factory.mktemp("synthetic")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, synth_root) -> Path:
    """A finished 2-epoch synth_baseline run on the tiny synthetic set."""
    out = tmp_path_factory.mktemp("runs") / "tiny"
    proc = run_script("train.py", "recipe=synth_baseline", "train.epochs=2", f"output_dir={out}",
                      f"data.root={synth_root}", *TINY_DATA)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


ARCH_ARGS = {  # tiny settings per model.arch on TINY_DATA's 32 px images
    "racnn": ["recipe=synth_racnn", "model.zoom.scales=2"],
    "dcn": ["recipe=synth_dcn", "model.dcn.fine_backbone=test_resnet",
            "model.dcn.fine_weights=weights/fractal_test_resnet.safetensors", "model.dcn.patch_size=16"],
}


@pytest.fixture(scope="session")
def tiny_arch_runs(tmp_path_factory, synth_root, tiny_run) -> dict[str, Path]:
    """Finished 1-epoch runs of every model.arch on the tiny synthetic set (the classifier is tiny_run)."""
    runs = {"classifier": tiny_run}
    for arch, args in ARCH_ARGS.items():
        out = tmp_path_factory.mktemp("runs") / arch
        proc = run_script("train.py", *args, "train.epochs=1", f"output_dir={out}", f"data.root={synth_root}",
                          *TINY_DATA)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[arch] = out
    return runs
