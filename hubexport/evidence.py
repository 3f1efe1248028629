"""What push proves about the model it publishes: which step of a run (--select), the publish gate's weight delta vs
the base model, and the run's evaluation results; as card sections, files to upload and the result JSON."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from hubexport import gate
from hubexport.card import CardEvidence
from hubexport.dist import Dist
from hubexport.errors import MetricsError
from hubexport.metrics import checkpoint_steps, run_root_of, select_step
from hubexport.options import PushOptions

if TYPE_CHECKING:
    from hubexport.evalresults import EvalResults
    from hubexport.hub import PushResult

Log = Callable[[str], None]


def select(source: Path, options: PushOptions, log: Log) -> tuple[Path, str | None]:
    """A run root (global_step_N folders inside) → the step `--select` picks, and why (said in the log). Anything
    else is published as it is; `--select best:` there is an error."""
    has_steps = Path(source).is_dir() and bool(checkpoint_steps(source))
    if not has_steps:
        if options.select != "latest":
            raise MetricsError(f"--select {options.select} needs the run root (the folder of global_step_N), "
                               f"and {source} is not one", hint="pass the run root, or drop --select")
        return Path(source), None
    step_dir, reason = select_step(source, options.select, metrics_file=options.metrics)
    log(f"publishing {step_dir.name}: {reason}")
    return step_dir, reason


@dataclass
class Evidence:
    base: gate.Base | None = None
    delta: gate.Delta | None = None
    evaluation: EvalResults | None = None
    selection: str | None = None

    def card(self) -> CardEvidence:
        return CardEvidence(self.delta.markdown() if self.delta else None, self.evaluation)

    def files(self) -> dict[str, bytes]:
        """Repo path → bytes: the .eval_results entries and the validation curve."""
        return self.evaluation.files() if self.evaluation else {}

    def write_into(self, folder: Path) -> None:
        """Into a folder this run made itself (a merge's staging folder), never a user's."""
        for path, data in self.files().items():
            (folder / path).parent.mkdir(parents=True, exist_ok=True)
            (folder / path).write_bytes(data)

    def check(self, folder: Path, options: PushOptions, *, name: Path, log: Log,
              files: gate.FileGate | None = None) -> None:
        """The gate's verdict; `files`: what it already compared while the files were written."""
        report = files.report(folder) if files is not None else None
        self.delta = gate.check(folder, self.base, options.gate, name=name, log=log, report=report)

    def raise_refusal(self, kept: Path | None) -> None:
        refusal = self.delta.refusal if self.delta else None
        if refusal is None:
            return
        if kept is not None:
            refusal.hint = (f"{refusal.hint}; nothing was uploaded, the merged model is in {kept} "
                            f"(`hubexport push {kept} ...` publishes it without merging again)")
        raise refusal

    def annotate(self, pushed: PushResult) -> PushResult:
        ev = self.evaluation
        evaluation = None if ev is None else {
            "step": ev.step, "selection": self.selection, "metrics_file": str(ev.metrics_file),
            "values": {k.key: v for k, v in ev.reported()}, "files": sorted(self.files())}
        return replace(pushed, delta=self.delta.summary() if self.delta else None, evaluation=evaluation)


def evaluation_for(checkpoint: Path, step: int | None, options: PushOptions, selection: str | None,
                   log: Log) -> EvalResults | None:
    """The run's validation values at the published step (metrics found next to the run, or --metrics)."""
    from hubexport.evalresults import eval_results_for

    if step is None:
        if options.metrics is not None:
            raise MetricsError(f"--metrics {options.metrics}: the training step of {checkpoint} is unknown",
                               hint="pass a global_step_N checkpoint or the run root")
        return None
    return eval_results_for(checkpoint, step, options.metrics, selector=options.select, selection=selection, log=log)


def for_checkpoint(checkpoint: Path, *, step: int | None, config_dir: Path | None, lora_base: gate.Base | None,
                   options: PushOptions, selection: str | None, log: Log, dist: Dist) -> Evidence:
    """Before the merge, on every rank (a --diff-base download is collective): the base, and rank 0's evaluation."""
    base = gate.find_base(options.gate, lora_base=lora_base, card_base=options.card.base_model,
                          config_dir=config_dir, candidate=None, log=log, dist=dist)
    evaluation = dist.run(lambda: evaluation_for(checkpoint, step, options, selection, log), main_only=True)
    if base is not None:
        log(f"publish gate: the merged weights will be compared with {base.name} (from {base.origin})")
    elif options.dry_run:
        log(gate.NO_BASE)
    return Evidence(base, None, evaluation, selection)


def for_folder(folder: Path, options: PushOptions, log: Log) -> Evidence:
    """A Hugging Face folder about to be pushed: gate and evaluation, before any request."""
    base = gate.find_base(options.gate, lora_base=None, card_base=options.card.base_model, config_dir=folder,
                          candidate=folder, log=log)
    proof = Evidence(base)
    proof.check(folder, options, name=folder, log=log)
    proof.raise_refusal(None)
    if options.metrics is not None:
        proof.evaluation = evaluation_for(folder, run_root_of(folder)[1], options, None, log)
    return proof
