"""How far a candidate model moved from its base, tensor by tensor and per module type, and the publish gate built on
it: a "fine-tuned" model identical to its base (an adapter never fused) or holding NaN/Inf is refused.

Both models are HF safetensors folders read one tensor pair at a time; the maths runs on float64 slices of at most
CHUNK elements, so memory stays bounded by the largest tensor pair (as stored) plus one slice of each."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from hubexport.core import TensorSpec
from hubexport.errors import CheckpointError, UnpublishableModel
from hubexport.sources.hf import SafetensorsSource

CHUNK = 1 << 22  # elements per float64 slice: 32 MiB for each of the two operands
SMALL_RATIO = 0.5  # a candidate with fewer than half its base's parameters is "far smaller"
NUMBER_RE = re.compile(r"(?<=\.)\d+(?=\.|$)")


# ---- pure maths -----------------------------------------------------------------------------------------------------
def module_key(name: str) -> str:
    """The tensor's module type: layer and expert numbers replaced by `*` (model.layers.*.mlp.experts.*.up_proj.weight)."""
    return NUMBER_RE.sub("*", name)


@dataclass(frozen=True)
class PairStats:
    """One tensor pair: sums of squares (for ‖ΔW‖/‖W‖), max |ΔW|, value identity and the candidate's NaN/Inf.
    Elements where either side is not finite are left out of the sums and the max, and counted instead."""

    delta_sq: float
    base_sq: float
    max_abs: float
    unchanged: bool
    nan: int
    inf: int


def _flat_chunks(t: torch.Tensor) -> Iterable[torch.Tensor]:
    flat = t.reshape(-1)
    for start in range(0, flat.numel(), CHUNK):
        yield flat[start:start + CHUNK].to(torch.float64)


def nonfinite_counts(t: torch.Tensor) -> tuple[int, int]:
    """(NaN count, ±Inf count) of a tensor; integer tensors have none."""
    if not (t.dtype.is_floating_point or t.dtype.is_complex):
        return 0, 0
    nan = inf = 0
    for c in _flat_chunks(t):
        nan += int(torch.isnan(c).sum())
        inf += int(torch.isinf(c).sum())
    return nan, inf


def bit_identical(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (so NaNs with equal bits count as equal)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def pair_stats(cand: torch.Tensor, base: torch.Tensor) -> PairStats:
    """Statistics of cand − base for two tensors of one shape. With different dtypes, `unchanged` means equal values
    once both are float64 (a base upcast to fp32 and nothing else is still the base)."""
    assert cand.shape == base.shape, "pair_stats needs equal shapes"
    delta_sq = base_sq = max_abs = 0.0
    nan = inf = 0
    same_values = True
    for c, b in zip(_flat_chunks(cand), _flat_chunks(base), strict=True):
        nan += int(torch.isnan(c).sum())
        inf += int(torch.isinf(c).sum())
        finite = torch.isfinite(c) & torch.isfinite(b)
        d = torch.where(finite, c - b, 0.0)
        delta_sq += float(d.square().sum())
        base_sq += float(torch.where(finite, b, 0.0).square().sum())
        if d.numel():
            max_abs = max(max_abs, float(d.abs().max()))
        same_values = same_values and torch.equal(c, b)
    unchanged = bit_identical(cand, base) if cand.dtype == base.dtype else same_values
    return PairStats(delta_sq, base_sq, max_abs, unchanged, nan, inf)


def relative_change(delta_sq: float, base_sq: float) -> float | None:
    """‖ΔW‖/‖W‖ from the sums of squares; None when the base is all zeros but the candidate is not."""
    if base_sq > 0:
        return math.sqrt(delta_sq / base_sq)
    return 0.0 if delta_sq == 0 else None


# ---- the report -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorDelta:
    name: str
    module: str
    shape: list[int]
    dtype: str
    numel: int
    base_shape: list[int] | None = None  # None: only in the candidate
    base_dtype: str | None = None
    rel_change: float | None = None  # None: not compared (shape drift, one side only) or zero base
    max_abs: float | None = None
    unchanged: bool | None = None  # None: not compared
    nan: int = 0
    inf: int = 0
    delta_sq: float = 0.0
    base_sq: float = 0.0

    @property
    def compared(self) -> bool:
        return self.unchanged is not None


@dataclass(frozen=True)
class ModuleDelta:
    """A module type's tensors together: ‖ΔW‖/‖W‖ of all of them as one vector, the worst |ΔW|, counts."""

    module: str
    tensors: int
    unchanged: int
    rel_change: float | None
    max_abs: float
    nonfinite: int


@dataclass
class DiffReport:
    candidate: Path
    base: Path
    tensors: list[TensorDelta] = field(default_factory=list)
    only_base: list[str] = field(default_factory=list)  # tensors of the base the candidate lacks
    candidate_params: int = 0
    base_params: int = 0

    @property
    def compared(self) -> list[TensorDelta]:
        return [t for t in self.tensors if t.compared]

    @property
    def only_candidate(self) -> list[str]:
        return [t.name for t in self.tensors if t.base_shape is None]

    @property
    def shape_drift(self) -> list[TensorDelta]:
        return [t for t in self.tensors if t.base_shape is not None and t.base_shape != t.shape]

    @property
    def dtype_drift(self) -> list[TensorDelta]:
        return [t for t in self.tensors if t.base_dtype is not None and t.base_dtype != t.dtype]

    @property
    def unchanged_share(self) -> float:
        compared = self.compared
        return sum(bool(t.unchanged) for t in compared) / len(compared) if compared else 0.0

    @property
    def nonfinite(self) -> int:
        return sum(t.nan + t.inf for t in self.tensors)

    @property
    def identical(self) -> bool:
        """Nothing of the candidate's own: every tensor it shares with the base is unchanged, none is new or reshaped."""
        compared = self.compared
        return bool(compared) and all(t.unchanged for t in compared) and len(compared) == len(self.tensors)

    @property
    def rel_change(self) -> float | None:
        compared = self.compared
        return relative_change(sum(t.delta_sq for t in compared), sum(t.base_sq for t in compared))

    def modules(self) -> list[ModuleDelta]:
        return rollup(self.tensors)

    def to_dict(self) -> dict[str, Any]:
        return {
            "candidate": str(self.candidate), "base": str(self.base),
            "summary": {"tensors": len(self.tensors), "compared": len(self.compared),
                        "unchanged": sum(bool(t.unchanged) for t in self.compared),
                        "unchanged_share": self.unchanged_share, "identical": self.identical,
                        "rel_change": self.rel_change, "nonfinite": self.nonfinite,
                        "candidate_params": self.candidate_params, "base_params": self.base_params},
            "modules": [asdict(m) for m in self.modules()],
            "tensors": [{k: v for k, v in asdict(t).items() if k not in ("delta_sq", "base_sq")} for t in self.tensors],
            "only_candidate": self.only_candidate, "only_base": self.only_base,
            "shape_drift": [{"name": t.name, "shape": t.shape, "base_shape": t.base_shape} for t in self.shape_drift],
            "dtype_drift": [{"name": t.name, "dtype": t.dtype, "base_dtype": t.base_dtype} for t in self.dtype_drift],
        }


def rollup(tensors: Iterable[TensorDelta]) -> list[ModuleDelta]:
    groups: dict[str, list[TensorDelta]] = {}
    for t in tensors:
        groups.setdefault(t.module, []).append(t)
    out = []
    for module, ts in sorted(groups.items()):
        compared = [t for t in ts if t.compared]
        out.append(ModuleDelta(
            module=module, tensors=len(ts), unchanged=sum(bool(t.unchanged) for t in compared),
            rel_change=relative_change(sum(t.delta_sq for t in compared), sum(t.base_sq for t in compared))
            if compared else None,
            max_abs=max((t.max_abs or 0.0 for t in compared), default=0.0), nonfinite=sum(t.nan + t.inf for t in ts)))
    return out


def _dtype(t: torch.dtype) -> str:
    return str(t).removeprefix("torch.")


def _open(folder: Path, what: str) -> SafetensorsSource:
    if not Path(folder).is_dir():
        raise CheckpointError(f"{what} {folder} is not a folder", hint="pass a Hugging Face model folder (safetensors)")
    return SafetensorsSource(folder)


def new_report(candidate: Path, base: Path, cand_specs: dict[str, TensorSpec], base_specs: dict[str, TensorSpec]
               ) -> DiffReport:
    """A report of `candidate` vs `base` before any tensor is compared (rows are added by tensor_delta)."""
    return DiffReport(Path(candidate), Path(base), only_base=sorted(set(base_specs) - set(cand_specs)),
                      candidate_params=sum(math.prod(s.shape) for s in cand_specs.values()),
                      base_params=sum(math.prod(s.shape) for s in base_specs.values()))


def tensor_delta(spec: TensorSpec, cand: torch.Tensor, base_src: SafetensorsSource) -> TensorDelta:
    """One candidate tensor against the base's tensor of the same name (if any)."""
    name, bspec = spec.name, base_src.metas().get(spec.name)
    row = TensorDelta(name, module_key(name), list(spec.shape), _dtype(spec.dtype), math.prod(spec.shape))
    if bspec is not None and bspec.shape == spec.shape:
        s = pair_stats(cand, base_src.read(name))
        return replace(row, base_shape=list(bspec.shape), base_dtype=_dtype(bspec.dtype),
                       rel_change=relative_change(s.delta_sq, s.base_sq), max_abs=s.max_abs, unchanged=s.unchanged,
                       nan=s.nan, inf=s.inf, delta_sq=s.delta_sq, base_sq=s.base_sq)
    nan, inf = nonfinite_counts(cand)
    base_side = {"base_shape": list(bspec.shape), "base_dtype": _dtype(bspec.dtype)} if bspec else {}
    return replace(row, **base_side, nan=nan, inf=inf)


def log_report(report: DiffReport, log: Callable[[str], None]) -> None:
    log(f"diff: {len(report.compared)} of {len(report.tensors)} tensors compared with {report.base}, "
        f"{sum(bool(t.unchanged) for t in report.compared)} unchanged")


def diff_models(candidate: Path, base: Path, *, log: Callable[[str], None] = print) -> DiffReport:
    """Compare every tensor of `candidate` with the same-named tensor of `base` (two HF safetensors folders)."""
    cand_src, base_src = _open(Path(candidate), "candidate"), _open(Path(base), "base")
    cand_specs = cand_src.metas()
    report = new_report(candidate, base, cand_specs, base_src.metas())
    for name in sorted(cand_specs):
        report.tensors.append(tensor_delta(cand_specs[name], cand_src.read(name), base_src))
    log_report(report, log)
    return report


# ---- the gate -------------------------------------------------------------------------------------------------------
def _first(names: list[str]) -> str:
    return names[0] + (f" and {len(names) - 1} more" if len(names) > 1 else "")


def check_publishable(report: DiffReport, *, allow_unchanged: bool, allow_nonfinite: bool) -> list[str]:
    """Raise UnpublishableModel for NaN/Inf weights or a model identical to its base (unless allowed); return the
    warnings worth a line in the log and the card: tensors missing vs base, a model far smaller, reshaped tensors."""
    bad = [t for t in report.tensors if t.nan or t.inf]
    if bad and not allow_nonfinite:
        t = bad[0]
        raise UnpublishableModel(
            f"{report.candidate} holds {report.nonfinite:,} NaN/Inf values in {len(bad)} tensor(s) "
            f"(first: {t.name}: {t.nan} NaN, {t.inf} Inf)",
            hint="the run likely diverged: publish an earlier step, or pass --allow-nonfinite to publish it anyway")
    if report.identical and not allow_unchanged:
        raise UnpublishableModel(
            f"{report.candidate} is identical to its base {report.base} (all {len(report.compared)} tensors unchanged)",
            hint="an adapter that was never fused (lora_alpha 0?) or the wrong folder; pass --allow-unchanged to "
                 "publish it anyway")
    notes = []
    if report.only_base:
        notes.append(f"{len(report.only_base)} tensor(s) of the base are missing from the candidate: "
                     f"{_first(report.only_base)}")
    if report.base_params and report.candidate_params < SMALL_RATIO * report.base_params:
        notes.append(f"the candidate has {report.candidate_params:,} parameters, "
                     f"{report.candidate_params / report.base_params:.0%} of its base's {report.base_params:,}")
    if report.shape_drift:
        t = report.shape_drift[0]
        notes.append(f"{len(report.shape_drift)} tensor(s) changed shape vs base: {t.name} {t.shape} vs {t.base_shape}")
    return notes


# ---- rendering ------------------------------------------------------------------------------------------------------
def _num(x: float | None) -> str:
    return "n/a" if x is None else "0" if x == 0 else f"{x:.3g}"


def _drift_lines(report: DiffReport) -> list[str]:
    lines = []
    if report.only_candidate:
        lines.append(f"only in the candidate ({len(report.only_candidate)}): {_first(report.only_candidate)}")
    if report.only_base:
        lines.append(f"only in the base ({len(report.only_base)}): {_first(report.only_base)}")
    for t in report.shape_drift:
        lines.append(f"shape drift: {t.name} {t.shape} vs base {t.base_shape}")
    for t in report.dtype_drift:
        lines.append(f"dtype drift: {t.name} {t.dtype} vs base {t.base_dtype}")
    return lines


def _summary(report: DiffReport) -> str:
    compared = report.compared
    unchanged = sum(bool(t.unchanged) for t in compared)
    return (f"{len(compared)} of {len(report.tensors)} tensors compared, {unchanged} unchanged "
            f"({report.unchanged_share:.0%}), overall ‖ΔW‖/‖W‖ {_num(report.rel_change)}, "
            f"{report.nonfinite:,} NaN/Inf value(s)")


def render_text(report: DiffReport) -> str:
    """The table `hubexport diff` prints: one row per module type, then the drift and a summary line."""
    modules = report.modules()
    width = max([len("module"), *(len(m.module) for m in modules)])
    lines = [f"{'module':<{width}}  {'tensors':>7}  {'unchanged':>9}  {'‖ΔW‖/‖W‖':>9}  {'max|ΔW|':>9}  {'NaN/Inf':>7}"]
    for m in modules:
        lines.append(f"{m.module:<{width}}  {m.tensors:>7}  {m.unchanged:>9}  {_num(m.rel_change):>9}  "
                     f"{_num(m.max_abs):>9}  {m.nonfinite:>7}")
    lines += _drift_lines(report)
    lines.append(f"{report.candidate} vs {report.base}: {_summary(report)}" + ("; IDENTICAL to the base" if
                                                                                report.identical else ""))
    return "\n".join(lines)


def render_markdown(report: DiffReport, base_name: str | None = None) -> str:
    """The model card's section on how far the weights moved from the base model (`base_name`: how to call it,
    e.g. its Hub id; the folder name by default, so the card holds no local path)."""
    name = base_name or report.base.name
    lines = ["## Weight delta vs the base model", "",
             f"Compared tensor by tensor with `{name}`: {_summary(report)}.", "",
             "| Module | Tensors | Unchanged | ‖ΔW‖/‖W‖ | max \\|ΔW\\| | NaN/Inf |", "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| `{m.module}` | {m.tensors} | {m.unchanged} | {_num(m.rel_change)} | {_num(m.max_abs)} | "
              f"{m.nonfinite} |" for m in report.modules()]
    drift = _drift_lines(report)
    if drift:
        lines += ["", *(f"- {line}" for line in drift)]
    return "\n".join(lines) + "\n"
