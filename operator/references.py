"""The Secrets and ConfigMaps a job's pods would need, and which of them are missing.

A pod that references a Secret or ConfigMap that does not exist is made, scheduled, and then
sits in ``CreateContainerConfigError`` on its node (a volume's: ``ContainerCreating`` for
ever) while the job's status says nothing useful. The reconciler asks :func:`first_missing`
before it makes any pod instead: a missing object (or key) is named in the job's condition
with the spec field that references it, no pod is made, and the next resync looks again,
so creating the object lets the job go on without a new apply.

The model server's Deployment is held back the same way (:func:`serve_references`): a
Deployment whose pods cannot start would only say so in its pods' events.

:func:`references` and :func:`serve_references` are pure (the spec → what it references);
:func:`first_missing` reads each object once through a getter (``KubeApi.get``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from llmtrain.api.job import LLMTrainingJob
from llmtrain.api.spec import SecretRef
from llmtrain.api.status import Reason

Getter = Callable[[str, str, str], Mapping[str, Any] | None]  # (kind, namespace, name) → object


@dataclass(frozen=True)
class Reference:
    """One object the pods read: its kind and name, the spec field naming it, and the keys
    read from it (empty: the whole object, as an image pull secret or a volume)."""

    kind: str  # Secret | ConfigMap
    name: str
    field: str  # e.g. spec.storage.secretRef
    keys: tuple[str, ...] = ()


@dataclass(frozen=True)
class Missing:
    """A reference that cannot be met: the object is absent, or lacks ``key``."""

    ref: Reference
    key: str | None = None

    @property
    def reason(self) -> Reason:
        return Reason.SecretNotFound if self.ref.kind == "Secret" else Reason.ConfigMapNotFound

    def message(self, namespace: str, held: str = "no Ray pods are made") -> str:
        """What is missing and what waits for it (``held``: what the operator does not make)."""
        what = f'{self.ref.kind} "{self.ref.name}" ({self.ref.field})'
        problem = (
            f'has no key "{self.key}"' if self.key is not None else f'not found in namespace "{namespace}"'
        )
        return (
            f"{what} {problem}: {held} until it "
            f"{'has it' if self.key is not None else 'exists'}; the job goes on by itself once it does"
        )


def _storage_reference(ref: SecretRef | None, field: str) -> list[Reference]:
    if ref is None:
        return []
    return [Reference("Secret", ref.name, field, (ref.access_key_id_key, ref.secret_access_key_key))]


def references(job: LLMTrainingJob) -> list[Reference]:
    """Every Secret and ConfigMap the job's Ray pods reference, in spec order: storage
    credentials, image pull secrets, ``env[].valueFrom``, and the volumes' secret / configMap /
    projected sources (unless marked ``optional``). The operator's own children (the Ray
    token Secret, the spec ConfigMap) are not among them: it makes those itself."""
    out = _storage_reference(job.spec.storage.secret_ref, "spec.storage.secretRef")
    out += _pod_references(job)
    for i, v in enumerate(job.spec.resources.volumes):
        out.extend(
            _volume_references(v.model_dump(by_alias=True, exclude_none=True), f"spec.resources.volumes[{i}]")
        )
    return out


def serve_references(job: LLMTrainingJob) -> list[Reference]:
    """Every Secret and ConfigMap the model server's pods reference (they mount none of
    spec.resources.volumes): the API key, the storage credentials (spec.serve.storageSecretRef,
    else spec.storage.secretRef), image pull secrets and ``env[].valueFrom``."""
    serve = job.spec.serve
    out: list[Reference] = []
    if serve is not None and serve.api_key_secret_ref is not None:
        key = serve.api_key_secret_ref
        out.append(Reference("Secret", key.name, "spec.serve.apiKeySecretRef", (key.key,)))
    if serve is not None and serve.storage_secret_ref is not None:
        out += _storage_reference(serve.storage_secret_ref, "spec.serve.storageSecretRef")
    else:
        out += _storage_reference(job.spec.storage.secret_ref, "spec.storage.secretRef")
    return out + _pod_references(job)


def _pod_references(job: LLMTrainingJob) -> list[Reference]:
    """What every pod of the job references: image pull secrets, ``env[].valueFrom``."""
    res = job.spec.resources
    out: list[Reference] = []
    for i, s in enumerate(res.image_pull_secrets):
        out.append(Reference("Secret", s.name, f"spec.resources.imagePullSecrets[{i}]"))
    for i, e in enumerate(res.env):
        src = e.value_from
        if src is None:
            continue
        field = f"spec.resources.env[{i}].valueFrom"
        if src.secret_key_ref is not None:
            k = src.secret_key_ref
            out.append(Reference("Secret", k.name, f"{field}.secretKeyRef", (k.key,)))
        elif src.config_map_key_ref is not None:
            k = src.config_map_key_ref
            out.append(Reference("ConfigMap", k.name, f"{field}.configMapKeyRef", (k.key,)))
    return out


def _volume_references(volume: Mapping[str, Any], field: str) -> Iterator[Reference]:
    """A core/v1 Volume's Secret and ConfigMap sources (passed through as written, so read
    defensively): ``secret.secretName``, ``configMap.name``, ``projected.sources[]``."""

    def source(kind: str, src: Any, name_key: str, at: str) -> Iterator[Reference]:
        if not isinstance(src, Mapping) or src.get("optional") is True:
            return
        name = src.get(name_key)
        if isinstance(name, str) and name:
            raw = src.get("items")
            items: list[Any] = raw if isinstance(raw, list) else []
            keys = tuple(str(it["key"]) for it in items if isinstance(it, Mapping) and "key" in it)
            yield Reference(kind, name, f"{at}.{name_key}", keys)

    yield from source("Secret", volume.get("secret"), "secretName", f"{field}.secret")
    yield from source("ConfigMap", volume.get("configMap"), "name", f"{field}.configMap")
    projected = volume.get("projected")
    sources = projected.get("sources") if isinstance(projected, Mapping) else None
    for j, s in enumerate(sources if isinstance(sources, list) else []):
        if isinstance(s, Mapping):
            at = f"{field}.projected.sources[{j}]"
            yield from source("Secret", s.get("secret"), "name", f"{at}.secret")
            yield from source("ConfigMap", s.get("configMap"), "name", f"{at}.configMap")


def _keys(obj: Mapping[str, Any]) -> set[str]:
    """The keys a Secret or ConfigMap holds (``data``, and ConfigMap ``binaryData``)."""
    out: set[str] = set()
    for section in ("data", "binaryData", "stringData"):
        got = obj.get(section)
        if isinstance(got, Mapping):
            out |= set(got)
    return out


def first_missing(get: Getter, namespace: str, refs: list[Reference]) -> Missing | None:
    """The first reference the namespace cannot meet, or None; each object read once."""
    seen: dict[tuple[str, str], Mapping[str, Any] | None] = {}
    for ref in refs:
        key = (ref.kind, ref.name)
        if key not in seen:
            seen[key] = get(ref.kind, namespace, ref.name)
        obj = seen[key]
        if obj is None:
            return Missing(ref)
        have = _keys(obj)
        for k in ref.keys:
            if k not in have:
                return Missing(ref, k)
    return None
