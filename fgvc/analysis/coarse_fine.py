"""The coarse-vs-fine cost/accuracy report of a Dynamic Capacity Network (Almahairi et al. 2016)
and of CF-ViT (Chen et al. 2023, `cfvit_rows`: the coarse pass, each share of re-split tokens, early
exit, against the model's own fine pass with every token re-split).

For a trained DCN on the test split: top-1 and mean per-class accuracy, FLOPs per image (torch's
FlopCounterMode: 2 FLOPs per multiply-add, so FLOPs, not MACs), parameters and measured CPU latency
(median and interquartile range, batch 1 and a large batch) of
    coarse      the coarse network and the top layers alone (k = 0);
    fine        a fine network on the whole image (a trained full-image run, or this model's fine
                network, not trained for whole images);
    dcn k=...   the DCN path, refining k positions;
    exit t=...  early exit: images whose coarse confidence reaches t stop; the rest take the DCN path.
Early-exit thresholds are chosen on the VALIDATION split (for a share of escalated images or a target
cost); the test split is only scored. Early-exit FLOPs per image = coarse + (share escalated on
test) * (dcn - coarse).

`coarse_fine_rows` takes a model and loaders (no run folder); `report_run` wires a run folder.
"""

from __future__ import annotations

import csv
import datetime
import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from fgvc.analysis.cost import count_flops, count_parameters, summarize, time_calls
from fgvc.analysis.plain_curve import accuracy_limits, draw_curve, label_log_axis, read_curve_csv
from fgvc.config import load_recipe
from fgvc.data.build import build_datasets
from fgvc.engine.metrics import accuracy_metrics
from fgvc.engine.runs import load_run
from fgvc.errors import UserError
from fgvc.models.build import build_model, model_input
from fgvc.models.cfvit import CFViT, explicit_attention
from fgvc.models.dcn import DCN, choose_threshold, escalate, threshold_for_accuracy, threshold_for_cost
from fgvc.provenance import code_version, starting_weights
from fgvc.safe_io import make_folder, write_text, writing

DEFAULT_SHARES = (0.1, 0.25, 0.5)  # escalated shares of the validation split to pick thresholds for
DEFAULT_COSTS = (0.35,)  # target FLOPs as a share of the full-image fine network (the goal)
DEFAULT_DROPS = (0.5,)  # top-1 points that early exit may lose on validation against refining every image
GOAL_ACCURACY_GAP = 0.5  # points of top-1 the DCN may lose against the full-image fine network
GOAL_FLOPS_SHARE = 0.35  # ... while spending at most this share of its FLOPs
GOAL_SPEEDUP = 2.0  # ... and being at least this much faster (batch-1 CPU latency)
# the roaming regime's goal (issue 29), against the plain network at the written resolution (--fine-run)
PLAIN_GOAL_GAP = 1.0  # points of test top-1 the accuracy-chosen setting may lose against it
PLAIN_GOAL_FLOPS_SHARE = 0.40  # ... at most this share of its FLOPs
PLAIN_GOAL_OVER_COARSE = 5.0  # ... at least this many points above the DCN's own coarse path
PLAIN_GOAL_SPEEDUP = 1.5  # ... and at least this much faster at batch 1 and at the large batch
VAL_TOLERANCE = 0.5  # the accuracy-chosen setting: the cheapest within this many validation points of the best
LATENCY_IMAGES = 8  # batch-1 latency of early exit: timed over this many test images in turn
PNG_POINTS_KEY = "fgvc-points"  # PNG text chunk holding the plotted points, so the plot can be checked
FILES = ("coarse_fine.md", "coarse_fine.csv", "coarse_fine.png")


@dataclass
class Row:
    label: str  # what the row measured: coarse, fine (whole image), dcn k=..., exit t=... k=...
    kind: str  # coarse | fine | fine-untrained | dcn | exit
    k: int  # positions refined (-1: not applicable)
    threshold: float  # early-exit confidence threshold (nan: not applicable)
    chosen_on: str  # how the threshold was chosen
    escalated: float  # share of test images that took the fine path
    top1: float  # percent
    mean_class_acc: float  # percent
    gflops: float  # per image, 1e9 FLOPs
    params_m: float  # millions
    lat_b1_ms: float  # median batch-1 latency per image
    lat_b1_iqr_ms: float
    lat_batch_ms: float  # median latency per image at the large batch
    lat_batch_iqr_ms: float
    pareto_flops: bool = False  # on the accuracy-vs-FLOPs Pareto front
    pareto_latency: bool = False  # on the accuracy-vs-batch-1-latency Pareto front
    val_top1: float = float("nan")  # percent on the validation split (nan: not measured), for choosing a setting


COLUMNS = [f.name for f in fields(Row)]


# --- measurements --------------------------------------------------------------------------------

@dataclass
class Timed:
    """One path to time: `fn` at batch 1 (or, for a data-dependent path, over `per_image` in turn,
    one image a call) and at the large batch `big`."""
    fn: Callable[[Tensor], object]
    big: Tensor
    per_image: Tensor | None = None


def timings(paths: list[Timed], min_run_time: float, rounds: int) -> list[tuple[float, float, float, float]]:
    """Per-image milliseconds of each path, (median, IQR) at batch 1 and (median, IQR) at its large
    batch, with fgvc/analysis/cost.py's timer at this process's thread count. The paths are timed in
    `rounds` alternating rounds, so that a change in machine load during the report (this machine
    is shared) affects every path alike and their ratios stay comparable."""
    threads = torch.get_num_threads()
    b1: list[list[float]] = [[] for _ in paths]
    bn: list[list[float]] = [[] for _ in paths]
    for _ in range(max(1, rounds)):
        for i, p in enumerate(paths):
            if p.per_image is None:
                b1[i] += time_calls(p.fn, p.big[:1], min_run_time, threads)
            else:
                b1[i] += [t / len(p.per_image) for t in time_calls(
                    lambda xs, fn=p.fn: [fn(x[None]) for x in xs], p.per_image, min_run_time, threads)]
            bn[i] += [t / len(p.big) for t in time_calls(p.fn, p.big, min_run_time, threads)]
    out = []
    for one, many in zip(b1, bn):
        l1, ln = summarize(one), summarize(many)
        out.append((l1.median_ms, l1.iqr_ms, ln.median_ms, ln.iqr_ms))
    return out


@torch.no_grad()
def dcn_logits(model: DCN, loader: DataLoader, ks: list[int]) -> tuple[Tensor, Tensor, dict[int, Tensor]]:
    """One pass: labels (N,), coarse logits (N, K) and the DCN path's logits for every k."""
    labels, coarse, per_k = [], [], {k: [] for k in ks}
    for batch in loader:
        x = model_input(model, batch["image"])
        feats = model.coarse_features(x)  # (B, C, h, w)
        logits = model.head(feats)  # (B, K)
        labels.append(torch.as_tensor(batch["label"]))
        coarse.append(logits)
        for k in ks:
            per_k[k].append(logits if k == 0 else model.refine(x, feats, logits, k).logits)
    return torch.cat(labels), torch.cat(coarse), {k: torch.cat(v) for k, v in per_k.items()}


@torch.no_grad()
def plain_logits(fn: Callable[[Tensor], Tensor], loader: DataLoader, model: nn.Module) -> tuple[Tensor, Tensor]:
    labels, logits = [], []
    for batch in loader:
        labels.append(torch.as_tensor(batch["label"]))
        logits.append(fn(model_input(model, batch["image"])))
    return torch.cat(labels), torch.cat(logits)


def images(loader: DataLoader, n: int, model: nn.Module) -> Tensor:
    """The first n images of a loader as `model`'s inputs, (n, 3, H, W) (fewer if the split is smaller)."""
    out, have = [], 0
    for batch in loader:
        out.append(model_input(model, batch["image"]))
        have += len(batch["image"])
        if have >= n:
            break
    return torch.cat(out)[:n]


def default_ks(model: DCN, x: Tensor) -> list[int]:
    """1, 2, 4, ... up to every position of the coarse grid, and the recipe's k."""
    with torch.no_grad():
        h, w = model.coarse_features(x[:1]).shape[-2:]
    ks = {model.top_k, h * w}
    k = 1
    while k < h * w:
        ks.add(k)
        k *= 2
    return sorted(ks - {0})


def pareto(points: list[tuple[float, float]]) -> list[bool]:
    """Is each (cost, accuracy) point on the front: no other point as cheap and as accurate, and
    strictly better in one of the two."""
    return [not any(c2 <= c and a2 >= a and (c2 < c or a2 > a) for c2, a2 in points) for c, a in points]


def timed_rows(rows: list[Row], paths: list[Timed], min_run_time: float, rounds: int) -> list[Row]:
    """The rows with each path's latency (batch 1 and the large batch, alternating rounds) and their
    places on the accuracy-vs-FLOPs and accuracy-vs-latency Pareto fronts."""
    for row, (b1, b1_iqr, bn, bn_iqr) in zip(rows, timings(paths, min_run_time, rounds)):
        row.lat_b1_ms, row.lat_b1_iqr_ms, row.lat_batch_ms, row.lat_batch_iqr_ms = b1, b1_iqr, bn, bn_iqr
    for row, on_f, on_l in zip(rows, pareto([(r.gflops, r.top1) for r in rows]),
                               pareto([(r.lat_b1_ms, r.top1) for r in rows])):
        row.pareto_flops, row.pareto_latency = on_f, on_l
    return rows


# --- the report ----------------------------------------------------------------------------------

def coarse_fine_rows(model: DCN, test_loader: DataLoader, num_classes: int, val_loader: DataLoader | None = None,
                     ks: list[int] | None = None, shares: tuple[float, ...] = DEFAULT_SHARES,
                     costs: tuple[float, ...] = DEFAULT_COSTS, thresholds: tuple[float, ...] = (),
                     drops: tuple[float, ...] = DEFAULT_DROPS, fine_model: nn.Module | None = None,
                     fine_test_loader: DataLoader | None = None,
                     fine_label: str = "", batch: int = 32, min_run_time: float = 0.5, rounds: int = 3) -> list[Row]:
    """Every row of the report: coarse, fine on the whole image, dcn for each k, early exit for each
    threshold (chosen on `val_loader` for each share of escalated images, each target cost and each
    top-1 drop allowed against refining every image).
    Latencies: every path timed in `rounds` alternating rounds (`timings`)."""
    if isinstance(model, CFViT):
        return cfvit_rows(model, test_loader, num_classes, val_loader, ks=ks, shares=shares, costs=costs,
                          thresholds=thresholds, drops=drops, fine_model=fine_model, fine_test_loader=fine_test_loader,
                          fine_label=fine_label, batch=batch, min_run_time=min_run_time, rounds=rounds)
    if not isinstance(model, DCN) or model.whole_image:
        raise UserError("the coarse-fine report needs a dcn model with a coarse network (model.arch=dcn, "
                        "model.dcn.whole_image=false); give the run folder of such a run.")
    model.eval()
    big = images(test_loader, batch, model)  # (N, 3, H, W): the large batch, and batch-1 inputs
    one = big[:1]
    ks = sorted(set(ks if ks is not None else default_ks(model, one)) - {0})
    k_exit = model.top_k or max(ks)
    labels, coarse_logits, by_k = dcn_logits(model, test_loader, sorted(set(ks) | {k_exit}))

    def acc(logits: Tensor, y: Tensor = labels) -> tuple[float, float]:
        m = accuracy_metrics(logits, y, num_classes)
        return 100 * m["top1"], 100 * m["mean_class_acc"]

    rows: list[Row] = []
    paths: list[Timed] = []  # rows[i] is timed by paths[i]
    nan = float("nan")
    untimed = (nan, nan, nan, nan)
    # every row's validation top-1 (to choose a setting without reading test) and the thresholds' inputs
    val = dcn_logits(model, val_loader, sorted(set(ks) | {k_exit})) if val_loader is not None else None

    def val_top1(logits: Callable[[Tensor, dict[int, Tensor]], Tensor]) -> float:
        """Validation top-1 of the logits `logits(coarse, refined by k)` picks; nan without a validation split."""
        return nan if val is None else acc(logits(val[1], val[2]), val[0])[0]

    coarse_params = count_parameters(model.coarse, model.head) / 1e6
    coarse_flops = count_flops(lambda x: model(x, top_k=0), one)
    rows.append(Row("coarse", "coarse", 0, nan, "", 0.0, *acc(coarse_logits), coarse_flops / 1e9,
                    coarse_params, *untimed, val_top1=val_top1(lambda coarse, _: coarse)))
    paths.append(Timed(lambda x: model(x, top_k=0), big))

    # the full-image fine network
    if fine_model is not None:
        fine_model.eval()
        fine_fn = _logits_fn(fine_model)
        y, lg = plain_logits(fine_fn, fine_test_loader or test_loader, fine_model)
        fine_big = images(fine_test_loader, batch, fine_model) if fine_test_loader is not None else big
        fine_row = Row(fine_label or "fine (whole image)", "fine", -1, nan, "", 1.0, *acc(lg, y),
                       count_flops(fine_fn, fine_big[:1]) / 1e9, count_parameters(fine_model) / 1e6, *untimed)
        paths.append(Timed(fine_fn, fine_big))
    else:
        y, lg = plain_logits(model.forward_whole_image, test_loader, model)
        fine_row = Row(fine_label or "fine (whole image, this model's fine net, untrained for it)", "fine-untrained", -1,
                       nan, "", 1.0, *acc(lg, y), count_flops(model.forward_whole_image, one) / 1e9,
                       count_parameters(model.fine, model.project, model.head) / 1e6, *untimed)
        paths.append(Timed(model.forward_whole_image, big))
    rows.append(fine_row)

    dcn_flops: dict[int, float] = {}
    for k in ks:
        dcn_flops[k] = count_flops(lambda x, k=k: model(x, top_k=k), one)
        rows.append(Row(f"dcn k={k}", "dcn", k, nan, "", 1.0, *acc(by_k[k]), dcn_flops[k] / 1e9,
                        count_parameters(model) / 1e6, *untimed, val_top1=val_top1(lambda _, refined, k=k: refined[k])))
        paths.append(Timed(lambda x, k=k: model(x, top_k=k), big))
    if k_exit not in dcn_flops:
        dcn_flops[k_exit] = count_flops(lambda x: model(x, top_k=k_exit), one)

    # early exit: thresholds chosen on validation, scored on test
    chosen: list[tuple[float, str]] = [(float(t), "given") for t in thresholds]
    if val is not None and (shares or costs or drops):
        val_labels, val_coarse, val_refined = val
        chosen += [(choose_threshold(val_coarse, s), f"val: {100 * s:g}% escalated") for s in shares]
        chosen += [(threshold_for_accuracy(val_coarse, val_refined[k_exit], val_labels, d),
                    f"val: within {d:g} points of k={k_exit}") for d in drops]
        chosen += [(threshold_for_cost(val_coarse, c * fine_row.gflops * 1e9, coarse_flops, dcn_flops[k_exit]),
                    f"val: {100 * c:g}% of fine FLOPs") for c in costs]
    for t, how in chosen:
        up = escalate(coarse_logits, t)  # (N,)
        logits = torch.where(up[:, None], by_k[k_exit], coarse_logits)
        share = up.float().mean().item()
        flops = coarse_flops + share * (dcn_flops[k_exit] - coarse_flops)
        run = lambda x, t=t: model.early_exit(x, t, k_exit)  # noqa: E731
        on_val = val_top1(lambda coarse, refined, t=t: torch.where(escalate(coarse, t)[:, None], refined[k_exit], coarse))
        rows.append(Row(f"exit t={t:.3g} k={k_exit}", "exit", k_exit, t, how, share, *acc(logits), flops / 1e9,
                        count_parameters(model) / 1e6, *untimed, val_top1=on_val))
        paths.append(Timed(run, big, per_image=big[:LATENCY_IMAGES]))

    return timed_rows(rows, paths, min_run_time, rounds)


def _logits_fn(model: nn.Module) -> Callable[[Tensor], Tensor]:
    def fn(x: Tensor) -> Tensor:
        out = model(x)
        return out if isinstance(out, Tensor) else out.logits
    return fn


def goal_line(rows: list[Row]) -> str:
    """The issue's goal: within 0.5 points of the full-image fine network, at most 35% of its
    FLOPs and at least 2x faster at batch 1 and at the large batch. Says the cheapest setting that
    reaches all of it, or else the cheapest within the accuracy gap and what it misses."""
    fine = next(r for r in rows if r.kind.startswith("fine"))
    candidates = [r for r in rows if r.kind in ("dcn", "exit") and r.top1 >= fine.top1 - GOAL_ACCURACY_GAP]
    if not candidates:
        best = max((r for r in rows if r.kind in ("dcn", "exit")), key=lambda r: r.top1, default=None)
        gap = f"; the most accurate, {best.label}, is {fine.top1 - best.top1:.2f} points below" if best else ""
        return (f"Goal not reached: no dcn or early-exit setting is within {GOAL_ACCURACY_GAP} points of "
                f"{fine.label} ({fine.top1:.2f}% top-1){gap}.")

    def meets(r: Row) -> bool:
        return (r.gflops / fine.gflops <= GOAL_FLOPS_SHARE and fine.lat_b1_ms / r.lat_b1_ms >= GOAL_SPEEDUP
                and fine.lat_batch_ms / r.lat_batch_ms >= GOAL_SPEEDUP)

    reaching = [r for r in candidates if meets(r)]
    best = min(reaching or candidates, key=lambda r: r.gflops)
    share, speed, speed_batch = best.gflops / fine.gflops, fine.lat_b1_ms / best.lat_b1_ms, fine.lat_batch_ms / best.lat_batch_ms
    unfair = " (not a fair comparison: the fine network was not trained on whole images; give --fine-run)" \
        if fine.kind == "fine-untrained" else ""
    which = "the cheapest setting that reaches it" if reaching else f"the cheapest setting within {GOAL_ACCURACY_GAP} points"
    return (f"Goal {'reached' if reaching else 'not reached'}{unfair}: {which}, against {fine.label} "
            f"({fine.top1:.2f}% top-1), is {best.label} ({best.top1:.2f}%), at {100 * share:.0f}% of its FLOPs "
            f"(goal <= {100 * GOAL_FLOPS_SHARE:.0f}%), {speed:.2f}x its batch-1 speed and {speed_batch:.2f}x its "
            f"large-batch speed (goal >= {GOAL_SPEEDUP:g}x each).")


def accuracy_chosen(rows: list[Row]) -> Row | None:
    """The setting a user would pick without reading test: among the dcn and early-exit rows with a
    validation top-1, the cheapest (FLOPs) within VAL_TOLERANCE points of the best of them."""
    measured = [r for r in rows if r.kind in ("dcn", "exit") and not math.isnan(r.val_top1)]
    if not measured:
        return None
    best = max(r.val_top1 for r in measured)
    return min((r for r in measured if r.val_top1 >= best - VAL_TOLERANCE), key=lambda r: r.gflops)


def plain_goal_line(rows: list[Row]) -> str:
    """The roaming regime's goal (issue 29): the accuracy-chosen setting (`accuracy_chosen`) within
    PLAIN_GOAL_GAP test points of the plain network at the written resolution (the fine row, from
    --fine-run), at most PLAIN_GOAL_FLOPS_SHARE of its FLOPs, PLAIN_GOAL_OVER_COARSE points above the
    DCN's own coarse path, and PLAIN_GOAL_SPEEDUP x faster at batch 1 and at the large batch."""
    fine = next(r for r in rows if r.kind.startswith("fine"))
    coarse = next(r for r in rows if r.kind == "coarse")
    r = accuracy_chosen(rows)
    if r is None:
        return "Against the plain network: no validation split was read, so no setting is chosen."
    share, b1, bn = r.gflops / fine.gflops, fine.lat_b1_ms / r.lat_b1_ms, fine.lat_batch_ms / r.lat_batch_ms
    checks = [(f"{r.top1 - fine.top1:+.2f} points (goal >= -{PLAIN_GOAL_GAP:g})", r.top1 >= fine.top1 - PLAIN_GOAL_GAP),
              (f"{100 * share:.0f}% of its FLOPs (goal <= {100 * PLAIN_GOAL_FLOPS_SHARE:.0f}%)",
               share <= PLAIN_GOAL_FLOPS_SHARE),
              (f"{r.top1 - coarse.top1:+.2f} points over its coarse path (goal >= {PLAIN_GOAL_OVER_COARSE:g})",
               r.top1 >= coarse.top1 + PLAIN_GOAL_OVER_COARSE),
              (f"{b1:.2f}x its batch-1 speed", b1 >= PLAIN_GOAL_SPEEDUP),
              (f"{bn:.2f}x its large-batch speed (goal >= {PLAIN_GOAL_SPEEDUP:g}x each)", bn >= PLAIN_GOAL_SPEEDUP)]
    missed = [text for text, ok in checks if not ok]
    verdict = "reached" if not missed else "not reached (misses: " + "; ".join(missed) + ")"
    return (f"Against the plain network ({fine.label}, {fine.top1:.2f}% top-1): the accuracy-chosen setting "
            f"(cheapest within {VAL_TOLERANCE:g} validation points of the best) is {r.label}, {r.top1:.2f}% test "
            f"top-1 ({r.val_top1:.2f}% validation): " + ", ".join(t for t, _ in checks) + f". Goal {verdict}.")


# --- CF-ViT (Chen et al. 2023; fgvc/models/cfvit.py) ------------------------------------------------

CFVIT_GOAL_GAP = 0.5  # points of top-1 an accuracy-chosen setting may lose against the fine pass with every token
CFVIT_GOAL_FLOPS_SHARE = 0.65  # ... at most this share of its FLOPs
CFVIT_GOAL_OVER_COARSE = 3.0  # ... at least this many points above the coarse pass alone
CFVIT_GOAL_SPEEDUP = 1.3  # ... and at least this much faster at the large batch
CFVIT_SHARES = tuple(i / 8 for i in range(1, 8))  # shares of the coarse tokens re-split, besides one and all


def cfvit_ks(model: CFViT) -> list[int]:
    """Tokens re-split in the report: one, each eighth of the coarse grid, the recipe's share, all."""
    n = model.num_coarse
    return sorted({1, n, model.top_k} | {max(1, math.ceil(s * n)) for s in CFVIT_SHARES})


@torch.no_grad()
def cfvit_logits(model: CFViT, loader: DataLoader, ks: list[int]) -> tuple[Tensor, Tensor, dict[int, Tensor]]:
    """One pass: labels (N,), coarse logits (N, K) and the fine pass's logits for each k (tokens re-split)."""
    labels, coarse, per_k = [], [], {k: [] for k in ks}
    for batch in loader:
        x = model_input(model, batch["image"])
        c = model.coarse_pass(x)
        labels.append(torch.as_tensor(batch["label"]))
        coarse.append(c.logits)
        for k in ks:
            per_k[k].append(c.logits if k == 0 else model.fine_pass(x, c, k)[0])
    return torch.cat(labels), torch.cat(coarse), {k: torch.cat(v) for k, v in per_k.items()}


def transformer_flops(fn: Callable[[Tensor], object], x: Tensor, *modules: nn.Module) -> int:
    """count_flops with the attention of `modules` computed explicitly: torch's counter sees nothing
    of the fused kernel on the CPU."""
    with explicit_attention(m for module in modules for m in module.modules()):
        return count_flops(fn, x)


def cfvit_rows(model: CFViT, test_loader: DataLoader, num_classes: int, val_loader: DataLoader | None = None,
               ks: list[int] | None = None, shares: tuple[float, ...] = DEFAULT_SHARES,
               costs: tuple[float, ...] = (), thresholds: tuple[float, ...] = (),
               drops: tuple[float, ...] = DEFAULT_DROPS, fine_model: nn.Module | None = None,
               fine_test_loader: DataLoader | None = None, fine_label: str = "", batch: int = 32,
               min_run_time: float = 0.5, rounds: int = 3) -> list[Row]:
    """Every row of a CF-ViT's report: the coarse pass alone; the reference, this model's fine pass
    with every token re-split (its coarse pass included when feature reuse needs it); a full-image
    run (`fine_model`), if given; the fine pass re-splitting k tokens for each k; early exit at the
    recipe's k for each threshold chosen on `val_loader` (shares of escalated images, top-1 drops
    against re-splitting k for every image, target shares of the reference's FLOPs, the goal's
    CFVIT_GOAL_FLOPS_SHARE among them). Latencies as `coarse_fine_rows`'."""
    model.eval()
    n = model.num_coarse
    big = images(test_loader, batch, model)  # (N, 3, H, W)
    one = big[:1]
    ks = sorted(set(ks if ks is not None else cfvit_ks(model)) - {0, n})
    k_exit = model.top_k or n
    labels, coarse_logits, by_k = cfvit_logits(model, test_loader, sorted(set(ks) | {k_exit, n}))

    def acc(logits: Tensor, y: Tensor = labels) -> tuple[float, float]:
        m = accuracy_metrics(logits, y, num_classes)
        return 100 * m["top1"], 100 * m["mean_class_acc"]

    nan = float("nan")
    untimed = (nan, nan, nan, nan)
    params = count_parameters(model) / 1e6
    rows: list[Row] = []
    paths: list[Timed] = []  # rows[i] is timed by paths[i]

    def coarse_fn(x: Tensor) -> Tensor:
        return model(x, tokens=0).logits

    coarse_flops = transformer_flops(coarse_fn, one, model)
    rows.append(Row("coarse pass", "coarse", 0, nan, "", 0.0, *acc(coarse_logits), coarse_flops / 1e9,
                    count_parameters(model.net) / 1e6, *untimed))
    paths.append(Timed(coarse_fn, big))
    reference_flops = transformer_flops(model.forward_every_token, one, model)
    label = f"fine: every token re-split (k={n})"
    rows.append(Row(label + (" + coarse pass (reuse)" if model.reuse is not None else ""), "fine", n, nan, "", 1.0,
                    *acc(by_k[n]), reference_flops / 1e9, params, *untimed))
    paths.append(Timed(model.forward_every_token, big))
    if fine_model is not None:
        fine_model.eval()
        fine_fn = _logits_fn(fine_model)
        y, lg = plain_logits(fine_fn, fine_test_loader or test_loader, fine_model)
        fine_big = images(fine_test_loader, batch, fine_model) if fine_test_loader is not None else big
        rows.append(Row(fine_label or "fine (whole image, another run)", "fine", -1, nan, "", 1.0, *acc(lg, y),
                        transformer_flops(fine_fn, fine_big[:1], fine_model) / 1e9,
                        count_parameters(fine_model) / 1e6, *untimed))
        paths.append(Timed(fine_fn, fine_big))

    k_flops: dict[int, float] = {}
    for k in sorted(set(ks) | {k_exit}):
        k_flops[k] = transformer_flops(lambda x, k=k: model(x, tokens=k).fine_logits, one, model)
        if k not in ks:
            continue
        rows.append(Row(f"cf-vit k={k}/{n}", "cfvit", k, nan, "", 1.0, *acc(by_k[k]), k_flops[k] / 1e9, params,
                        *untimed))
        paths.append(Timed(lambda x, k=k: model(x, tokens=k).fine_logits, big))

    chosen: list[tuple[float, str]] = [(float(t), "given") for t in thresholds]
    costs = tuple(sorted(set(costs) | {CFVIT_GOAL_FLOPS_SHARE}))
    if val_loader is not None:
        val_labels, val_coarse, val_fine = cfvit_logits(model, val_loader, [k_exit])
        chosen += [(choose_threshold(val_coarse, s), f"val: {100 * s:g}% escalated") for s in shares]
        chosen += [(threshold_for_accuracy(val_coarse, val_fine[k_exit], val_labels, d),
                    f"val: within {d:g} points of k={k_exit}") for d in drops]
        chosen += [(threshold_for_cost(val_coarse, c * reference_flops, coarse_flops, k_flops[k_exit]),
                    f"val: {100 * c:g}% of the reference's FLOPs") for c in costs]
    for t, how in chosen:
        up = escalate(coarse_logits, t)  # (N,)
        logits = torch.where(up[:, None], by_k[k_exit], coarse_logits)
        share = up.float().mean().item()
        flops = coarse_flops + share * (k_flops[k_exit] - coarse_flops)
        rows.append(Row(f"exit t={t:.3g} k={k_exit}", "exit", k_exit, t, how, share, *acc(logits), flops / 1e9,
                        params, *untimed))
        paths.append(Timed(lambda x, t=t: model.early_exit(x, t, k_exit), big, per_image=big[:LATENCY_IMAGES]))

    return timed_rows(rows, paths, min_run_time, rounds)


def cfvit_goal_line(rows: list[Row]) -> str:
    """CF-ViT's goal: a setting (k tokens re-split or an early exit) within CFVIT_GOAL_GAP points of
    the model's own fine pass with every token re-split, at most CFVIT_GOAL_FLOPS_SHARE of its FLOPs,
    CFVIT_GOAL_OVER_COARSE points above the coarse pass alone and CFVIT_GOAL_SPEEDUP x faster at the
    large batch. Names the cheapest setting that reaches all of it, or the cheapest within the gap."""
    fine = next(r for r in rows if r.kind == "fine")
    coarse = next(r for r in rows if r.kind == "coarse")
    settings = [r for r in rows if r.kind in ("cfvit", "exit")]
    close = [r for r in settings if r.top1 >= fine.top1 - CFVIT_GOAL_GAP]
    if not close:
        best = max(settings, key=lambda r: r.top1, default=None)
        gap = f"; the most accurate, {best.label}, is {fine.top1 - best.top1:.2f} points below" if best else ""
        return (f"Goal not reached: no setting is within {CFVIT_GOAL_GAP} points of {fine.label} "
                f"({fine.top1:.2f}% top-1){gap}.")

    def meets(r: Row) -> bool:
        return (r.gflops / fine.gflops <= CFVIT_GOAL_FLOPS_SHARE and r.top1 >= coarse.top1 + CFVIT_GOAL_OVER_COARSE
                and fine.lat_batch_ms / r.lat_batch_ms >= CFVIT_GOAL_SPEEDUP)

    reaching = [r for r in close if meets(r)]
    best = min(reaching or close, key=lambda r: r.gflops)
    which = "the cheapest setting that reaches it" if reaching else f"the cheapest setting within {CFVIT_GOAL_GAP} points"
    return (f"Goal {'reached' if reaching else 'not reached'}: {which}, against {fine.label} ({fine.top1:.2f}% "
            f"top-1), is {best.label} ({best.top1:.2f}%), at {100 * best.gflops / fine.gflops:.0f}% of its FLOPs "
            f"(goal <= {100 * CFVIT_GOAL_FLOPS_SHARE:.0f}%), {best.top1 - coarse.top1:+.2f} points over the coarse "
            f"pass (goal >= +{CFVIT_GOAL_OVER_COARSE:g}) and {fine.lat_batch_ms / best.lat_batch_ms:.2f}x its "
            f"large-batch speed (goal >= {CFVIT_GOAL_SPEEDUP:g}x).")


# --- writing -------------------------------------------------------------------------------------

MD_FORMATS = {"k": "{:d}", "threshold": "{:.4g}", "escalated": "{:.3f}", "top1": "{:.2f}",
              "mean_class_acc": "{:.2f}", "gflops": "{:.4f}", "params_m": "{:.3f}", "lat_b1_ms": "{:.3f}",
              "lat_b1_iqr_ms": "{:.3f}", "lat_batch_ms": "{:.3f}", "lat_batch_iqr_ms": "{:.3f}",
              "val_top1": "{:.2f}"}
HEADERS = {"label": "row", "kind": "kind", "k": "k", "threshold": "threshold", "chosen_on": "threshold chosen on",
           "escalated": "escalated (test)", "top1": "top-1 %", "mean_class_acc": "mean class acc %",
           "gflops": "GFLOPs/img", "params_m": "params M", "lat_b1_ms": "ms/img b1",
           "lat_b1_iqr_ms": "IQR b1", "lat_batch_ms": "ms/img batch", "lat_batch_iqr_ms": "IQR batch",
           "pareto_flops": "Pareto FLOPs", "pareto_latency": "Pareto latency", "val_top1": "val top-1 %"}


def cell(row: Row, key: str) -> str:
    value = getattr(row, key)
    if isinstance(value, bool):
        return "yes" if value else ""
    if isinstance(value, float) and math.isnan(value):
        return ""
    if key == "k" and value < 0:
        return ""
    return MD_FORMATS.get(key, "{}").format(value)


ACCURACY_NOTE = ("Test split. Early-exit thresholds were chosen on the validation split, never on test; their "
                 "FLOPs are coarse + escalated share x (dcn - coarse). Every path timed in alternating rounds, "
                 "so a change in machine load affects them alike.")


def markdown(rows: list[Row], header: str, batch: int, summary: str | None = None, note: str = ACCURACY_NOTE) -> str:
    """The report as a markdown table under a header, a note on what was measured and a summary
    line (default: `goal_line`)."""
    lines = [f"# Coarse vs fine: {header}", "",
             f"{note} FLOPs per image counted by torch's FlopCounterMode (2 FLOPs per multiply-add; "
             f"FLOPs, not MACs). Latency: this CPU, {torch.get_num_threads()} thread(s), median and "
             f"interquartile range per image at batch 1 and at batch {batch}.", "",
             summary or goal_line(rows), "",
             "| " + " | ".join(HEADERS[c] for c in COLUMNS) + " |",
             "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(r, c) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_csv(rows: list[Row], path: Path) -> None:

    with writing(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def label_groups(xy: list[tuple[float, float]], near: float = 0.04) -> list[list[int]]:
    """Indices of points grouped when they lie within `near` of each other (axes fractions, x and y
    each scaled to 0-1), so one label names every point of a group and labels never print over each
    other; a group is named at its first point."""
    groups: list[list[int]] = []
    for i, (x, y) in enumerate(xy):
        for g in groups:
            gx, gy = xy[g[0]]
            if abs(x - gx) <= near and abs(y - gy) <= near:
                g.append(i)
                break
        else:
            groups.append([i])
    return groups


def plot(rows: list[Row], path: Path, title: str, test_images: int = 0,
         curve: list[tuple[int, float, float, float]] | None = None) -> dict:
    """Accuracy against FLOPs and against batch-1 latency, the Pareto front drawn; the plotted
    points are stored in the PNG's text chunk `fgvc-points` (returned too). Each row is numbered and
    named in a key under the axes; points that lie together share one label ("3,5"). `test_images`:
    the test split's size, for each point's binomial standard error (error bars); `curve`: the plain
    network's accuracy-vs-FLOPs curve (fgvc.analysis.plain_curve), drawn on the FLOPs axes. The
    accuracy axis spans at least MIN_ACCURACY_SPAN points."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    markers = {"coarse": "s", "fine": "*", "fine-untrained": "X", "dcn": "o", "cfvit": "o", "exit": "^"}
    points = {"labels": [r.label for r in rows], "top1": [r.top1 for r in rows],
              "gflops": [r.gflops for r in rows], "lat_b1_ms": [r.lat_b1_ms for r in rows]}
    se = [100 * math.sqrt(r.top1 / 100 * (1 - r.top1 / 100) / test_images) if test_images else 0.0 for r in rows]
    lows, highs = [r.top1 - e for r, e in zip(rows, se)], [r.top1 + e for r, e in zip(rows, se)]
    key_lines = max(1, math.ceil(len(rows) / 2))
    fig = Figure(figsize=(12, 5 + 0.17 * key_lines))
    for ax, key, front_key, xlabel in ((fig.add_subplot(1, 2, 1), "gflops", "pareto_flops", "GFLOPs per image (log)"),
                                       (fig.add_subplot(1, 2, 2), "lat_b1_ms", "pareto_latency",
                                        "CPU latency per image, batch 1, ms (log)")):
        lo, hi = list(lows), list(highs)
        if curve and key == "gflops":
            c_lo, c_hi = draw_curve(ax, curve, 1e9)
            lo, hi = lo + c_lo, hi + c_hi
        for kind, marker in markers.items():
            sel = [i for i, r in enumerate(rows) if r.kind == kind]
            if not sel:
                continue
            ax.errorbar([getattr(rows[i], key) for i in sel], [rows[i].top1 for i in sel], yerr=[se[i] for i in sel],
                        fmt=marker, ms=7, capsize=2, label=kind, zorder=2)
        front = sorted((getattr(r, key), r.top1) for r in rows if getattr(r, front_key))
        ax.plot([p[0] for p in front], [p[1] for p in front], "k--", lw=1, label="Pareto front")
        label_log_axis(ax)
        ax.set_ylim(*accuracy_limits(lo, hi))
        ax.set_xlabel(xlabel)
        ax.set_ylabel("top-1 accuracy % (± standard error)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
        fig.canvas.draw()  # the limits are final: place the labels in axes fractions
        x0, x1 = (math.log10(v) for v in ax.get_xlim())
        y0, y1 = ax.get_ylim()
        xy = [((math.log10(getattr(r, key)) - x0) / (x1 - x0), (r.top1 - y0) / (y1 - y0)) for r in rows]
        for group in label_groups(xy):
            r = rows[group[0]]
            ax.annotate(",".join(str(i + 1) for i in group), (getattr(r, key), r.top1), fontsize=7,
                        xytext=(4, 4), textcoords="offset points")
    keys = [f"{i + 1}: {r.label}" for i, r in enumerate(rows)]
    half = key_lines
    fig.text(0.06, 0.01, "\n".join(keys[:half]), fontsize=7, va="bottom", family="monospace")
    fig.text(0.53, 0.01, "\n".join(keys[half:]), fontsize=7, va="bottom", family="monospace")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.17 * key_lines / (5 + 0.17 * key_lines) + 0.02, 1, 1))
    with writing(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, metadata={PNG_POINTS_KEY: json.dumps(points)})
    return points


def read_plot_points(path: Path) -> dict:
    from PIL import Image

    with Image.open(path) as img:
        return json.loads(img.text[PNG_POINTS_KEY])


def rich_table(rows: list[Row], title: str):
    from rich.table import Table

    table = Table(title=title)
    for name in ("row", "esc.", "top-1 %", "mca %", "GFLOPs", "params M", "ms b1 (IQR)", "ms/img batch (IQR)",
                 "Pareto"):
        table.add_column(name, justify="left" if name == "row" else "right")
    for r in rows:
        front = "/".join(n for n, on in (("FLOPs", r.pareto_flops), ("lat.", r.pareto_latency)) if on)
        table.add_row(r.label, cell(r, "escalated"), cell(r, "top1"), cell(r, "mean_class_acc"), cell(r, "gflops"),
                      cell(r, "params_m"), f"{r.lat_b1_ms:.2f} ({r.lat_b1_iqr_ms:.2f})",
                      f"{r.lat_batch_ms:.2f} ({r.lat_batch_iqr_ms:.2f})", front)
    return table


def write_report(rows: list[Row], out_dir: Path, header: str, batch: int, summary: str | None = None,
                 test_images: int = 0, curve: list[tuple[int, float, float, float]] | None = None,
                 plot_title: str = "") -> list[Path]:
    out_dir = Path(out_dir)
    paths = [out_dir / name for name in FILES]
    write_text(paths[0], markdown(rows, header, batch, summary))
    write_csv(rows, paths[1])
    plot(rows, paths[2], plot_title or header, test_images, curve)
    return paths


# --- cost only: a recipe's dcn against its whole-image counterpart ---------------------------------

COST_FILES = ("coarse_fine_cost.md", "coarse_fine_cost.csv")
COST_NOTE = ("Cost only: random weights (they cost what trained ones cost), random inputs; accuracy not "
             "measured. Every path timed in alternating rounds (fgvc/analysis/cost.py), at batch 1 and at "
             "the large batch, so a change in machine load affects them alike.")


def cost_rows(model: DCN, whole: DCN, image_size: int, ks: list[int], batch: int = 32, rounds: int = 3,
              min_run_time: float = 0.5) -> list[Row]:
    """FLOPs, parameters and CPU latency per image (batch 1 and `batch`) of the coarse path, the
    whole-image fine network (`whole`, built with whole_image=True) and the DCN at each k."""
    if not isinstance(model, DCN) or model.whole_image or not isinstance(whole, DCN) or not whole.whole_image:
        raise UserError("the coarse-fine cost report needs a dcn recipe (model.arch=dcn, model.dcn.whole_image=false).")
    model.eval(), whole.eval()
    big = torch.randn(batch, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))  # (N, 3, H, W)
    paths: dict[str, tuple[str, int, Callable[[Tensor], object], float]] = {
        "coarse": ("coarse", 0, lambda x: model(x, top_k=0), count_parameters(model.coarse, model.head) / 1e6),
        "fine (whole image)": ("fine", -1, whole, count_parameters(whole) / 1e6)}
    for k in ks:
        paths[f"dcn k={k}"] = ("dcn", k, lambda x, k=k: model(x, top_k=k), count_parameters(model) / 1e6)
    lat = timings([Timed(fn, big) for _, _, fn, _ in paths.values()], min_run_time, rounds)
    nan = float("nan")
    return [Row(name, kind, k, nan, "", 1.0 if kind != "coarse" else 0.0, nan, nan,
                count_flops(fn, big[:1]) / 1e9, params, *times)
            for (name, (kind, k, fn, params)), times in zip(paths.items(), lat)]


def cost_line(rows: list[Row]) -> str:
    """Each dcn (or cf-vit) row's FLOPs share and speed-ups against the whole-image fine network
    (the DCN's goal: <= 35%, >= 2x; CF-ViT's: <= 65%, >= 1.3x at the large batch)."""
    fine = next(r for r in rows if r.kind == "fine")
    cfvit = any(r.kind == "cfvit" for r in rows)
    parts = [f"{r.label}: {100 * r.gflops / fine.gflops:.0f}% of the whole-image FLOPs, "
             f"{fine.lat_b1_ms / r.lat_b1_ms:.2f}x its speed at batch 1 and {fine.lat_batch_ms / r.lat_batch_ms:.2f}x "
             f"at the large batch" for r in rows if r.kind in (("coarse", "cfvit") if cfvit else ("dcn",))]
    share, speed = (CFVIT_GOAL_FLOPS_SHARE, CFVIT_GOAL_SPEEDUP) if cfvit else (GOAL_FLOPS_SHARE, GOAL_SPEEDUP)
    return (f"Against {fine.label} (goal: <= {100 * share:.0f}% of its FLOPs, >= {speed:g}x "
            f"faster): " + "; ".join(parts) + ".")


def cfvit_cost_rows(model: CFViT, image_size: int, ks: list[int], batch: int = 32, rounds: int = 3,
                    min_run_time: float = 0.5) -> list[Row]:
    """FLOPs, parameters and CPU latency per image (batch 1 and `batch`) of a CF-ViT's coarse pass,
    its fine pass with every token re-split, and the fine pass re-splitting k tokens, for each k."""
    model.eval()
    big = torch.randn(batch, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))  # (N, 3, H, W)
    n = model.num_coarse
    reuse = " + coarse pass (reuse)" if model.reuse is not None else ""
    paths: dict[str, tuple[str, int, Callable[[Tensor], object], float]] = {
        "coarse pass": ("coarse", 0, lambda x: model(x, tokens=0).logits, count_parameters(model.net) / 1e6),
        f"fine: every token re-split (k={n}){reuse}": ("fine", n, model.forward_every_token, count_parameters(model) / 1e6)}
    for k in ks:
        if k < n:
            paths[f"cf-vit k={k}/{n}"] = ("cfvit", k, lambda x, k=k: model(x, tokens=k).fine_logits,
                                          count_parameters(model) / 1e6)
    lat = timings([Timed(fn, big) for _, _, fn, _ in paths.values()], min_run_time, rounds)
    nan = float("nan")
    return [Row(name, kind, k, nan, "", 1.0 if kind != "coarse" else 0.0, nan, nan,
                transformer_flops(fn, big[:1], model) / 1e9, params, *times)
            for (name, (kind, k, fn, params)), times in zip(paths.items(), lat)]


def report_cost(overrides: list[str], out_dir: str | Path, ks: list[int] | None = None, num_classes: int = 200,
                batch: int = 32, rounds: int = 3, min_run_time: float = 0.5, overwrite: bool = False,
                console=None) -> list[Row]:
    """The cost report of a dcn recipe (`recipe=cub_dcn ...`) against the same recipe with
    model.dcn.whole_image=true, at the recipe's image size; written to out_dir and printed."""
    out_dir = Path(out_dir)
    paths = [out_dir / name for name in COST_FILES]
    if not overwrite and any(p.exists() for p in paths):
        raise UserError(f"'{out_dir}' already holds a coarse-fine cost report; pass --overwrite or another --out.")
    cfg = load_recipe(overrides)
    if cfg.model.arch not in ("dcn", "cfvit") or cfg.model.dcn.whole_image:
        raise UserError("the coarse-fine cost report needs a dcn recipe with model.dcn.whole_image=false, "
                        "e.g. recipe=cub_dcn, or a cfvit recipe such as recipe=cub_cfvit.")
    cfg.model.pretrained, cfg.model.weights = False, ""  # random weights cost the same; nothing is fetched
    size = cfg.data.image_size
    model = build_model(cfg.model, num_classes, size)
    if cfg.model.arch == "cfvit":
        rows = cfvit_cost_rows(model, size, sorted(set(ks or cfvit_ks(model)) - {0}), batch, rounds, min_run_time)
        header = f"cost of `{' '.join(overrides)}` against its fine pass with every token re-split at {size} px"
    else:
        cfg.model.dcn.whole_image = True
        whole = build_model(cfg.model, num_classes, size)
        rows = cost_rows(model, whole, size, sorted(set(ks or [model.top_k]) - {0}), batch, rounds, min_run_time)
        header = f"cost of `{' '.join(overrides)}` against model.dcn.whole_image=true at {size} px"
    make_folder(out_dir)
    write_text(paths[0], markdown(rows, header, batch, summary=cost_line(rows), note=COST_NOTE))
    write_csv(rows, paths[1])
    from rich.console import Console

    console = console or Console()
    console.print(rich_table(rows, header))
    console.print(cost_line(rows))
    console.print(f"written: {', '.join(str(p) for p in paths)}")
    return rows


# --- comparing designs: top-1 per k of several runs ---------------------------------------------

def design_table(run_dirs: list[str | Path], ks: list[int], batch: int = 64) -> str:
    """A markdown table: for each run folder (dcn runs; a whole-image run gives one number), top-1 on
    the validation and test splits at each k (k = 0: the coarse path) and its GFLOPs per image at
    each k. Accuracy only, no latency: to choose a design, not to report the goal."""
    head = ["run", *(f"k={k} val/test" for k in ks), *(f"GFLOPs k={k}" for k in ks)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run_dir in run_dirs:
        run = load_run(run_dir)
        test_loader, val_loader = _eval_loaders(run, batch)
        n = len(run.class_names)
        one = images(test_loader, 1)
        model = run.model
        if isinstance(model, CFViT):
            raise UserError(f"'{run_dir}' is a cfvit run; coarse-fine-design compares dcn runs: use "
                            f"`python fgvc/report.py coarse-fine {run_dir}` for it.")
        if model.whole_image:
            accs = []
            for loader in (val_loader, test_loader):
                y, lg = plain_logits(model.forward_whole_image, loader)
                accs.append(100 * accuracy_metrics(lg, y, n)["top1"])
            flops = count_flops(model.forward_whole_image, one) / 1e9
            cells = [f"{accs[0]:.1f} / {accs[1]:.1f} (whole image)"] + [""] * (len(ks) - 1) + [f"{flops:.4f}"]
            lines.append("| " + " | ".join([Path(run_dir).name, *cells, *[""] * (len(ks) - 1)]) + " |")
            continue
        per_split = []
        for loader in (val_loader, test_loader):
            y, coarse, by_k = dcn_logits(model, loader, [k for k in ks if k])
            per_split.append({k: 100 * accuracy_metrics(coarse if k == 0 else by_k[k], y, n)["top1"] for k in ks})
        flops = [count_flops(lambda x, k=k: model(x, top_k=k), one) / 1e9 for k in ks]
        lines.append("| " + " | ".join([Path(run_dir).name, *(f"{per_split[0][k]:.1f} / {per_split[1][k]:.1f}"
                                                              for k in ks), *(f"{f:.4f}" for f in flops)]) + " |")
    return "\n".join(lines) + "\n"


# --- wiring a run folder -------------------------------------------------------------------------

def _eval_loaders(run, batch: int) -> tuple[DataLoader, DataLoader | None]:
    data = build_datasets(run.cfg.data, run.cfg.seed, run.mean, run.std)
    loader = lambda ds: DataLoader(ds, batch_size=batch, shuffle=False, num_workers=0)  # noqa: E731
    return loader(data.test), (loader(data.val) if data.val is not None else None)


def report_run(run_dir: str | Path, fine_run: str | Path | None = None, ks: list[int] | None = None,
               shares: tuple[float, ...] = DEFAULT_SHARES, costs: tuple[float, ...] = DEFAULT_COSTS,
               thresholds: tuple[float, ...] = (), batch: int = 32, min_run_time: float = 0.5,
               rounds: int = 3, drops: tuple[float, ...] = DEFAULT_DROPS, console=None,
               curve: str | Path | None = None, command: str = "") -> list[Row]:
    """The report of a finished dcn or cfvit run folder, written into it and printed. `curve`: a
    plain_curve.csv (the synthetic benchmark's `--curve`), drawn on the accuracy-vs-FLOPs plot."""
    if curve is not None and not Path(curve).is_file():
        raise UserError(f"--curve {curve} is not a file; give the plain_curve.csv that `fgvc/benchmark.py synthetic "
                        "--curve SIZES` writes into its --out folder.")
    run = load_run(run_dir)
    test_loader, val_loader = _eval_loaders(run, batch)
    if val_loader is None and (shares or costs or drops):
        print("note: the run has no validation split (data.val_fraction=0): only --thresholds are used.")
    fine_model = fine_loader = None
    fine_label = ""
    if fine_run is not None:
        fine = load_run(fine_run)
        same_data = (fine.cfg.data == run.cfg.data and fine.mean == run.mean and fine.std == run.std)
        fine_loader = test_loader if same_data else _eval_loaders(fine, batch)[0]
        fine_model, fine_label = fine.model, f"fine (whole image, run {Path(fine_run).name})"
    rows = coarse_fine_rows(run.model, test_loader, len(run.class_names), val_loader, ks=ks, shares=shares,
                            costs=costs, thresholds=thresholds, drops=drops, fine_model=fine_model,
                            fine_test_loader=fine_loader, fine_label=fine_label, batch=batch,
                            min_run_time=min_run_time, rounds=rounds)
    if isinstance(run.model, CFViT):
        compared = "compared with its own fine pass with every token re-split" + (
            f" and the full-image run '{fine_run}'" if fine_run is not None else "")
    else:
        compared = (f"compared with the full-image run '{fine_run}'" if fine_run is not None else
                    "compared with this model's fine network on the whole image (not trained for it; "
                    "give --fine-run for a fair comparison)")
    weights = f"starting weights of the model: {starting_weights(Path(run_dir))}" + (
        f"; of the full-image run: {starting_weights(Path(fine_run))}" if fine_run is not None else "")
    header = f"run '{run_dir}', {compared}"
    command = command or f"python fgvc/report.py coarse-fine {run_dir}" + (f" --fine-run {fine_run}" if fine_run else "")
    page_header = f"{header}\n\nCommand: `{command}`, {datetime.date.today().isoformat()}, {code_version()}; {weights}."
    summary = cfvit_goal_line(rows) if isinstance(run.model, CFViT) else goal_line(rows) + (
        "\n\n" + plain_goal_line(rows) if fine_run is not None else "")
    paths = write_report(rows, Path(run_dir), page_header, batch, summary, len(test_loader.dataset),
                         read_curve_csv(Path(curve)) if curve else None, plot_title=header)
    from rich.console import Console

    console = console or Console()
    console.print(rich_table(rows, f"coarse vs fine: {Path(run_dir).name}"))
    console.print(summary)
    console.print(f"{compared}; written: {', '.join(str(p) for p in paths)}")
    return rows
