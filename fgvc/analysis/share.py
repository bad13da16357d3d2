"""Share a finished run: a self-contained model folder in the Hugging Face Hub layout (see
fgvc/engine/model_folder.py), its model card, and the upload.

    export_run(run_dir, out_dir)       model.safetensors, config.json, recipe.yaml, README.md (+ metrics)
    push_to_hub(out_dir, repo_id)      upload with huggingface_hub

A plain timm classifier is written under timm's own parameter names with timm's `pretrained_cfg`, so
`timm.create_model("local-dir:OUT", pretrained=True)` (or "hf-hub:REPO_ID") rebuilds it without fgvc.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from fgvc.config import flatten, load_recipe, to_yaml
from fgvc.engine.model_folder import CONFIG_FILE, FGVC_KEY, TIMM_PREFIX, exported_state, timm_loadable
from fgvc.engine.runs import RunInfo, load_run
from fgvc.errors import UserError

COPIED = ("metrics.json", "metrics.jsonl", "eval.json")  # the run's numbers travel with the weights
INTERVAL_Z = 1.96  # two-sided 95% normal quantile for the Wilson interval of an accuracy
NOT_TIMM_KEYS = ("url", "hf_hub_id", "file", "source", "tag", "license", "pool_size", "test_input_size")
COMMAND_SKIP = ("recipe", "output_dir", "overwrite", "train.resume")  # keys that do not change the model


def export_run(run_dir: str | Path, out_dir: str | Path) -> Path:
    """Write the model folder of a finished run into `out_dir` (which must not hold anything yet).
    The folder is assembled beside `out_dir` and renamed into place, so a failure leaves nothing half-written."""
    run_dir, out = Path(run_dir), Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"export folder '{out}' already exists and is not empty; choose a new folder or remove it.")
    run = load_run(run_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        meta = json.loads((run_dir / "model.json").read_text()) if (run_dir / "model.json").is_file() \
            else json.loads((run_dir / CONFIG_FILE).read_text())[FGVC_KEY]
        loadable = timm_loadable(meta["model"])
        prefix = TIMM_PREFIX if loadable else ""
        state = {k: v.detach().cpu().contiguous() for k, v in run.model.state_dict().items()}
        save_file(exported_state(state, prefix), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config = hub_config(run, meta, prefix)
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=1))
        (tmp / "recipe.yaml").write_text(to_yaml(run.cfg))
        for name in COPIED:
            if (run_dir / name).is_file():
                shutil.copy2(run_dir / name, tmp / name)
        (tmp / "README.md").write_text(model_card(run, config, run_dir))
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def hub_config(run: RunInfo, meta: dict, prefix: str) -> dict:
    """config.json: what a person, timm and fgvc each need to rebuild the model."""
    side = run.image_size
    architecture = run.cfg.model.backbone.split(".")[0]  # timm's name without the pretrained tag
    config = {"architecture": architecture if prefix else f"fgvc-{meta['model']['arch']}",
              "num_classes": len(run.class_names), "label_names": run.class_names,
              "input_size": [3, side, side], "mean": list(run.mean), "std": list(run.std)}
    if prefix:
        net = run.model.get_submodule(prefix.rstrip("."))
        pcfg = {k: v for k, v in dict(net.pretrained_cfg).items() if k not in NOT_TIMM_KEYS}
        pcfg |= {"architecture": architecture, "num_classes": len(run.class_names),
                 "input_size": [3, side, side], "fixed_input_size": bool(pcfg.get("fixed_input_size", False)),
                 "mean": list(run.mean), "std": list(run.std), "interpolation": "bilinear",
                 "crop_pct": round(1 / run.cfg.data.eval_resize, 4), "crop_mode": "center"}
        config["num_features"] = int(net.num_features)
        config["pretrained_cfg"] = pcfg
        model_args = getattr(net, "fgvc_model_args", {})  # timm passes them to create_model (e.g. a ViT's img_size)
        if model_args:
            config["model_args"] = model_args
    config[FGVC_KEY] = meta | {"state_prefix": prefix, "timm_loadable": bool(prefix)}
    return config


def original_command(cfg) -> str:
    """The train.py command that made the run: its named recipe plus every key that differs from it."""
    try:
        base = flatten(OmegaConf.to_container(load_recipe([f"recipe={cfg.recipe}"]), resolve=True))
    except UserError:  # made from a recipe file that is no longer there
        return "python fgvc/train.py recipe=recipe.yaml"
    now = flatten(OmegaConf.to_container(cfg, resolve=True))
    changed = [f"{k}={_cli(v)}" for k, v in now.items() if base.get(k) != v and k not in COMMAND_SKIP]
    return " ".join(["python fgvc/train.py", f"recipe={cfg.recipe}", *changed])


def _cli(value) -> str:
    if isinstance(value, list):
        return "[" + ",".join(map(str, value)) + "]"
    if isinstance(value, bool):
        return str(value).lower()
    return "''" if value == "" else str(value)


def wilson(p: float, n: int, z: float = INTERVAL_Z) -> tuple[float, float]:
    """95% Wilson score interval of an accuracy p measured on n images."""
    if n <= 0:
        return math.nan, math.nan
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def cost_per_image(run: RunInfo) -> tuple[int, int]:
    """(parameters, FLOPs of one image at the input size) with fgvc/analysis/cost.py's counter."""
    from fgvc.analysis.cost import count_flops, count_parameters  # torch.utils.benchmark: slow to import

    x = torch.zeros(1, 3, run.image_size, run.image_size)
    return count_parameters(run.model), count_flops(run.model, x)


def _pct(v) -> str:
    return "–" if v is None else f"{100 * v:.1f}%"


def model_card(run: RunInfo, config: dict, run_dir: Path) -> str:
    """README.md: data set and split, recipe and command, metrics with sample counts, cost, localization, limits."""
    cfg = run.cfg
    m = cfg.model
    metrics = json.loads((run_dir / "metrics.json").read_text()) if (run_dir / "metrics.json").is_file() else {}
    ev = json.loads((run_dir / "eval.json").read_text()) if (run_dir / "eval.json").is_file() else {}
    loc_file = run_dir / "localization" / "localization.json"
    loc = json.loads(loc_file.read_text()) if loc_file.is_file() else None
    params, flops = cost_per_image(run)
    loadable = config[FGVC_KEY]["timm_loadable"]
    what = {"classifier": f"timm `{m.backbone}`" + ("" if m.attention.type == "none" else
                                                    f" with `{m.attention.type}` attention ({m.attention.placement})"),
            "racnn": f"RA-CNN, {m.zoom.scales} scales of timm `{m.backbone}`",
            "dcn": f"DCN: coarse `{m.dcn.coarse_backbone}`, fine `{m.dcn.fine_backbone}` on {m.dcn.top_k} "
                   "patches"}[m.arch]
    K = len(run.class_names)
    lines = ["---", f"library_name: {'timm' if loadable else 'fgvc'}", "pipeline_tag: image-classification",
             "tags: [image-classification, fine-grained, fgvc]", "---", "",
             f"# {cfg.recipe}: {what}, {K} {cfg.data.name} classes", "",
             f"Fine-grained classifier trained with fgvc (model.arch={m.arch}), input {run.image_size} x "
             f"{run.image_size} px.", "", "## Use", "", "```bash",
             "python fgvc/predict.py THIS_FOLDER photo.jpg        # top-5 classes with names",
             "python fgvc/demo.py THIS_FOLDER                     # a local web page with the maps",
             "```", ""]
    if loadable:
        lines += ["With timm alone (no fgvc):", "", "```python", "import timm",
                  'model = timm.create_model("local-dir:THIS_FOLDER", pretrained=True).eval()  # or "hf-hub:REPO_ID"',
                  f"# or: timm.create_model(\"{config['architecture']}\", pretrained=True, num_classes={K},",
                  f"#         pretrained_cfg_overlay=dict(file=\"THIS_FOLDER/model.safetensors\", num_classes={K}))",
                  "names = model.pretrained_cfg[\"label_names\"]",
                  "transform = timm.data.create_transform(**timm.data.resolve_data_config(model=model))",
                  "```", ""]
    else:
        lines += [f"This architecture ({m.arch}) is fgvc's own: it needs fgvc to rebuild "
                  "(`fgvc.engine.runs.load_run(THIS_FOLDER)`).", ""]
    val, test = metrics.get("val", {}), metrics.get("test", {})
    lines += ["## Data", "",
              f"- Data set: `{cfg.data.name}` ({K} classes)" + (f", aircraft level `{cfg.data.aircraft_level}`"
                                                                 if cfg.data.name == "aircraft" else "") + ".",
              "- Split: the data set's official train/test split; validation is a stratified "
              f"{cfg.data.val_fraction:g} share of train (seed {cfg.seed}), used to choose the epoch; the test "
              "split was evaluated once.",
              f"- Images: {val.get('num_samples', '?')} validation, {test.get('num_samples', '?')} test."]
    if cfg.data.name == "synthetic":
        s = cfg.data.synthetic
        lines.append(f"- The synthetic set generated by fgvc ({s.num_classes} classes, {s.train_per_class} train and "
                     f"{s.test_per_class} test images per class, {s.image_size} px, data seed {s.seed}): cartoon "
                     "birds told apart by beak and wing-patch colour.")
    lines += ["", "## Recipe", "", "`recipe.yaml` in this folder is the resolved recipe. The run was made with", "",
              "```bash", original_command(cfg), "```", "",
              "and is repeated from this folder with `python fgvc/train.py recipe=THIS_FOLDER/recipe.yaml "
              "output_dir=runs/again`.", "",
              "Backbone weights at start: "
              f"{'timm pretrained' if m.pretrained else (m.weights or 'random (from scratch)')}; "
              f"{cfg.train.epochs} epochs, batch {cfg.train.batch_size} per process, {cfg.train.optimizer} lr "
              f"{cfg.train.lr:g}, {cfg.train.scheduler} schedule, precision {cfg.train.mixed_precision}; selected "
              f"epoch {metrics.get('best_epoch', '?')} ({metrics.get('selected', 'model')} weights).", "",
              "## Results", "", "| split | images | top-1 (95% interval) | top-5 | mean per-class accuracy |",
              "|---|---:|---:|---:|---:|"]
    for name, s in (("validation", val), ("test", test)):
        if s.get("num_samples"):
            lo, hi = wilson(s["top1"], s["num_samples"])
            lines.append(f"| {name} | {s['num_samples']} | {_pct(s['top1'])} ({_pct(lo)}–{_pct(hi)}) | "
                         f"{_pct(s.get('top5'))} | {_pct(s.get('mean_class_acc'))} |")
    extra = {k: v for k, v in test.items() if k.startswith("top1_")}
    if extra:
        lines += ["", "Test top-1 of the partial predictions: "
                  + ", ".join(f"{k[5:]} {_pct(v)}" for k, v in extra.items()) + "."]
    if ev:
        lines += ["", f"`fgvc/evaluate.py` on the {ev.get('split', 'test')} split ({ev['num_samples']} images): top-1 "
                  f"{_pct(ev['top1'])}, expected calibration error {ev['ece']:.3f}."]
    lines += ["", "## Cost per image", "",
              f"{params / 1e6:.3f} M parameters; {flops / 1e9:.4f} GFLOPs for one {run.image_size} px image "
              "(torch's FlopCounterMode via fgvc/analysis/cost.py: 2 FLOPs per multiply-add; pooling, "
              "resampling and elementwise work are not counted)."]
    if loc is not None:
        cols = [c for c in ("pointing", "pointing_class_parts", "energy_in_box", "box_iou")
                if any(c in s for s in loc["sources"].values())]
        lines += ["", "## Where it looks", "",
                  f"Measured by `fgvc/localize.py` on {len(loc['images'])} {loc['split']} images "
                  f"(pointing radius {loc['radius_fraction']} x box diagonal):", "",
                  "| map source | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
        for src, s in loc["sources"].items():
            lines.append(f"| {src} | " + " | ".join("–" if s.get(c) is None else f"{s[c]:.3f}" for c in cols) + " |")
    lines += ["", "## Limitations", "",
              f"- It knows only these {K} classes and always answers with one of them, also for a photo of "
              "something else; the probabilities are not calibrated for such photos.",
              f"- Photos are resized (short side {round(run.image_size * cfg.data.eval_resize)} px) and centre-cropped "
              f"to {run.image_size} px: whatever lies outside the centre square is not seen.",
              f"- The numbers above come from {test.get('num_samples', '?')} test images; the interval shows how "
              "far a repeat on other images may land."]
    if cfg.data.name == "synthetic":
        lines.append("- Trained on fgvc's synthetic cartoon birds: it has never seen a photograph.")
    else:
        lines.append(f"- The images of `{cfg.data.name}` come with their own terms of use; check them before "
                     "using this model commercially.")
    return "\n".join(lines) + "\n"


def push_to_hub(out_dir: Path, repo_id: str, private: bool = False) -> str:
    """Upload the folder to the Hub model repository `repo_id` (created if needed); returns its URL."""
    try:
        from huggingface_hub import HfApi

        api = HfApi()
        url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(folder_path=str(out_dir), repo_id=repo_id, repo_type="model",
                          commit_message="fgvc export")
    except Exception as err:  # offline, no token, no permission, bad name: all end the same way
        raise UserError(f"uploading '{out_dir}' to the Hugging Face Hub repository '{repo_id}' failed "
                        f"({type(err).__name__}); the folder is complete, so log in (`hf auth login`), go online "
                        f"and run `hf upload {repo_id} {out_dir}`.") from None
    return str(url)
