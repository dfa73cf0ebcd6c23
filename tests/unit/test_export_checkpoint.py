"""Offline export from llmtrain checkpoints (``llmtrain export --checkpoint``) and the weights-only
``spec.model.init.checkpoint`` path, on checkpoints written by the real train loop."""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from llmtrain.runtime.checkpoint import CheckpointCorruptError, Lineage
from llmtrain.runtime.export import (
    ExportError,
    TokenizerFiles,
    export_checkpoint,
    model_config_dict,
    resolve_checkpoint,
    tokenizer_from_data,
)
from llmtrain.runtime.hf_import import ModelImportError, load_initial_weights
from llmtrain.runtime.model import GPT
from llmtrain.runtime.synthetic import SyntheticLoader, tiny_spec_dict
from llmtrain.runtime.train import RunContext, TrainResult, train
from typer.testing import CliRunner

from llmtrain.api.config import RuntimeConfig, runtime_config_from_spec
from llmtrain.api.shards import Manifest, TokenizerInfo
from llmtrain.api.spec import LLMTrainingJobSpec
from tests.unit.test_export import hf_logits, tokenizer  # noqa: F401
from tests.unit.test_generate import cli

OVER = {
    "model.architecture.heads": 4,
    "model.architecture.kvHeads": 2,
    "model.architecture.ropeTheta": 50_000.0,
    "model.architecture.contextLength": 32,
    "training.duration.maxSteps": 3,
    "validation.batches": 2,
}


def spec_dict(ckpt: Path, **over: Any) -> dict[str, Any]:
    return tiny_spec_dict(**{**OVER, "checkpoint.uri": str(ckpt), **over})


def config_of(raw: dict[str, Any], vocab: int) -> RuntimeConfig:
    return runtime_config_from_spec(LLMTrainingJobSpec.model_validate(raw), vocab_size=vocab)


def run(cfg: RuntimeConfig) -> TrainResult:
    loader = functools.partial(SyntheticLoader, vocab_size=60, windows=32)
    return train(cfg, loader, ctx=RunContext(metrics_addr="127.0.0.1", gather_weights=True))


def write_job(path: Path, raw: dict[str, Any]) -> Path:
    job = {
        "apiVersion": "llmtrain.dev/v1alpha1",
        "kind": "LLMTrainingJob",
        "metadata": {"name": "t"},
        "spec": raw,
    }
    path.write_text(yaml.safe_dump(job))
    return path


def ours_logits(weights: dict[str, torch.Tensor], cfg: RuntimeConfig, ids: torch.Tensor) -> torch.Tensor:
    model = GPT(cfg.model)
    model.load_state_dict(weights)
    with torch.no_grad():
        return model.eval()(ids)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_cli_export_from_a_training_checkpoint(tmp_path: Path, tokenizer: TokenizerFiles, tied: bool) -> None:  # noqa: F811
    raw = spec_dict(tmp_path / "ckpt", **{"model.architecture.tieEmbeddings": tied})
    cfg = config_of(raw, tokenizer.vocab_size)
    result = run(cfg)
    assert result.weights is not None
    (tmp_path / "tokenizer.json").write_bytes(tokenizer.json_bytes)
    args = ["export", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf")]
    args += [
        "--job",
        str(write_job(tmp_path / "job.yaml", raw)),
        "--tokenizer",
        str(tmp_path / "tokenizer.json"),
    ]
    r = CliRunner().invoke(cli(), args)
    assert r.exit_code == 0, r.output
    assert "step 3" in r.output
    ids = torch.randint(0, 60, (2, 32), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(
        hf_logits(tmp_path / "hf", ids), ours_logits(result.weights, cfg, ids), atol=1e-4, rtol=0
    )
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["tie_word_embeddings"] is tied and config["num_key_value_heads"] == 2
    assert config["vocab_size"] == cfg.model.vocab_size


def test_checkpoint_uri_forms_and_read_only_resolution(tmp_path: Path, tokenizer: TokenizerFiles) -> None:  # noqa: F811
    raw = spec_dict(tmp_path / "ckpt", **{"checkpoint.everySteps": 1, "checkpoint.keepLast": 3})
    spec = LLMTrainingJobSpec.model_validate(raw)
    run(config_of(raw, tokenizer.vocab_size))
    # A crashed save newer than the newest complete one: resolution must not delete it.
    crashed = tmp_path / "ckpt" / "step_00000009"
    crashed.mkdir()
    (crashed / "__0_0.distcp").write_bytes(b"partial")
    assert resolve_checkpoint(str(tmp_path / "ckpt")).step == 3
    assert crashed.exists()
    ref = resolve_checkpoint(str(tmp_path / "ckpt" / "step_00000002") + "/")
    assert ref.step == 2 and ref.uri.endswith("/step_00000002")
    with pytest.raises(ExportError, match="not a complete checkpoint"):
        resolve_checkpoint(str(crashed))
    with pytest.raises(ExportError, match="no complete checkpoint"):
        resolve_checkpoint(str(tmp_path / "empty"))
    # Step 2 exports step 2's weights (not the newest).
    ref2, _ = export_checkpoint(
        str(tmp_path / "ckpt" / "step_00000002"), str(tmp_path / "hf2"), tokenizer, job=spec
    )
    ref3, _ = export_checkpoint(str(tmp_path / "ckpt"), str(tmp_path / "hf3"), tokenizer, job=spec)
    assert (ref2.step, ref3.step) == (2, 3)
    assert (tmp_path / "hf2" / "model.safetensors").read_bytes() != (
        tmp_path / "hf3" / "model.safetensors"
    ).read_bytes()


def test_export_needs_an_architecture_and_checks_it(tmp_path: Path, tokenizer: TokenizerFiles) -> None:  # noqa: F811
    raw = spec_dict(tmp_path / "ckpt")
    trained = config_of(raw, tokenizer.vocab_size)
    run(trained)
    # train() records the architecture in each COMPLETE marker: no job needed.
    export_checkpoint(str(tmp_path / "ckpt"), str(tmp_path / "from-marker"), tokenizer)
    hf_config = json.loads((tmp_path / "from-marker" / "config.json").read_text())
    assert hf_config["num_key_value_heads"] == trained.model.n_kv_heads
    # A checkpoint whose markers do not (another writer's): the job must say it, and is checked.
    for marker in (tmp_path / "ckpt").glob("step_*/COMPLETE"):
        meta = json.loads(marker.read_text())
        del meta["model"]
        marker.write_text(json.dumps(meta))
    with pytest.raises(ExportError, match="--job"):
        export_checkpoint(str(tmp_path / "ckpt"), str(tmp_path / "a"), tokenizer)
    wrong = LLMTrainingJobSpec.model_validate(
        {**raw, **spec_dict(tmp_path / "ckpt", **{"model.architecture.kvHeads": 4})}
    )
    with pytest.raises(ExportError, match=r"layers\.0\.attention\.wk\.weight.*\[16, 32\].*needs \[32, 32\]"):
        export_checkpoint(str(tmp_path / "ckpt"), str(tmp_path / "b"), tokenizer, job=wrong)
    r = CliRunner().invoke(
        cli(), ["export", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "c")]
    )
    assert r.exit_code == 1 and "--tokenizer" in r.output
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_marker_config_is_enough(tmp_path: Path, tokenizer: TokenizerFiles) -> None:  # noqa: F811
    """A checkpoint whose COMPLETE marker records the model config exports without a job."""
    cfg = config_of(spec_dict(tmp_path / "unused"), tokenizer.vocab_size).model
    model = GPT(cfg)
    model.init_weights(seed=4)
    Lineage(str(tmp_path / "ckpt"), 1).save(
        7, {"model": model.state_dict()}, {"model": model_config_dict(cfg)}
    )
    ref, got = export_checkpoint(str(tmp_path / "ckpt"), str(tmp_path / "hf"), tokenizer)
    assert ref.step == 7 and got == cfg
    ids = torch.randint(0, 60, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf_logits(tmp_path / "hf", ids), model(ids), atol=1e-4, rtol=0)


def test_tokenizer_from_the_data_directory(tmp_path: Path, tokenizer: TokenizerFiles) -> None:  # noqa: F811
    (tmp_path / "tok.json").write_bytes(tokenizer.json_bytes)
    info = TokenizerInfo(
        path="tok.json", sha256="x", vocab_size=320, eot_id=tokenizer.eot_id, eot_token="<|endoftext|>"
    )
    manifest = Manifest(
        fingerprint="f", tokenizer=info, dtype="uint16", shards=[], sources=[], dropped={}, seed=0
    )
    (tmp_path / "manifest.json").write_text(manifest.to_json())
    assert tokenizer_from_data(str(tmp_path)) == tokenizer
    assert tokenizer_from_data(str(tmp_path / "tok.json")) == tokenizer
    bad = dataclasses.replace(manifest, tokenizer=dataclasses.replace(info, eot_id=5))
    (tmp_path / "manifest.json").write_text(bad.to_json())
    with pytest.raises(ExportError, match="id 5"):
        tokenizer_from_data(str(tmp_path))
    with pytest.raises(ExportError, match=r"spec\.data\.outputUri"):
        tokenizer_from_data(str(tmp_path / "nothing"))


def test_init_from_checkpoint_loads_weights_only(tmp_path: Path, tokenizer: TokenizerFiles) -> None:  # noqa: F811
    raw = spec_dict(tmp_path / "ckpt")
    first = run(config_of(raw, tokenizer.vocab_size))
    assert first.weights is not None
    init = {"model.init.random": None, "model.init.checkpoint": {"uri": str(tmp_path / "ckpt")}}
    cfg = config_of(spec_dict(tmp_path / "ckpt2", **init), tokenizer.vocab_size)
    assert (cfg.train.init_kind, cfg.train.init_uri) == ("checkpoint", str(tmp_path / "ckpt"))
    model = GPT(cfg.model)
    model.init_weights()
    load_initial_weights(model, cfg)
    for name, value in model.state_dict().items():
        assert torch.equal(value, first.weights[name]), name
    bad = config_of(
        spec_dict(tmp_path / "ckpt2", **init, **{"model.architecture.layers": 3}), tokenizer.vocab_size
    )
    with pytest.raises(ModelImportError, match=r"layers\.2\..* has no|has no layers\.2"):
        load_initial_weights(GPT(bad.model), bad)
    wide = config_of(
        spec_dict(tmp_path / "ckpt2", **init, **{"model.architecture.ffnHiddenSize": 64}),
        tokenizer.vocab_size,
    )
    with pytest.raises(ModelImportError, match=r"w1\.weight has shape \[96, 32\].*gives \[64, 32\]"):
        load_initial_weights(GPT(wide.model), wide)
    missing = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, init_uri=str(tmp_path / "none")))
    with pytest.raises(ModelImportError, match=r"spec\.model\.init\.checkpoint\.uri"):
        load_initial_weights(GPT(cfg.model), missing)
    # A corrupt .metadata is named before it is unpickled.
    (meta := next((tmp_path / "ckpt").glob("step_*/.metadata"))).write_bytes(b"x" + meta.read_bytes()[1:])
    with pytest.raises(CheckpointCorruptError, match=r"step_\d+/\.metadata: .*corrupt"):
        load_initial_weights(GPT(cfg.model), cfg)
