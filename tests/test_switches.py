"""timm's speed switches (channels-last, compile, gradient checkpointing) compute what the plain
path computes; stochastic depth, layer-wise lr decay and EMA warm-up reach the model and optimizer."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from accelerate import Accelerator
from rich.console import Console

from conftest import TINY_DATA, run_script
from fgvc.config import load_recipe
from fgvc.engine.optim import build_optimizer, layer_lr_scales
from fgvc.engine.speed import apply_speed_switches, timm_networks
from fgvc.errors import UserError
from fgvc.models.build import build_model
from fgvc.models.classifier import Classifier


def outputs_and_grads(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    torch.manual_seed(0)  # the same drop-path draws in both models
    model.zero_grad()
    out = model(x)
    (out.square().sum()).backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_path(plain: torch.nn.Module, switched: torch.nn.Module, x: torch.Tensor, atol: float) -> None:
    out_a, grads_a = outputs_and_grads(plain, x)
    out_b, grads_b = outputs_and_grads(switched, x)
    torch.testing.assert_close(out_b, out_a, atol=atol, rtol=1e-4)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], atol=atol, rtol=1e-3, msg=name)


@pytest.mark.parametrize("backbone", ["test_resnet", "test_vit", "test_convnext"])
@pytest.mark.parametrize("switch", ["channels_last", "grad_checkpointing"])
def test_switch_gives_the_plain_outputs_and_gradients(backbone, switch):
    torch.manual_seed(0)
    plain = Classifier(backbone, 5, attention="cbam" if backbone == "test_resnet" else "none",
                       attention_placement="block" if backbone == "test_resnet" else "stage",
                       attention_stages=[1, 2, 3, 4] if backbone == "test_resnet" else [-1],
                       backbone_args={"drop_path_rate": 0.1}).train()
    switched = apply_speed_switches(copy.deepcopy(plain), **{switch: True})
    if switch == "grad_checkpointing":
        assert timm_networks(switched) == [switched.net]
        assert any(getattr(m, "grad_checkpointing", False) for m in switched.modules())  # model or stage flags
    else:
        conv = next(m for m in switched.modules() if isinstance(m, torch.nn.Conv2d))
        assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    side = 32 if backbone == "test_vit" else 48
    x = torch.randn(4, 3, side, side)
    assert_same_path(plain, switched, x, atol=1e-5)


@pytest.mark.slow
def test_compiled_model_gives_the_plain_outputs_and_gradients():
    torch.manual_seed(0)  # a tiny network: compiling takes seconds per graph on a CPU
    plain = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 2)).train()
    switched = apply_speed_switches(copy.deepcopy(plain), compile=True)
    x = torch.randn(2, 3, 8, 8)
    try:
        outputs_and_grads(switched, x)
    except Exception as err:  # noqa: BLE001  (no C++ compiler, unsupported platform, ...)
        pytest.skip(f"torch.compile does not run on this CPU: {err.__class__.__name__}")
    assert_same_path(plain, switched, x, atol=1e-5)
    assert set(switched.state_dict()) == set(plain.state_dict())  # names unchanged: checkpoints still load


def test_grad_checkpointing_without_a_timm_network_is_one_sentence():
    with pytest.raises(UserError, match="train.grad_checkpointing"):
        apply_speed_switches(torch.nn.Linear(2, 2), grad_checkpointing=True)


def test_drop_path_reaches_the_backbone_of_the_classifier_and_of_racnn():
    cfg = load_recipe(["recipe=synth_baseline", "model.backbone=test_vit", "model.weights=", "model.drop_path=0.2"])
    model = build_model(cfg.model, 4, 32)
    rates = [m.drop_prob for m in model.modules() if type(m).__name__ == "DropPath"]
    assert rates and max(rates) == pytest.approx(0.2)
    x = torch.randn(2, 3, 32, 32)
    model.train()
    assert not torch.equal(model(x), model(x))  # stochastic depth in training
    model.eval()
    assert torch.equal(model(x), model(x))
    racnn_cfg = load_recipe(["recipe=synth_racnn", "model.backbone=test_vit", "model.weights=", "model.drop_path=0.1",
                             "data.image_size=32", "data.full_resolution=1"])
    racnn = build_model(racnn_cfg.model, 4, 32)
    rates = [m.drop_prob for m in racnn.modules() if type(m).__name__ == "DropPath"]
    assert rates and max(rates) == pytest.approx(0.1)  # every scale's backbone


@pytest.mark.parametrize("backbone", ["test_vit", "test_convnext"])
def test_layer_decay_lowers_the_lr_layer_by_layer(backbone):
    cfg = load_recipe(["recipe=synth_baseline", f"model.backbone={backbone}", "model.weights=", "train.layer_decay=0.5",
                       "train.lr=1.0", "train.new_lr_mult=1.0"])
    model = build_model(cfg.model, 4, 32)
    scales = layer_lr_scales(model, 0.5)
    head = model.net.get_classifier().weight
    names = {id(p): n for n, p in model.named_parameters()}
    lr_of = {names[id(p)]: g["lr"] for g in build_optimizer(model, cfg.train).param_groups for p in g["params"]}
    assert lr_of[names[id(head)]] == 1.0  # the head: full lr
    first = min(lr_of.values())
    assert first == pytest.approx(0.5 ** round(-torch.log2(torch.tensor(first)).item())) and first < 0.1
    assert set(lr_of) == {n for n, _ in model.named_parameters()}  # every parameter in exactly one group
    assert all(lr_of[n] == pytest.approx(s) for n, s in scales.items())
    plain = load_recipe(["recipe=synth_baseline", f"model.backbone={backbone}", "model.weights=", "train.lr=1.0"])
    assert {g["lr"] for g in build_optimizer(model, plain.train).param_groups} == {1.0}


def test_start_run_applies_the_switches_and_ema_warmup(synth_root, tmp_path):
    from fgvc.engine.trainer import start_run

    cfg = load_recipe(["recipe=synth_baseline", f"data.root={synth_root}", f"output_dir={tmp_path / 'run'}",
                       *TINY_DATA, "train.ema=true", "train.ema_warmup=true", "train.channels_last=true",
                       "train.grad_checkpointing=true"])
    r = start_run(cfg, Accelerator(cpu=True), Console(quiet=True))
    assert r.ema.use_warmup and r.ema.get_decay(1) < 0.5 < cfg.train.ema_decay  # warm-up: small decay early
    assert r.ema.get_decay(10**7) == pytest.approx(cfg.train.ema_decay)
    assert r.raw.net.grad_checkpointing
    conv = next(m for m in r.raw.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)


def test_training_with_every_new_option_runs(synth_root, tmp_path):
    out = tmp_path / "run"
    proc = run_script("train.py", "recipe=synth_baseline", "train.epochs=1", f"output_dir={out}",
                      f"data.root={synth_root}", *TINY_DATA, "data.randaugment=rand-m9-mstd0.5-inc1",
                      "data.random_erasing=0.25", "model.drop_path=0.1", "train.layer_decay=0.75",
                      "train.ema=true", "train.ema_warmup=true", "train.channels_last=true",
                      "train.grad_checkpointing=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["selected"] == "ema" and 0 <= metrics["test"]["top1"] <= 1


@pytest.mark.parametrize("key", ["data.random_erasing=1.5", "model.drop_path=-0.1", "train.layer_decay=2",
                                 "data.randaugment=autoaug"])
def test_bad_values_of_the_new_keys_are_one_sentence(key):
    with pytest.raises(UserError, match=key.split("=")[0]):
        load_recipe(["recipe=synth_baseline", key])


@pytest.mark.parametrize("recipe", ["synth_cbam", "synth_gate", "synth_stn", "synth_racnn", "synth_dcn"])
def test_new_classifiers_and_new_blocks_get_their_own_lr(recipe):
    """From pretrained weights: the backbone at lr, every classifier (a linear layer with one output
    per class) at lr * new_lr_mult, every other new parameter at lr * new_block_lr_mult."""
    cfg = load_recipe([f"recipe={recipe}", "train.lr=1.0", "train.new_lr_mult=10", "train.new_block_lr_mult=0.5"])
    model = build_model(cfg.model, 4, 32)
    assert model.pretrained_names and model.head_names
    lr_of = {n: g["lr"] for g in build_optimizer(model, cfg.train).param_groups
             for p in g["params"] for n, q in model.named_parameters() if q is p}
    assert set(lr_of) == {n for n, p in model.named_parameters() if p.requires_grad}
    for name, lr in lr_of.items():
        want = 1.0 if name in model.pretrained_names else 10.0 if name in model.head_names else 0.5
        assert lr == want, name
    blocks = [n for n in lr_of if n not in model.pretrained_names | model.head_names]
    assert blocks or recipe == "synth_dcn"  # attention blocks, proposal networks (dcn: its projection and attention pooling)
    assert all(n.endswith(("weight", "bias")) for n in model.head_names)
