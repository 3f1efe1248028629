"""verl v0 Megatron checkpoints: `model/mp_rank_TT[_PPP][_EEE]/model.pt`, each `torch.save([chunk.state_dict() for
chunk in vpp_chunks])` with local layer and expert numbers and TP-local shards (formats doc §2.1, §2.5, §2.10).

Files are opened with mmap and weights_only, so metas() reads no tensor bytes; read() merges one tensor's TP shards.
Names are presented like the torch_dist source: global `decoder.layers.<i>.` and `...local_experts.<j>.`.
RankSource is the part every per-rank torch.save layout shares (verl's `adapter_checkpoint/` rank files too).
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from hubexport.core import TensorSpec
from hubexport.errors import CheckpointError
from hubexport.sources import Source

LAYER_RE = re.compile(r"^((?:.*\.)?decoder\.layers\.)(\d+)\.(.*)$")
SEQ_EXPERT_RE = re.compile(r"^(.*\.mlp\.experts\.)local_experts\.(\d+)\.(.*)$")
GROUPED_EXPERT_RE = re.compile(r"^(.*\.mlp\.experts\.)(linear_fc[12])\.(weight|bias)(\d+)$")
MP_RE = re.compile(r"mp_rank_(\d{2})(?:_(\d{3}))?(?:_(\d{3}))?")
REPLICATED = ("layer_norm", "layernorm", "norm.weight", "router", "expert_bias", "gate_weight",
              "linear_q_down_proj", "linear_kv_down_proj", "enorm", "hnorm")
ROW_PARALLEL = ("linear_proj.weight", "linear_fc2.weight")
ROW_PARALLEL_BIAS = ("linear_proj.bias", "linear_fc2.bias")
Coord = tuple[int, int, int]  # (tp, pp, ep) rank


@dataclass(frozen=True)
class _Piece:
    file: int
    chunk: int
    key: str


def load_rank_file(path: Path) -> object:
    """torch.load without code: mmap'd tensors, and the BytesIO TE writes for _extra_state."""
    try:
        with torch.serialization.safe_globals([io.BytesIO]):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # pickle, zip and weights_only errors have no common base
        raise CheckpointError(f"cannot load {path}: {e}",
                              hint="the file is corrupt or holds non-tensor objects; re-copy it") from e


def _load(path: Path) -> list[dict]:
    obj = load_rank_file(path)
    if isinstance(obj, dict) and all(isinstance(v, torch.Tensor) or v is None or isinstance(v, io.BytesIO)
                                     for v in obj.values()):
        return [obj]
    if isinstance(obj, dict):  # {"model": sd} or {"model0": sd, "model1": sd}
        keys = sorted((k for k in obj if re.fullmatch(r"model\d*", k)), key=lambda k: int(k[5:] or 0))
        return [obj[k] for k in keys]
    if isinstance(obj, list):
        return obj
    raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a list of state dicts", hint="re-copy it")


def rank_coord(label: str, parallel: dict[str, int]) -> Coord | None:
    """(tp, pp, ep) of an `mp_rank_TT[_PPP][_EEE]` name; `_NNN` alone is EP when the run had PP == 1 and EP > 1."""
    m = MP_RE.fullmatch(label)
    if not m:
        return None
    t, a, b = int(m.group(1)), m.group(2), m.group(3)
    if b is not None:
        return t, int(a), int(b)
    if a is not None and parallel.get("pp", 1) <= 1 and parallel.get("ep", 1) > 1:
        return t, 0, int(a)
    return t, int(a or 0), 0


def gate_up_from_tp_shards(shards: list[torch.Tensor]) -> torch.Tensor:
    """TP-local fc1 shard i is [gate_i; up_i] (formats doc §2.4): concatenating shards naively would interleave them.
    The result is the global [gate; up] a torch_dist checkpoint stores, so mappings see one layout."""
    gates, ups = zip(*(s.chunk(2, dim=0) for s in shards), strict=True)
    return torch.cat([*gates, *ups], dim=0)


def _tp_merge(name: str, shards: list[torch.Tensor]) -> torch.Tensor:
    if len(shards) == 1 or any(r in name for r in REPLICATED) or name.endswith(ROW_PARALLEL_BIAS):
        return shards[0]
    if name.endswith("output_layer.weight") and shards[0].shape[0] == 1:  # critic value head: replicated
        return shards[0]
    if name.endswith(("linear_fc1.weight", "linear_fc1.bias")):
        return gate_up_from_tp_shards(shards)
    if name.endswith(ROW_PARALLEL):
        return torch.cat(shards, dim=1)
    return torch.cat(shards, dim=0)  # column-parallel (qkv keeps whole groups per rank), vocab-parallel embedding


def counted_offsets(coords: list[Coord], data: list[list[dict]], pp_n: int) -> dict[tuple[int, int], int]:
    """Global layer offset of (vpp chunk v, pp rank p) from the layers each stage holds: interleaved order, chunk v of
    rank p is block v*P + p."""
    by = {c: i for i, c in enumerate(coords)}
    offsets: dict[tuple[int, int], int] = {}
    total = 0
    for v in range(len(data[0])):
        for p in range(pp_n):
            offsets[(v, p)] = total
            sd = data[by[(0, p, 0)]][v]
            total += 1 + max((int(m.group(2)) for k in sd if (m := LAYER_RE.match(k))), default=-1)
    return offsets


class RankSource(Source):
    """TP-local state dicts of every (tp, pp, ep) rank (each a list of VPP chunks, local layer and expert numbers) as
    one Source of global tensors; `merge` joins one tensor's TP shards, `keep(key, pp_rank)` drops duplicates."""

    def __init__(self, files: list[Path], coords: list[Coord], data: list[list[dict]],
                 offsets: dict[tuple[int, int], int], tp_n: int, *,
                 merge: Callable[[str, list[torch.Tensor]], torch.Tensor] = _tp_merge,
                 keep: Callable[[str, int], bool] = lambda key, p: True) -> None:
        self.files, self._data, self._merge = files, data, merge
        by = {c: i for i, c in enumerate(coords)}
        self._pieces: dict[str, list[_Piece | None]] = {}  # logical name → one piece per TP rank, in TP order
        where: dict[str, Coord] = {}
        for fi, (t, p, e) in enumerate(coords):
            for v, sd in enumerate(data[fi]):
                n_local = self._local_experts(sd)
                for key, val in sd.items():
                    if not isinstance(val, torch.Tensor) or "_extra_state" in key or not keep(key, p):
                        continue
                    if e > 0 and "experts." not in key:
                        continue  # non-expert weights are identical on every EP rank
                    name = self._global_name(key, offsets[(v, p)], e * n_local)
                    self._pieces.setdefault(name, [None] * tp_n)[t] = _Piece(fi, v, key)
                    where[name] = (t, p, e)
        self._specs = {}
        for name, pieces in self._pieces.items():
            if None in pieces:
                _, p, e = where[name]
                lacking = files[by[(pieces.index(None), p, e)]]
                raise CheckpointError(f"{name} is missing from {lacking}",
                                      hint="the rank files do not come from one save; re-copy the checkpoint")
            shards = [self._tensor(pc) for pc in pieces]
            odd = next((pc for pc, s in zip(pieces, shards, strict=True) if s.shape != shards[0].shape), None)
            if odd is not None:
                raise CheckpointError(
                    f"{name} is {list(shards[0].shape)} in {files[pieces[0].file]} but "
                    f"{list(self._tensor(odd).shape)} in {files[odd.file]}",
                    hint="the rank files come from runs with different tensor-parallel sizes; keep one run's files")
            meta = merge(name, [torch.empty(s.shape, dtype=s.dtype, device="meta") for s in shards])
            self._specs[name] = TensorSpec(name, tuple(meta.shape), meta.dtype)

    @staticmethod
    def _local_experts(sd: dict) -> int:
        idx = set()
        for k in sd:
            if m := SEQ_EXPERT_RE.match(k):
                idx.add(int(m.group(2)))
            elif m := GROUPED_EXPERT_RE.match(k):
                idx.add(int(m.group(4)))
        return len(idx)

    @staticmethod
    def _global_name(key: str, layer_offset: int, expert_offset: int) -> str:
        if m := LAYER_RE.match(key):
            key = f"{m.group(1)}{int(m.group(2)) + layer_offset}.{m.group(3)}"
        if m := SEQ_EXPERT_RE.match(key):
            key = f"{m.group(1)}local_experts.{int(m.group(2)) + expert_offset}.{m.group(3)}"
        elif m := GROUPED_EXPERT_RE.match(key):
            key = f"{m.group(1)}local_experts.{int(m.group(4)) + expert_offset}.{m.group(2)}.{m.group(3)}"
        return key

    def _tensor(self, pc: _Piece) -> torch.Tensor:
        return self._data[pc.file][pc.chunk][pc.key]

    def metas(self) -> dict[str, TensorSpec]:
        return dict(self._specs)

    def read(self, name: str) -> torch.Tensor:
        return self._merge(name, [self._tensor(pc) for pc in self._pieces[name]]).clone()

    def close(self) -> None:
        self._data = []


class LegacySource(RankSource):
    def __init__(self, files: list[Path], parallel: dict[str, int], *, tied: bool = False) -> None:
        files = [Path(f) for f in files]
        coords = []
        for f in files:
            c = rank_coord(f.parent.name, parallel)
            if c is None:
                raise CheckpointError(f"{f.parent} is not an mp_rank_* directory", hint="remove the stray folder")
            coords.append(c)
        tp_n, pp_n = parallel.get("tp", 1), parallel.get("pp", 1)
        data = [_load(f) for f in files]

        def keep(key: str, p: int) -> bool:  # the last stage's copy of a tied embedding (formats doc §2.8)
            return not (tied and pp_n > 1 and key == "output_layer.weight" and p == pp_n - 1)

        super().__init__(files, coords, data, counted_offsets(coords, data, pp_n), tp_n, keep=keep)
