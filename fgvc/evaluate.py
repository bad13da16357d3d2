"""Evaluate a finished run: `[accelerate launch] fgvc/evaluate.py RUN_DIR [--split test|val]`.

Rebuilds the model from the run folder (safetensors weights, nothing unpickled), evaluates on any
number of processes with exact counts, prints a rich table and writes RUN_DIR/eval.json (or
eval_val.json): top-1, top-5, mean per-class accuracy, expected calibration error with its
reliability bins, the confusion matrix and the most confused class pairs. Then draws the run's report
page, RUN_DIR/report.html with RUN_DIR/report/*.png (fgvc/analysis/run_report.py). RUN_DIR may also be
a folder made by fgvc/export.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file (python fgvc/evaluate.py): see fgvc/_script.py
    import _script  # noqa: F401

from fgvc.errors import UserError, cli_main  # noqa: E402


@cli_main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("--split", choices=("test", "val"), default="test")
    parser.add_argument("--data-root", default=None, help="where the data set is now, if it moved")
    parser.add_argument("--batch-size", type=int, default=None)
    args = parser.parse_args(argv)

    # imported after parsing: `--help` and a wrong argument answer in 0.3 s, not after loading torch (5.6 s of CPU here)
    from accelerate import Accelerator
    from rich.console import Console
    from rich.table import Table

    from fgvc.analysis.run_report import reliability_bins, write_report
    from fgvc.data.build import build_datasets, make_loader
    from fgvc.engine.metrics import (confusion_matrix, expected_calibration_error, most_confused, predict,
                                     split_metrics)
    from fgvc.engine.runs import atomic_write_text, load_run

    run = load_run(args.run_dir)
    from fgvc.analysis.run_report import PAGE, REPORT_DIR
    from fgvc.safe_io import check_target, refuse_link

    eval_name = "eval.json" if args.split == "test" else "eval_val.json"
    for name in (eval_name, PAGE):  # a link among the files this writes is refused before any work
        check_target(Path(args.run_dir) / name)
    refuse_link(Path(args.run_dir) / REPORT_DIR)
    cfg = run.cfg
    if args.data_root:
        cfg.data.root = args.data_root
    import torch

    precision = cfg.train.mixed_precision  # evaluate as the run was validated; fp16 needs a GPU
    accelerator = Accelerator(mixed_precision="no" if precision == "fp16" and not torch.cuda.is_available()
                              else precision)
    with accelerator.main_process_first():
        data = build_datasets(cfg.data, cfg.seed, run.mean, run.std)
    dataset = data.test if args.split == "test" else data.val
    if dataset is None:
        raise UserError(f"run '{args.run_dir}' has no validation split (data.val_fraction=0); use --split test.")
    loader = accelerator.prepare(make_loader(dataset, args.batch_size or cfg.train.batch_size,
                                             cfg.data.num_workers, False))
    model = accelerator.prepare(run.model)
    pred = predict(model, loader, accelerator)
    K = len(run.class_names)
    result = split_metrics(pred, K)
    result["ece"] = expected_calibration_error(pred.logits, pred.labels)
    cm = confusion_matrix(pred.logits, pred.labels, K)
    result["most_confused"] = most_confused(cm, run.class_names)
    result["confusion_matrix"] = cm.tolist()
    result["reliability"] = reliability_bins(pred.logits, pred.labels)
    result["split"] = args.split
    if accelerator.is_main_process:
        out = Path(args.run_dir) / eval_name
        atomic_write_text(out, json.dumps(result, indent=1))
        console = Console()
        table = Table(title=f"{args.run_dir} — {args.split} split")
        table.add_column("metric")
        table.add_column("value", justify="right")
        for k, v in result.items():
            if isinstance(v, (int, float)):
                table.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
        console.print(table)
        pairs = Table(title="most confused (true -> predicted)")
        for col in ("true", "predicted", "count"):
            pairs.add_column(col)
        for p in result["most_confused"][:5]:
            pairs.add_row(p["true"], p["predicted"], str(p["count"]))
        console.print(pairs)
        page = write_report(args.run_dir, run.class_names)
        console.print(f"written {out} and {page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
