"""push's publish gate: find the base model on this machine, diff what is about to be published against it, and
refuse a model identical to its base or holding NaN/Inf (unless allowed). Also the card section and the compact
summary of the result JSON.

"Identical to its base" depends on what the folder is. A full or fused model must differ from the base. A LoRA
`--lora adapter` export keeps the base weights as they were by design: the adapter in lora_adapter/ is the change,
so it is the adapter that must change something (lora_B not all zeros). A folder of base weights with no adapter
(an adapter that was never fused: verl #7285) is identical to its base and refused."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hubexport.diff import (
    DiffReport,
    TensorDelta,
    check_publishable,
    diff_models,
    log_report,
    new_report,
    nonfinite_counts,
    render_markdown,
    tensor_delta,
)
from hubexport.dist import Dist
from hubexport.errors import HubexportError, UnpublishableModel
from hubexport.lora import ADAPTER_DIR
from hubexport.options import GateOptions
from hubexport.safetensors_format import INDEX_NAME, read_index, read_specs
from hubexport.sources.hf import SafetensorsSource

Log = Callable[[str], None]
NO_BASE = ("publish gate: no base model on this machine to compare the weights with, so they were not checked "
           "(give one with --diff-base PATH|ORG/NAME; a Hub id is downloaded)")
B_PARTS = (".lora_B.", ".lora_embedding_B.")
LOW_RANK_PARTS = (".lora_A.", ".lora_embedding_A.", *B_PARTS)


@dataclass(frozen=True)
class Base:
    path: Path  # a folder with config.json and complete safetensors weights
    name: str  # what the card calls it: a Hub id, or the folder's name (never a local path)
    origin: str  # the option or file that named it


def has_complete_weights(folder: Path) -> bool:
    """config.json and every weight file the index lists (or a single model.safetensors) are there."""
    if not (folder / "config.json").is_file():
        return False
    if (folder / INDEX_NAME).is_file():
        try:
            files = set(read_index(folder / INDEX_NAME).values())
        except HubexportError:  # a damaged index: not a usable base
            return False
        return bool(files) and all((folder / f).is_file() for f in files)
    return any(folder.glob("*.safetensors"))


def _local(path: str | Path | None, candidate: Path | None) -> Path | None:
    if not path:
        return None
    folder = Path(path).expanduser()
    if not folder.is_dir() or not has_complete_weights(folder):
        return None
    if candidate is not None and folder.resolve() == Path(candidate).resolve():
        return None
    return folder


def _name_or_path(config_dir: Path | None) -> str | None:
    """The model a checkpoint's own config says it was loaded from (verl saves it with transformers 4.x)."""
    try:
        value = json.loads((Path(config_dir) / "config.json").read_text()).get("_name_or_path") if config_dir else None
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def find_base(options: GateOptions, *, lora_base: Base | None, card_base: str | None, config_dir: Path | None,
              candidate: Path | None, log: Log, dist: Dist | None = None) -> Base | None:
    """The base model to diff against, in this order: --diff-base (downloaded if a Hub id: asked for), the LoRA
    base, the card's --base-model when it is a local folder or fully in the HF cache (never downloaded), the
    checkpoint config's `_name_or_path` when it is a local folder. Collective under torchrun (the download)."""
    from hubexport.resolve import resolve_cached, resolve_model

    if options.diff_base:
        model = resolve_model(options.diff_base, purpose="--diff-base", log=log, dist=dist)
        return Base(model.path, model.repo_id or model.path.name, "--diff-base")
    if lora_base is not None:
        return lora_base
    if card_base:
        if (folder := _local(card_base, candidate)) is not None:
            return Base(folder, folder.name, "--base-model")
        cached = resolve_cached(card_base, purpose="--base-model")
        if cached is not None and has_complete_weights(cached.path):
            return Base(cached.path, cached.repo_id or card_base, "--base-model, from the HF cache")
    named = _name_or_path(config_dir)
    if (folder := _local(named, candidate)) is not None:
        return Base(folder, folder.name, f"_name_or_path of {Path(config_dir) / 'config.json'}")
    return None


@dataclass(frozen=True)
class AdapterEffect:
    """What a PEFT adapter folder changes: nothing when every lora_B is zero (PEFT's initial value, so a run that
    never trained it) and it holds no other tensor (modules_to_save, biases, DoRA magnitudes) that could."""

    tensors: int
    nonfinite: int
    zero_b: bool
    other: int  # tensors besides the low-rank pairs

    @property
    def no_effect(self) -> bool:
        return self.zero_b and self.other == 0


def adapter_effect(folder: Path) -> AdapterEffect | None:
    adapter = Path(folder) / ADAPTER_DIR
    if not (adapter / "adapter_model.safetensors").is_file():
        return None
    src = SafetensorsSource(adapter)
    names = list(src.metas())
    nonfinite, zero_b, other = 0, True, 0
    try:
        for name in names:
            t = src.read(name)
            nan, inf = nonfinite_counts(t)
            nonfinite += nan + inf
            if any(p in name for p in B_PARTS):
                zero_b = zero_b and not bool(t.count_nonzero())
            elif not any(p in name for p in LOW_RANK_PARTS):
                other += 1
    finally:
        src.close()
    return AdapterEffect(len(names), nonfinite, zero_b, other)


@dataclass
class Delta:
    """The gate's findings on one folder: its weights vs the base, its adapter, the warnings, and the refusal (kept
    so the caller decides when to raise it: a merge keeps its output first)."""

    base: Base | None
    report: DiffReport | None  # None: no base, or the folder holds the adapter alone
    adapter: AdapterEffect | None
    notes: list[str]
    refusal: UnpublishableModel | None = None

    def markdown(self) -> str:
        """The card section (no local path in it)."""
        if self.report is not None and self.base is not None:
            lines = [render_markdown(self.report, self.base.name).rstrip("\n")]
        else:
            lines = ["## Weight delta vs the base model", "",
                     "This folder holds a LoRA adapter alone; its weights were not compared with a base model."]
        if self.adapter is not None:
            a = self.adapter
            effect = "changes nothing (every lora_B is zero)" if a.no_effect else "changes the weights"
            lines += ["", f"The LoRA adapter in `{ADAPTER_DIR}/` ({a.tensors} tensors, {a.nonfinite} NaN/Inf) {effect}."]
            if self.report is not None and self.report.identical and not a.no_effect:
                lines.append(f"The weights beside it are the base model's, as they should be: apply `{ADAPTER_DIR}/` "
                             "to them (or publish a `--lora fuse` export).")
        lines += [f"- warning: {n}" for n in self.notes]
        return "\n".join(lines) + "\n"

    def summary(self) -> dict[str, Any]:
        """Compact, for the push result JSON."""
        r = self.report
        return {
            "base": self.base.name if self.base else None, "base_from": self.base.origin if self.base else None,
            "identical": r.identical if r else None, "rel_change": r.rel_change if r else None,
            "unchanged_share": r.unchanged_share if r else None, "compared": len(r.compared) if r else 0,
            "nonfinite": (r.nonfinite if r else 0) + (self.adapter.nonfinite if self.adapter else 0),
            "adapter_changes_weights": (not self.adapter.no_effect) if self.adapter else None,
            "warnings": list(self.notes), "refused": self.refusal.message if self.refusal else None,
        }


def check(folder: Path, base: Base | None, options: GateOptions, *, name: Path, log: Log,
          report: DiffReport | None = None) -> Delta | None:
    """Diff `folder` (named `name` in messages: the target, not its staging folder) against `base` and apply the
    gate; `report`: that diff, already computed file by file (FileGate). None when there is nothing to check it with
    (said in one line)."""
    folder = Path(folder)
    adapter = adapter_effect(folder)
    has_weights = any(folder.glob("*.safetensors"))
    if base is None:
        log(NO_BASE)
        if adapter is None:
            return None
    if report is not None:
        log_report(report, log)
    elif base is not None and has_weights:
        report = diff_models(folder, base.path, log=log)
    if report is not None:
        report.candidate = Path(name)
    delta = Delta(base, report, adapter, [])
    try:
        _refuse(delta, name, options)
    except UnpublishableModel as e:
        delta.refusal = e
    for note in delta.notes:
        log(f"warning: {note}")
    if base is not None:
        log(f"publish gate: compared with {base.name} (from {base.origin}): "
            + ("refused" if delta.refusal else "publishable"))
    return delta


def _refuse(delta: Delta, name: Path, options: GateOptions) -> None:
    adapter, report = delta.adapter, delta.report
    if adapter is not None and adapter.nonfinite and not options.allow_nonfinite:
        raise UnpublishableModel(f"{name}/{ADAPTER_DIR} holds {adapter.nonfinite:,} NaN/Inf values",
                                 hint="the run likely diverged: publish an earlier step, or pass --allow-nonfinite")
    if adapter is not None and adapter.no_effect and (report is None or report.identical) \
            and not options.allow_unchanged:
        raise UnpublishableModel(
            f"{name}/{ADAPTER_DIR} changes nothing: every lora_B is zero, so the model is its base",
            hint="the adapter was never trained (or not saved): publish a trained step, or pass --allow-unchanged")
    adapter_counts = adapter is not None and not adapter.no_effect  # the adapter is the change
    if report is not None:
        delta.notes = check_publishable(report, allow_unchanged=options.allow_unchanged or adapter_counts,
                                        allow_nonfinite=options.allow_nonfinite)


class FileGate:
    """The gate's diff, file by file as a push's merge writes them, so each file can be sent as soon as that is
    safe: once some tensor is known to differ from the base (the model is not its base) and no NaN/Inf was seen.
    Until then files are held; the rows are kept, so the verdict on the whole model compares nothing twice."""

    def __init__(self, base: Base, options: GateOptions) -> None:
        self.base, self.options = base, options
        self.base_src = SafetensorsSource(base.path)
        self.rows: dict[str, TensorDelta] = {}
        self.differs = options.allow_unchanged
        self.nonfinite = False

    def admit(self, file: Path) -> bool | None:
        """True: send this file and every held one; None: hold it; False: send nothing more (the verdict refuses)."""
        if file.parent.name != ADAPTER_DIR:  # an adapter is judged with the whole model (Delta, adapter_effect)
            self._compare(file)
        if self.nonfinite and not self.options.allow_nonfinite:
            return False
        return True if self.differs else None

    def _compare(self, file: Path) -> None:
        from safetensors import safe_open

        with safe_open(file, framework="pt") as f:
            for name, spec in read_specs(file).items():
                row = self.rows[name] = tensor_delta(spec, f.get_tensor(name), self.base_src)
                self.nonfinite = self.nonfinite or bool(row.nan or row.inf)
                self.differs = self.differs or not row.unchanged  # changed, new, or reshaped

    def report(self, folder: Path) -> DiffReport | None:
        """The whole folder's diff from the rows; None when some weight file was not seen (then it is diffed anew)."""
        specs = SafetensorsSource(Path(folder)).metas() if any(Path(folder).glob("*.safetensors")) else {}
        if not specs or set(specs) != set(self.rows):
            return None
        report = new_report(Path(folder), self.base.path, specs, self.base_src.metas())
        report.tensors = [self.rows[n] for n in sorted(specs)]
        return report

    def close(self) -> None:
        self.base_src.close()
