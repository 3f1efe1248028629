"""What a merge says about itself, worded once for the full path (`to_hf`) and the fast one (`fast_merge`)."""

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
