"""Reports on finished runs: `python fgvc/report.py NAME RUN_DIR [options]`.

    coarse-fine   cost/accuracy of a dcn run: coarse, full-image fine, dcn per k, early exit per
                  threshold (thresholds chosen on validation) -> coarse_fine.{md,csv,png} in RUN_DIR

A report joins by adding one entry to REPORTS: (help, add_arguments(parser), run(args)).
"""

from __future__ import annotations

import argparse
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


def _coarse_fine_args(p: argparse.ArgumentParser) -> None:
    from fgvc.analysis.coarse_fine import DEFAULT_COSTS, DEFAULT_SHARES

    p.add_argument("run_dir", help="a finished model.arch=dcn run folder")
    p.add_argument("--fine-run", help="a full-image run of the same recipe family (e.g. synth_dcn_fine) "
                   "to compare with; default: this model's fine network on the whole image, untrained for it")
    p.add_argument("--k", type=number_list(int), default=None, help="k grid, e.g. 1,2,4,8 (default: powers "
                   "of 2 up to every position, and the recipe's k)")
    p.add_argument("--shares", type=number_list(float), default=list(DEFAULT_SHARES),
                   help="early exit: thresholds chosen on validation to escalate these shares of images")
    p.add_argument("--costs", type=number_list(float), default=list(DEFAULT_COSTS),
                   help="early exit: thresholds chosen on validation for these FLOPs shares of the fine network")
    p.add_argument("--thresholds", type=number_list(float), default=[], help="early exit: given thresholds too")
    p.add_argument("--batch", type=int, default=32, help="the large batch for latency (and evaluation)")
    p.add_argument("--min-run-time", type=float, default=0.5, help="seconds of timing per measurement")


def _coarse_fine(args: argparse.Namespace) -> None:
    from fgvc.analysis.coarse_fine import report_run

    report_run(args.run_dir, args.fine_run, ks=args.k, shares=tuple(args.shares), costs=tuple(args.costs),
               thresholds=tuple(args.thresholds), batch=args.batch, min_run_time=args.min_run_time)


REPORTS = {
    "coarse-fine": ("cost/accuracy report of a dcn run (coarse, fine, dcn per k, early exit)",
                    _coarse_fine_args, _coarse_fine),
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
