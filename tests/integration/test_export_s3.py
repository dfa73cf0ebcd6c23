# ruff: noqa: F811  (pytest fixtures imported from other modules are redefined as arguments)
"""Exports published whole on S3 (issue 26 item 3), through the fault-injecting proxy.

An S3 outage while the weights are written is retried in place (the same attempt, the same
version) until the export is published; an outage that outlasts the retries fails the export
and leaves the previous one published, byte for byte; a single-file re-export over a sharded
one is what readers load. The local side: tests/unit/test_export_publish.py.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from llmtrain.runtime.export import TokenizerFiles, export_model
from llmtrain.runtime.hf_import import from_hf_state_dict, read_pretrained
from llmtrain.runtime.publish import MANIFEST_NAME, Backoff, ExportNotPublished, resolve_export
from llmtrain.runtime.store import StorageError

from llmtrain.api.s3 import S3Options
from tests.data.datahelpers import s3_server  # noqa: F401
from tests.integration.test_s3_faults import Backend, moto  # noqa: F401
from tests.s3fault import Rule
from tests.unit.test_export import model_config, random_gpt, tokenizer  # noqa: F401

pytestmark = pytest.mark.timeout(300)

FAST = Backoff(first_s=0.05, max_s=0.1, budget_s=20.0)


def pointer(b: Backend, bucket: str) -> dict[str, Any]:
    return dict(json.loads(b.client().get_object(Bucket=bucket, Key=f"out/{MANIFEST_NAME}")["Body"].read()))


def assert_loads(uri: str, s3: S3Options, model: torch.nn.Module) -> None:
    """What a reader (generate, serve, init.pretrained) loads from ``uri`` is ``model``."""
    got = from_hf_state_dict(read_pretrained(uri, s3).tensors, model.cfg)  # type: ignore[arg-type]
    want = model.state_dict()
    assert got and all(torch.equal(got[k], want[k]) for k in got)


def test_an_outage_is_retried_in_place_and_a_longer_one_keeps_the_previous_export(
    moto: Backend, tokenizer: TokenizerFiles
) -> None:
    bucket = moto.bucket("export-outage")
    uri, s3 = f"s3://{bucket}/out", S3Options(endpoint=moto.proxy.endpoint, max_attempts=1)
    cfg = model_config(tokenizer, tied=True)
    first, second, third = (random_gpt(cfg, seed=s) for s in (1, 2, 3))
    weights = r"/out/versions/[^/]+/model\.safetensors$"

    # An outage of 6 requests on the weights: botocore gives up on each PUT after 2 tries, the
    # export retries the same file in the same version until it lands.
    outage = moto.proxy.add(Rule("slowdown", "PUT", weights, times=6))
    export_model(first.state_dict(), cfg, uri, tokenizer, s3=s3, backoff=FAST)
    assert outage.hits == 6
    published = pointer(moto, bucket)
    assert [k for k in moto.objects(bucket) if k.endswith("/model.safetensors")] == [
        f"out/{published['version']}/model.safetensors"
    ]  # one attempt, one version: no new attempt for each failure
    assert_loads(uri, s3, first)

    # An outage longer than the retries: the export fails, the first stays published, untouched.
    before = moto.objects(bucket)
    moto.proxy.add(Rule("slowdown", "PUT", weights, times=1000))
    short = Backoff(first_s=0.05, max_s=0.1, budget_s=0.3)
    with pytest.raises(StorageError, match=r"SlowDown|503"):
        export_model(second.state_dict(), cfg, uri, tokenizer, s3=s3, backoff=short)
    moto.proxy.clear()
    assert moto.objects(bucket) == before  # pointer, version, files: byte for byte; attempt deleted
    assert resolve_export(uri, s3).uri == f"{uri}/{published['version']}"

    # A single-file export over a sharded one: readers load the new weights.
    export_model(second.state_dict(), cfg, uri, tokenizer, s3=s3, max_shard_bytes=40_000)
    assert "model.safetensors.index.json" in pointer(moto, bucket)["files"]
    export_model(third.state_dict(), cfg, uri, tokenizer, s3=s3)
    files = pointer(moto, bucket)["files"]
    assert "model.safetensors" in files and "model.safetensors.index.json" not in files
    assert_loads(uri, s3, third)
    with pytest.raises(AssertionError):  # negative control: the check tells the exports apart
        assert_loads(uri, s3, second)
    versions = {k.split("/")[2] for k in moto.objects(bucket) if k.startswith("out/versions/")}
    assert len(versions) == 2  # the published one and the one before it; the first is pruned


def test_attempts_without_a_pointer_are_not_read(moto: Backend, tokenizer: TokenizerFiles) -> None:
    """A version with no pointer (an export in progress, or one that died) is refused by name."""
    bucket = moto.bucket("export-unpublished")
    moto.client().put_object(Bucket=bucket, Key="out/versions/x/config.json", Body=b"{}")
    with pytest.raises(ExportNotPublished, match=rf"no export has been published at s3://{bucket}/out yet"):
        read_pretrained(f"s3://{bucket}/out", S3Options(endpoint=moto.proxy.endpoint))
