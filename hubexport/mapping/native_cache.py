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


def cache_dir(kind: str = "native") -> Path:
    """`$HF_HOME/hubexport/<kind>`, resolved at call time as huggingface_hub resolves HF_HOME (without importing
    it: the fast merge path reads this cache before anything heavy is imported)."""
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface")
    return Path(os.path.expanduser(home)) / "hubexport" / kind


def entry_key(config_json: str, architecture: str) -> str:
    import transformers

    from hubexport import __version__

    ident = json.dumps([FORMAT, __version__, transformers.__version__, architecture, config_json])
    return hashlib.sha256(ident.encode()).hexdigest()


def load(key: str, kind: str = "native") -> dict[str, Any] | None:
    try:
        data = json.loads((cache_dir(kind) / f"{key}.json").read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("key") == key else None


def store(key: str, data: dict[str, Any], kind: str = "native") -> None:
    """Written whole or not at all (a temporary file renamed); a read-only cache is no error."""
    folder = cache_dir(kind)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=folder, suffix=".tmp", delete=False) as f:
            json.dump({**data, "key": key}, f)
        os.replace(f.name, folder / f"{key}.json")
    except OSError:
        pass
