"""Outputs are written under a temporary name and renamed when complete; nothing is overwritten without force.
An interrupted run (Ctrl-C, a crash) leaves no half-written file or folder that looks complete."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile

from .errors import InputError


def check_writable(path: str, force: bool) -> None:
    if os.path.exists(path) and not force:
        raise InputError(f"{path}: already exists (use --force to overwrite)")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise InputError(f"{parent}: output folder does not exist")


def _usual_mode(path: str, mode: int) -> None:
    """The permissions a plain open()/mkdir() would give: mkstemp/mkdtemp's 0600/0700 would make outputs private."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, mode & ~umask)


def _replace(tmp: str, path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        old = path + ".old-" + os.path.basename(tmp)
        os.rename(path, old)
        os.rename(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


@contextlib.contextmanager
def atomic_dir(path: str, force: bool = False):
    """Yield a temporary folder beside `path`; rename it to `path` only if the block completes."""
    check_writable(path, force)
    path = os.path.abspath(path)
    tmp = tempfile.mkdtemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=os.path.dirname(path))
    _usual_mode(tmp, 0o777)
    try:
        yield tmp
        _replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(path: str, force: bool = False):
    """Yield a temporary file name beside `path`; rename it to `path` only if the block completes."""
    check_writable(path, force)
    path = os.path.abspath(path)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=os.path.dirname(path))
    os.close(fd)
    _usual_mode(tmp, 0o666)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
