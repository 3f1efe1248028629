"""What the fast-path tests (`test_fast_merge_path`, `test_fast_to_mcore`) share: a run by the full path, then the
same run with the fast path allowed, and the folder and facts they compare."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from hubexport.cli_output import jsonable
from tests.tree import tree_hash

ROOT = Path(__file__).resolve().parents[1]


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def facts(result) -> dict:
    """The result as --json prints it, less what differs between two runs of the same input."""
    out = jsonable(result)
    for moving in ("target_dir", "throughput"):
        out.pop(moving)
    return out


def full_then_fast(mp: pytest.MonkeyPatch, run: Callable[[str], object], probe: Callable[[], object | None],
                   owned: Path) -> tuple[bool, object, object, bool]:
    """`run("full")` with HUBEXPORT_NO_FAST_PATH=1 (it records the recipe), then whether `probe()` finds a fast job,
    then `run("again")` with the fast path allowed. Returns (took, full, again, nothing under `owned` changed)."""
    mp.setenv("HUBEXPORT_NO_FAST_PATH", "1")
    full = run("full")
    mp.delenv("HUBEXPORT_NO_FAST_PATH")
    job = probe()
    if job is not None:
        job.close()
    before = tree_hash(owned)
    again = run("again")
    return job is not None, full, again, before == tree_hash(owned)


_RUN = """
import json, sys
from hubexport.cli import main
sys.argv = ["hubexport", *json.loads(sys.argv[1]), "--json"]
try:
    main()
except SystemExit as e:
    assert not e.code, e.code
heavy = ("torch", "transformers", "huggingface_hub", "megatron", "safetensors")
print(json.dumps(sorted(m for m in heavy if m in sys.modules)))
"""


def run_twice(args: Callable[[Path], list[str]], tmp_path: Path) -> list[tuple[list[str], dict]]:
    """`hubexport <args(out)> --json` in fresh interpreters, into tmp_path/first then tmp_path/second (a fresh
    HF_HOME): per run, the heavy modules it imported and its --json result."""
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf-home"), "PYTHONPATH": str(ROOT)}
    seen = []
    for run in ("first", "second"):
        out = subprocess.run([sys.executable, "-c", _RUN, json.dumps(args(tmp_path / run))], env=env, check=True,
                             capture_output=True, text=True).stdout.strip().splitlines()
        seen.append((json.loads(out[-1]), json.loads("\n".join(out[:-1]))))
    return seen
