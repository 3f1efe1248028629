"""A merge's outcome as plain data, cached after a merge so the next merge of a checkpoint with the same tensors,
config and options runs without torch or transformers (`fast_merge`): what each output file's header is, which
checkpoint tensor (or which byte ranges of it) each output is, which tied aliases must equal their weight, the
config.json save_pretrained wrote, and the facts the result reports.

Keyed by (hubexport, transformers, the checkpoint format, every tensor's name/shape/dtype, config.json's bytes,
the options that shape the output), in the same cache folder as `mapping/native_cache`. Only merges whose every
output is a checkpoint tensor, rows of one (a torch_dist q/k/v split, a trimmed vocabulary) or zeros (a critic's
bias megatron has not) are recorded: anything computed otherwise is not."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from hubexport.mapping import native_cache
from hubexport.options import MergeOptions
from hubexport.plan import Plan, parse_size
from hubexport.safetensors_format import header_bytes, index_json

FORMAT = 2
KIND = "merge"
FORMATS = ("fsdp", "megatron")  # the checkpoints the fast path reads (megatron: torch_dist)
Shapes = list[tuple[str, tuple[int, ...], str]]  # (name, shape, torch dtype name), in the checkpoint's order
Ranges = tuple[tuple[int, int], ...]  # [start, stop) byte ranges


@dataclass(frozen=True)
class Copy:
    """An output's bytes: the checkpoint tensor `source`'s, or its byte `ranges` in order; zeros where `source` is
    None (a made-up zero bias)."""

    source: str | None
    ranges: Ranges | None = None


@dataclass(frozen=True)
class Recipe:
    architecture: str
    dtype: str
    num_parameters: int
    tied: bool
    value_model: bool
    peak_tensor_bytes: int
    notes: tuple[str, ...]  # what planning found out (architecture notes), after detect's own notes
    files: tuple[tuple[str, str], ...]  # (file name, safetensors header as written: 8-byte length + JSON, latin-1)
    index: str | None  # model.safetensors.index.json, when sharded
    config: str  # config.json as save_pretrained wrote it
    checks: tuple[tuple[str, str], ...]  # (alias, canonical): tied aliases that must equal their weight
    copies: tuple[tuple[str, str | None, Ranges | None], ...]  # (output, source, ranges): outputs not a tensor as is

    def copy_map(self) -> dict[str, Copy]:
        """What each output is, when not a tensor as it is (the outputs not named here)."""
        return {output: Copy(source, ranges) for output, source, ranges in self.copies}

    def as_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    @classmethod
    def of(cls, data: dict[str, Any] | None) -> Recipe | None:
        """A cached entry, or None when there is none or this version cannot read it."""
        try:
            r = cls(**{k: data[k] for k in cls.__dataclass_fields__})  # type: ignore[index]
            copies = tuple((str(out), None if src is None else str(src),
                            None if rs is None else tuple((int(a), int(b)) for a, b in rs)) for out, src, rs in r.copies)
            return replace(r, notes=tuple(str(n) for n in r.notes), files=tuple((str(n), str(h)) for n, h in r.files),
                           checks=tuple((str(a), str(c)) for a, c in r.checks), copies=copies)
        except (KeyError, TypeError, ValueError):
            return None


def headers(plan: Plan) -> tuple[tuple[str, str], ...]:
    """A recipe's `files`: each planned file's safetensors header as the writer writes it."""
    return tuple((f.name, header_bytes(f.tensors).decode("latin-1")) for f in plan.files)


def index_of(plan: Plan) -> str | None:
    """model.safetensors.index.json of a sharded plan; None for one file."""
    return index_json(plan.weight_map(), plan.total_size) if plan.sharded else None


def shapes_of(specs: Iterable[tuple[str, tuple[int, ...], object]]) -> Shapes:
    """(name, shape, dtype) with torch dtypes or their names: as the key sees them."""
    return [(n, tuple(int(d) for d in shape), str(dtype).removeprefix("torch.")) for n, shape, dtype in specs]


def key(layout_format: str, version: str, hf_dir: Path | None, shapes: Shapes, options: MergeOptions) -> str | None:
    """The cache key of a merge, or None when its outcome is never cached (a cast, LoRA, remote code, no config)."""
    from hubexport import __version__

    o = options
    if o.dtype or o.lora_mode or o.lora_alpha or o.lora_rank or o.lora_base_model or o.trust_remote_code:
        return None
    if layout_format not in FORMATS or hf_dir is None:
        return None
    try:
        config = (hf_dir / "config.json").read_bytes()
        transformers = importlib.metadata.version("transformers")
        max_shard = parse_size(o.max_shard_size)
    except (OSError, ValueError, importlib.metadata.PackageNotFoundError):
        return None
    ident = [FORMAT, __version__, transformers, layout_format, version, [[n, list(s), d] for n, s, d in shapes],
             hashlib.sha256(config).hexdigest(), max_shard, o.tie_word_embedding, o.is_value_model]
    return hashlib.sha256(json.dumps(ident).encode()).hexdigest()


def load(k: str) -> Recipe | None:
    return Recipe.of(native_cache.load(k, KIND))


def store(k: str, recipe: Recipe) -> None:
    native_cache.store(k, recipe.as_json(), KIND)
