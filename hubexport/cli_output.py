"""How the CLI talks: one `error:` line and a `hint:` (tracebacks only with --debug), progress on stderr, results as
text or JSON on stdout, and under torchrun only rank 0 speaks."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import click

from hubexport.errors import HubexportError


def jsonable(obj: Any) -> Any:
    if is_dataclass(obj):
        return jsonable(asdict(obj))
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _is_main() -> bool:
    from hubexport.dist import Dist

    return Dist.from_env().is_main


def emit_json(obj: Any) -> None:
    if _is_main():  # under torchrun only rank 0 reports, so stdout holds one document
        click.echo(json.dumps(jsonable(obj), indent=2))


def friendly(fn: Callable) -> Callable:
    """Turn HubexportError into `error: …` + `hint: …` and its exit code; --debug re-raises for a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        debug = click.get_current_context().find_root().params.get("debug", False)
        try:
            return fn(*args, **kwargs)
        except HubexportError as e:
            if debug:
                raise
            if _is_main():  # under torchrun rank 0 reports every rank's failure, once
                click.echo(f"error: {e.message}", err=True)
                if e.hint:
                    click.echo(f"hint: {e.hint}", err=True)
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("error: interrupted; the target was left as it was before this run", err=True)
            sys.exit(130)

    return wrapper


def say(msg: str) -> None:
    click.echo(msg, err=True)


def say_once(msg: str) -> None:
    """From rank 0 only, under torchrun."""
    if _is_main():
        say(msg)
