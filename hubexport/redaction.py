"""Secrets out of text that leaves the process (job summaries, annotations, error lines): the values of the token
variables this process can see, bearer headers, Hub tokens and JWTs (an OIDC id token, an exchanged Hub token)."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping

SECRET_VARS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_ID_TOKEN", "ACTIONS_ID_TOKEN_REQUEST_TOKEN")
_PATTERNS = re.compile(
    r"(?i)(?<=bearer )\S+"  # an Authorization header quoted in an error
    r"|hf_(?:jwt|oauth)_[\w.-]+"  # a token from an OAuth or Trusted Publishers exchange
    r"|hf_[A-Za-z0-9]{30,}"  # a user access token
    r"|eyJ[\w-]+\.[\w-]+\.[\w-]*"  # a JWT (a CI provider's OIDC id token)
)


def known_secrets(env: Mapping[str, str] = os.environ) -> list[str]:
    return [env[v] for v in SECRET_VARS if len(env.get(v, "")) >= 8]


def redacted_line(text: str, secrets: Iterable[str] = ()) -> str:
    """One line of at most 400 characters with the secrets out: what an error message quoting a library may say."""
    text = redact(" ".join(text.split()), secrets)
    return text if len(text) <= 400 else text[:397] + "..."


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    for secret in sorted(secrets, key=len, reverse=True):  # longest first: one secret may contain another
        if len(secret) >= 8:
            text = text.replace(secret, "***")
    return _PATTERNS.sub("***", text)
