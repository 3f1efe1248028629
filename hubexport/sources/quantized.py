"""FP8 block-quantized checkpoints (DeepSeek-V3 as published) read as plain weights.

Each quantized `X.weight` is float8_e4m3fn with a float32 `X.weight_scale_inv` of shape
[ceil(rows/128), ceil(cols/128)] beside it: one scale per 128x128 block, the edge blocks ragged when a dimension is
not a multiple of 128. Dequantizing computes, per block, fp32(weight) * scale in float32 and then casts to the
output dtype: the op order of DeepSeek's `weight_dequant` kernel and transformers' `Fp8Dequantize`, so the result is
bit-identical to theirs. The scales never leave this module; other quantizations are refused by name."""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from hubexport.core import TensorSpec
from hubexport.errors import CheckpointError, ConfigError
from hubexport.sources import Source

SCALE_SUFFIX = "_scale_inv"
FP8 = torch.float8_e4m3fn
UNQUANTIZED_HINT = "convert from the unquantized model (the repo the quantized one was made from)"


def quantization_config(config: Any) -> dict[str, Any] | None:
    """The config's `quantization_config` as a dict (a config.json mapping or a transformers config), or None."""
    q = config.get("quantization_config") if isinstance(config, Mapping) else getattr(config, "quantization_config", None)
    if q is None or isinstance(q, dict):
        return q
    return q.to_dict() if hasattr(q, "to_dict") else dict(vars(q))


def fp8_block_size(config: Any, where: str) -> tuple[int, int] | None:
    """The weight block of an FP8 block-quantized config, None for an unquantized one; any other quantization is
    refused naming its quant_method."""
    q = quantization_config(config)
    if q is None:
        return None
    method = q.get("quant_method")
    if method != "fp8":
        raise ConfigError(f"{where}: quantization_config.quant_method {method!r} is not supported (hubexport reads "
                          "unquantized weights and FP8 block-quantized ones, quant_method 'fp8')", hint=UNQUANTIZED_HINT)
    block = q.get("weight_block_size")
    if q.get("fmt", "e4m3") != "e4m3" or not (isinstance(block, list) and len(block) == 2
                                                and all(isinstance(b, int) and b > 0 for b in block)):
        raise ConfigError(f"{where}: FP8 quantization with fmt {q.get('fmt')!r} and weight_block_size {block!r} is "
                          "not supported (only e4m3 with a [rows, cols] block, as DeepSeek-V3 publishes)",
                          hint=UNQUANTIZED_HINT)
    if q.get("activation_scheme", "dynamic") != "dynamic":
        raise ConfigError(f"{where}: FP8 with activation_scheme {q['activation_scheme']!r} is not supported "
                          "(only dynamic activation scales, which the checkpoint does not store)", hint=UNQUANTIZED_HINT)
    return block[0], block[1]


def scale_shape(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, int]:
    return math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1])


def dequantize_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int],
                   dtype: torch.dtype) -> torch.Tensor:
    """fp32(weight[block]) * scale_inv[block] in float32, then cast to `dtype`, one row of blocks at a time (so the
    float32 temporaries stay one block row, whatever the tensor's size)."""
    rows, cols = weight.shape
    out = torch.empty((rows, cols), dtype=dtype)
    for i, start in enumerate(range(0, rows, block[0])):
        scale = scale_inv[i].to(torch.float32).repeat_interleave(block[1])[:cols]
        out[start:start + block[0]] = (weight[start:start + block[0]].to(torch.float32) * scale).to(dtype)
    return out


class DequantizedSource(Source):
    """`inner` with every FP8 weight dequantized into `dtype` and its scale hidden; other tensors pass unchanged."""

    def __init__(self, inner: Source, block: tuple[int, int], dtype: torch.dtype, where: str) -> None:
        self.inner, self.block, self.dtype = inner, block, dtype
        specs = inner.metas()
        self._specs: dict[str, TensorSpec] = {}
        self.scales: dict[str, str] = {}  # weight name -> its scale's name
        for name, spec in specs.items():
            if name.endswith(SCALE_SUFFIX):
                weight = specs.get(name.removesuffix(SCALE_SUFFIX))
                if weight is None or weight.dtype != FP8 or len(weight.shape) != 2:
                    got = "no such tensor" if weight is None else f"{weight.dtype} {list(weight.shape)}"
                    raise CheckpointError(f"{where}: {name} scales {name.removesuffix(SCALE_SUFFIX)}, which is not a "
                                          f"2-D float8_e4m3fn weight ({got})", hint="the checkpoint is inconsistent")
                if spec.dtype != torch.float32 or spec.shape != scale_shape(weight.shape, block):
                    raise CheckpointError(
                        f"{where}: {name} is {spec.dtype} {list(spec.shape)}, not float32 "
                        f"{list(scale_shape(weight.shape, block))} (one scale per {block[0]}x{block[1]} block of "
                        f"{list(weight.shape)})", hint="the config's weight_block_size does not describe these scales")
                self.scales[weight.name] = name
            elif spec.dtype == FP8 and name + SCALE_SUFFIX not in specs:
                raise CheckpointError(f"{where}: {name} is float8_e4m3fn but has no {name + SCALE_SUFFIX}",
                                      hint="the checkpoint is incomplete; re-download it")
        for name, spec in specs.items():
            if not name.endswith(SCALE_SUFFIX):
                self._specs[name] = TensorSpec(name, spec.shape, dtype) if name in self.scales else spec

    def metas(self) -> dict[str, TensorSpec]:
        return dict(self._specs)

    def read(self, name: str) -> torch.Tensor:
        if name not in self._specs:
            raise KeyError(name)
        if name not in self.scales:
            return self.inner.read(name)
        return dequantize_fp8(self.inner.read(name), self.inner.read(self.scales[name]), self.block, self.dtype)

    def close(self) -> None:
        self.inner.close()


def dequantized(source: Source, config: Any, *, dtype: torch.dtype = torch.bfloat16, where: str) -> Source:
    """The source as the commands read it: unchanged when unquantized, dequantized when FP8 block-quantized; any
    other quantization is a ConfigError. `where` names the config in messages."""
    block = fp8_block_size(config, where)
    return source if block is None else DequantizedSource(source, block, dtype, where)


def without_quantization(config: Any) -> Any:
    """A copy of the config (a config.json dict or a transformers config) to write next to dequantized weights."""
    if isinstance(config, Mapping):
        return {k: v for k, v in config.items() if k != "quantization_config"}
    out = copy.deepcopy(config)
    if hasattr(out, "quantization_config"):
        delattr(out, "quantization_config")
    return out


def open_hf_weights(folder: Path, *, dtype: torch.dtype = torch.bfloat16) -> Source:
    """An HF folder's weights as the commands read them: FP8 block-quantized ones dequantized into `dtype`."""
    from hubexport.jsonfile import read_json_object
    from hubexport.sources.hf import SafetensorsSource

    config = folder / "config.json"
    source = SafetensorsSource(folder)
    return dequantized(source, read_json_object(config) if config.is_file() else {}, dtype=dtype, where=str(config))
