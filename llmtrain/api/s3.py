"""Where S3 is and how a process reaches it: the one place that turns ``spec.storage`` (or a
command's ``--endpoint``, or the environment) into :class:`S3Options`.

Three sources, one per kind of caller:

* a run (:meth:`S3Options.from_spec`, and :meth:`S3Options.from_train` for a worker, which gets
  spec.storage inside its ``TrainConfig``): spec.storage's endpoint and region and nothing from
  the environment, so every pod of a run reaches the same S3 whatever its environment says;
* a command run by hand, or the model server (:meth:`S3Options.from_environment`):
  ``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL`` and ``AWS_DEFAULT_REGION``, what the pods get
  from the operator and what boto3's own tools read;
* a command with ``--endpoint`` and ``--job`` (:func:`command_s3_options`): the flag, else the
  job's spec.storage, else the environment.

Credentials are never options: boto3's default chain finds them (``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY`` — on Kubernetes set from ``spec.storage.secretRef`` by
:func:`storage_env`, the variables the operator gives every pod — or the pod's role).
:data:`AMBIENT_VARIABLES` names the variables a client depends on, so a cached client is not
reused after one of them changed.

Standard library only: the training workers import this where pydantic and boto3 are absent.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover - typing only: pydantic is absent where workers run
    from llmtrain.api.config import TrainConfig
    from llmtrain.api.spec import StorageSpec

DEFAULT_REGION = "us-east-1"
# Objects above this are uploaded in parts (S3's minimum part size is 5 MiB).
DEFAULT_MULTIPART_THRESHOLD = 64 * 1024 * 1024
DEFAULT_MULTIPART_CHUNK = 16 * 1024 * 1024

# The environment boto3 reads that decides which server and which identity a client gets:
# credentials, and the endpoint boto3 takes by itself when none is given.
AMBIENT_VARIABLES = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_PROFILE",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
)


@dataclass(frozen=True)
class S3Options:
    """How to reach S3. ``endpoint`` None: boto3 picks it (AWS for the region, or
    ``AWS_ENDPOINT_URL`` from the environment)."""

    endpoint: str | None = None
    region: str = DEFAULT_REGION
    multipart_threshold: int = DEFAULT_MULTIPART_THRESHOLD
    multipart_chunk: int = DEFAULT_MULTIPART_CHUNK
    # Retries after the first try (botocore's retries.max_attempts, despite its name; the
    # body re-reads of a broken GET follow the same count).
    max_attempts: int = 8

    @classmethod
    def from_spec(cls, storage: StorageSpec) -> S3Options:
        """A run's: spec.storage's endpoint and region; credentials stay ambient (secretRef)."""
        return cls(endpoint=storage.endpoint, region=storage.region)

    @classmethod
    def from_train(cls, train: TrainConfig) -> S3Options:
        """A training worker's: spec.storage, carried to the workers in the ``TrainConfig``."""
        return cls(endpoint=train.storage_endpoint, region=train.storage_region)

    @classmethod
    def from_environment(
        cls, endpoint: str | None = None, environ: Mapping[str, str] | None = None
    ) -> S3Options:
        """A command's or the model server's: ``endpoint`` (a ``--endpoint`` flag), else
        ``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL``; the region from ``AWS_DEFAULT_REGION``.

        The endpoint is read here rather than left to boto3 so that it gets path-style
        addressing, which S3-compatible servers need.
        """
        env = os.environ if environ is None else environ
        if endpoint is None:
            endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
        return cls(endpoint=endpoint, region=env.get("AWS_DEFAULT_REGION", DEFAULT_REGION))


def command_s3_options(endpoint: str | None, storage: StorageSpec | None = None) -> S3Options:
    """A command's settings: ``--endpoint`` (region from the environment), else the ``--job``'s
    spec.storage (its endpoint, else the environment's), else the environment."""
    if endpoint is None and storage is not None:
        given = storage.endpoint
        ambient = S3Options.from_environment().endpoint
        return S3Options(endpoint=given if given is not None else ambient, region=storage.region)
    return S3Options.from_environment(endpoint)


def storage_env(storage: StorageSpec) -> list[dict[str, Any]]:
    """The container environment (Kubernetes ``env`` entries) the operator gives a job's pods:
    spec.storage's region and endpoint, and the credentials from spec.storage.secretRef."""
    env: list[dict[str, Any]] = [{"name": "AWS_REGION", "value": storage.region}]
    if storage.endpoint:
        env.append({"name": "AWS_ENDPOINT_URL", "value": storage.endpoint})
    ref = storage.secret_ref
    if ref is not None:
        env += [
            {
                "name": "AWS_ACCESS_KEY_ID",
                "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.access_key_id_key}},
            },
            {
                "name": "AWS_SECRET_ACCESS_KEY",
                "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.secret_access_key_key}},
            },
        ]
    return env
