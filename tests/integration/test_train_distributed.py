"""The plain train function on 2 gloo ranks (spawned processes, no Ray), checkpoints on moto S3.

- equivalence: 1 process without FSDP = 2 FSDP2 ranks = 2 ranks × half micro batch × 2 accum;
- exact resume after a SIGKILLed rank, across an epoch boundary, with the negative controls;
- NaN → error naming the step, the newest checkpoint predates it and loads on 1 rank;
- reshardAfterForward really keeps/frees the gathered parameters;
- a checkpoint asked of rank 0 alone is taken by both ranks at the same step.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
from llmtrain.runtime.checkpoint import Lineage
from llmtrain.runtime.synthetic import AskOnCall, RankFailure, run_ranks, train_worker

from llmtrain.api.config import ModelConfig, OptimizerConfig, RuntimeConfig, ScheduleConfig, TrainConfig
from tests.data.datahelpers import S3Server, s3_server  # noqa: F401 - the session fixture

MODEL = ModelConfig(
    vocab_size=64,
    n_layers=2,
    d_model=32,
    n_heads=4,
    n_kv_heads=2,
    context_length=16,
    ffn_hidden_size=96,
    tie_embeddings=True,
)


def config(world_size: int, micro: int, *, model: ModelConfig = MODEL, **train: Any) -> dict[str, Any]:
    t = {
        "global_batch_size": 4,
        "micro_batch_size": micro,
        "world_size": world_size,
        "max_steps": 10,
        "log_every_steps": 5,
        "val_every_steps": 100,
        "val_batches": 2,
        "metrics_enabled": False,
        **train,
    }
    return RuntimeConfig(
        model, OptimizerConfig(lr=3e-3), ScheduleConfig(warmup_steps=2, decay="cosine"), TrainConfig(**t)
    ).to_dict()


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:  # noqa: F811
    env = {
        "AWS_ENDPOINT_URL": s3_server.endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return env


def test_equivalence_single_process_fsdp_and_accumulation() -> None:
    """fp32, same seed and global batch, 10 steps: per-step loss and grad norm within 1e-5
    relative, gathered weights equal at the end."""
    single = train_worker(config(1, 4), None, {"gather_weights": True})
    fsdp = run_ranks(2, train_worker, config(2, 2), None, {"gather_weights": True})
    accum = run_ranks(2, train_worker, config(2, 1), None, {"gather_weights": True})
    assert len(single.losses) == 10
    for other in (fsdp[0], fsdp[1], accum[0]):
        assert other.losses == pytest.approx(single.losses, rel=1e-5, abs=0)
        assert other.grad_norms == pytest.approx(single.grad_norms, rel=1e-5, abs=0)
        assert other.weights.keys() == single.weights.keys()
        for name, w in single.weights.items():
            torch.testing.assert_close(other.weights[name], w, rtol=1e-5, atol=2e-6, msg=name)
    assert single.losses[-1] < single.losses[0]


def _copy_prefix(s3: S3Server, bucket: str, src: str, dst: str) -> None:
    client = s3.client()
    for obj in client.list_objects_v2(Bucket=bucket, Prefix=src + "/").get("Contents", []):
        key = obj["Key"]
        client.copy_object(
            Bucket=bucket, Key=dst + key[len(src) :], CopySource={"Bucket": bucket, "Key": key}
        )


@pytest.mark.slow
def test_exact_resume_after_sigkill(s3_server: S3Server, s3_env: dict[str, str], tmp_path: Path) -> None:  # noqa: F811
    """Rank 1 is SIGKILLed before step 6 (checkpoints every 4): the rerun resumes from step 4,
    replays 5-6, crosses into epoch 1 at step 7, and every later loss is bitwise equal to the
    uninterrupted run, with deterministic algorithms on. Skipping the RNG or the loader restore
    breaks the equality."""
    bucket = s3_server.bucket("resume")
    model = dataclasses.replace(MODEL, dropout=0.1)
    # 24 windows / (2 ranks × micro 1) = 12 micro batches per epoch = 6 steps of accum 2.
    loader = {"vocab_size": 64, "windows": 24}

    def cfg(prefix: str) -> dict[str, Any]:
        return config(
            2, 1, model=model, max_steps=10, log_every_steps=1, checkpoint_every_steps=4,
            checkpoint_keep_last=3, checkpoint_uri=f"s3://{bucket}/{prefix}",
        )  # fmt: skip

    det = {"deterministic": True}  # torch.use_deterministic_algorithms in every run
    whole = run_ranks(2, train_worker, cfg("whole"), loader, det, env=s3_env)[0]
    assert whole.resumed_from is None and len(whole.losses) == 10

    sentinel = tmp_path / "killed"
    fault = {**s3_env, "LLMTRAIN_FAULT_KILL_AT_STEP": "6", "LLMTRAIN_FAULT_SENTINEL": str(sentinel)}
    with pytest.raises(RankFailure) as failure:
        run_ranks(2, train_worker, cfg("run"), loader, det, env=fault)
    assert failure.value.exitcodes[1] == -9  # SIGKILL
    assert sentinel.exists()
    assert Lineage(f"s3://{bucket}/run", 3).complete_steps() == [4]
    _copy_prefix(s3_server, bucket, "run", "no-rng")
    _copy_prefix(s3_server, bucket, "run", "no-loader")

    resumed = run_ranks(2, train_worker, cfg("run"), loader, det, env=fault)[0]  # sentinel: no second kill
    assert resumed.resumed_from == 4
    assert resumed.steps == list(range(5, 11))
    assert resumed.losses == whole.losses[4:]  # bitwise, across the epoch boundary at step 7
    assert resumed.grad_norms == whole.grad_norms[4:]

    no_rng = run_ranks(2, train_worker, cfg("no-rng"), loader, {**det, "skip_rng_restore": True}, env=s3_env)[
        0
    ]
    assert no_rng.resumed_from == 4 and no_rng.losses[0] != whole.losses[4]
    no_loader = run_ranks(
        2, train_worker, cfg("no-loader"), loader, {**det, "skip_loader_restore": True}, env=s3_env
    )[0]
    assert no_loader.resumed_from == 4 and no_loader.losses[0] != whole.losses[4]


def test_nan_names_the_step_and_two_rank_checkpoint_loads_on_one(
    s3_server: S3Server,  # noqa: F811
    s3_env: dict[str, str],
) -> None:
    bucket = s3_server.bucket("nan")
    uri = f"s3://{bucket}/run"
    two = config(2, 1, max_steps=8, log_every_steps=100, checkpoint_every_steps=2, checkpoint_uri=uri)
    with pytest.raises(RankFailure, match=r"NonFiniteError: non-finite loss at step 5"):
        run_ranks(2, train_worker, two, None, env={**s3_env, "LLMTRAIN_FAULT_NAN_AT_STEP": "5"})
    lineage = Lineage(uri, 3)
    assert lineage.complete_steps() == [2, 4]  # the save at 6 found the NaN first
    info = lineage.latest()
    assert info is not None and info.step == 4 and info.world_size == 2
    # Each rank uploaded its own shard file from its own staging directory.
    keys = {o["Key"] for o in s3_server.client().list_objects_v2(Bucket=bucket)["Contents"]}
    assert {
        f"run/step_00000004/{n}" for n in ("__0_0.distcp", "__1_0.distcp", ".metadata", "COMPLETE")
    } <= keys

    # Resume the 2-rank checkpoint in one process (no FSDP, micro 2 × accum 2): it continues
    # from the same weights, optimizer state and data position as an uninterrupted 1-rank run.
    one = config(1, 2, max_steps=8, log_every_steps=1, checkpoint_every_steps=100, checkpoint_uri=uri)
    resumed = train_worker(one)
    assert resumed.resumed_from == 4 and resumed.steps == [5, 6, 7, 8]
    reference = train_worker(config(1, 2, max_steps=8, log_every_steps=1))
    assert resumed.losses == pytest.approx(reference.losses[4:], rel=1e-5, abs=0)


def _fsdp_reshard_probe() -> list[bool]:
    """On a rank, per reshardAfterForward False/True: is a block's weight still gathered (a
    plain tensor, not the DTensor shard) after forward?"""
    from llmtrain.runtime.train import build_model
    from torch.distributed.tensor import DTensor

    gathered = []
    for reshard in (False, True):
        cfg = RuntimeConfig.from_dict(config(2, 1, reshard_after_forward=reshard))
        model = build_model(cfg, torch.device("cpu"), use_fsdp=True)
        assert isinstance(model.layers[0].attention.wq.weight, DTensor)  # sharded at rest
        model(torch.zeros(1, 16, dtype=torch.long))
        gathered.append(not isinstance(model.layers[0].attention.wq.weight, DTensor))
    return gathered


def test_reshard_after_forward() -> None:
    """spec.training.fsdp.reshardAfterForward: False keeps gathered parameters after forward."""
    assert run_ranks(2, _fsdp_reshard_probe) == [[True, False], [True, False]]


def test_checkpoint_asked_of_rank_0_is_taken_by_every_rank(
    s3_server: S3Server,  # noqa: F811
    s3_env: dict[str, str],
) -> None:
    """Only rank 0 polls the request (the driver's queue); the log step's all-reduce tells
    rank 1, so both enter the collective save at step 4 (a rank left out would hang it)."""
    uri = f"s3://{s3_server.bucket('asked')}/run"
    cfg = config(2, 1, max_steps=6, log_every_steps=2, checkpoint_every_steps=100, checkpoint_uri=uri)
    results = run_ranks(
        2, train_worker, cfg, None, {"checkpoint_requested": AskOnCall(2)}, env=s3_env, timeout=120
    )
    assert [[u.rsplit("/", 1)[1] for u in r.checkpoints] for r in results] == [
        ["step_00000004", "step_00000006"]
    ] * 2
    assert Lineage(uri, 3).complete_steps() == [4, 6]
