"""User errors: one sentence that names the thing and the fix, then a non-zero exit."""

from __future__ import annotations

import errno
import functools
import os
import sys
from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable[..., int | None])

USAGE_EXIT = 2  # bad recipe, bad key, bad argument: nothing was started
DATA_EXIT = 3  # a data set or run folder on disk is not what it should be
RUN_EXIT = 4  # the run itself failed (NaN loss, ...); the last good checkpoint is kept
INTERRUPTED_EXIT = 130  # Ctrl-C: 128 + SIGINT, as a shell reports it


class UserError(Exception):
    """An error the user can fix; its message is one sentence with the fix."""

    exit_code = USAGE_EXIT

    def __init__(self, message: str, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class DataError(UserError):
    """A data set file is missing, corrupt or disagrees with its annotation files."""

    exit_code = DATA_EXIT


class RunError(UserError):
    """Training cannot go on (non-finite loss, ...)."""

    exit_code = RUN_EXIT


def one_sentence(err: UserError) -> str:
    """The user's sentence, also when a DataLoader worker re-raised it wrapped in a traceback."""
    text = str(err).strip()
    if "Traceback" in text:
        last = text.splitlines()[-1]
        text = last.split(f"{type(err).__name__}: ", 1)[-1]
    return text


DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS)
PEER_KEY = "fgvc/exit_code"  # in the launcher's key-value store: the exit code of the first process that stopped


def _store():
    """The distributed run's key-value store, or None in a single process (torch is not imported for that)."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return None
    try:
        return dist.distributed_c10d._get_default_store()
    except (RuntimeError, ValueError):
        return None


def first_to_stop(exit_code: int) -> bool:
    """Tell the other processes of a distributed run that this one stops with `exit_code`; True if
    no other process stopped before (it prints the sentence; the others stay quiet)."""
    store = _store()
    if store is None:
        return True
    try:
        first = store.add("fgvc/stopped", 1) == 1
        if first:
            store.set(PEER_KEY, str(exit_code))
        return first
    except (RuntimeError, ValueError):
        return True


def peer_exit_code() -> int | None:
    """The exit code another process of this distributed run stopped with, if one did: an error
    raised here by a collective (gloo "connection closed") is then only the echo of that stop."""
    store = _store()
    if store is None:
        return None
    try:
        return int(store.get(PEER_KEY)) if store.check([PEER_KEY]) else None
    except (RuntimeError, ValueError):
        return None


def _echo_of_rank_zero(exit_code: int) -> bool:
    """A usage error (bad recipe, bad key) stops every process of a launched run alike, before they
    connect: only the process of rank 0 says it."""
    return exit_code == USAGE_EXIT and _store() is None and os.environ.get("RANK", "0") != "0"


def cli_main(fn: F) -> F:
    """Run an entry point; a `UserError` (or a full disk) prints `error: <sentence>` and exits
    non-zero. In a distributed run the first process to stop prints its sentence, and the others,
    whose collectives then fail, exit with its code without a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # no network call at every start
        try:
            return fn(*args, **kwargs)
        except UserError as err:
            code, sentence = err.exit_code, one_sentence(err)
        except KeyboardInterrupt:
            code, sentence = INTERRUPTED_EXIT, "interrupted (Ctrl-C) before the command finished."
        except OSError as err:
            if err.errno not in DISK_FULL:
                raise
            code = RUN_EXIT
            sentence = (f"could not write '{err.filename or 'a file'}' ({err.strerror}); free space on its disk, "
                        "then run the command again (a training run continues with train.resume=auto).")
        except Exception:
            peer = peer_exit_code()
            if peer is None:
                raise
            raise SystemExit(peer) from None
        if first_to_stop(code) and not _echo_of_rank_zero(code):
            print(f"error: {sentence}", file=sys.stderr)
        raise SystemExit(code) from None

    return wrapper  # type: ignore[return-value]
