"""The recipe: a typed schema holding every default, a recipe file stating what differs, and
`key=value` overrides from the command line.

    cfg = load_recipe(["recipe=cub_cbam", "train.lr=0.01"])

Order of precedence: schema defaults < recipes/NAME.yaml < command-line overrides. Every user
mistake (unknown recipe, unknown key, wrong type, bad choice) raises `UserError` with one sentence.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from fgvc.errors import UserError

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"
DEFAULT_RECIPE = "synth_baseline"


@dataclass
class SyntheticConfig:
    """The built-in synthetic fine-grained set (see fgvc/data/synthetic.py)."""

    num_classes: int = 16  # 4 beak x 4 wing colours: chance 6.25%
    train_per_class: int = 80  # a quarter of it is the validation split of the synth_ recipes (320 images)
    test_per_class: int = 100  # 1,600 test images: binomial standard error of top-1 at most 1 point from 80% up
    image_size: int = 192  # side of the written images, pixels (1.5x the 128-px network input)
    part_scale: float = 0.04  # size of the discriminative parts (beak, wing patch), fraction of the image side
    distractors: int = 6  # clutter blobs on the background, most in the cue colours
    noise: float = 0.08  # std of pixel noise (0..1 scale)
    cue_strength: float = 1.0  # 1 = the class cue is fully visible; lower is harder
    seed: int = 0  # the data set's own seed, independent of the training seed
    hue_offset: float = 0.0  # turns every cue colour around the colour wheel (0..1): another set of cue colours


@dataclass
class FractalConfig:
    """The formula-driven pretraining set, rendered when read (see fgvc/data/fractal.py)."""

    num_classes: int = 100
    train_per_class: int = 60
    test_per_class: int = 10
    image_size: int = 96  # side of the rendered images, pixels
    points: int = 12000  # chaos-game points per image
    min_maps: int = 2  # affine maps per system, at least
    max_maps: int = 4
    min_fill: float = 0.08  # least share of a 64 x 64 grid a class's attractor must cover
    jitter: float = 0.04  # per-image perturbation of the map parameters (intra-class variation)
    seed: int = 0


@dataclass
class DataConfig:
    name: str = "synthetic"  # cub | cars | aircraft | nabirds | synthetic | fractal | folder
    root: str = "data/synthetic"
    image_size: int = 128  # network input side, pixels
    val_fraction: float = 0.1  # stratified share of train held out for model selection
    num_workers: int = 0  # loading processes; 0 = in the training process (the synthetic set, cached whole)
    cache_mb: int = 256  # decoded images kept in memory per data set and loading process; 0 = off
    aircraft_level: str = "variant"  # variant | family | manufacturer
    crop_scale: list[float] = field(default_factory=lambda: [0.6, 1.0])  # RandomResizedCrop area
    hflip: float = 0.5  # probability of a horizontal flip
    color_jitter: float = 0.0  # brightness/contrast/saturation strength; 0 = off
    eval_resize: float = 1.143  # evaluation: resize the short side to size*this, centre crop
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    fractal: FractalConfig = field(default_factory=FractalConfig)


@dataclass
class AttentionConfig:
    type: str = "none"  # none | se | cbam | residual | gate | stn | a timm attention name
    stages: list[int] = field(default_factory=lambda: [-1])  # backbone stages by index
    placement: str = "stage"  # stage | block
    init: str = "default"  # default | identity
    reduction: int = 16  # channel bottleneck ratio r (SE, CBAM)
    kernel_size: int = 7  # spatial gate kernel (CBAM)


@dataclass
class ZoomConfig:
    """RA-CNN (Fu et al. 2017)."""

    scales: int = 3  # 2 or 3
    share_backbone: bool = False
    fuse: str = "features"  # features | scores
    min_side: float = 0.25  # smallest box side, as a fraction of the input side
    mask_steepness: float = 10.0  # k of the boxcar's sigmoids


@dataclass
class DcnConfig:
    """Dynamic Capacity Networks (Almahairi et al. 2016)."""

    coarse_backbone: str = "test_resnet"
    coarse_stages: int = 0  # 0 = the whole coarse backbone, n = its first n stages
    coarse_image_size: int = 0  # coarse network's input side; 0 = data.image_size // 2
    fine_backbone: str = "test_resnet"
    patch_size: int = 32  # fine patch side at full resolution, pixels
    top_k: int = 4  # patches given to the fine network
    saliency: str = "entropy"  # entropy | gate
    exit_threshold: float = 2.0  # coarse confidence to stop early; > 1 means never
    whole_image: bool = False  # the full-image fine counterpart: fine backbone on the whole image
    coarse_weights: str = ""  # a local .safetensors / .pth file for the coarse network (dcn does not use model.weights)
    fine_weights: str = ""  # the same for the fine network


@dataclass
class ModelConfig:
    arch: str = "classifier"  # classifier | racnn | dcn
    backbone: str = "test_resnet"  # any timm name
    pretrained: bool = False
    weights: str = ""  # a local .safetensors / .pth file of backbone weights
    drop_rate: float = 0.0
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    zoom: ZoomConfig = field(default_factory=ZoomConfig)
    dcn: DcnConfig = field(default_factory=DcnConfig)


@dataclass
class ZoomTrainConfig:
    rank_margin: float = 0.05
    rank_weight: float = 1.0
    pretrain_epochs: int = 1  # classifiers with fixed boxes before alternation
    cls_steps: int = 20  # alternation: classification steps (boxes fixed)
    apn_steps: int = 10  # alternation: proposal steps (ranking loss only)


@dataclass
class DcnTrainConfig:
    hint_weight: float = 1.0
    coarse_weight: float = 0.5  # cross-entropy on the coarse prediction (for early exit)


@dataclass
class TrainConfig:
    epochs: int = 15
    batch_size: int = 32  # per process
    lr: float = 0.1
    weight_decay: float = 5.0e-4
    warmup_epochs: int = 1
    optimizer: str = "sgd"  # any timm optimizer name
    momentum: float = 0.9
    scheduler: str = "cosine"  # any timm scheduler name
    min_lr: float = 0.0
    mixed_precision: str = "no"  # no | fp16 | bf16
    grad_accum_steps: int = 1
    clip_grad: float = 0.0  # max gradient norm; 0 = off
    label_smoothing: float = 0.1
    mixup: float = 0.0  # mixup alpha; 0 = off
    cutmix: float = 0.0  # cutmix alpha; 0 = off
    ema: bool = False
    ema_decay: float = 0.999
    new_lr_mult: float = 1.0  # lr multiplier for parameters that are not pretrained
    resume: str = ""  # "" | auto | a checkpoint folder
    keep_checkpoints: int = 2
    tensorboard: bool = False
    log_every: int = 10  # steps between progress-bar loss updates
    zoom: ZoomTrainConfig = field(default_factory=ZoomTrainConfig)
    dcn: DcnTrainConfig = field(default_factory=DcnTrainConfig)


@dataclass
class Recipe:
    recipe: str = DEFAULT_RECIPE
    seed: int = 0
    output_dir: str = ""  # "" = runs/<recipe>
    overwrite: bool = False
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


CHOICES: dict[str, tuple[str, ...]] = {
    "data.name": ("cub", "cars", "aircraft", "nabirds", "synthetic", "fractal", "folder"),
    "data.aircraft_level": ("variant", "family", "manufacturer"),
    "model.arch": ("classifier", "racnn", "dcn"),
    "model.attention.placement": ("stage", "block"),
    "model.attention.init": ("default", "identity"),
    "model.zoom.fuse": ("features", "scores"),
    "model.dcn.saliency": ("entropy", "gate"),
    "train.mixed_precision": ("no", "fp16", "bf16"),
}


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


def _unknown_key(key: str, where: str) -> UserError:
    known = _all_keys(OmegaConf.structured(Recipe))
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
    hint = f"did you mean '{close[0]}'?" if close else "see fgvc/config.py for every key."
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


def _type_name(cfg: DictConfig, key: str) -> str:
    try:
        value = OmegaConf.select(cfg, key)
    except OmegaConfBaseException:
        return "value"
    return type(value).__name__ if value is not None else "value"


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
        cfg = _merge(cfg, OmegaConf.load(path), str(path))
        if name is not None:
            cfg.recipe = name
    else:
        name = name or DEFAULT_RECIPE
        path = RECIPES_DIR / f"{name}.yaml"
        if not path.is_file():
            recipes = available_recipes()
            close = difflib.get_close_matches(name, recipes, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise UserError(f"recipe '{name}' does not exist; {hint}known recipes: {', '.join(recipes)}")
        cfg = _merge(cfg, OmegaConf.load(path), f"recipes/{name}.yaml")
        cfg.recipe = name
    try:
        dotlist = OmegaConf.from_dotlist(overrides)
    except OmegaConfBaseException as err:
        raise UserError(f"cannot parse the command-line overrides: {str(err).splitlines()[0]}") from None
    cfg = _merge(cfg, dotlist, "command line")
    check_choices(cfg)
    if not cfg.output_dir:
        cfg.output_dir = f"runs/{cfg.recipe}"
    return cfg


def check_choices(cfg: DictConfig) -> None:
    for key, choices in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in choices:
            raise UserError(f"recipe key '{key}' is '{value}' but must be one of: {', '.join(choices)}.")
    if cfg.data.val_fraction < 0 or cfg.data.val_fraction >= 1:
        raise UserError(f"data.val_fraction is {cfg.data.val_fraction} but must be in [0, 1).")
    if cfg.data.num_workers < 0 or cfg.data.cache_mb < 0:
        raise UserError("data.num_workers and data.cache_mb must each be 0 or more.")
    if cfg.train.grad_accum_steps < 1 or cfg.train.batch_size < 1 or cfg.train.epochs < 1:
        raise UserError("train.epochs, train.batch_size and train.grad_accum_steps must each be at least 1.")


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
