"""`python tests/kill_after_epoch.py EPOCH key=value ...`: fgvc/train.py, but the process dies like
`kill -9` (exit 137, no clean-up) right after the checkpoint of epoch EPOCH."""

from __future__ import annotations

import os
import sys

from fgvc.config import load_recipe
from fgvc.engine.trainer import train

KILLED_EXIT = 137  # what a shell reports for a process ended by SIGKILL


def main() -> None:
    epoch, args = int(sys.argv[1]), sys.argv[2:]

    def die(finished: int) -> None:
        if finished == epoch:
            os._exit(KILLED_EXIT)

    train(load_recipe(args), after_checkpoint=die)


if __name__ == "__main__":
    main()
