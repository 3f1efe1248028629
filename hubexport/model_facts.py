"""What hubexport knows about a model, for its card and the action's summary: from the merge that made it (layout,
parallel sizes, step, shard digests) or from the folder itself (safetensors headers and config.json)."""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hubexport.detect import STEP_RE
from hubexport.errors import CardError
from hubexport.jsonfile import read_json_object

if TYPE_CHECKING:
    from hubexport.result import Result as MergeResult


@dataclass(frozen=True)
class Shard:
    name: str
    size: int
    sha256: str


@dataclass
class ModelFacts:
    architecture: str | None
    model_type: str | None
    dtype: str | None
    num_parameters: int
    tied_embeddings: bool
    value_model: bool
    source: str | None  # e.g. "verl FSDP checkpoint (fsdp2)"; None for a plain HF folder
    layout: str | None  # e.g. "FSDP world size 8" or "TP 2 · PP 2 · EP 1"
    global_step: int | None
    shards: list[Shard]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _read_json(path: Path) -> dict[str, Any]:
    return read_json_object(path, error=CardError, hint="pass a Hugging Face model folder (hubexport merge output)")


def model_config(folder: Path) -> dict[str, Any]:
    if not (folder / "config.json").is_file():
        raise CardError(f"{folder} has no config.json", hint="pass a Hugging Face model folder (hubexport merge output)")
    return _read_json(folder / "config.json")


def _tied(config: Mapping[str, Any]) -> bool:
    text_config = config.get("text_config") or {}
    return bool(config.get("tie_word_embeddings", text_config.get("tie_word_embeddings", False)))


def _step_from_path(path: Path) -> int | None:
    steps = [int(m.group(1)) for part in path.resolve().parts if (m := STEP_RE.fullmatch(part))]
    return steps[-1] if steps else None


def _describe_source(fmt: str, version: str, parallel: Mapping[str, int]) -> tuple[str, str]:
    if fmt == "fsdp":
        return f"verl FSDP checkpoint ({version})", f"FSDP world size {parallel.get('world_size', '?')}"
    layout = " · ".join(f"{k.upper()} {v}" for k, v in parallel.items()) or "single rank"
    return f"{'Megatron' if fmt == 'megatron' else fmt} checkpoint ({version})", layout


def facts_from_merge(result: MergeResult, config: Mapping[str, Any]) -> ModelFacts:
    source, layout = _describe_source(result.source_format, result.source_version, result.parallel)
    return ModelFacts(
        architecture=result.architecture,
        model_type=config.get("model_type"),
        dtype=result.dtype,
        num_parameters=result.num_parameters,
        tied_embeddings=result.tied_embeddings,
        value_model=result.value_model,
        source=source,
        layout=layout,
        global_step=result.global_step,
        shards=sorted((Shard(f.name, f.size, f.sha256) for f in result.files if f.name.endswith(".safetensors")),
                      key=lambda s: s.name),
    )


def facts_from_folder(folder: Path, config: Mapping[str, Any], sha256: Mapping[str, str] | None = None) -> ModelFacts:
    """Everything a plain HF folder tells: safetensors headers for shapes and dtypes, config.json for the rest."""
    from hubexport.safetensors_format import read_specs  # torch: imported only when a folder is read

    known = sha256 or {}
    shards, dtype_bytes, params = [], Counter(), 0
    for path in sorted(folder.glob("*.safetensors")):
        for spec in read_specs(path).values():
            dtype_bytes[spec.dtype] += spec.nbytes
            params += prod(spec.shape)
        shards.append(Shard(path.name, path.stat().st_size, known.get(path.name) or sha256_file(path)))
    dtype = dtype_bytes.most_common(1)[0][0] if dtype_bytes else None
    arch = (config.get("architectures") or [None])[0]
    return ModelFacts(
        architecture=arch,
        model_type=config.get("model_type"),
        dtype=str(dtype).removeprefix("torch.") if dtype else None,
        num_parameters=params,
        tied_embeddings=_tied(config),
        value_model=bool(arch and arch.endswith("ForTokenClassification")),
        source=None,
        layout=None,
        global_step=_step_from_path(folder),
        shards=shards,
    )


def model_facts(folder: Path, merge_result: MergeResult | None = None,
                sha256: Mapping[str, str] | None = None) -> ModelFacts:
    """What the card (and the action's summary) say about the model in `folder`: from the merge when there was one."""
    config = model_config(Path(folder))
    return facts_from_merge(merge_result, config) if merge_result else facts_from_folder(Path(folder), config, sha256)
