"""Benchmark hubexport's merge against verl's merger and the disk floor, in one run, with medians of repetitions.

    python benchmarks/run.py --work /var/tmp/hubexport-bench --verl-python /path/to/verl-venv/bin/python

Writes benchmarks/results.json (machine-readable; results-<suites>.json for a subset) and prints Markdown tables
(pasted into benchmarks/README.md).
Every measured command runs in its own process under a small probe that reports wall time and the peak RSS of the
largest process it started (RUSAGE_CHILDREN); inputs are read once before each run, so every contender starts from the
same warm page cache. Repetitions are interleaved (round r runs every contender once), so a machine shared with
others slows all contenders alike and the ratios hold even when the absolute times drift.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PROBE = (
    "import resource, subprocess, sys, time; t = time.perf_counter(); r = subprocess.run(sys.argv[1:]); "
    "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024); "
    "sys.exit(r.returncode)"
)

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


Contender = tuple[list[str], dict[str, str] | None]


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


def make_fsdp(work: Path) -> Path:
    from hubexport.examples import FsdpCase, make_checkpoints

    case = FsdpCase("fsdp_w4", world_size=4, dtype="bfloat16", hidden_size=1536, intermediate_size=4096, layers=24,
                    vocab_size=32000, reference=False)
    actor = work / case.name / "global_step_1" / "actor"
    if not (actor / "fsdp_config.json").is_file():
        shutil.rmtree(work / case.name, ignore_errors=True)
        make_checkpoints([case], work)
    return actor


def make_megatron(work: Path, hf_model: Path) -> Path:
    """The same weights as a megatron-core torch_dist checkpoint (v1 layout), written by two ranks."""
    actor = work / "mcore" / "global_step_1" / "actor"
    if not (actor / "dist_ckpt" / "metadata.json").is_file():
        shutil.rmtree(work / "mcore", ignore_errors=True)
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                        "hubexport", "to-megatron", "--hf-model-path", str(hf_model), "--output-path",
                        str(actor / "dist_ckpt")], check=True)
        (actor / "huggingface").mkdir()
        for p in hf_model.iterdir():
            if not p.name.endswith((".safetensors", ".index.json")):
                shutil.copy(p, actor / "huggingface" / p.name)
    return actor


def input_bytes(actor: Path) -> int:
    return sum(p.stat().st_size for p in actor.rglob("*") if p.name.startswith("model_world_size_")
               or p.suffix == ".distcp")


def run_suite(name: str, src: Path, work: Path, contenders: dict[str, Contender], repeat: int) -> dict:
    runs: dict[str, tuple[list[float], list[int]]] = {label: ([], []) for label in contenders}
    out = work / "out"
    for r in range(repeat):
        for label, (cmd, env) in contenders.items():
            clear(out)
            cold = work / "cold-hf-home"  # a contender whose env names it starts with an empty HF cache
            clear(cold)
            warm(src)
            wall, rss = measure([a.replace("{out}", str(out)) for a in cmd], env)
            runs[label][0].append(wall)
            runs[label][1].append(rss)
            print(f"{name:8} round {r + 1} {label:40} wall {wall:7.2f} s   peak RSS {rss / 1e6:8.0f} MB", flush=True)
    clear(out)
    return {label: {"wall_s": statistics.median(w), "peak_rss_bytes": statistics.median(m), "walls": w, "rss": m}
            for label, (w, m) in runs.items()}


def table(suite: dict, baseline: str, floor: str, nbytes: int) -> str:
    lines = [f"| run | wall (s) | GB/s | ×{baseline} | ×{floor} | peak RSS (MB) | RSS ×{baseline} |",
             "|---|---|---|---|---|---|---|"]
    b, f = suite[baseline], suite[floor]
    for label, r in suite.items():
        lines.append(f"| {label} | {r['wall_s']:.2f} | {nbytes / r['wall_s'] / 1e9:.2f} | {r['wall_s'] / b['wall_s']:.2f} "
                     f"| {r['wall_s'] / f['wall_s']:.2f} | {r['peak_rss_bytes'] / 1e6:.0f} "
                     f"| {r['peak_rss_bytes'] / b['peak_rss_bytes']:.2f} |")
    return "\n".join(lines)


def push_suite(actor: Path, work: Path, env: dict[str, str], repeat: int, bandwidth: float) -> dict:
    """`push` of a checkpoint (each file sent while the next is merged) against `merge` then `push` of the folder,
    run one after the other, on the Hub emulator whose uploads share one link of `bandwidth` bytes/s."""
    from tests.fakehub import FakeHub

    token = "hf_BenchToken0123456789abcdef"
    hub = FakeHub(multipart_threshold=64 << 20, chunk_size=64 << 20, bandwidth=bandwidth)
    hub.add_user("bench", token)
    hub.start()
    env = {**env, "HF_ENDPOINT": hub.url, "HF_TOKEN": token, "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    out, py = work / "out", sys.executable
    common = ["--private", "--license", "mit"]
    merge = [py, "-m", "hubexport", "merge", "--max-shard-size", "400MB", "--local-dir", str(actor), "--target-dir",
             str(out)]
    contenders = {
        "push CHECKPOINT (merge and upload overlapped)": lambda repo: [
            py, "-m", "hubexport", "push", str(actor), "--repo-id", repo, "--max-shard-size", "400MB", *common],
        "merge, then push FOLDER (one after the other)": lambda repo: [
            "sh", "-c", " ".join([*merge, "&&", py, "-m", "hubexport", "push", str(out), "--repo-id", repo, *common])],
    }
    runs: dict[str, tuple[list[float], list[int]]] = {label: ([], []) for label in contenders}
    try:
        for r in range(repeat):
            for i, (label, cmd) in enumerate(contenders.items()):
                clear(out)
                warm(actor)
                wall, rss = measure(cmd(f"bench/round{r}-{i}"), env)
                hub.repos.clear()  # the emulator keeps uploads in memory
                runs[label][0].append(wall)
                runs[label][1].append(rss)
                print(f"push     round {r + 1} {label:48} wall {wall:7.2f} s", flush=True)
    finally:
        hub.stop()
        clear(out)
    return {label: {"wall_s": statistics.median(w), "peak_rss_bytes": statistics.median(m), "walls": w, "rss": m}
            for label, (w, m) in runs.items()}


def push_table(suite: dict, nbytes: int, bandwidth: float) -> str:
    upload = nbytes / bandwidth
    lines = [f"upload floor (bytes / link): {upload:.2f} s", "",
             "| run | wall (s) | × one after the other | × upload floor |", "|---|---|---|---|"]
    sequential = suite["merge, then push FOLDER (one after the other)"]["wall_s"]
    lines += [f"| {label} | {r['wall_s']:.2f} | {r['wall_s'] / sequential:.2f} | {r['wall_s'] / upload:.2f} |"
              for label, r in suite.items()]
    return "\n".join(lines)


def hubexport_env(repo: Path, hf_home: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(repo), "HF_HOME": str(hf_home)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/var/tmp/hubexport-bench"))
    ap.add_argument("--verl-python", default=None, help="python of a venv with verl 0.9.1 (see benchmarks/README.md)")
    ap.add_argument("--baseline-repo", type=Path, action="append", default=[],
                    help="another hubexport checkout (e.g. main) to run beside this one, 1 process (repeatable)")
    ap.add_argument("--suites", default="fsdp,megatron,push", help="comma-separated: fsdp, megatron, push")
    ap.add_argument("--bandwidth", type=float, default=50e6, help="push suite: the emulator's upload link, bytes/s")
    ap.add_argument("--no-torchrun", action="store_true", help="skip the torchrun and --dtype fp32 contenders")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    suites = set(args.suites.split(","))
    env_note = {"python": sys.version.split()[0], "machine": platform.machine(), "cpus": os.cpu_count()}
    floor_label = "disk floor (read + write + fsync)"
    # hubexport's cache of save_pretrained names (hubexport/mapping/native_cache.py): primed once for the warm
    # contenders; the "cold" one starts every run from an empty HF_HOME.
    env = hubexport_env(REPO, args.work / "hf-home")
    cold = hubexport_env(REPO, args.work / "cold-hf-home")
    bases = {f"hubexport {repo.name}, 1 process": hubexport_env(repo, args.work / "hf-home") for repo in args.baseline_repo}
    shards = ["--max-shard-size", "400MB"]
    started = time.time()
    results: dict = {"env": env_note}

    actor = make_fsdp(args.work)
    hub = [sys.executable, "-m", "hubexport", "merge", *shards, "--local-dir", str(actor), "--target-dir", "{out}"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "hubexport",
                "merge", *shards, "--local-dir", str(actor), "--target-dir", "{out}"]
    subprocess.run([*hub[:-1], str(args.work / "dry"), "--dry-run"], env=env, check=True, capture_output=True)
    if "fsdp" in suites:
        contenders: dict[str, Contender] = {
            floor_label: ([sys.executable, "-c", FLOOR, str(actor), "{out}"], None),
            "hubexport, 1 process": (hub, env),
            "hubexport, 1 process, cold cache": (hub, cold),
        }
        contenders |= {label: (hub, e) for label, e in bases.items()}
        if not args.no_torchrun:
            contenders |= {"hubexport, torchrun 2 processes": (torchrun, env),
                           "hubexport --dtype fp32, 1 process": ([*hub, "--dtype", "fp32"], env),
                           "hubexport --dtype fp32, torchrun 2": ([*torchrun, "--dtype", "fp32"], env)}
        if args.verl_python:
            contenders["verl.model_merger (0.9.1)"] = ([args.verl_python, "-m", "verl.model_merger", "merge",
                                                        "--backend", "fsdp", "--local_dir", str(actor), "--target_dir",
                                                        "{out}"], None)
        fsdp = run_suite("fsdp", actor, args.work, contenders, args.repeat)
        results["fsdp"] = {"input_bytes": input_bytes(actor), "runs": fsdp}
        baseline = "verl.model_merger (0.9.1)" if args.verl_python else "hubexport, 1 process"
        print(table(fsdp, baseline, floor_label, input_bytes(actor)))
    if "megatron" in suites:
        hf_model = args.work / "hf_model"
        if not (hf_model / "config.json").is_file():
            subprocess.run([*hub[:-1], str(hf_model)], env=env, check=True)
        mcore = make_megatron(args.work, hf_model)
        mhub = [sys.executable, "-m", "hubexport", "merge", *shards, "--local-dir", str(mcore), "--target-dir", "{out}"]
        mcontenders: dict[str, Contender] = {
            floor_label: ([sys.executable, "-c", FLOOR, str(mcore), "{out}"], None),
            "hubexport, 1 process": (mhub, env),
        }
        mcontenders |= {label: (mhub, e) for label, e in bases.items()}
        if not args.no_torchrun:
            mcontenders["hubexport, torchrun 2 processes"] = ([*torchrun[:7], *mhub[3:]], env)
        megatron = run_suite("megatron", mcore, args.work, mcontenders, args.repeat)
        results["megatron"] = {"input_bytes": input_bytes(mcore), "runs": megatron}
        print(table(megatron, "hubexport, 1 process", floor_label, input_bytes(mcore)))
    if "push" in suites:
        push = push_suite(actor, args.work, env, args.repeat, args.bandwidth)
        results["push"] = {"bandwidth_bytes_per_s": args.bandwidth, "input_bytes": input_bytes(actor), "runs": push}
        print(push_table(push, input_bytes(actor), args.bandwidth))
    results["seconds"] = time.time() - started
    name = "results.json" if suites == {"fsdp", "megatron", "push"} else f"results-{'-'.join(sorted(suites))}.json"
    (REPO / "benchmarks" / name).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
