"""End to end: the run folder contract, exact counts on 2 processes, resume == uninterrupted,
non-finite loss, overwrite protection, evaluate and predict."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT, TINY_DATA, accelerate_launch, run_script
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

TEST_IMAGES = 4 * 5  # TINY_DATA: 4 classes x 5 test images
VAL_IMAGES = 10  # 25% of 4 x 10 training images


def test_run_folder_contract(tiny_run):
    for name in ("recipe.yaml", "metrics.jsonl", "metrics.json", "model.safetensors", "model.json"):
        assert (tiny_run / name).is_file(), name
    assert [p.name for p in sorted((tiny_run / "checkpoints").iterdir())] == ["epoch_0001", "epoch_0002"]
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    for split, n in (("val", VAL_IMAGES), ("test", TEST_IMAGES)):
        assert set(metrics[split]) >= {"top1", "top5", "mean_class_acc", "num_samples"}
        assert metrics[split]["num_samples"] == n
    lines = (tiny_run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]
    meta = json.loads((tiny_run / "model.json").read_text())
    assert meta["num_classes"] == 4 and len(meta["class_names"]) == 4 and len(meta["part_names"]) == 15


def test_finished_run_is_not_overwritten(tiny_run, synth_root):
    before = (tiny_run / "model.safetensors").read_bytes()
    proc = run_script("train.py", "recipe=synth_baseline", f"output_dir={tiny_run}", f"data.root={synth_root}",
                      *TINY_DATA)
    assert proc.returncode == 2 and "holds a finished run; pass overwrite=true" in proc.stderr
    assert (tiny_run / "model.safetensors").read_bytes() == before


def test_repeat_from_saved_recipe_alone(tiny_run, tmp_path):
    proc = run_script("train.py", f"recipe={tiny_run / 'recipe.yaml'}", f"output_dir={tmp_path / 'again'}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    a = json.loads((tiny_run / "metrics.json").read_text())
    b = json.loads((tmp_path / "again" / "metrics.json").read_text())
    assert a["test"] == b["test"]  # same recipe, same seed, same CPU: the same run


def test_resume_after_kill_equals_uninterrupted(tmp_path, synth_root):
    args = ["recipe=synth_baseline", "train.epochs=3", "train.ema=true", f"data.root={synth_root}", *TINY_DATA]
    whole = run_script("train.py", *args, f"output_dir={tmp_path / 'whole'}")
    assert whole.returncode == 0, whole.stderr[-2000:]
    killed = subprocess.run([sys.executable, str(ROOT / "tests" / "kill_after_epoch.py"), "2", *args,
                             f"output_dir={tmp_path / 'cut'}"], capture_output=True, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert killed.returncode == 137 and not (tmp_path / "cut" / "metrics.json").exists()
    (tmp_path / "cut" / "checkpoints" / ".tmp_epoch_0003").mkdir()  # a half-written save is ignored
    again = run_script("train.py", *args, f"output_dir={tmp_path / 'cut'}")
    assert again.returncode == 2 and "train.resume=auto" in again.stderr  # never silently restarted
    resumed = run_script("train.py", *args, f"output_dir={tmp_path / 'cut'}", "train.resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    b = json.loads((tmp_path / "cut" / "metrics.json").read_text())
    assert a["test"] == b["test"] and a["val"] == b["val"] and a["best_epoch"] == b["best_epoch"]
    wa, wb = load_file(str(tmp_path / "whole" / "model.safetensors")), load_file(str(tmp_path / "cut" / "model.safetensors"))
    assert all((wa[k] == wb[k]).all() for k in wa)
    la = (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()
    lb = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["train_loss"] for x in la] == [json.loads(x)["train_loss"] for x in lb]


def test_non_finite_loss_stops_with_a_sentence(tmp_path, synth_root):
    proc = run_script("train.py", "recipe=synth_baseline", "train.epochs=2", "train.lr=1.0e+30",
                      "train.warmup_epochs=0", f"output_dir={tmp_path / 'nan'}", f"data.root={synth_root}", *TINY_DATA)
    assert proc.returncode == 4, proc.stderr[-2000:]
    assert "the training loss became" in proc.stderr and "Traceback" not in proc.stderr
    assert not list((tmp_path / "nan" / "checkpoints").glob("epoch_*"))  # nothing bad was saved


def test_two_processes_train_and_evaluate_with_exact_counts(tmp_path, synth_root):
    out = tmp_path / "ddp"
    proc = accelerate_launch("train.py", "recipe=synth_baseline", "train.epochs=1", f"output_dir={out}",
                             f"data.root={synth_root}", *TINY_DATA)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test"]["num_samples"] == TEST_IMAGES and metrics["val"]["num_samples"] == VAL_IMAGES
    proc = accelerate_launch("evaluate.py", str(out), "--batch-size", "3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ev = json.loads((out / "eval.json").read_text())
    assert ev["num_samples"] == TEST_IMAGES and sum(map(sum, ev["confusion_matrix"])) == TEST_IMAGES
    assert ev["top1"] == pytest.approx(metrics["test"]["top1"])


def test_evaluate_one_process_writes_report(tiny_run):
    proc = run_script("evaluate.py", str(tiny_run), "--split", "val")
    assert proc.returncode == 0, proc.stderr[-2000:]
    ev = json.loads((tiny_run / "eval_val.json").read_text())
    assert ev["num_samples"] == VAL_IMAGES and 0 <= ev["ece"] <= 1 and "most_confused" in ev


def test_predict_reports_unreadable_image_and_predicts_the_rest(tiny_run, synth_root, tmp_path):
    images = sorted(synth_root.rglob("*.jpg"))[:2]
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    proc = run_script("predict.py", str(tiny_run), *map(str, images), str(bad), "--json")
    assert proc.returncode == 1
    out = json.loads(proc.stdout)
    assert len(out) == 3 and "broken.jpg" in out[2]["error"]
    assert all(len(r["top"]) == 4 and abs(sum(t["prob"] for t in r["top"]) - 1) < 1e-3 for r in out[:2])
    assert "could not be read" in proc.stderr


def test_missing_run_folder_is_one_sentence(tmp_path):
    proc = run_script("evaluate.py", str(tmp_path / "nowhere"))
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "is not a finished fgvc run folder" in proc.stderr


def test_corrupt_image_is_named_even_from_a_worker(tmp_path, synth_root, tiny_run):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(synth_root, data)
    victim = sorted(data.rglob("*.jpg"))[0]
    victim.write_bytes(b"garbage")
    proc = run_script("train.py", "recipe=synth_baseline", "train.epochs=1", f"output_dir={tmp_path / 'run'}",
                      f"data.root={data}", *TINY_DATA, "data.num_workers=1")
    assert proc.returncode == 3
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: image '") and victim.name in last and "intact copy" in last


def test_bad_data_root_makes_no_run_folder(tmp_path):
    proc = run_script("train.py", "recipe=cub_baseline", f"data.root={tmp_path / 'missing'}",
                      f"output_dir={tmp_path / 'run'}")
    assert proc.returncode == 3 and "does not exist" in proc.stderr
    assert not (tmp_path / "run").exists()  # a retry is not refused as an "unfinished run"


def test_ema_mixup_accumulation_bf16_tensorboard(tmp_path, synth_root):
    out = tmp_path / "opts"
    proc = run_script("train.py", "recipe=synth_baseline", "train.epochs=2", f"output_dir={out}",
                      f"data.root={synth_root}", *TINY_DATA, "train.ema=true", "train.mixup=0.2", "train.cutmix=1.0",
                      "train.grad_accum_steps=2", "train.mixed_precision=bf16", "train.clip_grad=1.0",
                      "train.log_with=tensorboard")
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["selected"] == "ema"
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert "val_ema_top1" in first and "val_top1" in first
    assert list((out / "fgvc").rglob("events.out.tfevents.*"))
    # the saved weights are the EMA weights that were selected and tested
    proc = run_script("evaluate.py", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((out / "eval.json").read_text())["top1"] == pytest.approx(metrics["test"]["top1"])


def test_two_processes_train_dcn(tmp_path, synth_root):
    out = tmp_path / "ddp_dcn"
    proc = accelerate_launch("train.py", "recipe=synth_dcn", "train.epochs=1", f"output_dir={out}",
                             f"data.root={synth_root}", *TINY_DATA, "model.dcn.fine_backbone=test_resnet",
                             "model.dcn.fine_weights=weights/fractal_test_resnet.safetensors", "model.dcn.patch_size=16")
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test"]["num_samples"] == TEST_IMAGES and "top1_coarse" in metrics["test"]
