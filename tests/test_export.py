"""Exported model folders (issue 18): timm alone rebuilds a plain classifier with the run's logits,
predict/evaluate/localize read the folder for every architecture, the card states what was measured,
and nothing is overwritten."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import timm
import torch
from conftest import run_script
from safetensors.torch import load_file

from fgvc.models.build import model_input
from fgvc.analysis.cost import count_flops
from fgvc.analysis.share import export_run
from fgvc.data.build import build_datasets, build_transform
from fgvc.data.records import load_rgb
from fgvc.engine.runs import load_run

pytestmark = pytest.mark.slow

TIMM_ONLY = """
import sys, timm, torch
from safetensors.torch import load_file, save_file
model = timm.create_model("local-dir:" + sys.argv[1], pretrained=True).eval()
x = load_file(sys.argv[2])["x"]
with torch.no_grad():
    save_file({"logits": model(x)}, sys.argv[3])
assert not any(m.startswith("fgvc") for m in sys.modules), "fgvc was imported"
print(model.pretrained_cfg["label_names"])
"""


@pytest.fixture(scope="module")
def test_images(tiny_run) -> torch.Tensor:
    """(N, 3, 32, 32) test images through the run's own evaluation transform."""
    run = load_run(tiny_run)
    data = build_datasets(run.cfg.data, run.cfg.seed, run.mean, run.std)
    return model_input(run.model, torch.stack([data.test[i]["image"] for i in range(8)]))  # normalised floats


def test_timm_alone_gives_the_runs_logits(tiny_run, tmp_path, test_images):
    out = export_run(tiny_run, tmp_path / "exported")
    run = load_run(tiny_run)
    with torch.no_grad():
        expected = run.model(test_images)
    # a fresh interpreter that imports timm only
    from safetensors.torch import save_file

    save_file({"x": test_images.contiguous()}, str(tmp_path / "x.safetensors"))
    proc = subprocess.run([sys.executable, "-c", TIMM_ONLY, str(out), str(tmp_path / "x.safetensors"),
                           str(tmp_path / "logits.safetensors")], capture_output=True, text=True, cwd=tmp_path,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin",
                               "OMP_NUM_THREADS": os.environ["OMP_NUM_THREADS"]},  # same threads, same float order
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert torch.equal(load_file(str(tmp_path / "logits.safetensors"))["logits"], expected)
    assert run.class_names[0] in proc.stdout
    # the documented one-line form with the weights file
    config = json.loads((out / "config.json").read_text())
    K = config["num_classes"]
    model = timm.create_model(config["architecture"], pretrained=True, num_classes=K,
                              pretrained_cfg_overlay=dict(file=str(out / "model.safetensors"), num_classes=K)).eval()
    with torch.no_grad():
        assert torch.equal(model(test_images), expected)
    data_cfg = timm.data.resolve_data_config(model=timm.create_model(f"local-dir:{out}", pretrained=True))
    assert tuple(data_cfg["input_size"]) == (3, run.image_size, run.image_size)
    assert tuple(data_cfg["mean"]) == run.mean and tuple(data_cfg["std"]) == run.std
    assert data_cfg["crop_pct"] == pytest.approx(1 / run.cfg.data.eval_resize, abs=1e-4)
    assert config["label_names"] == run.class_names and config["fgvc"]["timm_loadable"]


@pytest.mark.parametrize("arch", ["classifier", "racnn", "dcn"])
def test_export_then_predict_on_the_folder(arch, tiny_arch_runs, synth_root, tmp_path):
    run_dir = tiny_arch_runs[arch]
    out = export_run(run_dir, tmp_path / arch)
    assert {p.name for p in out.iterdir()} >= {"model.safetensors", "config.json", "recipe.yaml", "README.md",
                                               "metrics.json"}
    config = json.loads((out / "config.json").read_text())
    assert config["fgvc"]["model"]["arch"] == arch and config["fgvc"]["timm_loadable"] == (arch == "classifier")
    run = load_run(run_dir)  # the run folder's own model and prediction
    keys = set(load_file(str(out / "model.safetensors")))
    prefix = "net." if arch == "classifier" else ""  # timm's own names for the plain classifier
    assert {prefix + k for k in keys} == set(run.model.state_dict())
    images = sorted(synth_root.rglob("*.jpg"))[:2]
    proc = run_script("predict.py", str(out), *map(str, images), "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout)
    transform = build_transform(run.cfg.data, False, run.mean, run.std, [])
    for path, result in zip(images, got):
        with torch.no_grad():
            out_ = run.model(model_input(run.model, transform(load_rgb(path), None, None)[0][None]))
        probs = (out_ if isinstance(out_, torch.Tensor) else out_.logits).softmax(-1)[0]
        top = probs.topk(len(run.class_names))
        assert [t["class"] for t in result["top"]] == [run.class_names[i] for i in top.indices.tolist()]
        assert [t["prob"] for t in result["top"]] == [round(p, 4) for p in top.values.tolist()]


def test_model_card_states_data_metrics_and_cost(tiny_run, tmp_path):
    out = export_run(tiny_run, tmp_path / "card")
    card = (out / "README.md").read_text()
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    run = load_run(out)
    flops = count_flops(run.model, torch.zeros(1, 3, run.image_size, run.image_size))
    for section in ("## Data", "## Recipe", "## Results", "## Cost per image", "## Limitations"):
        assert section in card
    assert f"| test | {metrics['test']['num_samples']} | {100 * metrics['test']['top1']:.1f}%" in card
    assert f"| validation | {metrics['val']['num_samples']} |" in card
    assert f"{flops / 1e9:.4f} GFLOPs" in card
    assert "python fgvc/train.py recipe=synth_baseline" in card and "train.epochs=2" in card


def test_export_refuses_a_non_empty_folder_and_push_fails_offline_in_one_sentence(tiny_run, tmp_path):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    proc = run_script("export.py", str(tiny_run), str(taken))
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: export folder")
    assert "not empty" in proc.stderr and "Traceback" not in proc.stderr
    assert [p.name for p in taken.iterdir()] == ["notes.txt"] and (taken / "notes.txt").read_text() == "mine"
    proc = run_script("export.py", str(tiny_run), str(tmp_path / "pushed"), "--push-to-hub", "someone/fgvc-tiny",
                      env={"HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = [line for line in proc.stderr.splitlines() if line.strip()][-1]
    assert last.startswith("error: uploading") and "hf upload someone/fgvc-tiny" in last
    assert "Traceback" not in proc.stderr and (tmp_path / "pushed" / "model.safetensors").is_file()
