"""Atomic output folders: everything is written into a hidden sibling of the target and renamed into place only when
complete, so a killed run leaves nothing or the previous complete output, never a half model."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from hubexport.errors import TargetError


def check_target(target: Path, *, overwrite: bool) -> None:
    """Refuse, before any work, a target that cannot be (re)placed safely."""
    if target.is_symlink():
        raise TargetError(f"target {target} is a symbolic link",
                          hint="pass the real directory path; hubexport does not write through links")
    if target.exists() and not target.is_dir():
        raise TargetError(f"target {target} is a file", hint="pass a directory path for --target-dir")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise TargetError(f"target {target} is not empty", hint="pass --overwrite to replace it, or choose another path")
    parent = target.absolute().parent
    if not parent.is_dir():
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise TargetError(f"cannot create {parent}: {e.strerror}", hint="choose a writable --target-dir") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise TargetError(f"{parent} is not writable", hint="choose a writable --target-dir")


def staging_dir(target: Path) -> Path:
    """Deterministic, so every rank (and node, on a shared filesystem) finds it, and a re-run clears a stale one."""
    return target.absolute().parent / f".{target.name}.hubexport-partial"


def fresh_staging(target: Path) -> Path:
    tmp = staging_dir(target)
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        tmp.mkdir()
    except OSError as e:
        raise TargetError(f"cannot create {tmp}: {e.strerror}", hint="choose a writable --target-dir") from None
    return tmp


def publish(tmp: Path, target: Path) -> None:
    """Swap the finished folder into place. With --overwrite the old output is moved aside first and deleted only
    after the new one is in place."""
    target = target.absolute()
    old = target.parent / f".{target.name}.hubexport-old"
    if old.exists():
        shutil.rmtree(old)
    if target.exists():
        target.rename(old)
    tmp.rename(target)
    _fsync_dir(target.parent)
    if old.exists():
        shutil.rmtree(old)


def discard(tmp: Path) -> None:
    shutil.rmtree(tmp, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
