"""The report page of a run: pictures a person would rather look at than read, and report.html.

    RUN_DIR/report/curves.png            training curves from metrics.jsonl (losses, validation accuracy, lr)
    RUN_DIR/report/confusion_SPLIT.png   the confusion matrix (only the most confused classes when there are many)
    RUN_DIR/report/reliability_SPLIT.png reliability diagram: accuracy against confidence per bin, with the ECE
    RUN_DIR/report.html                  the metrics, these pictures, and the localization pictures when present

`write_report` reads only files of the run folder (metrics.json, metrics.jsonl, eval.json / eval_val.json
as fgvc/evaluate.py writes them, localization/), so it can be rerun at any time.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from torch import Tensor  # noqa: E402

from fgvc.engine.metrics import ECE_BINS  # noqa: E402
from fgvc.engine.runs import read_log  # noqa: E402
from fgvc.safe_io import make_folder, write_text, writing  # noqa: E402

REPORT_DIR = "report"
PAGE = "report.html"
MAX_FULL_CONFUSION = 30  # up to this many classes the whole matrix is drawn with names
CONFUSED_CLASSES = 20  # beyond it: the classes of the most confused pairs, at most this many
DPI = 100
EVAL_FILES = {"test": "eval.json", "val": "eval_val.json"}


def reliability_bins(logits: Tensor, labels: Tensor, bins: int = ECE_BINS) -> dict[str, list]:
    """Per confidence bin (the bins of fgvc.engine.metrics.expected_calibration_error): mean confidence,
    accuracy and number of images; empty bins hold None."""
    conf, pred = logits.float().softmax(-1).max(-1)
    correct = (pred == labels).float()
    edges = torch.linspace(0, 1, bins + 1)
    out: dict[str, list] = {"edges": edges.tolist(), "confidence": [], "accuracy": [], "count": []}
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (conf > lo) & (conf <= hi)
        n = int(inside.sum())
        out["count"].append(n)
        out["confidence"].append(float(conf[inside].mean()) if n else None)
        out["accuracy"].append(float(correct[inside].mean()) if n else None)
    return out


def ece_of_bins(rel: dict[str, list]) -> float:
    """ECE from the bins: sum of |accuracy - confidence| weighted by the bin's share of the images."""
    total = sum(rel["count"])
    return sum(n / total * abs(a - c) for n, a, c in zip(rel["count"], rel["accuracy"], rel["confidence"]) if n)


def confused_classes(cm: np.ndarray, limit: int = CONFUSED_CLASSES) -> list[int]:
    """Indices of the classes in the most frequent off-diagonal pairs, at most `limit`, in class order."""
    off = cm.copy()
    np.fill_diagonal(off, 0)
    chosen: list[int] = []
    for flat in np.argsort(off, axis=None, kind="stable")[::-1]:
        t, p = np.unravel_index(flat, off.shape)
        if off[t, p] == 0 or len(chosen) >= limit:
            break
        for c in (int(t), int(p)):
            if c not in chosen and len(chosen) < limit:
                chosen.append(c)
    return sorted(chosen)


# ---------------------------------------------------------------------------------------------
# Pictures (object-oriented matplotlib on Agg; every figure closed after saving)


def _save(fig, path: Path) -> None:
    with writing(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, facecolor="white", bbox_inches="tight")
    plt.close(fig)


def draw_curves(rows: list[dict], path: Path) -> None:
    """Losses, validation accuracies and learning rate per epoch; the selected epoch marked."""
    epochs = [r["epoch"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    panels = (("training loss terms", lambda k: k.startswith("train_") and k not in ("train_seconds", "train_images")),
              ("validation accuracy", lambda k: k.startswith("val_") and not k.endswith("num_samples")),
              ("learning rate", lambda k: k == "lr"))
    keys = list(dict.fromkeys(k for r in rows for k in r))
    for ax, (title, pick) in zip(axes, panels):
        for k in filter(pick, keys):
            ax.plot(epochs, [r.get(k, np.nan) for r in rows], marker="o", markersize=3, label=k)
        best = rows[-1].get("best_epoch", -1)
        if best and best > 0:
            ax.axvline(best, color="grey", linestyle=":", linewidth=1)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle("training curves (dotted: selected epoch)")
    fig.tight_layout()
    _save(fig, path)


def draw_confusion(cm: np.ndarray, class_names: list[str], path: Path) -> str:
    """The confusion matrix as an image (rows true, columns predicted); returns its caption."""
    K = len(class_names)
    if K <= MAX_FULL_CONFUSION:
        idx, caption = list(range(K)), f"all {K} classes"
    else:
        idx = confused_classes(cm) or list(range(min(K, CONFUSED_CLASSES)))
        caption = f"the {len(idx)} classes of the most confused pairs, of {K}"
    sub = cm[np.ix_(idx, idx)]
    side = max(4.0, 0.32 * len(idx) + 2)
    fig, ax = plt.subplots(figsize=(side + 1, side))
    image = ax.imshow(sub, cmap="Blues")
    fig.colorbar(image, ax=ax, fraction=0.046, label="images")
    names = [class_names[i] for i in idx]
    ax.set_xticks(range(len(idx)), names, rotation=90, fontsize=7)
    ax.set_yticks(range(len(idx)), names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if len(idx) <= MAX_FULL_CONFUSION:
        for (r, c), v in np.ndenumerate(sub):
            if v:
                ax.text(c, r, str(v), ha="center", va="center", fontsize=6,
                        color="white" if v > sub.max() / 2 else "black")
    ax.set_title(f"confusion matrix: {caption}")
    _save(fig, path)
    return caption


def draw_reliability(rel: dict[str, list], ece: float, path: Path) -> None:
    """Accuracy against confidence per bin (a calibrated model lies on the diagonal), and the bin counts."""
    edges = np.asarray(rel["edges"])
    width = np.diff(edges)
    acc = np.array([np.nan if a is None else a for a in rel["accuracy"]])
    conf = np.array([np.nan if c is None else c for c in rel["confidence"]])
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(4.6, 5.6), sharex=True, height_ratios=(3, 1))
    top.bar(edges[:-1], np.nan_to_num(acc), width=width, align="edge", edgecolor="black", label="accuracy")
    top.bar(edges[:-1], np.nan_to_num(conf - acc), bottom=np.nan_to_num(acc), width=width, align="edge",
            color="red", alpha=0.3, label="gap to confidence")
    top.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1)
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy")
    top.set_title(f"reliability diagram, ECE {ece:.3f}")
    top.legend(fontsize=7, loc="upper left")
    bottom.bar(edges[:-1], rel["count"], width=width, align="edge", color="grey")
    bottom.set_xlabel("confidence (top-1 probability)")
    bottom.set_ylabel("images")
    bottom.set_xlim(0, 1)
    fig.tight_layout()
    _save(fig, path)


# ---------------------------------------------------------------------------------------------
# The page


def _read(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    return html.escape(str(v))


def write_report(run_dir: str | Path, class_names: list[str]) -> Path:
    """Draw every picture the run folder has the numbers for and write RUN_DIR/report.html."""
    run_dir = Path(run_dir)
    pics = make_folder(run_dir / REPORT_DIR)
    esc = html.escape
    body: list[str] = []
    metrics = _read(run_dir / "metrics.json")
    if metrics:
        rows = [(split, metrics[split]) for split in ("val", "test") if metrics.get(split, {}).get("num_samples")]
        keys = list(dict.fromkeys(k for _, m in rows for k in m))
        body.append("<h2>Metrics at the end of training</h2><table><tr><th>split</th>"
                    + "".join(f"<th>{esc(k)}</th>" for k in keys) + "</tr>"
                    + "".join(f"<tr><td>{split}</td>" + "".join(f"<td>{_fmt(m.get(k, ''))}</td>" for k in keys)
                              + "</tr>" for split, m in rows) + "</table>"
                    + f"<p>selected epoch {metrics.get('best_epoch')} ({esc(str(metrics.get('selected', 'model')))} "
                    f"weights), training time {metrics.get('train_time_s', '?')} s.</p>")
    log = run_dir / "metrics.jsonl"
    rows_log = read_log(log)
    if rows_log:
        draw_curves(rows_log, pics / "curves.png")
        body.append(_figure("curves.png", "Training curves", "from metrics.jsonl, one point per epoch"))
    for split, name in EVAL_FILES.items():
        ev = _read(run_dir / name)
        if not ev:
            continue
        body.append(f"<h2>Evaluation on the {split} split ({ev['num_samples']} images, {esc(name)})</h2>"
                    f"<p>top-1 {ev['top1']:.4f}, top-5 {ev['top5']:.4f}, mean per-class accuracy "
                    f"{ev['mean_class_acc']:.4f}, expected calibration error {ev['ece']:.4f}.</p>")
        caption = draw_confusion(np.asarray(ev["confusion_matrix"]), class_names, pics / f"confusion_{split}.png")
        body.append(_figure(f"confusion_{split}.png", "Confusion matrix", caption))
        if ev.get("most_confused"):
            body.append("<table><tr><th>true</th><th>predicted</th><th>images</th></tr>"
                        + "".join(f"<tr><td>{esc(p['true'])}</td><td>{esc(p['predicted'])}</td>"
                                  f"<td>{p['count']}</td></tr>" for p in ev["most_confused"]) + "</table>")
        if ev.get("reliability"):
            draw_reliability(ev["reliability"], ev["ece"], pics / f"reliability_{split}.png")
            body.append(_figure(f"reliability_{split}.png", "Calibration",
                                "bars: accuracy per confidence bin; dashed: perfect calibration"))
    body.append(_localization(run_dir))
    page = run_dir / PAGE
    write_text(page, f"""<!doctype html>
<html><head><meta charset="utf-8"><title>fgvc report — {esc(run_dir.name)}</title>
<style>body{{font-family:sans-serif;margin:1em;max-width:1400px}} table{{border-collapse:collapse;margin:.5em 0}}
td,th{{border:1px solid #ccc;padding:2px 6px;font-size:90%}} img{{max-width:100%}}</style></head><body>
<h1>Run report: {esc(str(run_dir))}</h1>
{''.join(body) or '<p>This folder has no metrics yet.</p>'}
</body></html>
""")
    return page


def _figure(name: str, title: str, caption: str) -> str:
    src = f"{REPORT_DIR}/{name}"
    return (f'<h3>{html.escape(title)}</h3><figure><a href="{src}"><img src="{src}" alt="{html.escape(title)}"></a>'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _localization(run_dir: Path) -> str:
    """Links to fgvc/localize.py's page and pictures in RUN_DIR/localization, when it has been run."""
    folder = run_dir / "localization"
    report = _read(folder / "localization.json")
    if report is None:
        return ("<h2>Localization</h2><p>Not measured yet: <code>python fgvc/localize.py "
                f"{html.escape(str(run_dir))}</code> draws where the model looks.</p>")
    pngs = [p for p in report.get("pngs", []) if (folder / p).is_file()]
    links = "".join(f'<a href="localization/{html.escape(p)}"><img src="localization/{html.escape(p)}" '
                    f'alt="{html.escape(p)}" style="max-width:45%"></a> ' for p in pngs)
    index = '<p><a href="localization/index.html">all localization scores and pictures</a></p>' \
        if (folder / "index.html").is_file() else ""
    return (f"<h2>Localization</h2><p>{len(report['images'])} {html.escape(report['split'])} images, map sources: "
            f"{html.escape(', '.join(report['sources']))}.</p>{index}{links}")
