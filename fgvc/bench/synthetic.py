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
"""

from __future__ import annotations

import csv
import datetime
import json
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
from fgvc.bench.source import ROOT, code_version
from fgvc.config import Recipe, flatten, keys_unread_by, load_recipe
from fgvc.data.build import build_datasets, delivered_side, make_loader
from fgvc.data.synthetic import class_parts
from fgvc.engine.runs import load_run
from fgvc.engine.threads import available_cores
from fgvc.errors import RunError
from fgvc.models.build import model_input
from fgvc.models.zoom import box_halves

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


def train_run(recipe: str, seed: int, out: Path, extra: list[str], log, threads: int = 0) -> Path:
    """Train one run unless it has finished already with the same recipe; returns its folder.
    `threads` > 0 sets the run's OMP_NUM_THREADS (several runs side by side); 0 leaves the cores to it."""
    args = [f"recipe={recipe}", f"seed={seed}", f"output_dir={out}", *extra]
    if (out / "metrics.json").is_file():
        differs = recipe_difference(out, args)  # a finished run is reused only for the same recipe
        if differs is not None:
            key, saved, wanted = differs
            raise RunError(f"the finished run '{out}' has {key}={saved} but the benchmark now trains {key}={wanted}; "
                           "move the run away or give the benchmark another --runs folder.")
        log(f"reuse {out}")
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
    return out


def train_all(plan: list[tuple[str, int, Path, list[str]]], jobs: int, log) -> None:
    """Train (recipe, seed, folder, overrides) runs, `jobs` at a time, the machine's cores shared
    evenly between them (jobs = 1: one run at a time on every core, as `fgvc/train.py` runs alone).
    Every run is tried; the first failure is raised once all have ended, so finished runs are kept."""
    if jobs <= 1:
        for recipe, seed, out, extra in plan:
            train_run(recipe, seed, out, extra, log)
        return
    import threading
    from concurrent.futures import ThreadPoolExecutor

    threads = max(1, available_cores() // jobs)
    lock = threading.Lock()

    def log_line(line: str) -> None:  # print writes a line and its newline apart: one line at a time
        with lock:
            log(line)

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(train_run, recipe, seed, out, extra, log_line, threads) for recipe, seed, out, extra in plan]
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


@torch.no_grad()
def zoom_part_coverage(run_dir: Path) -> dict[str, float]:
    """RA-CNN: the share of visible class-carrying parts (beak, wings) that lie inside each zoom's
    box, over the test split; next to a centred box of the same size per image (the baseline a
    zoom must beat to have found something)."""
    run = load_run(run_dir)
    data = build_datasets(run.cfg.data, run.cfg.seed, run.mean, run.std)
    cols = [data.index.part_names.index(p) for p in class_parts(run.cfg.data.synthetic.wing_cue)]
    inside: dict[str, list[Tensor]] = {}
    centre = delivered_side(run.cfg.data) / 2  # boxes and parts are in the delivered image's pixels
    for batch in make_loader(data.test, run.cfg.train.batch_size, 0, False):
        out = run.model(model_input(run.model, batch["image"]))
        parts = batch["parts"][:, cols]  # (B, P, 3)
        visible = parts[..., 2] > 0
        for z, box in enumerate(out.boxes, 1):  # (B, 3) cx, cy, half side (rollout: (B, 4)) in input pixels
            for name, (cx, cy) in ((f"zoom{z}", (box[:, 0], box[:, 1])),
                                   (f"zoom{z} centred baseline", (torch.full_like(box[:, 0], centre),) * 2)):
                half_w, half_h = box_halves(box)  # (B, 1) each
                hit = ((parts[..., 0] - cx[:, None]).abs() <= half_w) & \
                      ((parts[..., 1] - cy[:, None]).abs() <= half_h)
                inside.setdefault(name, []).append(hit[visible].float())
    return {name: torch.cat(v).mean().item() for name, v in inside.items()}


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


def run_benchmark(seeds: list[int], out: Path, runs_dir: Path, overrides: list[str], methods: list[str],
                  command: str, identity_experiment: bool = False, jobs: int = 1, log=print) -> list[RunRow]:
    """`command`: the command line printed on the page. The runs are trained first, `jobs` at a time:
    the baseline's seeds, then the methods seed by seed (so an interrupted benchmark has whole pairs);
    then every finished run is measured."""
    out.mkdir(parents=True, exist_ok=True)

    source = code_version()  # what trained the runs: taken before hours of work, not after
    order = [(m, s) for s in seeds for m in methods if m == BASELINE] + [(m, s) for s in seeds for m in methods if m != BASELINE]
    train_all([(m, s, runs_dir / f"{m}-s{s}", overrides) for m, s in order], jobs, log)
    rows, reports = [], []
    for method in methods:
        row = RunRow(method)
        for seed in seeds:
            row.add(seed, runs_dir / f"{method}-s{seed}")
        first = runs_dir / f"{method}-s{seeds[0]}"
        row.params, row.flops, row.latency_ms = measure(first)
        reports.append(localize_run(first, out_dir=out / "localization" / method, num_images=LOCALIZE_IMAGES, draw=4))
        row.pointing_cam, row.own_map, row.pointing_own, row.top_part = looks(reports[-1])
        rows.append(row)
        log(f"{method}: top-1 {mean_std_text(row.top1)}")

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
    coverage = {m: zoom_part_coverage(runs_dir / f"{m}-s{seeds[0]}") for m in methods if "racnn" in m}
    write_outputs(rows, finetune_rows, seeds, out, source, coverage, command)
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


def paired_table(rows: list[RunRow]) -> list[str]:
    """Each method against the baseline trained with the same seed: mean difference of test top-1 ±
    its std over seeds, and on how many seeds the method is ahead (ties count for neither)."""
    base = next((r for r in rows if r.method == BASELINE), None)
    if base is None or len(rows) < 2:
        return []
    by_seed = dict(zip(base.seeds, base.top1))
    lines = ["", f"## Paired with `{BASELINE}` (same seed)", "",
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


def write_outputs(rows: list[RunRow], finetune: list[RunRow], seeds: list[int], out: Path, source: str,
                  coverage: dict[str, dict[str, float]], command: str) -> None:
    header = ["# Synthetic benchmark", "",
              f"Command: `{command}`  ",
              f"Date: {datetime.date.today().isoformat()}, {source}, "
              f"machine: {platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}, "
              f"Python {platform.python_version()}.  ",
              f"Test split of the synthetic set; accuracy as mean ± std over seeds {seeds}; cost of the seed-{seeds[0]} "
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
    lines = header + table + paired_table(rows)
    for r in rows:
        if r.named:
            names = list(r.named)
            lines += ["", f"## Each prediction of {r.method} (test top-1 % per seed)", "",
                      "| seed | final | " + " | ".join(names) + " |", "|---|---:|" + "---:|" * len(names)]
            lines += [f"| {seed} | {100 * r.top1[i]:.2f} | " + " | ".join(f"{100 * r.named[n][i]:.2f}" for n in names) + " |"
                      for i, seed in enumerate(r.seeds)]
    for method, cov in coverage.items():
        lines += ["", f"## Where the zooms of {method} go (seed {seeds[0]}, test split)", "",
                  "Share of the visible class-carrying parts (`fgvc.data.synthetic.class_parts`: beak and wings, the "
                  "wings alone with `wing_cue=texture`) inside each zoom's box, against a "
                  "box of the same size centred in the image.", "", "| box | parts inside |", "|---|---:|"]
        lines += [f"| {name} | {100 * v:.1f}% |" for name, v in cov.items()]
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

    plot_accuracy_vs_flops([(r.method, r.flops, 100 * statistics.fmean(r.top1),
                             100 * statistics.stdev(r.top1) if len(r.top1) > 1 else 0.0) for r in rows],
                           out / "accuracy_vs_flops.png")


def plot_accuracy_vs_flops(points: list[tuple[str, float, float, float]], path: Path) -> Figure:
    """(method, FLOPs per image, mean top-1 %, std %) per method -> a PNG. The axis stops at 100%
    and error bars are cut at 0 and 100 (accuracy cannot pass them); methods are named in a legend
    beside the axes, since labels next to points that share a cost overlap."""
    from matplotlib.figure import Figure  # no pyplot: the figure is never shown, only saved (and returned)

    fig = Figure(figsize=(8, 4.5))
    ax = fig.add_subplot()
    for method, flops, mean, std in points:
        below, above = min(std, mean), min(std, 100 - mean)
        ax.errorbar(flops / 1e6, mean, yerr=[[below], [above]], fmt="o", capsize=3,
                    label=method.removeprefix("synth_"))
    ax.set_xscale("log")
    ax.set_ylim(top=100)
    ax.set_xlabel("MFLOPs per image (log)")
    ax.set_ylabel("test top-1 %")
    ax.set_title("synthetic benchmark: accuracy against FLOPs")
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return fig
