"""The synthetic benchmark: every `synth_` recipe, several seeds, one table a user reads first.

    python fgvc/benchmark.py synthetic --seeds 0 1 2 --out results/synthetic

trains each recipe with each seed through the real training path (`fgvc/train.py`, one process per
run), then measures every finished run the same way: test accuracy (mean ± std over seeds),
parameters, FLOPs and CPU latency per image, training time, and where the model looks (pointing
game of its class activation map and of its own attention map, and the part the CAM's peak lands on
most often). A second experiment trains a backbone on a *different* synthetic task (other classes,
other cue colours), then fine-tunes CBAM from it with `model.attention.init=default` and
`identity`, against the plain backbone fine-tuned the same way (`--identity`): does an identity start protect
pretrained features? Finished runs are reused, so an interrupted benchmark continues where it stopped.
With `--curve SIZES` the baseline (`--baseline`) is also trained at each input size: the plain
network's accuracy-vs-FLOPs curve (fgvc/analysis/plain_curve.py), the bar each method is read against
at its own FLOPs. Each finished run's figures are written to `<out>/runs/<run>.json` as it ends.
"""

from __future__ import annotations

import csv
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from fgvc.analysis.cost import count_flops, count_parameters, summarize, time_calls
from fgvc.analysis.localization import compare_table, localize_run
from fgvc.analysis.plain_curve import CURVE_FILE, accuracy_limits, draw_curve, label_log_axis, write_curve_csv
from fgvc.config import Recipe, flatten, keys_unread_by, load_recipe
from fgvc.data.build import build_datasets, delivered_side, make_loader
from fgvc.data.synthetic import SyntheticSpec, centred_box_coverage, class_part_keypoints, class_parts, ensure_synthetic
from fgvc.engine.runs import load_run
from fgvc.engine.threads import available_cores
from fgvc.errors import RunError
from fgvc.models.build import model_input
from fgvc.models.zoom import box_halves
from fgvc.provenance import ROOT, code_version, starting_weights

if TYPE_CHECKING:
    from matplotlib.figure import Figure

BASELINE = "synth_baseline"
METHODS = ["synth_baseline", "synth_se", "synth_cbam", "synth_residual", "synth_gate", "synth_stn",
           "synth_racnn", "synth_dcn", "synth_dcn_fine", "synth_vit"]
PRETRAIN_TASK = ["data.synthetic.num_classes=9", "data.synthetic.seed=101"]  # another task: other classes and colours
FINETUNE = [("plain from pretrained", "synth_baseline", []),
            ("cbam init=default from pretrained", "synth_cbam", ["model.attention.init=default"]),
            ("cbam init=identity from pretrained", "synth_cbam", ["model.attention.init=identity"])]
LATENCY_SECONDS = 0.5  # per model, batch 1, after training (blocked_autorange's minimum run time)
LOCALIZE_IMAGES = 48  # test images scored per run (seed 0 only)
OWN_MAP_PREFIX = ("se_", "cbam_", "residual_", "gate_", "stn_", "zoom", "dcn_", "cfvit_")


@dataclass
class RunRow:
    method: str
    seeds: list[int] = field(default_factory=list)
    top1: list[float] = field(default_factory=list)
    mean_class: list[float] = field(default_factory=list)
    train_time: list[float] = field(default_factory=list)
    params: int = 0
    flops: int = 0
    latency_ms: float = 0.0
    pointing_cam: float = float("nan")
    own_map: str = ""
    pointing_own: float = float("nan")
    top_part: str = ""
    named: dict[str, list[float]] = field(default_factory=dict)  # a multi-output model's other predictions
    weights: str = ""  # every network's starting weights (starting_weights)

    def add(self, seed: int, run_dir: Path) -> None:
        """Take one finished run's test accuracy (each named prediction's too: `top1_scale0`, ...) and
        training time."""
        m = json.loads((run_dir / "metrics.json").read_text())
        self.seeds.append(seed)
        self.top1.append(m["test"]["top1"])
        self.mean_class.append(m["test"]["mean_class_acc"])
        self.train_time.append(m["train_time_s"])
        for key, value in m["test"].items():
            if key.startswith("top1_"):
                self.named.setdefault(key.removeprefix("top1_"), []).append(value)


def recipe_difference(run_dir: Path, args: list[str]) -> tuple[str, object, object] | None:
    """(key, saved value, wanted value) of the first recipe key whose value in a run folder's
    recipe.yaml differs from what `args` would train now; None when they agree. The settings of a
    generated data set the run does not read (data.synthetic.* in a fractal run), the keys its
    model.arch does not read (model.dcn.* of a plain classifier: their defaults may have changed since)
    and how it was continued (train.resume) do not count."""
    from omegaconf import OmegaConf

    # a key added to the schema after the run was made counts as its default (which keeps old behaviour)
    a = flatten(OmegaConf.to_container(OmegaConf.structured(Recipe), resolve=True))
    a |= flatten(OmegaConf.to_container(OmegaConf.load(run_dir / "recipe.yaml"), resolve=True))
    b = flatten(OmegaConf.to_container(load_recipe(args), resolve=True))
    unused = tuple(f"data.{name}." for name in ("synthetic", "fractal") if name != b.get("data.name"))
    unused += ("train.resume",)  # a resumed run ends exactly as an uninterrupted one (tested)
    unused += keys_unread_by(b["model.arch"])  # sections (model.dcn: a prefix of its keys) and single keys
    key = next((k for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k) and not k.startswith(unused)), None)
    return None if key is None else (key, a.get(key), b.get(key))


def write_record(run_dir: Path, args: list[str], path: Path) -> None:
    """A finished run's figures (its metrics.json, the command-line settings that trained it and its
    resolved recipe) as one small JSON file, kept with the results so that they survive the run folder
    and work continues on another machine."""
    from omegaconf import OmegaConf

    record = {"args": args, "metrics": json.loads((run_dir / "metrics.json").read_text()),
              "recipe": OmegaConf.to_container(OmegaConf.load(run_dir / "recipe.yaml"), resolve=True)}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")


def train_run(recipe: str, seed: int, out: Path, extra: list[str], log, threads: int = 0,
              records: Path | None = None) -> Path:
    """Train one run unless it has finished already with the same recipe; returns its folder.
    `threads` > 0 sets the run's OMP_NUM_THREADS (several runs side by side); 0 leaves the cores to it.
    `records`: a folder where the finished run's figures are written as `<run folder name>.json`."""
    args = [f"recipe={recipe}", f"seed={seed}", f"output_dir={out}", *extra]
    if (out / "metrics.json").is_file():
        differs = recipe_difference(out, args)  # a finished run is reused only for the same recipe
        if differs is not None:
            key, saved, wanted = differs
            raise RunError(f"the finished run '{out}' has {key}={saved} but the benchmark now trains {key}={wanted}; "
                           "move the run away or give the benchmark another --runs folder.")
        log(f"reuse {out}")
        if records is not None and not (records / f"{out.name}.json").is_file():
            write_record(out, args, records / f"{out.name}.json")
        return out
    cmd = [sys.executable, str(ROOT / "fgvc" / "train.py"), *args]
    cmd += ["train.resume=auto"] if out.exists() else []
    log("run " + " ".join(cmd[1:]) + (f"  ({threads} thread{'s' * (threads > 1)})" if threads else ""))
    # idle OpenMP threads sleep instead of spinning: on a machine shared with other work a spinning
    # team waits for a thread that has no core (measured here: 17 against 68 images/s); same numbers
    env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ} | ({"OMP_NUM_THREADS": str(threads)} if threads else {})
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"training {recipe} seed {seed} failed:\n{proc.stderr[-3000:]}")
    if records is not None:
        write_record(out, args, records / f"{out.name}.json")
    return out


def train_all(plan: list[tuple[str, int, Path, list[str]]], jobs: int, log, records: Path | None = None) -> None:
    """Train (recipe, seed, folder, overrides) runs, `jobs` at a time, the machine's cores shared
    evenly between them (jobs = 1: one run at a time on every core, as `fgvc/train.py` runs alone).
    Every run is tried; the first failure is raised once all have ended, so finished runs are kept."""
    if jobs <= 1:
        for recipe, seed, out, extra in plan:
            train_run(recipe, seed, out, extra, log, records=records)
        return
    import threading
    from concurrent.futures import ThreadPoolExecutor

    threads = max(1, available_cores() // jobs)
    lock = threading.Lock()

    def log_line(line: str) -> None:  # print writes a line and its newline apart: one line at a time
        with lock:
            log(line)

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(train_run, recipe, seed, out, extra, log_line, threads, records)
                   for recipe, seed, out, extra in plan]
    errors = [f.exception() for f in futures if f.exception() is not None]
    if errors:
        raise errors[0]


def measure(run_dir: Path) -> tuple[int, int, float]:
    """Parameters, FLOPs per image (2 per multiply-add) and median CPU latency per image (batch 1)."""
    run = load_run(run_dir)
    side = delivered_side(run.cfg.data)  # the image the model receives (data.full_resolution)
    x = torch.randn(1, 3, side, side)
    flops = count_flops(run.model, x)
    latency = summarize(time_calls(run.model, x, LATENCY_SECONDS))
    return count_parameters(run.model), flops, latency.median_ms


def parts_inside(parts: Tensor, cx: Tensor, cy: Tensor, half_w: Tensor, half_h: Tensor) -> Tensor:
    """(B, P, 3) part keypoints (x, y, visible) and one box per image ((B,) centre, (B, 1) half sides,
    all in the image's pixels) -> (number of visible parts,) 1.0 where the part lies in its box."""
    hit = ((parts[..., 0] - cx[:, None]).abs() <= half_w) & ((parts[..., 1] - cy[:, None]).abs() <= half_h)
    return hit[parts[..., 2] > 0].float()


def model_boxes(model, x: Tensor) -> dict[str, tuple[Tensor, Tensor, Tensor, Tensor]]:
    """{name: (cx, cy, half_w, half_h)} in input pixels of the regions a model reads in detail: RA-CNN's
    zoom boxes, the spatial transformers' windows (theta's scale s and shift t: the window spans
    [t - s, t + s] of the [-1, 1] image); empty for other models."""
    side = x.shape[-1]
    stn = getattr(model, "stn", None)
    if stn is not None:
        theta = stn.localization(x)  # (B, N, 2, 3)
        return {f"window{n + 1}": ((theta[:, n, 0, 2] + 1) * side / 2, (theta[:, n, 1, 2] + 1) * side / 2,
                                   theta[:, n, 0, 0:1] * side / 2, theta[:, n, 1, 1:2] * side / 2)
                for n in range(theta.shape[1])}
    boxes = getattr(model(x), "boxes", None)  # RA-CNN: (B, 3) cx, cy, half side (rollout: (B, 4)) per zoom
    if boxes is None:
        return {}
    return {f"zoom{z}": (box[:, 0], box[:, 1], *box_halves(box)) for z, box in enumerate(boxes, 1)}


@torch.no_grad()
def part_coverage(run_dir: Path) -> dict[str, float]:
    """RA-CNN's zooms and the spatial transformer's windows: the share of visible class-carrying
    parts (beak, wings) inside each region, over the test split; next to a region of the same size
    centred in the image (the baseline a zoom or window must beat to have found something)."""
    run = load_run(run_dir)
    data = build_datasets(run.cfg.data, run.cfg.seed, run.mean, run.std)
    cols = [data.index.part_names.index(p) for p in class_parts(run.cfg.data.synthetic.wing_cue)]
    inside: dict[str, list[Tensor]] = {}
    centre = delivered_side(run.cfg.data) / 2  # boxes and parts are in the delivered image's pixels
    for batch in make_loader(data.test, run.cfg.train.batch_size, 0, False):
        parts = batch["parts"][:, cols]  # (B, P, 3)
        for name, (cx, cy, half_w, half_h) in model_boxes(run.model, model_input(run.model, batch["image"])).items():
            inside.setdefault(name, []).append(parts_inside(parts, cx, cy, half_w, half_h))
            centred = torch.full_like(cx, centre)
            inside.setdefault(f"{name} centred baseline", []).append(parts_inside(parts, centred, centred, half_w, half_h))
    return {name: torch.cat(v).mean().item() for name, v in inside.items()}


def set_coverage(recipe: str, overrides: list[str], boxes: list[float]) -> str:
    """How often a box centred in the written image, of each side in `boxes` (fractions of the image
    side), holds the visible class parts of the recipe's synthetic set (test split), from the set's
    part keypoints alone (no model): the share a zoom must beat to have found the part. A markdown table."""
    cfg = load_recipe([f"recipe={recipe}", *overrides])
    spec = SyntheticSpec(**cfg.data.synthetic)
    parts = class_part_keypoints(ensure_synthetic(Path(cfg.data.root), spec), spec.wing_cue, "test")
    seen = int((parts[..., 2] > 0).any(axis=1).sum())
    lines = [f"{len(parts)} test images of `{' '.join([recipe, *overrides])}`, {seen} with a visible class part "
             f"({', '.join(class_parts(spec.wing_cue))}), the share of those counted", "",
             "| centred box side | test images holding their class parts |",
             "|---:|---:|"]
    side = spec.image_size
    lines += [f"| {b:.3f} of {side} px | {100 * centred_box_coverage(parts, side, b * side):.1f}% |" for b in boxes]
    return "\n".join(lines)


def looks(report: dict) -> tuple[float, str, float, str]:
    """CAM pointing game, the method's own map and its pointing game, and CAM's most hit part."""
    sources = report["sources"]
    cam = sources.get("cam", {})
    own = [s for s in sources if s.startswith(OWN_MAP_PREFIX)]
    own_name = own[-1] if own else ""
    hits = cam.get("part_hits", {})
    top_part = max(hits, key=lambda p: hits[p] if hits[p] == hits[p] else -1) if hits else ""
    return (cam.get("pointing", float("nan")), own_name,
            sources[own_name].get("pointing", float("nan")) if own_name else float("nan"), top_part)


def mean_std_text(values: list[float], scale: float = 100.0) -> str:
    """"mean ± std" of `values` in percent (one decimal); "–" for none."""
    if not values:
        return "–"
    mean = statistics.fmean(values) * scale
    std = statistics.stdev(values) * scale if len(values) > 1 else 0.0
    return f"{mean:.1f} ± {std:.1f}"


def curve_folder(runs_dir: Path, baseline: str, size: int, own_size: int, seed: int) -> Path:
    """The run folder of the plain curve's point at input `size`: the baseline's own run at its own
    input size (one run, not two), `<baseline>-<size>px-s<seed>` at the others."""
    return runs_dir / (f"{baseline}-s{seed}" if size == own_size else f"{baseline}-{size}px-s{seed}")


@dataclass
class CurvePoint:
    """The plain network at one input size: test top-1 of each seed, FLOPs per image."""
    size: int
    flops: int
    seeds: list[int]
    top1: list[float]  # fractions
    test_images: int

    @property
    def mean(self) -> float:
        return 100 * statistics.fmean(self.top1)

    @property
    def se(self) -> float:
        """Standard error of the mean top-1 in points: over seeds (std / sqrt(n)); for one seed the
        binomial one of the test split, sqrt(p (1 - p) / N)."""
        if len(self.top1) > 1:
            return 100 * statistics.stdev(self.top1) / len(self.top1) ** 0.5
        p = self.top1[0]
        return 100 * (p * (1 - p) / max(self.test_images, 1)) ** 0.5


def curve_at(curve: list[CurvePoint], flops: float) -> float:
    """The plain curve's top-1 (points) at `flops`, linear in log FLOPs between its points; nan
    outside its range (no extrapolation)."""
    pts = sorted((c.flops, c.mean) for c in curve)
    for (f0, a0), (f1, a1) in zip(pts, pts[1:]):
        if f0 <= flops <= f1:
            return a0 if f1 == f0 else a0 + (a1 - a0) * (math.log(flops) - math.log(f0)) / (math.log(f1) - math.log(f0))
    return pts[0][1] if pts and flops == pts[0][0] else float("nan")


def run_benchmark(seeds: list[int], out: Path, runs_dir: Path, overrides: list[str], methods: list[str],
                  command: str, identity_experiment: bool = False, jobs: int = 1, log=print,
                  baseline: str = BASELINE, curve: list[int] | None = None) -> list[RunRow]:
    """`command`: the command line printed on the page. The runs are trained first, `jobs` at a time:
    the baseline's seeds, then the plain curve (`baseline` at each input size of `curve`, seed by
    seed), then the methods seed by seed (so an interrupted benchmark has whole pairs); then every
    finished run is measured. Each finished run's figures go to `out/runs/<run>.json` as it ends."""
    out.mkdir(parents=True, exist_ok=True)

    source = code_version()  # what trained the runs: taken before hours of work, not after
    records = out / "runs"
    own_size = load_recipe([f"recipe={baseline}", *overrides]).data.image_size
    sizes = sorted(set(curve or []))
    order = [(m, s) for s in seeds for m in methods if m == baseline]
    plan = [(m, s, runs_dir / f"{m}-s{s}", overrides) for m, s in order]
    plan += [(baseline, s, curve_folder(runs_dir, baseline, size, own_size, s), overrides + [f"data.image_size={size}"])
             for s in seeds for size in sizes if size != own_size or baseline not in methods]
    plan += [(m, s, runs_dir / f"{m}-s{s}", overrides) for s in seeds for m in methods if m != baseline]
    train_all(plan, jobs, log, records)
    rows, reports = [], []
    for method in methods:
        row = RunRow(method)
        for seed in seeds:
            row.add(seed, runs_dir / f"{method}-s{seed}")
        first = runs_dir / f"{method}-s{seeds[0]}"
        row.params, row.flops, row.latency_ms = measure(first)
        row.weights = starting_weights(first)
        reports.append(localize_run(first, out_dir=out / "localization" / method, num_images=LOCALIZE_IMAGES, draw=4))
        row.pointing_cam, row.own_map, row.pointing_own, row.top_part = looks(reports[-1])
        rows.append(row)
        log(f"{method}: top-1 {mean_std_text(row.top1)}")
    points = []
    for size in sizes:
        folders = [curve_folder(runs_dir, baseline, size, own_size, s) for s in seeds]
        metrics = [json.loads((f / "metrics.json").read_text()) for f in folders]
        cfg = load_recipe([f"recipe={baseline}", *overrides])
        test_images = cfg.data.synthetic.num_classes * cfg.data.synthetic.test_per_class
        points.append(CurvePoint(size, measure(folders[0])[1], list(seeds), [m["test"]["top1"] for m in metrics],
                                 test_images))

    finetune_rows = []
    if identity_experiment:
        pre = train_run("synth_baseline", seeds[0], runs_dir / "pretrain-other-task", overrides + PRETRAIN_TASK, log)
        weights = backbone_weights(pre)
        plan = [(recipe, seed, runs_dir / f"finetune-{recipe}-{extra[0].split('=')[-1] if extra else 'plain'}-s{seed}",
                 overrides + extra + [f"model.weights={weights}"]) for _, recipe, extra in FINETUNE for seed in seeds]
        train_all(plan, jobs, log)
        for i, (label, _, _) in enumerate(FINETUNE):
            row = RunRow(label)
            for _, seed, folder, _ in plan[i * len(seeds):(i + 1) * len(seeds)]:
                row.add(seed, folder)
            finetune_rows.append(row)
    coverage = {(m, seed): part_coverage(runs_dir / f"{m}-s{seed}") for m in methods for seed in seeds
                if "racnn" in m or "stn" in m}
    write_outputs(rows, finetune_rows, seeds, out, source, coverage, command, baseline, points)
    (out / "localization" / "README.md").write_text(
        f"# Where the synthetic models look (seed {seeds[0]}, {LOCALIZE_IMAGES} test images)\n\n"
        "Made by the synthetic benchmark (see ../README.md for the command). Every map source of every "
        "method, against the uniform random and centred Gaussian baselines; `pointing_class_parts` counts "
        "only the parts that carry the class (beak, wings). Pictures: `<method>/grid_*.png`, "
        "`<method>/index.html`.\n\n" + compare_table(reports, methods))
    return rows + finetune_rows


def backbone_weights(run_dir: Path) -> Path:
    """The pretrained run's timm network as a plain timm state dict (its classifier included: loading
    through `model.weights` skips the classifier, which has another number of classes)."""
    from safetensors.torch import load_file, save_file

    path = run_dir / "backbone.safetensors"
    if not path.is_file():
        state = load_file(str(run_dir / "model.safetensors"))
        save_file({k.removeprefix("net."): v for k, v in state.items() if k.startswith("net.")}, str(path))
    return path


def paired_table(rows: list[RunRow], baseline: str = BASELINE) -> list[str]:
    """Each method against the baseline trained with the same seed: mean difference of test top-1 ±
    its std over seeds, and on how many seeds the method is ahead (ties count for neither)."""
    base = next((r for r in rows if r.method == baseline), None)
    if base is None or len(rows) < 2:
        return []
    by_seed = dict(zip(base.seeds, base.top1))
    lines = ["", f"## Paired with `{baseline}` (same seed)", "",
             "Test top-1 of the method minus the baseline's, per seed: mean ± std over seeds, and the seeds "
             "on which the method is ahead.", "",
             "| method | difference (points) | seeds won | per seed (points) |", "|---|---:|---:|---|"]
    for r in rows:
        if r is base:
            continue
        diffs = [100 * (t - by_seed[s]) for s, t in zip(r.seeds, r.top1) if s in by_seed]
        if not diffs:
            continue
        std = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
        won = sum(d > 0 for d in diffs)
        lines.append(f"| `{r.method}` | {statistics.fmean(diffs):+.1f} ± {std:.1f} | {won} of {len(diffs)} | "
                     + " ".join(f"{d:+.1f}" for d in diffs) + " |")
    return lines


def curve_table(rows: list[RunRow], curve: list[CurvePoint], baseline: str) -> list[str]:
    """The plain network's accuracy-vs-FLOPs curve, and each method against the curve at its own FLOPs."""
    if not curve:
        return []
    lines = ["", f"## The plain network's accuracy-vs-FLOPs curve (`{baseline}` at each input size)", "",
             "The bar a method must pass: the plain network given more pixels. Test top-1 mean ± standard error "
             "over seeds (one seed: the test split's binomial standard error); FLOPs per image of the seed-"
             f"{curve[0].seeds[0]} model. Curve: `{CURVE_FILE}`.", "",
             "| input px | MFLOPs / image | top-1 % | standard error | per seed |", "|---:|---:|---:|---:|---|"]
    lines += [f"| {c.size} | {c.flops / 1e6:.1f} | {c.mean:.2f} | {c.se:.2f} | "
              + " ".join(f"{100 * t:.2f}" for t in c.top1) + " |" for c in curve]
    lines += ["", "Each method against the curve at its own FLOPs (linear in log FLOPs between the curve's points; "
              "– outside its range):", "",
              "| method | MFLOPs / image | top-1 % | curve at its FLOPs % | above the curve (points) |",
              "|---|---:|---:|---:|---:|"]
    for r in rows:
        at = curve_at(curve, r.flops)
        mean = 100 * statistics.fmean(r.top1)
        lines.append(f"| `{r.method}` | {r.flops / 1e6:.1f} | {mean:.2f} | {'–' if at != at else f'{at:.2f}'} | "
                     f"{'–' if at != at else f'{mean - at:+.2f}'} |")
    return lines


def write_outputs(rows: list[RunRow], finetune: list[RunRow], seeds: list[int], out: Path, source: str,
                  coverage: dict[tuple[str, int], dict[str, float]], command: str, baseline: str = BASELINE,
                  curve: list[CurvePoint] | None = None) -> None:
    header = ["# Synthetic benchmark", "",
              f"Command: `{command}`  ",
              f"Date: {datetime.date.today().isoformat()}, {source}, "
              f"machine: {platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}, "
              f"Python {platform.python_version()}.  ",
              f"Test split of the synthetic set; accuracy as mean ± std over seeds {seeds} (the plot: ± standard error); "
              f"cost of the seed-{seeds[0]} "
              f"model (FLOPs = 2 per multiply-add, torch's FlopCounterMode; latency: median, batch 1, CPU); "
              f"pointing game on {LOCALIZE_IMAGES} test images (peak within 0.1 × box diagonal of a visible part).", ""]
    table = ["| method | top-1 % | mean class % | params | MFLOPs / image | latency ms / image | train time s | "
             "pointing (CAM) | own map | pointing (own) | CAM peak most often on |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---|"]
    for r in rows:
        table.append(f"| {r.method} | {mean_std_text(r.top1)} | {mean_std_text(r.mean_class)} | {r.params / 1e6:.3f} M | "
                     f"{r.flops / 1e6:.1f} | {r.latency_ms:.2f} | {statistics.fmean(r.train_time):.1f} | "
                     f"{r.pointing_cam:.2f} | {r.own_map or '–'} | "
                     f"{'–' if r.pointing_own != r.pointing_own else f'{r.pointing_own:.2f}'} | {r.top_part or '–'} |")
    lines = header + table + paired_table(rows, baseline) + curve_table(rows, curve or [], baseline)
    lines += ["", "## Starting weights of every network (seed-0 run's recipe)", "", "| method | starting weights |", "|---|---|"]
    lines += [f"| `{r.method}` | {r.weights or '–'} |" for r in rows]
    for r in rows:
        if r.named:
            names = list(r.named)
            lines += ["", f"## Each prediction of {r.method} (test top-1 % per seed)", "",
                      "| seed | final | " + " | ".join(names) + " |", "|---|---:|" + "---:|" * len(names)]
            lines += [f"| {seed} | {100 * r.top1[i]:.2f} | " + " | ".join(f"{100 * r.named[n][i]:.2f}" for n in names) + " |"
                      for i, seed in enumerate(r.seeds)]
    for method in dict.fromkeys(m for m, _ in coverage):
        per_seed = {seed: cov for (m, seed), cov in coverage.items() if m == method}
        names = list(next(iter(per_seed.values())))
        lines += ["", f"## Where the zooms or windows of {method} go (test split)", "",
                  "Share of the visible class-carrying parts (`fgvc.data.synthetic.class_parts`: beak and wings, the "
                  "wings alone with `wing_cue=texture`) inside each zoom's box or transformer's window, against a "
                  "region of the same size centred in the image (`fgvc.bench.synthetic.part_coverage`).", "",
                  "| seed | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
        lines += [f"| {seed} | " + " | ".join(f"{100 * cov[n]:.1f}%" for n in names) + " |" for seed, cov in per_seed.items()]
    if finetune:
        lines += ["", "## Identity start from a backbone pretrained on another synthetic task", "",
                  f"`synth_baseline` trained on a different task ({' '.join(PRETRAIN_TASK)}), its backbone then "
                  "fine-tuned on the benchmark task (`model.weights=`).", "",
                  "| fine-tuned | top-1 % | mean class % |", "|---|---:|---:|"]
        lines += [f"| {r.method} | {mean_std_text(r.top1)} | {mean_std_text(r.mean_class)} |" for r in finetune]
    lines += ["", "Pictures: `localization/<method>/grid_000.png` (and `index.html` there); plot: `accuracy_vs_flops.png`."]
    (out / "README.md").write_text("\n".join(lines) + "\n")

    with open(out / "results.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "seeds", "top1_mean", "top1_std", "mean_class_mean", "params", "flops", "latency_ms",
                    "train_time_s", "pointing_cam", "own_map", "pointing_own", "top_part"])
        for r in rows + finetune:
            w.writerow([r.method, " ".join(map(str, r.seeds)), statistics.fmean(r.top1),
                        statistics.stdev(r.top1) if len(r.top1) > 1 else 0.0, statistics.fmean(r.mean_class),
                        r.params, r.flops, r.latency_ms, statistics.fmean(r.train_time), r.pointing_cam, r.own_map,
                        r.pointing_own, r.top_part])

    if curve:
        write_curve_csv([(c.size, c.flops, c.mean, c.se, c.seeds, [100 * t for t in c.top1]) for c in curve], out / CURVE_FILE)
    plot_accuracy_vs_flops([(r.method, r.flops, 100 * statistics.fmean(r.top1),
                             100 * statistics.stdev(r.top1) / len(r.top1) ** 0.5 if len(r.top1) > 1 else 0.0) for r in rows],
                           out / "accuracy_vs_flops.png",
                           curve=[(c.size, c.flops, c.mean, c.se) for c in curve or []])


def plot_accuracy_vs_flops(points: list[tuple[str, float, float, float]], path: Path,
                           curve: list[tuple[int, float, float, float]] | None = None) -> Figure:
    """(method, FLOPs per image, mean top-1 %, standard error %) per method -> a PNG; `curve`: the
    plain network's (input size, FLOPs, mean top-1 %, standard error %) per input size, drawn as a
    line (the bar a method must pass at its cost), each point marked with its input size. Error bars
    are cut at 0 and 100 (accuracy cannot pass them); the accuracy axis spans at least
    MIN_ACCURACY_SPAN points. Methods are named in a legend beside the axes, since labels next to
    points that share a cost overlap."""
    from matplotlib.figure import Figure  # no pyplot: the figure is never shown, only saved (and returned)

    fig = Figure(figsize=(8, 4.5))
    ax = fig.add_subplot()
    lows, highs = draw_curve(ax, curve, 1e6) if curve else ([], [])
    for method, flops, mean, se in points:
        below, above = min(se, mean), min(se, 100 - mean)
        ax.errorbar(flops / 1e6, mean, yerr=[[below], [above]], fmt="o", capsize=3,
                    label=method.removeprefix("synth_"), zorder=2)
        lows.append(mean - below)
        highs.append(mean + above)
    label_log_axis(ax)
    ax.set_ylim(*accuracy_limits(lows, highs))
    ax.set_xlabel("MFLOPs per image (log)")
    ax.set_ylabel("test top-1 % (± standard error)")
    ax.set_title("synthetic benchmark: accuracy against FLOPs")
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return fig
