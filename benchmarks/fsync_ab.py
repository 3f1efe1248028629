"""By-hand A/B of when to fsync: copy every file of a folder with copy_file_range into a scratch folder, fsync'd
after each file ("each", hubexport before), all at the end ("end"), or each on a thread while the next is copied
("thread", `writers/safetensors.Fsyncs`). Rounds interleave the modes; prints each mode's sorted walls and median.

    python benchmarks/fsync_ab.py /var/tmp/hubexport-bench/fsdp_w4/global_step_1/actor --rounds 6
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

MODES = ("each", "end", "thread")


def copy_all(files: list[Path], out: Path, mode: str) -> float:
    started = time.perf_counter()
    fds, threads = [], []
    for i, src in enumerate(files):
        fi = os.open(src, os.O_RDONLY)
        fo = os.open(out / str(i), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        n, done = os.fstat(fi).st_size, 0
        while done < n:
            done += os.copy_file_range(fi, fo, n - done, done, done)
        os.close(fi)
        if mode == "each":
            os.fsync(fo)
        elif mode == "thread":
            threads.append(threading.Thread(target=os.fsync, args=(fo,)))
            threads[-1].start()
        fds.append(fo)
    for t in threads:
        t.join()
    for fo in fds:
        if mode == "end":
            os.fsync(fo)
        os.close(fo)
    return time.perf_counter() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("source", type=Path, help="a folder whose files are copied (e.g. a checkpoint's rank files)")
    ap.add_argument("--rounds", type=int, default=6)
    args = ap.parse_args()
    files = sorted(p for p in args.source.iterdir() if p.is_file())
    walls: dict[str, list[float]] = {m: [] for m in MODES}
    for _ in range(args.rounds):
        for mode in MODES:
            out = Path(tempfile.mkdtemp(prefix="fsync-ab-", dir="/var/tmp"))
            try:
                walls[mode].append(copy_all(files, out, mode))
            finally:
                shutil.rmtree(out)
    for mode, w in walls.items():
        print(f"{mode:7s} median {statistics.median(w):.2f} s   {' '.join(f'{x:.2f}' for x in sorted(w))}")


if __name__ == "__main__":
    main()
