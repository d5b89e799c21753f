"""Credentials never leave the process: every URI, message, MLflow param and tag a job prints or logs
passes :func:`scrub` first.

What is removed: the user-info part of any URI (``postgresql://user:password@host`` →
``postgresql://***@host``), secret-looking query parameters (``?token=…``, ``&X-Amz-Signature=…``), AWS
access key ids, the values of the secret environment variables this process holds, and the whole value
of a key whose name says it is a secret.
"""

from __future__ import annotations

import os
import re
from typing import Any

SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "HF_TOKEN",
              "HUGGING_FACE_HUB_TOKEN", "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_PASSWORD", "PGPASSWORD",
              "RAY_AUTH_TOKEN", "GITHUB_TOKEN")
# "token" as a word of the key (hf_token, auth_token_path), not the start of tokens/tokenizer/tokenize
_SECRET_KEY = re.compile(r"(secret|password|passwd|(?<![a-z])token(?![a-z])|credential|api_?key|access_?key)", re.I)
_AWS_KEY_ID = re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b")
# user-info runs to the last '@' before the host's '/', so a password holding '@' goes too
_URL_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^/\s'\"]*@")
_QUERY_SECRET = re.compile(r"([?&](?:[^=&\s]*(?:secret|token|password|key|signature)[^=&\s]*)=)[^&\s]+", re.I)
REDACTED = "***"


def scrub(value: Any, key: str = "") -> str:
    """``value`` as text with credentials replaced by ``***`` (and all of it if ``key`` names a secret)."""
    text = str(value)
    if key and _SECRET_KEY.search(key.rsplit(".", 1)[-1]) and text:
        return REDACTED
    text = _URL_USERINFO.sub(lambda m: m.group("scheme") + REDACTED + "@", text)
    text = _QUERY_SECRET.sub(lambda m: m.group(1) + REDACTED, text)
    text = _AWS_KEY_ID.sub(REDACTED, text)
    for name in SECRET_ENV:
        secret = os.environ.get(name)
        if secret and len(secret) >= 6:
            text = text.replace(secret, REDACTED)
    return text


__all__ = ["scrub", "REDACTED", "SECRET_ENV"]
