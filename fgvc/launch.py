"""`accelerate launch` that ends with fgvc's exit code: `fgvc-launch [launch options] fgvc/train.py recipe=...`.

The options are exactly `accelerate launch`'s (it parses them; `accelerate config` applies). What
differs is the end of a failed run. `accelerate launch` turns any non-zero exit of its processes
into its own exit 1 and a traceback of the launcher (`CalledProcessError` for one process,
torch elastic's `ChildFailedError` for several), after fgvc's one sentence. Here the launcher ends
quietly with the exit code of the process that stopped first (README, "Exit codes"): the sentence
that process printed is the last thing on the screen, and a script can tell a bad recipe (2) from
bad data (3) from a failed run (4) on one GPU or eight.
"""

from __future__ import annotations

import logging
import subprocess
import sys

if __package__ in (None, ""):  # run as a file (python fgvc/launch.py): see fgvc/_script.py
    import _script  # noqa: F401

SIGNAL_BASE = 128  # a process killed by signal N exits 128 + N in a shell


def exit_code(returncode: int) -> int:
    """A child's return code as a shell reports it (killed by signal N: 128 + N)."""
    return SIGNAL_BASE - returncode if returncode < 0 else returncode


def main(argv: list[str] | None = None) -> int:
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    parser = launch_command_parser()
    parser.prog = "fgvc-launch"
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    # torch elastic logs every stopped process and the SIGTERM it sends the others; fgvc's first
    # process to stop has printed the sentence, the others stop quietly (fgvc.errors.cli_main)
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        launch_command(args)
    except subprocess.CalledProcessError as err:  # one process
        return exit_code(err.returncode)
    except ChildFailedError as err:  # several: the first to fail is the cause, the others were stopped
        _, failure = err.get_first_failure()
        return exit_code(failure.exitcode)
    except KeyboardInterrupt:
        return SIGNAL_BASE + 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
