"""Write the report's files so that a planted symlink or a crash never writes anything elsewhere.

``report.html`` is written to a new temporary file in the same directory (``O_EXCL``: never an
existing name, so never through a symlink) and renamed over the old name; a symlink already at
that name is replaced, not followed. ``report/`` is filled as a new temporary directory and then
put in place of the old one (an old ``report`` symlink is removed, never followed; an old real
directory is removed after the swap), so a reader sees the old report or the new one, not half.
"""
from __future__ import annotations

import os
import shutil
import stat
import tempfile
from pathlib import Path


def _mode(full: int = 0o666) -> int:
    """The mode ``open()`` (``full=0o666``) or ``mkdir()`` (``0o777``) would give under the current umask
    (mkstemp makes 0600, mkdtemp 0700: a report others could not read)."""
    umask = os.umask(0)
    os.umask(umask)
    return full & ~umask


def write_text_atomic(path: Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` through a temporary file and a rename; returns ``path``.

    Raises OSError (naming ``path``) when the directory is not writable or ``path`` is a directory.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            os.fchmod(fh.fileno(), _mode())
            fh.write(text)
        os.replace(tmp, path)  # rename(2) replaces a symlink at ``path`` itself, never its target
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def new_dir(final: Path) -> Path:
    """A new empty directory beside ``final`` (``.<name>.XXXX``) to fill before :func:`put_dir`."""
    final = Path(final)
    new = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}."))
    os.chmod(new, _mode(0o777))
    return new


def put_dir(new: Path, final: Path) -> Path:
    """Put the filled directory ``new`` at ``final``: a symlink or file there is removed (not followed),
    an old directory is swapped out and deleted. Returns ``final``."""
    final, old = Path(final), None
    try:
        st = os.lstat(final)
    except FileNotFoundError:
        st = None
    if st is not None and stat.S_ISDIR(st.st_mode):
        old = new_dir(final)
        os.rename(final, old / final.name)
    elif st is not None:
        os.unlink(final)
    os.rename(new, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)  # rmtree never follows symlinks inside it
    return final


def discard_dir(path: Path) -> None:
    """Remove a temporary directory left by a failed write (if it is still there)."""
    shutil.rmtree(path, ignore_errors=True)
