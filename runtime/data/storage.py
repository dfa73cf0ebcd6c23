"""Where the data pipeline reads and writes: a local directory or an ``s3://bucket/prefix``.

One small interface (:class:`Storage`) so the pipeline and the loader never branch on the
URI scheme. Standard library only at import time; boto3 is imported when an ``s3://`` URI is
opened, so the loader still runs where boto3 is absent (local shards).

S3 settings (endpoint, region) come from ``spec.storage`` via :class:`S3Options`; credentials
come from boto3's default chain (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` — injected from
``spec.storage.secretRef`` on Kubernetes — or the pod's ambient role), never from code.

Retries: botocore's ``standard`` retry mode retries a request that fails before its response
(connection refused or reset, 500/503 ``SlowDown``, throttling) with exponential backoff. An
object's body, though, is streamed *after* ``get_object`` has returned, outside botocore's retry
handler, so a connection reset or a truncated body there would fail the read: :func:`read_retrying`
repeats the whole GET for the errors s3transfer itself retries in its downloads
(``S3_RETRYABLE_DOWNLOAD_ERRORS``). It is a loop of our own because neither boto3 nor botocore
offers a retrying body read for ``get_object`` (only ``download_file``/``download_fileobj`` do,
and they need a file or a seekable object per call).
"""

from __future__ import annotations

import io
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Objects above this are uploaded in parts (S3's minimum part size is 5 MiB).
DEFAULT_MULTIPART_THRESHOLD = 64 * 1024 * 1024
DEFAULT_MULTIPART_CHUNK = 16 * 1024 * 1024


class StorageError(RuntimeError):
    """An object store or directory could not be read or written; the message names it."""


@dataclass(frozen=True)
class S3Options:
    endpoint: str | None = None
    region: str = "us-east-1"
    multipart_threshold: int = DEFAULT_MULTIPART_THRESHOLD
    multipart_chunk: int = DEFAULT_MULTIPART_CHUNK
    # Retries after the first try (botocore's retries.max_attempts, despite its name; the
    # body re-reads of read_retrying follow the same count).
    max_attempts: int = 8

    @classmethod
    def from_spec(cls, storage: Any) -> S3Options:
        """From ``spec.storage`` (endpoint, region); credentials stay ambient (env / secretRef)."""
        return cls(endpoint=storage.endpoint, region=storage.region)

    @classmethod
    def from_train(cls, train: Any) -> S3Options:
        """From a worker's ``TrainConfig`` (spec.storage, carried to the workers in the config)."""
        return cls(endpoint=train.storage_endpoint, region=train.storage_region)


# Backoff between whole-GET retries: 0.1, 0.2, 0.4 … s, at most 5 s (botocore's own base is 0.5 s
# with jitter; ours only follows a request that already succeeded once, so it starts lower).
_BACKOFF_BASE_S = 0.1
_BACKOFF_MAX_S = 5.0


def read_retrying(read: Callable[[], bytes], retries: int, what: str) -> bytes:
    """``read()`` (a GET and its body), repeated up to ``retries`` times with backoff while the
    body breaks off (``retries`` as in botocore's ``max_attempts``: retries after the first try).

    Only the errors of a broken body stream are retried here (the request itself was already
    retried by botocore); anything else — a missing key, access denied — raises at once.
    """
    from s3transfer.utils import S3_RETRYABLE_DOWNLOAD_ERRORS

    for attempt in range(retries + 1):
        try:
            return read()
        except S3_RETRYABLE_DOWNLOAD_ERRORS:
            if attempt >= retries:
                raise
            time.sleep(min(_BACKOFF_MAX_S, _BACKOFF_BASE_S * 2**attempt))
    raise AssertionError(f"unreachable: {what}")  # pragma: no cover - the loop returns or raises


def split_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` → ``("bucket", "a/b")``."""
    if not uri.startswith("s3://"):
        raise ValueError(f"not an s3:// URI: {uri!r}")
    bucket, _, key = uri[5:].partition("/")
    if not bucket:
        raise ValueError(f"s3 URI without a bucket: {uri!r}")
    return bucket, key


def join(prefix: str, name: str) -> str:
    return prefix.rstrip("/") + "/" + name if prefix else name


class Storage:
    """A directory-like view of a prefix. Keys are relative to the root given at construction."""

    uri: str

    def get(self, key: str) -> bytes:
        raise NotImplementedError

    def get_range(self, key: str, start: int, length: int) -> bytes:
        raise NotImplementedError

    def put(self, key: str, data: bytes) -> str | None:
        """Write an object; returns the S3 ETag (None for local files)."""
        raise NotImplementedError

    def exists(self, key: str) -> bool:
        raise NotImplementedError

    def size(self, key: str) -> int:
        raise NotImplementedError

    def list_keys(self, prefix: str = "") -> list[str]:
        """Every key under ``prefix`` (recursive, sorted)."""
        raise NotImplementedError

    def delete(self, keys: list[str]) -> None:
        raise NotImplementedError

    def describe(self, key: str) -> str:
        return join(self.uri, key)


class LocalStorage(Storage):
    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser()
        self.uri = str(self.root)

    def _path(self, key: str) -> Path:
        return self.root / key if key else self.root

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError as e:
            raise StorageError(f"{self.describe(key)} does not exist") from e

    def get_range(self, key: str, start: int, length: int) -> bytes:
        try:
            with self._path(key).open("rb") as f:
                f.seek(start)
                return f.read(length)
        except FileNotFoundError as e:
            raise StorageError(f"{self.describe(key)} does not exist") from e

    def put(self, key: str, data: bytes) -> str | None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Write-then-rename: a reader never sees half a file under the final name.
        tmp = path.with_name(path.name + ".part")
        tmp.write_bytes(data)
        tmp.replace(path)
        return None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def size(self, key: str) -> int:
        try:
            return self._path(key).stat().st_size
        except FileNotFoundError as e:
            raise StorageError(f"{self.describe(key)} does not exist") from e

    def list_keys(self, prefix: str = "") -> list[str]:
        base = self._path(prefix)
        if not base.exists():
            return []
        if base.is_file():
            return [prefix]
        return sorted(str(p.relative_to(self.root)) for p in base.rglob("*") if p.is_file())

    def delete(self, keys: list[str]) -> None:
        for k in keys:
            self._path(k).unlink(missing_ok=True)

    def rmtree(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


_CLIENTS: dict[tuple[Any, ...], Any] = {}


def s3_client(options: S3Options) -> Any:
    """A boto3 S3 client with standard retries; endpoint/region from the spec, credentials ambient.

    Clients are cached per process (creating one costs ~50 ms: a reader opens thousands of
    objects), keyed by the settings *and* the credential environment, so a changed
    AWS_ACCESS_KEY_ID is seen. Each client comes from its own boto3 Session: the default
    session caches credentials for the life of the process.
    """
    env = tuple(
        os.environ.get(k)
        for k in (
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_PROFILE",
            # boto3 reads these when no endpoint is given (the checkpoint lineage's case)
            "AWS_ENDPOINT_URL",
            "AWS_ENDPOINT_URL_S3",
        )
    )
    cache_key = (options.endpoint, options.region, options.max_attempts, os.getpid(), env)
    client = _CLIENTS.get(cache_key)
    if client is not None:
        return client
    try:
        import boto3
        from botocore.config import Config
    except ImportError as e:  # pragma: no cover - boto3 is in the runtime extra
        raise StorageError("s3:// URIs need boto3 (pip install 'llmtrain[runtime]')") from e
    cfg = Config(
        region_name=options.region,
        retries={"max_attempts": options.max_attempts, "mode": "standard"},
        s3={"addressing_style": "path"} if options.endpoint else {},
        max_pool_connections=32,
    )
    client = boto3.session.Session().client("s3", endpoint_url=options.endpoint, config=cfg)
    _CLIENTS[cache_key] = client
    return client


class S3Storage(Storage):
    def __init__(self, uri: str, options: S3Options | None = None, client: Any = None) -> None:
        self.bucket, prefix = split_s3_uri(uri)
        self.prefix = prefix.strip("/")
        self.uri = f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"
        self.options = options or S3Options()
        self.client = client if client is not None else s3_client(self.options)

    def _key(self, key: str) -> str:
        return join(self.prefix, key)

    def _wrap(self, e: Exception, key: str, action: str) -> StorageError:
        from botocore.exceptions import ClientError, NoCredentialsError

        what = self.describe(key)
        if isinstance(e, NoCredentialsError):
            return StorageError(
                f"no S3 credentials to {action} {what}: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY "
                "(on Kubernetes: spec.storage.secretRef)"
            )
        if isinstance(e, ClientError):
            code = e.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchBucket",):
                return StorageError(
                    f"bucket {self.bucket!r} does not exist ({action} {what}); check the URI or "
                    "spec.storage.endpoint"
                )
            if code in ("NoSuchKey", "404", "NotFound"):
                return StorageError(f"{what} does not exist")
            if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403"):
                return StorageError(
                    f"access denied to {action} {what} ({code}): check the credentials in "
                    "spec.storage.secretRef"
                )
            return StorageError(f"S3 error {code or e} while trying to {action} {what}")
        return StorageError(f"cannot {action} {what}: {e}")

    def _read(self, key: str, **kwargs: Any) -> bytes:
        def once() -> bytes:
            return bytes(
                self.client.get_object(Bucket=self.bucket, Key=self._key(key), **kwargs)["Body"].read()
            )

        try:
            return read_retrying(once, self.options.max_attempts, self.describe(key))
        except Exception as e:
            raise self._wrap(e, key, "read") from e

    def get(self, key: str) -> bytes:
        return self._read(key)

    def get_range(self, key: str, start: int, length: int) -> bytes:
        return self._read(key, Range=f"bytes={start}-{start + length - 1}")

    def put(self, key: str, data: bytes) -> str | None:
        from boto3.s3.transfer import TransferConfig

        # upload_fileobj switches to a multipart upload above the threshold (ETag "<md5>-<parts>").
        cfg = TransferConfig(
            multipart_threshold=self.options.multipart_threshold,
            multipart_chunksize=self.options.multipart_chunk,
            use_threads=True,
        )
        try:
            self.client.upload_fileobj(io.BytesIO(data), self.bucket, self._key(key), Config=cfg)
            head = self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except Exception as e:
            raise self._wrap(e, key, "write") from e
        return str(head["ETag"]).strip('"')

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise self._wrap(e, key, "read") from e
        except Exception as e:
            raise self._wrap(e, key, "read") from e

    def size(self, key: str) -> int:
        try:
            return int(self.client.head_object(Bucket=self.bucket, Key=self._key(key))["ContentLength"])
        except Exception as e:
            raise self._wrap(e, key, "read") from e

    def iter_objects(self, prefix: str = "") -> Iterator[dict[str, Any]]:
        """list_objects_v2 pages (1000 keys each) until the listing is complete."""
        full = self._key(prefix) if prefix else (self.prefix + "/" if self.prefix else "")
        paginator = self.client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=full):
                yield from page.get("Contents", [])
        except Exception as e:
            raise self._wrap(e, prefix, "list") from e

    def list_keys(self, prefix: str = "") -> list[str]:
        cut = len(self.prefix) + 1 if self.prefix else 0
        return sorted(o["Key"][cut:] for o in self.iter_objects(prefix))

    def delete(self, keys: list[str]) -> None:
        for i in range(0, len(keys), 1000):
            batch = [{"Key": self._key(k)} for k in keys[i : i + 1000]]
            try:
                self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
            except Exception as e:
                raise self._wrap(e, keys[i], "delete") from e


def open_storage(uri: str, options: S3Options | None = None) -> Storage:
    """``s3://…`` → :class:`S3Storage`; anything else is a local directory."""
    if uri.startswith("s3://"):
        return S3Storage(uri, options)
    if "://" in uri:
        raise StorageError(f"unsupported URI scheme in {uri!r}: use s3://bucket/prefix or a local path")
    return LocalStorage(uri)
