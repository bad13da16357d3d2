"""The recipe: a typed schema holding every default, a recipe file stating what differs, and
`key=value` overrides from the command line.

    cfg = load_recipe(["recipe=cub_cbam", "train.lr=0.01"])

Order of precedence: schema defaults < the recipe's base (`base: cub_baseline`, itself possibly based
on another) < recipes/NAME.yaml < command-line overrides. Every key is declared once, with its
default and one line of meaning (`key`, fgvc/schema.py), its allowed values (`one_of`) and the
model.arch it applies to (`only_for`); `key_listing` prints them (`fgvc-train --keys`) and
`validate` is the one check of the resolved recipe. Every user mistake (unknown recipe, unknown key,
wrong type, bad choice, a key the model.arch ignores, a value out of range) raises `UserError` with
one sentence.

Interpolations between keys (`${data.image_size}`) resolve as in OmegaConf; a broken one (unknown
key, wrong type, a key that refers to itself) is one sentence. Resolvers (`${oc.env:VAR}`,
`${oc.decode:...}`, any `${name:...}`) are refused: the resolved recipe is what a run saves in its
recipe.yaml, its export and its model card, so a value read from the environment (a token) would be
published with the weights, and leaving it unresolved instead would make recipe.yaml depend on the
machine that reads it. Recipe names (`recipe=NAME`, `base: NAME`, the `recipe` key) are names of
files in recipes/, never paths: the default output_dir runs/<recipe> then stays inside runs/; a
recipe file elsewhere is given as `recipe=PATH.yaml`.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import MISSING, Field, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from fgvc.data.fractal import FractalSpec
from fgvc.data.synthetic import SyntheticSpec
from fgvc.errors import UserError
from fgvc.models.choices import TIMM_ATTENTION
from fgvc.schema import key, one_of, only_for, recipe_section

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"
DEFAULT_RECIPE = "synth_baseline"
BASE_KEY = "base"  # a recipe file's `base: NAME` names the recipe it states differences from
RECIPE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")  # a file name in recipes/ without .yaml: no folder, no ..
RESOLVER = re.compile(r"\$\{\s*[A-Za-z_][\w.-]*\s*:")  # `${name:` opens a resolver call, `${key}` an interpolation
ARCHS = ("classifier", "racnn", "dcn", "cfvit")
ATTENTION_TYPES = ("none", "se", "cbam", "residual", "gate", "stn",
                   *(n for n in TIMM_ATTENTION if n not in ("se", "cbam")), *(f"timm_{n}" for n in TIMM_ATTENTION))


# Keys added after runs had been saved, with the value those runs were trained with. A run folder's
# recipe.yaml holds every key of its day, so one that lacks a key predates it and gets this value:
# old runs still load and repeat exactly.
KEYS_ADDED_LATER = {
    "model.attention.residual_form": "output_mask",
    "model.attention.gate_width": "half",
    "model.dcn.top_hidden": True,
    "model.dcn.detach_fusion": False,
}
SAVED_RUN_MARK = "model.attention.reduction"  # a key every saved run's recipe.yaml has


# A recipe key is declared as `name: type = key(default, "one line of meaning")` (or `one_of(default,
# choices, "meaning")`, `only_for(*archs, default=..., help="meaning")`): `fgvc-train --keys` prints
# that line and tests/test_config.py fails for a key without one; a trailing `# comment` is not read.
# The generated sets' sections are their generators' own specs (defaults and help declared there).
SyntheticConfig = recipe_section(SyntheticSpec, "SyntheticConfig")
FractalConfig = recipe_section(FractalSpec, "FractalConfig")


@dataclass
class DataConfig:
    """Which images, and how they reach the network."""

    name: str = one_of("synthetic", ("cub", "cars", "aircraft", "nabirds", "synthetic", "fractal", "folder"),
                       "the data set's reader; folder: your own ROOT/train/CLASS/*.jpg and ROOT/test/CLASS/*.jpg")
    root: str = key("data/synthetic", "the data set's folder (synthetic: where it is written)")
    image_size: int = key(64, "network input side, pixels")
    val_fraction: float = key(0.1, "stratified share of train held out for model selection")
    num_workers: int = key(0, "loading processes; 0 = in the training process (the synthetic set, cached whole)")
    cache_mb: int = key(256, "decoded images kept in memory per data set and loading process; 0 = off")
    aircraft_level: str = one_of("variant", ("variant", "family", "manufacturer"), "FGVC-Aircraft's label level (100, 70 or 30 "
                                 "classes)")
    crop_scale: list[float] = key(default_factory=lambda: [0.6, 1.0], help="RandomResizedCrop area")
    hflip: float = key(0.5, "probability of a horizontal flip")
    color_jitter: float = key(0.0, "brightness/contrast/saturation strength; 0 = off")
    eval_resize: float = key(1.143, "evaluation: short side to image_size * this, then a centre crop; 256/224, ImageNet's")
    antialias: bool = key(False, "shrink with PIL's widened bilinear filter (PIL, torchvision) rather than bilinear sampling")
    full_resolution: float = key(1.0, "images delivered at this many times image_size (>= 1); RA-CNN's zooms and the spatial "
                                 "transformer cut their regions from those pixels and shrink the whole image to image_size "
                                 "themselves")
    randaugment: str = key("", "timm RandAugment string, e.g. rand-m9-mstd0.5-inc1; \"\" = off")
    random_erasing: float = key(0.0, "probability of erasing one rectangle of a training image")
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    fractal: FractalConfig = field(default_factory=FractalConfig)


@dataclass
class AttentionConfig:
    """Attention blocks in a classifier's backbone (fgvc/models/attention/)."""

    type: str = one_of("none", ATTENTION_TYPES, "fgvc's blocks, or a timm attention name")
    stages: list[int] = key(default_factory=list, help="backbone stages by index; [] = the method's default stages")
    placement: str = one_of("stage", ("stage", "block"), "after whole backbone stages, or inside every residual block")
    init: str = one_of("default", ("default", "identity"), "identity: a learned gamma = 0 makes the block start as the identity")
    reduction: int = key(16, "channel bottleneck ratio r (SE, CBAM)")
    kernel_size: int = key(7, "spatial gate kernel (CBAM)")
    stn_count: int = one_of(1, (1, 2, 4), "parallel spatial transformers, features concatenated (type=stn)")
    stn_sampler: str = one_of("bilinear", ("bilinear", "antialias"), "how the transformer samples its window (type=stn): the "
                              "paper's bilinear grid at the input size, or antialias (fgvc/models/resample.py: no moire; starts "
                              "as the plain network without the gamma blend)")
    stn_crop_only: bool = key(False, "type=stn: windows never larger than the image (side cut at 1, gradient passed through)")
    stn_start_scale: float = key(1.0, "type=stn: the window's side at initialisation, a fraction of the image: 1 the "
                                 "identity (whole image; its position has no gradient until it shrinks), below 1 "
                                 "a centred crop that can move from the first step")
    stn_fixed_scale: bool = key(False, "type=stn: the window keeps the stn_start_scale side, only its position is learned")
    mlp_bias: bool = key(True, "biases in the channel MLP (SE, CBAM; timm's CBAM has none)")
    spatial_order: str = one_of("max_mean", ("max_mean", "mean_max"), "CBAM's pooled maps (authors' / timm's order)")
    spatial_norm: bool = key(True, "batch norm after CBAM's 7x7 conv")
    spatial_bn_momentum: float = key(0.1, "that batch norm's momentum (PyTorch's default; CBAM's authors: 0.01)")
    spatial_bn_zero_init: bool = key(False, "zero-initialise that batch norm's weight (CBAM's authors' ResNet)")
    residual_form: str = one_of("paper", ("paper", "output_mask"), "paper: (1 + M(x)) * T(x); output_mask: (1 + M(T)) * T, the "
                                "mask from the trunk's output")
    gate_norm: str = one_of("sigmoid", ("sigmoid", "sum_one"), "gate: sigmoid + mean pool, or AG-Sononet's")
    gate_width: str = one_of("gating", ("gating", "half"), "gate inner width: C_g (AG-Sononet) or C_l / 2")


@dataclass
class ZoomConfig:
    """RA-CNN (Fu et al. 2017)."""

    scales: int = one_of(3, (2, 3), "the paper's settings: one or two zooms")
    share_backbone: bool = key(False, "one backbone for every scale instead of one per scale")
    fuse: str = one_of("features", ("features", "scores"), "the final prediction: a classifier on every scale's features, or "
                       "the scales' scores summed")
    min_side: float = key(2 / 3, "smallest box side, as a fraction of the current scale (reference code: half side >= 1/3)")
    mask_steepness: float = key(10.0, "k of the boxcar's sigmoids, per pixel of the delivered image")
    sampler: str = one_of("bilinear", ("bilinear", "antialias"), "how a zoom wider than the input in source pixels is read: "
                          "bilinear sampling (skips pixels: a moire of fine detail the antialiased first scale does not show) "
                          "or antialias (fgvc/models/resample.py)")
    proposal: str = one_of("apn", ("apn", "rollout"), "what proposes each zoom: the paper's attention proposal "
                           "network, or rollout (ViT, DeiT, EVA): RAMS-Trans's box around the largest region of the "
                           "attention rollout above 1.2x its mean, no proposal network to train")


@dataclass
class DcnConfig:
    """Dynamic Capacity Networks (Almahairi et al. 2016)."""

    coarse_backbone: str = key("test_resnet", "timm name of the coarse network (sees the whole image at low resolution)")
    coarse_stages: int = key(0, "0 = the whole coarse backbone, n = its first n stages")
    coarse_image_size: int = key(0, "coarse network's input side; 0 = data.image_size // 2")
    fine_backbone: str = key("test_resnet", "timm name of the fine network (sees the top_k patches at full resolution)")
    patch_size: int = key(32, "fine patch side at full resolution, pixels")
    top_k: int = key(4, "patches given to the fine network")
    saliency: str = one_of("cam", ("entropy", "cam"), "cam: the coarse net's CAM, no backward; entropy: the paper's gradient "
                           "of the prediction's entropy")
    exit_threshold: float = key(2.0, "coarse confidence to stop early; > 1 means never")
    whole_image: bool = key(False, "the full-image fine counterpart: fine backbone on the whole image")
    pool: str = one_of("avg", ("avg", "max"), "top layers' global pool (max: the paper's)")
    top_layers: str = one_of("fuse", ("mix", "fuse"), "mix (paper): fine replaces coarse cells; fuse: [coarse; attn(patches)]")
    coarse_weights: str = key("", "a local .safetensors / .pth file for the coarse network (dcn does not use model.weights)")
    fine_weights: str = key("", "the same for the fine network")
    detach_fusion: bool = key(True, "fuse: the fused classifier's loss trains only it; each network learns from its branch's "
                              "loss")
    top_hidden: bool = key(False, "true: the paper's 1x1 conv + ReLU before pooling (collapsed in training: "
                           "results/coarse_fine/design.md); false: pool, classify")


@dataclass
class CfvitConfig:
    """CF-ViT (Chen et al., AAAI 2023): coarse-to-fine tokens inside one vision transformer (models/cfvit.py)."""

    coarse_grid: int = key(0, "coarse token grid side, half the fine one; 0 = data.image_size / patch / 2 (paper: 7 at 224 px)")
    share: float = key(0.5, "share of the coarse tokens re-split into 2x2 full-resolution tokens at inference (paper: 0.5)")
    rank_layers: list[int] = key(default_factory=list, help="blocks whose class attention ranks tokens; [] = 4th to last (paper)")
    rank_decay: float = key(0.99, "EMA of the class attention over those blocks, g = d * g + (1 - d) * a_l (paper: 0.99)")
    reuse: bool = key(True, "feature reuse: MLP(LN(coarse final tokens)) added to the fine patch embeddings (paper: on)")
    exit_threshold: float = key(2.0, "coarse confidence to stop after the coarse pass; > 1 = never (authors' headline: 1, never)")


@dataclass
class ModelConfig:
    """The network: model.arch and its backbone(s)."""

    arch: str = one_of("classifier", ARCHS, "classifier: a backbone with optional attention; racnn: RA-CNN zooms; dcn: "
                       "coarse/fine DCN; cfvit: CF-ViT's coarse-to-fine tokens in one transformer")
    backbone: str = only_for("classifier", "racnn", "cfvit", default="test_resnet", help="any timm name (dcn: model.dcn.*)")
    pretrained: bool = key(False, "start from timm's pretrained weights (downloaded from the Hugging Face hub)")
    weights: str = key("", "a local .safetensors / .pth file of backbone weights")
    backbone_args: dict[str, Any] = key(default_factory=dict, help="extra timm create_model arguments of every "
                                        "backbone (exported as timm model_args)")
    drop_rate: float = only_for("classifier", "cfvit", default=0.0, help="dropout before the classifier")
    drop_path: float = only_for("classifier", "racnn", "dcn", "cfvit", default=0.0,
                               help="stochastic depth rate of the timm backbone(s)")
    attention: AttentionConfig = only_for("classifier", default_factory=AttentionConfig)
    zoom: ZoomConfig = only_for("racnn", default_factory=ZoomConfig)
    dcn: DcnConfig = only_for("dcn", default_factory=DcnConfig)
    cfvit: CfvitConfig = only_for("cfvit", default_factory=CfvitConfig)


@dataclass
class ZoomTrainConfig:
    """RA-CNN's alternating training (Fu et al. 2017, section 3.4)."""

    rank_margin: float = key(0.05, "margin of the pairwise ranking loss: a finer scale must beat the coarser by this much")
    rank_margins: list[float] = key(default_factory=list, help="margin per pair of neighbouring scales; empty: "
                                    "rank_margin")
    apn_lr_mults: list[float] = key(default_factory=list, help="lr multiplier per proposal network (zoom 1, 2); empty: 1")
    rank_weight: float = key(1.0, "weight of the ranking loss in the proposal steps")
    pretrain_epochs: int = key(1, "classifiers with fixed boxes before alternation")
    cls_steps: int = key(20, "alternation: classification steps (boxes fixed)")
    apn_steps: int = key(10, "alternation: proposal steps (ranking loss only)")


@dataclass
class DcnTrainConfig:
    """The DCN's losses and its schedule of patches per update."""

    hint_weight: float = key(0.0, "the paper's hint loss (1.0 in the paper; results/coarse_fine/design.md for why fgvc uses 0)")
    coarse_weight: float = key(1.0, "cross-entropy on the coarse prediction (for early exit)")
    fine_weight: float = key(1.0, "cross-entropy on the patch branch alone (the k refined patches)")
    k_min: int = key(1, "k drawn per update from k_min..k_max (when k_max > 0)")
    k_max: int = key(0, "0: always model.dcn.top_k")
    random_share: float = key(0.25, "share of the k training patches drawn at random instead of by saliency")
    fine_epochs: int = key(0, "stage 1: every training patch random")
    select_epochs: int = key(0, "stage 2: fine network frozen; then joint")


@dataclass
class CfvitTrainConfig:
    """CF-ViT's losses and stages, as in the authors' code (deit/engine_deit.py, main_deit.py)."""

    fine_weight: float = key(1.0, "cross-entropy on the fine pass (authors: 1)")
    coarse_weight: float = key(0.0, "cross-entropy on the coarse pass (authors: 0, it learns by distillation only)")
    distill_weight: float = key(1.0, "KL(softmax(stop-gradient fine logits) || softmax(coarse logits)), batch mean (authors: 1)")
    select_from: float = key(0.67, "share of the epochs re-splitting every token; then only model.cfvit.share "
                             "(authors: 200 of 300)")


@dataclass
class TrainConfig:
    """Optimisation, checkpoints and logging (fgvc/engine/)."""

    epochs: int = key(30, "passes over the training split")
    batch_size: int = key(32, "per process")
    lr: float = key(0.1, "peak learning rate (after warm-up)")
    weight_decay: float = key(5.0e-4, "L2 weight decay of the optimizer")
    warmup_epochs: int = key(1, "epochs of linear lr warm-up")
    optimizer: str = key("sgd", "any timm optimizer name")
    momentum: float = key(0.9, "SGD momentum (optimizers that have one)")
    scheduler: str = key("cosine", "any timm scheduler name")
    min_lr: float = key(0.0, "lr at the end of the schedule")
    mixed_precision: str = one_of("no", ("no", "fp16", "bf16"), "Accelerate's mixed precision (a GPU's)")
    grad_accum_steps: int = key(1, "batches whose gradients add up before one optimizer step")
    clip_grad: float = key(0.0, "max gradient norm; 0 = off")
    label_smoothing: float = key(0.1, "label smoothing of the cross-entropy")
    mixup: float = key(0.0, "mixup alpha; 0 = off")
    cutmix: float = key(0.0, "cutmix alpha; 0 = off")
    ema: bool = key(False, "keep an exponential moving average of the weights and evaluate it")
    ema_decay: float = key(0.999, "that average's decay per step")
    ema_warmup: bool = key(False, "EMA decay ramps up from 0 (timm ModelEmaV3 warm-up)")
    layer_decay: float = key(0.0, "layer-wise lr decay of the backbone (ViT, Swin, ConvNeXt ...); 0 = off")
    channels_last: bool = key(False, "model and inputs in channels-last memory format")
    compile: bool = key(False, "torch.compile the model")
    grad_checkpointing: bool = key(False, "recompute backbone activations in backward (timm models)")
    new_lr_mult: float = key(1.0, "lr multiplier for the new classifier(s) when the backbone is pretrained")
    new_block_lr_mult: float = key(1.0, "the same for other parameters that are not pretrained (attention blocks, proposal nets)")
    resume: str = key("", "\"\" | auto | a checkpoint folder")
    keep_checkpoints: int = key(2, "checkpoint folders kept in the run folder (the newest)")
    log_with: str = key("", "\"\" = none | Accelerate tracker names: tensorboard, wandb, mlflow, ... (comma-separated)")
    log_every: int = key(10, "steps between progress-bar loss updates")
    zoom: ZoomTrainConfig = only_for("racnn", default_factory=ZoomTrainConfig)
    dcn: DcnTrainConfig = only_for("dcn", default_factory=DcnTrainConfig)
    cfvit: CfvitTrainConfig = only_for("cfvit", default_factory=CfvitTrainConfig)


@dataclass
class Recipe:
    """A whole recipe: the run's name and folder, then the data, model and train sections."""

    recipe: str = key(DEFAULT_RECIPE, "the recipe's name: recipes/NAME.yaml")
    seed: int = key(0, "seed of every random choice of the training (data order, augmentation, initialisation)")
    output_dir: str = key("", "\"\" = runs/<recipe>")
    overwrite: bool = key(False, "replace a finished run in output_dir (command line only; the old one is set aside)")
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


INF = float("inf")
# key, lowest, highest allowed value (inclusive)
RANGES: list[tuple[str, float, float]] = [
    ("data.image_size", 1, INF), ("data.hflip", 0, 1), ("data.color_jitter", 0, INF), ("data.eval_resize", 1, INF),
    ("train.weight_decay", 0, INF), ("train.min_lr", 0, INF), ("train.momentum", 0, 1), ("train.warmup_epochs", 0, INF),
    ("train.clip_grad", 0, INF), ("train.label_smoothing", 0, 1), ("train.mixup", 0, INF), ("train.cutmix", 0, INF),
    ("train.ema_decay", 0, 1), ("train.new_lr_mult", 0, INF), ("train.new_block_lr_mult", 0, INF),
    ("train.keep_checkpoints", 1, INF),
    ("model.cfvit.coarse_grid", 0, INF), ("model.cfvit.share", 0, 1), ("model.cfvit.rank_decay", 0, 1),
    ("train.cfvit.fine_weight", 0, INF), ("train.cfvit.coarse_weight", 0, INF), ("train.cfvit.distill_weight", 0, INF),
    ("train.cfvit.select_from", 0, 1),
    ("train.log_every", 1, INF), ("data.synthetic.hidden", 0, 1), ("data.synthetic.texture_fine", 0, 1),
    ("data.synthetic.cue_strength", 0, 1), ("data.synthetic.position_spread", 0, 1), ("data.synthetic.scale_min", 0.01, 1),
    ("data.fractal.class_colours", 0, 1),
]


def available_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def _all_keys(node: Any, prefix: str = "") -> list[str]:
    keys = []
    for k, v in node.items():
        full = f"{prefix}{k}"
        keys.append(full)
        if isinstance(v, DictConfig):
            keys += _all_keys(v, full + ".")
    return keys


RENAMED_KEYS = {"train.tensorboard": "train.log_with=tensorboard (or train.log_with='' for none)"}


def _initials(name: str) -> str:
    return "".join(word[:1] for word in name.split("_"))


def closest_key(key: str, known: list[str]) -> str | None:
    """The key the user most likely meant: first in the same section, where an abbreviation
    (`learning_rate` for `lr`, `wd` for `weight_decay`) or a close spelling of the last part counts;
    then a close spelling of the whole dotted key."""
    section, _, leaf = key.rpartition(".")
    siblings = {k.rpartition(".")[2]: k for k in known if k.rpartition(".")[0] == section}
    for name, full in siblings.items():
        if _initials(leaf) == name or _initials(name) == leaf:
            return full
    close = difflib.get_close_matches(leaf, list(siblings), n=1, cutoff=0.6)
    if close:
        return siblings[close[0]]
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.75)
    return close[0] if close else None


def _unknown_key(key: str, where: str) -> UserError:
    if key in RENAMED_KEYS:
        return UserError(f"recipe key '{key}' was replaced ({where}); write {RENAMED_KEYS[key]} instead.")
    close = closest_key(key, _all_keys(OmegaConf.structured(Recipe)))
    hint = f"did you mean '{close}'?" if close else "`fgvc-train --keys` lists every key."
    return UserError(f"recipe key '{key}' does not exist ({where}); {hint}")


def _merge(base: DictConfig, other: DictConfig, where: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)  # type: ignore[return-value]
    except ConfigKeyError as err:
        raise _unknown_key(str(err.full_key), where) from None
    except ValidationError as err:
        raise UserError(f"recipe key '{err.full_key}' got {err.value!r} ({where}), which is not a valid "
                        f"{_type_name(base, str(err.full_key))}; fix the value.") from None
    except OmegaConfBaseException as err:
        raise UserError(f"{where}: {str(err).splitlines()[0]}") from None
    except TypeError:  # a list where the schema has a section, or a section where it has a list
        key = _container_mismatch(base, other)
        if key is None:
            raise UserError(f"{where} holds a list where the recipe has a section of keys, or the reverse; "
                            "see fgvc/config.py for the form of each key.") from None
        is_list = isinstance(OmegaConf.select(base, key), ListConfig)
        wanted = "a list such as [0.6, 1.0]" if is_list else "a section of keys"
        raise UserError(f"recipe key '{key}' must be {wanted} ({where}); see fgvc/config.py for its form.") from None


def _container_mismatch(base: Any, other: Any, prefix: str = "") -> str | None:
    """The first dotted key where `other` has a list and `base` a section, or the reverse."""
    for k, v in other.items():
        b = base.get(k) if isinstance(base, DictConfig) else None
        if isinstance(v, DictConfig) != isinstance(b, DictConfig) and isinstance(b, (DictConfig, ListConfig)):
            return f"{prefix}{k}"
        if isinstance(v, DictConfig) and isinstance(b, DictConfig):
            found = _container_mismatch(b, v, f"{prefix}{k}.")
            if found:
                return found
    return None


def _load_file(path: Path, where: str) -> DictConfig:
    """A recipe file as a mapping of keys, or one sentence saying what is wrong with it."""
    try:
        if yaml.safe_load(path.read_text(encoding="utf-8")) is None:  # no document at all; `{}` is a recipe
            raise UserError(f"recipe file '{where}' is empty; state the keys that differ from the defaults "
                            f"(`{{}}` for none), or use recipe={DEFAULT_RECIPE} to train on the defaults.")
        loaded = OmegaConf.load(path)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or "a syntax error"
        raise UserError(f"recipe file '{where}' is not valid YAML ({problem}{at}); fix that line.") from None
    except UnicodeDecodeError:
        raise UserError(f"recipe file '{where}' is not UTF-8 text; save it as UTF-8.") from None
    if isinstance(loaded, ListConfig):
        raise UserError(f"recipe file '{where}' holds a list; a recipe is a mapping of keys such as "
                        "'train: {lr: 0.01}' (see fgvc/config.py).")
    return loaded


def _type_name(cfg: DictConfig, key: str) -> str:
    try:
        value = OmegaConf.select(cfg, key)
    except OmegaConfBaseException:
        return "value"
    return type(value).__name__ if value is not None else "value"


def _typed_overrides(schema: DictConfig, overrides: list[str]) -> DictConfig:
    """The `key=value` overrides as a config. YAML 1.1 reads `no`, `off`, `yes`, `on` as booleans
    (and `1e-3` as a string): a value typed for a string key reaches the schema as the text typed."""
    try:
        dotlist = OmegaConf.from_dotlist(overrides)
    except OmegaConfBaseException as err:
        raise UserError(f"cannot parse the command-line overrides: {str(err).splitlines()[0]}") from None
    for arg in overrides:
        key, value = arg.split("=", 1)
        key = key.lstrip("+")
        try:
            wanted = OmegaConf.select(schema, key)
            typed = OmegaConf.select(dotlist, key)
        except OmegaConfBaseException:
            continue  # an unknown key: the merge names it
        if isinstance(wanted, str) and not isinstance(typed, str):
            OmegaConf.update(dotlist, key, value, merge=False)
    return dotlist


def _parse_overrides(args: list[str]) -> tuple[str | None, list[str]]:
    recipe, rest = None, []
    for arg in args:
        if "=" not in arg:
            raise UserError(f"argument '{arg}' is not of the form key=value; write e.g. train.lr=0.01.")
        key, value = arg.split("=", 1)
        if key.lstrip("+") == "recipe":
            recipe = value
        else:
            rest.append(arg)
    return recipe, rest


def _unknown_recipe(name: str, where: str) -> UserError:
    recipes = available_recipes()
    close = difflib.get_close_matches(name, recipes, n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    return UserError(f"recipe '{name}'{where} does not exist; {hint}known recipes: {', '.join(recipes)}")


def _layers(path: Path, where: str, chain: tuple[str, ...]) -> list[tuple[DictConfig, str]]:
    """The recipe file at `path` and, base first, the recipes it is based on: (layer, where) pairs."""
    layer = _load_file(path, where)
    layer.pop("overwrite", None)  # only the command line may replace a run, never a recipe file
    base = layer.pop(BASE_KEY, None)
    if base is None:
        return [(layer, where)]
    base = str(base)
    _check_name(base, f"the '{BASE_KEY}:' of {where}")
    if base in chain:
        raise UserError(f"recipe bases form a cycle ({' -> '.join((*chain, base))}); remove one of their "
                        f"'{BASE_KEY}:' lines.")
    base_path = RECIPES_DIR / f"{base}.yaml"
    if not base_path.is_file():
        raise _unknown_recipe(base, f" (the {BASE_KEY} of {where})")
    return _layers(base_path, f"recipes/{base}.yaml", (*chain, base)) + [(layer, where)]


def _fill_keys_added_later(layer: DictConfig) -> DictConfig:
    """A saved run's recipe with the values of KEYS_ADDED_LATER it lacks, and without the keys its
    model.arch does not read: recipe.yaml holds every key with its day's default, and a default that
    changed since (model.dcn.saliency in a plain classifier's run) would read as a key set for the
    wrong arch. Other files unchanged."""
    if not isinstance(layer, DictConfig) or OmegaConf.select(layer, SAVED_RUN_MARK) is None:
        return layer
    for name, value in KEYS_ADDED_LATER.items():
        if OmegaConf.select(layer, name) is None:
            OmegaConf.update(layer, name, value)
    arch = OmegaConf.select(layer, "model.arch") or Recipe().model.arch
    for dotted in keys_unread_by(arch):
        section, _, name = dotted.rpartition(".")
        parent = OmegaConf.select(layer, section) if section else layer
        if isinstance(parent, DictConfig) and name in parent:
            del parent[name]
    return layer


def load_recipe(args: list[str] | None = None, recipe_file: str | Path | None = None) -> DictConfig:
    """Build the resolved recipe from `recipe=NAME` (or `recipe_file`) and `key=value` overrides."""
    name, overrides = _parse_overrides(list(args or []))
    cfg = OmegaConf.structured(Recipe)
    if recipe_file is None and name is not None and name.endswith((".yaml", ".yml")):
        recipe_file, name = name, None  # recipe=runs/x/recipe.yaml repeats a saved run
    if recipe_file is not None:
        path = Path(recipe_file)
        if not path.is_file():
            raise UserError(f"recipe file '{path}' does not exist; give the recipe.yaml of a run folder.")
        layers = _layers(path, str(path), ())
        layers[-1] = (_fill_keys_added_later(layers[-1][0]), layers[-1][1])
    else:
        name = name or DEFAULT_RECIPE
        _check_name(name, "recipe")
        path = RECIPES_DIR / f"{name}.yaml"
        if not path.is_file():
            raise _unknown_recipe(name, "")
        layers = _layers(path, f"recipes/{name}.yaml", (name,))
    for layer, where in layers:
        cfg = _merge(cfg, layer, where)
    if name is not None:
        cfg.recipe = name
    cfg = _merge(cfg, _typed_overrides(cfg, overrides), "command line")
    _check_interpolations(cfg)
    _check_name(cfg.recipe, "recipe key 'recipe'")
    validate(cfg)
    if not cfg.output_dir:
        cfg.output_dir = f"runs/{cfg.recipe}"
    return cfg


def _check_name(name: str, what: str) -> None:
    if not RECIPE_NAME.fullmatch(str(name)):
        raise UserError(f"{what} is '{name}', which is not a recipe name (a file of recipes/ without .yaml: letters, digits, "
                        "'_', '-', '.'); give a recipe file elsewhere as recipe=PATH.yaml.")


def _check_interpolations(cfg: DictConfig) -> None:
    """Refuse resolver calls, then resolve every `${key}` interpolation once: an error is one sentence."""
    for name, value in flatten(OmegaConf.to_container(cfg, resolve=False)).items():
        values = value if isinstance(value, list) else [value]
        call = next((RESOLVER.search(v) for v in values if isinstance(v, str) and RESOLVER.search(v)), None)
        if call is not None:
            raise UserError(f"recipe key '{name}' calls the resolver '{call.group(0)}...}}', and recipes may not read "
                            "the environment or run resolvers (the value would be saved in recipe.yaml, exports and "
                            "model cards); write the value itself, e.g. on the command line.")
    try:
        OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as err:
        name = getattr(err, "full_key", None) or "?"
        reason = str(err).splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"recipe key '{name}' holds an interpolation that cannot be resolved ({reason}); refer to "
                        "another key of the recipe that exists and has the right type, or write the value.") from None


def _schema_fields(schema: type, prefix: str = "") -> list[tuple[str, Field]]:
    """Every field of the schema, sections before their keys: [("data", ...), ("data.name", ...), ...]."""
    found = []
    for f in fields(schema):
        found.append((prefix + f.name, f))
        if f.default_factory is not MISSING and is_dataclass(f.default_factory):
            found += _schema_fields(f.default_factory, f"{prefix}{f.name}.")
    return found


def keys_unread_by(arch: str) -> tuple[str, ...]:
    """The schema keys and sections (dotted names) that model.arch=`arch` does not read (`only_for`)."""
    return tuple(dotted for dotted, f in _schema_fields(Recipe)
                 if f.metadata.get("archs") is not None and arch not in f.metadata["archs"])


def _shown(value: Any) -> str:
    """A default as it is written on the command line."""
    if isinstance(value, str):
        return value if value else "''"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def key_listing() -> str:
    """Every recipe key, section by section: type, default, choices, the model.arch values that read it,
    its allowed range and its one line of meaning, all read from the schema (`fgvc-train --keys`)."""
    defaults = Recipe()
    ranges = {name: (low, high) for name, low, high in RANGES}
    archs_of: dict[str, tuple[str, ...]] = {}
    lines = ["Recipe keys (set them in recipes/NAME.yaml or on the command line as key=value):"]
    for dotted, f in _schema_fields(Recipe):
        section = dotted.rpartition(".")[0]
        archs = f.metadata.get("archs") or archs_of.get(section)
        if f.default_factory is not MISSING and is_dataclass(f.default_factory):
            archs_of[dotted] = archs
            doc = (f.default_factory.__doc__ or "").strip().splitlines()
            lines += ["", f"{dotted}:" + (f"  {doc[0]}" if doc and not doc[0].startswith(f.default_factory.__name__) else "")]
            continue
        value: Any = defaults
        for part in dotted.split("."):
            value = getattr(value, part)
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        facts = [kind, f"default {_shown(value)}"]
        if f.metadata.get("choices"):
            facts.append("one of " + ", ".join(map(str, f.metadata["choices"])))
        if dotted in ranges:
            low, high = ranges[dotted]
            facts.append(f">= {low:g}" if high == INF else f"{low:g} to {high:g}")
        if archs:
            facts.append("model.arch " + " or ".join(archs))
        lines += [f"  {dotted}  ({'; '.join(facts)})", f"      {f.metadata.get('help', '')}"]
    return "\n".join(lines)


def validate(cfg: DictConfig) -> None:
    """The one check of a resolved recipe: each key's choices, the keys each model.arch reads, ranges."""
    defaults = OmegaConf.structured(Recipe)
    for dotted, f in _schema_fields(Recipe):
        value = OmegaConf.select(cfg, dotted)
        choices = f.metadata.get("choices")
        if choices is not None and value not in choices:
            quote = " (in a YAML file write it in quotes, e.g. 'no')" if value in ("True", "False", True, False) else ""
            raise UserError(f"recipe key '{dotted}' is '{value}' but must be one of: {', '.join(map(str, choices))}{quote}.")
        archs = f.metadata.get("archs")
        default = OmegaConf.select(defaults, dotted)
        if archs is not None and cfg.model.arch not in archs and value != default:
            changed = dotted
            if isinstance(value, DictConfig):  # name the first key of the section that was set
                mine, theirs = (flatten(OmegaConf.to_container(c), dotted + ".") for c in (value, default))
                changed = next(k for k in mine if mine[k] != theirs[k])
            raise UserError(f"recipe key '{changed}' is set but model.arch={cfg.model.arch} ignores it; drop it, or "
                            f"use model.arch={' or '.join(archs)}.")
    d, m, t = cfg.data, cfg.model, cfg.train
    if d.val_fraction < 0 or d.val_fraction >= 1:
        raise UserError(f"data.val_fraction is {d.val_fraction} but must be in [0, 1).")
    if d.num_workers < 0 or d.cache_mb < 0:
        raise UserError("data.num_workers and data.cache_mb must each be 0 or more.")
    if t.grad_accum_steps < 1 or t.batch_size < 1 or t.epochs < 1:
        raise UserError("train.epochs, train.batch_size and train.grad_accum_steps must each be at least 1.")
    if m.attention.type in ("stn", "gate") and m.attention.placement != "stage":
        what = "resamples the image before the backbone" if m.attention.type == "stn" else \
            "gates whole stages with the deepest one"
        raise UserError(f"model.attention.type={m.attention.type} {what}; set model.attention.placement=stage.")
    if not 0 < m.attention.spatial_bn_momentum <= 1:
        raise UserError(f"model.attention.spatial_bn_momentum is {m.attention.spatial_bn_momentum} but must be in "
                        "(0, 1]; e.g. 0.1 (PyTorch) or 0.01 (CBAM's authors).")
    if not 0 < m.zoom.min_side <= 1:
        raise UserError(f"model.zoom.min_side is {m.zoom.min_side} but must be in (0, 1]; e.g. 0.67.")
    z = cfg.train.zoom
    for name, values in (("rank_margins", z.rank_margins), ("apn_lr_mults", z.apn_lr_mults)):
        if values and (m.arch != "racnn" or len(values) != m.zoom.scales - 1 or min(values) < 0):
            raise UserError(f"train.zoom.{name} is {list(values)} but needs one value >= 0 per zoom of model.arch=racnn "
                            f"({m.zoom.scales - 1} with model.zoom.scales={m.zoom.scales}); e.g. "
                            f"[{', '.join(['0.05'] * (m.zoom.scales - 1))}], or [] for the single value.")
    if m.zoom.mask_steepness <= 0:
        raise UserError(f"model.zoom.mask_steepness is {m.zoom.mask_steepness} but must be positive; e.g. 10.")
    if m.attention.stn_sampler != "bilinear" and m.attention.type != "stn":
        raise UserError(f"model.attention.stn_sampler is {m.attention.stn_sampler} but only model.attention.type=stn "
                        "reads it; drop it or set model.attention.type=stn.")
    if m.attention.stn_crop_only and m.attention.type != "stn":
        raise UserError("model.attention.stn_crop_only is true but only model.attention.type=stn reads it; "
                        "drop it or set model.attention.type=stn.")
    if m.attention.stn_start_scale != 1 and m.attention.type != "stn":
        raise UserError(f"model.attention.stn_start_scale is {m.attention.stn_start_scale} but only "
                        "model.attention.type=stn reads it; drop it or set model.attention.type=stn.")
    if m.attention.stn_fixed_scale and m.attention.type != "stn":
        raise UserError("model.attention.stn_fixed_scale is true but only model.attention.type=stn reads it; "
                        "drop it or set model.attention.type=stn.")
    if m.attention.stn_count != 1 and m.attention.type != "stn":
        raise UserError(f"model.attention.stn_count is {m.attention.stn_count} but only model.attention.type=stn "
                        "reads it; drop it or set model.attention.type=stn.")
    if d.full_resolution < 1:
        raise UserError(f"data.full_resolution is {d.full_resolution} but must be at least 1 (1 = images at "
                        "data.image_size); e.g. 1.5.")
    if d.full_resolution != 1 and not (m.arch == "racnn" or m.attention.type == "stn"):
        raise UserError(f"data.full_resolution is {d.full_resolution} but only model.arch=racnn and "
                        "model.attention.type=stn read pixels beyond data.image_size; set data.full_resolution=1.")
    if m.cfvit.share <= 0:
        raise UserError(f"model.cfvit.share is {m.cfvit.share} but must be above 0 (the fine pass re-splits at least "
                        "one token); the paper's is 0.5.")
    if m.cfvit.rank_decay >= 1:
        raise UserError(f"model.cfvit.rank_decay is {m.cfvit.rank_decay} but must be below 1 (at 1 the average never "
                        "moves from 0); the paper's is 0.99.")
    if m.dcn.top_k < 0 or m.dcn.patch_size < 1:
        raise UserError("model.dcn.top_k must be at least 0 and model.dcn.patch_size at least 1.")
    d = t.dcn
    if d.k_max and not 1 <= d.k_min <= d.k_max:
        raise UserError(f"train.dcn.k_min ({d.k_min}) must be in 1..train.dcn.k_max ({d.k_max}); "
                        "or set train.dcn.k_max=0 to train at model.dcn.top_k.")
    if d.k_max < 0 or d.fine_epochs < 0 or d.select_epochs < 0 or not 0 <= d.random_share <= 1:
        raise UserError("train.dcn.k_max, fine_epochs and select_epochs must be 0 or more and "
                        "train.dcn.random_share in [0, 1].")
    for dotted, low, high in RANGES:
        value = OmegaConf.select(cfg, dotted)
        if not low <= value <= high:
            bound = f"at least {low}" if high == INF else f"between {low} and {high}"
            raise UserError(f"recipe key '{dotted}' is {value} but must be {bound}.")
    if cfg.train.lr <= 0:
        raise UserError(f"train.lr is {cfg.train.lr} but must be more than 0.")
    for dotted in ("data.random_erasing", "model.drop_path", "train.layer_decay"):
        if not 0 <= OmegaConf.select(cfg, dotted) <= 1:
            raise UserError(f"{dotted} is {OmegaConf.select(cfg, dotted)} but must be in [0, 1].")
    if cfg.data.randaugment and not cfg.data.randaugment.startswith("rand"):
        raise UserError(f"data.randaugment is '{cfg.data.randaugment}' but must be a timm RandAugment string "
                        "such as rand-m9-mstd0.5-inc1, or empty.")
    # imported here: fgvc.models.build loads torch and timm (5.6 s against 0.3 s for this module, measured with
    # time.time() around the imports), which a recipe mistake or `--keys` never needs
    from fgvc.models.build import check_backbones

    check_backbones(cfg.model, cfg.data.image_size)  # a transformer is built for the side it reads, or one sentence


def flatten(d: dict, prefix: str = "") -> dict:
    """A nested recipe container as {"data.image_size": 64, ...}."""
    flat = {}
    for k, v in d.items():
        if isinstance(v, dict):
            flat |= flatten(v, f"{prefix}{k}.")
        else:
            flat[f"{prefix}{k}"] = v
    return flat


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)
