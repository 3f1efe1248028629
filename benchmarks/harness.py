"""Measuring one command: wall time and peak RSS under a probe process, from a warm page cache, interleaved rounds,
medians; and the Markdown tables of a suite."""

from __future__ import annotations

import hashlib
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

PROBE = (
    "import resource, subprocess, sys, time; t = time.perf_counter(); r = subprocess.run(sys.argv[1:]); "
    "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024); "
    "sys.exit(r.returncode)"
)

# What any converter must at least do: read every input byte, write as many, fsync.
FLOOR = """
import os, sys
src, dst = sys.argv[1], sys.argv[2]
buf = bytearray(16 << 20)
with open(dst, "wb") as out:
    for root, _, files in os.walk(src):
        for name in sorted(files):
            if name.startswith("model_world_size_") or name.endswith((".distcp", ".safetensors")):
                with open(os.path.join(root, name), "rb", buffering=0) as f:
                    while n := f.readinto(buf):
                        out.write(memoryview(buf)[:n])
    out.flush()
    os.fsync(out.fileno())
"""
FLOOR_LABEL = "disk floor (read + write + fsync)"

Contender = tuple[list[str], dict[str, str] | None]


def floor(src: Path) -> Contender:
    return [sys.executable, "-c", FLOOR, str(src), "{out}"], None


def load_average() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def measure(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, int]:
    # `python -m` puts the working directory first on sys.path: run in the checkout being measured.
    cwd = (env or {}).get("PYTHONPATH", str(REPO))
    proc = subprocess.run([sys.executable, "-c", PROBE, *cmd], capture_output=True, text=True, env=env, cwd=cwd)
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    wall, rss = proc.stdout.strip().splitlines()[-1].split()
    return float(wall), int(rss)


def clear(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def warm(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                while f.read(16 << 20):
                    pass


def input_bytes(src: Path) -> int:
    return sum(p.stat().st_size for p in src.rglob("*") if p.name.startswith("model_world_size_")
               or p.suffix in (".distcp", ".safetensors"))


def digest(folder: Path) -> str:
    """One sha256 over every output file's name and bytes: equal digests, byte-identical folders."""
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(folder)).encode() + b"\0")
            with open(p, "rb") as f:
                while chunk := f.read(16 << 20):
                    h.update(chunk)
    return h.hexdigest()


def summary(walls: list[float], rss: list[int], loads: list[str]) -> dict:
    return {"wall_s": statistics.median(walls), "peak_rss_bytes": statistics.median(rss), "walls": walls, "rss": rss,
            "load_average": loads}


def run_suite(name: str, contenders: dict[str, tuple[Path, Contender]], work: Path, repeat: int,
              compare: tuple[str, ...] = ()) -> dict:
    """Every contender once per round, each from a warm cache of its own input (`src`) and an empty `{out}`. The
    outputs of the `compare` contenders are digested after round 1 (outside the timing)."""
    runs: dict[str, tuple[list[float], list[int], list[str]]] = {label: ([], [], []) for label in contenders}
    digests: dict[str, str] = {}
    out = work / "out"
    for r in range(repeat):
        for label, (src, (cmd, env)) in contenders.items():
            clear(out)
            clear(work / "cold-hf-home")  # a contender whose env names it starts with an empty HF cache
            warm(src)
            load = load_average()
            wall, rss = measure([a.replace("{out}", str(out)) for a in cmd], env)
            for acc, v in zip(runs[label], (wall, rss, load), strict=True):
                acc.append(v)
            if r == 0 and label in compare:
                digests[label] = digest(out)
            print(f"{name:10} round {r + 1} {label:44} wall {wall:7.2f} s   peak RSS {rss / 1e6:8.0f} MB   "
                  f"load {load}", flush=True)
    clear(out)
    results = {label: summary(*acc) for label, acc in runs.items()}
    for label, d in digests.items():
        results[label]["digest"] = d
    return results


def table(suite: dict, baseline: str, nbytes: int) -> str:
    lines = [f"| run | wall (s) | GB/s | ×{baseline} | ×{FLOOR_LABEL} | peak RSS (MB) | RSS ×{baseline} |",
             "|---|---|---|---|---|---|---|"]
    b, f = suite[baseline], suite[FLOOR_LABEL]
    for label, r in suite.items():
        lines.append(f"| {label} | {r['wall_s']:.2f} | {nbytes / r['wall_s'] / 1e9:.2f} | {r['wall_s'] / b['wall_s']:.2f} "
                     f"| {r['wall_s'] / f['wall_s']:.2f} | {r['peak_rss_bytes'] / 1e6:.0f} "
                     f"| {r['peak_rss_bytes'] / b['peak_rss_bytes']:.2f} |")
    return "\n".join(lines)
