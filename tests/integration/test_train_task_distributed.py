"""Task fine-tuning (loss on the answers only, #27 item 2) on 2 gloo ranks with FSDP2.

Each rank's micro batches hold different numbers of answer tokens, so the step's loss must be
Σ answer-token losses / Σ answer tokens over every micro batch and rank (the count all-reduce in
``train._count_targets``): one process = 2 FSDP2 ranks = 2 ranks × half micro batch × 2 accum.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pytest
import torch
from llmtrain.runtime.data.loader import ShardLoader
from llmtrain.runtime.data.prepare import prepare_data
from llmtrain.runtime.synthetic import run_ranks, train_worker

from llmtrain.api.config import ModelConfig, OptimizerConfig, RuntimeConfig, ScheduleConfig, TrainConfig
from llmtrain.api.shards import MANIFEST_NAME, Manifest
from tests.unit.test_data_task import CONTEXT, task_data_spec, write_task_files

pytestmark = pytest.mark.timeout(600)


def config(vocab: int, world_size: int, micro: int) -> dict[str, Any]:
    model = ModelConfig(vocab_size=vocab, n_layers=2, d_model=32, n_heads=4, n_kv_heads=2,
                        context_length=CONTEXT, ffn_hidden_size=96, tie_embeddings=True)  # fmt: skip
    t = TrainConfig(global_batch_size=4, micro_batch_size=micro, world_size=world_size, max_steps=6,
                    log_every_steps=3, val_every_steps=3, val_batches=2, metrics_enabled=False)  # fmt: skip
    return RuntimeConfig(
        model, OptimizerConfig(lr=3e-3), ScheduleConfig(warmup_steps=2, decay="cosine"), t
    ).to_dict()


def test_task_loss_is_the_same_on_one_process_fsdp_and_accumulation(tmp_path: Path) -> None:
    folder = tmp_path / "src"
    folder.mkdir()
    out = tmp_path / "out"
    prepare_data(task_data_spec(write_task_files(folder), out))
    m = Manifest.from_json((out / MANIFEST_NAME).read_text())
    assert m.masked
    loader = functools.partial(ShardLoader, str(out))
    vocab = m.tokenizer.vocab_size
    single = train_worker(config(vocab, 1, 4), None, {"gather_weights": True}, None, loader)
    fsdp = run_ranks(2, train_worker, config(vocab, 2, 2), None, {"gather_weights": True}, None, loader)
    accum = run_ranks(2, train_worker, config(vocab, 2, 1), None, {"gather_weights": True}, None, loader)
    assert len(single.losses) == 6 and single.losses[-1] < single.losses[0]
    for other in (fsdp[0], fsdp[1], accum[0]):
        assert other.losses == pytest.approx(single.losses, rel=1e-5, abs=0)
        for name, w in single.weights.items():
            torch.testing.assert_close(other.weights[name], w, rtol=1e-5, atol=2e-6, msg=name)
    # Validation reads workers × microBatchSize × batches windows: the same 8 for 1 × 4 and 2 × 2.
    for other in (fsdp[0], fsdp[1]):
        assert [v["loss"] for v in other.validations] == pytest.approx(
            [v["loss"] for v in single.validations], rel=1e-5, abs=0
        )
