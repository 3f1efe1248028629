"""Prove a merge right: compare a candidate HF folder tensor by tensor with a reference (another HF folder, single-file
or sharded, or a training checkpoint merged in memory-bounded streaming), both directions, and optionally by logits."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hubexport.core import TensorSpec
from hubexport.detect import is_hf_folder
from hubexport.errors import CheckpointError
from hubexport.resolve import resolve_model
from hubexport.sources.hf import SafetensorsSource
from hubexport.sources.quantized import open_hf_weights

PROMPT = [[1, 3, 17, 42, 5, 99, 12, 7, 64, 2]]
# Logits tolerance by the lower precision of the two models (exact tensors give exact logits; this absorbs kernels).
LOGIT_ATOL = {torch.float32: 1e-4, torch.float64: 1e-8, torch.float16: 1e-2, torch.bfloat16: 5e-2}


@dataclass(frozen=True)
class Difference:
    name: str
    kind: str  # "missing" | "extra" | "shape" | "dtype" | "value" | "logits"
    detail: str


@dataclass
class VerifyReport:
    candidate: Path
    reference: Path
    compared: int = 0
    differences: list[Difference] = field(default_factory=list)
    max_logit_diff: float | None = None

    @property
    def ok(self) -> bool:
        return not self.differences


def compare_tensors(name: str, got: torch.Tensor, want: torch.Tensor) -> Difference | None:
    """Same dtype: bit-exact (NaNs with equal bits count as equal). Different dtypes: a difference, with how far the
    values are apart once both are in float64 so the report says whether it is only the cast."""
    if tuple(got.shape) != tuple(want.shape):
        return Difference(name, "shape", f"{list(got.shape)} vs reference {list(want.shape)}")
    if got.dtype != want.dtype:
        gap = (got.double() - want.double()).abs().max().item() if got.numel() else 0.0
        return Difference(name, "dtype", f"{got.dtype} vs reference {want.dtype} (max |Δ| {gap:.3g} after casting)")
    a, b = got.contiguous().reshape(-1), want.contiguous().reshape(-1)
    if a.numel() == 0 or torch.equal(a.view(torch.uint8), b.view(torch.uint8)):
        return None
    if a.dtype.is_floating_point:
        delta = (a.double() - b.double()).abs()
        worst = int(delta.nan_to_num(float("inf")).argmax())
        return Difference(name, "value", f"{int((a != b).sum())} of {a.numel()} elements differ, max |Δ| "
                                         f"{delta[worst].item():.3g} at flat index {worst}")
    return Difference(name, "value", f"{int((a != b).sum())} of {a.numel()} elements differ")


def _reference_tensors(reference: Path, backend: str) -> tuple[dict[str, TensorSpec], Callable[[], Iterator]]:
    """Names, specs and a stream of (name, tensor) of the reference, whatever it is."""
    if is_hf_folder(reference):
        src = open_hf_weights(reference)

        def read_all() -> Iterator[tuple[str, torch.Tensor]]:
            try:
                yield from ((n, src.read(n)) for n in src.metas())
            finally:
                src.close()

        return src.metas(), read_all
    from hubexport.options import MergeOptions
    from hubexport.to_hf import GroupCache, prepare

    prep = prepare(reference, MergeOptions(backend=backend))
    specs = {t.name: t for f in prep.plan.files for t in f.tensors}

    def stream() -> Iterator[tuple[str, torch.Tensor]]:
        cache = GroupCache(prep.plan, prep.source)
        try:
            for i in range(len(prep.plan.groups)):  # check groups (tied aliases) run too and yield nothing
                yield from cache.run(i).items()
        finally:
            prep.source.close()

    return specs, stream


def verify(candidate: Path, reference: Path, *, logits: bool = False, backend: str = "auto",
           log: Callable[[str], None] = print) -> VerifyReport:
    candidate = Path(candidate)
    if not Path(reference).exists():  # a Hub id: the reference model as published
        reference = resolve_model(reference, purpose="--reference", log=log).path
    reference = Path(reference)
    if not is_hf_folder(candidate):
        raise CheckpointError(f"{candidate} is not a Hugging Face folder (config.json + *.safetensors)",
                              hint="pass the merged model folder first, then --reference")
    cand = SafetensorsSource(candidate)
    got_specs = cand.metas()
    want_specs, stream = _reference_tensors(reference, backend)
    report = VerifyReport(candidate, reference)
    report.differences += [Difference(n, "missing", "in the reference, not in the candidate")
                           for n in sorted(set(want_specs) - set(got_specs))]
    report.differences += [Difference(n, "extra", "in the candidate, not in the reference")
                           for n in sorted(set(got_specs) - set(want_specs))]
    for note in cand.notes:
        log(note)
    try:
        for name, want in stream():
            if name in got_specs:
                report.compared += 1
                diff = compare_tensors(name, cand.read(name), want)
                if diff:
                    report.differences.append(diff)
    finally:
        cand.close()
    if logits:
        _compare_logits(report, candidate, reference if is_hf_folder(reference) else None, log)
    return report


def _load_model(folder: Path):
    import transformers

    config = transformers.AutoConfig.from_pretrained(folder)
    arch = (config.architectures or [""])[0]
    auto = (transformers.AutoModelForTokenClassification if "ForTokenClassification" in arch
            else transformers.AutoModelForCausalLM)
    return auto.from_pretrained(folder, dtype="auto").eval()


def _compare_logits(report: VerifyReport, candidate: Path, reference: Path | None, log: Callable[[str], None]) -> None:
    if reference is None:
        log("--logits needs an HF reference folder; a training-checkpoint reference is compared tensor by tensor only")
        return
    a, b = _load_model(candidate), _load_model(reference)
    with torch.no_grad():
        la = a(input_ids=torch.tensor(PROMPT)).logits.double()
        lb = b(input_ids=torch.tensor(PROMPT)).logits.double()
    if la.shape != lb.shape:
        report.differences.append(Difference("logits", "logits", f"shape {list(la.shape)} vs {list(lb.shape)}"))
        return
    report.max_logit_diff = (la - lb).abs().max().item()
    tol = max(LOGIT_ATOL.get(a.dtype, 1e-4), LOGIT_ATOL.get(b.dtype, 1e-4))
    if not report.max_logit_diff <= tol:
        report.differences.append(Difference("logits", "logits", f"max |Δ| {report.max_logit_diff:.3g} > {tol:g}"))
