"""Loading backbone weights without unpickling code, and checking that nothing was dropped."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

from fgvc.errors import DATA_EXIT, UserError

REPO_ROOT = Path(__file__).resolve().parents[2]


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors, or from .pth/.pt/.bin with `weights_only=True`."""
    path = Path(path)
    if not path.is_file() and not path.is_absolute() and (REPO_ROOT / path).is_file():
        path = REPO_ROOT / path  # recipes name shipped files (weights/...) relative to the repository
    if not path.is_file():
        raise UserError(f"weights file '{path}' does not exist; fix model.weights or drop it.")
    if path.suffix == ".safetensors":
        return read_safetensors(path, "fix model.weights or give an intact copy of the file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickled code, a broken file, ...
        raise UserError(f"weights file '{path}' cannot be loaded safely ({err.__class__.__name__}); "
                        "convert it to .safetensors.") from None
    for key in ("state_dict", "model", "module"):  # common wrappers
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    return state


def read_safetensors(path: str | Path, fix: str) -> dict[str, torch.Tensor]:
    """A .safetensors file's tensors; a truncated or corrupt file is one sentence ending in `fix`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        reason = str(err).splitlines()[0].rstrip(".") if str(err) else err.__class__.__name__
        raise UserError(f"weights file '{path}' is damaged ({reason}); {fix}.", exit_code=DATA_EXIT) from None


def load_backbone_weights(backbone: nn.Module, state: dict[str, torch.Tensor],
                          skip_prefixes: tuple[str, ...] = ()) -> list[str]:
    """Load `state` into `backbone`; every backbone tensor must be present and fit, except keys
    under `skip_prefixes` (the classifier). Returns the names that were loaded."""
    own = backbone.state_dict()
    wanted = [k for k in own if not k.startswith(skip_prefixes)]
    state = {k.removeprefix("module."): v for k, v in state.items()}
    missing = [k for k in wanted if k not in state]
    wrong = [k for k in wanted if k in state and state[k].shape != own[k].shape]
    if missing or wrong:
        bad = (missing + wrong)[0]
        raise UserError(f"weights do not fit the backbone: {len(missing)} tensors missing and "
                        f"{len(wrong)} of another shape (first: '{bad}'); give a file made for this backbone "
                        "(model.backbone with model.weights; model.dcn.coarse_backbone / fine_backbone with "
                        "model.dcn.coarse_weights / fine_weights), or an empty value (model.weights=) to start "
                        "without one.")
    backbone.load_state_dict({k: state[k] for k in wanted}, strict=False)
    return wanted


def fit_checkpoint(backbone: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` made for another input size, fitted to `backbone` by timm's checkpoint filter of its
    family, the one timm's pretrained weights go through (position embeddings resampled to the new
    patch grid, Swin's relative-position tables resized); unchanged when every tensor already fits
    or the family has no filter."""
    own = backbone.state_dict()
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if all(k not in own or own[k].shape == v.shape for k, v in state.items()):
        return state
    filter_fn = getattr(sys.modules.get(type(backbone).__module__), "checkpoint_filter_fn", None)
    return state if filter_fn is None else filter_fn(state, backbone)
