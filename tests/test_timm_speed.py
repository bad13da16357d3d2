"""Issue 17, item 4: `benchmark.py timm` times fgvc's loop and timm's train.py on the same images.
timm's own train.py is not part of fgvc: a fake one here prints the lines the parser reads."""

from __future__ import annotations

import json
import os
import re
import textwrap
from collections import Counter

from conftest import TINY_DATA, run_script
from test_safety import one_sentence

from fgvc.config import load_recipe
from fgvc.data.build import read_index
from fgvc.bench.timm_speed import timm_epochs, write_image_folder

# two lines of timm's train.py (the newest on 2026-11-28), the second the epoch's last update
TIMM_LINES = """\
Train: 1 [   0/30 (  3%)]  Loss: 2.53 (2.53)  Time: 0.102s,  312.33/s  (0.102s,  312.33/s)  LR: 5.000e-02  Data: 0.023 (0.023)
Train: 1 [  29/30 (100%)]  Loss: 2.55 (2.52)  Time: 0.159s,  201.41/s  (0.109s,  292.43/s)  LR: 6.852e-05  Data: 0.033 (0.020)
Test: [   7/7]  Time: 0.020 (0.035)  Loss:   2.568 ( 2.594)  Acc@1:   0.000 (  7.500)  Acc@5:  56.250 ( 41.667)
"""
FAKE_RATE = 100.0  # images / s the fake train.py reports for every epoch

# A stand-in for timm's train.py: records its arguments, counts the ImageFolder's training images
# and prints, per epoch, a first-update line (which the parser must skip) and a last-update line.
FAKE_TRAIN = textwrap.dedent(f"""\
    import argparse, json, pathlib, sys
    p = argparse.ArgumentParser()
    p.add_argument("--data-dir"); p.add_argument("-b", type=int); p.add_argument("--epochs", type=int)
    p.add_argument("--output"); p.add_argument("--experiment")
    a, _ = p.parse_known_args()
    out = pathlib.Path(a.output, a.experiment); out.mkdir(parents=True, exist_ok=True)
    images = sum(1 for f in pathlib.Path(a.data_dir, "train").rglob("*.jpg"))
    (out / "argv.json").write_text(json.dumps(sys.argv[1:] + ["--images-seen", str(images)]))
    n = images // a.b
    for e in range(a.epochs):
        print(f"Train: {{e}} [   0/{{n}} (  3%)]  Loss: 2.5 (2.5)  Time: 1.000s,  8.00/s  (1.000s,  8.00/s)  LR: 0.1")
        print(f"Train: {{e}} [{{n - 1:>4d}}/{{n}} (100%)]  Loss: 2.5 (2.5)  Time: 0.080s,  {{a.b / 0.08:.2f}}/s  "
              f"({{a.b / {FAKE_RATE}:.3f}}s,  {FAKE_RATE:.2f}/s)  LR: 0.1  Data: 0.001 (0.001)")
""")


def test_a_missing_timm_train_py_is_one_sentence(tmp_path):
    proc = run_script("benchmark.py", "timm", "--timm-train", str(tmp_path / "train.py"), timeout=120)
    one_sentence(proc, 2, "--timm-train")
    assert not any(tmp_path.iterdir())


def test_timm_epoch_lines_give_each_epochs_images_and_seconds():
    epochs = timm_epochs(TIMM_LINES, 32)
    assert len(epochs) == 1  # only the epoch's last update counts
    images, seconds = epochs[0]
    assert images == 30 * 32 and abs(images / seconds - 292.43) < 1e-9


def test_image_folder_view_holds_exactly_the_training_split(tmp_path):
    cfg = load_recipe(["recipe=synth_baseline", f"data.root={tmp_path / 'data'}", *TINY_DATA])
    index = read_index(cfg.data)
    view = write_image_folder(index, tmp_path / "view")
    classes = sorted(p.name for p in (view / "train").iterdir())
    assert len(classes) == index.num_classes  # ImageFolder's sorted class order is fgvc's label order
    got = Counter()
    for label, name in enumerate(classes):
        for f in (view / "train" / name).iterdir():
            got[(f.name, label)] += 1
            assert os.path.samefile(f, next(s.path for s in index.train if s.path.name == f.name))
    assert got == Counter((s.path.name, s.label) for s in index.train)
    assert sum(1 for _ in (view / "val").rglob("*.jpg")) == len(index.test)


def test_timm_benchmark_end_to_end_with_a_fake_train_py(tmp_path):
    fake = tmp_path / "train.py"
    fake.write_text(FAKE_TRAIN)
    runs, out = tmp_path / "runs", tmp_path / "timm_speed.md"
    proc = run_script("benchmark.py", "timm", "--timm-train", str(fake), "--rounds", "2", "--epochs", "2",
                      "--runs", str(runs), "--out", str(out), "--set", f"data.root={tmp_path / 'data'}",
                      *TINY_DATA, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    argv = json.loads((runs / "round0" / "timm" / "argv.json").read_text())
    flags = dict(zip(argv, argv[1:]))
    assert flags["--model"] == "test_resnet" and flags["--img-size"] == "32" and flags["-b"] == "8"
    assert flags["--num-classes"] == "4" and flags["--workers"] == "0" and flags["--epochs"] == "2"
    assert flags["--images-seen"] == "40"  # 4 classes x 10: the whole training split, as fgvc trains on
    page = out.read_text()
    assert page.startswith("# fgvc's training loop against timm's train.py\n\nCommand: `python fgvc/benchmark.py timm")
    rows = re.findall(r"^\| (\d) \| (\w+), \w+ \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|$", page, re.M)
    assert [(r[0], r[1]) for r in rows] == [("1", "fgvc"), ("2", "timm")]  # the order alternates
    for r, (_, _, fgvc, timm, ratio) in enumerate(rows):
        metrics = [json.loads(line) for line in (runs / f"round{r}" / "fgvc" / "metrics.jsonl").read_text().splitlines()]
        assert len(metrics) == 2 and metrics[1]["train_images"] == 40  # no validation split carved out
        rate = metrics[1]["train_images"] / metrics[1]["train_seconds"]  # the first epoch is warm-up
        assert float(timm) == FAKE_RATE and abs(float(fgvc) - rate) < 0.06
        assert abs(float(ratio) - rate / FAKE_RATE) < 6e-4
    median = float(re.search(r"median over 2 rounds: ([\d.]+)x", page).group(1))
    assert abs(median - sum(float(r[4]) for r in rows) / 2) < 6e-3  # the median of two is their mean
    assert "OMP_NUM_THREADS=1" in page and "sha256" in page
