"""The one writer of every file fgvc puts into a folder (run folders, report pages and pictures,
localization/, exports), and the check of names read from a folder's metadata.

A folder may come from someone else (a received run or export), so a write must not reach outside
it: every file is written to a new temporary file in its own folder and renamed over its name
(`os.replace` replaces a name, never what a symbolic link there points to), and a target file or
folder that is a symbolic link is refused with one sentence, as fgvc never makes one. A kill or a
full disk leaves the old file intact. Files get the modes of any new file (0666, folders 0777,
less the umask), not the 0600 / 0700 of `tempfile`.

Class and part names come from a folder's `model.json` / `config.json` and go into HTML pages,
markdown cards and terminal tables: a name holding a control character (a newline that starts a
new line in a file, an escape sequence for the terminal) is refused when the folder is read.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
import unicodedata
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from fgvc.errors import DataError

BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")  # reorder the text shown


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def file_mode() -> int:
    return 0o666 & ~_umask()


def folder_mode() -> int:
    return 0o777 & ~_umask()


def refuse_link(path: Path) -> None:
    """One sentence (exit 3) if `path` is a symbolic link (also a dangling one)."""
    if path.is_symlink():
        raise DataError(f"'{path}' is a symbolic link (to '{os.readlink(path)}'), and fgvc writes only files "
                        "and folders it can see are real; remove the link, or give another folder.")


def make_folder(folder: str | Path) -> Path:
    """`folder` (and its missing parents) as a real folder, refusing a link or a file at its name."""
    folder = Path(folder)
    refuse_link(folder)
    if folder.exists() and not folder.is_dir():
        raise DataError(f"'{folder}' is a file where fgvc writes a folder; move it away or give another folder.")
    if not folder.is_dir():
        folder.parent.mkdir(parents=True, exist_ok=True)
        folder.mkdir(mode=folder_mode())
    return folder


def check_target(path: str | Path) -> Path:
    """Refuse (one sentence) before any work a file `path` fgvc would write: its folder or the name itself a link."""
    path = Path(path)
    refuse_link(path.parent)
    refuse_link(path)
    if path.is_dir():
        raise DataError(f"'{path}' is a folder where fgvc writes a file; move it away or give another folder.")
    return path


@contextmanager
def writing(path: str | Path) -> Iterator[Path]:
    """Yield a new temporary file beside `path` for a writer that takes a file name (savefig,
    safetensors); once the block ends it is renamed to `path`. On an error it is removed."""
    path = check_target(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_bytes(path: str | Path, data: bytes) -> Path:
    with writing(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    with writing(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def copy_file(src: str | Path, path: str | Path) -> Path:
    """Copy the bytes of `src` (a regular file, not a link) to `path` with the writer above."""
    src = Path(src)
    refuse_link(src)
    with writing(path) as tmp:
        shutil.copyfile(src, tmp)
    return Path(path)


@contextmanager
def new_folder(out: str | Path) -> Iterator[Path]:
    """Assemble a folder beside `out` (which must not exist or be empty, and not be a link) and
    rename it into place once the block ends; on an error nothing is left."""
    out = Path(out)
    refuse_link(out)
    make_folder(out.parent)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        os.chmod(tmp, folder_mode())
        yield tmp
        if out.is_dir():
            out.rmdir()  # empty: the caller checked
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_names(names: object, count: int, what: str, where: str | Path) -> list[str]:
    """`names` as a list of `count` printable strings, else one sentence (exit 3) naming `where`."""
    fix = f"restore '{where}' from a copy of the run folder"
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise DataError(f"'{where}' lists its {what} names as something other than a list of text; {fix}.")
    if len(names) != count:
        plural = what + ("es" if what.endswith("s") else "s")
        raise DataError(f"'{where}' names {len(names)} {plural} where the model has {count}; {fix}.")
    for i, name in enumerate(names):
        bad = next((c for c in name if unicodedata.category(c) in ("Cc", "Zl", "Zp") or c in BIDI_CONTROLS), None)
        if bad is not None:
            raise DataError(f"'{where}': {what} name {i} holds the control character {bad!r}, which fgvc does not "
                            f"copy into pages, cards or tables; {fix}.")
    return names


def regular_file(path: Path) -> bool:
    """True for a regular file (following links); False for a FIFO, a socket, a device or a folder,
    which an image reader would block on or misread."""
    try:
        return stat.S_ISREG(path.stat().st_mode)
    except OSError:
        return False


def no_follow(path: str, flags: int) -> int:
    """An `opener` for open(): refuses (OSError ELOOP) to open a symbolic link, creates with the normal mode."""
    return os.open(path, flags | os.O_NOFOLLOW, file_mode())


def append_line(path: str | Path, line: str) -> None:
    """Append one line to a log file (metrics.jsonl), refusing a link at its name."""
    path = check_target(path)
    with open(path, "a", encoding="utf-8", opener=no_follow) as f:
        f.write(line + "\n")
