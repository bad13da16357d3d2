"""Where does a model look? `fgvc/localize.py RUN_DIR [RUN_DIR...] [--split test|val]
[--num-images N | --ids ID ...] [--out DIR] [--sources cam gradcam ...]`.

For each run: every map the model exposes (CAM, Grad-CAM, attention gates, STN region, RA-CNN
zooms, DCN saliency, attention rollout and class-token attention of ViT backbones; see
fgvc/analysis/maps.py) on the chosen images, scored against the annotated
parts and box next to a uniform random and a centred Gaussian baseline (fgvc/analysis/localization.py),
drawn as PNG grids. Writes OUT/grid_NNN.png, OUT/index.html, OUT/localization.json (OUT defaults to
RUN_DIR/localization) and prints a table. Data sets without parts get the box scores only.

Several runs: each goes to OUT/<run folder name>/ and OUT/localization.md holds one table over all
of them (OUT is then required), e.g. for results/localization/.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file (python fgvc/localize.py): see fgvc/_script.py
    import _script  # noqa: F401

from fgvc.errors import UserError, cli_main  # noqa: E402


@cli_main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    parser.add_argument("--split", choices=("test", "val"), default="test")
    pick = parser.add_mutually_exclusive_group()
    pick.add_argument("--num-images", type=int, default=None, help="the first N images of the split (default 16)")
    pick.add_argument("--ids", nargs="+", default=None, help="the data set's own image ids")
    parser.add_argument("--out", default=None, help="output folder (default RUN_DIR/localization)")
    parser.add_argument("--sources", nargs="+", default=None,
                        help="map sources: cam gradcam attention zoom saliency rollout class_attention "
                             "(default: all the model has)")
    parser.add_argument("--radius", type=float, default=None,
                        help="pointing-game radius as a share of the box diagonal (default 0.1)")
    parser.add_argument("--draw", type=int, default=None, help="draw only the first N images (scores use all)")
    parser.add_argument("--data-root", default=None, help="where the data set is now, if it moved")
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args(argv)

    from rich.console import Console

    from fgvc.analysis.localization import POINT_RADIUS, compare_table, localize_run, rich_table
    from fgvc.engine.runs import atomic_write_text

    if len(args.run_dirs) > 1 and not args.out:
        raise UserError("several run folders need --out DIR for their combined table, e.g. --out results/localization.")
    radius = POINT_RADIUS if args.radius is None else args.radius
    if radius <= 0:
        raise UserError(f"--radius is {radius} but must be positive; e.g. 0.1 of the box diagonal.")
    console = Console()
    names = _unique_names([Path(r) for r in args.run_dirs])
    reports = []
    for run_dir, name in zip(args.run_dirs, names):
        out = args.out if len(args.run_dirs) == 1 else Path(args.out) / name
        report = localize_run(run_dir, out, split=args.split, num_images=args.num_images, ids=args.ids,
                              sources=args.sources, radius_fraction=radius, data_root=args.data_root,
                              batch_size=args.batch_size, draw=args.draw, console=console)
        console.print(rich_table(report))
        console.print(f"written {out or Path(run_dir) / 'localization'}/index.html, localization.json, "
                      f"{len(report['pngs'])} PNG grids")
        reports.append(report)
    if len(reports) > 1:
        out = Path(args.out)
        atomic_write_text(out / "localization.md", compare_table(reports, names))
        summary = {name: {k: r[k] for k in ("run", "recipe", "family", "split", "data", "images", "sources")}
                   for name, r in zip(names, reports)}
        atomic_write_text(out / "localization.json", json.dumps(summary, indent=1))
        console.print(f"written {out}/localization.md and {out}/localization.json")
    return 0


def _unique_names(paths: list[Path]) -> list[str]:
    """Run folder names, suffixed where two runs share one."""
    names = []
    for p in paths:
        name = p.resolve().name
        while name in names:
            name += "_"
        names.append(name)
    return names


if __name__ == "__main__":
    sys.exit(main())
