"""The coarse-vs-fine cost/accuracy report of a Dynamic Capacity Network (Almahairi et al. 2016).

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
import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

from fgvc.engine.metrics import accuracy_metrics
from fgvc.errors import UserError
from fgvc.models.build import model_input
from fgvc.models.dcn import DCN, choose_threshold, escalate, threshold_for_cost

DEFAULT_SHARES = (0.1, 0.25, 0.5)  # escalated shares of the validation split to pick thresholds for
DEFAULT_COSTS = (0.35,)  # target FLOPs as a share of the full-image fine network (the goal)
GOAL_ACCURACY_GAP = 0.5  # points of top-1 the DCN may lose against the full-image fine network
GOAL_FLOPS_SHARE = 0.35  # ... while spending at most this share of its FLOPs
GOAL_SPEEDUP = 2.0  # ... and being at least this much faster (batch-1 CPU latency)
LATENCY_IMAGES = 8  # batch-1 latency of early exit: timed over this many test images in turn
PNG_POINTS_KEY = "fgvc-points"  # PNG text chunk holding the plotted points, so the plot can be checked
FILES = ("coarse_fine.md", "coarse_fine.csv", "coarse_fine.png")


@dataclass
class Row:
    path: str  # row label
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


COLUMNS = [f.name for f in fields(Row)]


# --- measurements --------------------------------------------------------------------------------

def count_flops(fn: Callable[[Tensor], object], x: Tensor) -> float:
    """FLOPs (2 per multiply-add) of `fn(x)`, backward work inside it (saliency) included."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn(x)
    return float(counter.get_total_flops())


def measure_latency(fn: Callable[[], object], min_run_time: float) -> tuple[float, float]:
    """(median, interquartile range) in milliseconds of `fn()` on this CPU, torch.utils.benchmark."""
    from torch.utils import benchmark

    with torch.no_grad():
        fn()  # warm-up
        m = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()) \
            .blocked_autorange(min_run_time=min_run_time)
    return m.median * 1e3, m.iqr * 1e3


def count_params(*modules: nn.Module | None) -> float:
    return sum(p.numel() for m in modules if m is not None for p in m.parameters()) / 1e6


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


# --- the report ----------------------------------------------------------------------------------

def coarse_fine_rows(model: DCN, test_loader: DataLoader, num_classes: int, val_loader: DataLoader | None = None,
                     ks: list[int] | None = None, shares: tuple[float, ...] = DEFAULT_SHARES,
                     costs: tuple[float, ...] = DEFAULT_COSTS, thresholds: tuple[float, ...] = (),
                     fine_model: nn.Module | None = None, fine_test_loader: DataLoader | None = None,
                     fine_label: str = "", batch: int = 32, min_run_time: float = 0.5) -> list[Row]:
    """Every row of the report: coarse, fine on the whole image, dcn for each k, early exit for each
    threshold (chosen on `val_loader` for each share of escalated images and each target cost)."""
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

    def timing(fn: Callable[[Tensor], object], per_image_inputs: Tensor | None = None) -> tuple[float, ...]:
        if per_image_inputs is None:
            b1 = measure_latency(lambda: fn(one), min_run_time)
        else:  # a data-dependent path: batch 1 over several images in turn, per image
            b1 = tuple(v / len(per_image_inputs) for v in measure_latency(
                lambda: [fn(img[None]) for img in per_image_inputs], min_run_time))
        bn = measure_latency(lambda: fn(big), min_run_time)
        return b1[0], b1[1], bn[0] / len(big), bn[1] / len(big)

    rows: list[Row] = []
    nan = float("nan")
    coarse_params = count_params(model.coarse, model.head)
    coarse_flops = count_flops(lambda x: model(x, top_k=0), one)
    rows.append(Row("coarse", "coarse", 0, nan, "", 0.0, *acc(coarse_logits), coarse_flops / 1e9,
                    coarse_params, *timing(lambda x: model(x, top_k=0))))

    # the full-image fine network
    if fine_model is not None:
        fine_model.eval()
        fine_fn = _logits_fn(fine_model)
        y, lg = plain_logits(fine_fn, fine_test_loader or test_loader, fine_model)
        fine_big = images(fine_test_loader, batch, fine_model) if fine_test_loader is not None else big
        fine_row = Row(fine_label or "fine (whole image)", "fine", -1, nan, "", 1.0, *acc(lg, y),
                       count_flops(fine_fn, fine_big[:1]) / 1e9, count_params(fine_model),
                       *_timing_on(fine_fn, fine_big, min_run_time))
    else:
        y, lg = plain_logits(model.forward_whole_image, test_loader, model)
        fine_row = Row(fine_label or "fine (whole image, this model's fine net, untrained for it)", "fine-untrained", -1,
                       nan, "", 1.0, *acc(lg, y), count_flops(model.forward_whole_image, one) / 1e9,
                       count_params(model.fine, model.project, model.head),
                       *timing(model.forward_whole_image))
    rows.append(fine_row)

    dcn_flops: dict[int, float] = {}
    for k in ks:
        dcn_flops[k] = count_flops(lambda x, k=k: model(x, top_k=k), one)
        rows.append(Row(f"dcn k={k}", "dcn", k, nan, "", 1.0, *acc(by_k[k]), dcn_flops[k] / 1e9,
                        count_params(model), *timing(lambda x, k=k: model(x, top_k=k))))
    if k_exit not in dcn_flops:
        dcn_flops[k_exit] = count_flops(lambda x: model(x, top_k=k_exit), one)

    # early exit: thresholds chosen on validation, scored on test
    chosen: list[tuple[float, str]] = [(float(t), "given") for t in thresholds]
    if val_loader is not None and (shares or costs):
        _, val_coarse, _ = dcn_logits(model, val_loader, [])
        chosen += [(choose_threshold(val_coarse, s), f"val: {100 * s:g}% escalated") for s in shares]
        chosen += [(threshold_for_cost(val_coarse, c * fine_row.gflops * 1e9, coarse_flops, dcn_flops[k_exit]),
                    f"val: {100 * c:g}% of fine FLOPs") for c in costs]
    for t, how in chosen:
        up = escalate(coarse_logits, t)  # (N,)
        logits = torch.where(up[:, None], by_k[k_exit], coarse_logits)
        share = up.float().mean().item()
        flops = coarse_flops + share * (dcn_flops[k_exit] - coarse_flops)
        run = lambda x, t=t: model.early_exit(x, t, k_exit)  # noqa: E731
        rows.append(Row(f"exit t={t:.3g} k={k_exit}", "exit", k_exit, t, how, share, *acc(logits), flops / 1e9,
                        count_params(model), *timing(run, per_image_inputs=big[:LATENCY_IMAGES])))

    for row, on_f, on_l in zip(rows, pareto([(r.gflops, r.top1) for r in rows]),
                               pareto([(r.lat_b1_ms, r.top1) for r in rows])):
        row.pareto_flops, row.pareto_latency = on_f, on_l
    return rows


def _logits_fn(model: nn.Module) -> Callable[[Tensor], Tensor]:
    def fn(x: Tensor) -> Tensor:
        out = model(x)
        return out if isinstance(out, Tensor) else out.logits
    return fn


def _timing_on(fn: Callable[[Tensor], object], big: Tensor, min_run_time: float) -> tuple[float, ...]:
    b1 = measure_latency(lambda: fn(big[:1]), min_run_time)
    bn = measure_latency(lambda: fn(big), min_run_time)
    return b1[0], b1[1], bn[0] / len(big), bn[1] / len(big)


def goal_line(rows: list[Row]) -> str:
    """The issue's goal: within 0.5 points of the full-image fine network, at most 35% of its
    FLOPs and at least 2x faster (batch 1). Says which row reaches it, or the closest."""
    fine = next(r for r in rows if r.kind.startswith("fine"))
    candidates = [r for r in rows if r.kind in ("dcn", "exit") and r.top1 >= fine.top1 - GOAL_ACCURACY_GAP]
    if not candidates:
        best = max((r for r in rows if r.kind in ("dcn", "exit")), key=lambda r: r.top1, default=None)
        gap = f"; the most accurate, {best.path}, is {fine.top1 - best.top1:.2f} points below" if best else ""
        return (f"Goal not reached: no dcn or early-exit setting is within {GOAL_ACCURACY_GAP} points of "
                f"{fine.path} ({fine.top1:.2f}% top-1){gap}.")
    best = min(candidates, key=lambda r: r.gflops)
    share, speed = best.gflops / fine.gflops, fine.lat_b1_ms / best.lat_b1_ms
    reached = share <= GOAL_FLOPS_SHARE and speed >= GOAL_SPEEDUP
    unfair = " (not a fair comparison: the fine network was not trained on whole images; give --fine-run)" \
        if fine.kind == "fine-untrained" else ""
    return (f"Goal {'reached' if reached else 'not reached'}{unfair}: the cheapest setting within {GOAL_ACCURACY_GAP} "
            f"points of {fine.path} ({fine.top1:.2f}% top-1) is {best.path} ({best.top1:.2f}%), at "
            f"{100 * share:.0f}% of its FLOPs (goal <= {100 * GOAL_FLOPS_SHARE:.0f}%) and {speed:.2f}x its "
            f"batch-1 speed (goal >= {GOAL_SPEEDUP:g}x).")


# --- writing -------------------------------------------------------------------------------------

MD_FORMATS = {"k": "{:d}", "threshold": "{:.4g}", "escalated": "{:.3f}", "top1": "{:.2f}",
              "mean_class_acc": "{:.2f}", "gflops": "{:.4f}", "params_m": "{:.3f}", "lat_b1_ms": "{:.3f}",
              "lat_b1_iqr_ms": "{:.3f}", "lat_batch_ms": "{:.3f}", "lat_batch_iqr_ms": "{:.3f}"}
HEADERS = {"path": "path", "kind": "kind", "k": "k", "threshold": "threshold", "chosen_on": "threshold chosen on",
           "escalated": "escalated (test)", "top1": "top-1 %", "mean_class_acc": "mean class acc %",
           "gflops": "GFLOPs/img", "params_m": "params M", "lat_b1_ms": "ms/img b1",
           "lat_b1_iqr_ms": "IQR b1", "lat_batch_ms": "ms/img batch", "lat_batch_iqr_ms": "IQR batch",
           "pareto_flops": "Pareto FLOPs", "pareto_latency": "Pareto latency"}


def cell(row: Row, key: str) -> str:
    value = getattr(row, key)
    if isinstance(value, bool):
        return "yes" if value else ""
    if isinstance(value, float) and math.isnan(value):
        return ""
    if key == "k" and value < 0:
        return ""
    return MD_FORMATS.get(key, "{}").format(value)


def markdown(rows: list[Row], header: str, batch: int) -> str:
    lines = [f"# Coarse vs fine: {header}", "",
             f"Test split. FLOPs per image counted by torch's FlopCounterMode (2 FLOPs per multiply-add; "
             f"FLOPs, not MACs). Latency: this CPU, {torch.get_num_threads()} thread(s), median and "
             f"interquartile range per image at batch 1 and at batch {batch}. Early-exit thresholds were "
             "chosen on the validation split, never on test; their FLOPs are coarse + escalated share x "
             "(dcn - coarse).", "", goal_line(rows), "",
             "| " + " | ".join(HEADERS[c] for c in COLUMNS) + " |",
             "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(r, c) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_csv(rows: list[Row], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def plot(rows: list[Row], path: Path, title: str) -> dict:
    """Accuracy against FLOPs and against batch-1 latency, the Pareto front drawn; the plotted
    points are stored in the PNG's text chunk `fgvc-points` (returned too)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter

    markers = {"coarse": "s", "fine": "*", "fine-untrained": "X", "dcn": "o", "exit": "^"}
    points = {"labels": [r.path for r in rows], "top1": [r.top1 for r in rows],
              "gflops": [r.gflops for r in rows], "lat_b1_ms": [r.lat_b1_ms for r in rows]}
    fig = Figure(figsize=(12, 5))
    for ax, key, front_key, xlabel in ((fig.add_subplot(1, 2, 1), "gflops", "pareto_flops", "GFLOPs per image"),
                                       (fig.add_subplot(1, 2, 2), "lat_b1_ms", "pareto_latency",
                                        "CPU latency per image, batch 1 (ms)")):
        for kind, marker in markers.items():
            sel = [r for r in rows if r.kind == kind]
            if not sel:
                continue
            ax.scatter([getattr(r, key) for r in sel], [r.top1 for r in sel], marker=marker, s=60, label=kind)
        for r in rows:
            ax.annotate(r.path, (getattr(r, key), r.top1), fontsize=7, xytext=(3, 3), textcoords="offset points")
        front = sorted((getattr(r, key), r.top1) for r in rows if getattr(r, front_key))
        ax.plot([p[0] for p in front], [p[1] for p in front], "k--", lw=1, label="Pareto front")
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # minor log labels overlap
        ax.set_xlabel(xlabel)
        ax.set_ylabel("top-1 accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120, metadata={PNG_POINTS_KEY: json.dumps(points)})
    return points


def read_plot_points(path: Path) -> dict:
    from PIL import Image

    with Image.open(path) as img:
        return json.loads(img.text[PNG_POINTS_KEY])


def rich_table(rows: list[Row], title: str):
    from rich.table import Table

    table = Table(title=title)
    for name in ("path", "esc.", "top-1 %", "mca %", "GFLOPs", "params M", "ms b1 (IQR)", "ms/img batch (IQR)",
                 "Pareto"):
        table.add_column(name, justify="left" if name == "path" else "right")
    for r in rows:
        front = "/".join(n for n, on in (("FLOPs", r.pareto_flops), ("lat.", r.pareto_latency)) if on)
        table.add_row(r.path, cell(r, "escalated"), cell(r, "top1"), cell(r, "mean_class_acc"), cell(r, "gflops"),
                      cell(r, "params_m"), f"{r.lat_b1_ms:.2f} ({r.lat_b1_iqr_ms:.2f})",
                      f"{r.lat_batch_ms:.2f} ({r.lat_batch_iqr_ms:.2f})", front)
    return table


def write_report(rows: list[Row], out_dir: Path, header: str, batch: int) -> list[Path]:
    out_dir = Path(out_dir)
    paths = [out_dir / name for name in FILES]
    paths[0].write_text(markdown(rows, header, batch))
    write_csv(rows, paths[1])
    plot(rows, paths[2], header)
    return paths


# --- wiring a run folder -------------------------------------------------------------------------

def _eval_loaders(run, batch: int) -> tuple[DataLoader, DataLoader | None]:
    from fgvc.data.build import build_datasets

    data = build_datasets(run.cfg.data, run.cfg.seed, run.mean, run.std)
    loader = lambda ds: DataLoader(ds, batch_size=batch, shuffle=False, num_workers=0)  # noqa: E731
    return loader(data.test), (loader(data.val) if data.val is not None else None)


def report_run(run_dir: str | Path, fine_run: str | Path | None = None, ks: list[int] | None = None,
               shares: tuple[float, ...] = DEFAULT_SHARES, costs: tuple[float, ...] = DEFAULT_COSTS,
               thresholds: tuple[float, ...] = (), batch: int = 32, min_run_time: float = 0.5,
               console=None) -> list[Row]:
    """The report of a finished dcn run folder, written into it and printed."""
    from fgvc.engine.runs import load_run

    run = load_run(run_dir)
    test_loader, val_loader = _eval_loaders(run, batch)
    if val_loader is None and (shares or costs):
        print("note: the run has no validation split (data.val_fraction=0): only --thresholds are used.")
    fine_model = fine_loader = None
    fine_label = ""
    if fine_run is not None:
        fine = load_run(fine_run)
        same_data = (fine.cfg.data == run.cfg.data and fine.mean == run.mean and fine.std == run.std)
        fine_loader = test_loader if same_data else _eval_loaders(fine, batch)[0]
        fine_model, fine_label = fine.model, f"fine (whole image, run {Path(fine_run).name})"
    rows = coarse_fine_rows(run.model, test_loader, len(run.class_names), val_loader, ks=ks, shares=shares,
                            costs=costs, thresholds=thresholds, fine_model=fine_model,
                            fine_test_loader=fine_loader, fine_label=fine_label, batch=batch,
                            min_run_time=min_run_time)
    compared = (f"compared with the full-image run '{fine_run}'" if fine_run is not None else
                "compared with this model's fine network on the whole image (not trained for it; "
                "give --fine-run for a fair comparison)")
    header = f"run '{run_dir}', {compared}"
    paths = write_report(rows, Path(run_dir), header, batch)
    from rich.console import Console

    console = console or Console()
    console.print(rich_table(rows, f"coarse vs fine: {Path(run_dir).name}"))
    console.print(goal_line(rows))
    console.print(f"{compared}; written: {', '.join(str(p) for p in paths)}")
    return rows
