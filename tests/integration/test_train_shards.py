"""The train loop on the data pipeline's real shards and ShardLoader (not the synthetic one):
2 ranks learn, validate on the held-out split, and resume bitwise from a checkpoint that holds
the ShardLoader's per-rank state."""

from __future__ import annotations

import functools
import math
from pathlib import Path

import pytest
from llmtrain.runtime.checkpoint import Lineage
from llmtrain.runtime.data.loader import ShardLoader
from llmtrain.runtime.data.prepare import prepare_data
from llmtrain.runtime.synthetic import run_ranks, train_worker

from llmtrain.api.config import runtime_config_from_spec
from tests.data.datahelpers import make_spec, stdlib_sample, write_docs


@pytest.mark.slow
def test_two_ranks_train_and_resume_on_prepared_shards(tmp_path: Path) -> None:
    write_docs(tmp_path / "src", stdlib_sample(12))
    spec = make_spec(
        {
            "sources": [
                {"name": "py", "local": {"glob": str(tmp_path / "src" / "*.txt"), "textUnit": "file"}}
            ],
            "tokenizer": {"train": {"vocabSize": 400}},
            "outputUri": str(tmp_path / "data"),
            "validationFraction": 0.2,
        },
        model={
            "architecture": {"layers": 2, "dModel": 32, "heads": 4, "contextLength": 32, "multipleOf": 16}
        },
        training={
            "optimizer": {"lr": 0.003},
            "batch": {"globalBatchSize": 8, "microBatchSize": 2},
            "duration": {"maxSteps": 10},
            "logEverySteps": 1,
        },
        validation={"everySteps": 5, "batches": 2},
        checkpoint={"uri": str(tmp_path / "ckpt"), "everySteps": 5},
        metrics={"enabled": False},
        resources={"workers": 2},
    )
    prepared = prepare_data(spec, executor="local")
    cfg = runtime_config_from_spec(spec, vocab_size=prepared.manifest.tokenizer.vocab_size)
    assert cfg.model.vocab_size == 448  # 400 padded to vocabMultipleOf 64
    factory = functools.partial(ShardLoader, str(tmp_path / "data"))

    first = run_ranks(2, train_worker, cfg.to_dict(), None, None, None, factory)[0]
    assert all(math.isfinite(x) for x in first.losses)
    assert first.losses[-1] < first.losses[0] - 0.2  # it learns (ln 448 ≈ 6.1 at the start)
    assert [v["step"] for v in first.validations] == [5, 10]

    Lineage(str(tmp_path / "ckpt"), 3).store.delete_dir("step_00000010")
    again = run_ranks(2, train_worker, cfg.to_dict(), None, None, None, factory)[0]
    assert again.resumed_from == 5
    assert again.losses == first.losses[5:]  # bitwise: the ShardLoader continued exactly
    assert again.validations[-1] == first.validations[-1]
