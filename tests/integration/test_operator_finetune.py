# ruff: noqa: F811  (pytest fixtures imported from other modules are redefined as arguments)
"""A task fine-tune through the operator (#27): `kubectl apply` of an LLMTrainingJob whose data
are chat records on S3, initialised from another job's export, trained with LoRA adapters,
validated with the task metric, exported as a PEFT adapter — on the test control plane with
KWOK pods and the local Ray stand-in (the fixtures of test_operator_run)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from test_operator_lifecycle import Api, Operator, crds, serve  # noqa: F401 (fixture)
from test_operator_run import (  # noqa: F401 (fixtures)
    BUCKET,
    _succeeded,
    api,
    corpus,
    run_operator,
    standin,
    tiny_job,
)

from tests.data.datahelpers import S3Server, s3_server  # noqa: F401 (fixture)

pytestmark = [pytest.mark.cluster, pytest.mark.ray, pytest.mark.slow]

# Identifiers of the email package (the base model's pretraining text): short records that fit
# the tiny model's 64-token context with the chat template around them.
NAMES = [
    "message_from_string",
    "parseaddr",
    "formataddr",
    "getaddresses",
    "decode_header",
    "make_header",
    "quote",
    "unquote",
    "encode_base64",
    "body_encode",
    "header_encode",
    "splitdigits",
    "parsedate",
    "mktime_tz",
    "formatdate",
    "make_msgid",
    "collapse_rfc2231_value",
    "decode_params",
    "get_payload",
    "set_charset",
    "get_params",
    "get_filename",
    "as_string",
    "attach",
    "walk",
    "get_content_type",
    "set_param",
    "del_param",
]


def _chat(name: str) -> str:
    return json.dumps(
        {
            "messages": [
                {"role": "user", "content": f"def {name}(x):"},
                {"role": "assistant", "content": name},
            ]
        }
    )


def _task_data(s3: S3Server) -> tuple[str, str]:
    """Training and held-out chat records on S3; the training file holds one bad record."""
    client = s3.client()
    bad = json.dumps({"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]})
    train = "\n".join([*(_chat(n) for n in NAMES[:16] * 4), bad]) + "\n"
    heldout = "\n".join(_chat(n) for n in NAMES[16:]) + "\n"
    client.put_object(Bucket="corpus", Key="task/train/records.jsonl", Body=train.encode())
    client.put_object(Bucket="corpus", Key="task/heldout/records.jsonl", Body=heldout.encode())
    return "s3://corpus/task/train/", "s3://corpus/task/heldout/"


def finetune_job(name: str, base: str, train: str, heldout: str, endpoint: str) -> dict[str, Any]:
    job = tiny_job(name, train, endpoint)
    spec = job["spec"]
    source = {"s3": {"uri": train, "format": "jsonl"}, "task": {"format": "chat"}}
    spec["data"] = {
        "sources": [{"name": "chat", **source}],
        "validationSources": [
            {"name": "heldout", "s3": {"uri": heldout, "format": "jsonl"}, "task": {"format": "chat"}}
        ],
        "tokenizer": {"load": {"uri": f"s3://{BUCKET}/{base}/data/tokenizer.json"}},
        "outputUri": f"s3://{BUCKET}/{name}/data",
    }
    spec["model"]["init"] = {"pretrained": {"uri": f"s3://{BUCKET}/{base}/model"}}
    spec["training"]["lora"] = {"rank": 4, "alpha": 8, "targets": ["attention.wq", "attention.wv"]}
    spec["training"]["duration"] = {"maxSteps": 30}
    spec["training"]["batch"] = {"globalBatchSize": 4, "microBatchSize": 4}
    spec["validation"] = {
        "everySteps": 30,
        "batches": 1,
        "task": {"records": 4, "maxNewTokens": 8, "checker": "identifier"},
    }
    spec["checkpoint"] = {"uri": f"s3://{BUCKET}/{name}/checkpoints", "everySteps": 15, "keepLast": 2}
    spec["export"] = {"uri": f"s3://{BUCKET}/{name}/model", "lora": "adapter"}
    return job


def test_task_fine_tune_with_lora_through_the_operator(
    api: Api, run_operator: Operator, corpus: str, s3_server: S3Server, tmp_path: Path
) -> None:
    # The base: a tiny pretraining job of this module's text, through the operator.
    base = tiny_job("ftbase", corpus, s3_server.endpoint)
    base["spec"]["training"]["duration"] = {"maxSteps": 40}
    base["spec"]["checkpoint"]["everySteps"] = 40
    base["spec"]["validation"]["everySteps"] = 40
    api.create(base)
    _succeeded(api, "ftbase", run_operator)

    train, heldout = _task_data(s3_server)
    api.create(finetune_job("ftlora", "ftbase", train, heldout, s3_server.endpoint))
    st = _succeeded(api, "ftlora", run_operator)

    # The data: task records counted, the bad one named by its reason, never trained on.
    # 16 distinct training records (each four times: exact duplicates are dropped) + the held-out ones.
    assert st["data"]["taskRecords"] == 16 + len(NAMES) - 16, st["data"]
    assert st["data"]["badRecords"] == {"role_order": 1}, st["data"]
    # The task metric beside loss in status.metrics, from the last validation.
    metrics = st["metrics"]
    assert 0 <= metrics["valTaskExactMatch"] <= 1 and 0 <= metrics["valTaskScore"] <= 1, metrics
    assert metrics["valLoss"] > 0
    # LoRA checkpoints in the lineage; the export is a PEFT adapter beside a pointer to its base.
    assert [c["step"] for c in st["checkpoint"]["lineage"]] == [15, 30]
    keys = [
        o["Key"]
        for o in s3_server.client().list_objects_v2(Bucket=BUCKET, Prefix="ftlora/model/")["Contents"]
    ]
    assert any(k.endswith("/adapter_config.json") for k in keys), keys
    assert any(k.endswith("/adapter_model.safetensors") for k in keys), keys
    assert not any(k.endswith("/model.safetensors") for k in keys), keys  # adapters only
    out = api.c.kubectl("get", "ltj", "ftlora", "-n", api.ns).stdout
    assert "Succeeded" in out, out
