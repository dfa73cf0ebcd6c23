# ruff: noqa: F811  (the session fixture imported from tests/data/datahelpers.py is an argument)
"""``spec.storage.endpoint`` reaches every S3 client of a run (issue 13, item 6).

A local run whose data, checkpoints and export all live on moto's S3 server, with
``spec.storage.endpoint`` set and ``AWS_ENDPOINT_URL``/``AWS_ENDPOINT_URL_S3`` unset in this
process and so in every Ray process it starts (Ray's processes inherit the driver's
environment, and the launch passes the workers none of their own). A client that fell back to
boto3's default endpoint would go to AWS (unreachable here, and the wrong server anyway), so
the run fails unless the driver's lineage check, the workers' checkpoint saves, the export and
the sample all use the spec's endpoint. Then a fine-tune's initial weights (``spec.model.init``:
checkpoint and pretrained, read by the workers) come from the same server the same way.
"""

from __future__ import annotations

import os
import sysconfig
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch

from llmtrain.api.config import runtime_config_from_spec
from llmtrain.api.job import LLMTrainingJob
from tests.data.datahelpers import S3Server, s3_server  # noqa: F401 - the session fixture

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]

ENDPOINT_VARIABLES = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")


def _job(bucket: str, endpoint: str) -> LLMTrainingJob:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return LLMTrainingJob.model_validate(
        {
            "apiVersion": "llmtrain.dev/v1alpha1",
            "kind": "LLMTrainingJob",
            "metadata": {"name": "endpoint"},
            "spec": {
                "data": {
                    "sources": [
                        {"name": "json", "local": {"glob": str(stdlib / "json" / "*.py"), "textUnit": "file"}}
                    ],
                    "tokenizer": {"train": {"vocabSize": 300}},
                    "outputUri": f"s3://{bucket}/data",
                    "validationFraction": 0.2,
                },
                "model": {
                    "architecture": {
                        "layers": 1,
                        "dModel": 32,
                        "heads": 2,
                        "contextLength": 32,
                        "multipleOf": 16,
                    }
                },
                "training": {
                    "optimizer": {"lr": 0.003},
                    "batch": {"globalBatchSize": 4, "microBatchSize": 4},
                    "duration": {"maxSteps": 2},
                    "logEverySteps": 1,
                },
                "validation": {"everySteps": 2, "batches": 1},
                "checkpoint": {"uri": f"s3://{bucket}/ckpt", "everySteps": 2, "keepLast": 1},
                "export": {"uri": f"s3://{bucket}/model", "samplePrompt": "import"},
                "storage": {"endpoint": endpoint, "region": "us-east-1"},
                "metrics": {"enabled": False},
                "resources": {"workers": 1},
            },
        }
    )


@pytest.fixture
def no_endpoint_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No S3 endpoint in the environment of this process or any process it starts; Ray's own
    variables (init_local_ray sets them) restored afterwards."""
    from llmtrain.runtime.ray_local import LOCAL_ENV

    for key in (*ENDPOINT_VARIABLES, *LOCAL_ENV, "RAY_ADDRESS", "RAY_TMPDIR"):
        monkeypatch.setenv(key, "restored-after-the-test")
        monkeypatch.delenv(key)  # records the original value (or absence) for teardown
    # A short directory: Ray's unix socket paths must stay < 108 bytes.
    monkeypatch.setenv("RAY_TMPDIR", tempfile.mkdtemp(prefix="ray-"))


def test_run_uses_spec_storage_endpoint_without_aws_endpoint_url(
    s3_server: S3Server, tmp_path: Path, no_endpoint_env: None
) -> None:
    ray = pytest.importorskip("ray")
    from llmtrain.runtime.driver import launch_options
    from llmtrain.runtime.hf_import import load_initial_weights
    from llmtrain.runtime.run import RunOptions, run_job
    from llmtrain.runtime.stage import Place
    from llmtrain.runtime.train import build_model

    from llmtrain.api.s3 import S3Options

    assert not ray.is_initialized()  # a running Ray would have been started with another environment
    assert not any(k in os.environ for k in ENDPOINT_VARIABLES)
    bucket = s3_server.bucket("storage-endpoint")
    job = _job(bucket, s3_server.endpoint)
    place = Place(run_dir=tmp_path, output_prefix=str(tmp_path), connect=lambda: None, cpus_per_worker=1)
    # The workers get no S3 environment from the launch either: only the spec's settings.
    assert not any("AWS" in k for k, _ in launch_options(job, place, "train").env)

    summary = run_job(job, RunOptions(run_dir=tmp_path / "run", num_cpus=2))

    assert summary.steps == 2
    assert summary.checkpoint_uri == f"s3://{bucket}/ckpt/step_00000002"
    assert summary.export_uri == f"s3://{bucket}/model"
    assert summary.sample  # read back from the export on S3
    keys = {o["Key"] for o in s3_server.client().list_objects_v2(Bucket=bucket)["Contents"]}
    assert {"data/manifest.json", "ckpt/step_00000002/COMPLETE", "model/llmtrain-export.json"} <= keys
    # Published whole: the files in a version of their own, the pointer written last.
    configs = [k.split("/") for k in keys if k.endswith("/config.json")]
    assert len(configs) == 1 and configs[0][:2] == ["model", "versions"] and len(configs[0]) == 4

    # A fine-tune's initial weights, as every worker reads them (load_initial_weights), from
    # the run's checkpoint and from its export: spec.storage travels in the RuntimeConfig.
    assert not any(k in os.environ for k in ENDPOINT_VARIABLES)
    raw: dict[str, Any] = job.spec.model_dump(by_alias=True, exclude_none=True, mode="json")
    for init in (
        {"checkpoint": {"uri": f"s3://{bucket}/ckpt"}},
        {"pretrained": {"uri": f"s3://{bucket}/model"}},
    ):
        raw["model"]["init"] = init
        spec = type(job.spec).model_validate(raw)
        cfg = runtime_config_from_spec(spec, vocab_size=summary.vocab_size)
        assert S3Options.from_train(cfg.train) == S3Options(endpoint=s3_server.endpoint, region="us-east-1")
        model = build_model(cfg, torch.device("cpu"), use_fsdp=False)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        load_initial_weights(model, cfg)
        changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
        assert changed, f"spec.model.init {init}: no weight was loaded"
