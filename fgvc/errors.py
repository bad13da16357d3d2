"""User errors: one sentence that names the thing and the fix, then a non-zero exit."""

from __future__ import annotations

import functools
import os
import sys
from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable[..., int | None])

USAGE_EXIT = 2  # bad recipe, bad key, bad argument: nothing was started
DATA_EXIT = 3  # a data set or run folder on disk is not what it should be
RUN_EXIT = 4  # the run itself failed (NaN loss, ...); the last good checkpoint is kept


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


def cli_main(fn: F) -> F:
    """Run an entry point; a `UserError` prints `error: <sentence>` and exits non-zero."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # no network call at every start
        try:
            return fn(*args, **kwargs)
        except UserError as err:
            print(f"error: {one_sentence(err)}", file=sys.stderr)
            raise SystemExit(err.exit_code) from None

    return wrapper  # type: ignore[return-value]
