"""The benchmark commands run end to end on a tiny budget and write tables of the promised shape."""

from __future__ import annotations

import csv

import pytest
from conftest import run_script

pytestmark = pytest.mark.slow

TINY = ["data.synthetic.num_classes=4", "data.synthetic.train_per_class=6", "data.synthetic.test_per_class=3",
        "data.synthetic.image_size=48", "data.image_size=32", "train.epochs=1", "data.num_workers=0",
        "train.batch_size=8"]
METHODS = ["synth_baseline", "synth_cbam", "synth_racnn"]


def test_synthetic_benchmark_table(tmp_path):
    out, runs = tmp_path / "results", tmp_path / "runs"
    args = ["synthetic", "--seeds", "0", "1", "--out", str(out), "--runs", str(runs), "--methods", *METHODS,
            "--identity", "--jobs", "2", "--set", f"data.root={tmp_path / 'data'}", *TINY]
    proc = run_script("benchmark.py", *args, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    page = (out / "README.md").read_text()
    assert "Command: `python fgvc/benchmark.py synthetic --seeds 0 1" in page and "commit" in page
    assert "--methods synth_baseline synth_cbam synth_racnn" in page  # the whole command line
    table = [line for line in page.splitlines() if line.startswith("| synth_")]
    assert [line.split("|")[1].strip() for line in table] == METHODS
    assert "## Paired with `synth_baseline`" in page and "| `synth_cbam` |" in page  # each method against it
    header = next(line for line in page.splitlines() if line.startswith("| method"))
    assert len(header.split("|")) == len(table[0].split("|")) == 13  # 11 columns
    for line in table:
        assert "±" in line.split("|")[2]  # mean ± std over the two seeds
    assert "identity from pretrained" in page
    assert "| zoom1 |" in page and "| zoom2 centred baseline |" in page  # RA-CNN boxes against the parts
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [r["method"] for r in rows[:3]] == METHODS and all(r["seeds"] == "0 1" for r in rows)
    assert (out / "accuracy_vs_flops.png").stat().st_size > 0
    assert "| synth_cbam | cam |" in (out / "localization" / "README.md").read_text()
    assert list((out / "localization" / "synth_racnn").glob("grid_*.png"))
    # finished runs are reused: a second call trains nothing
    again = run_script("benchmark.py", *args, timeout=900)
    assert again.returncode == 0
    assert not [line for line in again.stdout.splitlines() if line.startswith("run ")]
    assert sum(line.startswith("reuse ") for line in again.stdout.splitlines()) == 3 * 2 + 1 + 3 * 2
    # ... but only with the same recipe: a stale run stops the benchmark with one sentence
    changed = run_script("benchmark.py", *args, "train.lr=0.05", timeout=900)
    assert changed.returncode == 4 and "--runs" in changed.stderr
    assert "has train.lr=0.1 but the benchmark now trains train.lr=0.05" in changed.stderr


def test_bad_override_stops_before_training(tmp_path):
    proc = run_script("benchmark.py", "synthetic", "--runs", str(tmp_path), "--set", "train.epochz=1", timeout=120)
    assert proc.returncode == 2 and "did you mean 'train.epochs'" in proc.stderr
    assert not any(tmp_path.iterdir())


def test_train_speed_table(tmp_path):
    out = tmp_path / "speed.md"
    proc = run_script("benchmark.py", "train", "--epochs", "2", "--out", str(out), "--set",
                      f"data.root={tmp_path / 'data'}", *TINY, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    for row in ("bare loop", "fgvc/train.py loop", "data pipeline alone"):
        assert f"| {row}" in text
    assert "Goals:" in text


def test_accuracy_plot_stops_at_100_percent_and_names_methods_in_a_legend(tmp_path):
    from fgvc.bench.synthetic import plot_accuracy_vs_flops

    points = [("synth_gate", 3.3e7, 94.0, 10.0), ("synth_se", 3.3e7, 87.0, 11.0), ("synth_dcn", 7e7, 39.0, 7.0)]
    fig = plot_accuracy_vs_flops(points, tmp_path / "plot.png")
    ax = fig.axes[0]
    assert (tmp_path / "plot.png").is_file() and ax.get_ylim()[1] == 100
    tops = [seg[:, 1].max() for coll in ax.collections for seg in coll.get_segments()]  # the error bars
    assert tops and max(tops) <= 100  # 94 + 10 is drawn up to 100, not past it
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["gate", "se", "dcn"]
    assert not any(child.__class__.__name__ == "Annotation" for child in ax.get_children())


def test_runs_side_by_side_share_the_cores_and_every_run_is_tried(tmp_path, monkeypatch):
    """--jobs: each run gets cores // jobs threads; a failed run does not stop the others, and its
    error is raised once they have ended."""
    import os
    import subprocess

    from fgvc.bench import synthetic as synthetic_bench

    seen = []

    def fake_run(cmd, cwd, capture_output, text, env):
        seen.append((cmd[2], env.get("OMP_NUM_THREADS")))
        return subprocess.CompletedProcess(cmd, 1 if cmd[2] == "recipe=bad" else 0, "", "boom")

    monkeypatch.setattr(synthetic_bench.subprocess, "run", fake_run)
    monkeypatch.setattr(synthetic_bench.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    plan = [(r, 0, tmp_path / r, []) for r in ("a", "bad", "c", "d")]
    with pytest.raises(RuntimeError, match="training bad seed 0 failed"):
        synthetic_bench.train_all(plan, 2, log=lambda line: None)
    assert sorted(seen) == [(f"recipe={r}", "2") for r in ("a", "bad", "c", "d")]
    seen.clear()
    synthetic_bench.train_all(plan[:1], 1, log=lambda line: None)  # one at a time: the cores left to the run
    assert seen == [("recipe=a", os.environ.get("OMP_NUM_THREADS"))]


def test_plain_curve_runs_the_baseline_at_each_size_and_writes_records(tmp_path):
    """--curve: the baseline at each input size (its own size: its own run), the curve's table, CSV and
    line in the plot, every finished run's figures in out/runs/, the starting weights on the page."""
    from fgvc.analysis.plain_curve import read_curve_csv

    out, runs = tmp_path / "results", tmp_path / "runs"
    args = ["synthetic", "--seeds", "0", "--out", str(out), "--runs", str(runs), "--methods", "synth_baseline",
            "--curve", "32", "40", "--set", f"data.root={tmp_path / 'data'}", *TINY]
    proc = run_script("benchmark.py", *args, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in runs.iterdir()) == ["synth_baseline-40px-s0", "synth_baseline-s0"]
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["synth_baseline-40px-s0.json", "synth_baseline-s0.json"]
    curve = read_curve_csv(out / "plain_curve.csv")
    assert [c[0] for c in curve] == [32, 40] and curve[0][1] < curve[1][1]
    page = (out / "README.md").read_text()
    assert "## The plain network's accuracy-vs-FLOPs curve" in page and "| 40 |" in page
    assert "fractal_test_resnet.safetensors` (sha256" in page  # the starting weights of every network
