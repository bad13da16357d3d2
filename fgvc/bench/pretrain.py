"""fgvc's own pretrained starting point for the synthetic benchmark (the analogue of ImageNet before CUB).

    python fgvc/benchmark.py pretrain [--out weights] [--runs runs/pretrain] [--set key=value ...]

trains every backbone a `synth_` recipe uses (the classifier's, RA-CNN's, the DCN's coarse and fine
networks, the ViT's) on the fractal set (`recipes/fractal_pretrain.yaml`, or the backbone's own
`recipes/fractal_pretrain_*.yaml`; `data.name=fractal`: classes and cues
disjoint from the benchmark's birds) through the real training path, one run per backbone, and
writes `<out>/fractal_<backbone>.safetensors` (the backbone without its classifier, loadable with
`model.weights`, `model.dcn.coarse_weights`, `model.dcn.fine_weights`), its sha256 and a README
with the command, date and commit. Finished runs are reused when their recipe matches.
"""

from __future__ import annotations

import datetime
import hashlib
import json
from pathlib import Path

from omegaconf import OmegaConf

from fgvc.bench.synthetic import train_run
from fgvc.config import load_recipe
from fgvc.provenance import ROOT, code_version

PRETRAIN_RECIPE = "fractal_pretrain"  # the CNNs' recipe; a backbone with its own (`pretrain_recipe`) uses that
WEIGHTS_DIR = "weights"
HALF_ABOVE = 2_000_000  # tensors of larger backbones are stored in float16: half the repository size,
# and a pretrained start does not need the last bits (loading casts them back to the model's float32)


def synth_recipes() -> list[str]:
    return sorted(p.stem for p in (ROOT / "recipes").glob("synth_*.yaml"))


def pretrain_recipe(backbone: str) -> str:
    """The fractal recipe a backbone is pretrained with: the `fractal_pretrain_*` recipe whose
    model.backbone it is (a ViT trains unlike a CNN: recipes/fractal_pretrain_vit.yaml), else
    PRETRAIN_RECIPE."""
    own = [p.stem for p in sorted((ROOT / "recipes").glob(f"{PRETRAIN_RECIPE}_*.yaml"))
           if load_recipe([f"recipe={p.stem}"]).model.backbone == backbone]
    return own[0] if own else PRETRAIN_RECIPE


def recipe_backbones(cfg) -> dict[str, str]:
    """{role: timm name} of every backbone a recipe loads weights for; role is the recipe key that
    loads it (a backbone trained from scratch, its key empty, such as synth_cfvit's, is left out)."""
    m = cfg.model
    if m.arch == "dcn":
        roles = {"model.dcn.fine_weights": m.dcn.fine_backbone}
        if not m.dcn.whole_image:
            roles["model.dcn.coarse_weights"] = m.dcn.coarse_backbone
    else:
        roles = {"model.weights": m.backbone}
    return {role: backbone for role, backbone in roles.items() if OmegaConf.select(cfg, role)}


def synth_backbones() -> list[str]:
    """Every timm backbone the synth_ recipes start from fractal weights, each once."""
    names: set[str] = set()
    for recipe in synth_recipes():
        cfg = load_recipe([f"recipe={recipe}"])
        names |= set(recipe_backbones(cfg).values())
    return sorted(names)


def weights_name(backbone: str) -> str:
    return f"fractal_{backbone}.safetensors"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def export_backbone(run_dir: Path, backbone: str, path: Path, command: str) -> str:
    """The run's timm network without its classifier, as safetensors (metadata: backbone, command;
    float16 above HALF_ABOVE values);
    returns the file's sha256, also written next to it as `<file>.sha256`."""
    import timm
    from safetensors.torch import load_file, save_file

    state = load_file(str(run_dir / "model.safetensors"))
    head = timm.create_model(backbone, pretrained=False, num_classes=2).pretrained_cfg.get("classifier", "fc")
    heads = tuple(h + "." for h in (head if isinstance(head, (list, tuple)) else [head]))
    out = {k.removeprefix("net."): v.contiguous() for k, v in state.items()
           if k.startswith("net.") and not k.removeprefix("net.").startswith(heads)}
    if sum(v.numel() for v in out.values() if v.is_floating_point()) > HALF_ABOVE:
        out = {k: v.half() if v.is_floating_point() else v for k, v in out.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(out, str(tmp), metadata={"backbone": backbone, "made_by": command, "source": "fgvc fractal pretraining"})
    tmp.replace(path)
    path.chmod(0o644)  # safetensors writes owner-only files; these are shipped
    digest = sha256(path)
    path.with_name(path.name + ".sha256").write_text(f"{digest}  {path.name}\n")
    return digest


def pretrain(out: Path, runs_dir: Path, overrides: list[str], command: str, backbones: list[str] | None = None,
             log=print) -> dict[str, str]:
    """Train and export every backbone; returns {backbone: sha256}. Writes `out/README.md`."""
    source = code_version()
    rows, digests = [], {}
    for backbone in backbones or synth_backbones():
        recipe = pretrain_recipe(backbone)
        run = train_run(recipe, 0, runs_dir / backbone, [f"model.backbone={backbone}", *overrides], log)
        digests[backbone] = export_backbone(run, backbone, out / weights_name(backbone), command)
        m = json.loads((run / "metrics.json").read_text())
        rows.append(f"| `{weights_name(backbone)}` | {backbone} | `{recipe}` | {100 * m['val']['top1']:.1f} | "
                    f"{100 * m['test']['top1']:.1f} | {m['train_time_s']:.0f} | `{digests[backbone]}` |")
    lines = ["# Fractal-pretrained backbones of the synthetic benchmark", "",
             f"Command: `{command}`  ",
             f"Date: {datetime.date.today().isoformat()}, {source}.  ",
             "Recipe: each row's (`recipes/<recipe>.yaml`) with `model.backbone=<backbone>`"
             + (f" {' '.join(overrides)}" if overrides else "") + ", seed 0; the backbone without its classifier.", "",
             "| file | backbone | recipe | fractal val top-1 % | fractal test top-1 % | train time s | sha256 |",
             "|---|---|---|---:|---:|---:|---|", *rows, "",
             ("Check a file: `sha256sum -c <file>.sha256`. Loaded by the `synth_` recipes through `model.weights` "
              "(classifier, RA-CNN) and `model.dcn.coarse_weights` / `model.dcn.fine_weights` (DCN).")]
    (out / "README.md").write_text("\n".join(lines) + "\n")
    return digests
