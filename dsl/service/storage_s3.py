"""``s3://bucket/prefix`` storage for checkpoints: boto3, the standard AWS credential chain, retries.

Endpoint (S3-compatible stores such as MinIO or moto), first that is set:
``set_default_endpoint(url)`` (what the ``storage_endpoint=`` key of the jobs calls), then
``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` (read by boto3 itself), then AWS.
Credentials are never taken from the URI: boto3's chain (env, shared config, instance role) only.

Every call is retried with exponential backoff on connection errors, timeouts, 5xx and throttling;
after the last attempt one :class:`UserError` line names the URI and the cause. Uploads carry
Content-MD5 so the server rejects a body damaged in transit; the checkpoint layer adds sha256 and
writes the manifest last, so an interrupted save is never visible as complete.
"""

from __future__ import annotations

import base64
import hashlib
import os
import random
import time
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import urlparse

from dsl.errors import UserError
from dsl.storage import register_storage

T = TypeVar("T")

_default_endpoint: str | None = None
RETRYABLE_CODES = {"500", "502", "503", "504", "RequestTimeout", "SlowDown", "Throttling",
                   "ThrottlingException", "InternalError", "ServiceUnavailable", "RequestTimeTooSkewed"}


def set_default_endpoint(url: str | None) -> None:
    """Endpoint for every S3Storage opened afterwards in this process (None = boto3's own choice)."""
    global _default_endpoint
    _default_endpoint = url or None


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` → ``("bucket", "some/prefix")``; one clear line otherwise."""
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise UserError(f"{uri}: not an S3 URI (expected s3://bucket[/prefix])")
    if "@" in parsed.netloc or parsed.query:
        raise UserError(f"{_redact(uri)}: credentials or query strings do not belong in an S3 URI; use the "
                        "AWS credential chain and storage_endpoint= / AWS_ENDPOINT_URL")
    return parsed.netloc, parsed.path.strip("/")


def _redact(uri: str) -> str:
    parsed = urlparse(uri)
    host = parsed.netloc.rsplit("@", 1)[-1]
    return f"{parsed.scheme}://{host}{parsed.path}"


class S3Storage:
    """The ``Storage`` protocol of ``dsl.checkpoint`` over one bucket/prefix."""

    def __init__(self, uri: str, *, endpoint_url: str | None = None, attempts: int = 5,
                 backoff_s: float = 0.5, max_backoff_s: float = 8.0, timeout_s: float = 10.0,
                 client: Any = None, sleep: Callable[[float], None] = time.sleep) -> None:
        self.bucket, self.prefix = parse_s3_uri(uri)
        self.uri = f"s3://{self.bucket}" + (f"/{self.prefix}" if self.prefix else "")
        self.endpoint_url = endpoint_url or _default_endpoint
        self.attempts, self.backoff_s, self.max_backoff_s = max(1, attempts), backoff_s, max_backoff_s
        self._sleep = sleep
        self._client = client or self._make_client(timeout_s)

    def _make_client(self, timeout_s: float) -> Any:
        import boto3
        from botocore.config import Config

        # botocore's own retries are off: ours are counted, backed off and reported in one place
        cfg = Config(connect_timeout=timeout_s, read_timeout=timeout_s, retries={"max_attempts": 1,
                                                                                "mode": "standard"})
        kwargs: dict[str, Any] = {"config": cfg}
        if self.endpoint_url:
            kwargs["endpoint_url"] = self.endpoint_url
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if region:
            kwargs["region_name"] = region
        return boto3.session.Session().client("s3", **kwargs)

    # ------------------------------------------------------------------------------------------
    def _key(self, key: str) -> str:
        key = key.strip("/")
        if any(p == ".." for p in key.split("/")):
            raise UserError(f"storage key {key!r} leaves {self.uri}")
        return f"{self.prefix}/{key}" if self.prefix else key

    def _call(self, what: str, key: str, fn: Callable[[], T]) -> T:
        from botocore.exceptions import BotoCoreError, ClientError

        last = ""
        for attempt in range(self.attempts):
            try:
                return fn()
            except ClientError as exc:
                code = str(exc.response.get("Error", {}).get("Code", ""))
                status = str(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
                if code in ("NoSuchKey", "404", "NotFound"):
                    raise UserError(f"{self.uri}/{key.strip('/')}: no such object") from None
                if code == "NoSuchBucket":
                    raise UserError(f"{self.uri}: bucket {self.bucket!r} does not exist") from None
                if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403"):
                    raise UserError(f"{self.uri}/{key.strip('/')}: {what} denied ({code}); check the AWS "
                                    "credential chain (env, ~/.aws, instance role)") from None
                if code not in RETRYABLE_CODES and not status.startswith("5"):
                    raise UserError(f"{self.uri}/{key.strip('/')}: {what} failed ({code})") from None
                last = code or status
            except BotoCoreError as exc:  # connection refused/reset, timeouts, DNS, incomplete reads
                last = type(exc).__name__
            if attempt + 1 < self.attempts:
                delay = min(self.max_backoff_s, self.backoff_s * 2 ** attempt)
                self._sleep(delay * (0.5 + random.random() / 2))  # jitter: restarted workers do not align
        where = self.endpoint_url or "AWS"
        raise UserError(f"{self.uri}/{key.strip('/')}: {what} failed after {self.attempts} attempts with "
                        f"backoff ({last}; endpoint {where})")

    # ------------------------------------------------------------------------------------------
    def put_bytes(self, key: str, data: bytes) -> None:
        md5 = base64.b64encode(hashlib.md5(data).digest()).decode()  # noqa: S324 - integrity, not security
        self._call("upload", key, lambda: self._client.put_object(
            Bucket=self.bucket, Key=self._key(key), Body=data, ContentMD5=md5))

    def get_bytes(self, key: str) -> bytes:
        def read() -> bytes:
            return self._client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()

        return self._call("download", key, read)

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        def head() -> bool:
            try:
                self._client.head_object(Bucket=self.bucket, Key=self._key(key))
                return True
            except ClientError as exc:
                if str(exc.response.get("Error", {}).get("Code")) in ("404", "NoSuchKey", "NotFound"):
                    return False
                raise

        return self._call("lookup", key, head)

    def list(self, prefix: str = "") -> list[str]:
        return sorted(self.sizes(prefix))

    def sizes(self, prefix: str = "") -> dict[str, int]:
        """``{key: bytes}`` of every object under ``prefix`` (one listing, no per-object request)."""
        full = self._key(prefix) if prefix.strip("/") else self.prefix
        if full and (prefix.endswith("/") or not prefix):
            full += "/"
        strip = len(self.prefix) + 1 if self.prefix else 0

        def listing() -> dict[str, int]:
            found = {}
            for page in self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
                found.update((obj["Key"][strip:], int(obj["Size"])) for obj in page.get("Contents", []))
            return found

        return self._call("listing", prefix, listing)

    def delete(self, key: str) -> None:
        """Delete the object ``key`` and, like a directory, every object under ``key/``."""
        targets = [key.strip("/")] + [k for k in self.list(key.strip("/") + "/")]
        for k in targets:
            self._call("delete", k, lambda k=k: self._client.delete_object(Bucket=self.bucket, Key=self._key(k)))


    def put_files(self, prefix: str, files: dict[str, bytes]) -> None:
        """One object per file in the dict's order: the last one (a manifest) is written last."""
        for name, data in files.items():
            self.put_bytes(f"{prefix.strip('/')}/{name}", data)

    def delete_prefix(self, prefix: str, first: tuple[str, ...] = ()) -> None:
        prefix = prefix.strip("/")
        for name in first:
            self.delete(f"{prefix}/{name}")
        self.delete(prefix)

    def local_path(self, key: str) -> None:
        return None


register_storage("s3", lambda uri: S3Storage(uri))

__all__ = ["S3Storage", "set_default_endpoint", "parse_s3_uri"]
