"""A full disk (or quota, or file size limit) told apart from other I/O errors, and said in one line.

A job writes captures, logs and results under its directory; when that filesystem fills, every write
there fails with ENOSPC (EDQUOT past a quota, EFBIG past ``RLIMIT_FSIZE``), and memray stops recording
(it prints ``Failed to write output, deactivating tracking`` and the capture ends where the disk did).
The roles and the launcher turn such errors into a job failure ``disk full while writing PATH: N bytes
free`` rather than a traceback; :data:`EXIT_CODE` is how a role says so when it cannot even write its
``markers.json``.
"""
from __future__ import annotations

import errno
import os
from pathlib import Path

#: the exit status of a role that stopped on a full disk (sysexits' EX_IOERR)
EXIT_CODE = 74
#: less than this free on a capture's filesystem when the job ends: the disk filled (memray grows a
#: capture 4 KiB at a time), so captures may have stopped early
LOW_BYTES = 64 * 1024
#: what memray and the C library say on stderr or in an exception when a write fails this way
MESSAGES = ("No space left on device", "Disk quota exceeded", "File too large")
MEMRAY_STOPPED = ("Failed to write output, deactivating tracking", "Failed to grow output file")
_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def is_disk_full(exc: BaseException | None) -> bool:
    """Whether ``exc`` (or an exception it was raised from) is a write refused for lack of space: an
    OSError with ENOSPC, EDQUOT or EFBIG, or memray's RuntimeError naming one of them."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, OSError) and exc.errno in _ERRNOS:
            return True
        if isinstance(exc, RuntimeError) and any(m in str(exc) for m in MESSAGES):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def said(text) -> bool:
    """Whether a failure reason is one :func:`describe` (or a role's exit with :data:`EXIT_CODE`) wrote."""
    return isinstance(text, str) and any(p in text for p in ("disk full while", "disk quota exceeded while",
                                                             "file size limit (RLIMIT_FSIZE"))


def free_bytes(path) -> int | None:
    """Bytes an unprivileged writer may still use on the filesystem holding ``path`` (its nearest
    existing parent), or None when it cannot be told."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def describe(exc: BaseException, path=None) -> str:
    """``disk full while writing PATH: N bytes free`` (``disk quota exceeded``, ``file size limit
    (RLIMIT_FSIZE) reached`` for EDQUOT and EFBIG). ``path``: the file, when ``exc`` does not name it."""
    inner = exc
    while inner is not None and not (isinstance(inner, OSError) and inner.errno in _ERRNOS):
        inner = inner.__cause__ or inner.__context__
    code = inner.errno if inner is not None else next(
        (c for c, m in zip((errno.ENOSPC, errno.EDQUOT, errno.EFBIG), MESSAGES) if m in str(exc)), errno.ENOSPC)
    where = path or (getattr(inner, "filename", None) if inner is not None else None) or "the job directory"
    if code == errno.EFBIG:
        return f"file size limit (RLIMIT_FSIZE, ulimit -f) reached while writing {where}"
    what = "disk quota exceeded" if code == errno.EDQUOT else "disk full"
    free = free_bytes(where) if where != "the job directory" else None
    return f"{what} while writing {where}" + (f": {free} bytes free" if free is not None else "")
