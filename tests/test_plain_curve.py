"""The plain network's accuracy-vs-FLOPs curve (the bar a method must pass), the plots that draw it,
and the planning tools of a synthetic regime (centred-box coverage, seconds per step)."""

from __future__ import annotations

import math

import pytest

from fgvc.analysis.plain_curve import accuracy_limits, read_curve_csv, write_curve_csv
from fgvc.bench.synthetic import CurvePoint, curve_at, plot_accuracy_vs_flops


def point(size, flops, top1, n=1600):
    return CurvePoint(size, flops, list(range(len(top1))), top1, n)


def test_standard_error_is_over_seeds_or_binomial_for_one_seed():
    three = point(96, 1e8, [0.5, 0.6, 0.7])
    assert three.mean == pytest.approx(60.0)
    assert three.se == pytest.approx(100 * 0.1 / math.sqrt(3))  # std 0.1 over 3 seeds
    one = point(96, 1e8, [0.8], n=1600)
    assert one.se == pytest.approx(100 * math.sqrt(0.8 * 0.2 / 1600))


def test_curve_is_read_linearly_in_log_flops_and_not_extrapolated():
    curve = [point(192, 4e8, [0.9]), point(96, 1e8, [0.5])]
    assert curve_at(curve, 1e8) == pytest.approx(50.0)
    assert curve_at(curve, 4e8) == pytest.approx(90.0)
    assert curve_at(curve, 2e8) == pytest.approx(70.0)  # half way in log FLOPs
    assert math.isnan(curve_at(curve, 5e8)) and math.isnan(curve_at(curve, 0.5e8))


def test_curve_csv_round_trip(tmp_path):
    curve = [point(96, 1e8, [0.5, 0.6]), point(192, 4e8, [0.9, 0.8])]
    write_curve_csv([(c.size, c.flops, c.mean, c.se, c.seeds, [100 * t for t in c.top1]) for c in curve], tmp_path / "c.csv")
    rows = read_curve_csv(tmp_path / "c.csv")
    assert [(r[0], r[1]) for r in rows] == [(96, 1e8), (192, 4e8)]
    assert rows[1][2] == pytest.approx(85.0) and rows[1][3] == pytest.approx(curve[1].se)


def test_accuracy_axis_spans_at_least_ten_points_and_stays_within_0_100():
    lo, hi = accuracy_limits([81.0, 81.2], [81.3, 81.4])
    assert hi - lo >= 10 and lo < 81.0 and hi > 81.4
    lo, hi = accuracy_limits([95.0], [99.5])
    assert hi == 100 and hi - lo >= 10
    lo, hi = accuracy_limits([10.0], [60.0])  # wide data keep their own range, plus a margin
    assert lo == pytest.approx(9.5) and hi == pytest.approx(60.5)


def test_plot_draws_the_curve_with_size_labels_and_tick_labels_within_one_decade(tmp_path):
    points = [("synth_roam_racnn", 3.0e8, 81.0, 0.4), ("synth_roam_stn", 1.0e8, 80.2, 0.5)]
    curve = [(96, 1.0e8, 60.0, 1.0), (128, 1.8e8, 72.0, 1.5), (192, 4.0e8, 85.0, 0.6)]
    fig = plot_accuracy_vs_flops(points, tmp_path / "p.png", curve=curve)
    ax = fig.axes[0]
    fig.canvas.draw()
    labels = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
    assert len(labels) >= 2  # 100-400 MFLOPs: within one decade, still labelled
    texts = [t.get_text() for t in ax.texts]
    assert texts == ["96 px", "128 px", "192 px"]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["plain network (curve)", "roam_racnn", "roam_stn"]
    lo, hi = ax.get_ylim()
    assert lo < 59.0 and hi > 85.6


def test_coverage_table_of_a_recipe_from_its_keypoints(tmp_path):
    from fgvc.bench.synthetic import set_coverage

    small = [f"data.root={tmp_path}", "data.synthetic.num_classes=4", "data.synthetic.train_per_class=2",
             "data.synthetic.test_per_class=10", "data.synthetic.image_size=64"]
    default = set_coverage("synth_roam_baseline", small + ["data.synthetic.position_spread=0",
                                                           "data.synthetic.scale_min=1"], [4 / 9, 1.0])
    roam = set_coverage("synth_roam_baseline", small, [4 / 9, 1.0])
    rows = lambda text: [line for line in text.splitlines() if line.startswith("| 0.") or line.startswith("| 1.")]  # noqa: E731
    assert rows(default) == ["| 0.444 of 64 px | 100.0% |", "| 1.000 of 64 px | 100.0% |"]
    first, whole = rows(roam)
    assert whole.endswith("100.0% |") and float(first.split("|")[2].strip(" %")) < 90
    import re

    seen = int(re.search(r"(\d+) with a visible class part \(left wing, right wing\)", roam).group(1))
    assert "40 test images" in roam and 25 <= seen < 40  # hidden=0.12: a few wings hidden, not counted


def test_step_time_table_has_one_row_per_size():
    from fgvc.bench.train_speed import step_times

    text = step_times("synth_roam_baseline", [32, 48], ["train.batch_size=2"], rounds=1, steps=1)
    rows = [line for line in text.splitlines() if line.startswith("| 32 px") or line.startswith("| 48 px")]
    assert len(rows) == 2 and all(float(r.split("|")[2]) > 0 for r in rows)


def test_coarse_fine_labels_of_points_that_lie_together_are_merged():
    from fgvc.analysis.coarse_fine import label_groups

    xy = [(0.10, 0.50), (0.11, 0.51), (0.50, 0.50), (0.10, 0.60), (0.52, 0.48)]
    assert label_groups(xy, near=0.04) == [[0, 1], [2, 4], [3]]
    assert label_groups(xy, near=0.0) == [[0], [1], [2], [3], [4]]


def test_coarse_fine_plot_labels_every_axis_spans_ten_points_and_draws_the_curve(tmp_path):
    from fgvc.analysis.coarse_fine import Row, plot, read_plot_points

    def row(label, kind, top1, gflops, ms):
        return Row(label, kind, -1, float("nan"), "", 0.0, top1, top1, gflops, 1.0, ms, 0.1, ms / 4, 0.1)

    rows = [row("coarse", "coarse", 81.2, 0.07, 3.1), row("exit t=0.3 k=1", "exit", 81.3, 0.071, 3.5),
            row("exit t=-1 k=1", "exit", 81.2, 0.07, 3.3), row("dcn k=1", "dcn", 80.9, 0.09, 5.9),
            row("fine (whole image)", "fine", 81.1, 0.29, 7.0)]
    curve = [(96, 0.07e9, 62.0, 1.2), (192, 0.29e9, 81.0, 0.5)]
    points = plot(rows, tmp_path / "cf.png", "title", test_images=1600, curve=curve)
    assert points["labels"] == [r.label for r in rows] and read_plot_points(tmp_path / "cf.png") == points


def test_coarse_fine_plot_axes(tmp_path, monkeypatch):
    """The same plot's axes, taken from the figure it saves."""
    from matplotlib.figure import Figure

    from fgvc.analysis import coarse_fine

    saved = {}
    real = Figure.savefig

    def keep(fig, path, **kw):
        saved["fig"] = fig
        return real(fig, path, **kw)

    monkeypatch.setattr(Figure, "savefig", keep)
    rows = [coarse_fine.Row(f"p{i}", kind, -1, float("nan"), "", 0.0, 81.0 + 0.1 * i, 81.0, g, 1.0, ms, 0.1, 1.0, 0.1)
            for i, (kind, g, ms) in enumerate([("coarse", 0.07, 3.1), ("dcn", 0.09, 5.9), ("fine", 0.29, 7.0)])]
    coarse_fine.plot(rows, tmp_path / "cf.png", "t", test_images=1600, curve=[(96, 0.07e9, 62.0, 1.2)])
    flops_ax, latency_ax = saved["fig"].axes
    for ax in (flops_ax, latency_ax):
        assert [t.get_text() for t in ax.get_xticklabels() if t.get_text()]  # labelled within one decade
        lo, hi = ax.get_ylim()
        assert hi - lo >= 10
    assert flops_ax.get_ylim()[0] < 60.8  # the curve's 96 px point is inside
    assert "96 px" in [t.get_text() for t in flops_ax.texts] and "96 px" not in [t.get_text() for t in latency_ax.texts]
    texts = [t.get_text() for t in saved["fig"].texts]
    assert any("1: p0" in t for t in texts) and any("3: p2" in t for t in texts)  # the key under the axes
