"""The attention benchmark: parameters, FLOPs and CPU latency of every attention method in ResNet-50.

    python fgvc/benchmark.py attention [--batch 8] [--out results/attention_benchmark.md]
"""

from __future__ import annotations

import timm
import torch

from fgvc.analysis.cost import count_flops, count_parameters, interleaved_latency
from fgvc.models.attention import CBAM, SqueezeExcite
from fgvc.models.classifier import Classifier

BENCH_BACKBONE = "resnet50"
BENCH_SIDE = 224
ALL_STAGES = [1, 2, 3, 4]  # layer1-4 of a ResNet (feature_info entry 0 is the stem)
GATE_STAGES = [2, 3]  # layer2, layer3 gated by layer4
NUM_CLASSES = 1000
# (label, attention type, placement, stages)
NETWORK_ROWS = [
    ("plain", "none", "stage", ALL_STAGES),
    ("se, block (SENet)", "se", "block", ALL_STAGES),
    ("timm se, block", "timm_se", "block", ALL_STAGES),
    ("cbam, block (CBAM paper)", "cbam", "block", ALL_STAGES),
    ("timm cbam, block", "timm_cbam", "block", ALL_STAGES),
    ("eca, block", "eca", "block", ALL_STAGES),
    ("se, after stages 1-4", "se", "stage", ALL_STAGES),
    ("cbam, after stages 1-4", "cbam", "stage", ALL_STAGES),
    ("residual, after stages 1-4", "residual", "stage", ALL_STAGES),
    ("gate, stages 2-3 by 4", "gate", "stage", GATE_STAGES),
    ("stn, before the backbone", "stn", "stage", ALL_STAGES),
]
RESNET50_MAPS = [(256, 56), (512, 28), (1024, 14), (2048, 7)]  # (channels, side) of layer1-4 at 224 px


def attention_benchmark(batch: int, rounds: int, min_run_time: float) -> str:
    """Markdown tables: every attention method in a ResNet-50 against the plain one, then fgvc's SE and
    CBAM blocks against timm's on the same tensors."""
    torch.manual_seed(0)
    x = torch.randn(batch, 3, BENCH_SIDE, BENCH_SIDE)
    models = {label: Classifier(BENCH_BACKBONE, NUM_CLASSES, attention=kind, attention_placement=placement,
                                attention_stages=stages, image_size=BENCH_SIDE).eval()
              for label, kind, placement, stages in NETWORK_ROWS}
    latency = interleaved_latency(dict(models), x, rounds, min_run_time)
    plain = models["plain"]
    base_params, base_flops = count_parameters(plain), count_flops(plain, x)
    lines = [f"### {BENCH_BACKBONE} at {BENCH_SIDE} px, batch {batch}, inference, "
             f"{torch.get_num_threads()} CPU threads",
             "", "| network | parameters | extra params | GFLOPs | extra FLOPs | latency ms (median ± IQR/2) | overhead |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    base_ms = latency["plain"].median_ms
    for label, model in models.items():
        params, flops = count_parameters(model), count_flops(model, x)
        lat = latency[label]
        lines.append(f"| {label} | {params / 1e6:.2f} M | {100 * (params - base_params) / base_params:+.2f}% | "
                     f"{flops / 1e9:.2f} | {100 * (flops - base_flops) / base_flops:+.2f}% | {lat} | "
                     f"{100 * (lat.median_ms - base_ms) / base_ms:+.1f}% |")

    lines += ["", f"### fgvc blocks against timm's on the same tensors (ResNet-50 layer1-4 maps, batch {batch})",
              "", "| block | map (C, side) | fgvc ms | timm ms | fgvc / timm | max abs output difference |",
              "|---|---|---:|---:|---:|---:|"]
    for channels, side in RESNET50_MAPS:
        feats = torch.randn(batch, channels, side, side)
        timm_se = timm.layers.SEModule(channels).eval()
        fgvc_se = SqueezeExcite(channels, divisor=8).eval()  # timm rounds C/r to a multiple of 8
        fgvc_se.load_timm(timm_se)
        timm_cbam = timm.layers.cbam.CbamModule(channels).eval()
        fgvc_cbam = CBAM(channels, mlp_bias=False, spatial_order="mean_max").eval()  # timm's choices
        fgvc_cbam.load_timm(timm_cbam)
        for name, ours, theirs in (("SE", fgvc_se, timm_se), ("CBAM", fgvc_cbam, timm_cbam)):
            lat = interleaved_latency({"fgvc": ours, "timm": theirs}, feats, rounds, min_run_time / 2)
            with torch.no_grad():
                diff = (ours(feats) - theirs(feats)).abs().max().item()
            lines.append(f"| {name} | ({channels}, {side}) | {lat['fgvc']} | {lat['timm']} | "
                         f"{lat['fgvc'].median_ms / lat['timm'].median_ms:.2f} | {diff:.1e} |")
    return "\n".join(lines)
