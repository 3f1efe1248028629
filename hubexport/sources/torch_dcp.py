"""A torch DCP checkpoint of a model state dict (`.metadata` + `__R_S.distcp`, written by
`torch.distributed.checkpoint.save` of an FSDP2 `get_model_state_dict`) as a Source of Hugging Face-style names.

Producers nest the model differently: a bare state dict (`model.embed_tokens.weight`), accelerate and NeMo RL
`{"model": state_dict}` (flattened to `model.model.embed_tokens.weight`), torchtitan its model beside `optimizer`,
`lr_scheduler`, `dataloader`, `train_state`. DCP's planner records each flattened key's original path in
`planner_data`, so the model's own names are read from there, never guessed by stripping prefixes.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

import torch

from hubexport.core import TensorSpec
from hubexport.errors import CheckpointError
from hubexport.sources import Source
from hubexport.sources.dcp import DcpTensor, open_checked, read_region

NON_MODEL_GROUPS = frozenset({"optimizer", "optim", "lr_scheduler", "lr_schedulers", "scheduler", "dataloader",
                              "train_state", "extra_state", "rng", "rng_state"})
# torchtitan's own module names (Llama/Qwen/DeepSeek ports): its q/k weights are permuted for its RoPE, so they
# are not HF tensors under other names.
TORCHTITAN_NAME = re.compile(r"^(tok_embeddings\.weight|layers\.\d+\.(attention|feed_forward|moe)\.)")
RECOPY = "the whole DCP checkpoint directory"


def refuse_torchtitan_names(dcp_dir: Path, names: Iterable[str]) -> None:
    native = sorted(n for n in names if TORCHTITAN_NAME.match(n))
    if native:
        raise CheckpointError(
            f"{dcp_dir} holds torchtitan's own parameter names (e.g. {native[0]}), not Hugging Face names",
            hint="save with torchtitan's checkpoint.last_save_in_hf = true, or convert with torchtitan's "
                 "scripts/checkpoint_conversion/convert_to_hf.py; hubexport does not map torchtitan names",
        )


def state_dict_groups(md, keys: list[str]) -> dict[str, dict[str, str]]:
    """Top-level state-dict entry ("" for keys saved un-nested) → {name inside it: flattened DCP key}."""
    paths = md.planner_data if isinstance(md.planner_data, dict) else {}
    out: dict[str, dict[str, str]] = {}
    for key in keys:
        path = paths.get(key) or (key,)
        group, inner = ("", str(path[0])) if len(path) == 1 else (str(path[0]), ".".join(map(str, path[1:])))
        out.setdefault(group, {})[inner] = key
    return out


def model_keys(dcp_dir: Path, md, index: dict[str, DcpTensor]) -> tuple[dict[str, str], list[str]]:
    """{model parameter name: DCP key} of the model's entry, and the keys left out (optimizer, scheduler...)."""
    groups = state_dict_groups(md, list(index))
    candidates = [g for g in groups if g not in NON_MODEL_GROUPS]
    chosen = "model" if "model" in groups else "" if "" in groups else candidates[0] if len(candidates) == 1 else None
    if chosen is None:
        raise CheckpointError(
            f"{dcp_dir} holds no model state dict: its top-level entries are {', '.join(sorted(groups)) or 'none'}",
            hint="pass the directory saved from the model's state dict (e.g. pytorch_model_fsdp_0/, policy/weights/)",
        )
    names = groups[chosen]
    refuse_torchtitan_names(dcp_dir, names)
    skipped = sorted(k for g, inner in groups.items() if g != chosen for k in inner.values())
    return names, skipped


class DcpSource:
    def __init__(self, dcp_dir: Path) -> None:
        self.dir = Path(dcp_dir)
        md, index = open_checked(self.dir, RECOPY)
        names, self.skipped = model_keys(self.dir, md, index)
        if not names:
            raise CheckpointError(f"{self.dir} holds no tensors", hint="pass the checkpoint that holds the model")
        self._tensors = {name: index[key] for name, key in names.items()}

    def metas(self) -> dict[str, TensorSpec]:
        return {n: TensorSpec(n, t.shape, t.dtype) for n, t in self._tensors.items()}

    def read(self, name: str) -> torch.Tensor:
        return read_region(self.dir, self._tensors[name])

    def close(self) -> None:
        pass


def open_dcp_source(layout) -> Source:
    """The Source for a detected DCP Layout: torch.save-serialised (`.metadata`) or safetensors-serialised."""
    if layout.version.endswith("safetensors"):
        from hubexport.sources.st_dcp import SafetensorsDcpSource

        return SafetensorsDcpSource(layout.files[0])
    return DcpSource(layout.files[0])
