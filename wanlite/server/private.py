"""The server's files are its own: folders 0700, files 0600.

Prompts, parameters and videos are one user's data, and on a shared machine the default umask
(022) leaves them readable by every local user, key or no key.  So the server's data dir and
results folder are made 0700 (which alone keeps other users out of everything inside) and its
files 0600: the SQLite database (SQLite gives its ``-wal`` and ``-shm`` files the database's
mode), the lock file, and the result MP4s.  A data dir left by an earlier version is fixed at
start.  Videos the CLI writes for the user (``wanlite generate``) keep the usual umask modes.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

DIR_MODE, FILE_MODE = 0o700, 0o600


def _tighten(path: Path, mode: int) -> None:
    """chmod ``path`` to ``mode`` if others could get in and it is ours to change."""
    st = path.stat()
    if stat.S_IMODE(st.st_mode) & 0o077 and st.st_uid == os.geteuid():
        os.chmod(path, mode)


def private_dir(path: str | os.PathLike) -> Path:
    """Create ``path`` (and its parents) if needed; the folder itself ends up 0700."""
    path = Path(path)
    path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    _tighten(path, DIR_MODE)
    return path


def private_file(path: str | os.PathLike, create: bool = False) -> None:
    """Make the file at ``path`` 0600 (created empty first if ``create``; absent: nothing)."""
    path = Path(path)
    if create:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, FILE_MODE))
    with contextlib.suppress(FileNotFoundError):  # e.g. a -wal file SQLite removed meanwhile
        _tighten(path, FILE_MODE)


def private_files(folder: str | os.PathLike, pattern: str) -> None:
    """0600 for every file matching ``pattern`` in ``folder`` (files of an earlier version)."""
    for path in Path(folder).glob(pattern):
        private_file(path)
