"""Manifests for tests: a maximal valid job and the invalid variants derived from it.

The invalid cases are shared by ``tests/unit/test_validate.py`` (``llmtrain validate``)
and the apiserver parity test (``kubectl apply --dry-run=server``), so both judge the
same manifests. Enum, bound and pattern cases are generated from the CRD schema itself,
so a new field gets its cases without anyone writing them.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Any

from llmtrain.api.job import MAX_NAME_LENGTH
from llmtrain.api.validate import root_schema

BASE: dict[str, Any] = {
    "apiVersion": "llmtrain.dev/v1alpha1",
    "kind": "LLMTrainingJob",
    "metadata": {"name": "full"},
    "spec": {
        "data": {
            "sources": [
                {
                    "name": "web",
                    "weight": 0.5,
                    "s3": {"uri": "s3://corpus/web/", "format": "jsonl", "field": "text"},
                },
                {"name": "books", "weight": 0.2, "local": {"glob": "/data/*.txt", "textUnit": "paragraph"}},
                {
                    "name": "hf",
                    "weight": 0.2,
                    "huggingface": {"builder": "json", "dataFiles": ["/data/a.jsonl"], "split": "train"},
                },
                {"name": "stdlib", "weight": 0.1, "pythonStdlib": {"includeTests": False}},
            ],
            "preprocessing": {
                "normalization": "NFKC",
                "removeControlChars": True,
                "normalizeWhitespace": True,
                "minChars": 10,
                "maxChars": 100000,
                "dedup": "exact",
            },
            "tokenizer": {
                "train": {"vocabSize": 8192, "specialTokens": ["<|endoftext|>"], "minFrequency": 2}
            },
            "outputUri": "s3://artifacts/job/data",
            "validationFraction": 0.01,
            "shardMaxTokens": 1000000,
            "seed": 1,
        },
        "model": {
            "architecture": {
                "layers": 4,
                "dModel": 256,
                "heads": 8,
                "kvHeads": 4,
                "contextLength": 512,
                "ropeTheta": 50000,
                "normEps": 1e-5,
                "dropout": 0.1,
                "tieEmbeddings": True,
                "ffnHiddenSize": 704,
                "multipleOf": 64,
                "ffnDimMultiplier": 1.0,
                "vocabMultipleOf": 64,
            },
            "init": {"random": {"seed": 3, "std": 0.02}},
        },
        "training": {
            "optimizer": {
                "type": "adamw",
                "lr": 0.001,
                "weightDecay": 0.1,
                "beta1": 0.9,
                "beta2": 0.95,
                "eps": 1e-8,
            },
            "schedule": {"warmupSteps": 10, "decay": "cosine", "minLr": 0.0001},
            "batch": {"globalBatchSize": 32, "microBatchSize": 4},
            "duration": {"maxSteps": 100},
            "precision": "bf16",
            "fsdp": {"reshardAfterForward": True, "activationCheckpointing": False},
            "compile": False,
            "gradClip": 1.0,
            "seed": 0,
            "logEverySteps": 10,
        },
        "validation": {"everySteps": 50, "batches": 4},
        "checkpoint": {"uri": "s3://artifacts/job/ckpt", "everySteps": 50, "keepLast": 2},
        "export": {"uri": "s3://artifacts/job/model", "format": "hf-llama-safetensors"},
        "storage": {"endpoint": "http://127.0.0.1:9000", "region": "us-east-1", "secretRef": {"name": "s3"}},
        "metrics": {"enabled": True, "port": 9400},
        "resources": {
            "workers": 2,
            "gpusPerWorker": 1,
            "worker": {"cpu": 8, "memory": "64Gi"},
            "head": {"cpu": "2", "memory": "8Gi"},
            "image": "ghcr.io/llmtrain/llmtrain:0.1.0",
            "imagePullSecrets": [{"name": "regcred"}],
            "serviceAccountName": "trainer",
            "env": [
                {"name": "NCCL_DEBUG", "value": "WARN"},
                {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}},
            ],
            "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "data"}}],
            "volumeMounts": [{"name": "data", "mountPath": "/data", "readOnly": True}],
            "podLabels": {"team": "research"},
            "podAnnotations": {"note": "x"},
            "shmSize": "16Gi",
            "nodeSelector": {"llmtrain.dev/pool": "gpu"},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            "affinity": {"nodeAffinity": {}},
            "priorityClassName": "high",
            "queueName": "team-a",
        },
        "suspend": False,
        "backoffLimit": 3,
        "activeDeadlineSeconds": 86400,
        "preRunningDeadlineSeconds": 600,
        "ttlSecondsAfterFinished": 3600,
        "serve": {
            "replicas": 1,
            "maxWaiting": 64,
            "apiKeySecretRef": {"name": "serve-key", "key": "token"},
            "storageSecretRef": {"name": "s3-read-only"},
        },
    },
}


def gpu_job(name: str, **over: Any) -> dict[str, Any]:
    """A small valid job on the GPU pool (3 workers × 8 GPUs by default) for operator tests.

    ``resources=`` is merged into the default resources; other keywords are spec fields.
    """
    resources = {
        "workers": 3,
        "gpusPerWorker": 8,
        "worker": {"cpu": "8", "memory": "64Gi"},
        "nodeSelector": {"llmtrain.dev/pool": "gpu"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        **over.pop("resources", {}),
    }
    return {
        "apiVersion": "llmtrain.dev/v1alpha1",
        "kind": "LLMTrainingJob",
        "metadata": {"name": name},
        "spec": {
            "data": {
                "sources": [{"name": "s", "pythonStdlib": {}}],
                "tokenizer": {"train": {"vocabSize": 512}},
                "outputUri": "s3://bucket/data",
            },
            "model": {
                "architecture": {"layers": 2, "dModel": 64, "heads": 4, "contextLength": 64},
                "init": {"random": {"seed": 0}},
            },
            "training": {
                "optimizer": {"type": "adamw", "lr": 0.001},
                "schedule": {"warmupSteps": 1},
                # divisible by microBatchSize × workers for 1, 2 and 3 workers
                "batch": {"globalBatchSize": 24, "microBatchSize": 4},
                "duration": {"maxSteps": 10},
            },
            "resources": resources,
            **over,
        },
    }


@dataclass(frozen=True)
class Case:
    id: str
    manifest: dict[str, Any]
    path: str  # the field path both validators must report
    old: dict[str, Any] | None = None  # for transition (update) rules

    @property
    def name(self) -> str:
        return str(self.manifest["metadata"]["name"])


def base() -> dict[str, Any]:
    return copy.deepcopy(BASE)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:50] or "case"


def _named(doc: dict[str, Any], case_id: str) -> dict[str, Any]:
    doc["metadata"]["name"] = _slug(case_id)
    return doc


def _get_container(doc: Any, parts: list[str | int]) -> Any:
    node = doc
    for p in parts:
        node = node[p]
    return node


def _leaf_locations(schema: dict[str, Any], value: Any, parts: list[str | int]):  # type: ignore[no-untyped-def]
    """(schema node, concrete path parts) for every field the BASE manifest sets."""
    if isinstance(value, dict) and "properties" in schema:
        for key, sub in schema["properties"].items():
            if key in value:
                yield sub, [*parts, key]
                yield from _leaf_locations(sub, value[key], [*parts, key])
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            yield from _leaf_locations(schema["items"], item, [*parts, i])


def path_string(parts: list[str | int]) -> str:
    out = ""
    for p in parts:
        out = f"{out}[{p}]" if isinstance(p, int) else (f"{out}.{p}" if out else str(p))
    return out


def _mutated(parts: list[str | int], value: Any, case_id: str) -> dict[str, Any]:
    doc = base()
    _get_container(doc, parts[:-1])[parts[-1]] = value
    return _named(doc, case_id)


def schema_cases() -> list[Case]:
    """One case per enum, per numeric bound and per pattern in the schema (where BASE sets it)."""
    cases: list[Case] = []
    spec_schema = root_schema()["properties"]["spec"]
    for node, rel in _leaf_locations(spec_schema, BASE["spec"], []):
        parts: list[str | int] = ["spec", *rel]
        where = path_string(parts)
        if "enum" in node:
            cid = f"enum {where}"
            cases.append(Case(cid, _mutated(parts, "not-a-choice", cid), where))
        kind = node.get("type")
        if kind in ("integer", "number"):
            step = 1 if kind == "integer" else 0.5
            if "minimum" in node:
                bad = node["minimum"] if node.get("exclusiveMinimum") else node["minimum"] - step
                cid = f"min {where}"
                cases.append(Case(cid, _mutated(parts, bad, cid), where))
            if "maximum" in node:
                bad = node["maximum"] if node.get("exclusiveMaximum") else node["maximum"] + step
                if kind == "integer" and bad > 2**53:
                    continue
                cid = f"max {where}"
                cases.append(Case(cid, _mutated(parts, bad, cid), where))
        if kind == "string" and "pattern" in node:
            # "Not Valid!" is a fine local path to a URI field's pattern: a mistyped s3 URI is not.
            bad = next(v for v in ("Not Valid!", "s3:/Not Valid") if not re.match(node["pattern"], v))
            cid = f"pattern {where}"
            cases.append(Case(cid, _mutated(parts, bad, cid), where))
    return cases


def _case(case_id: str, path: str, edit: Any, old_edit: Any = None) -> Case:
    doc = _named(base(), case_id)
    edit(doc["spec"])
    old = None
    if old_edit is not None:
        old = _named(base(), case_id)
        old_edit(old["spec"])
    return Case(case_id, doc, path, old)


def _set(path: str, value: Any) -> Any:
    def edit(spec: dict[str, Any]) -> None:
        parts: list[str | int] = [int(p) if p.isdigit() else p for p in re.split(r"\.|\[|\]\.?", path) if p]
        _get_container(spec, parts[:-1])[parts[-1]] = value

    return edit


def _del(path: str) -> Any:
    def edit(spec: dict[str, Any]) -> None:
        parts: list[str | int] = [int(p) if p.isdigit() else p for p in re.split(r"\.|\[|\]\.?", path) if p]
        del _get_container(spec, parts[:-1])[parts[-1]]

    return edit


def _all(*edits: Any) -> Any:
    def edit(spec: dict[str, Any]) -> None:
        for e in edits:
            e(spec)

    return edit


def name_too_long_case() -> Case:
    """metadata.name one character over the limit (the apiserver alone allows 253 for a CR)."""
    doc = base()
    doc["metadata"]["name"] = "n" * (MAX_NAME_LENGTH + 1)
    return Case("name too long", doc, "metadata.name")


def rule_cases() -> list[Case]:
    """One case per CEL rule, per exclusive choice and per inline-secret attempt."""
    a = "spec.model.architecture"
    return [
        # CEL: architecture
        _case(
            "dModel divisible by heads",
            f"{a}.dModel",
            _all(_set("model.architecture.dModel", 250), _set("model.architecture.heads", 8)),
        ),
        _case("heads divisible by kvHeads", f"{a}.kvHeads", _set("model.architecture.kvHeads", 3)),
        _case(
            "head dim even",
            f"{a}.dModel",
            _all(
                _set("model.architecture.dModel", 24),
                _set("model.architecture.heads", 8),
                _set("model.architecture.kvHeads", 4),
            ),
        ),
        # CEL: batch and duration
        _case(
            "global batch divisible",
            "spec.training.batch.globalBatchSize",
            _set("training.batch.globalBatchSize", 36),
        ),
        _case(
            "global batch at least micro",
            "spec.training.batch.globalBatchSize",
            _all(_set("training.batch.globalBatchSize", 2), _set("training.batch.microBatchSize", 4)),
        ),
        _case(
            "warmup shorter than maxSteps",
            "spec.training.schedule.warmupSteps",
            _set("training.schedule.warmupSteps", 100),
        ),
        _case(
            "warmup shorter than maxTokens",
            "spec.training.schedule.warmupSteps",
            _all(_del("training.duration.maxSteps"), _set("training.duration.maxTokens", 32 * 512 * 10)),
        ),
        _case(
            "maxChars at least minChars",
            "spec.data.preprocessing.maxChars",
            _set("data.preprocessing.maxChars", 5),
        ),
        _case(
            "nesterov needs sgd",
            "spec.training.optimizer.nesterov",
            _set("training.optimizer.nesterov", True),
        ),
        # CEL: data sources
        _case("at least one source", "spec.data.sources", _set("data.sources", [])),
        # Found by the fuzzer (tests/integration/test_fuzz_parity.py): a null list is pruned by
        # the apiserver, then missing; llmtrain validate's CEL layer once crashed on it.
        _case("null sources", "spec.data.sources", _set("data.sources", None)),
        _case("unique source names", "spec.data.sources", _set("data.sources[1].name", "web")),
        _case("weights on all or none", "spec.data.sources", _del("data.sources[0].weight")),
        _case(
            "validation source names",
            "spec.data.validationSources",
            _set("data.validationSources", [{"name": "web", "local": {"glob": "/x/*.txt"}}]),
        ),
        _case(
            "validation source exactly one",
            "spec.data.validationSources[0]",
            _set(
                "data.validationSources",
                [{"name": "held", "local": {"glob": "/x/*.txt"}, "pythonStdlib": {}}],
            ),
        ),
        _case(
            "validation sources take no weight",
            "spec.data.validationSources",
            _set("data.validationSources", [{"name": "held", "weight": 1, "local": {"glob": "/x/*.txt"}}]),
        ),
        _case(
            "task on all sources or none",
            "spec.data.sources",
            _set("data.sources[0].task", {"format": "chat"}),
        ),
        _case(
            "task records from jsonl or parquet",
            "spec.data.sources[0].task",
            _all(
                _set(
                    "data.sources", [{"name": "t", "local": {"glob": "/x/*.txt"}, "task": {"format": "chat"}}]
                ),
            ),
        ),
        _case(
            "validation task records from jsonl or parquet",
            "spec.data.validationSources[0].task",
            _all(
                _set(
                    "data.sources",
                    [
                        {
                            "name": "t",
                            "local": {"glob": "/x/*.jsonl", "format": "jsonl"},
                            "task": {"format": "chat"},
                        }
                    ],
                ),
                _set(
                    "data.validationSources",
                    [{"name": "v", "local": {"glob": "/x/*.txt"}, "task": {"format": "chat"}}],
                ),
            ),
        ),
        # Exclusive choices
        _case("duration exactly one (two)", "spec.training.duration", _set("training.duration.epochs", 2)),
        _case("duration exactly one (none)", "spec.training.duration", _del("training.duration.maxSteps")),
        _case(
            "source exactly one (two)",
            "spec.data.sources[0]",
            _set("data.sources[0].local", {"glob": "/x/*.txt"}),
        ),
        _case("source exactly one (none)", "spec.data.sources[0]", _del("data.sources[0].s3")),
        _case(
            "tokenizer exactly one",
            "spec.data.tokenizer",
            _set("data.tokenizer.load", {"uri": "s3://artifacts/tokenizer.json"}),
        ),
        _case(
            "init at most one", "spec.model.init", _set("model.init.pretrained", {"uri": "s3://artifacts/m"})
        ),
        _case(
            "env value or valueFrom",
            "spec.resources.env[0]",
            _set("resources.env[0].valueFrom", {"configMapKeyRef": {"name": "c", "key": "k"}}),
        ),
        _case(
            "env source exactly one",
            "spec.resources.env[1].valueFrom",
            _set("resources.env[1].valueFrom.configMapKeyRef", {"name": "c", "key": "k"}),
        ),
        # Quantities (int-or-string: the pattern lives in CEL)
        _case("worker cpu quantity", "spec.resources.worker.cpu", _set("resources.worker.cpu", "lots")),
        _case(
            "worker memory quantity", "spec.resources.worker.memory", _set("resources.worker.memory", "64 GB")
        ),
        _case("head cpu quantity", "spec.resources.head.cpu", _set("resources.head.cpu", "two")),
        _case("head memory quantity", "spec.resources.head.memory", _set("resources.head.memory", "8 GB")),
        _case("shm quantity", "spec.resources.shmSize", _set("resources.shmSize", "-1Gi")),
        _case(
            "serve cpu quantity", "spec.serve.resources.cpu", _set("serve", {"resources": {"cpu": "lots"}})
        ),
        _case(
            "serve memory quantity",
            "spec.serve.resources.memory",
            _set("serve", {"resources": {"memory": "4 GB"}}),
        ),
        _case("serve needs export", "spec.serve", _all(_del("export"), _set("serve", {"replicas": 1}))),
        _case(
            "validation task needs task data",
            "spec.validation.task",
            _set("validation.task", {"records": 10, "checker": "identifier"}),
        ),
        _case(
            "valTaskScore needs validation task",
            "spec.tuning.metric",
            with_tuning(metric="valTaskScore"),
        ),
        _case("lora needs a base", "spec.training.lora", _set("training.lora", {"rank": 4})),
        # Inline secrets
        _case(
            "inline secret env AWS",
            "spec.resources.env[0].value",
            _set("resources.env[0].name", "AWS_SECRET_ACCESS_KEY"),
        ),
        _case(
            "inline secret env HF", "spec.resources.env[0].value", _set("resources.env[0].name", "HF_TOKEN")
        ),
        _case(
            "inline storage secretAccessKey",
            "spec.storage.secretAccessKey",
            _set("storage.secretAccessKey", "abc"),
        ),
        _case("inline storage accessKeyId", "spec.storage.accessKeyId", _set("storage.accessKeyId", "AKIA")),
        # Found by trying the product as a new user (issue 13): a mistyped s3 URI was taken for
        # a local path (a directory "s3:" on the pod's disk) by both validators.
        _case("s3 uri with one slash", "spec.checkpoint.uri", _set("checkpoint.uri", "s3:/artifacts/ckpt")),
        _case("s3 uri without bucket", "spec.export.uri", _set("export.uri", "s3:///model")),
        _case("uri of another scheme", "spec.data.outputUri", _set("data.outputUri", "gs://data/x")),
        _case(
            "s3 uri with one slash in init",
            "spec.model.init.checkpoint.uri",
            _all(_del("model.init.random"), _set("model.init.checkpoint", {"uri": "s3:/artifacts/ckpt"})),
        ),
        _case("minLr above lr", "spec.training.schedule.minLr", _set("training.schedule.minLr", 0.002)),
        # A whole number (lr: 1) is an int on the wire: both validators compare it with a double.
        _case(
            "minLr above an integer lr",
            "spec.training.schedule.minLr",
            _all(_set("training.optimizer.lr", 1), _set("training.schedule.minLr", 1.5)),
        ),
        name_too_long_case(),
        # Transition rules (update)
        _case(
            "architecture immutable",
            "spec.model.architecture",
            lambda s: None,
            _set("model.architecture.layers", 8),
        ),
        _case("data immutable", "spec.data", lambda s: None, _set("data.seed", 7)),
        _case(
            "batch immutable", "spec.training.batch", lambda s: None, _set("training.batch.microBatchSize", 8)
        ),
        _case("workers immutable", "spec.resources.workers", lambda s: None, _set("resources.workers", 4)),
        *tuning_cases(),
    ]


# A valid search on BASE (2 workers): the tuning cases below each break one rule of it.
TUNING: dict[str, Any] = {
    "search": "bayesian",
    "metric": "valLoss",
    "numTrials": 6,
    "initialRandomTrials": 3,
    "maxConcurrentTrials": 2,
    "workersPerTrial": 1,
    "trialBudget": {"maxSteps": 20},
    "earlyStopping": {"gracePeriodSteps": 10, "reductionFactor": 2},
    "seed": 1,
    "space": {
        "training.optimizer.lr": {"logUniform": [1e-4, 3e-3]},
        "training.batch.microBatchSize": {"choice": [2, 4]},
        "training.optimizer.weightDecay": {"uniform": [0, 0.2]},
    },
}


def with_tuning(**changes: Any) -> Any:
    """An edit that sets spec.tuning to TUNING with ``changes`` (None removes a key) and
    ``space_*`` keyword arguments merged into its space."""

    def edit(spec: dict[str, Any]) -> None:
        tuning = copy.deepcopy(TUNING)
        for k, v in changes.items():
            if k == "space":
                tuning["space"].update(v)
            elif v is None:
                tuning.pop(k, None)
            else:
                tuning[k] = v
        spec["tuning"] = tuning

    return edit


def tuning_cases() -> list[Case]:
    """spec.tuning: the search space and the search's own rules (all CEL: the map's keys and
    values are checked on spec.tuning, which is where both validators point)."""
    t = "spec.tuning"
    return [
        _case("tune unknown path", f"{t}.space", with_tuning(space={"training.foo": {"choice": [1]}})),
        _case("tune forbidden path", f"{t}.space", with_tuning(space={"data.seed": {"choice": [1]}})),
        _case("tune empty choice", f"{t}.space", with_tuning(space={"training.seed": {"choice": []}})),
        _case(
            "tune low not below high",
            f"{t}.space",
            with_tuning(space={"training.gradClip": {"uniform": [1, 1]}}),
        ),
        _case(
            "tune logUniform low zero",
            f"{t}.space",
            with_tuning(space={"training.optimizer.lr": {"logUniform": [0, 1e-3]}}),
        ),
        _case(
            "tune two distributions",
            f"{t}.space",
            with_tuning(space={"training.gradClip": {"choice": [1], "uniform": [0, 1]}}),
        ),
        _case(
            "tune continuous under grid",
            f"{t}.space",
            with_tuning(search="grid", numTrials=None, initialRandomTrials=None),
        ),
        _case(
            "tune numTrials with grid",
            f"{t}.numTrials",
            with_tuning(
                search="grid",
                initialRandomTrials=None,
                space={
                    "training.optimizer.lr": {"choice": [1e-3]},
                    "training.optimizer.weightDecay": {"choice": [0]},
                },
            ),
        ),
        _case(
            "tune random needs numTrials",
            f"{t}.numTrials",
            with_tuning(search="random", numTrials=None, initialRandomTrials=None),
        ),
        _case(
            "tune initialRandomTrials not below numTrials",
            f"{t}.initialRandomTrials",
            with_tuning(initialRandomTrials=6),
        ),
        _case(
            "tune initialRandomTrials only bayesian", f"{t}.initialRandomTrials", with_tuning(search="random")
        ),
        _case(
            "tune concurrency times workers over workers",
            f"{t}.maxConcurrentTrials",
            with_tuning(maxConcurrentTrials=2, workersPerTrial=2),
        ),
        _case("tune budget exactly one", f"{t}.trialBudget", with_tuning(trialBudget={})),
    ]


def invalid_cases() -> list[Case]:
    return rule_cases() + schema_cases()


def valid_cases() -> list[Case]:
    """Manifests both validators must accept, beyond BASE (each found by the fuzzer)."""
    return [
        # null means unset: the apiserver prunes it and applies the default.
        _case("null optional object is unset", "spec.training.fsdp", _set("training.fsdp", None)),
        _case("null optional field is unset", "spec.export.format", _set("export.format", None)),
        # What the URI pattern must keep accepting (issue 13 tightened it).
        _case("s3 uri of a bucket", "spec.checkpoint.uri", _set("checkpoint.uri", "s3://artifacts")),
        _case("relative local uri", "spec.export.uri", _set("export.uri", "runs/x/model")),
        _case("local uri with a colon", "spec.data.outputUri", _set("data.outputUri", "./runs/a:b/data")),
        _case("minLr equal to lr", "spec.training.schedule.minLr", _set("training.schedule.minLr", 0.001)),
        name_of_length_case(MAX_NAME_LENGTH),
    ]


def name_of_length_case(length: int) -> Case:
    doc = base()
    doc["metadata"]["name"] = "n" * length
    return Case(f"name of {length} characters", doc, "metadata.name")
