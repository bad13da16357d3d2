"""Issue 17's benchmarks end to end on a tiny budget: every real recipe at its real size (here one,
shrunk), one loading process's rate, and the training benchmark on a real recipe's fake data."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_script

pytestmark = pytest.mark.slow

SMALL = ["data.image_size=64", "model.backbone=test_resnet", "train.batch_size=4", "data.num_workers=0"]


def test_recipes_benchmark_runs_a_real_recipe_end_to_end(tmp_path):
    out = tmp_path / "recipes.md"
    keep = tmp_path / "keep"
    args = ["benchmark.py", "recipes", "--recipes", "cub_cbam", "--set", *SMALL, "--out", str(out), "--keep", str(keep)]
    proc = run_script(*args, timeout=1200)  # about 2 minutes; generous for a loaded machine
    assert proc.returncode == 0, proc.stderr[-3000:]
    page = out.read_text()
    assert "Command: `python fgvc/benchmark.py recipes --recipes cub_cbam" in page and "commit" in page
    row = next(line for line in page.splitlines() if line.startswith("| cub_cbam"))
    cells = [c.strip() for c in row.split("|")[1:-1]]
    assert cells[0] == "cub_cbam" and cells[1] == "classifier" and cells[3] == "64" and cells[4] == "4"
    assert float(cells[7]) >= 0 and float(cells[9]) > 0.1 and cells[10] == "yes"  # s/step, peak GiB, completed
    # the finished row is kept (unrounded: a tiny step shows as 0.0 s in the table) and reused by the
    # next run with the same overrides, not measured again
    assert json.loads((keep / "cub_cbam.json").read_text())["result"]["step_s"] > 0
    (keep / "cub_cbam.json").write_text((keep / "cub_cbam.json").read_text().replace('"step_s": ', '"step_s": 1234'))
    again = run_script(*args, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "| 1234" in next(line for line in out.read_text().splitlines() if line.startswith("| cub_cbam"))


def test_data_benchmark_compares_old_and_new_and_counts_loading_processes(tmp_path):
    out = tmp_path / "data.md"
    proc = run_script("benchmark.py", "data", "--images", "4", "--rounds", "1", "--out", str(out), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    page = out.read_text()
    assert "| CUB (500x375)" in page and "| Cars-sized (1024x768)" in page
    assert "loading processes" in page and "2470 images/s" in page


def test_train_benchmark_on_a_real_recipe_fake_data_and_cuda_request(tmp_path):
    proc = run_script("benchmark.py", "train", "--recipe", "cub_baseline", "--fake-images", "8", "--epochs", "2",
                      "--set", *SMALL, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "`cub_baseline`" in proc.stdout and "| fgvc/train.py loop" in proc.stdout
    if not torch.cuda.is_available():
        gpu = run_script("benchmark.py", "train", "--device", "cuda", timeout=120)
        assert gpu.returncode == 2 and gpu.stderr.count("\n") == 1 and "no CUDA GPU" in gpu.stderr
