"""Train a recipe: `accelerate launch fgvc/train.py recipe=cub_cbam [key=value ...]`.

Also `python fgvc/train.py ...` (one process). `recipe=runs/NAME/recipe.yaml` repeats a run from
its saved recipe alone. `fgvc-train --keys` lists every recipe key: type, default, choices, the
model.arch values that read it, and what it does.
"""

from __future__ import annotations

import sys

if __package__ in (None, ""):  # run as a file (python fgvc/train.py): see fgvc/_script.py
    import _script  # noqa: F401

from fgvc.config import key_listing, load_recipe  # noqa: E402
from fgvc.errors import INTERRUPTED_EXIT, UserError, cli_main  # noqa: E402


@cli_main
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    if "--keys" in argv:
        print(key_listing())
        return 0
    cfg = load_recipe(argv)  # every recipe error surfaces here, before any work starts
    # imported after the recipe is checked: a wrong key answers before torch loads (5.6 s of CPU here)
    from fgvc.engine.guard import replaced_run_kept_until_started
    from fgvc.engine.allocator import keep_freed_memory
    from fgvc.engine.threads import use_available_cores
    from fgvc.engine.trainer import train

    use_available_cores()  # accelerate launch on a CPU-only machine would otherwise train on one thread
    keep_freed_memory()  # no page faults and zeroing for the buffers every step frees and allocates again
    try:
        with replaced_run_kept_until_started():  # overwrite=true: the old run is back if this one fails early
            train(cfg)
    except KeyboardInterrupt:
        raise interrupted(cfg) from None
    return 0


def interrupted(cfg) -> UserError:
    """Ctrl-C: one line naming what was kept (the last complete checkpoint) and the command that continues."""
    from pathlib import Path

    from fgvc.engine.runs import checkpoints

    out = Path(cfg.output_dir)
    if not (out / "recipe.yaml").is_file():
        return UserError(f"interrupted (Ctrl-C) before the run in '{out}' started; nothing was written, so run the "
                         "command again.", INTERRUPTED_EXIT)
    found = checkpoints(out)
    kept = f"its last checkpoint is '{found[-1]}'" if found else "it had no checkpoint yet"
    return UserError(f"interrupted (Ctrl-C): the run in '{out}' stopped and {kept}; continue it with "
                     f"`python fgvc/train.py recipe={out / 'recipe.yaml'} train.resume=auto`.", INTERRUPTED_EXIT)


if __name__ == "__main__":
    sys.exit(main())
