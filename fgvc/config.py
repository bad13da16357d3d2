"""The recipe: a typed schema holding every default, a recipe file stating what differs, and
`key=value` overrides from the command line.

    cfg = load_recipe(["recipe=cub_cbam", "train.lr=0.01"])

Order of precedence: schema defaults < the recipe's base (`base: cub_baseline`, itself possibly based
on another) < recipes/NAME.yaml < command-line overrides. A key's allowed values (`one_of`) and the
model.arch it applies to (`only_for`) sit beside it in the schema; `validate` is the one check of the
resolved recipe. Every user mistake (unknown recipe, unknown key, wrong type, bad choice, a key the
model.arch ignores, a value out of range) raises `UserError` with one sentence.
"""

from __future__ import annotations

import difflib
from dataclasses import MISSING, Field, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from fgvc.errors import UserError

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"
DEFAULT_RECIPE = "synth_baseline"
BASE_KEY = "base"  # a recipe file's `base: NAME` names the recipe it states differences from
ARCHS = ("classifier", "racnn", "dcn")
# timm.layers.get_attn's same-shape modules; `timm_NAME` forces timm's block where fgvc has its own
TIMM_ATTENTION = ("se", "ese", "eca", "ecam", "ceca", "ge", "gc", "gca", "cbam", "lcbam", "coord", "scoord",
                  "ela", "strip", "sk", "splat", "nl", "bat")
ATTENTION_TYPES = ("none", "se", "cbam", "residual", "gate", "stn",
                   *(n for n in TIMM_ATTENTION if n not in ("se", "cbam")), *(f"timm_{n}" for n in TIMM_ATTENTION))


# Keys added after runs had been saved, with the value those runs were trained with. A run folder's
# recipe.yaml holds every key of its day, so one that lacks a key predates it and gets this value:
# old runs still load and repeat exactly.
KEYS_ADDED_LATER = {
    "model.attention.residual_form": "output_mask",  # issue 16: the paper's form became the default
    "model.attention.gate_width": "half",  # issue 16: the authors' width (the gating stage's) became the default
    "model.dcn.top_hidden": True,  # issue 14: top layers that train became the default
    "model.dcn.detach_fusion": False,
}
SAVED_RUN_MARK = "model.attention.reduction"  # a key every saved run's recipe.yaml has


def one_of(default: Any, choices: tuple) -> Any:
    """A schema field whose value must be one of `choices` (checked by `validate`)."""
    return field(default=default, metadata={"choices": choices})


def only_for(*archs: str, default: Any = MISSING, default_factory: Any = MISSING) -> Any:
    """A schema field (or section) that only these model.arch values read: setting it for another
    arch is a mistake `validate` reports."""
    return field(default=default, default_factory=default_factory, metadata={"archs": archs})


@dataclass
class SyntheticConfig:
    """The built-in synthetic fine-grained set (see fgvc/data/synthetic.py)."""

    num_classes: int = 12
    train_per_class: int = 80
    test_per_class: int = 20
    image_size: int = 96  # side of the written images, pixels
    part_scale: float = 0.06  # size of the discriminative parts (beak, wing patch), fraction of the image side
    distractors: int = 6  # clutter blobs on the background, most in the cue colours
    noise: float = 0.08  # std of pixel noise (0..1 scale)
    cue_strength: float = 1.0  # 1 = the class cue is fully visible; lower is harder
    seed: int = 0  # the data set's own seed, independent of the training seed
    hue_offset: float = 0.0  # turns every cue colour around the colour wheel (0..1): another set of cue colours
    hidden: float = 0.0  # share of images in which each class part (beak, wing patch) is not visible: a ceiling on top-1
    # what tells the wing's class: its colour, or a texture of one-pixel features legible only near full resolution
    wing_cue: str = one_of("colour", ("colour", "texture"))
    texture_px: int = 1  # side of the texture's features in written pixels (wing_cue=texture): 1 blurs away sooner
    texture_fine: float = 0.0  # share of images whose texture has one-pixel features instead of texture_px
    texture_phase: bool = False  # each wing's texture shifted by a random offset (not aligned with a 2x shrink's grid)
    position_spread: float = 0.0  # 0: bird centred within 0.35-0.65 of the side; 1: anywhere its body and class parts fit
    scale_min: float = 1.0  # the bird and its parts scaled by a factor drawn log-uniformly in [scale_min, 1]


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
    class_colours: float = 0.0  # share of images in their class's own map colours (0: random colours, FractalDB)


@dataclass
class DataConfig:
    name: str = one_of("synthetic", ("cub", "cars", "aircraft", "nabirds", "synthetic", "fractal", "folder"))
    root: str = "data/synthetic"
    image_size: int = 64  # network input side, pixels
    val_fraction: float = 0.1  # stratified share of train held out for model selection
    num_workers: int = 0  # loading processes; 0 = in the training process (the synthetic set, cached whole)
    cache_mb: int = 256  # decoded images kept in memory per data set and loading process; 0 = off
    aircraft_level: str = one_of("variant", ("variant", "family", "manufacturer"))
    crop_scale: list[float] = field(default_factory=lambda: [0.6, 1.0])  # RandomResizedCrop area
    hflip: float = 0.5  # probability of a horizontal flip
    color_jitter: float = 0.0  # brightness/contrast/saturation strength; 0 = off
    eval_resize: float = 1.143  # evaluation: short side to image_size * this, then a centre crop; 256/224, ImageNet's
    antialias: bool = False  # shrink with PIL's widened bilinear filter (PIL, torchvision) rather than bilinear sampling
    # images delivered at this many times image_size (>= 1); RA-CNN's zooms and the spatial transformer
    # cut their regions from those pixels and shrink the whole image to image_size themselves
    full_resolution: float = 1.0
    randaugment: str = ""  # timm RandAugment string, e.g. rand-m9-mstd0.5-inc1; "" = off
    random_erasing: float = 0.0  # probability of erasing one rectangle of a training image
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    fractal: FractalConfig = field(default_factory=FractalConfig)


@dataclass
class AttentionConfig:
    type: str = one_of("none", ATTENTION_TYPES)  # fgvc's blocks, or a timm attention name
    stages: list[int] = field(default_factory=list)  # backbone stages by index; [] = the method's default stages
    placement: str = one_of("stage", ("stage", "block"))
    init: str = one_of("default", ("default", "identity"))
    reduction: int = 16  # channel bottleneck ratio r (SE, CBAM)
    kernel_size: int = 7  # spatial gate kernel (CBAM)
    stn_count: int = one_of(1, (1, 2, 4))  # parallel spatial transformers, features concatenated (type=stn)
    # how the transformer samples its window (type=stn): the paper's bilinear grid at the input size, or
    # antialias (fgvc/models/resample.py: no moire; starts as the plain network without the gamma blend)
    stn_sampler: str = one_of("bilinear", ("bilinear", "antialias"))
    stn_crop_only: bool = False  # type=stn: windows never larger than the image (side cut at 1, gradient passed through)
    mlp_bias: bool = True  # biases in the channel MLP (SE, CBAM; timm's CBAM has none)
    spatial_order: str = one_of("max_mean", ("max_mean", "mean_max"))  # CBAM's pooled maps (authors' / timm's order)
    spatial_norm: bool = True  # batch norm after CBAM's 7x7 conv
    spatial_bn_momentum: float = 0.1  # that batch norm's momentum (PyTorch's default; CBAM's authors: 0.01)
    spatial_bn_zero_init: bool = False  # zero-initialise that batch norm's weight (CBAM's authors' ResNet)
    residual_form: str = one_of("paper", ("paper", "output_mask"))  # (1 + M(x)) * T(x), or fgvc's earlier block
    gate_norm: str = one_of("sigmoid", ("sigmoid", "sum_one"))  # gate: sigmoid + mean pool, or AG-Sononet's
    gate_width: str = one_of("gating", ("gating", "half"))  # gate inner width: C_g (AG-Sononet) or C_l / 2


@dataclass
class ZoomConfig:
    """RA-CNN (Fu et al. 2017)."""

    scales: int = one_of(3, (2, 3))  # the paper's settings: one or two zooms
    share_backbone: bool = False
    fuse: str = one_of("features", ("features", "scores"))
    min_side: float = 2 / 3  # smallest box side, as a fraction of the current scale (reference code: half side >= 1/3)
    mask_steepness: float = 10.0  # k of the boxcar's sigmoids, per pixel of the delivered image
    # how a zoom wider than the input in source pixels is read: bilinear sampling (skips pixels: a moire
    # of fine detail the antialiased first scale does not show) or antialias (fgvc/models/resample.py)
    sampler: str = one_of("bilinear", ("bilinear", "antialias"))


@dataclass
class DcnConfig:
    """Dynamic Capacity Networks (Almahairi et al. 2016)."""

    coarse_backbone: str = "test_resnet"
    coarse_stages: int = 0  # 0 = the whole coarse backbone, n = its first n stages
    coarse_image_size: int = 0  # coarse network's input side; 0 = data.image_size // 2
    fine_backbone: str = "test_resnet"
    patch_size: int = 32  # fine patch side at full resolution, pixels
    top_k: int = 4  # patches given to the fine network
    saliency: str = one_of("cam", ("entropy", "cam", "gate"))  # cam: the coarse net's CAM, no backward; entropy: the paper's
    exit_threshold: float = 2.0  # coarse confidence to stop early; > 1 means never
    whole_image: bool = False  # the full-image fine counterpart: fine backbone on the whole image
    pool: str = one_of("avg", ("avg", "max"))  # top layers' global pool (max: the paper's; see models/dcn.py)
    top_layers: str = one_of("fuse", ("mix", "fuse"))  # mix (paper): fine replaces coarse cells; fuse: [coarse; attn(patches)]
    coarse_weights: str = ""  # a local .safetensors / .pth file for the coarse network (dcn does not use model.weights)
    fine_weights: str = ""  # the same for the fine network
    detach_fusion: bool = True  # fuse: the fused classifier's loss trains only it; each network learns from its branch's loss
    top_hidden: bool = False  # true: the paper's 1x1 conv + ReLU before pooling (collapsed, models/dcn.py); false: pool, classify


@dataclass
class ModelConfig:
    arch: str = one_of("classifier", ARCHS)
    backbone: str = only_for("classifier", "racnn", default="test_resnet")  # any timm name (dcn: model.dcn.*)
    pretrained: bool = False
    weights: str = ""  # a local .safetensors / .pth file of backbone weights
    drop_rate: float = only_for("classifier", default=0.0)
    drop_path: float = only_for("classifier", default=0.0)  # stochastic depth rate of the timm backbone
    attention: AttentionConfig = only_for("classifier", default_factory=AttentionConfig)
    zoom: ZoomConfig = only_for("racnn", default_factory=ZoomConfig)
    dcn: DcnConfig = only_for("dcn", default_factory=DcnConfig)


@dataclass
class ZoomTrainConfig:
    rank_margin: float = 0.05
    rank_margins: list[float] = field(default_factory=list)  # margin per pair of neighbouring scales; empty: rank_margin
    apn_lr_mults: list[float] = field(default_factory=list)  # lr multiplier per proposal network (zoom 1, 2); empty: 1
    rank_weight: float = 1.0
    pretrain_epochs: int = 1  # classifiers with fixed boxes before alternation
    cls_steps: int = 20  # alternation: classification steps (boxes fixed)
    apn_steps: int = 10  # alternation: proposal steps (ranking loss only)


@dataclass
class DcnTrainConfig:
    hint_weight: float = 0.0  # the paper's hint loss (1.0 in the paper; it held the fused design back: models/dcn.py)
    coarse_weight: float = 1.0  # cross-entropy on the coarse prediction (for early exit)
    fine_weight: float = 1.0  # cross-entropy on the patch branch alone (the k refined patches)
    k_min: int = 1  # k drawn per update from k_min..k_max (when k_max > 0)
    k_max: int = 0  # 0: always model.dcn.top_k
    random_share: float = 0.25  # share of the k training patches drawn at random instead of by saliency
    fine_epochs: int = 0  # stage 1: every training patch random
    select_epochs: int = 0  # stage 2: fine network frozen; then joint


@dataclass
class TrainConfig:
    epochs: int = 30
    batch_size: int = 32  # per process
    lr: float = 0.1
    weight_decay: float = 5.0e-4
    warmup_epochs: int = 1
    optimizer: str = "sgd"  # any timm optimizer name
    momentum: float = 0.9
    scheduler: str = "cosine"  # any timm scheduler name
    min_lr: float = 0.0
    mixed_precision: str = one_of("no", ("no", "fp16", "bf16"))
    grad_accum_steps: int = 1
    clip_grad: float = 0.0  # max gradient norm; 0 = off
    label_smoothing: float = 0.1
    mixup: float = 0.0  # mixup alpha; 0 = off
    cutmix: float = 0.0  # cutmix alpha; 0 = off
    ema: bool = False
    ema_decay: float = 0.999
    ema_warmup: bool = False  # EMA decay ramps up from 0 (timm ModelEmaV3 warm-up)
    layer_decay: float = 0.0  # layer-wise lr decay of the backbone (ViT, Swin, ConvNeXt ...); 0 = off
    channels_last: bool = False  # model and inputs in channels-last memory format
    compile: bool = False  # torch.compile the model
    grad_checkpointing: bool = False  # recompute backbone activations in backward (timm models)
    new_lr_mult: float = 1.0  # lr multiplier for the new classifier(s) when the backbone is pretrained
    new_block_lr_mult: float = 1.0  # the same for other parameters that are not pretrained (attention blocks, proposal nets)
    resume: str = ""  # "" | auto | a checkpoint folder
    keep_checkpoints: int = 2
    log_with: str = ""  # "" = none | Accelerate tracker names: tensorboard, wandb, mlflow, ... (comma-separated)
    log_every: int = 10  # steps between progress-bar loss updates
    zoom: ZoomTrainConfig = only_for("racnn", default_factory=ZoomTrainConfig)
    dcn: DcnTrainConfig = only_for("dcn", default_factory=DcnTrainConfig)


@dataclass
class Recipe:
    recipe: str = DEFAULT_RECIPE
    seed: int = 0
    output_dir: str = ""  # "" = runs/<recipe>
    overwrite: bool = False
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
    hint = f"did you mean '{close}'?" if close else "see fgvc/config.py for every key."
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
    for key, value in KEYS_ADDED_LATER.items():
        if OmegaConf.select(layer, key) is None:
            OmegaConf.update(layer, key, value)
    arch = OmegaConf.select(layer, "model.arch") or Recipe().model.arch
    for key in keys_unread_by(arch):
        section, _, name = key.rpartition(".")
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
        path = RECIPES_DIR / f"{name}.yaml"
        if not path.is_file():
            raise _unknown_recipe(name, "")
        layers = _layers(path, f"recipes/{name}.yaml", (name,))
    for layer, where in layers:
        cfg = _merge(cfg, layer, where)
    if name is not None:
        cfg.recipe = name
    cfg = _merge(cfg, _typed_overrides(cfg, overrides), "command line")
    validate(cfg)
    if not cfg.output_dir:
        cfg.output_dir = f"runs/{cfg.recipe}"
    return cfg


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
    return tuple(key for key, f in _schema_fields(Recipe)
                 if f.metadata.get("archs") is not None and arch not in f.metadata["archs"])


def validate(cfg: DictConfig) -> None:
    """The one check of a resolved recipe: each key's choices, the keys each model.arch reads, ranges."""
    defaults = OmegaConf.structured(Recipe)
    for key, f in _schema_fields(Recipe):
        value = OmegaConf.select(cfg, key)
        choices = f.metadata.get("choices")
        if choices is not None and value not in choices:
            quote = " (in a YAML file write it in quotes, e.g. 'no')" if value in ("True", "False", True, False) else ""
            raise UserError(f"recipe key '{key}' is '{value}' but must be one of: {', '.join(map(str, choices))}{quote}.")
        archs = f.metadata.get("archs")
        default = OmegaConf.select(defaults, key)
        if archs is not None and cfg.model.arch not in archs and value != default:
            changed = key
            if isinstance(value, DictConfig):  # name the first key of the section that was set
                mine, theirs = (flatten(OmegaConf.to_container(c), key + ".") for c in (value, default))
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
    for key, values in (("rank_margins", z.rank_margins), ("apn_lr_mults", z.apn_lr_mults)):
        if values and (m.arch != "racnn" or len(values) != m.zoom.scales - 1 or min(values) < 0):
            raise UserError(f"train.zoom.{key} is {list(values)} but needs one value >= 0 per zoom of model.arch=racnn "
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
    if m.attention.stn_count != 1 and m.attention.type != "stn":
        raise UserError(f"model.attention.stn_count is {m.attention.stn_count} but only model.attention.type=stn "
                        "reads it; drop it or set model.attention.type=stn.")
    if d.full_resolution < 1:
        raise UserError(f"data.full_resolution is {d.full_resolution} but must be at least 1 (1 = images at "
                        "data.image_size); e.g. 1.5.")
    if d.full_resolution != 1 and not (m.arch == "racnn" or m.attention.type == "stn"):
        raise UserError(f"data.full_resolution is {d.full_resolution} but only model.arch=racnn and "
                        "model.attention.type=stn read pixels beyond data.image_size; set data.full_resolution=1.")
    if m.dcn.saliency == "gate":
        raise UserError("model.dcn.saliency='gate' needs an attention gate in the coarse network, which "
                        "dcn does not build; use model.dcn.saliency=entropy.")
    if m.dcn.top_k < 0 or m.dcn.patch_size < 1:
        raise UserError("model.dcn.top_k must be at least 0 and model.dcn.patch_size at least 1.")
    d = t.dcn
    if d.k_max and not 1 <= d.k_min <= d.k_max:
        raise UserError(f"train.dcn.k_min ({d.k_min}) must be in 1..train.dcn.k_max ({d.k_max}); "
                        "or set train.dcn.k_max=0 to train at model.dcn.top_k.")
    if d.k_max < 0 or d.fine_epochs < 0 or d.select_epochs < 0 or not 0 <= d.random_share <= 1:
        raise UserError("train.dcn.k_max, fine_epochs and select_epochs must be 0 or more and "
                        "train.dcn.random_share in [0, 1].")
    for key, low, high in RANGES:
        value = OmegaConf.select(cfg, key)
        if not low <= value <= high:
            bound = f"at least {low}" if high == INF else f"between {low} and {high}"
            raise UserError(f"recipe key '{key}' is {value} but must be {bound}.")
    if cfg.train.lr <= 0:
        raise UserError(f"train.lr is {cfg.train.lr} but must be more than 0.")
    for key in ("data.random_erasing", "model.drop_path", "train.layer_decay"):
        if not 0 <= OmegaConf.select(cfg, key) <= 1:
            raise UserError(f"{key} is {OmegaConf.select(cfg, key)} but must be in [0, 1].")
    if cfg.data.randaugment and not cfg.data.randaugment.startswith("rand"):
        raise UserError(f"data.randaugment is '{cfg.data.randaugment}' but must be a timm RandAugment string "
                        "such as rand-m9-mstd0.5-inc1, or empty.")


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
