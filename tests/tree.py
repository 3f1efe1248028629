"""A tree's fingerprint for "nothing under the input was written, renamed or deleted": every path (files, folders,
links) with its type, mode, size, mtime and content digest."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def tree_hash(root: Path) -> str:
    digest = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        for name in sorted([*dirnames, *filenames]):
            path = Path(dirpath) / name
            st = path.lstat()
            digest.update(f"{path.relative_to(root)}\0{st.st_mode}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
            if path.is_file() and not path.is_symlink():
                digest.update(hashlib.sha256(path.read_bytes()).digest())
            elif path.is_symlink():
                digest.update(os.readlink(path).encode())
    st = Path(root).lstat()
    digest.update(f"{st.st_mode}\0{st.st_mtime_ns}".encode())
    return digest.hexdigest()
