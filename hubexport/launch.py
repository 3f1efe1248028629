"""Under torchrun, before anything heavy is imported, every rank but 0 leaves and rank 0 works as a single process
wherever N processes would lose to one, so N processes are never slower than 1:
- `solo_if_small`: the work is too small to pay for N processes' start-up (each imports torch, transformers and
  gloo: seconds of CPU on a small machine), decided from the command line and the input's size alone;
- `alone_if`: one process would copy the output file to file without torch (a recorded merge, or a first one
  written while it is planned, `fast_merge`; a recorded to-megatron, `fast_to_mcore`), while N processes would each
  import torch and take the full path. Rank 0 decides (a merge then writes at least N files at a time); the others
  learn it from a file in torchrun's own folder for this attempt.
The output is the one-process output, byte for byte. Only on one node (several nodes may write to node-local
folders); otherwise every rank takes its share, as before. Imports nothing beyond the standard library."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

# Below this much input per rank, a rank's share of the work is shorter than its start-up on a 2-core machine.
MIN_BYTES_PER_RANK = 2_000_000_000
ENV = "HUBEXPORT_MIN_BYTES_PER_RANK"  # 0: always use every rank (the tests of the multi-rank path set it)
WEIGHTS = (".distcp", ".safetensors", ".bin")
INPUT_OPTIONS = {"merge": ("--local-dir", "--local_dir"), "to-megatron": ("--hf-model-path", "--hf_model_path")}


def input_folder(argv: list[str]) -> Path | None:
    """The local input folder of a `merge`, `to-megatron` or `push` command line, or None when there is none."""
    if not argv:
        return None
    command, rest = argv[0], argv[1:]
    if command == "push":
        value = rest[0] if rest and not rest[0].startswith("-") else None
    else:
        names = INPUT_OPTIONS.get(command, ())
        value = next((v.split("=", 1)[1] for v in rest if v.split("=", 1)[0] in names and "=" in v), None)
        value = value or next((rest[i + 1] for i, v in enumerate(rest[:-1]) if v in names), None)
    return Path(value) if value and Path(value).is_dir() else None


def weight_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and (
        p.name.startswith("model_world_size_") or p.name.endswith(WEIGHTS)))


def solo_if_small(argv: list[str], env: dict[str, str] | os._Environ = os.environ) -> bool:
    """Decide, from the command line alone, whether this torchrun job runs as one process. Rank 0 then drops the
    torchrun variables and carries on; the other ranks exit 0. Returns whether it fell back."""
    world = _one_node(env)
    if world is None:
        return False
    folder = input_folder([a for a in argv if a != "--debug"])
    if folder is None:
        return False
    per_rank = int(env.get(ENV, MIN_BYTES_PER_RANK))
    total = weight_bytes(folder)
    if total >= per_rank * world:
        return False
    if int(env.get("RANK", "0")) != 0:
        sys.exit(0)
    print(f"torchrun: {total / 1e9:.2f} GB of weights is too little work for {world} processes (each needs "
          f"{per_rank / 1e9:.1f} GB to pay for its start-up; {ENV} sets it): working as 1 process", file=sys.stderr)
    _alone(env)
    return True


def _one_node(env: dict[str, str] | os._Environ) -> int | None:
    """The world size of a torchrun job whose processes are all on this node, else None."""
    world = int(env.get("WORLD_SIZE", "1"))
    return world if world > 1 and int(env.get("LOCAL_WORLD_SIZE", "0")) == world else None


def _alone(env: dict[str, str] | os._Environ) -> None:
    for name in ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "RANK", "LOCAL_RANK", "GROUP_RANK", "ROLE_RANK", "ROLE_WORLD_SIZE"):
        env.pop(name, None)


DECISION = "hubexport-alone"  # in torchrun's attempt folder: "1" when rank 0 works alone, else "0"


def alone_if(make: Callable[[int], T | None], env: dict[str, str] | os._Environ = os.environ, *, why: str) -> T | None:
    """Under torchrun on one node, rank 0 makes the job one process would run (`make(world size)`, None when there
    is none) and works alone when there is one, saying `why`; the other ranks wait for its decision and leave when it
    says so. Returns rank 0's job, else None: every rank then takes its share. Must be called by every rank at the
    same point, before torch.distributed is set up."""
    world = _one_node(env)
    if world is None or env.get(ENV) == "0" or _joined():
        return None
    folder = _attempt_folder(env)
    if folder is None:
        return None
    decision = folder / DECISION
    if int(env.get("RANK", "0")) != 0:
        while not decision.is_file():  # rank 0 always writes it; if rank 0 dies, torchrun stops this rank
            time.sleep(0.01)
        if decision.read_text() == "1":
            sys.exit(0)
        return None
    job = None
    try:
        job = make(world)
    finally:  # also when making it failed: the other ranks must not wait for ever
        staged = folder / f".{DECISION}"
        staged.write_text("1" if job is not None else "0")
        os.replace(staged, decision)
    if job is not None:
        print(f"torchrun: one process {why}, where {world} processes would each import torch to plan it: working as "
              "1 process", file=sys.stderr)
        _alone(env)
    return job


def _joined() -> bool:
    """torch.distributed is set up already (e.g. `push` merging a checkpoint): every rank stays."""
    tdist = sys.modules.get("torch.distributed")
    return tdist is not None and tdist.is_available() and tdist.is_initialized()


def _attempt_folder(env: dict[str, str] | os._Environ) -> Path | None:
    """The folder torchrun's agent made for this attempt, shared by the node's workers and new for each attempt: each
    worker's error file is `<attempt>/<local rank>/error.json`. None under another launcher."""
    error = Path(env.get("TORCHELASTIC_ERROR_FILE", ""))
    folder = error.parent.parent
    if error.parent.name != env.get("LOCAL_RANK") or not folder.name.startswith("attempt_") or not folder.is_dir():
        return None
    return folder
