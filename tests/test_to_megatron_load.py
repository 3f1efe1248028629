"""Checkpoints written by `hubexport to-megatron` loaded the way Megatron-LM and verl load them:
`dist_checkpointing.load(model.sharded_state_dict(), path)` into a megatron-core GPTModel built on CPU at TP=1, TP=2
and EP=2, whose forward must give the HF model's logits, and at PP=2 (each stage's loaded tensors). The EP=2 checkpoint
is written by two torchrun ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from torch.distributed.checkpoint import FileSystemReader
from transformers import AutoConfig

from hubexport.executor import to_megatron
from hubexport.options import MegatronOptions, Output
from tests.fixtures_mcore import IDS, _free_port, hf_to_mcore_global, run_torchrun, tiny_hf
from tests.mcore_check import load_logits
from tests.test_to_megatron import stored

pytestmark = pytest.mark.slow

MODELS = {"qwen2": ("qwen2", {}), "qwen2_tied": ("qwen2", {"tie": True}), "qwen3": ("qwen3", {}),
          "qwen2_moe": ("qwen2_moe", {}), "critic": ("qwen2", {"value": True})}
# (run, model, spec): runs share one torchrun (same TP/EP); TP=2 with MoE needs Transformer Engine (cpu-lab.md)
LOADS = [("tp1", "qwen2", "te"), ("tp1", "qwen3", "local"), ("tp1", "qwen2_moe", "local"), ("tp1", "critic", "te"),
         ("tp2", "qwen2", "te"), ("tp2", "qwen2_tied", "te"), ("tp2", "qwen3", "local"),
         ("ep2", "qwen2_moe", "local"), ("pp2", "qwen2_tied", "te")]
RUNS = {"tp1": dict(tp=1, pp=1, ep=1), "tp2": dict(tp=2, pp=1, ep=1), "ep2": dict(tp=1, pp=1, ep=2),
        "pp2": dict(tp=1, pp=2, ep=1)}


def torchrun_cli(nproc: int, args: list[str], timeout: int = 300) -> tuple[str, float]:
    """`torchrun -m hubexport ...` as a user runs it on several nodes (here: processes)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(_free_port()), "-m", "hubexport", *args]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout, time.monotonic() - t0


@pytest.fixture(scope="module")
def loads(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("to_megatron_load")
    hf = {name: tiny_hf(kind, root / f"hf_{name}", **opts) for name, (kind, opts) in MODELS.items()}
    ckpts, timings = {}, {}
    for _, model, spec in LOADS:
        if (model, spec) not in ckpts and (model, spec) != ("qwen2_moe", "local"):
            ckpts[model, spec] = root / f"ckpt_{model}_{spec}"
            to_megatron(hf[model], Output(ckpts[model, spec]), MegatronOptions(spec=spec), log=lambda _: None)
    # the MoE checkpoint comes from two writer ranks; the single-process one is its reference
    two = root / "ckpt_qwen2_moe_local"
    out, timings["convert_2_ranks"] = torchrun_cli(2, ["to-megatron", "--hf_model_path", str(hf["qwen2_moe"]),
                                                       "--output_path", str(two), "--spec", "local", "--test",
                                                       "--use_cpu_initialization", "--json"])
    ckpts["qwen2_moe", "local"] = two
    one = root / "ckpt_qwen2_moe_local_1rank"
    to_megatron(hf["qwen2_moe"], Output(one), MegatronOptions(spec="local"), log=lambda _: None)
    results = {}
    for run, par in RUNS.items():
        jobs = []
        for r, model, spec in LOADS:
            if r != run:
                continue
            out_dir = root / f"load_{run}_{model}_{spec}"
            jobs.append(dict(hf=str(hf[model]), ckpt=str(ckpts[model, spec]), out=str(out_dir),
                             value=model == "critic", ids=json.dumps(IDS), **par))
            results[run, model, spec] = out_dir
        timings[run] = run_torchrun(max(par.values()), jobs)
    return {"hf": hf, "results": results, "json": json.loads(out), "two": two, "one": one, "timings": timings}


FORWARD = [case for case in LOADS if case[0] != "pp2"]


@pytest.mark.parametrize("run,model,spec", FORWARD, ids=[f"{r}-{m}-{s}" for r, m, s in FORWARD])
def test_megatron_forward_matches_hf(loads, run, model, spec) -> None:
    out = loads["results"][run, model, spec]
    ref = load_logits(loads["hf"][model], torch.tensor(IDS))
    torch.testing.assert_close(torch.load(out / "logits.pt"), ref, atol=2e-4, rtol=1e-4)
    mismatch = json.loads((out / "mismatch.json").read_text())
    assert mismatch["model_only"] == []  # nothing the model asks for is missing
    if spec == "local":
        assert mismatch["checkpoint_only"] == []  # the local spec's key set exactly
    else:  # TE norms' extra state, which a local-spec model does not have (ignored by the default load)
        assert all(k.split("/")[0].endswith("layernorm._extra_state") for k in mismatch["checkpoint_only"])


def test_pipeline_stages_load_their_layers(loads) -> None:
    """PP=2, tied: each stage holds its own layers; the last stage's output layer is loaded from the embedding."""
    out = loads["results"]["pp2", "qwen2_tied", "te"]
    hf_dir = loads["hf"]["qwen2_tied"]
    want = hf_to_mcore_global(load_file(hf_dir / "model.safetensors"), AutoConfig.from_pretrained(hf_dir), 128,
                              value=False)
    first, last = (torch.load(out / f"state_pp{r}.pt") for r in (0, 1))
    assert {k.split(".")[2] for k in first if k.startswith("decoder.layers.")} == {"0", "1"}
    assert {k.split(".")[2] for k in last if k.startswith("decoder.layers.")} == {"2", "3"}
    assert "embedding.word_embeddings.weight" in first and "output_layer.weight" in last
    for k, t in [*first.items(), *last.items()]:
        assert torch.equal(t, want[k]), k
    assert json.loads((out / "mismatch.json").read_text())["model_only"] == []


def test_two_writer_ranks_share_the_work_and_match_one(loads) -> None:
    two, one = loads["two"], loads["one"]
    files = sorted(p.name for p in two.glob("*.distcp"))
    assert files == ["__0_0.distcp", "__1_0.distcp"]
    sizes = [(two / f).stat().st_size for f in files]
    assert min(sizes) > 0.3 * max(sizes)  # balanced by bytes: each rank wrote its own share
    a, b = stored(two), stored(one)
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert loads["json"]["megatron"]["world_size"] == 2 and loads["json"]["megatron"]["tested"] is True
    # both ranks' chunks are described in one .metadata, as megatron-core's own multi-rank save does
    md = FileSystemReader(str(two)).read_metadata()
    assert {info.relative_path for info in md.storage_data.values()} == set(files)
