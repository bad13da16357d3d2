"""Train a recipe: `accelerate launch fgvc/train.py recipe=cub_cbam [key=value ...]`.

Also `python fgvc/train.py ...` (one process). `recipe=runs/NAME/recipe.yaml` repeats a run from
its saved recipe alone.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _script import bootstrap  # noqa: E402

bootstrap()

from fgvc.config import load_recipe  # noqa: E402
from fgvc.errors import cli_main  # noqa: E402


@cli_main
def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    cfg = load_recipe(argv)  # every recipe error surfaces here, before any work starts
    from fgvc.engine.threads import use_available_cores
    from fgvc.engine.trainer import train

    use_available_cores()  # accelerate launch on a CPU-only machine would otherwise train on one thread

    train(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
