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

from hubexport import fast_merge
from hubexport.cli_output import jsonable
from hubexport.executor import merge
from hubexport.options import MergeOptions, Output
from tests.tree import tree_hash

ROOT = Path(__file__).resolve().parents[1]


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def facts(result) -> dict:
    """The result as --json prints it (or what it printed), less what differs between two runs of the same input."""
    out = json.loads(json.dumps(result if isinstance(result, dict) else jsonable(result)))
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
sys.argv = ["hubexport", *json.loads(sys.argv[1])]
code = 0
try:
    main()
except SystemExit as e:
    code = e.code or 0
heavy = ("torch", "transformers", "huggingface_hub", "megatron", "safetensors")
print(json.dumps([code, sorted(m for m in heavy if m in sys.modules)]))
"""


def run_cli(args: list[str], hf_home: Path) -> tuple[int, str, str, list[str]]:
    """`hubexport <args>` in a fresh interpreter, as users run it, with `hf_home` as HF_HOME: (exit code, stdout,
    stderr, the heavy modules that process imported)."""
    env = {**os.environ, "HF_HOME": str(hf_home), "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", _RUN, json.dumps([str(a) for a in args])], env=env,
                          capture_output=True, text=True)
    *out, last = done.stdout.strip().splitlines()
    code, heavy = json.loads(last)
    return code, "\n".join(out), done.stderr, heavy


def run_twice(args: Callable[[Path], list[str]], tmp_path: Path) -> list[tuple[list[str], dict]]:
    """`hubexport <args(out)> --json` in fresh interpreters, into tmp_path/first then tmp_path/second (a fresh
    HF_HOME): per run, the heavy modules it imported and its --json result."""
    seen = []
    for run in ("first", "second"):
        code, out, err, heavy = run_cli([*args(tmp_path / run), "--json"], tmp_path / "hf-home")
        assert code == 0, err
        seen.append((heavy, json.loads(out)))
    return seen


def _silent(_: str) -> None:
    pass


def fast_and_full_after_a_change(actor: Path, tmp_path: Path) -> tuple[dict[str, bytes], dict[str, bytes]]:
    """A checkpoint whose bytes changed since its recipe was recorded (a later step of the run): the fast path takes
    it. Returns the folder it writes (tmp_path/second) and the full path's (tmp_path/full)."""
    job = fast_merge.job(actor, MergeOptions())
    assert job is not None
    job.close()
    merge(actor, Output(tmp_path / "second"), log=_silent)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HUBEXPORT_NO_FAST_PATH", "1")
        merge(actor, Output(tmp_path / "full"), log=_silent)
    return folder_bytes(tmp_path / "second"), folder_bytes(tmp_path / "full")


def assert_other_options_and_config_miss(actor: Path) -> None:
    """Other options, then another config.json (rms_norm_eps 1e-5, left in place), are not the recorded merge."""
    assert fast_merge.job(actor, MergeOptions(max_shard_size="1MB")) is None
    assert fast_merge.job(actor, MergeOptions(dtype="fp32")) is None
    config = actor / "huggingface" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "rms_norm_eps": 1e-5}, indent=2))
    assert fast_merge.job(actor, MergeOptions()) is None


def assert_a_repeated_merge_is_torch_free(actor: Path, tmp_path: Path, *, planned_beside: bool = False) -> None:
    """The second merge of `actor` imports neither torch nor transformers and writes the first one's files. The
    first imports both, or (`planned_beside`: a first FSDP merge, `first_merge`) leaves them to its planning process."""
    seen = run_twice(lambda out: ["merge", "--local-dir", str(actor), "--target-dir", str(out)], tmp_path)
    first = {"torch", "transformers"} & set(seen[0][0])
    assert first == (set() if planned_beside else {"torch", "transformers"})
    assert seen[1][0] == []
    assert seen[1][1]["files"] == seen[0][1]["files"]  # names, sizes and sha256s
    assert folder_bytes(tmp_path / "second") == folder_bytes(tmp_path / "first")


def merge_each_twice(actors: dict[str, tuple[Path, Path]], out: Path) -> dict[str, tuple]:
    """Each case's actor merged by the full path (which records the recipe), then again with the fast path allowed,
    into out/<case>/{full,again} with out/hf-home as the cache. Per case: (whether the fast path took it, the two
    results, out/<case>, whether nothing under the case's owned folder changed)."""
    done = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HOME", str(out / "hf-home"))
        for name, (actor, owned) in actors.items():
            took, full, again, untouched = full_then_fast(
                mp, lambda run, a=actor, n=name: merge(a, Output(out / n / run), log=_silent),
                lambda a=actor: fast_merge.job(a, MergeOptions()), owned)
            done[name] = (took, full, again, out / name, untouched)
    return done


def assert_the_second_merge_is_the_first(run: tuple) -> None:
    """The fast path's folder is the full path's byte for byte, its facts the same, and the checkpoint untouched."""
    _, full, again, folder, untouched = run
    assert folder_bytes(folder / "again") == folder_bytes(folder / "full")
    assert facts(again) == facts(full)
    assert untouched  # nothing under the checkpoint was written, renamed or deleted
