"""Benchmark hubexport against verl's merger and the disk floor, in one run, with medians of repetitions.

    python benchmarks/run.py --work /var/tmp/hubexport-bench --verl-python /path/to/verl-venv/bin/python

Suites: fsdp (merge of a verl FSDP2 checkpoint), megatron (merge of the same weights as torch_dist; megatron-tp2: as
megatron-core saves them from TP=2), to-megatron (the HF folder of those weights to torch_dist), flat (peak RSS of
to-megatron and merge at 1 GB and 8 GB of one architecture), fsdp-flat (the FSDP merge at 1 GB and 8 GB of that
architecture, every way, against each size's floor), push. Writes benchmarks/results.json (results-<suites>.json for
a subset) and prints Markdown tables and the issue's targets (pasted into benchmarks/README.md). Every measured
command runs in its own process under a probe (harness.py) from the same warm page cache; rounds are interleaved, so
a machine shared with others slows every contender alike and the ratios of one run hold even when the absolute times
drift.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import FLOOR_LABEL, REPO, Contender, clear, floor, input_bytes, load_average, run_suite, table

sys.path.insert(0, str(REPO))
import cases
import targets
from push import push_suite, push_table

ALL = ("fsdp", "megatron", "megatron-tp2", "to-megatron", "flat", "fsdp-flat", "push")
SHARDS = ["--max-shard-size", "400MB"]
PY = sys.executable
TORCHRUN = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
TORCHRUN_1 = [*TORCHRUN[:-1], "--nproc_per_node=1"]  # the same launcher, one process: what the launcher costs


def hubexport_env(repo: Path, hf_home: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(repo), "HF_HOME": str(hf_home)}


def merge_cmd(actor: Path, launcher: list[str] | None = None) -> list[str]:
    return [*(launcher or [PY]), "-m", "hubexport", "merge", *SHARDS, "--local-dir", str(actor), "--target-dir", "{out}"]


def to_megatron_cmd(hf_model: Path, launcher: list[str] | None = None) -> list[str]:
    return [*(launcher or [PY]), "-m", "hubexport", "to-megatron", "--hf-model-path", str(hf_model), "--output-path",
            "{out}"]


def one_process(make: Callable[[Path, list[str] | None], list[str]], source: Path, env: dict, cold: dict,
                work: Path, primed: str) -> dict[str, tuple[Path, Contender]]:
    """The disk floor and one process three ways: repeating a recorded run (primed here by one real run), the full
    path (HUBEXPORT_NO_FAST_PATH=1) and from an empty HF_HOME."""
    hub = make(source, None)
    subprocess.run([*hub[:-1], str(work / primed), "--overwrite"], env=env, check=True, capture_output=True)
    clear(work / primed)  # it recorded the recipe; its bytes are not needed
    full = {**env, "HUBEXPORT_NO_FAST_PATH": "1"}
    return {FLOOR_LABEL: (source, floor(source)), targets.ONE: (source, (hub, env)),
            targets.FULL: (source, (hub, full)), targets.COLD: (source, (hub, cold))}


def first_merge_before(source: Path, cold: dict) -> tuple[Path, Contender]:
    """A first merge as it was before `first_merge`: an empty HF_HOME, planned in-process (the full path)."""
    return source, (merge_cmd(source), {**cold, "HUBEXPORT_NO_FAST_PATH": "1"})


def torchrun(make: Callable[[Path, list[str] | None], list[str]], source: Path, env: dict) -> dict:
    return {targets.TORCHRUN: (source, (make(source, TORCHRUN), env)),
            targets.TORCHRUN_1: (source, (make(source, TORCHRUN_1), env))}


def fsdp_suite(args, actor: Path, env: dict, cold: dict, bases: dict) -> dict:
    hub = merge_cmd(actor)
    c = one_process(merge_cmd, actor, env, cold, args.work, "primed")
    c |= {label: (actor, (hub, e)) for label, e in bases.items()}
    c[targets.COLD_INLINE] = first_merge_before(actor, cold)
    if not args.no_torchrun:
        c |= torchrun(merge_cmd, actor, env)
        c |= {"hubexport --dtype fp32, 1 process": (actor, ([*hub, "--dtype", "fp32"], env)),
              "hubexport --dtype fp32, torchrun 2": (actor, ([*merge_cmd(actor, TORCHRUN), "--dtype", "fp32"], env))}
    if args.verl_python:
        c[targets.VERL] = (actor, ([args.verl_python, "-m", "verl.model_merger", "merge", "--backend", "fsdp",
                                    "--local_dir", str(actor), "--target_dir", "{out}"], None))
    runs = run_suite("fsdp", c, args.work, args.repeat,
                     compare=(targets.ONE, targets.FULL, targets.COLD, targets.COLD_INLINE, targets.TORCHRUN))
    print(table(runs, targets.VERL if args.verl_python else targets.ONE, input_bytes(actor)))
    return {"input_bytes": input_bytes(actor), "runs": runs}


def megatron_suite(args, mcore: Path, env: dict, cold: dict, bases: dict, name: str = "megatron") -> dict:
    c = one_process(merge_cmd, mcore, env, cold, args.work, f"primed-{name}")
    c |= {label: (mcore, (merge_cmd(mcore), e)) for label, e in bases.items()}
    if not args.no_torchrun:
        c |= torchrun(merge_cmd, mcore, env)
    runs = run_suite(name, c, args.work, args.repeat, compare=(targets.ONE, targets.FULL, targets.TORCHRUN))
    print(table(runs, targets.ONE, input_bytes(mcore)))
    return {"input_bytes": input_bytes(mcore), "largest_group_bytes": cases.largest_group_bytes(env, mcore, args.work),
            "runs": runs}


def to_megatron_suite(args, hf_model: Path, env: dict, cold: dict) -> dict:
    c = one_process(to_megatron_cmd, hf_model, env, cold, args.work, "primed-mcore")
    if not args.no_torchrun:
        c |= torchrun(to_megatron_cmd, hf_model, env)
    runs = run_suite("to-megatron", c, args.work, args.repeat, compare=(targets.ONE, targets.FULL, targets.TORCHRUN))
    print(table(runs, targets.ONE, input_bytes(hf_model)))
    return {"input_bytes": input_bytes(hf_model), "runs": runs}


def flat_suite(args, env: dict) -> dict:
    """The same architecture at 1 GB and 8 GB (synthetic weights; made once, kept in --work), by the full path (the
    fast path's peak RSS is the interpreter's whatever the size)."""
    env = {**env, "HUBEXPORT_NO_FAST_PATH": "1"}
    c: dict[str, tuple[Path, Contender]] = {}
    for gb in (1, 8):
        hf = cases.make_synthetic(args.work, gb)
        mcore = cases.make_megatron(args.work, hf, name=f"synthetic_{gb}gb_mcore")
        c[f"to-megatron, {gb} GB"] = (hf, (to_megatron_cmd(hf), env))
        c[f"merge torch_dist, {gb} GB"] = (mcore, (merge_cmd(mcore), env))
    if not args.no_torchrun:  # enough work for two processes: they must pay
        c[f"merge torch_dist, 8 GB, {targets.TORCHRUN}"] = (mcore, (merge_cmd(mcore, TORCHRUN), env))
    runs = run_suite("flat", c, args.work, args.repeat, compare=("merge torch_dist, 8 GB", f"merge torch_dist, 8 GB, "
                                                                 f"{targets.TORCHRUN}"))
    print("| run | wall (s) | peak RSS (MB) |\n|---|---|---|")
    print("\n".join(f"| {label} | {r['wall_s']:.2f} | {r['peak_rss_bytes'] / 1e6:.0f} |" for label, r in runs.items()))
    return {"runs": runs}


def fsdp_flat_suite(args, env: dict, cold: dict, bases: dict) -> dict:
    """The FSDP merge of one architecture at 1 GB and 8 GB (synthetic rank files; made once, kept in --work): the
    fast path, the full path, a first merge (cold cache) now and as it was before `first_merge`, the fast path of
    each --baseline-repo, and torchrun with 2 and 1 processes at 8 GB, each size against its own floor."""
    c: dict[str, tuple[Path, Contender]] = {}
    nbytes = {}
    sizes = [int(gb) for gb in args.sizes.split(",")]
    for gb in sizes:
        actor = cases.make_fsdp_synthetic(args.work, gb)
        nbytes[gb] = input_bytes(actor)
        c |= {f"{label}, {gb} GB": v for label, v in one_process(merge_cmd, actor, env, cold, args.work,
                                                                f"primed-fsdp-{gb}gb").items()}
        c[f"{targets.COLD_INLINE}, {gb} GB"] = first_merge_before(actor, cold)
        c |= {f"{label}, {gb} GB": (actor, (merge_cmd(actor), e)) for label, e in bases.items()}
        if gb == 8 and not args.no_torchrun:  # enough work for 2 processes by the size rule (launch.py)
            c |= {f"{label}, 8 GB": v for label, v in torchrun(merge_cmd, actor, env).items()}
    runs = run_suite("fsdp-flat", c, args.work, args.repeat,
                     compare=tuple(f"{label}, 8 GB" for label in (targets.ONE, targets.FULL, targets.COLD,
                                                                  targets.COLD_INLINE, targets.TORCHRUN)))
    for gb in sizes:
        print(table({k.removesuffix(f", {gb} GB"): v for k, v in runs.items() if k.endswith(f", {gb} GB")},
                    targets.ONE, nbytes[gb]))
    return {"input_bytes": nbytes, "runs": runs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/var/tmp/hubexport-bench"))
    ap.add_argument("--verl-python", default=None, help="python of a venv with verl 0.9.1 (see benchmarks/README.md)")
    ap.add_argument("--baseline-repo", type=Path, action="append", default=[],
                    help="another hubexport checkout (e.g. main) to run beside this one, 1 process (repeatable)")
    ap.add_argument("--suites", default=",".join(ALL), help=f"comma-separated, of: {', '.join(ALL)}")
    ap.add_argument("--bandwidth", type=float, default=50e6, help="push suite: the emulator's upload link, bytes/s")
    ap.add_argument("--no-torchrun", action="store_true", help="skip the torchrun and --dtype fp32 contenders")
    ap.add_argument("--sizes", default="1,8", help="fsdp-flat suite: the checkpoint sizes, in GB, of: 1, 8")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    suites = set(args.suites.split(","))
    started = time.time()
    results: dict = {"env": {"python": sys.version.split()[0], "machine": platform.machine(), "cpus": os.cpu_count(),
                             "load_average_at_start": load_average()}}
    # hubexport's caches (save_pretrained names, hubexport/mapping/native_cache.py, merge and to-megatron recipes,
    # hubexport/merge_recipe.py and to_mcore_recipe.py): primed by one run for the warm contenders; the "cold" one
    # starts every run from an empty HF_HOME.
    env = hubexport_env(REPO, args.work / "hf-home")
    cold = hubexport_env(REPO, args.work / "cold-hf-home")
    bases = {f"hubexport {repo.name}, 1 process": hubexport_env(repo, args.work / "hf-home") for repo in args.baseline_repo}
    actor = cases.make_fsdp(args.work)
    hf_model = args.work / "hf_model"
    if suites & {"megatron", "megatron-tp2", "to-megatron"} and not (hf_model / "config.json").is_file():
        subprocess.run([*merge_cmd(actor)[:-1], str(hf_model)], env=env, check=True)
    if "fsdp" in suites:
        results["fsdp"] = fsdp_suite(args, actor, env, cold, bases)
    if "megatron" in suites:
        results["megatron"] = megatron_suite(args, cases.make_megatron(args.work, hf_model), env, cold, bases)
    if "megatron-tp2" in suites:
        results["megatron-tp2"] = megatron_suite(args, cases.make_megatron_tp2(args.work, hf_model), env, cold, bases,
                                                 name="megatron-tp2")
    if "to-megatron" in suites:
        results["to-megatron"] = to_megatron_suite(args, hf_model, env, cold)
    if "flat" in suites:
        results["flat"] = flat_suite(args, env)
    if "fsdp-flat" in suites:
        results["fsdp-flat"] = fsdp_flat_suite(args, env, cold, bases)
    if "push" in suites:
        push = push_suite(actor, args.work, env, args.repeat, args.bandwidth)
        results["push"] = {"bandwidth_bytes_per_s": args.bandwidth, "input_bytes": input_bytes(actor), "runs": push}
        print(push_table(push, input_bytes(actor), args.bandwidth))
    results["seconds"] = time.time() - started
    results["load_average_at_end"] = load_average()
    print(targets.table(results))
    name = "results.json" if suites == set(ALL) else f"results-{'-'.join(sorted(suites))}.json"
    (REPO / "benchmarks" / name).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
