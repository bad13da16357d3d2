"""Which of the two class cues a synthetic run reads: test accuracy of the predicted class's beak
colour and wing colour (fgvc.data.synthetic.class_codes) against the true ones.
`python results/synthetic_vit/cue_accuracy.py RUN_DIR ...`"""

import sys

import torch

from fgvc.data.build import build_datasets, make_loader
from fgvc.data.synthetic import class_codes
from fgvc.engine.runs import load_run
from fgvc.models.build import model_input


@torch.no_grad()
def cue_accuracy(run_dir: str) -> tuple[float, float, float]:
    run = load_run(run_dir)
    data = build_datasets(run.cfg.data, run.cfg.seed, run.mean, run.std)
    codes = torch.tensor(class_codes(run.cfg.data.synthetic.num_classes)[0])  # (K, 2): beak, wing
    hits = []
    for batch in make_loader(data.test, 64, 0, False):
        out = run.model(model_input(run.model, batch["image"]))
        logits = out if torch.is_tensor(out) else out.logits
        pred, true = codes[logits.argmax(-1)], codes[batch["label"]]
        hits.append(torch.stack([(pred == true).all(-1), pred[:, 0] == true[:, 0], pred[:, 1] == true[:, 1]], 1))
    return tuple(100 * torch.cat(hits).float().mean(0))


if __name__ == "__main__":
    print("| run | class % | beak colour % | wing colour % |\n|---|---:|---:|---:|")
    for run_dir in sys.argv[1:]:
        print(f"| {run_dir} | " + " | ".join(f"{v:.1f}" for v in cue_accuracy(run_dir)) + " |")
