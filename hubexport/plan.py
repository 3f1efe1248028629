"""The conversion plan: every output tensor, its shard file and the rank that writes it, computed from metadata
before a single tensor byte is read."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from hubexport.core import Group, TensorSpec, natural_key

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class ShardFile:
    name: str
    tensors: tuple[TensorSpec, ...]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


@dataclass
class Plan:
    groups: list[Group]
    files: list[ShardFile]

    @property
    def total_size(self) -> int:
        return sum(f.nbytes for f in self.files)

    @property
    def sharded(self) -> bool:
        return len(self.files) > 1

    def weight_map(self) -> dict[str, str]:
        return {t.name: f.name for f in self.files for t in f.tensors}

    @property
    def num_parameters(self) -> int:
        return sum(math.prod(t.shape) for f in self.files for t in f.tensors)

    def dominant_dtype(self) -> torch.dtype | None:
        """The floating-point dtype holding the most bytes (what save_pretrained records), None when there is none."""
        by_dtype: dict[torch.dtype, int] = {}
        for f in self.files:
            for t in f.tensors:
                if t.dtype.is_floating_point:
                    by_dtype[t.dtype] = by_dtype.get(t.dtype, 0) + t.nbytes
        return max(by_dtype, key=by_dtype.__getitem__) if by_dtype else None

    def group_of(self) -> dict[str, int]:
        return {spec.name: i for i, g in enumerate(self.groups) for spec in g.outputs}

    def peak_bytes(self, source_specs: dict[str, TensorSpec]) -> int:
        """Upper bound of tensor bytes held at once: the largest group's inputs plus its outputs, twice, since the
        writer fetches one tensor ahead (which may start the next group)."""
        return 2 * max(
            (sum(source_specs[n].nbytes for n in g.inputs) + sum(o.nbytes for o in g.outputs) for g in self.groups),
            default=0,
        )

    def files_for_rank(self, rank: int, world_size: int) -> list[ShardFile]:
        """Files are dealt to ranks greedily, biggest first, to the least-loaded rank: deterministic and
        balanced by bytes, so every rank computes the same assignment without talking."""
        load = [0] * world_size
        owner: dict[str, int] = {}
        for f in sorted(self.files, key=lambda f: (-f.nbytes, f.name)):
            r = min(range(world_size), key=lambda i: (load[i], i))
            owner[f.name] = r
            load[r] += f.nbytes
        return [f for f in self.files if owner[f.name] == rank]


SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)?\s*$", re.IGNORECASE)


def parse_size(size: int | str) -> int:
    """`5GB` → 5·10⁹ (as save_pretrained reads it), `2GiB` → 2·2³⁰, a bare number is bytes."""
    if isinstance(size, int):
        return size
    m = SIZE_RE.match(size)
    if not m:
        raise ValueError(f"{size!r} is not a size")
    unit = (m.group(2) or "B").upper()
    base = 1024 if "I" in unit else 1000
    return int(float(m.group(1)) * base ** "BKMGT".index(unit[0]))


def cast_spec(spec: TensorSpec, dtype: torch.dtype | None) -> TensorSpec:
    """Casting touches floating-point tensors only (integer buffers keep their type, as in save_pretrained)."""
    if dtype is None or not spec.dtype.is_floating_point:
        return spec
    return TensorSpec(spec.name, spec.shape, dtype)


def make_plan(
    groups: list[Group],
    *,
    max_shard_size: int | str,
    cast: torch.dtype | None = None,
    prefix: str = "model",
) -> Plan:
    from huggingface_hub import split_state_dict_into_shards_factory

    outputs = sorted((cast_spec(o, cast) for g in groups for o in g.outputs), key=lambda s: natural_key(s.name))
    by_name = {o.name: o for o in outputs}
    if len(by_name) != len(outputs):
        dupes = sorted({o.name for o in outputs if sum(p.name == o.name for p in outputs) > 1})
        raise ValueError(f"two groups produce the same output tensor: {dupes[:3]}")
    split = split_state_dict_into_shards_factory(
        by_name,
        get_storage_size=lambda s: s.nbytes,
        filename_pattern=prefix + "{suffix}.safetensors",
        max_shard_size=parse_size(max_shard_size),
    )
    files = [
        ShardFile(fname, tuple(by_name[n] for n in names)) for fname, names in split.filename_to_tensors.items()
    ]
    return Plan(groups=groups, files=files)
