"""The CUDA paths of the train loop (skipped without a GPU): bf16 autocast without FSDP, FSDP2
with NCCL and its bf16 MixedPrecisionPolicy, torch.compile'd blocks, CUDA RNG in checkpoints,
MFU and peak-memory metrics. Imports only torch + llmtrain's torch-free contracts (the GPU
machine has no pydantic or boto3)."""

from __future__ import annotations

import functools
import math
import os
import re
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from llmtrain.runtime.synthetic import SyntheticLoader, _free_port
from llmtrain.runtime.train import RunContext, TrainResult, train

from llmtrain.api.config import ModelConfig, OptimizerConfig, RuntimeConfig, ScheduleConfig, TrainConfig
from llmtrain.api.progress import ProgressEvent

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

VOCAB = 4096
MODEL = ModelConfig(
    vocab_size=VOCAB,
    n_layers=4,
    d_model=512,
    n_heads=8,
    n_kv_heads=4,
    context_length=512,
    ffn_hidden_size=1536,
    dropout=0.1,
)
LOADER = functools.partial(SyntheticLoader, vocab_size=VOCAB, windows=1024)


def cfg(world_size: int = 1, **train_kw: Any) -> RuntimeConfig:
    t = {
        "global_batch_size": 32,
        "micro_batch_size": 16,
        "world_size": world_size,
        "max_steps": 40,
        "log_every_steps": 10,
        "val_every_steps": 20,
        "val_batches": 2,
        "metrics_enabled": False,
        **train_kw,
    }
    return RuntimeConfig(MODEL, OptimizerConfig(lr=1e-3), ScheduleConfig(warmup_steps=5), TrainConfig(**t))


def run(c: RuntimeConfig, events: list[ProgressEvent], **ctx: Any) -> TrainResult:
    started = time.perf_counter()
    res = train(c, LOADER, on_progress=events.append, ctx=RunContext(metrics_addr="127.0.0.1", **ctx))
    last = [e for e in events if e.stage == "training"][-1]
    print(
        f"\n{torch.cuda.get_device_name()} {c.train.precision} fsdp={dist.is_initialized()} "
        f"compile={c.train.compile}: {res.final_step} steps in {time.perf_counter() - started:.1f}s, "
        f"loss {res.losses[0]:.3f} → {res.losses[-1]:.3f}, {last.tokens_per_second:,.0f} tok/s, mfu {last.mfu}"
    )
    return res


def test_bf16_autocast_single_process_reports_mfu() -> None:
    events: list[ProgressEvent] = []
    port = _free_port()
    scraped: list[str] = []

    def scrape(event: ProgressEvent) -> None:
        events.append(event)
        if event.stage == "validation" and not scraped:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                scraped.append(r.read().decode())

    c = cfg(metrics_enabled=True, metrics_port=port)
    started = time.perf_counter()
    res = train(c, LOADER, on_progress=scrape, ctx=RunContext(metrics_addr="127.0.0.1"))
    print(
        f"\nsingle bf16: {time.perf_counter() - started:.1f}s losses {res.losses[0]:.3f} → {res.losses[-1]:.3f}"
    )
    assert all(math.isfinite(x) for x in res.losses) and res.losses[-1] < res.losses[0]
    train_events = [e for e in events if e.stage == "training"]
    print([(e.step, round(e.tokens_per_second or 0), e.mfu) for e in train_events])
    assert all(e.mfu is not None and 0 < e.mfu < 1 for e in train_events)
    assert re.search(r"^llmtrain_train_mfu_ratio\{.*\} 0\.\d+", scraped[0], re.M)
    peak = re.search(r'^llmtrain_train_peak_memory_bytes\{device="([^"]+)".*\} (\S+)', scraped[0], re.M)
    assert peak is not None and "H" in peak.group(1) and float(peak.group(2)) > 1e6
    # bf16 really is on: fp32 numerics differ.
    fp32 = run(cfg(precision="fp32", max_steps=2), [])
    assert fp32.losses[0] != res.losses[0]


@pytest.fixture
def nccl_group() -> Iterator[None]:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_fsdp2_nccl_bf16_checkpoint_resume(nccl_group: None, tmp_path: Path) -> None:
    c = cfg(checkpoint_uri=str(tmp_path), checkpoint_every_steps=20, max_steps=40)
    first = run(c, [])
    assert first.final_step == 40 and all(math.isfinite(x) for x in first.losses)
    assert first.losses[-1] < first.losses[0]
    # Drop the last checkpoint: the rerun resumes from step 20 (CUDA RNG restored) and replays.
    from llmtrain.runtime.checkpoint import Lineage

    Lineage(str(tmp_path), 3).store.delete_dir("step_00000040")
    again = run(c, [])
    assert again.resumed_from == 20 and again.steps[0] == 21
    # Same kernels, same inputs, same RNG: the replay matches closely (atomics may differ).
    assert again.losses == pytest.approx(first.losses[20:], rel=1e-3)


def test_fsdp2_compiled_blocks(nccl_group: None) -> None:
    res = run(cfg(compile=True, max_steps=20, val_every_steps=100), [])
    assert all(math.isfinite(x) for x in res.losses) and res.losses[-1] < res.losses[0]


GPT2_SMALL = ModelConfig(
    vocab_size=32768,
    n_layers=12,
    d_model=768,
    n_heads=12,
    n_kv_heads=12,
    context_length=1024,
    ffn_hidden_size=2048,
)


@pytest.mark.slow
@pytest.mark.parametrize("compiled", [False, True])
def test_throughput_gpt2_small(nccl_group: None, compiled: bool) -> None:
    """Tokens/s and MFU of a GPT-2-small-shaped model, FSDP2 on one GPU, bf16 (printed)."""
    c = RuntimeConfig(
        GPT2_SMALL,
        OptimizerConfig(lr=6e-4),
        ScheduleConfig(warmup_steps=5),
        TrainConfig(
            global_batch_size=32,
            micro_batch_size=16,
            world_size=1,
            max_steps=30,
            log_every_steps=10,
            val_every_steps=1000,
            val_batches=1,
            metrics_enabled=False,
            compile=compiled,
        ),
    )
    events: list[ProgressEvent] = []
    loader = functools.partial(SyntheticLoader, vocab_size=32768, windows=2048)
    res = train(c, loader, on_progress=events.append, ctx=RunContext())
    windows = [
        (e.step, round(e.tokens_per_second or 0), round(e.mfu or 0, 4))
        for e in events
        if e.stage == "training"
    ]
    print(f"\n{torch.cuda.get_device_name()} gpt2-small bf16 fsdp compile={compiled}: {windows}")
    print(f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    assert all(math.isfinite(x) for x in res.losses)


def test_adamw_is_fused_on_gpu() -> None:
    """train()'s optimizer uses the fused AdamW kernel when the parameters live on a GPU (and on
    plain CPU tensors: tests/unit/test_launch_in_process.py)."""
    from llmtrain.runtime.model import GPT
    from llmtrain.runtime.train import build_optimizer

    on_gpu = GPT(MODEL).to("cuda")
    assert build_optimizer(on_gpu, OptimizerConfig()).defaults["fused"] is True
    assert not build_optimizer(on_gpu, OptimizerConfig(), fused=False).defaults["fused"]
