"""Reports on finished runs: `python fgvc/report.py NAME RUN_DIR [options]`.

    coarse-fine   cost/accuracy of a dcn run: coarse, full-image fine, dcn per k, early exit per
                  threshold (thresholds chosen on validation) -> coarse_fine.{md,csv,png} in RUN_DIR;
                  of a cfvit run: coarse pass, each share of re-split tokens, early exit, against its
                  own fine pass with every token re-split
    coarse-fine-cost  cost only (random weights) of a dcn recipe against its whole-image counterpart
                  (a cfvit recipe: against its fine pass with every token re-split):
                  `coarse-fine-cost recipe=cub_dcn --out DIR` -> coarse_fine_cost.{md,csv} in DIR
    coarse-fine-design  top-1 (val / test) and GFLOPs per k of several runs, one markdown table on stdout

A report joins by adding one entry to REPORTS: (help, add_arguments(parser), run(args)).
"""

from __future__ import annotations

import argparse
import shlex
import sys

if __package__ in (None, ""):  # run as a file (python fgvc/report.py): see fgvc/_script.py
    import _script  # noqa: F401

from fgvc.errors import UserError, cli_main  # noqa: E402


def number_list(kind: type):
    def parse(text: str) -> list:
        try:
            return [kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not a comma-separated list of {kind.__name__}s") from None
    return parse


# Each subcommand imports fgvc.analysis.coarse_fine when it is chosen: `--help` answers before torch loads.
def _coarse_fine_args(p: argparse.ArgumentParser) -> None:
    from fgvc.analysis.coarse_fine import DEFAULT_COSTS, DEFAULT_DROPS, DEFAULT_SHARES

    p.add_argument("run_dir", help="a finished model.arch=dcn or cfvit run folder")
    p.add_argument("--fine-run", help="a full-image run of the same recipe family (e.g. synth_dcn_fine) "
                   "to compare with; default: this model's fine network on the whole image, untrained for it")
    p.add_argument("--k", type=number_list(int), default=None, help="k grid, e.g. 1,2,4,8 (default: powers "
                   "of 2 up to every position, and the recipe's k)")
    p.add_argument("--shares", type=number_list(float), default=list(DEFAULT_SHARES),
                   help="early exit: thresholds chosen on validation to escalate these shares of images")
    p.add_argument("--costs", type=number_list(float), default=list(DEFAULT_COSTS),
                   help="early exit: thresholds chosen on validation for these FLOPs shares of the fine network")
    p.add_argument("--drops", type=number_list(float), default=list(DEFAULT_DROPS),
                   help="early exit: thresholds chosen on validation to lose at most these top-1 points against "
                   "refining every image (the fewest escalated)")
    p.add_argument("--thresholds", type=number_list(float), default=[], help="early exit: given thresholds too")
    p.add_argument("--batch", type=int, default=32, help="the large batch for latency (and evaluation)")
    p.add_argument("--min-run-time", type=float, default=0.5, help="seconds of timing per measurement")
    p.add_argument("--rounds", type=int, default=3, help="alternating timing rounds over every path")
    p.add_argument("--curve", default=None, metavar="CSV", help="the plain network's accuracy-vs-FLOPs curve "
                   "(plain_curve.csv of `fgvc/benchmark.py synthetic --curve`), drawn on the FLOPs plot")


def _coarse_fine(args: argparse.Namespace) -> None:
    from fgvc.analysis.coarse_fine import report_run

    report_run(args.run_dir, args.fine_run, ks=args.k, shares=tuple(args.shares), costs=tuple(args.costs),
               thresholds=tuple(args.thresholds), batch=args.batch, min_run_time=args.min_run_time,
               rounds=args.rounds, drops=tuple(args.drops), curve=args.curve,
               command="python fgvc/report.py " + shlex.join(sys.argv[1:]))


def _coarse_fine_cost_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs="+", help="the dcn recipe and key=value overrides, e.g. recipe=cub_dcn")
    p.add_argument("--out", required=True, help="folder for coarse_fine_cost.{md,csv}")
    p.add_argument("--k", type=number_list(int), default=None, help="k values to cost (default: the recipe's k; "
                   "cfvit: tokens re-split, one, each eighth of the coarse grid and the recipe's)")
    p.add_argument("--num-classes", type=int, default=200, help="classifier width (CUB: 200; negligible cost)")
    p.add_argument("--batch", type=int, default=32, help="the large batch for latency")
    p.add_argument("--rounds", type=int, default=3, help="alternating timing rounds")
    p.add_argument("--min-run-time", type=float, default=0.5, help="seconds of timing per path, round and batch")
    p.add_argument("--overwrite", action="store_true", help="replace an existing report in --out")


def _coarse_fine_cost(args: argparse.Namespace) -> None:
    from fgvc.analysis.coarse_fine import report_cost

    report_cost(args.overrides, args.out, ks=args.k, num_classes=args.num_classes, batch=args.batch,
                rounds=args.rounds, min_run_time=args.min_run_time, overwrite=args.overwrite)


def _coarse_fine_design_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dirs", nargs="+", help="finished dcn run folders (a whole-image run gives one number)")
    p.add_argument("--k", type=number_list(int), default=[0, 1, 2, 4, 8, 16], help="k grid (0: the coarse path)")
    p.add_argument("--batch", type=int, default=64, help="evaluation batch")


def _coarse_fine_design(args: argparse.Namespace) -> None:
    from fgvc.analysis.coarse_fine import design_table

    print(design_table(args.run_dirs, args.k, args.batch), end="")


REPORTS = {
    "coarse-fine": ("cost/accuracy report of a dcn run (coarse, fine, dcn per k, early exit)",
                    _coarse_fine_args, _coarse_fine),
    "coarse-fine-cost": ("cost only (random weights) of a dcn recipe against its whole-image counterpart",
                         _coarse_fine_cost_args, _coarse_fine_cost),
    "coarse-fine-design": ("top-1 per k of several dcn runs (choosing a design)", _coarse_fine_design_args,
                           _coarse_fine_design),
}


@cli_main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fgvc/report.py", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="report", required=True, metavar="REPORT")
    for name, (help_, add_arguments, _) in REPORTS.items():
        add_arguments(sub.add_parser(name, help=help_))
    args = parser.parse_args(argv)
    if args.batch < 1 if hasattr(args, "batch") else False:
        raise UserError("--batch must be at least 1.")
    REPORTS[args.report][2](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
