"""A run's validation values at the published step, as the Hub reads evaluation results: `model-index` in the card
metadata, `.eval_results/*.yaml` entries (huggingface_hub's EvalResultEntry), a card section, and a curve over steps.

These are verl's in-training validation scores (its reward function on data.val_files), and the card says so."""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hubexport.errors import MetricsError
from hubexport.metrics import MetricsLog, ValKey, find_metrics_file, parse_val_key, read_metrics, run_root_of

CURVE_PATH = "assets/validation_curve.png"
EVAL_DIR = ".eval_results"
TASK_TYPE = "text-generation"
MAX_CURVES = 8  # lines in one plot before it stops being readable


@dataclass
class EvalResults:
    run_name: str
    step: int
    metrics_file: Path
    values: dict[str, float]  # every validation value logged at `step` (val-core and val-aux)
    log: MetricsLog
    highlight: str | None = None  # the metric --select best: chose by
    selection: str | None = None  # why this step was published
    notes: list[str] = field(default_factory=list)
    curve_png: bytes | None = None

    def reported(self) -> list[tuple[ValKey, float]]:
        """What goes to the Hub: the val-core metrics, and the selection metric whatever its section."""
        out = []
        for key, value in sorted(self.values.items()):
            parsed = parse_val_key(key)
            if parsed and (parsed.core or key == self.highlight):
                out.append((parsed, value))
        return out

    def card_metadata(self, model_name: str | None = None) -> dict[str, Any]:
        """{"model-index": [...]} for the card's front matter (empty without values), checked by huggingface_hub."""
        from huggingface_hub import EvalResult, ModelCard, ModelCardData
        from huggingface_hub.repocard_data import eval_results_to_model_index

        results = [EvalResult(task_type=TASK_TYPE, dataset_type=k.data_source, dataset_name=k.data_source,
                              metric_type=k.var, metric_name=f"{k.var} {k.metric} (verl validation, step {self.step})",
                              metric_config=k.metric, metric_value=value) for k, value in self.reported()]
        if not results:
            return {}
        meta = {"model-index": eval_results_to_model_index(model_name or self.run_name, results)}
        try:  # what the Hub will parse: the front matter read back through ModelCard
            card = ModelCard(f"---\n{ModelCardData(**meta).to_yaml()}\n---\n")
            parsed = card.data.eval_results or []
        except ValueError as e:
            raise MetricsError(f"model-index from {self.metrics_file.name} is invalid: {e}",
                               hint="report this: hubexport built metadata huggingface_hub rejects") from None
        if len(parsed) != len(results):
            raise MetricsError(f"model-index from {self.metrics_file.name} lost results when parsed back",
                               hint="report this: hubexport built metadata huggingface_hub rejects")
        return meta

    def entries(self) -> dict[str, list[Any]]:
        """`.eval_results/<name>.yaml` → [EvalResultEntry]: one per data source that is a Hub dataset id, holding its
        main metric (the selection metric, else mean@K, else the first val-core one)."""
        from huggingface_hub import EvalResultEntry

        from hubexport.card_metadata import REPO_ID_RE

        by_source: dict[str, list[tuple[ValKey, float]]] = {}
        for k, value in self.reported():
            by_source.setdefault(k.data_source, []).append((k, value))
        out: dict[str, list[Any]] = {}
        for source, items in sorted(by_source.items()):
            if not REPO_ID_RE.fullmatch(source):
                continue  # eval_results_for said so
            key, value = min(items, key=lambda kv: (kv[0].key != self.highlight, not kv[0].metric.startswith("mean@"),
                                                    kv[0].key))
            name = source.split("/")[-1]
            path = f"{EVAL_DIR}/{name}.yaml" if f"{EVAL_DIR}/{name}.yaml" not in out else \
                f"{EVAL_DIR}/{source.replace('/', '__')}.yaml"
            out[path] = [EvalResultEntry(dataset_id=source, task_id="default", value=value,
                                         notes=f"verl in-training validation: {key.key} at step {self.step}")]
        return out

    def files(self) -> dict[str, bytes]:
        """Repo path → bytes: the .eval_results YAML files (checked by parsing them back) and the curve PNG."""
        from huggingface_hub import eval_result_entries_to_yaml
        from huggingface_hub._eval_results import parse_eval_result_entries

        out = {}
        for path, entries in self.entries().items():
            text = yaml.safe_dump(eval_result_entries_to_yaml(entries), sort_keys=False, allow_unicode=True, width=1000)
            if parse_eval_result_entries(yaml.safe_load(text)) != entries:
                raise MetricsError(f"{path} does not parse back", hint="report this: hubexport wrote a bad entry")
            out[path] = text.encode()
        if self.curve_png is not None:
            out[CURVE_PATH] = self.curve_png
        return out

    def markdown(self) -> str:
        lines = ["## Evaluation results", ""]
        why = f" ({self.selection})" if self.selection else ""
        if not self.reported():
            ran = self.log.validation_steps()
            lines.append(f"No val-core validation values were logged at step {self.step}, the published checkpoint{why}; "
                         + (f"validation ran at steps {', '.join(map(str, ran))}." if ran else "the run logged none."))
        else:
            lines += [f"verl's validation during training (its reward on the validation files) at step {self.step}, "
                      f"the published checkpoint{why}.", "",
                      "| Data source | Reward | Metric | Value |", "|---|---|---|---:|"]
            lines += [f"| {k.data_source} | {k.var} | {k.metric} | {v:.4g} |" for k, v in self.reported()]
        if self.curve_png is not None:
            lines += ["", f"![Validation metrics over training steps]({CURVE_PATH})"]
        return "\n".join(lines) + "\n"

    def _note(self, note: str) -> None:
        if note not in self.notes:
            self.notes.append(note)


def curve_png(log: MetricsLog, keys: list[str], step: int) -> bytes:
    """A small line plot of `keys` over steps with the published step marked; deterministic bytes (no metadata)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.2), dpi=100)
    ax = fig.add_subplot()
    for key in keys:
        xs, ys = zip(*log.series(key), strict=True)
        ax.plot(xs, ys, marker="o", markersize=3, label=key.removeprefix("val-core/"))
    ax.axvline(step, color="grey", linestyle="--", linewidth=1, label=f"published: step {step}")
    ax.set_xlabel("training step")
    ax.set_ylabel("validation value")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def _curve(results: EvalResults) -> bytes | None:
    keys = [results.highlight] if results.highlight else sorted(
        {k for s in results.log.validation_steps() for k in results.log.validation(s)
         if (p := parse_val_key(k)) and p.core})
    keys = [k for k in keys if k and len(results.log.series(k)) > 1][:MAX_CURVES]
    if not keys:
        return None
    try:
        return curve_png(results.log, keys, results.step)
    except ImportError:
        results._note("matplotlib is not installed: no validation curve in the card (pip install 'hubexport[plot]')")
        return None


def eval_results_for(run_root_or_checkpoint: Path, step: int | None = None, metrics_file: Path | None = None, *,
                     selector: str | None = None, selection: str | None = None,
                     log: Callable[[str], None] = print, env: Mapping[str, str] = os.environ) -> EvalResults | None:
    """The run's validation values at `step` (default: the global_step_N in the path). None when no metrics file is
    given or found next to the run (said in the log); values empty, said in the log and the card, when the step
    had no validation. `selector`/`selection`: the --select string and select_step's reason, for the card."""
    run_root, path_step = run_root_of(run_root_or_checkpoint)
    step = step if step is not None else path_step
    if step is None:
        raise MetricsError(f"{run_root_or_checkpoint} names no global_step_N", hint="pass the step to publish")
    path = metrics_file or find_metrics_file(run_root, env)
    if path is None:
        log(f"eval results: no verl metrics file found near {run_root} (pass --metrics FILE for evaluation results)")
        return None
    metrics = read_metrics(path)
    highlight = selector[5:] if selector and selector.startswith("best:") else None
    results = EvalResults(run_root.name, step, Path(path), metrics.validation(step), metrics, highlight, selection,
                          list(metrics.notes))
    if not results.values:
        ran = metrics.validation_steps()
        results._note(f"{Path(path).name} has no validation values at step {step}"
                      + (f" (validation ran at steps {', '.join(map(str, ran))})" if ran else " (none at any step)"))
    from hubexport.card_metadata import REPO_ID_RE

    for source in sorted({k.data_source for k, _ in results.reported()}):
        if not REPO_ID_RE.fullmatch(source):
            results._note(f"data source {source!r} is not a Hub dataset id: in model-index only, no {EVAL_DIR} entry")
    results.curve_png = _curve(results)
    for note in results.notes:
        log(f"eval results: {note}")
    log(f"eval results: {len(results.reported())} validation value(s) at step {step} from {path}")
    return results
