"""The GitHub Action's job summary when a run failed: where it stopped, the error line and its hint, what was merged
when it got that far, and the end of the failing step's log, all redacted.

It is built from what the action captured and what is on disk: the failing step's stderr (hubexport's `error:` and
`hint:` lines, and the progress lines before them), the target-dir when this run wrote it (weight files newer than
the marker the push step touched when it started), else the checkpoint itself, inspected from metadata only."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hubexport.errors import HubexportError
from hubexport.redaction import known_secrets, redact
from hubexport.summary import render_markdown

FAILURE_TEMPLATE = "action_failure.md.j2"
LOG_TAIL_LINES = 40


@dataclass
class Failure:
    stage: str  # the action's step that failed, e.g. "merging and pushing"
    repo_id: str
    error: str  # the first error line (without "error: "), or the log's last line when it has none
    hints: list[str] = field(default_factory=list)
    last_step: str | None = None  # the last progress line before the error: where it stopped
    log_tail: list[str] = field(default_factory=list)
    merged: dict[str, Any] | None = None  # `inspect` of the target-dir this run wrote
    checkpoint: dict[str, Any] | None = None  # `inspect` of the checkpoint, when no merged model was kept


def parse_log(lines: list[str]) -> tuple[str, list[str], str | None]:
    """(error, hints, last progress line) from a step's stderr; ranks under torchrun repeat the same error."""
    errors = list(dict.fromkeys(line[len("error: "):] for line in lines if line.startswith("error: ")))
    hints = list(dict.fromkeys(line[len("hint: "):] for line in lines if line.startswith("hint: ")))
    first = next((i for i, line in enumerate(lines) if line.startswith("error: ")), len(lines))
    before = [line for line in lines[:first] if line.strip() and not line.startswith("hint: ")]
    if errors:
        return errors[0], hints, before[-1].strip() if before else None
    return (before[-1].strip() if before else "the step failed without an error line: see its log"), hints, None


def _fresh(folder: Path, since: Path | None) -> bool:
    """Whether this run wrote the model in `folder` (an --overwrite that failed leaves the previous one)."""
    weights = list(folder.glob("*.safetensors")) if folder.is_dir() else []
    if not weights or not (folder / "config.json").is_file():
        return False
    return since is None or max(p.stat().st_mtime_ns for p in weights) >= since.stat().st_mtime_ns


def _inspect(path: Path, hf_only: bool) -> dict[str, Any] | None:
    """Metadata for the summary, or nothing when the path cannot tell (it may be what failed)."""
    from hubexport.inspection import inspect, inspect_hf

    try:
        return inspect_hf(path) if hf_only else inspect(path)
    except (HubexportError, OSError, ValueError):
        return None


def read_failure(stage: str, log: Path | None, *, repo_id: str = "", checkpoint: Path | None = None,
                 target_dir: Path | None = None, since: Path | None = None) -> Failure:
    secrets = known_secrets()
    text = log.read_text(errors="replace") if log is not None and log.is_file() else ""
    lines = [redact(line.rstrip(), secrets) for line in text.splitlines()]
    error, hints, last_step = parse_log(lines)
    failure = Failure(stage, repo_id, error, hints, last_step, lines[-LOG_TAIL_LINES:])
    if target_dir is not None and _fresh(target_dir, since if since is not None and since.is_file() else None):
        failure.merged = _inspect(target_dir, hf_only=True)
    elif checkpoint is not None and checkpoint.is_dir():
        failure.checkpoint = _inspect(checkpoint, hf_only=False)
    return failure


def annotation(failure: Failure) -> str:
    """A GitHub `::error` workflow command: the error on the run's page, escaped as the runner expects."""
    message = f"{failure.stage}: {failure.error}"
    for char, code in (("%", "%25"), ("\r", "%0D"), ("\n", "%0A")):
        message = message.replace(char, code)
    return f"::error title=hubexport::{message}"


def render_failure(failure: Failure, template: str | Path | None = None) -> str:
    longest = max((len(run) for line in failure.log_tail for run in re.findall(r"`+", line)), default=0)
    return render_markdown(template, FAILURE_TEMPLATE, f=failure, fence="`" * max(3, longest + 1))
