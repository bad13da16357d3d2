"""Benchmarks:

    python fgvc/benchmark.py attention [--batch 8] [--out results/attention_benchmark.md]
    python fgvc/benchmark.py synthetic [--seeds 0 1 2] [--out results/synthetic] [--set key=value ...]
                                       [--baseline synth_roam_baseline --curve 96 128 160 192]
    python fgvc/benchmark.py train [--recipe synth_baseline] [--epochs 6] [--out results/train_speed.md]
    python fgvc/benchmark.py data [--images 64] [--rounds 5] [--out results/data_speed.md]
    python fgvc/benchmark.py recipes [--recipes cub_cbam ...] [--set key=value ...] [--out results/recipes.md]
    python fgvc/benchmark.py pretrain [--out weights] [--runs runs/pretrain] [--set key=value ...]
    python fgvc/benchmark.py backbones [--families ViT "Swin v1" ...] [--work runs/backbones] [--out results/backbones.md]
    python fgvc/benchmark.py coverage [--recipe synth_roam_baseline] [--boxes 0.444 0.667] [--set key=value ...]
    python fgvc/benchmark.py step-time [--recipe synth_roam_baseline] [--sizes 96 128 160 192] [--set key=value ...]
    python fgvc/benchmark.py timm --timm-train PATH/TO/timm/train.py [--rounds 3] [--epochs 3] [--out results/timm_speed.md]

Each command is measured in its module of fgvc/bench/: `attention` in attention.py (with
fgvc/analysis/cost.py's counter and timer), `synthetic` in synthetic.py, `train` in train_speed.py,
`data` in data_speed.py, `recipes` in recipes.py, `pretrain` in pretrain.py, `timm` (fgvc's loop
against timm's train.py) in timm_speed.py, `backbones` (every backbone family x every
feature on tiny timm models) in backbones.py, `coverage` in synthetic.py, `step-time` in train_speed.py.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file (python fgvc/benchmark.py): see fgvc/_script.py
    import _script  # noqa: F401

from fgvc.errors import cli_main


def write_table(table: str, title: str, out: str, argv: list[str] | None) -> None:
    """Print a benchmark's table; with --out also write it, with the command that made it."""
    print(table)
    if out:
        command = "python fgvc/benchmark.py " + shlex.join(sys.argv[1:] if argv is None else argv)
        from fgvc.safe_io import make_folder, write_text

        make_folder(Path(out).parent)
        write_text(out, f"# {title}\n\nCommand: `{command}`\n\n{table}\n")


@cli_main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fgvc/benchmark.py", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    att = sub.add_parser("attention", help="parameters, FLOPs and latency of every attention method in ResNet-50")
    att.add_argument("--batch", type=int, default=8)
    att.add_argument("--rounds", type=int, default=3, help="alternating timing rounds over all models")
    att.add_argument("--min-run-time", type=float, default=1.0, help="seconds per model per round")
    att.add_argument("--out", default="", help="also write the tables to this markdown file")
    syn = sub.add_parser("synthetic", help="every synth_ recipe x seeds: accuracy, cost, localization table")
    syn.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    syn.add_argument("--out", default="results/synthetic")
    syn.add_argument("--runs", default="runs/bench", help="where the benchmark's run folders go (reused)")
    syn.add_argument("--methods", nargs="+", default=None, help="a subset of the synth_ recipes")
    syn.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                     help="recipe overrides for every run (e.g. a tiny budget)")
    syn.add_argument("--identity", action="store_true",
                     help="also the identity-init experiment (a backbone trained on another synthetic task, then "
                          "CBAM fine-tuned from it with init=default and identity)")
    syn.add_argument("--baseline", default="synth_baseline",
                     help="the plain recipe the methods are paired with (same seed) and the curve is made of")
    syn.add_argument("--curve", type=int, nargs="*", default=[], metavar="SIZE",
                     help="also train the baseline at these input sizes (data.image_size): the plain network's "
                          "accuracy-vs-FLOPs curve, drawn in the plot and written to plain_curve.csv")
    syn.add_argument("--jobs", type=int, default=1,
                     help="runs trained side by side, the cores shared between them (1: one run on every core, "
                          "whose numbers equal `fgvc/train.py` run alone)")
    spd = sub.add_parser("train", help="images/s of the real training path against a bare loop and the data alone")
    spd.add_argument("--recipe", default="synth_baseline")
    spd.add_argument("--epochs", type=int, default=6, help="epochs of each timed path, the first not counted")
    spd.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    spd.add_argument("--out", default="", help="also write the table to this markdown file")
    spd.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    spd.add_argument("--fake-images", type=int, default=0,
                     help="time a real recipe on a fake copy of its data set with this many training images")
    tim = sub.add_parser("timm", help="images/s of fgvc's training loop against timm's train.py, same data and settings")
    tim.add_argument("--timm-train", required=True, metavar="PATH", help="timm's train.py (not part of fgvc)")
    tim.add_argument("--rounds", type=int, default=3, help="alternating rounds, each one run of both tools")
    tim.add_argument("--epochs", type=int, default=3, help="epochs of each run, the first not counted")
    tim.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of both tools")
    tim.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="synth_baseline overrides for both")
    tim.add_argument("--runs", default="runs/timm_speed", help="the runs, their logs and the ImageFolder view")
    tim.add_argument("--source", default="", help="where the train.py comes from, written on the page")
    tim.add_argument("--out", default="", help="also write the page to this markdown file")
    rec = sub.add_parser("recipes", help="every real recipe at its real size: 2 steps + 1 evaluation batch, CPU")
    rec.add_argument("--recipes", nargs="+", default=None, help="a subset of the cub_/cars_/aircraft_/nabirds_ recipes")
    rec.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for every recipe")
    rec.add_argument("--timeout", type=float, default=3600, help="seconds per recipe")
    rec.add_argument("--out", default="results/recipes.md")
    rec.add_argument("--keep", default="results/recipes", help="finished recipes' rows, reused by the next run")
    rec.add_argument("--fresh", action="store_true", help="measure every recipe again (ignore --keep)")
    dat = sub.add_parser("data", help="images/s of one loading process at 448 px, and workers per GPU")
    dat.add_argument("--images", type=int, default=64, help="JPEGs per image size")
    dat.add_argument("--rounds", type=int, default=5, help="timing rounds (their median is reported)")
    dat.add_argument("--out", default="results/data_speed.md")
    pre = sub.add_parser("pretrain", help="fractal-pretrain every backbone the synth_ recipes use; write safetensors")
    pre.add_argument("--out", default="weights", help="where the .safetensors, .sha256 and README.md go")
    pre.add_argument("--runs", default="runs/pretrain", help="where the pretraining run folders go (reused)")
    pre.add_argument("--backbones", nargs="+", default=None, help="a subset (default: every synth_ backbone)")
    pre.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides (e.g. a tiny budget)")
    bbs = sub.add_parser("backbones", help="every backbone family x every feature (train, maps, tools) on tiny models")
    bbs.add_argument("--families", nargs="+", default=None, help="a subset of the family names (default: all)")
    bbs.add_argument("--work", default="runs/backbones", help="where the tiny runs go (replaced)")
    bbs.add_argument("--out", default="results/backbones.md")
    cov = sub.add_parser("coverage", help="how often a centred box holds the class parts of a synthetic set (no model)")
    cov.add_argument("--recipe", default="synth_roam_baseline")
    cov.add_argument("--boxes", type=float, nargs="+", default=[4 / 9, 2 / 3],
                     help="box sides as fractions of the written image's side (RA-CNN's floors: 4/9 and 2/3)")
    cov.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    cov.add_argument("--out", default="", help="also write the table to this markdown file")
    stp = sub.add_parser("step-time", help="seconds per training step of a synth_ recipe's network at several input sizes")
    stp.add_argument("--recipe", default="synth_roam_baseline")
    stp.add_argument("--sizes", type=int, nargs="+", default=[96, 128, 160, 192])
    stp.add_argument("--rounds", type=int, default=4)
    stp.add_argument("--steps", type=int, default=5, help="timed steps per size per round")
    stp.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    stp.add_argument("--out", default="", help="also write the table to this markdown file")
    args = parser.parse_args(argv)
    # each command imports its own module here: `--help` and a wrong argument answer before torch loads
    # (0.1 s, against 7 s to import every benchmark module, measured with `time` on a 2-core machine)
    if args.command == "backbones":
        from fgvc.bench.backbones import FAMILIES, OUTSIDE, build_matrix, matrix_markdown
        from fgvc.errors import UserError
        from fgvc.safe_io import make_folder, write_text

        known = {**FAMILIES, **OUTSIDE}
        unknown = [f for f in args.families or [] if f not in known]
        if unknown:
            raise UserError(f"--families has {unknown}, which are not families; use some of {', '.join(known)}.")
        families = [known[f] for f in args.families] if args.families else None
        command = "python fgvc/benchmark.py " + shlex.join(sys.argv[1:] if argv is None else argv)
        matrix = build_matrix(Path(args.work), families, say=print)
        make_folder(Path(args.out).parent)
        write_text(Path(args.out), matrix_markdown(matrix, command))
        print(f"written {args.out}")
        return 0
    if args.command == "coverage":
        from fgvc.bench.synthetic import set_coverage

        write_table(set_coverage(args.recipe, list(args.set), args.boxes), "Centred-box coverage of the class parts",
                    args.out, argv)
        return 0
    if args.command == "step-time":
        from fgvc.bench.train_speed import step_times

        write_table(step_times(args.recipe, args.sizes, list(args.set), args.rounds, args.steps),
                    "Seconds per training step", args.out, argv)
        return 0
    if args.command == "pretrain":
        from fgvc.bench.pretrain import PRETRAIN_RECIPE, pretrain
        from fgvc.config import load_recipe

        load_recipe([f"recipe={PRETRAIN_RECIPE}", *args.set])  # a bad override stops before any training
        command = "python fgvc/benchmark.py " + shlex.join(sys.argv[1:] if argv is None else argv)
        for backbone, digest in pretrain(Path(args.out), Path(args.runs), list(args.set), command,
                                         args.backbones).items():
            print(f"{digest}  {Path(args.out) / f'fractal_{backbone}.safetensors'}")
        return 0
    if args.command == "data":
        from fgvc.bench.data_speed import data_speed

        write_table(data_speed(args.images, args.rounds), "Data loading speed", args.out, argv)
        return 0
    if args.command == "recipes":
        from fgvc.config import load_recipe
        from fgvc.bench.recipes import real_recipes, recipes_benchmark

        recipes = args.recipes or real_recipes()
        for r in recipes:  # every recipe and override is checked before the long runs start
            load_recipe([f"recipe={r}", *args.set])
        write_table(recipes_benchmark(recipes, list(args.set), args.timeout, Path(args.keep), not args.fresh),
                    "Every real recipe at its real size", args.out, argv)
        return 0
    if args.command == "timm":
        from fgvc.bench.timm_speed import timm_speed

        write_table(timm_speed(args.timm_train, args.rounds, args.epochs, args.threads, Path(args.runs),
                               list(args.set), args.source), "fgvc's training loop against timm's train.py",
                    args.out, argv)
        return 0
    if args.command == "train":
        from fgvc.bench.train_speed import train_speed

        write_table(train_speed(args.recipe, args.epochs, list(args.set), args.device, args.fake_images),
                    "Training speed", args.out, argv)
        return 0
    if args.command == "synthetic":
        from fgvc.bench.synthetic import METHODS, run_benchmark
        from fgvc.config import load_recipe

        methods = args.methods or METHODS
        for m in methods:  # every recipe and override is checked before hours of training start
            load_recipe([f"recipe={m}", *args.set])
        for size in args.curve:
            load_recipe([f"recipe={args.baseline}", *args.set, f"data.image_size={size}"])
        command = "python fgvc/benchmark.py " + shlex.join(sys.argv[1:] if argv is None else argv)
        run_benchmark(args.seeds, Path(args.out), Path(args.runs), list(args.set), methods, command,
                      identity_experiment=args.identity, jobs=args.jobs, baseline=args.baseline, curve=args.curve)
        print(Path(args.out, "README.md").read_text())
        return 0
    if args.command == "attention":
        from fgvc.bench.attention import attention_benchmark

        write_table(attention_benchmark(args.batch, args.rounds, args.min_run_time), "Attention cost", args.out, argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
