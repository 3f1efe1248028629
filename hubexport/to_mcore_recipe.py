"""A to-megatron run's outcome as plain data, cached after a conversion so the next one of a folder with the same
headers, config and options runs without torch, transformers or megatron-core (`fast_to_mcore`): where each chunk's
bytes come from in the HF files, each ShardedObject's bytes, `.metadata` and `common.pt` as written, the checks the
HF tensors must pass, and the facts the result reports.

Keyed by (hubexport, transformers, torch, every weight file's name and header bytes, the index and config.json
bytes, the options), in the same cache folder as `mapping/native_cache`. Only conversions whose every chunk is rows
of the HF files (and zeros) are recorded; one whose weights are made in memory (fused experts, MLA, FP8) is not."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hubexport.mapping import native_cache
from hubexport.options import MegatronOptions
from hubexport.safetensors_format import INDEX_NAME, raw_header

FORMAT = 1
KIND = "to-megatron"
Part = tuple[int, int, int]  # (weight file index, or core.ZEROS; offset; length)


@dataclass(frozen=True)
class Recipe:
    objects: int  # ShardedObjects, first in the file, each `blob`
    blob: str  # the torch.save of one `_extra_state` (latin-1)
    chunks: tuple[tuple[str, tuple[int, ...], tuple[Part, ...]], ...]  # (dtype, stored sizes, parts) in file order
    metadata: str  # `.metadata` as written (latin-1)
    common: str  # `common.pt` as written (latin-1)
    checks: tuple[tuple[str, tuple[Part, ...], tuple[Part, ...]], ...]  # ("equal", a, b): same bytes; ("zero", a, ())
    result: dict[str, Any]  # Result's facts: architecture ... notes, and `megatron` (MegatronFacts)

    def as_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    @classmethod
    def of(cls, data: dict[str, Any] | None) -> Recipe | None:
        """A cached entry, or None when there is none or this version cannot read it."""
        try:
            d: dict[str, Any] = data  # type: ignore[assignment]
            chunks = tuple((str(t), tuple(int(x) for x in sizes), _parts(parts)) for t, sizes, parts in d["chunks"])
            checks = tuple((str(kind), _parts(a), _parts(b)) for kind, a, b in d["checks"])
            return cls(int(d["objects"]), str(d["blob"]), chunks, str(d["metadata"]), str(d["common"]), checks,
                       dict(d["result"]))
        except (KeyError, TypeError, ValueError):
            return None


def _parts(parts: Any) -> tuple[Part, ...]:
    return tuple((int(f), int(o), int(n)) for f, o, n in parts)


def key(hf_dir: Path, files: list[Path], options: MegatronOptions) -> str | None:
    """The cache key of a conversion, or None when its outcome is never cached (--test reads back with torch; remote
    code). Reads the headers, never the tensors."""
    from hubexport import __version__

    if options.test or options.trust_remote_code:
        return None
    try:
        config = (hf_dir / "config.json").read_bytes()
        index = (hf_dir / INDEX_NAME).read_bytes() if (hf_dir / INDEX_NAME).is_file() else b""
        heads = [[f.name, hashlib.sha256(raw_header(f)).hexdigest()] for f in files]
        versions = [importlib.metadata.version(p) for p in ("transformers", "torch")]
    except (OSError, ValueError, importlib.metadata.PackageNotFoundError):
        return None
    ident = [FORMAT, __version__, versions, options.spec, options.dtype, hashlib.sha256(config).hexdigest(),
             hashlib.sha256(index).hexdigest(), heads]
    return hashlib.sha256(json.dumps(ident).encode()).hexdigest()


def load(k: str) -> Recipe | None:
    return Recipe.of(native_cache.load(k, KIND))


def store(k: str, recipe: Recipe) -> None:
    native_cache.store(k, recipe.as_json(), KIND)
