"""Predict: `fgvc/predict.py RUN_DIR IMAGE_OR_FOLDER... [--json] [--top 5]`.

Top classes with names and probabilities for each image, as a rich table or JSON. An unreadable
image is reported by name and the others are still predicted (exit status 1 if any failed).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file (python fgvc/predict.py): see fgvc/_script.py
    import _script  # noqa: F401

from fgvc.errors import UserError, cli_main  # noqa: E402
from fgvc.safe_io import regular_file  # noqa: E402

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def expand(paths: list[str]) -> list[Path]:
    """The images named and those in the folders named; in a folder only regular files count (a FIFO
    named pipe.jpg would block the reader for ever)."""
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and regular_file(f))
        else:
            files.append(p)
    return files


@cli_main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("images", nargs="+")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--top", type=int, default=5)
    args = parser.parse_args(argv)
    if args.top < 1:
        raise UserError(f"--top is {args.top} but must be at least 1; e.g. --top 5.")

    import torch
    from rich.console import Console
    from rich.table import Table

    # imported after parsing: `--help` and a wrong argument answer in 0.3 s, not after loading torch (5.6 s of CPU here)
    from fgvc.data.build import build_transform
    from fgvc.data.records import load_rgb
    from fgvc.engine.runs import load_run
    from fgvc.models.build import model_input
    from fgvc.models.outputs import final_logits

    run = load_run(args.run_dir)
    transform = build_transform(run.cfg.data, False, run.mean, run.std, [])
    files = expand(args.images)
    if not files:
        raise UserError(f"no images found in {args.images}; give image files or folders of them.")
    k = min(args.top, len(run.class_names))
    results, failed = [], 0
    for path in files:
        try:
            if path.exists() and not regular_file(path):
                raise UserError(f"'{path}' is not a regular file (a pipe, device or socket); give image files.")
            image, _, _ = transform(load_rgb(path), None, None)
        except UserError as err:
            results.append({"image": str(path), "error": str(err)})
            failed += 1
            continue
        with torch.no_grad():
            probs = final_logits(run.model(model_input(run.model, image[None]))).softmax(-1)[0]
        top = probs.topk(k)
        results.append({"image": str(path), "top": [{"class": run.class_names[i], "prob": round(p, 4)}
                                                      for p, i in zip(top.values.tolist(), top.indices.tolist())]})
    if args.json:
        print(json.dumps(results, indent=1))
    else:
        console = Console()
        table = Table(title=f"top-{k} predictions of {args.run_dir}")
        table.add_column("image")
        table.add_column("class")
        table.add_column("probability", justify="right")
        for r in results:
            if "error" in r:
                table.add_row(r["image"], f"[red]{r['error']}[/red]", "")
                continue
            for j, t in enumerate(r["top"]):
                table.add_row(r["image"] if j == 0 else "", t["class"], f"{t['prob']:.3f}")
        console.print(table)
    if failed:
        print(f"error: {failed} of {len(files)} images could not be read (named above).", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
