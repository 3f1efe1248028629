"""The Hub's rules for model-card metadata, checked locally so a bad card fails before any request."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import yaml

from hubexport.errors import CardError

# Hub license ids (hub-docs repositories-licenses.md); anything else must be `other` + license_name + license_link.
HUB_LICENSES = frozenset(
    """
apache-2.0 mit openrail bigscience-openrail-m creativeml-openrail-m bigscience-bloom-rail-1.0 bigcode-openrail-m
afl-3.0 artistic-2.0 bsl-1.0 bsd bsd-2-clause bsd-3-clause bsd-3-clause-clear c-uda cc cc0-1.0 cc-by-2.0 cc-by-2.5
cc-by-3.0 cc-by-4.0 cc-by-sa-3.0 cc-by-sa-4.0 cc-by-nc-2.0 cc-by-nc-3.0 cc-by-nc-4.0 cc-by-nd-4.0 cc-by-nc-nd-3.0
cc-by-nc-nd-4.0 cc-by-nc-sa-2.0 cc-by-nc-sa-3.0 cc-by-nc-sa-4.0 cdla-sharing-1.0 cdla-permissive-1.0
cdla-permissive-2.0 wtfpl ecl-2.0 epl-1.0 epl-2.0 etalab-2.0 eupl-1.1 eupl-1.2 agpl-3.0 gfdl gpl gpl-2.0 gpl-3.0 lgpl
lgpl-2.1 lgpl-3.0 isc h-research intel-research lppl-1.3c ms-pl apple-ascl apple-amlr mpl-2.0 odc-by odbl openrail++
osl-3.0 postgresql ofl-1.1 ncsa unlicense zlib pddl lgpl-lr deepfloyd-if-license fair-noncommercial-research-license
llama2 llama3 llama3.1 llama3.2 llama3.3 llama4 gemma unknown other
""".split()  # noqa: SIM905 (a table reads better as words)
)
BASE_MODEL_RELATIONS = ("adapter", "merge", "quantized", "finetune")
REPO_ID_RE = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}")


LICENSE_HINT = "use an id from https://huggingface.co/docs/hub/repositories-licenses, or license: other with " \
               "license_name and license_link"


def validate_metadata(meta: Mapping[str, Any]) -> None:
    """The Hub's rules for the metadata hubexport writes; raises CardError naming the first bad key."""

    def bad(message: str, hint: str) -> CardError:
        return CardError(f"model card metadata: {message}", hint=hint)

    lic = meta.get("license")
    if lic is not None and (not isinstance(lic, str) or lic not in HUB_LICENSES):
        raise bad(f"license {lic!r} is not a Hub license id", LICENSE_HINT)
    if lic == "other" and not (isinstance(meta.get("license_name"), str) and isinstance(meta.get("license_link"), str)):
        raise bad("license: other needs license_name and license_link", LICENSE_HINT)
    for key in ("base_model", "datasets"):
        value = meta.get(key)
        ids = [value] if isinstance(value, str) else value
        if value is not None and not (isinstance(ids, list) and all(isinstance(v, str) and REPO_ID_RE.fullmatch(v)
                                                                    for v in ids)):
            raise bad(f"{key} {value!r} must be Hub repo ids like org/name", f"local paths are not allowed in {key}")
    relation = meta.get("base_model_relation")
    if relation is not None and relation not in BASE_MODEL_RELATIONS:
        raise bad(f"base_model_relation {relation!r} is not one of {', '.join(BASE_MODEL_RELATIONS)}",
                  "hubexport writes finetune for RL full-weight exports")
    if relation is not None and meta.get("base_model") is None:
        raise bad("base_model_relation is set but base_model is not", "pass --base-model org/name")
    for key in ("tags", "language"):
        value = meta.get(key)
        if value is not None and not (isinstance(value, str) or (isinstance(value, list)
                                                                  and all(isinstance(v, str) for v in value))):
            raise bad(f"{key} must be a string or a list of strings", f"fix {key} in the card data")


def validate_card(text: str) -> dict[str, Any]:
    """Parse a README's front matter and check it; returns the metadata."""
    from huggingface_hub import ModelCard

    try:
        meta = ModelCard(text).data.to_dict()
    except (ValueError, yaml.YAMLError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        hint = "fix the front matter of README.md"
        raise CardError(f"model card metadata is not valid YAML: {first}", hint=hint) from None
    validate_metadata(meta)
    return meta
