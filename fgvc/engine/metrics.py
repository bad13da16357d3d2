"""Classification metrics over a whole split, computed from gathered (exactly counted) predictions."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from accelerate import Accelerator
from torch import Tensor
from torch.utils.data import DataLoader

from fgvc.models.build import model_input
from fgvc.models.outputs import final_logits, named_logits

ECE_BINS = 15  # Guo et al. 2017


@dataclass
class Predictions:
    logits: Tensor  # (N, K) final prediction
    labels: Tensor  # (N,)
    indices: Tensor  # (N,) positions in the data set
    extra: dict[str, Tensor]  # name -> (N, K) further predictions (per scale, coarse, ...)


@torch.no_grad()
def predict(model: torch.nn.Module, loader: DataLoader, accelerator: Accelerator) -> Predictions:
    """Run `model` over `loader` on every process; gather_for_metrics drops the padded duplicates."""
    model.eval()
    logits, labels, indices, extra = [], [], [], {}
    for batch in loader:
        with accelerator.autocast():
            out = model(model_input(model, batch["image"]))
        gathered = accelerator.gather_for_metrics(
            (final_logits(out).float(), batch["label"], batch["index"],
             {k: v.float() for k, v in named_logits(out).items()}))
        logits.append(gathered[0].cpu())
        labels.append(gathered[1].cpu())
        indices.append(gathered[2].cpu())
        for k, v in gathered[3].items():
            extra.setdefault(k, []).append(v.cpu())
    return Predictions(torch.cat(logits), torch.cat(labels), torch.cat(indices),
                       {k: torch.cat(v) for k, v in extra.items()})


def accuracy_metrics(logits: Tensor, labels: Tensor, num_classes: int) -> dict[str, float]:
    """top1, top5 (top-k with k = min(5, K)), mean per-class accuracy (over classes present)."""
    k = min(5, num_classes)
    topk = logits.topk(k, dim=-1).indices
    correct1 = (topk[:, 0] == labels).float()
    per_class = torch.zeros(num_classes).index_add_(0, labels, correct1)
    counts = torch.bincount(labels, minlength=num_classes).float()
    present = counts > 0
    return {
        "top1": correct1.mean().item(),
        "top5": (topk == labels[:, None]).any(-1).float().mean().item(),
        "mean_class_acc": (per_class[present] / counts[present]).mean().item(),
        "num_samples": int(len(labels)),
    }


def split_metrics(pred: Predictions, num_classes: int) -> dict[str, float]:
    m = accuracy_metrics(pred.logits, pred.labels, num_classes)
    for name, lg in pred.extra.items():
        m[f"top1_{name}"] = accuracy_metrics(lg, pred.labels, num_classes)["top1"]
    return m


def confusion_matrix(logits: Tensor, labels: Tensor, num_classes: int) -> np.ndarray:
    """(K, K) counts, rows true class, columns predicted."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (labels.numpy(), logits.argmax(-1).numpy()), 1)
    return cm


def most_confused(cm: np.ndarray, class_names: list[str], n: int = 10) -> list[dict]:
    off = cm.copy()
    np.fill_diagonal(off, 0)
    order = np.argsort(off, axis=None)[::-1][:n]
    pairs = []
    for flat in order:
        t, p = np.unravel_index(flat, off.shape)
        if off[t, p] == 0:
            break
        pairs.append({"true": class_names[t], "predicted": class_names[p], "count": int(off[t, p])})
    return pairs


def expected_calibration_error(logits: Tensor, labels: Tensor, bins: int = ECE_BINS) -> float:
    """ECE (Guo et al. 2017): sum over confidence bins of |accuracy - confidence| * bin share."""
    conf, pred = logits.softmax(-1).max(-1)
    correct = (pred == labels).float()
    edges = torch.linspace(0, 1, bins + 1)
    ece = torch.zeros(())
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (conf > lo) & (conf <= hi)
        if inside.any():
            ece += inside.float().mean() * (correct[inside].mean() - conf[inside].mean()).abs()
    return ece.item()
