# ruff: noqa: F811  (pytest fixtures imported from other modules are redefined as arguments)
"""Fine-tuning round trip through moto's standalone S3 server (real HTTP S3 protocol):

train a few steps (checkpoints on S3) → ``llmtrain export`` to S3 → a new run initialised from
that export (``spec.model.init.pretrained``) or from the checkpoint (``spec.model.init.checkpoint``)
starts from exactly the validation loss the first run ended with. Then FSDP2 on two gloo ranks:
the sharded init path and the offline export of a two-rank checkpoint.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from llmtrain.runtime.evaluate import evaluate
from llmtrain.runtime.export import TokenizerFiles
from llmtrain.runtime.hf_import import load_initial_weights
from llmtrain.runtime.lora import export_for_job
from llmtrain.runtime.synthetic import SyntheticLoader, run_ranks, tiny_spec_dict, train_worker
from llmtrain.runtime.train import RunContext, TrainResult, build_model, train
from typer.testing import CliRunner

from llmtrain.api.config import RuntimeConfig, runtime_config_from_spec
from llmtrain.api.spec import LLMTrainingJobSpec
from tests.unit.test_export import hf_logits, tokenizer  # noqa: F401
from tests.unit.test_generate import cli

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))
from datahelpers import S3Server, s3_server  # noqa: F401

pytestmark = pytest.mark.timeout(600)

VOCAB_TOKENS = 60  # the synthetic loader's ids; the table has the tokenizer's 320 rows
LOADER = functools.partial(SyntheticLoader, vocab_size=VOCAB_TOKENS, windows=32)
ARCH = {
    "model.architecture.heads": 4,
    "model.architecture.kvHeads": 2,
    "model.architecture.ropeTheta": 50_000.0,
    "model.architecture.contextLength": 32,
    "validation.batches": 4,
}


@pytest.fixture
def s3(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Server]:
    """The endpoint as pods get it (AWS_ENDPOINT_URL): checkpoints and exports both use it."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
    yield s3_server


def spec_of(**over: Any) -> dict[str, Any]:
    return tiny_spec_dict(**{**ARCH, **over})


def config_of(raw: dict[str, Any], tok: TokenizerFiles) -> RuntimeConfig:
    return runtime_config_from_spec(LLMTrainingJobSpec.model_validate(raw), vocab_size=tok.vocab_size)


def run(cfg: RuntimeConfig) -> TrainResult:
    return train(cfg, LOADER, ctx=RunContext(metrics_addr="127.0.0.1", gather_weights=True))


def starting_val_loss(cfg: RuntimeConfig, *, load: bool = True) -> float:
    """What the train loop does before its first step: build → init → (load_initial_weights),
    evaluated on the validation batches every validation of the run uses."""
    model = build_model(cfg, torch.device("cpu"), use_fsdp=False)
    if load:
        load_initial_weights(model, cfg)
    val = LOADER(
        split="validation",
        rank=0,
        world_size=1,
        micro_batch=cfg.train.micro_batch_size,
        context_length=cfg.model.context_length,
        seed=cfg.train.seed,
    )
    return evaluate(model, iter(val), cfg.train.val_batches, torch.device("cpu")).loss


def test_finetune_starts_from_the_validation_loss_it_ended_with(
    s3: S3Server, tmp_path: Path, tokenizer: TokenizerFiles
) -> None:
    bucket = s3.bucket("finetune")
    s3.client().put_object(Bucket=bucket, Key="data/tokenizer.json", Body=tokenizer.json_bytes)
    first_raw = spec_of(
        **{
            "checkpoint.uri": f"s3://{bucket}/run-a",
            "training.duration.maxSteps": 8,
            "training.optimizer": {"type": "adamw", "lr": 0.01},  # learn visibly in 8 steps
        }
    )
    first = run(config_of(first_raw, tokenizer))
    ended = first.validations[-1]["loss"]
    assert first.validations[-1]["step"] == 8

    # llmtrain export, S3 → S3, from the lineage root (newest complete checkpoint).
    job = tmp_path / "job.yaml"
    job.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "llmtrain.dev/v1alpha1",
                "kind": "LLMTrainingJob",
                "metadata": {"name": "a"},
                "spec": first_raw,
            }
        )
    )
    args = [
        "export",
        "--checkpoint",
        f"s3://{bucket}/run-a",
        "--out",
        f"s3://{bucket}/model-a",
        "--job",
        str(job),
    ]
    r = CliRunner().invoke(cli(), [*args, "--tokenizer", f"s3://{bucket}/data/tokenizer.json"])
    assert r.exit_code == 0, r.output
    keys = {o["Key"] for o in s3.client().list_objects_v2(Bucket=bucket, Prefix="model-a/")["Contents"]}
    # Published whole: a version of its own, and the pointer to it written last.
    pointer = json.loads(
        s3.client().get_object(Bucket=bucket, Key="model-a/llmtrain-export.json")["Body"].read()
    )
    version = f"model-a/{pointer['version']}"
    assert {f"{version}/{name}" for name in ("model.safetensors", "config.json", "tokenizer.json")} <= keys
    assert set(pointer["files"]) == {k.removeprefix(f"{version}/") for k in keys if k.startswith(version)} - {
        "llmtrain-export.json"
    }
    # llmtrain generate --model s3://…: reads the export straight from S3 (greedy: reproducible).
    gen = ["generate", "--model", f"s3://{bucket}/model-a", "--prompt", "ab", "--temperature", "0"]
    outputs = [CliRunner().invoke(cli(), [*gen, "--max-tokens", "5", "--ids"]) for _ in range(2)]
    assert outputs[0].exit_code == 0, outputs[0].output
    assert len(json.loads(outputs[0].output)["new"]) <= 5 and outputs[0].output == outputs[1].output

    # spec.model.init.pretrained.uri: the exported directory on S3.
    fresh = {"model.init.random": None, "checkpoint.uri": f"s3://{bucket}/run-b"}
    pretrained = config_of(
        spec_of(**fresh, **{"model.init.pretrained": {"uri": f"s3://{bucket}/model-a"}}), tokenizer
    )
    assert pretrained.train.init_kind == "pretrained"
    assert starting_val_loss(pretrained) == pytest.approx(ended, abs=1e-6)
    # spec.model.init.checkpoint.uri: the first run's lineage on S3, weights only.
    from_ckpt = config_of(
        spec_of(**fresh, **{"model.init.checkpoint": {"uri": f"s3://{bucket}/run-a"}}), tokenizer
    )
    assert from_ckpt.train.init_kind == "checkpoint"
    assert starting_val_loss(from_ckpt) == pytest.approx(ended, abs=1e-6)
    # Negative control: the same run without the init path starts where random weights are.
    assert starting_val_loss(pretrained, load=False) > ended + 0.5


def test_spec_export_writes_the_run_model_to_s3(
    s3: S3Server, tmp_path: Path, tokenizer: TokenizerFiles
) -> None:
    """spec.export.{uri,format} at the end of a run; spec.data.outputUri supplies the tokenizer."""
    bucket = s3.bucket("export")
    client = s3.client()
    client.put_object(Bucket=bucket, Key="data/tokenizer.json", Body=tokenizer.json_bytes)
    manifest = {
        "fingerprint": "f",
        "tokenizer": {
            "path": "tokenizer.json",
            "sha256": "x",
            "vocab_size": tokenizer.vocab_size,
            "eot_id": tokenizer.eot_id,
            "eot_token": tokenizer.eot_token,
        },
        "dtype": "uint16",
        "shards": [],
        "sources": [],
        "dropped": {},
        "seed": 0,
        "version": 1,
    }
    client.put_object(Bucket=bucket, Key="data/manifest.json", Body=json.dumps(manifest).encode())
    raw = spec_of(
        **{
            "checkpoint.uri": str(tmp_path / "ckpt"),
            "data.outputUri": f"s3://{bucket}/data",
            "export": {"uri": f"s3://{bucket}/exported", "format": "hf-llama-safetensors"},
            "model.architecture.tieEmbeddings": True,
        }
    )
    spec = LLMTrainingJobSpec.model_validate(raw)
    result = run(config_of(raw, tokenizer))
    assert export_for_job(spec, str(tmp_path / "ckpt")) == f"s3://{bucket}/exported"
    local = tmp_path / "downloaded"
    local.mkdir()
    for obj in client.list_objects_v2(Bucket=bucket, Prefix="exported/")["Contents"]:
        client.download_file(bucket, obj["Key"], str(local / obj["Key"].split("/")[-1]))
    from llmtrain.runtime.model import GPT

    model = GPT(config_of(raw, tokenizer).model)
    assert result.weights is not None
    model.load_state_dict(result.weights)
    ids = torch.randint(0, VOCAB_TOKENS, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf_logits(local, ids), model.eval()(ids), atol=1e-4, rtol=0)
    assert (
        export_for_job(LLMTrainingJobSpec.model_validate({**raw, "export": None}), str(tmp_path / "ckpt"))
        is None
    )


def test_train_loop_applies_spec_model_init(tmp_path: Path, tokenizer: TokenizerFiles) -> None:
    """Through train() itself (runtime/train.py calls load_initial_weights after build_model): a
    run initialised from the export, with a learning rate too small to move the weights,
    validates at the loss the first run ended with."""
    from llmtrain.runtime.export import export_checkpoint

    first_raw = spec_of(
        **{
            "checkpoint.uri": str(tmp_path / "a"),
            "training.duration.maxSteps": 8,
            "training.optimizer": {"type": "adamw", "lr": 0.01},
        }
    )
    ended = run(config_of(first_raw, tokenizer)).validations[-1]["loss"]
    export_checkpoint(
        str(tmp_path / "a"), str(tmp_path / "hf"), tokenizer, job=LLMTrainingJobSpec.model_validate(first_raw)
    )
    still = {"type": "sgd", "lr": 1e-9, "momentum": 0.0, "weightDecay": 0.0}
    second_raw = spec_of(
        **{
            "model.init.random": None,
            "model.init.pretrained": {"uri": str(tmp_path / "hf")},
            "checkpoint.uri": str(tmp_path / "b"),
            "training.duration.maxSteps": 1,
            "training.optimizer": still,
        }
    )
    started = run(config_of(second_raw, tokenizer)).validations[0]["loss"]
    assert started == pytest.approx(ended, abs=1e-5)


# ------------------------------------------------------------------ two FSDP2 ranks


def init_worker(cfgs: list[dict[str, Any]]) -> list[dict[str, torch.Tensor]]:
    """A run_ranks target: per config, FSDP2-sharded build → load_initial_weights → full weights."""
    from llmtrain.runtime.train import gather_full_weights

    out = []
    for cfg in cfgs:
        rc = RuntimeConfig.from_dict(cfg)
        model = build_model(rc, torch.device("cpu"), use_fsdp=True)
        load_initial_weights(model, rc)
        out.append(gather_full_weights(model))
    return out


@pytest.mark.slow
def test_fsdp_ranks_load_pretrained_and_checkpoint_init_and_export_two_rank_checkpoints(
    tmp_path: Path, tokenizer: TokenizerFiles
) -> None:
    from llmtrain.runtime.export import export_checkpoint

    raw = spec_of(
        **{"checkpoint.uri": str(tmp_path / "ckpt"), "resources.workers": 2, "training.duration.maxSteps": 2}
    )
    cfg = config_of(raw, tokenizer)
    trained = run_ranks(
        2, train_worker, cfg.to_dict(), {"vocab_size": VOCAB_TOKENS, "windows": 32}, {"gather_weights": True}
    )
    weights = trained[0].weights
    # Offline export of a checkpoint written by two ranks, read by one process.
    export_checkpoint(
        str(tmp_path / "ckpt"), str(tmp_path / "hf"), tokenizer, job=LLMTrainingJobSpec.model_validate(raw)
    )
    from llmtrain.runtime.model import GPT

    model = GPT(cfg.model)
    model.load_state_dict(weights)
    ids = torch.randint(0, VOCAB_TOKENS, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf_logits(tmp_path / "hf", ids), model.eval()(ids), atol=1e-4, rtol=0)
    # Both init kinds into sharded models on two ranks: every rank's shard is the right one.
    inits = ({"pretrained": {"uri": str(tmp_path / "hf")}}, {"checkpoint": {"uri": str(tmp_path / "ckpt")}})
    cfgs = [
        config_of(
            spec_of(
                **{"model.init": init, "checkpoint.uri": str(tmp_path / "other"), "resources.workers": 2}
            ),
            tokenizer,
        )
        for init in inits
    ]
    per_rank = run_ranks(2, init_worker, [c.to_dict() for c in cfgs])
    for rank, loaded in enumerate(per_rank):
        for init, got in zip(inits, loaded, strict=True):
            assert set(got) == set(weights)
            for name, value in weights.items():
                torch.testing.assert_close(
                    got[name], value, atol=1e-6, rtol=0, msg=f"rank {rank} {init}: {name}"
                )
