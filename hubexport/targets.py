"""Owning an output path safely: it may not overlap what the user owns, one run at a time holds it (a lock file with
the owner's pid and host, held with flock so a killed owner releases it), each run stages into its own hidden sibling,
and the finished folder is swapped into place atomically. A killed run leaves nothing or the previous complete output.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import shutil
import signal
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from hubexport.errors import TargetError

PARTIAL = ".hubexport-partial"
OLD = ".hubexport-old"
LOCK = ".hubexport-lock"


def _hidden(target: Path, suffix: str) -> Path:
    target = target.absolute()
    return target.parent / f".{target.name}{suffix}"


def check_disjoint(target: Path, inputs: Iterable[Path | None], *, option: str = "--target-dir") -> None:
    """The target may not be an input, inside one or above one (symbolic links followed), whatever --overwrite says:
    replacing it would write into, or delete, what the user owns. Inputs that are not paths here (Hub ids) pass."""
    out = Path(target).resolve()
    for given in inputs:
        if given is None or not Path(given).exists():
            continue
        src = Path(given).resolve()
        if out == src:
            how = "is"
        elif out.is_relative_to(src):
            how = "is inside"
        elif src.is_relative_to(out):
            how = "is above"
        else:
            continue
        raise TargetError(f"{option} {target} {how} the input {given}: hubexport never writes into, replaces or "
                          "deletes its input", hint=f"choose a {option} outside {given}")


def check_target(target: Path, *, overwrite: bool, option: str = "--target-dir") -> None:
    """Refuse, before any work, a target that cannot be (re)placed safely."""
    if target.is_symlink():
        raise TargetError(f"target {target} is a symbolic link",
                          hint="pass the real directory path; hubexport does not write through links")
    if target.exists() and not target.is_dir():
        raise TargetError(f"target {target} is a file", hint=f"pass a directory path for {option}")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise TargetError(f"target {target} is not empty", hint="pass --overwrite to replace it, or choose another path")
    parent = target.absolute().parent
    if not parent.is_dir():
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise TargetError(f"cannot create {parent}: {e.strerror}", hint=f"choose a writable {option}") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise TargetError(f"{parent} is not writable", hint=f"choose a writable {option}")


@contextlib.contextmanager
def uninterrupted() -> Iterator[None]:
    """Ctrl-C or SIGTERM arriving inside the block takes effect when it ends, as KeyboardInterrupt: taking the lock and
    making the staging folder, the swap, and the clean-up are never left half-done (a signal between creating the
    lock file and recording it left the file behind). Python runs signal handlers in the main thread only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    arrived: list[int] = []
    previous = {s: signal.signal(s, lambda signum, _: arrived.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)  # None: set outside Python
        if arrived:
            raise KeyboardInterrupt


class TargetLock:
    """Exclusive ownership of one target path for one run. flock is released by the kernel when its holder dies, so
    holding it proves every earlier owner gone: their staging folders are then safe to delete."""

    def __init__(self, target: Path, option: str = "--target-dir") -> None:
        self.target, self.option = Path(target).absolute(), option
        self.path = _hidden(self.target, LOCK)
        self._fd: int | None = None

    def acquire(self) -> None:
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise TargetError(f"cannot create {self.path}: {e.strerror}", hint=f"choose a writable {self.option}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = _read_owner(fd)
                os.close(fd)
                raise TargetError(f"another hubexport run ({owner}) is writing {self.target}",
                                  hint=f"wait for it to finish, or choose another {self.option}") from None
            # The file may have been unlinked by its previous holder between our open and our flock: retry on the new one.
            if _same_file(fd, self.path):
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": int(time.time())}).encode())
        self._fd = fd
        self._clean_after_dead_owners()

    def _clean_after_dead_owners(self) -> None:
        """A run killed mid-swap may have moved the previous output aside without putting the new one in place."""
        old = _hidden(self.target, OLD)
        if old.exists() and not self.target.exists():
            old.rename(self.target)
        for stale in self.target.parent.glob(f".{self.target.name}{PARTIAL}*"):
            shutil.rmtree(stale, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)

    def release(self) -> None:
        if self._fd is None:
            return
        self.path.unlink(missing_ok=True)  # before unlocking, so a waiter re-checks the path (see acquire)
        os.close(self._fd)
        self._fd = None


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = path.stat()
    except FileNotFoundError:
        return False
    here = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (here.st_dev, here.st_ino)


def _read_owner(fd: int) -> str:
    try:
        owner = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"pid {owner['pid']} on {owner['host']}"
    except (ValueError, KeyError, TypeError, OSError):
        return "starting up"


def new_staging(target: Path, option: str = "--target-dir") -> Path:
    """A fresh hidden sibling of the target, unique to this run (mkdir is exclusive)."""
    tmp = _hidden(Path(target), f"{PARTIAL}-{secrets.token_hex(4)}")
    try:
        tmp.mkdir()
    except OSError as e:
        raise TargetError(f"cannot create {tmp}: {e.strerror}", hint=f"choose a writable {option}") from None
    return tmp


def swap_into_place(tmp: Path, target: Path) -> None:
    """With --overwrite the old output is moved aside first and deleted only after the new one is in place."""
    target = target.absolute()
    old = _hidden(target, OLD)
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
