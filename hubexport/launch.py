"""Under torchrun, before anything heavy is imported: when the work is too small to pay for N processes' start-up
(each imports torch, transformers and gloo: seconds of CPU on a small machine), every rank but 0 leaves at once and
rank 0 does the work as a single process, so N processes are never slower than 1. The output is the one-process
output, byte for byte. Only on one node (several nodes may write to node-local folders), and only when the input
is a local folder whose weight bytes can be counted; otherwise every rank takes its share, as before.
Imports nothing beyond the standard library."""

from __future__ import annotations

import os
import sys
from pathlib import Path

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
    world = int(env.get("WORLD_SIZE", "1"))
    if world <= 1 or int(env.get("LOCAL_WORLD_SIZE", "0")) != world:
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
    for name in ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "RANK", "LOCAL_RANK", "GROUP_RANK", "ROLE_RANK", "ROLE_WORLD_SIZE"):
        env.pop(name, None)
    return True
