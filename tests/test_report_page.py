"""The report page evaluate.py writes (issue 18): calibration bins, the most confused classes, and a
report.html whose every picture exists; evaluate.py and localize.py on an exported folder."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from conftest import run_script

from fgvc.analysis.run_report import confused_classes, draw_confusion, ece_of_bins, reliability_bins
from fgvc.analysis.share import export_run
from fgvc.engine.metrics import expected_calibration_error


def test_reliability_bins_give_the_metrics_ece():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(500, 10, generator=g) * 3
    labels = torch.randint(0, 10, (500,), generator=g)
    rel = reliability_bins(logits, labels)
    assert sum(rel["count"]) == 500 and len(rel["count"]) == len(rel["edges"]) - 1
    assert ece_of_bins(rel) == pytest.approx(expected_calibration_error(logits, labels), abs=1e-6)
    sure = torch.nn.functional.one_hot(labels, 10).float() * 50  # certain and right: calibrated
    assert ece_of_bins(reliability_bins(sure, labels)) == pytest.approx(0.0, abs=1e-6)


def test_many_classes_show_the_most_confused_ones(tmp_path):
    cm = np.diag(np.full(200, 5))
    cm[17, 42], cm[99, 3], cm[150, 151] = 4, 3, 1
    assert confused_classes(cm, limit=4) == [3, 17, 42, 99]  # the two largest pairs
    assert confused_classes(cm) == [3, 17, 42, 99, 150, 151]
    caption = draw_confusion(cm, [f"class {i}" for i in range(200)], tmp_path / "cm.png")
    assert "6 classes" in caption and "of 200" in caption and (tmp_path / "cm.png").stat().st_size > 0


@pytest.fixture(scope="module")
def reported(tiny_run, tmp_path_factory):
    """An exported folder of the tiny run, localized and then evaluated (which writes the report)."""
    out = export_run(tiny_run, tmp_path_factory.mktemp("report") / "exported")
    proc = run_script("localize.py", str(out), "--num-images", "4")
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = run_script("evaluate.py", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


@pytest.mark.slow
def test_report_page_links_every_picture_it_names(reported):
    page = (reported / "report.html").read_text()
    links = set(re.findall(r'(?:src|href)="([^"]+)"', page))
    assert links >= {"report/curves.png", "report/confusion_test.png", "report/reliability_test.png",
                     "localization/index.html", "localization/grid_000.png"}
    for link in links:
        assert (reported / link).is_file(), link
    assert "expected calibration error" in page


@pytest.mark.slow
def test_evaluate_reads_an_exported_folder(reported, tiny_run):
    ev = json.loads((reported / "eval.json").read_text())
    assert ev["top1"] == pytest.approx(json.loads((tiny_run / "metrics.json").read_text())["test"]["top1"])
    assert sum(ev["reliability"]["count"]) == ev["num_samples"]
    assert len(json.loads((reported / "localization" / "localization.json").read_text())["images"]) == 4
