"""Where RA-CNN's zooms and the spatial transformer's windows go: the coverage the roaming-bird
regime's goals are scored with (fgvc.bench.synthetic.parts_inside / model_boxes)."""
from __future__ import annotations

import torch

from fgvc.bench.synthetic import model_boxes, parts_inside
from fgvc.models.classifier import Classifier


def test_parts_inside_counts_visible_parts_in_their_own_images_box():
    parts = torch.tensor([[[10.0, 10.0, 1.0], [50.0, 50.0, 1.0], [12.0, 12.0, 0.0]],    # image 0: 2 visible
                          [[90.0, 90.0, 1.0], [70.0, 20.0, 1.0], [0.0, 0.0, 0.0]]])    # image 1: 2 visible
    cx, cy = torch.tensor([10.0, 90.0]), torch.tensor([10.0, 90.0])
    half = torch.tensor([[5.0], [5.0]])
    hits = parts_inside(parts, cx, cy, half, half)
    assert hits.tolist() == [1.0, 0.0, 1.0, 0.0]  # the hidden part is not counted, each image its own box


def test_a_spatial_transformers_window_is_read_from_its_theta():
    model = Classifier("test_resnet", 3, attention="stn", stn_sampler="antialias", stn_crop_only=True,
                       image_size=32).eval()
    theta = torch.tensor([[0.5, 0.0, 0.5], [0.0, 0.25, -0.5]])  # x: side 0.5 at +0.5; y: side 0.25 at -0.5
    model.stn.localization.forward = lambda x: theta.expand(x.shape[0], 1, 2, 3)
    (name, (cx, cy, half_w, half_h)), = model_boxes(model, torch.zeros(2, 3, 64, 64)).items()
    assert name == "window1"
    assert cx.tolist() == [48.0, 48.0] and cy.tolist() == [16.0, 16.0]  # (t + 1) / 2 of 64 px
    assert half_w.tolist() == [[16.0], [16.0]] and half_h.tolist() == [[8.0], [8.0]]  # s / 2 of 64 px


def test_a_plain_classifier_has_no_regions():
    assert model_boxes(Classifier("test_resnet", 3, image_size=32).eval(), torch.zeros(1, 3, 32, 32)) == {}
