"""Small JSON files the checkpoint or folder carries (configs, indexes, metadata): read, or one clear error."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hubexport.errors import CheckpointError, HubexportError


def read_json_object(path: Path, *, error: type[HubexportError] = CheckpointError,
                     hint: str = "re-copy the file from the training run") -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"{path} is not valid JSON: {e}", hint=hint) from None
    if not isinstance(data, dict):
        raise error(f"{path} does not hold a JSON object", hint=hint)
    return data
