"""The family x feature matrix (fgvc/bench/backbones.py) on tiny timm models: every cell works,
stops with one sentence where the combination does not exist, or is a known gap marked in the matrix;
never a traceback. An exported ViT or Swin loads with timm alone and gives the run's logits."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from fgvc.bench.backbones import (ARCHS, FAILS, FAMILIES, FEATURES, GAP, KNOWN_GAPS, OK, OUTSIDE, SKIP, STOPS,
                                  build_matrix, family_row, matrix_markdown)

pytestmark = pytest.mark.slow  # about 15 s per family

MUST_WORK = ("train", "cam", "gradcam", "localize", "report", "export", "predict", "demo")
ONLY_VIT = ("rollout", "class_attention")
TOKEN_ONLY_ARCHS = ("racnn rollout",)  # RA-CNN's boxes from the attention rollout: ViT families only


def one_sentence(text: str) -> bool:
    return "\n" not in text and text.endswith(".") and "Traceback" not in text and len(text) < 400


@pytest.mark.parametrize("name", list(FAMILIES))
def test_every_feature_of_a_family_works_or_stops_with_one_sentence(name, tmp_path):
    family = FAMILIES[name]
    matrix = build_matrix(tmp_path, [family])
    for arch in ARCHS:
        row = matrix[name, arch]
        assert set(row) == set(FEATURES)
        if arch in TOKEN_ONLY_ARCHS and not family.vit:  # no attention rollout to propose boxes: refused before training
            assert row["train"].status == STOPS and one_sentence(row["train"].note), f"{name} / {arch}: {row['train'].note}"
            assert all(cell.status == SKIP for feature, cell in row.items() if feature != "train")
            continue
        for feature, cell in row.items():
            where = f"{name} / {arch} / {feature}: {cell.note}"
            assert cell.status != FAILS, where  # never a traceback outside the known gaps
            if cell.status == GAP:
                assert (name, arch, feature) in KNOWN_GAPS, where
            if cell.status == STOPS:
                assert one_sentence(cell.note), where
            if feature in ONLY_VIT:  # attention matrices exist exactly for the ViT families
                assert cell.status == (OK if family.vit else STOPS) or cell.status == GAP, where
            elif feature in MUST_WORK and (name, arch, feature) not in KNOWN_GAPS:
                # MobileNetV3's head has a hidden layer after the pool: no CAM, one sentence
                assert cell.status == OK or (feature == "cam" and name == "MobileNetV3" and cell.status == STOPS), where
    page = matrix_markdown(matrix, "python fgvc/benchmark.py backbones")
    assert page.count(f"| {name} |") == len(ARCHS)


def test_the_matrix_run_again_in_its_work_folder_exports_again(tmp_path):
    """`--work` is replaced: a new matrix's export is not refused by the last matrix's folder."""
    last = tmp_path / "resnet_classifier_export"
    last.mkdir()
    (last / "config.json").write_text("{}")  # what the last matrix's export left
    row = family_row(FAMILIES["ResNet"], "classifier", tmp_path, tmp_path / "synthetic")
    assert row["train"].status == OK, row["train"].note
    assert row["export"].status == OK, row["export"].note


@pytest.mark.parametrize("name", list(OUTSIDE))
def test_a_backbone_outside_the_families_works_or_stops_with_one_sentence(name, tmp_path):
    row = family_row(OUTSIDE[name], "classifier", tmp_path, tmp_path / "synthetic")
    assert row["train"].status == OK
    for feature, cell in row.items():
        assert cell.status in (OK, STOPS), f"{name} / {feature}: {cell.note}"
        if cell.status == STOPS:
            assert one_sentence(cell.note), cell.note


TIMM_ONLY = """
import sys, timm, torch
from safetensors.torch import load_file, save_file
model = timm.create_model("local-dir:" + sys.argv[1], pretrained=True).eval()
x = load_file(sys.argv[2])["x"]
with torch.no_grad():
    save_file({"logits": model(x)}, sys.argv[3])
assert not any(m.startswith("fgvc") for m in sys.modules), "fgvc was imported"
"""


@pytest.mark.parametrize("name", ["ViT", "DeiT distilled", "Swin v1", "EVA-02"])
def test_an_exported_transformer_loads_with_timm_alone_and_gives_the_runs_logits(name, tmp_path):
    from fgvc.analysis.share import export_run
    from fgvc.engine.runs import load_run

    row = family_row(FAMILIES[name], "classifier", tmp_path, tmp_path / "synthetic")
    assert row["export"].status == OK, row["export"].note
    slug = "".join(c if c.isalnum() else "_" for c in f"{name}_classifier").lower()
    run_dir, out = tmp_path / slug, tmp_path / "again"
    export_run(run_dir, out)
    run = load_run(run_dir)
    side = run.image_size
    x = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = run.model(x)
    save_file({"x": x}, str(tmp_path / "x.safetensors"))
    proc = subprocess.run([sys.executable, "-c", TIMM_ONLY, str(out), str(tmp_path / "x.safetensors"),
                           str(tmp_path / "logits.safetensors")], capture_output=True, text=True, cwd=tmp_path,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin",
                               "OMP_NUM_THREADS": os.environ["OMP_NUM_THREADS"]}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert torch.equal(load_file(str(tmp_path / "logits.safetensors"))["logits"], expected)
