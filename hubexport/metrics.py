"""verl's training metrics as its `file` logger writes them, and the choice of which checkpoint of a run to publish.

verl's FileLogger (verl/utils/tracking.py, `trainer.logger=[..., file]`) writes one JSON object per line,
`{"step": N, "data": {metric: value, ...}}` (newer versions add "elapsed_seconds"), serialised with orjson, so NaN and
Inf arrive as null. Its file is $VERL_FILE_LOGGER_PATH, else $VERL_FILE_LOGGER_ROOT (default: the launch directory)
/<trainer.project_name>/<trainer.experiment_name>.jsonl. It is opened with "wb": a resumed run starts it afresh.
Validation values at step N (`val-core/<data_source>/<reward>/mean@K`, `val-aux/...`) are logged with the training
metrics of step N, the step whose checkpoint is global_step_N."""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from hubexport.detect import STEP_RE
from hubexport.errors import CheckpointError, MetricsError

ENV_PATH = "VERL_FILE_LOGGER_PATH"
ENV_ROOT = "VERL_FILE_LOGGER_ROOT"
# data source names may hold "/" (openai/gsm8k); metric names are mean@K, std@K, best@K/mean, maj@K/std, ...
VAL_KEY_RE = re.compile(r"val-(?P<section>core|aux)/(?P<source>.+)/(?P<var>[^/]+)/(?P<metric>[a-z]+@\d+(?:/[a-z]+)?)")
LEGACY_KEY_RE = re.compile(r"val/test_score/(?P<source>.+)")  # verl <= 0.2: one score per data source
VAL_PREFIXES = ("val-core/", "val-aux/", "val/")
SELECT_HINT = "use --select latest, or best:<metric> with a metric of the run, e.g. best:val-core/openai/gsm8k/reward/mean@1"


@dataclass(frozen=True)
class ValKey:
    """A validation metric's name, taken apart: val-core/openai/gsm8k/reward/mean@4."""

    key: str
    core: bool
    data_source: str
    var: str  # the reward (or extra reward info) the metric is about: reward, acc, ...
    metric: str  # mean@4, best@4/mean, ...


def parse_val_key(key: str) -> ValKey | None:
    if m := VAL_KEY_RE.fullmatch(key):
        return ValKey(key, m["section"] == "core", m["source"], m["var"], m["metric"])
    if m := LEGACY_KEY_RE.fullmatch(key):
        return ValKey(key, True, m["source"], "test_score", "mean")
    return None


@dataclass
class MetricsLog:
    path: Path
    steps: dict[int, dict[str, float]]
    notes: list[str] = field(default_factory=list)

    def validation(self, step: int) -> dict[str, float]:
        return {k: v for k, v in self.steps.get(step, {}).items() if k.startswith(VAL_PREFIXES)}

    def validation_steps(self) -> list[int]:
        return sorted(s for s in self.steps if self.validation(s))

    def series(self, key: str) -> list[tuple[int, float]]:
        return [(s, self.steps[s][key]) for s in sorted(self.steps) if key in self.steps[s]]


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def read_metrics(path: Path) -> MetricsLog:
    """Parse a file-logger JSONL. Values that are not finite numbers (null for NaN, strings, tables) are left out;
    a torn last line (the run was killed mid-write) is skipped with a note; any other bad line is an error."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise MetricsError(f"cannot read metrics file {path}: {e}", hint="pass --metrics a verl file-logger JSONL") from None
    log = MetricsLog(path, {})
    lines = text.split("\n")
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            step, data = record["step"], record["data"]
            if isinstance(step, bool) or not isinstance(step, int) or not isinstance(data, dict):
                raise TypeError("step must be an integer and data an object")
        except (ValueError, KeyError, TypeError) as e:
            if lineno == len(lines):  # no newline after it: written while the run was killed
                log.notes.append(f"{path.name}: line {lineno} is incomplete and was skipped")
                continue
            raise MetricsError(f"{path}:{lineno} is not a verl file-logger record ({e})",
                               hint='each line must be {"step": N, "data": {...}}, as trainer.logger=file writes') from None
        values = {str(k): n for k, v in data.items() if (n := _number(v)) is not None}
        log.steps.setdefault(step, {}).update(values)  # a step logged twice: the later values win
    return log


# ---- where the run's metrics file is --------------------------------------------------------------------------------
def run_root_of(path: Path) -> tuple[Path, int | None]:
    """(run root, step) of a path inside a run: .../run/global_step_40/actor → (.../run, 40); a run root → (it, None)."""
    parts = Path(path).resolve().parts
    for i in range(len(parts) - 1, -1, -1):
        if m := STEP_RE.fullmatch(parts[i]):
            return Path(*parts[:i]), int(m.group(1))
    return Path(path).resolve(), None


def _config_names(run_root: Path) -> tuple[str, str] | None:
    """trainer.project_name and experiment_name from a verl config saved near the run, when there is one."""
    from hubexport.card import find_training_config

    found = find_training_config(run_root)
    try:
        trainer = (yaml.safe_load(found.read_text()) or {}).get("trainer", {}) if found else None
    except (OSError, yaml.YAMLError, AttributeError):
        return None
    if isinstance(trainer, dict) and isinstance(trainer.get("project_name"), str) \
            and isinstance(trainer.get("experiment_name"), str):
        return trainer["project_name"], trainer["experiment_name"]
    return None


def metrics_candidates(run_root: Path, env: Mapping[str, str] = os.environ) -> list[Path]:
    """Where verl's file logger may have written the run's metrics, most specific first. Names come from the saved
    config, else from the path (verl's default_local_dir is checkpoints/<project>/<experiment>); the file sits under
    the launch directory, which is one of the run root's ancestors. $VERL_FILE_LOGGER_PATH comes last: it may name
    another run's file."""
    run_root = Path(run_root).resolve()
    names = [n for n in (_config_names(run_root), (run_root.parent.name, run_root.name)) if n]
    roots = ([Path(env[ENV_ROOT]).expanduser()] if env.get(ENV_ROOT) else []) + [run_root, *run_root.parents[:3]]
    found = [root / project / f"{experiment}.jsonl" for project, experiment in names for root in roots]
    found += [run_root / "metrics.jsonl", run_root.parent / "metrics.jsonl"]
    if env.get(ENV_PATH):
        found.append(Path(env[ENV_PATH]).expanduser())
    return list(dict.fromkeys(found))


def find_metrics_file(run_root: Path, env: Mapping[str, str] = os.environ) -> Path | None:
    return next((p for p in metrics_candidates(run_root, env) if p.is_file()), None)


# ---- which step to publish ------------------------------------------------------------------------------------------
def checkpoint_steps(run_root: Path) -> dict[int, Path]:
    run_root = Path(run_root)
    if not run_root.is_dir():
        raise CheckpointError(f"{run_root} is not a directory", hint="pass the run root (the folder of global_step_N)")
    return {int(m.group(1)): p for p in run_root.iterdir() if p.is_dir() and (m := STEP_RE.fullmatch(p.name))}


def pick_best(values: Mapping[int, float]) -> tuple[int, list[int]]:
    """The step with the highest value, ties going to the latest; also every step sharing that value."""
    top = max(values.values())
    tied = sorted(s for s, v in values.items() if v == top)
    return tied[-1], tied


def _latest(run_root: Path, steps: dict[int, Path]) -> tuple[int, str]:
    marker = run_root / "latest_checkpointed_iteration.txt"
    text = marker.read_bytes()[:64].decode("ascii", "replace").strip() if marker.is_file() else ""
    if text.isdigit() and int(text) in steps:
        return int(text), f"latest step {int(text)} ({marker.name})"
    step = max(steps)
    return step, f"latest step {step} (highest global_step_N)"


def select_step(run_root: Path, selector: str = "latest", *, metrics_file: Path | None = None,
                env: Mapping[str, str] = os.environ) -> tuple[Path, str]:
    """The global_step_N folder `selector` picks among the run's checkpoints, and a sentence saying why.
    `latest`, or `best:<metric>`: the highest logged value of that metric (ties: the latest step)."""
    run_root = Path(run_root)
    steps = checkpoint_steps(run_root)
    if not steps:
        raise CheckpointError(f"{run_root} has no global_step_N folders", hint="pass the run root of a verl run")
    if selector == "latest":
        step, reason = _latest(run_root, steps)
        return steps[step], reason
    if not selector.startswith("best:") or not selector[5:]:
        raise MetricsError(f"unknown --select {selector!r}", hint=SELECT_HINT)
    metric = selector[5:]
    path = metrics_file or find_metrics_file(run_root, env)
    if path is None:
        raise MetricsError(f"--select {selector} needs the run's metrics, and none were found near {run_root}",
                           hint="pass --metrics FILE (the JSONL of verl's trainer.logger=file)")
    log = read_metrics(path)
    values = {s: log.steps[s][metric] for s in steps if metric in log.steps.get(s, {})}
    if not values:
        known = sorted({k for s in log.validation_steps() for k in log.validation(s)})
        logged = [s for s, v in sorted(log.steps.items()) if metric in v]
        where = f"logged at steps {_steps(logged)}, none checkpointed" if logged else "never logged"
        raise MetricsError(f"{metric} in {path.name}: {where} (checkpoints: {_steps(sorted(steps))})",
                           hint=f"validation metrics of the run: {', '.join(known[:6]) or 'none'}; " + SELECT_HINT)
    step, tied = pick_best(values)
    reason = f"best {metric} = {values[step]:.4g} at step {step}, among {len(values)} checkpointed step(s) with a value"
    if len(tied) > 1:
        reason += f" (tied with step(s) {_steps(tied[:-1])}: took the latest)"
    if len(values) < len(steps):
        reason += f"; {len(steps) - len(values)} checkpoint(s) without a logged value skipped"
    return steps[step], reason


def _steps(steps: list[int]) -> str:
    return ", ".join(map(str, steps[:10])) + (f" … ({len(steps)} in all)" if len(steps) > 10 else "")
