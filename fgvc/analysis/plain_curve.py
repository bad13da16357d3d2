"""The plain network's accuracy-vs-FLOPs curve: the bar a method must pass at its cost (a method is
worth its compute where it lies above the curve of the plain network given more pixels instead).
One owner of the curve's file (`plain_curve.csv`, written by the synthetic benchmark) and of how the
curve and accuracy axes are drawn in every plot (the benchmark's and the coarse-fine report's)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.axes import Axes

CURVE_FILE = "plain_curve.csv"
CURVE_COLUMNS = ["size", "flops", "top1_mean", "top1_se", "seeds", "top1_per_seed"]
MIN_ACCURACY_SPAN = 10.0  # points: the smallest accuracy range a plot shows, so noise does not look like a trend

Point = tuple[int, float, float, float]  # input size, FLOPs per image, mean top-1 %, its standard error %


def write_curve_csv(rows: list[tuple[int, float, float, float, list[int], list[float]]], path: Path) -> None:
    """(size, FLOPs, mean %, standard error %, seeds, top-1 % per seed) per input size -> CSV."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CURVE_COLUMNS)
        for size, flops, mean, se, seeds, per_seed in rows:
            w.writerow([size, flops, mean, se, " ".join(map(str, seeds)), " ".join(f"{t:.2f}" for t in per_seed)])


def read_curve_csv(path: Path) -> list[Point]:
    """(input size, FLOPs per image, mean top-1 %, standard error %) of each point of a plain_curve.csv."""
    with open(path, newline="") as f:
        return [(int(r["size"]), float(r["flops"]), float(r["top1_mean"]), float(r["top1_se"])) for r in csv.DictReader(f)]


def accuracy_limits(lows: list[float], highs: list[float], span: float = MIN_ACCURACY_SPAN) -> tuple[float, float]:
    """y limits holding every value (lows, highs: the ends of the error bars), at least `span` points
    wide (widened evenly about the middle), within 0-100."""
    lo, hi = min(lows), max(highs)
    pad = max(0.0, span - (hi - lo)) / 2 + 0.5
    lo, hi = lo - pad, hi + pad
    if hi > 100:
        lo, hi = max(0.0, lo - (hi - 100)), 100.0
    if lo < 0:
        lo, hi = 0.0, min(100.0, hi - lo)
    return lo, hi


def label_log_axis(ax: Axes) -> None:
    """Log x axis with tick labels at 1, 2 and 5 of every decade, so a range within one decade is labelled."""
    from matplotlib.ticker import FuncFormatter, LogLocator

    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))


def draw_curve(ax: Axes, curve: list[Point], flops_unit: float) -> tuple[list[float], list[float]]:
    """The curve as a grey line with standard-error bars, each point marked with its input size; x in
    FLOPs / flops_unit. Returns the error bars' (lows, highs) for the accuracy axis's limits."""
    curve = sorted(curve, key=lambda c: c[1])
    ax.errorbar([c[1] / flops_unit for c in curve], [c[2] for c in curve], yerr=[c[3] for c in curve], fmt="-",
                color="0.45", marker="D", ms=4, capsize=3, label="plain network (curve)", zorder=1)
    for size, flops, mean, se in curve:
        ax.annotate(f"{size} px", (flops / flops_unit, mean - se), xytext=(0, -11), textcoords="offset points",
                    ha="center", fontsize=7, color="0.35")
    return [c[2] - c[3] - 2 for c in curve], [c[2] + c[3] for c in curve]  # room for the size labels below
