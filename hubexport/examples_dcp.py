"""Real torch DCP checkpoints of an FSDP2 model, made on CPU (gloo) the way their producers save them: a plain
`dcp.save(get_model_state_dict(model))`, accelerate's own `save_fsdp_model` (`pytorch_model_fsdp_0/`, what TRL and
axolotl runs leave), NeMo RL's `{"model": ...}` save into `step_N/policy/weights/`, and safetensors-serialised DCP
through torch's `HuggingFaceStorageWriter`: NeMo Automodel's `model/` (+ `model/consolidated/`) and torch's own
consolidating layout (`sharded/` beside the full files). Used by the tests."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from hubexport.examples import (
    FsdpCase,
    _full_state_and_logits,
    _save_hf_dir,
    _save_reference,
    _train_step,
    _wrap,
    build_model,
    spawn_ranks,
)

WRITERS = ("plain", "accelerate", "nemo_rl", "automodel", "torch_hf")
_LOCAL = {"plain": "global_step_1/actor", "accelerate": "checkpoint-1", "nemo_rl": "step_1", "automodel": "epoch_0_step_1",
          "torch_hf": "step_1/hf"}
_SUB = {"plain": "", "accelerate": "pytorch_model_fsdp_0", "nemo_rl": "policy/weights", "automodel": "model",
        "torch_hf": "sharded"}


@dataclass(frozen=True)
class DcpCase:
    name: str
    writer: str  # one of WRITERS
    model: FsdpCase  # the model and its FSDP2 wrapping (fsdp=2, world_size = process count)

    @property
    def local_dir(self) -> Path:
        """What a user passes as --local-dir (relative to the case folder)."""
        return Path(_LOCAL[self.writer])

    @property
    def dcp_dir(self) -> Path:
        return self.local_dir / _SUB[self.writer] if _SUB[self.writer] else self.local_dir

    @property
    def config_dir(self) -> Path:
        """Where the run's HF config and tokenizer are put: verl's huggingface/, the Trainer's checkpoint folder,
        NeMo RL's policy/ (NeMo RL saves none: its converter takes the config from the training yaml), Automodel's
        model/consolidated/, beside torch's consolidated files."""
        return {"plain": self.local_dir / "huggingface", "accelerate": self.local_dir,
                "nemo_rl": self.local_dir / "policy", "automodel": self.dcp_dir / "consolidated",
                "torch_hf": self.local_dir}[self.writer]


def _save(model, case: DcpCase, path: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    if case.writer == "accelerate":
        from accelerate import FullyShardedDataParallelPlugin, PartialState
        from accelerate.utils.fsdp_utils import save_fsdp_model

        PartialState()  # accelerate's logger refuses to log without it
        plugin = FullyShardedDataParallelPlugin(fsdp_version=2, state_dict_type="SHARDED_STATE_DICT")
        save_fsdp_model(plugin, None, model, path.parent)  # the accelerator is only read for full/local state dicts
        return
    sd = get_model_state_dict(model)
    if case.writer in ("automodel", "torch_hf"):
        if case.model.tied:  # as Automodel does: safetensors refuses two names for one storage
            sd.pop("lm_head.weight")
        _save_safetensors(sd, case.writer, path)
        return
    dcp.save({"model": sd} if case.writer == "nemo_rl" else sd, checkpoint_id=path)


def _save_safetensors(sd: dict, writer: str, path: Path) -> None:
    """torch's HuggingFaceStorageWriter, every rank writing its own shards. Automodel: two model files (layer 0 and
    the rest), then rank 0 consolidates into model/consolidated/; torch_hf: the writer's own consolidation (shards in
    sharded/, full files beside it)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter
    from torch.distributed.checkpoint._consolidate_hf_safetensors import consolidate_safetensors_files

    if writer == "torch_hf":
        dcp.save(sd, storage_writer=HuggingFaceStorageWriter(str(path.parent), save_distributed=True,
                                                             enable_consolidation=True))
        return
    mapping = {k: 1 if ".layers.0." in k else 2 for k in sd}
    dcp.save(sd, storage_writer=HuggingFaceStorageWriter(str(path), fqn_to_index_mapping=mapping,
                                                         save_distributed=True))
    torch.distributed.barrier()
    if torch.distributed.get_rank() == 0:
        (path / "consolidated").mkdir()
        consolidate_safetensors_files(str(path), str(path / "consolidated"), fqn_to_index_mapping=mapping)


def make_dcp_case(case: DcpCase, out: Path, rank: int) -> None:
    """Train one step under FSDP2 and save; call on every rank inside a gloo process group."""
    cfg, model = build_model(case.model)
    model = _wrap(model, case.model)
    _train_step(model, case.model.critic)
    full, logits = _full_state_and_logits(model, case.model)
    _save(model, case, out / case.name / case.dcp_dir)
    torch.distributed.barrier()
    if rank == 0:
        _save_hf_dir(out / case.name / case.config_dir, cfg, case.model)
        _save_reference(out / case.name / "expected", full, logits, case.model)
    torch.distributed.barrier()


def make_dcp_checkpoints(cases: list[DcpCase], out: Path, world_size: int = 2) -> None:
    """Every case in one spawn of `world_size` real processes."""
    assert all(c.model.fsdp == 2 and c.model.world_size == world_size for c in cases)
    out.mkdir(parents=True, exist_ok=True)
    spawn_ranks(make_dcp_case, cases, world_size, out)
