"""The torch-free contracts: runtime config, shard header/manifest, ProgressEvent, status."""

from __future__ import annotations

import copy
import json
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from llmtrain.api.config import RuntimeConfig, TrainConfig, pad_vocab, runtime_config_from_spec
from llmtrain.api.job import LLMTrainingJob
from llmtrain.api.progress import STATUS_FIELDS, ProgressEvent, format_eta
from llmtrain.api.shards import (
    HEADER_SIZE,
    Manifest,
    ShardFormatError,
    ShardHeader,
    ShardInfo,
    SourceStats,
    TokenizerInfo,
    dtype_for_vocab,
)
from llmtrain.api.spec import Architecture, resolve_ffn_hidden_size
from llmtrain.api.status import CONDITION_REASONS, ConditionType, LLMTrainingJobStatus, Phase, Reason
from tests.manifests import base

# ------------------------------------------------------------------ architecture


@pytest.mark.parametrize(
    ("d_model", "multiplier", "multiple_of", "expected"),
    [
        (4096, 1.0, 256, 11008),  # Llama-2 7B
        (4096, 1.3, 1024, 14336),  # Llama-3 8B
        (768, 1.0, 256, 2048),
        (256, 1.0, 256, 768),
    ],
)
def test_ffn_hidden_size_llama_convention(
    d_model: int, multiplier: float, multiple_of: int, expected: int
) -> None:
    assert resolve_ffn_hidden_size(d_model, None, multiple_of, multiplier) == expected


def test_ffn_hidden_size_explicit_wins() -> None:
    arch = Architecture(layers=1, d_model=256, heads=4, context_length=64, ffn_hidden_size=500)
    assert arch.resolved_ffn_hidden_size == 500
    assert arch.resolved_kv_heads == 4


# ---------------------------------------------------------------- runtime config


def test_runtime_config_from_spec_maps_every_field() -> None:
    job = LLMTrainingJob.model_validate(base())
    cfg = runtime_config_from_spec(job.spec, vocab_size=8000)
    m, t, o, s = cfg.model, cfg.train, cfg.optimizer, cfg.schedule
    assert m.vocab_size == pad_vocab(8000, 64) == 8000
    assert (m.n_layers, m.d_model, m.n_heads, m.n_kv_heads, m.context_length) == (4, 256, 8, 4, 512)
    assert (m.ffn_hidden_size, m.rope_theta, m.dropout, m.tie_embeddings) == (704, 50000, 0.1, True)
    assert (m.init_seed, m.init_std, m.head_dim) == (3, 0.02, 32)
    assert (o.type, o.lr, o.beta2) == ("adamw", 0.001, 0.95)
    assert (s.warmup_steps, s.decay, s.min_lr) == (10, "cosine", 0.0001)
    assert (t.global_batch_size, t.micro_batch_size, t.world_size, t.grad_accum_steps) == (32, 4, 2, 4)
    assert (t.max_steps, t.precision, t.val_every_steps, t.checkpoint_keep_last) == (100, "bf16", 50, 2)
    assert t.checkpoint_uri == "s3://artifacts/job/ckpt"
    # Round-trips through JSON (how it reaches Ray workers and torchrun).
    again = RuntimeConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg


def test_runtime_config_world_size_override_and_vocab_padding() -> None:
    job = LLMTrainingJob.model_validate(base())
    cfg = runtime_config_from_spec(job.spec, vocab_size=8001, world_size=1, checkpoint_uri="/tmp/x")
    assert cfg.model.vocab_size == 8064
    assert cfg.train.grad_accum_steps == 8
    with pytest.raises(ValueError, match="globalBatchSize"):
        runtime_config_from_spec(job.spec, vocab_size=8000, world_size=3)


def test_runtime_config_rejects_unknown_keys() -> None:
    job = LLMTrainingJob.model_validate(base())
    raw = runtime_config_from_spec(job.spec, vocab_size=8000).to_dict()
    raw["model"]["n_layer"] = 3
    with pytest.raises(ValueError, match="n_layer"):
        RuntimeConfig.from_dict(raw)


def test_total_steps_for_each_duration() -> None:
    common = {"global_batch_size": 8, "micro_batch_size": 2, "world_size": 2}
    assert TrainConfig(**common, max_steps=7).total_steps(None, 16) == 7
    assert TrainConfig(**common, max_tokens=8 * 16 * 3 + 1).total_steps(None, 16) == 4
    # 10 micro batches per rank per epoch, 2 per step -> 5 steps per epoch
    assert TrainConfig(**common, epochs=3).total_steps(10, 16) == 15
    with pytest.raises(ValueError, match="exactly one"):
        TrainConfig(**common, epochs=1, max_steps=1)


# ----------------------------------------------------------------------- shards


def test_shard_header_layout_parses_with_struct() -> None:
    h = ShardHeader(dtype="uint16", vocab_size=4096, eot_id=0, token_count=12345)
    raw = h.pack()
    assert len(raw) == HEADER_SIZE == 256
    magic, version, code, vocab, eot, count = struct.unpack("<8sIIIIQ", raw[:32])
    assert (magic, version, code, vocab, eot, count) == (b"LLMTSHRD", 1, 1, 4096, 0, 12345)
    assert raw[32:] == b"\0" * 224
    assert ShardHeader.unpack(raw) == h
    assert h.file_size == 256 + 2 * 12345


def test_dtype_boundary() -> None:
    assert dtype_for_vocab(65536) == "uint16"
    assert dtype_for_vocab(65537) == "uint32"
    with pytest.raises(ShardFormatError, match="requires uint32"):
        ShardHeader(dtype="uint16", vocab_size=70000, eot_id=1, token_count=0).pack()


def test_truncated_and_foreign_files_are_caught() -> None:
    h = ShardHeader(dtype="uint32", vocab_size=100000, eot_id=5, token_count=10)
    with pytest.raises(ShardFormatError, match="truncated"):
        h.check_size(h.file_size - 4, name="s3://b/train-00000.bin")
    with pytest.raises(ShardFormatError, match="bad magic"):
        ShardHeader.unpack(b"X" * 256)
    with pytest.raises(ShardFormatError, match="header is 10 bytes"):
        ShardHeader.unpack(b"X" * 10)


def test_manifest_round_trip_is_byte_stable() -> None:
    m = Manifest(
        fingerprint="abc",
        tokenizer=TokenizerInfo(
            path="tokenizer.json", sha256="0" * 64, vocab_size=4096, eot_id=0, eot_token="<|endoftext|>"
        ),
        dtype="uint16",
        shards=[
            ShardInfo("train-00000.bin", "train", 100, 3, 456, "f" * 64),
            ShardInfo("validation-00000.bin", "validation", 10, 1, 276, "e" * 64),
        ],
        sources=[SourceStats("stdlib", 4, 110, None, 1.0, {"python": "3.11.7"})],
        dropped={"dedup": 2},
        seed=0,
    )
    text = m.to_json()
    assert Manifest.from_json(text) == m
    assert Manifest.from_json(text).to_json() == text
    assert m.split_tokens("train") == 100 and len(m.split_shards("validation")) == 1
    with pytest.raises(ShardFormatError, match="schema"):
        Manifest.from_json(json.dumps({"version": 1}))


# ------------------------------------------------------------------ progress


def test_progress_event_maps_to_status_fields() -> None:
    e = ProgressEvent(
        step=50,
        total_steps=200,
        epoch=1,
        tokens=12800,
        train_loss=2.345678,
        val_loss=2.5,
        val_perplexity=12.18,
        tokens_per_second=1500.0,
        mfu=None,
        eta_seconds=3725,
        checkpoint_uri="s3://b/ckpt/step-50",
        checkpoint_step=50,
    )
    patch = e.status_patch()
    assert patch["progress"] == {
        "step": 50,
        "epoch": 1,
        "tokensSeen": 12800,
        "totalSteps": 200,
        "percent": 25.0,
        "eta": "1h02m",
    }
    assert patch["metrics"] == {
        "trainLoss": 2.3457,
        "valLoss": 2.5,
        "valPerplexity": 12.18,
        "tokensPerSecond": 1500.0,
    }
    assert patch["checkpoint"] == {"latestUri": "s3://b/ckpt/step-50", "latestStep": 50}
    # The patch is a valid status.
    LLMTrainingJobStatus.model_validate(patch)
    assert ProgressEvent.from_json(e.to_json()) == e
    # Every mapped status field exists in the status model.
    status_fields = LLMTrainingJobStatus.model_json_schema(by_alias=True)["$defs"]
    for target in STATUS_FIELDS.values():
        section, field = target.split(".")
        model = {"progress": "Progress", "metrics": "LatestMetrics", "checkpoint": "CheckpointStatus"}[
            section
        ]
        assert field in status_fields[model]["properties"], target


def test_non_finite_metrics_never_reach_status() -> None:
    patch = ProgressEvent(step=1, train_loss=float("nan"), tokens_per_second=float("inf")).status_patch()
    assert "metrics" not in patch


@pytest.mark.parametrize(
    ("secs", "text"),
    [
        (5, "5s"),
        (65, "1m05s"),
        (3600 * 5 + 120, "5h02m"),
        (86400 * 2 + 3600 * 3, "2d03h"),
        (None, None),
        (-1, None),
    ],
)
def test_format_eta(secs: float | None, text: str | None) -> None:
    assert format_eta(secs) == text


# -------------------------------------------------------------------- status


def test_every_condition_type_documents_its_reasons() -> None:
    assert set(CONDITION_REASONS) == set(ConditionType)
    used = {r for reasons in CONDITION_REASONS.values() for r in reasons}
    assert used == set(Reason)
    # Every failure reason can also be shown by the Running condition (the printer column).
    assert set(CONDITION_REASONS[ConditionType.Failed]) <= set(CONDITION_REASONS[ConditionType.Running])
    assert [p.value for p in Phase if p.terminal] == ["Succeeded", "Failed"]


def test_status_round_trip_camel_case() -> None:
    raw = {
        "phase": "Training",
        "conditions": [
            {
                "type": "Running",
                "status": "True",
                "reason": "TrainingRunning",
                "message": "",
                "lastTransitionTime": "2026-11-26T12:00:00Z",
            }
        ],
        "progress": {"step": 3, "totalSteps": 10},
        "rayClusterName": "job-ray",
        "observedGeneration": 2,
    }
    status = LLMTrainingJobStatus.model_validate(raw)
    dumped = status.model_dump(by_alias=True, exclude_none=True)
    assert dumped["rayClusterName"] == "job-ray" and dumped["conditions"][0]["lastTransitionTime"]
    bad = copy.deepcopy(raw)
    bad["phase"] = "Running"
    with pytest.raises(ValueError):
        LLMTrainingJobStatus.model_validate(bad)


# ------------------------------------------------------------- import isolation


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True)


def test_api_and_operator_never_import_torch_or_ray() -> None:
    proc = _run("""
        import sys, pkgutil, importlib
        import llmtrain.api, llmtrain.operator, llmtrain.cli
        for pkg in (llmtrain.api, llmtrain.operator):
            for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
                if not m.name.endswith(".__main__"):  # that one runs the operator
                    importlib.import_module(m.name)
        heavy = sorted(m for m in ("torch", "ray", "tokenizers", "boto3") if m in sys.modules)
        print(heavy)
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


@pytest.mark.parametrize(
    "module,args",
    [("llmtrain.operator", []), ("llmtrain.cli", ["operator", "--standalone"])],
    ids=["python-m", "llmtrain-operator"],
)
def test_operator_process_never_imports_the_kubernetes_client(
    module: str, args: list[str], tmp_path: Path
) -> None:
    # Kopf imports the official client's ~thousand model classes whenever it is installed
    # (~40 MB of RSS); the operator's entry points keep it out even in this venv, which has
    # it for the tests. Both stop right after the imports: the kubeconfig does not exist,
    # which must be a one-line error naming the file, not a traceback.
    missing = tmp_path / "absent-kubeconfig"
    proc = _run(f"""
        import runpy, sys
        sys.argv = ["llmtrain", *{args!r}, "--kubeconfig", {str(missing)!r}]
        try:
            runpy.run_module({module!r}, run_name="__main__", alter_sys=True)
        except SystemExit as e:
            print("exit:", e.code if isinstance(e.code, int) else e.code, file=sys.stderr)
        loaded = sorted(m for m, mod in sys.modules.items() if m.split(".")[0] == "kubernetes" and mod)
        print("kopf" in sys.modules, loaded)
    """)
    assert proc.stdout.strip() == "True []", (proc.stdout, proc.stderr[-2000:])
    assert f"kubeconfig {missing} does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_contracts_import_without_pydantic() -> None:
    # The lent GPU machine has torch but no pydantic/ray/boto3: the contracts must still import.
    proc = _run("""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("pydantic", "ray", "boto3", "yaml", "celpy"):
                    raise ImportError("blocked: " + name)
        sys.meta_path.insert(0, Block())
        import llmtrain.api.config, llmtrain.api.shards, llmtrain.api.loader, llmtrain.api.progress
        print("ok")
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"
