"""Experiment trackers, as Accelerate offers them (`train.log_with`).

    train.log_with=""                 no tracker (default)
    train.log_with=tensorboard        one of Accelerate's tracker names (tensorboard, wandb, mlflow, ...)
    train.log_with=tensorboard,wandb  several, comma-separated

The recipe goes to the tracker as one flat dict of int/float/str/bool values (`tracker_config`):
Accelerate's TensorBoard tracker refuses nested dicts and lists (accelerate#3063).
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from fgvc.config import flatten
from fgvc.errors import UserError

PROJECT_NAME = "fgvc"  # Accelerate's project: the TensorBoard folder RUN_DIR/fgvc, the W&B / MLflow project
TRACKER_VALUE = (int, float, str, bool)


def tracker_names(log_with: str) -> list[str]:
    """`train.log_with` as a list of Accelerate tracker names ([] for none); one sentence for a name
    Accelerate does not know or a tracker whose package is not installed (Accelerate would drop it
    with a warning only)."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers

    names = [n.strip() for n in (log_with or "").split(",") if n.strip()]
    known = sorted(LOGGER_TYPE_TO_CLASS)
    installed = {str(getattr(t, "value", t)) for t in get_available_trackers()}
    for name in names:
        if name not in LOGGER_TYPE_TO_CLASS:
            raise UserError(f"train.log_with '{name}' is not one of Accelerate's trackers; use one of "
                            f"{', '.join(known)}, or '' for none.")
        if name not in installed:
            raise UserError(f"train.log_with={name} needs the {name} package, which is not installed; "
                            f"pip install {name.replace('_', '-')} or choose another tracker.")
    return names


def tracker_config(cfg: DictConfig) -> dict[str, int | float | str | bool]:
    """The resolved recipe as {"data.image_size": 64, ...}; lists become their text, None ''."""
    flat = flatten(OmegaConf.to_container(cfg, resolve=True))
    return {k: v if isinstance(v, TRACKER_VALUE) else ("" if v is None else str(v)) for k, v in flat.items()}
