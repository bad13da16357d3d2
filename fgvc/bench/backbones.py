"""The backbone families fgvc supports, as tiny timm models for the family x feature matrix
(tests/test_backbones.py, `python fgvc/benchmark.py backbones` -> results/backbones.md).

Each family is one timm architecture built with pretrained=False and small keyword arguments (one or
two blocks, 32-64 channels, 56-64 px inputs), so a whole training step runs in a fraction of a second
on a CPU. The real sizes differ only in depth, width and input side: the code paths are the same.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from fgvc.analysis.localization import localize_run
from fgvc.analysis.maps import compute_maps
from fgvc.analysis.share import export_run
from fgvc.analysis.viewer import Viewer
from fgvc.config import load_recipe
from fgvc.engine.runs import load_run
from fgvc.engine.trainer import train
from fgvc.errors import UserError
from fgvc.evaluate import main as evaluate
from fgvc.predict import main as predict

_VIT = dict(depth=2, embed_dim=32, num_heads=2)
_SWIN = dict(window_size=4, embed_dim=32, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2))


@dataclass(frozen=True)
class Family:
    name: str  # as the matrix shows it
    backbone: str  # timm architecture
    args: dict[str, Any] = field(default_factory=dict)  # tiny create_model keyword arguments
    side: int = 64  # input side in pixels the tiny model is built for
    vit: bool = False  # a ViT family: prefix tokens and attention matrices (rollout, class-token attention)


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("ResNet", "test_resnet"),
    Family("ResNeXt", "resnext50_32x4d", dict(layers=(1, 1, 1, 1))),
    Family("ConvNeXt", "test_convnext"),
    Family("EfficientNet", "test_efficientnet"),
    Family("MobileNetV3", "mobilenetv3_small_050"),
    Family("RegNet", "regnetx_002"),
    Family("ViT", "vit_tiny_patch16_224", dict(img_size=64, **_VIT), vit=True),
    Family("DeiT distilled", "deit_tiny_distilled_patch16_224", dict(img_size=64, **_VIT), vit=True),
    Family("ViT registers", "vit_small_patch14_reg4_dinov2", dict(img_size=56, **_VIT), side=56, vit=True),
    Family("Swin v1", "swin_tiny_patch4_window7_224", dict(img_size=64, **_SWIN)),
    Family("Swin v2", "swinv2_tiny_window8_256", dict(img_size=64, **_SWIN)),
    Family("EVA-02", "eva02_tiny_patch14_224", dict(img_size=56, **_VIT), side=56, vit=True),
)}

# Backbones outside the families: each works through the owner of feature maps or stops with one sentence.
OUTSIDE: dict[str, Family] = {f.name: f for f in (
    Family("MambaOut (outside)", "test_mambaout", side=160),
    Family("MLP-Mixer (outside)", "mixer_s16_224", dict(img_size=64)),
)}

# matrix row label -> (model.arch, extra recipe overrides): another option of an arch is one more entry
ARCH_VARIANTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "classifier": ("classifier", ()),
    "racnn": ("racnn", ()),
    "racnn rollout": ("racnn", ("model.zoom.proposal=rollout",)),  # RAMS-Trans's boxes (ViT families only)
    "dcn": ("dcn", ()),
}
ARCHS = tuple(ARCH_VARIANTS)
MAP_FEATURES = ("cam", "gradcam", "rollout", "class_attention")
FEATURES = ("train", *MAP_FEATURES, "localize", "report", "export", "predict", "demo")
OK, STOPS, FAILS, GAP, SKIP = "ok", "stops", "fails", "gap", "skip"
SYMBOL = {OK: "✓", STOPS: "— (one sentence)", FAILS: "✗", GAP: "✗ (known gap)", SKIP: "·"}

# (family, arch, feature) cells that do not work yet, marked in the matrix (and the test allows them)
KNOWN_GAPS: set[tuple[str, str, str]] = set()


@dataclass
class Cell:
    status: str  # OK | STOPS (a UserError: the combination cannot exist) | FAILS (anything else) | GAP | SKIP
    note: str = ""  # the sentence or the error
    seconds: float = 0.0  # how long the check took

    def text(self) -> str:
        return SYMBOL[self.status] if self.status in (OK, SKIP) else f"{SYMBOL[self.status]} {self.note}"


def _value(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(map(str, v)) + "]"
    return str(v).lower() if isinstance(v, bool) else str(v)


def recipe_args(family: Family, variant: str, run_dir: Path, data_root: Path) -> list[str]:
    """train.py arguments of one tiny run: 3 synthetic classes, 4 training images each, one epoch."""
    arch, extra = ARCH_VARIANTS[variant]
    side = family.side
    image = 2 * side if arch == "dcn" else side  # the DCN: coarse image and fine patches both at `side`
    args = [f"output_dir={run_dir}", "overwrite=true", f"data.root={data_root}", "data.synthetic.num_classes=3",
            "data.synthetic.train_per_class=4", "data.synthetic.test_per_class=2", f"data.synthetic.image_size={image}",
            f"data.image_size={image}", "data.num_workers=0", "data.val_fraction=0.25", "train.batch_size=4",
            "train.epochs=1", "model.pretrained=false", "model.weights=''"]
    args += [f"model.backbone_args.{k}={_value(v)}" for k, v in family.args.items()] + list(extra)
    if arch == "classifier":
        return ["recipe=synth_baseline", f"model.backbone={family.backbone}", *args]
    if arch == "racnn":
        return ["recipe=synth_racnn", f"model.backbone={family.backbone}", "model.zoom.scales=2",
                "data.full_resolution=1", *args]
    return ["recipe=synth_dcn", f"model.dcn.coarse_backbone={family.backbone}",
            f"model.dcn.fine_backbone={family.backbone}", f"model.dcn.coarse_image_size={side}",
            f"model.dcn.patch_size={side}", "model.dcn.coarse_weights=''", "model.dcn.fine_weights=''",
            "train.dcn.k_max=0", *args]


def _attempt(fn: Callable[[], Any]) -> Cell:
    import time


    start = time.perf_counter()
    try:
        fn()
    except UserError as err:
        return Cell(STOPS, str(err), time.perf_counter() - start)
    except Exception as err:  # a traceback: the cell is broken
        first = str(err).splitlines()[0][:160] if str(err) else ""
        return Cell(FAILS, f"{type(err).__name__}: {first}", time.perf_counter() - start)
    return Cell(OK, "", time.perf_counter() - start)


def check_maps(run, source: str) -> None:
    """The source's maps of a loaded run (`load_run`) on two images: (B, H, W) in [0, 1] at the input
    size, or the one-sentence UserError of `sources_for` where the model has no such map."""
    import torch


    side = run.image_size
    out = compute_maps(run.model, torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(0)), [source])
    for name, m in out.maps.items():
        if m.shape != (2, side, side) or not bool(torch.isfinite(m).all()) or m.min() < 0 or m.max() > 1:
            raise RuntimeError(f"map '{name}' has shape {tuple(m.shape)} or values outside [0, 1]")
    if not out.maps:
        raise RuntimeError(f"source '{source}' gave no map")


def check_localize(run_dir: Path) -> None:
    """localize.py's pictures and scores on two test images, into RUN_DIR/localization."""

    out = run_dir / "localization"
    report = localize_run(run_dir, out, num_images=2, batch_size=2)
    if not report["pngs"] or not all((out / p).is_file() for p in report["pngs"]):
        raise RuntimeError("no pictures were written")
    if not any(s.get("pointing") is not None for s in report["sources"].values()):
        raise RuntimeError("no pointing-game score")


def check_report(run_dir: Path) -> None:
    """evaluate.py, then the report page with the localization pictures."""
    import contextlib
    import io


    with contextlib.redirect_stdout(io.StringIO()):
        code = evaluate([str(run_dir), "--batch-size", "4"])
    page = run_dir / "report.html"
    if code != 0 or not page.is_file() or "localization/grid_" not in page.read_text():
        raise RuntimeError(f"evaluate.py exited with {code} or the report page lacks the localization pictures")


def check_export(run_dir: Path, out: Path) -> None:
    """Export, then rebuild: timm alone for a plain classifier (equal logits), fgvc for the others."""
    import timm
    import torch


    export_run(run_dir, out)
    run = load_run(run_dir)
    x = torch.randn(2, 3, run.image_size, run.image_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = run.model(x)
        if run.cfg.model.arch == "classifier":
            rebuilt = timm.create_model(f"local-dir:{out}", pretrained=True).eval()(x)
        else:
            rebuilt = load_run(out).model(x)
    expected, rebuilt = (getattr(t, "logits", t) for t in (expected, rebuilt))
    if not torch.equal(expected, rebuilt):
        raise RuntimeError(f"the exported model's logits differ by up to {float((expected - rebuilt).abs().max()):.3g}")


def one_image(run_dir: Path) -> Path:

    root = Path(load_run(run_dir).cfg.data.root)
    return next(p for p in sorted(root.rglob("*.jpg")))


def check_predict(folder: Path, image: Path) -> None:
    import contextlib
    import io
    import json


    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        code = predict([str(folder), str(image), "--json", "--top", "2"])
    if code != 0 or len(json.loads(text.getvalue())[0]["top"]) != 2:
        raise RuntimeError(f"predict.py exited with {code}")


def check_demo(folder: Path, image: Path) -> None:

    viewer = Viewer(load_run(folder))
    analysis = viewer.analyse(image.read_bytes(), image.name)
    missing = [s for s in viewer.sources if s in MAP_FEATURES and s not in analysis.skipped
               and not any(k.startswith(s) for k in analysis.pictures)]
    if missing or "photo" not in analysis.pictures:
        raise RuntimeError(f"the page lacks the pictures of {missing}")


def family_row(family: Family, arch: str, work: Path, data_root: Path) -> dict[str, Cell]:
    """Every feature of one (family, arch variant of ARCH_VARIANTS): a one-epoch run in this process, then its maps, pictures
    and scores, export, predict.py and the demo page on the exported folder."""

    slug = "".join(c if c.isalnum() else "_" for c in f"{family.name}_{arch}").lower()
    run_dir = work / slug
    row = {"train": _attempt(lambda: train(load_recipe(recipe_args(family, arch, run_dir, data_root))))}
    if row["train"].status != OK:
        return row | {f: Cell(SKIP) for f in FEATURES[1:]}

    run = load_run(run_dir)
    for source in MAP_FEATURES:
        row[source] = _attempt(lambda: check_maps(run, source))
    row["localize"] = _attempt(lambda: check_localize(run_dir))
    row["report"] = _attempt(lambda: check_report(run_dir))
    exported = work / f"{slug}_export"
    if exported.is_dir() and not exported.is_symlink():  # the last matrix's export: `--work` is replaced
        shutil.rmtree(exported)
    row["export"] = _attempt(lambda: check_export(run_dir, exported))
    folder = exported if row["export"].status == OK else run_dir
    image = one_image(run_dir)
    row["predict"] = _attempt(lambda: check_predict(folder, image))
    row["demo"] = _attempt(lambda: check_demo(folder, image))
    for feature, cell in row.items():
        if cell.status == FAILS and (family.name, arch, feature) in KNOWN_GAPS:
            row[feature] = Cell(GAP, cell.note)
    return row


def build_matrix(work: Path, families: list[Family] | None = None, archs: tuple[str, ...] = ARCHS,
                 say: Callable[[str], None] = lambda s: None) -> dict[tuple[str, str], dict[str, Cell]]:
    """(family name, arch) -> feature -> Cell, for every family (default: FAMILIES and OUTSIDE)."""
    import logging

    logging.getLogger("fgvc").setLevel(logging.ERROR)
    data_root = work / "synthetic"
    matrix = {}
    for family in families or [*FAMILIES.values(), *OUTSIDE.values()]:
        for arch in archs:
            matrix[family.name, arch] = row = family_row(family, arch, work, data_root)
            say(f"{family.name:22s} {arch:10s} " + " ".join(f"{f}={c.status}({c.seconds:.1f}s)" for f, c in row.items()))
    return matrix


def matrix_markdown(matrix: dict[tuple[str, str], dict[str, Cell]], command: str) -> str:
    """results/backbones.md: the matrix, what its marks mean, the sentences, the command that made it."""
    lines = ["# Backbone families x features", "",
             f"Made by `{command}` (tiny timm models built with pretrained=False: one or two blocks, 32-64 channels,",
             "56-64 px inputs; a one-epoch run on a 3-class synthetic set per row, then every tool on that run).", "",
             "✓ works · — stops with one sentence (the combination does not exist; the sentence is below) · "
             "✗ a traceback (a bug) · ✗ (known gap) not built yet · · not tried (the run did not train)", "",
             "| family | backbone | arch | " + " | ".join(FEATURES) + " |",
             "|---|---|---|" + "---|" * len(FEATURES)]
    backbones = {f.name: f.backbone for f in [*FAMILIES.values(), *OUTSIDE.values()]}
    notes: dict[str, int] = {}
    for (family, arch), row in matrix.items():
        cells = []
        for feature in FEATURES:
            cell = row.get(feature, Cell(SKIP))
            if cell.status in (OK, SKIP):
                cells.append(SYMBOL[cell.status])
            else:
                number = notes.setdefault(cell.note, len(notes) + 1)
                cells.append(f"{SYMBOL[cell.status].split(' ')[0]} [{number}]")
        lines.append(f"| {family} | `{backbones.get(family, '')}` | {arch} | " + " | ".join(cells) + " |")
    if notes:
        lines += ["", "Sentences and errors:", ""] + [f"{n}. {note}" for note, n in notes.items()]
    ok = sum(c.status == OK for row in matrix.values() for c in row.values())
    broken = sum(c.status in (FAILS, GAP) for row in matrix.values() for c in row.values())
    lines += ["", f"Cells that work: {ok}; cells that end in an error other than a one-sentence stop: {broken}."]
    return "\n".join(lines) + "\n"
