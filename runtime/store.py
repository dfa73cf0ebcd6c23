"""Where the runtime reads and writes: one :class:`Store` for a local directory or an
``s3://bucket/prefix``, used by the data pipeline and its loader, the checkpoint lineage, the
export and the import of pretrained weights.

Keys are ``/``-separated and relative to the store's root, so no caller branches on the URI
scheme. :func:`open_store` picks the backend; S3's settings come from
:class:`~llmtrain.api.s3.S3Options` (endpoint, region, retries), made in one place from
``spec.storage`` or the environment.

Standard library only at import time; boto3 is imported when an ``s3://`` URI is opened, so
the loader and the checkpoint lineage run where boto3 is absent (local shards, local checkpoints).

Retries: botocore's ``standard`` retry mode retries a request that fails before its response
(connection refused or reset, 500/503 ``SlowDown``, throttling) with exponential backoff. An
object's body, though, is streamed *after* ``get_object`` has returned, outside botocore's retry
handler, so a connection reset or a truncated body there would fail the read: :func:`read_retrying`
repeats the whole GET for the errors s3transfer itself retries in its downloads
(``S3_RETRYABLE_DOWNLOAD_ERRORS``). It is a loop of our own because neither boto3 nor botocore
offers a retrying body read for ``get_object`` (only ``download_file``/``download_fileobj`` do,
and they need a file or a seekable object per call). ``put_file``/``get_file`` are s3transfer's
``upload_file``/``download_file``, which retry a broken body themselves.
"""

from __future__ import annotations

import io
import os
import shutil
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from llmtrain.api.s3 import AMBIENT_VARIABLES, S3Options


class StorageError(RuntimeError):
    """An object store or directory could not be read or written; the message names it."""


class ObjectMissing(StorageError):
    """The object does not exist (a missing key or file, not an unreadable one)."""


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


class Store(ABC):
    """A directory-like view of a prefix. Keys are relative to the root given at construction."""

    uri: str

    # ------------------------------------------------------------ what each backend does

    @abstractmethod
    def get(self, key: str) -> bytes:
        """The object's bytes; :class:`ObjectMissing` when there is none."""

    @abstractmethod
    def get_range(self, key: str, start: int, length: int) -> bytes: ...

    @abstractmethod
    def put(self, key: str, data: bytes) -> str | None:
        """Write an object whole (a reader never sees part of it); returns the S3 ETag (None
        for local files)."""

    @abstractmethod
    def put_file(self, local: Path, key: str) -> None:
        """Copy a local file to ``key``, whole as :meth:`put` (large files in parts on S3)."""

    @abstractmethod
    def get_file(self, key: str, local: Path) -> None:
        """Copy ``key`` to a local file (a missing local file is FileNotFoundError, as it
        was for the checkpoint lineage's callers)."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def size(self, key: str) -> int: ...

    @abstractmethod
    def listing(self, prefix: str = "") -> dict[str, int]:
        """Every key under ``prefix`` (recursive) → its size in bytes."""

    @abstractmethod
    def list_dirs(self) -> list[str]:
        """The names of the root's immediate subdirectories (S3: common prefixes), sorted."""

    @abstractmethod
    def delete(self, keys: list[str]) -> None: ...

    # ------------------------------------------------------------ built on the above

    def get_bytes(self, key: str) -> bytes | None:
        """The object's bytes, or None when there is none."""
        try:
            return self.get(key)
        except ObjectMissing:
            return None

    def put_bytes(self, key: str, data: bytes) -> None:
        """:meth:`put` without the ETag."""
        self.put(key, data)

    def create(self, key: str, data: bytes) -> bool:
        """Write ``key`` only if it does not exist yet: True if this call created it, False if
        it was there (its bytes untouched). The backends make the check and the write one step
        (a local hard link, S3's ``If-None-Match: *``), so of two writers racing one wins; this
        fallback is check-then-write."""
        if self.exists(key):
            return False
        self.put_bytes(key, data)
        return True

    def list_keys(self, prefix: str = "") -> list[str]:
        """Every key under ``prefix`` (recursive, sorted)."""
        return sorted(self.listing(prefix))

    def sizes(self, name: str) -> dict[str, int]:
        """Size of every file in the directory ``name``, by name relative to it."""
        base = name.rstrip("/") + "/"
        return {key[len(base) :]: n for key, n in self.listing(base).items()}

    def delete_dir(self, name: str) -> None:
        """The directory ``name`` and everything in it."""
        self.delete(self.list_keys(name.rstrip("/") + "/"))

    def describe(self, key: str) -> str:
        return join(self.uri, key)


class LocalStore(Store):
    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser()
        self.uri = str(self.root)

    def _path(self, key: str) -> Path:
        return self.root / key if key else self.root

    def _missing(self, key: str) -> ObjectMissing:
        return ObjectMissing(f"{self.describe(key)} does not exist")

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError as e:
            raise self._missing(key) from e

    def get_range(self, key: str, start: int, length: int) -> bytes:
        try:
            with self._path(key).open("rb") as f:
                f.seek(start)
                return f.read(length)
        except FileNotFoundError as e:
            raise self._missing(key) from e

    def _replace(self, key: str, write: Callable[[Path], object]) -> None:
        # Write-then-rename: a reader never sees half a file under the final name.
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".part")
        write(tmp)
        os.replace(tmp, path)

    def put(self, key: str, data: bytes) -> str | None:
        self._replace(key, lambda tmp: tmp.write_bytes(data))
        return None

    def put_file(self, local: Path, key: str) -> None:
        self._replace(key, lambda tmp: shutil.copyfile(local, tmp))

    def create(self, key: str, data: bytes) -> bool:
        # Written whole under a private name, then linked: link() fails if the name exists.
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.{time.monotonic_ns()}.new")
        tmp.write_bytes(data)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)
        return True

    def get_file(self, key: str, local: Path) -> None:
        shutil.copyfile(self._path(key), local)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def size(self, key: str) -> int:
        try:
            return self._path(key).stat().st_size
        except FileNotFoundError as e:
            raise self._missing(key) from e

    def listing(self, prefix: str = "") -> dict[str, int]:
        base = self._path(prefix)
        if not base.exists():
            return {}
        if base.is_file():
            return {prefix: base.stat().st_size}
        return {str(p.relative_to(self.root)): p.stat().st_size for p in base.rglob("*") if p.is_file()}

    def list_dirs(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir())

    def delete(self, keys: list[str]) -> None:
        for k in keys:
            self._path(k).unlink(missing_ok=True)

    def delete_dir(self, name: str) -> None:
        # The directory itself goes too: an empty one would still be listed by list_dirs.
        shutil.rmtree(self._path(name), ignore_errors=True)


_CLIENTS: dict[tuple[Any, ...], Any] = {}


def s3_client(options: S3Options) -> Any:
    """A boto3 S3 client with standard retries at ``options``' endpoint and region; credentials
    from boto3's default chain.

    Clients are cached per process (creating one costs ~50 ms: a reader opens thousands of
    objects), keyed by the settings *and* the ambient environment, so a changed
    AWS_ACCESS_KEY_ID or AWS_ENDPOINT_URL is seen. Each client comes from its own boto3 Session:
    the default session caches credentials for the life of the process.
    """
    env = tuple(os.environ.get(k) for k in AMBIENT_VARIABLES)
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


_MISSING_CODES = ("NoSuchKey", "404", "NotFound")
_EXISTS_CODES = ("PreconditionFailed", "ConditionalRequestConflict")  # a conditional create lost
_DENIED_CODES = ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403")


class S3Store(Store):
    """``s3://bucket/prefix`` at ``options``' endpoint and region (a run passes spec.storage's);
    without options, the environment's (:meth:`S3Options.from_environment`)."""

    def __init__(self, uri: str, options: S3Options | None = None, client: Any = None) -> None:
        self.bucket, prefix = split_s3_uri(uri)
        self.prefix = prefix.strip("/")
        self.uri = f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"
        self.options = options or S3Options.from_environment()
        self.client = client if client is not None else s3_client(self.options)

    def _key(self, key: str) -> str:
        return join(self.prefix, key)

    def _wrap(self, e: Exception, key: str, action: str) -> StorageError:
        """``e`` as a :class:`StorageError` that names the object and what to check."""
        from botocore.exceptions import ClientError, NoCredentialsError

        what = self.describe(key)
        if isinstance(e, NoCredentialsError):
            return StorageError(
                f"no S3 credentials to {action} {what}: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY "
                "(on Kubernetes: spec.storage.secretRef)"
            )
        if not isinstance(e, ClientError):
            return StorageError(f"cannot {action} {what}: {e}")
        code = e.response.get("Error", {}).get("Code", "")
        if code == "NoSuchBucket":
            return StorageError(
                f"bucket {self.bucket!r} does not exist ({action} {what}); check the URI or "
                "spec.storage.endpoint"
            )
        if code in _MISSING_CODES:
            return ObjectMissing(f"{what} does not exist")
        if code in _DENIED_CODES:
            return StorageError(
                f"access denied to {action} {what} ({code}): check the credentials in spec.storage.secretRef"
            )
        return StorageError(f"S3 error {code or e} while trying to {action} {what}")

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

    def put_bytes(self, key: str, data: bytes) -> None:
        # One PUT, no HEAD: a small object whose ETag nobody reads (a checkpoint's marker).
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)
        except Exception as e:
            raise self._wrap(e, key, "write") from e

    def create(self, key: str, data: bytes) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, IfNoneMatch="*")
        except ClientError as e:
            # 412: the object exists; 409: a concurrent conditional write to it is in flight.
            if e.response.get("Error", {}).get("Code") in _EXISTS_CODES:
                return False
            raise self._wrap(e, key, "write") from e
        except Exception as e:
            raise self._wrap(e, key, "write") from e
        return True

    def put_file(self, local: Path, key: str) -> None:
        try:
            self.client.upload_file(str(local), self.bucket, self._key(key))
        except Exception as e:
            raise self._wrap(e, key, "write") from e

    def get_file(self, key: str, local: Path) -> None:
        try:
            self.client.download_file(self.bucket, self._key(key), str(local))
        except Exception as e:
            raise self._wrap(e, key, "read") from e

    def _head(self, key: str) -> dict[str, Any]:
        try:
            return dict(self.client.head_object(Bucket=self.bucket, Key=self._key(key)))
        except Exception as e:
            raise self._wrap(e, key, "read") from e

    def exists(self, key: str) -> bool:
        try:
            self._head(key)
        except ObjectMissing:
            return False
        return True

    def size(self, key: str) -> int:
        return int(self._head(key)["ContentLength"])

    def _pages(self, full: str, what: str, delimiter: str | None = None) -> Iterator[dict[str, Any]]:
        """list_objects_v2 pages (1000 keys each) under the bucket's key prefix ``full``,
        until complete; errors name ``what`` (relative to the store)."""
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": full}
        if delimiter:
            kwargs["Delimiter"] = delimiter
        try:
            yield from self.client.get_paginator("list_objects_v2").paginate(**kwargs)
        except Exception as e:
            raise self._wrap(e, what, "list") from e

    def iter_objects(self, prefix: str = "") -> Iterator[dict[str, Any]]:
        """The listed objects (``Key`` is the full key) under ``prefix``."""
        full = self._key(prefix) if prefix else (self.prefix + "/" if self.prefix else "")
        for page in self._pages(full, prefix):
            yield from page.get("Contents", [])

    def listing(self, prefix: str = "") -> dict[str, int]:
        cut = len(self.prefix) + 1 if self.prefix else 0
        return {o["Key"][cut:]: int(o["Size"]) for o in self.iter_objects(prefix)}

    def list_dirs(self) -> list[str]:
        base = f"{self.prefix}/" if self.prefix else ""
        return sorted(
            cp["Prefix"][len(base) :].rstrip("/")
            for page in self._pages(base, "", "/")
            for cp in page.get("CommonPrefixes", [])
        )

    def delete(self, keys: list[str]) -> None:
        for i in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
            batch = [{"Key": self._key(k)} for k in keys[i : i + 1000]]
            try:
                self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
            except Exception as e:
                raise self._wrap(e, keys[i], "delete") from e


def open_store(uri: str, options: S3Options | None = None) -> Store:
    """``s3://…`` → :class:`S3Store` (with ``options``); anything else is a local directory."""
    if uri.startswith("s3://"):
        return S3Store(uri, options)
    if "://" in uri:
        raise StorageError(f"unsupported URI scheme in {uri!r}: use s3://bucket/prefix or a local path")
    return LocalStore(uri)
