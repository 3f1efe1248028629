"""Where the bundled Jinja templates are: templates/ beside the package when the running code is a source checkout
(on PYTHONPATH, or installed editable: its own templates, not another checkout's), else the installed
`hubexport.templates` package (pyproject maps templates/ onto it)."""

from __future__ import annotations

import importlib.resources
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable


def templates_root() -> Traversable:
    checkout = Path(__file__).resolve().parent.parent
    if (checkout / "pyproject.toml").is_file() and (checkout / "templates").is_dir():
        return checkout / "templates"
    return importlib.resources.files("hubexport.templates")
