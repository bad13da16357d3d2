"""How a recipe key is declared: its default, its one line of meaning, its allowed values and the
model.arch values that read it, in one place (the dataclasses of fgvc/config.py and the specs they
take their sections from). `fgvc-train --keys` prints them.

    lr: float = key(0.1, "peak learning rate")
    fuse: str = one_of("features", ("features", "scores"), "what the scales share: features or class scores")
    drop_rate: float = only_for("classifier", default=0.0, help="dropout before the classifier")
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import MISSING, field
from typing import Any


def key(default: Any = MISSING, help: str = "", *, default_factory: Any = MISSING) -> Any:
    """A recipe key: its default (or `default_factory` for a list) and one line saying what it does."""
    return field(default=default, default_factory=default_factory, metadata={"help": help})


def one_of(default: Any, choices: tuple, help: str = "") -> Any:
    """A recipe key whose value must be one of `choices` (checked by `fgvc.config.validate`)."""
    return field(default=default, metadata={"choices": choices, "help": help})


def only_for(*archs: str, default: Any = MISSING, default_factory: Any = MISSING, help: str = "") -> Any:
    """A recipe key (or section) that only these model.arch values read: setting it for another arch
    is a mistake `fgvc.config.validate` reports."""
    return field(default=default, default_factory=default_factory, metadata={"archs": archs, "help": help})


def recipe_section(spec: type, name: str) -> type:
    """A recipe section with exactly the fields of `spec` (a frozen dataclass a module takes as its
    argument): the same names, types, defaults and help, but mutable, as recipe sections must be for
    files and overrides to merge into them."""
    types = typing.get_type_hints(spec)
    return dataclasses.make_dataclass(
        name, [(f.name, types[f.name], field(default=f.default, default_factory=f.default_factory, metadata=f.metadata))
               for f in dataclasses.fields(spec)], namespace={"__doc__": spec.__doc__})
