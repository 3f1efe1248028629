"""A small on-disk cache of what save_pretrained writes for an architecture (names, shapes, tied aliases), so a
merge whose weights transformers saves unconverted never builds a meta model, nor imports the modeling code (~4 s).
Keyed by (hubexport, transformers, architecture, the whole config); kept under the Hugging Face cache folder. An
entry that cannot be read is ignored and rewritten; a model that ships its own code is never cached."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

FORMAT = 1


def cache_dir() -> Path:
    """`$HF_HOME/hubexport/native` (read at call time, as huggingface_hub resolves it)."""
    home = os.environ.get("HF_HOME")
    if not home:
        from huggingface_hub import constants

        home = constants.HF_HOME
    return Path(home) / "hubexport" / "native"


def entry_key(config_json: str, architecture: str) -> str:
    import transformers

    from hubexport import __version__

    ident = json.dumps([FORMAT, __version__, transformers.__version__, architecture, config_json])
    return hashlib.sha256(ident.encode()).hexdigest()


def load(key: str) -> dict[str, Any] | None:
    try:
        data = json.loads((cache_dir() / f"{key}.json").read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("key") == key else None


def store(key: str, data: dict[str, Any]) -> None:
    """Written whole or not at all (a temporary file renamed); a read-only cache is no error."""
    folder = cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=folder, suffix=".tmp", delete=False) as f:
            json.dump({**data, "key": key}, f)
        os.replace(f.name, folder / f"{key}.json")
    except OSError:
        pass
