"""Where the bundled Jinja templates are: the installed `hubexport.templates` package (pyproject maps templates/
onto it), or templates/ beside the package in a source checkout that is imported without being installed."""

from __future__ import annotations

import importlib.resources
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable


def templates_root() -> Traversable:
    try:
        return importlib.resources.files("hubexport.templates")
    except ModuleNotFoundError:
        return Path(__file__).resolve().parent.parent / "templates"
