"""What a merge or a to-megatron run says about itself, worded once for the full paths (`to_hf`, `to_mcore`) and the
fast ones (`fast_merge`, `fast_to_mcore`)."""

from __future__ import annotations

from hubexport.result import Result


def plan_line(result: Result, num_files: int, total_size: int) -> str:
    return (f"{result.source_format} {result.source_version} checkpoint, {_fmt_parallel(result.parallel)}: "
            f"{result.architecture}, {result.num_parameters:,} parameters → {num_files} file(s), "
            f"{total_size / 1e9:.2f} GB, at most {result.peak_tensor_bytes / 1e6:.0f} MB of tensors in flight")


def done_line(result: Result, num_files: int, extra: str = "") -> str:
    return f"wrote {result.target_dir} ({num_files} weight file(s){extra}; {result.throughput})"


def _fmt_parallel(parallel: dict[str, int]) -> str:
    return ", ".join(f"{k}={v}" for k, v in parallel.items()) or "single file"


def megatron_plan_line(result: Result) -> str:
    m = result.megatron
    assert m is not None
    return (f"{result.architecture} → megatron-core torch_dist ({m.spec} spec, {m.layer_keys} layer keys): "
            f"{m.num_tensors} tensors in {m.num_keys} keys, {m.world_size} writer(s), "
            f"at most {result.peak_tensor_bytes / 1e6:.0f} MB of tensors in flight per writer")


def megatron_done_line(result: Result) -> str:
    tested = "; --test: every HF tensor read back bit-exact" if result.megatron and result.megatron.tested else ""
    return f"wrote {result.target_dir}{tested}"
