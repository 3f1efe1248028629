"""A push result (`hubexport push --json`) turned into what a CI job shows: a markdown summary rendered from a template
in templates/, and step outputs in the `$GITHUB_OUTPUT` format. The GitHub Action calls this through
`hubexport summary`, so it stays a thin wrapper around the CLI."""

from __future__ import annotations

import json
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hubexport.errors import CardError
from hubexport.resources import templates_root

SUMMARY_TEMPLATE = "action_summary.md.j2"
MAX_SUMMARY_BYTES = 1 << 20  # GitHub refuses a step summary above 1 MiB
MAX_SHARD_ROWS = 500


def load_result(path: Path) -> dict[str, Any]:
    """The JSON `hubexport push --json` printed."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CardError(f"cannot read the push result {path}: {e}", hint="pass the output of `hubexport push --json`") from None
    if not isinstance(data, dict) or "repo_id" not in data:
        raise CardError(f"{path} is not a push result", hint="pass the output of `hubexport push --json`")
    return data


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def action_outputs(result: Mapping[str, Any]) -> dict[str, str]:
    """The action's outputs, as strings (empty when not applicable, e.g. no commit in a dry run)."""
    return {
        "repo-id": _text(result.get("repo_id")),
        "repo-url": _text(result.get("repo_url")),
        "commit-sha": _text(result.get("commit_sha")),
        "commit-url": _text(result.get("commit_url")),
        "pr-url": _text(result.get("pr_url")),
        "revision": _text(result.get("revision")),
        "target-dir": _text(result.get("target_dir")),
        "files-uploaded": _text(result.get("files_uploaded")),
        "bytes-uploaded": _text(result.get("bytes_uploaded")),
        "private": _text(result.get("private")),
        "no-op": _text(result.get("no_op")),
    }


def github_output_lines(outputs: Mapping[str, str]) -> str:
    """`name<<DELIM` blocks with a random delimiter each, so no value (even one with newlines) can end its block
    early or inject another output."""
    chunks = []
    for name, value in outputs.items():
        delim = f"ghadelimiter_{secrets.token_hex(16)}"
        chunks.append(f"{name}<<{delim}\n{value}\n{delim}\n")
    return "".join(chunks)


def _cell(value: Any) -> str:
    """A value safe inside a markdown table cell: one line, pipes escaped."""
    return " ".join(_text(value).split()).replace("|", "\\|")


def _code(value: Any) -> str:
    text = _cell(value).replace("`", "'")
    return f"`{text}`" if text else ""


def _human_bytes(n: Any) -> str:
    if not isinstance(n, int):
        return ""
    size = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{int(size)} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return str(n)


def _template_text(template: str | Path | None, default: str) -> str:
    if template is None or str(template) == "default":
        return templates_root().joinpath(default).read_text()
    path = Path(template)
    if not path.is_file():
        raise CardError(f"summary template {path} not found", hint="pass a .md.j2 file, or leave --template out")
    return path.read_text()


def render_markdown(template: str | Path | None, default: str, **context: Any) -> str:
    """A job summary from a bundled template (`default`) or a user's .md.j2, with the table-safe filters, capped at
    the size GitHub accepts."""
    import jinja2

    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True,
                             undefined=jinja2.StrictUndefined, autoescape=False)
    env.filters.update(cell=_cell, code=_code, human_bytes=_human_bytes)
    try:
        text = env.from_string(_template_text(template, default)).render(**context)
    except jinja2.TemplateError as e:
        raise CardError(f"summary template: {e}", hint="fix the template, or leave --template out") from None
    if len(text.encode()) > MAX_SUMMARY_BYTES:
        text = text.encode()[: MAX_SUMMARY_BYTES - 100].decode(errors="ignore") + "\n\n(summary truncated)\n"
    return text


def render_summary(result: Mapping[str, Any], template: str | Path | None = None) -> str:
    """Markdown for `$GITHUB_STEP_SUMMARY`: the repo and commit, what was merged from what, and the shard table."""
    model = result.get("model") or {}
    shards = list(model.get("shards") or [])
    return render_markdown(
        template, SUMMARY_TEMPLATE,
        r=result, model=model, shards=shards[:MAX_SHARD_ROWS], hidden_shards=max(0, len(shards) - MAX_SHARD_ROWS),
        visibility="private" if result.get("private") else "public", dry_run=bool(result.get("dry_run")),
    )
