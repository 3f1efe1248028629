"""`hubexport inspect`: what a directory is and what converting it would produce, from metadata alone (no tensor
data is read)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from hubexport.detect import is_hf_folder
from hubexport.sources.hf import SafetensorsSource


def _dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def _input_files(paths: list[Path]) -> list[dict[str, Any]]:
    out = []
    for p in paths:
        files = [p] if p.is_file() else sorted(q for q in p.rglob("*") if q.is_file())
        out.append({"path": str(p), "bytes": sum(q.stat().st_size for q in files)})
    return out


def inspect_hf(folder: Path) -> dict[str, Any]:
    config = json.loads((folder / "config.json").read_text())
    source = SafetensorsSource(folder)
    specs = source.metas()
    by_dtype: dict[str, int] = {}
    for s in specs.values():
        by_dtype[_dtype_name(s.dtype)] = by_dtype.get(_dtype_name(s.dtype), 0) + s.nbytes
    files = sorted(folder.glob("*.safetensors"))
    return {
        "format": "hf",
        "version": "safetensors" + (" (sharded)" if len(files) > 1 else ""),
        "root": str(folder),
        "architecture": (config.get("architectures") or [None])[0],
        "dtype": max(by_dtype, key=by_dtype.__getitem__) if by_dtype else None,
        "num_parameters": sum(math.prod(s.shape) for s in specs.values()),
        "num_tensors": len(specs),
        "tied_embeddings": bool(config.get("tie_word_embeddings", False)),
        "value_model": "score.weight" in specs and "lm_head.weight" not in specs,
        "files": [{"path": f.name, "bytes": f.stat().st_size} for f in files],
        "notes": source.notes,
    }


def inspect(path: Path, *, backend: str = "auto", max_shard_size: int | str = "5GB", dtype: str | None = None,
            trust_remote_code: bool = False) -> dict[str, Any]:
    path = Path(path)
    if is_hf_folder(path):
        return inspect_hf(path)
    from hubexport.options import MergeOptions
    from hubexport.to_hf import dominant_dtype, prepare

    prep = prepare(path, MergeOptions(backend=backend, max_shard_size=max_shard_size, dtype=dtype,
                                      trust_remote_code=trust_remote_code))
    try:
        outputs = [t for f in prep.plan.files for t in f.tensors]
        source_specs = prep.source.metas()
        return {
            "format": prep.layout.format,
            "version": prep.layout.version,
            "root": str(prep.layout.root),
            "hf_dir": str(prep.layout.hf_dir) if prep.layout.hf_dir else None,
            "parallel": prep.layout.parallel,
            "global_step": prep.layout.global_step,
            "architecture": prep.architecture,
            "dtype": _dtype_name(dominant_dtype(prep.plan)),
            "num_parameters": prep.plan.num_parameters,
            "num_tensors": len(outputs),
            "source_tensors": len(source_specs),
            "tied_embeddings": prep.tied,
            "value_model": prep.value_model,
            "files": _input_files(prep.layout.files),
            "notes": prep.layout.notes,
            "plan": {
                "files": [{"name": f.name, "bytes": f.nbytes,
                           "tensors": len(f.tensors)} for f in prep.plan.files],
                "total_size": prep.plan.total_size,
                "peak_tensor_bytes": prep.plan.peak_bytes(source_specs),
            },
        }
    finally:
        prep.source.close()


def render_text(info: dict[str, Any]) -> str:
    """A human summary; --json prints `info` itself."""
    lines = [f"{info['root']}: {info['format']} {info['version']}"]
    if info.get("parallel"):
        lines.append("  parallel:     " + ", ".join(f"{k}={v}" for k, v in info["parallel"].items()))
    if info.get("global_step") is not None:
        lines.append(f"  global step:  {info['global_step']}")
    lines += [
        f"  architecture: {info['architecture']}",
        f"  parameters:   {info['num_parameters']:,} in {info['num_tensors']} tensors, mostly {info['dtype']}",
        f"  tied embeddings: {'yes' if info['tied_embeddings'] else 'no'}; value model: "
        f"{'yes' if info['value_model'] else 'no'}",
        "  files:",
        *(f"    {f['path']}  {f['bytes'] / 1e6:.1f} MB" for f in info["files"]),
    ]
    if "plan" in info:
        plan = info["plan"]
        lines += [f"  plan: {len(plan['files'])} output file(s), {plan['total_size'] / 1e9:.3f} GB, at most "
                  f"{plan['peak_tensor_bytes'] / 1e6:.1f} MB of tensors in flight",
                  *(f"    {f['name']}  {f['tensors']} tensors  {f['bytes'] / 1e6:.1f} MB" for f in plan["files"])]
    lines += [f"  note: {n}" for n in info.get("notes", [])]
    return "\n".join(lines)
