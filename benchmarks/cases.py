"""The checkpoints the benchmark measures, made once and kept in the work folder: a real verl FSDP2 checkpoint, the
same weights as a megatron-core torch_dist checkpoint, and synthetic Hugging Face folders of one architecture at two
sizes (random weights, written tensor by tensor) for the peak-RSS-against-model-size check."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

LAYER_BYTES = 48_800_000  # one layer of the synthetic Qwen2 below, bf16 (embeddings + head: 197 MB)


def make_fsdp(work: Path) -> Path:
    from hubexport.examples import FsdpCase, make_checkpoints

    case = FsdpCase("fsdp_w4", world_size=4, dtype="bfloat16", hidden_size=1536, intermediate_size=4096, layers=24,
                    vocab_size=32000, reference=False)
    actor = work / case.name / "global_step_1" / "actor"
    if not (actor / "fsdp_config.json").is_file():
        shutil.rmtree(work / case.name, ignore_errors=True)
        make_checkpoints([case], work)
    return actor


def make_megatron(work: Path, hf_model: Path, name: str = "mcore", nproc: int = 2) -> Path:
    """`hf_model` as a megatron-core torch_dist checkpoint (v1 layout, as verl lays it out), written by `hubexport
    to-megatron` from `nproc` ranks."""
    actor = work / name / "global_step_1" / "actor"
    if not (actor / "dist_ckpt" / "metadata.json").is_file():
        shutil.rmtree(work / name, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                        "-m", "hubexport", "to-megatron", "--hf-model-path", str(hf_model), "--output-path",
                        str(actor / "dist_ckpt")], check=True)
        (actor / "huggingface").mkdir()
        for p in hf_model.iterdir():
            if not p.name.endswith((".safetensors", ".index.json")):
                shutil.copy(p, actor / "huggingface" / p.name)
    return actor


def make_megatron_tp2(work: Path, hf_model: Path) -> Path:
    """`hf_model` saved by megatron-core itself from a TP=2 GPTModel (2 CPU processes, the tests' producer in
    `tests/fixtures_mcore.py`): row-parallel weights are stored split along their columns, as a TP=2 run saves them.
    megatron-core keeps fp32 parameters, so this checkpoint is twice the bf16 one."""
    actor = work / "mcore_tp2" / "global_step_1" / "actor"
    if (actor / "dist_ckpt" / "metadata.json").is_file():
        return actor
    from safetensors.torch import load_file, save_file

    from tests.fixtures_mcore import _job, run_torchrun

    one_file = work / "hf_model_1file"  # the producer reads one model.safetensors
    if not (one_file / "model.safetensors").is_file():
        one_file.mkdir(exist_ok=True)
        weights = {}
        for f in sorted(hf_model.glob("*.safetensors")):
            weights |= load_file(f)
        save_file(weights, one_file / "model.safetensors", metadata={"format": "pt"})
        shutil.copy(hf_model / "config.json", one_file / "config.json")
    shutil.rmtree(work / "mcore_tp2", ignore_errors=True)
    run_torchrun(2, [_job(actor, one_file, tp=2, forward=False)], timeout=1200)
    (actor / "huggingface").mkdir()
    shutil.copy(hf_model / "config.json", actor / "huggingface" / "config.json")
    return actor


def _synthetic(gigabytes: int):  # -> (transformers.Qwen2Config, {name: meta tensor})
    """A Qwen2 (hidden 1536, as the FSDP case) of about `gigabytes` GB in bf16: only the number of layers differs
    between sizes, so the largest tensor (the embedding, 98 MB) is the same."""
    import torch
    import transformers

    layers = max(1, round((gigabytes * 1e9 - 197e6) / LAYER_BYTES))
    cfg = transformers.Qwen2Config(vocab_size=32000, hidden_size=1536, intermediate_size=4096, num_hidden_layers=layers,
                                   num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=False,
                                   architectures=["Qwen2ForCausalLM"], dtype="bfloat16")
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    return cfg, model.state_dict()


def make_synthetic(work: Path, gigabytes: int) -> Path:
    """The synthetic Qwen2 as a Hugging Face folder of random bf16 weights, written tensor by tensor."""
    import torch

    from hubexport.core import TensorSpec
    from hubexport.safetensors_format import index_json
    from hubexport.writers.safetensors import write_file

    folder = work / f"synthetic_{gigabytes}gb"
    if (folder / "config.json").is_file():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    cfg, state = _synthetic(gigabytes)
    specs = [TensorSpec(n, tuple(t.shape), torch.bfloat16) for n, t in state.items()]
    files: list[list[TensorSpec]] = [[]]
    for s in specs:  # 2 GB files, in save_pretrained's order
        if files[-1] and sum(t.nbytes for t in files[-1]) + s.nbytes > 2e9:
            files.append([])
        files[-1].append(s)
    gen = torch.Generator().manual_seed(0)
    weight_map = {}
    for i, group in enumerate(files):
        name = f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
        write_file(folder / name, group, lambda s: torch.randn(s.shape, generator=gen, dtype=torch.bfloat16) * 0.02)
        weight_map |= {s.name: name for s in group}
    (folder / "model.safetensors.index.json").write_text(index_json(weight_map, sum(s.nbytes for s in specs)))
    cfg.save_pretrained(folder)
    return folder


def make_fsdp_synthetic(work: Path, gigabytes: int) -> Path:
    """The synthetic Qwen2 as verl FSDP2 rank files (world size 2, `Shard(0)` DTensors of random bf16), made by 2
    real processes (gloo), each holding only its own shards: an 8 GB checkpoint needs 4 GB per process."""
    from hubexport.examples import spawn_ranks

    actor = work / f"fsdp_synthetic_{gigabytes}gb" / "global_step_1" / "actor"
    if not (actor / "fsdp_config.json").is_file():
        shutil.rmtree(work / f"fsdp_synthetic_{gigabytes}gb", ignore_errors=True)
        spawn_ranks(_fsdp_synthetic_rank, [gigabytes], 2, work)
    return actor


def _fsdp_synthetic_rank(gigabytes: int, work: Path, rank: int) -> None:
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    cfg, state = _synthetic(gigabytes)
    mesh = init_device_mesh("cpu", (2,))
    gen = torch.Generator().manual_seed(rank)
    local = {n: DTensor.from_local(torch.randn((t.shape[0] // 2, *t.shape[1:]), generator=gen, dtype=torch.bfloat16),
                                   mesh, [Shard(0)], run_check=False) for n, t in state.items()}
    actor = work / f"fsdp_synthetic_{gigabytes}gb" / "global_step_1" / "actor"
    if rank == 0:
        actor.mkdir(parents=True)
    torch.distributed.barrier()
    torch.save(local, actor / f"model_world_size_2_rank_{rank}.pt")
    torch.distributed.barrier()
    if rank == 0:
        cfg.save_pretrained(actor / "huggingface")
        (actor / "fsdp_config.json").write_text(json.dumps({"FSDP_version": 2, "world_size": 2}))


def largest_group_bytes(env: dict[str, str], actor: Path, work: Path) -> int:
    """The largest tensor group of a merge (half the planned bound: the writer holds one group ahead)."""
    proc = subprocess.run([sys.executable, "-m", "hubexport", "merge", "--local-dir", str(actor), "--target-dir",
                           str(work / "dry"), "--dry-run", "--json"], env=env, check=True, capture_output=True, text=True)
    return json.loads(proc.stdout)["peak_tensor_bytes"] // 2
