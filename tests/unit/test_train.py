"""The training loop in one process (no process group): every training/validation/checkpoint/
metrics spec field changes what the loop does."""

from __future__ import annotations

import functools
import math
import re
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import torch
from llmtrain.runtime.checkpoint import Lineage
from llmtrain.runtime.model import GPT, token_loss_sum
from llmtrain.runtime.synthetic import AskOnCall, SyntheticLoader, _free_port, tiny_spec_dict
from llmtrain.runtime.train import (
    NonFiniteError,
    RunContext,
    TrainResult,
    build_loss,
    build_model,
    build_optimizer,
    clip_grad_norm,
    lr_at,
    resolve_precision,
    train,
)

from llmtrain.api.config import (
    ModelConfig,
    OptimizerConfig,
    RuntimeConfig,
    ScheduleConfig,
    runtime_config_from_spec,
)
from llmtrain.api.progress import ProgressEvent
from llmtrain.api.spec import LLMTrainingJobSpec

LOADER = functools.partial(SyntheticLoader, vocab_size=60, windows=32)


def cfg_from(**overrides: Any) -> RuntimeConfig:
    spec = LLMTrainingJobSpec.model_validate(tiny_spec_dict(**overrides))
    return runtime_config_from_spec(spec, vocab_size=60)


def run(cfg: RuntimeConfig, events: list[ProgressEvent] | None = None, **ctx: Any) -> TrainResult:
    sink = events.append if events is not None else None
    return train(cfg, LOADER, on_progress=sink, ctx=RunContext(metrics_addr="127.0.0.1", **ctx))


# ------------------------------------------------------------------- schedule, optimizer


def test_lr_schedule_warmup_then_decay() -> None:
    opt = OptimizerConfig(lr=1.0)
    warm = ScheduleConfig(warmup_steps=4, decay="cosine", min_lr=0.1)
    assert [lr_at(s, opt, warm, 14) for s in range(4)] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert lr_at(4, opt, warm, 14) == pytest.approx(1.0)
    assert lr_at(9, opt, warm, 14) == pytest.approx(0.55)  # cosine midpoint between lr and minLr
    assert lr_at(14, opt, warm, 14) == pytest.approx(0.1)
    linear = ScheduleConfig(warmup_steps=0, decay="linear", min_lr=0.0)
    assert lr_at(5, opt, linear, 10) == pytest.approx(0.5)
    constant = ScheduleConfig(warmup_steps=0, decay="constant", min_lr=0.0)
    assert lr_at(9, opt, constant, 10) == 1.0


def test_schedule_spec_fields_drive_the_loop_lr() -> None:
    """spec.training.optimizer.lr / schedule.* reach the optimizer, step by step."""
    base = {
        "training.duration.maxSteps": 6,
        "training.optimizer.lr": 0.01,
        "training.schedule.warmupSteps": 2,
        "training.schedule.minLr": 0.001,
    }
    cos = run(cfg_from(**base, **{"training.schedule.decay": "cosine"})).lrs
    lin = run(cfg_from(**base, **{"training.schedule.decay": "linear"})).lrs
    const = run(cfg_from(**base, **{"training.schedule.decay": "constant"})).lrs
    assert cos[:2] == pytest.approx([0.01 / 3, 0.02 / 3]) and cos[2] == pytest.approx(0.01)
    assert lin[4] == pytest.approx(0.01 - 0.009 * 0.5) and cos[4] == pytest.approx(
        0.001 + 0.009 * 0.5 * (1 + math.cos(math.pi / 2))
    )
    assert const[2:] == pytest.approx([0.01] * 4)
    assert cos[3] != pytest.approx(lin[3])


def _one_step(opt_cfg: OptimizerConfig, grad: float = 0.0) -> GPT:
    model = GPT(cfg_from().model)
    model.init_weights()
    optimizer = build_optimizer(model, opt_cfg)
    for p in model.parameters():
        p.grad = torch.full_like(p, grad)
    optimizer.step()
    return model


def test_weight_decay_applies_to_2d_weights_only() -> None:
    """spec.training.optimizer.weightDecay: decoupled decay of matrices/embedding, never norms."""
    ref = GPT(cfg_from().model)
    ref.init_weights()
    model = _one_step(OptimizerConfig(lr=0.1, weight_decay=0.5))
    w, w0 = model.layers[0].attention.wq.weight, ref.layers[0].attention.wq.weight
    torch.testing.assert_close(w, w0 * (1 - 0.1 * 0.5))  # zero gradient: only the decay moves it
    torch.testing.assert_close(model.tok_embeddings.weight, ref.tok_embeddings.weight * 0.95)
    assert torch.equal(model.norm.weight, ref.norm.weight)  # 1-D: no decay
    no_decay = _one_step(OptimizerConfig(lr=0.1, weight_decay=0.0))
    torch.testing.assert_close(no_decay.layers[0].attention.wq.weight, w0)


def test_adamw_betas_eps_and_sgd_momentum_nesterov() -> None:
    """spec.training.optimizer.{type,beta1,beta2,eps,momentum,nesterov} shape the update."""
    cfg = cfg_from(
        **{
            "training.optimizer.beta1": 0.8,
            "training.optimizer.beta2": 0.9,
            "training.optimizer.eps": 1e-6,
        }
    )
    opt = build_optimizer(GPT(cfg.model), cfg.optimizer)
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.param_groups[0]["betas"] == (0.8, 0.9) and opt.param_groups[0]["eps"] == 1e-6

    def update(**kw: Any) -> torch.Tensor:
        ref = GPT(cfg.model)
        ref.init_weights()
        moved = _one_step(OptimizerConfig(lr=0.1, weight_decay=0.0, **kw), grad=1e-3)
        return moved.norm.weight - ref.norm.weight

    # beta1/beta2 act from the second step on (bias correction makes the first step lr·sign(g)).
    three = {"training.duration.maxSteps": 3}
    default = run(cfg_from(**three)).losses
    assert run(cfg_from(**three, **{"training.optimizer.beta1": 0.5})).losses[2] != default[2]
    assert run(cfg_from(**three, **{"training.optimizer.beta2": 0.5})).losses[2] != default[2]
    # Adam's first step is lr·g/(√g² + eps): eps comparable to g shrinks it.
    assert update(eps=1e-8).abs().mean() > 5 * update(eps=1e-2).abs().mean()
    sgd_cfg = cfg_from(**{"training.optimizer.type": "sgd", "training.optimizer.weightDecay": 0.0})
    sgd = build_optimizer(GPT(sgd_cfg.model), sgd_cfg.optimizer)
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["momentum"] == 0.9
    # Two SGD steps with the same gradient: momentum makes the second one bigger, nesterov bigger still.
    moves = {}
    variants: dict[str, dict[str, Any]] = {
        "none": {"momentum": 0.0},
        "momentum": {"momentum": 0.5},
        "nesterov": {"momentum": 0.5, "nesterov": True},
    }
    for name, kw in variants.items():
        p = torch.nn.Parameter(torch.zeros(3))
        o = torch.optim.SGD([p], lr=1.0, **kw)  # same construction as build_optimizer's
        o2 = build_optimizer(GPT(sgd_cfg.model), OptimizerConfig(type="sgd", **kw))
        assert o2.param_groups[0]["momentum"] == kw["momentum"]
        assert o2.param_groups[0]["nesterov"] == kw.get("nesterov", False)
        for _ in range(2):
            p.grad = torch.ones(3)
            o.step()
        moves[name] = -p[0].item()
    assert moves["none"] < moves["momentum"] < moves["nesterov"]
    # And the loop trains with SGD: sgd and adamw runs differ.
    adam_run = run(cfg_from(**{"training.duration.maxSteps": 2}))
    sgd_run = run(cfg_from(**{"training.duration.maxSteps": 2, "training.optimizer.type": "sgd"}))
    assert adam_run.losses[1] != sgd_run.losses[1]


def test_grad_clip_bounds_the_global_norm() -> None:
    """spec.training.gradClip: clip to the global L2 norm; 0 measures only."""
    model = GPT(cfg_from().model)
    model.init_weights()

    def backward() -> None:
        model.zero_grad()
        model(torch.randint(0, 60, (2, 16))).square().mean().backward()

    backward()
    raw = [p.grad.clone() for p in model.parameters()]
    norm = clip_grad_norm(model, 0.0)
    assert norm.item() == pytest.approx(torch.cat([g.flatten() for g in raw]).norm().item(), rel=1e-5)
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), raw, strict=True))
    clip_grad_norm(model, norm.item() / 4)
    after = torch.cat([p.grad.flatten() for p in model.parameters()]).norm().item()
    assert after == pytest.approx(norm.item() / 4, rel=1e-4)
    # Through the loop: the run with gradClip 1e-3 moves far less than an unclipped one.
    steps = {"training.duration.maxSteps": 3, "training.optimizer.type": "sgd", "training.optimizer.lr": 0.5}
    clipped = run(cfg_from(**steps, **{"training.gradClip": 1e-3}))
    free = run(cfg_from(**steps, **{"training.gradClip": 0}))
    assert clipped.losses[0] == free.losses[0]
    assert abs(clipped.losses[2] - clipped.losses[0]) < abs(free.losses[2] - free.losses[0])


# ----------------------------------------------------------------------- loop settings


def test_duration_epochs_steps_tokens() -> None:
    """spec.training.duration.{epochs,maxSteps,maxTokens}; the loader's epochs advance."""
    # 32 windows, micro 2, 1 rank → 16 micro batches per epoch; global 4 → accum 2 → 8 steps/epoch.
    by_epochs = run(cfg_from(**{"training.duration.maxSteps": None, "training.duration.epochs": 2}))
    assert by_epochs.final_step == by_epochs.total_steps == 16
    by_steps = run(cfg_from(**{"training.duration.maxSteps": 3}))
    assert by_steps.final_step == 3
    # maxTokens rounds up to whole steps of 4 × 16 tokens.
    by_tokens = run(cfg_from(**{"training.duration.maxSteps": None, "training.duration.maxTokens": 130}))
    assert by_tokens.final_step == 3


def test_batch_sizes_set_accumulation_and_tokens() -> None:
    """spec.training.batch.{globalBatchSize,microBatchSize}: tokens per step and micro batches."""
    events: list[ProgressEvent] = []
    res = run(cfg_from(**{"training.batch.globalBatchSize": 8, "training.batch.microBatchSize": 2}), events)
    assert events[-1].tokens == 4 * 8 * 16
    assert cfg_from(**{"training.batch.globalBatchSize": 8}).train.grad_accum_steps == 4
    # Same global batch in 1×4 or 2×2 micro batches: the same losses (token means).
    whole = run(cfg_from(**{"training.batch.microBatchSize": 4}))
    split = run(cfg_from(**{"training.batch.microBatchSize": 2}))
    assert whole.losses == pytest.approx(split.losses, rel=1e-5)
    assert res.final_step == 4


def test_seed_sets_data_order_and_dropout() -> None:
    """spec.training.seed: same seed → bitwise same run; another seed → another run."""
    drop = {"model.architecture.dropout": 0.2, "training.duration.maxSteps": 2}
    a = run(cfg_from(**drop))
    assert run(cfg_from(**drop)).losses == a.losses
    assert run(cfg_from(**drop, **{"training.seed": 1})).losses != a.losses


def test_precision_bf16_autocast_and_auto_is_fp32_on_cpu() -> None:
    """spec.training.precision: auto → fp32 on CPU, bf16 on GPU; bf16 changes the numerics."""
    assert resolve_precision("auto", torch.device("cpu")) == torch.float32
    assert resolve_precision("auto", torch.device("cuda")) == torch.bfloat16
    fp32 = run(cfg_from(**{"training.precision": "fp32", "training.duration.maxSteps": 1}))
    auto = run(cfg_from(**{"training.precision": "auto", "training.duration.maxSteps": 1}))
    bf16 = run(cfg_from(**{"training.precision": "bf16", "training.duration.maxSteps": 1}))
    assert fp32.losses == auto.losses
    assert bf16.losses[0] != fp32.losses[0] and bf16.losses[0] == pytest.approx(fp32.losses[0], rel=0.02)


def test_activation_checkpointing_and_compile_reach_the_model() -> None:
    """spec.training.fsdp.activationCheckpointing and spec.training.compile."""
    cpu = torch.device("cpu")
    plain = build_model(cfg_from(), cpu, use_fsdp=False)
    assert not plain.activation_checkpointing and not hasattr(
        plain.layers[0].forward, "_torchdynamo_orig_callable"
    )
    ac = build_model(cfg_from(**{"training.fsdp.activationCheckpointing": True}), cpu, use_fsdp=False)
    assert ac.activation_checkpointing
    compiled = build_model(cfg_from(**{"training.compile": True}), cpu, use_fsdp=False)
    assert all(hasattr(block.forward, "_torchdynamo_orig_callable") for block in compiled.layers)
    assert compiled.state_dict().keys() == plain.state_dict().keys()
    # Same weights, same forward (AC recompute is exact).
    x = torch.randint(0, 60, (2, 16))
    torch.testing.assert_close(ac(x), plain(x))
    res_ac = run(cfg_from(**{"training.fsdp.activationCheckpointing": True, "training.duration.maxSteps": 2}))
    assert res_ac.losses == pytest.approx(run(cfg_from(**{"training.duration.maxSteps": 2})).losses, rel=1e-6)


def test_log_every_steps_and_progress_events() -> None:
    """spec.training.logEverySteps: one training event per N steps (and at the end)."""
    events: list[ProgressEvent] = []
    res = run(cfg_from(**{"training.logEverySteps": 2, "training.duration.maxSteps": 5}), events)
    train_events = [e for e in events if e.stage == "training"]
    assert [e.step for e in train_events] == [2, 4, 5]
    assert train_events[-1].train_loss == res.losses[-1] and res.steps == [1, 2, 3, 4, 5]
    assert all(e.total_steps == 5 and e.tokens_per_second and e.mfu is None for e in train_events)
    assert train_events[0].eta_seconds is not None and train_events[-1].eta_seconds == 0


def test_validation_every_steps_and_batches() -> None:
    """spec.validation.{everySteps,batches}: when, and over how many windows; best kept."""
    events: list[ProgressEvent] = []
    res = run(
        cfg_from(**{"validation.everySteps": 2, "validation.batches": 3, "training.duration.maxSteps": 5}),
        events,
    )
    assert [v["step"] for v in res.validations] == [2, 4, 5]
    val_events = [e for e in events if e.stage == "validation"]
    assert [e.val_loss for e in val_events] == [v["loss"] for v in res.validations]
    v = res.validations[0]
    assert v["perplexity"] == pytest.approx(math.exp(v["loss"])) and 0 <= v["accuracy"] <= 1
    assert res.best_val_loss == min(x["loss"] for x in res.validations)
    fewer = run(
        cfg_from(**{"validation.everySteps": 2, "validation.batches": 1, "training.duration.maxSteps": 2})
    )
    assert fewer.validations[0]["loss"] != res.validations[0]["loss"]  # other windows


def test_nan_stops_with_the_step_and_no_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMTRAIN_FAULT_NAN_AT_STEP", "3")
    cfg = cfg_from(
        **{
            "checkpoint.uri": str(tmp_path),
            "checkpoint.everySteps": 2,
            "training.logEverySteps": 100,
            "training.duration.maxSteps": 6,
        }
    )
    with pytest.raises(NonFiniteError, match=r"non-finite loss at step 3"):
        run(cfg)
    assert Lineage(str(tmp_path), 3).complete_steps() == [2]  # step 4's save found the NaN first


def test_checkpoint_every_steps_keep_last_and_resume(tmp_path: Path) -> None:
    """spec.checkpoint.{uri,everySteps,keepLast}: saves, pruning, and an exact resume."""
    over = {"checkpoint.uri": str(tmp_path), "checkpoint.everySteps": 2, "checkpoint.keepLast": 2}
    events: list[ProgressEvent] = []
    first = run(cfg_from(**over, **{"training.duration.maxSteps": 5}), events)
    assert [Path(u).name for u in first.checkpoints] == ["step_00000002", "step_00000004", "step_00000005"]
    assert Lineage(str(tmp_path), 2).complete_steps() == [4, 5]
    ck = [e for e in events if e.stage == "checkpoint"]
    assert [(e.checkpoint_step, e.checkpoint_uri) for e in ck][-1] == (5, f"{tmp_path}/step_00000005")
    assert run(cfg_from(**over, **{"training.duration.maxSteps": 5})).steps == []  # already done
    # ...and a launcher that listens (Ray Train, a tuning trial) still hears where it stands:
    # one report at the last step with its validation, or a trial resumed from its final
    # checkpoint would count as stopped at step 0.
    heard: list[dict[str, Any]] = []
    run(cfg_from(**over, **{"training.duration.maxSteps": 5}), report=heard.append)
    assert [(r["step"], "val_loss" in r) for r in heard] == [(5, True)]
    # The marker carries the architecture, so export needs no job spec (export.py reads it).
    marker = Lineage(str(tmp_path), 2).info(5).meta
    assert ModelConfig(**marker["model"]) == cfg_from(**over).model

    # Exact resume with dropout and accumulation: drop the newest checkpoints, as if the job
    # died after step 3, and run again.
    lineage_dir = tmp_path / "resume"
    cfg = cfg_from(
        **{
            "checkpoint.uri": str(lineage_dir),
            "checkpoint.everySteps": 3,
            "checkpoint.keepLast": 5,
            "model.architecture.dropout": 0.1,
            "training.batch.microBatchSize": 1,
            "training.duration.maxSteps": 12,  # 16 micro batches per epoch, accum 4: crosses epochs
            "training.schedule.warmupSteps": 2,
        }
    )
    whole = run(cfg)
    for step in (6, 9, 12):
        Lineage(str(lineage_dir), 5).store.delete_dir(f"step_{step:08d}")
    resumed = run(cfg)
    assert resumed.resumed_from == 3 and resumed.steps == list(range(4, 13))
    assert resumed.losses == whole.losses[3:]  # bitwise
    for step in (6, 9, 12):
        Lineage(str(lineage_dir), 5).store.delete_dir(f"step_{step:08d}")
    no_rng = run(cfg, skip_rng_restore=True)  # negative control: dropout masks differ
    assert no_rng.losses[0] != whole.losses[3]


def test_metrics_served_on_the_spec_port(tmp_path: Path) -> None:
    """spec.metrics.{enabled,port}: /metrics on the port with the documented series."""
    port = _free_port()
    scraped: list[str] = []

    def scrape(event: ProgressEvent) -> None:
        if event.stage == "validation" and not scraped:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                scraped.append(r.read().decode())

    cfg = cfg_from(**{"metrics.enabled": True, "metrics.port": port, "validation.everySteps": 2})
    res = train(
        cfg, LOADER, on_progress=scrape, ctx=RunContext(metrics_addr="127.0.0.1", namespace="ns", job="j")
    )
    assert res.metrics_port == port
    text = scraped[0]
    labels = 'job="j",namespace="ns",rank="0"'
    for name in (
        "llmtrain_train_loss",
        "llmtrain_val_loss",
        "llmtrain_val_perplexity",
        "llmtrain_train_tokens_per_second",
        "llmtrain_train_data_wait_ratio",
        "llmtrain_train_step",
        "llmtrain_train_epoch",
        "llmtrain_train_tokens_total",
        "llmtrain_train_steps_total",
    ):
        assert re.search(rf"^{name}\{{{labels}\}} ", text, re.M), name
    assert re.search(r'^llmtrain_train_step_seconds_bucket\{.*le="0.01".*\} ', text, re.M)
    assert re.search(rf"^llmtrain_train_step_seconds_count\{{{labels}\}} 2.0$", text, re.M)
    assert re.search(rf'^llmtrain_train_peak_memory_bytes\{{device="cpu",{labels}\}} [1-9]', text, re.M)
    assert "llmtrain_train_mfu_ratio" not in text  # CPU: unknown, not guessed
    assert re.search(rf"^llmtrain_train_steps_total\{{{labels}\}} 2.0$", text, re.M)
    disabled = run(cfg_from(**{"metrics.enabled": False, "metrics.port": port}))
    assert disabled.metrics_port is None


def test_world_size_mismatch_names_workers() -> None:
    """spec.resources.workers must match the ranks that actually run."""
    cfg = cfg_from(**{"resources.workers": 2})
    assert cfg.train.world_size == 2
    with pytest.raises(ValueError, match=r"spec\.resources\.workers"):
        run(cfg)


def test_init_from_checkpoint_starts_from_its_weights(tmp_path: Path) -> None:
    """train() applies spec.model.init (here checkpoint) before its first step."""
    base = {"training.duration.maxSteps": 6, "training.optimizer.lr": 0.01}
    trained = run(cfg_from(**base, **{"checkpoint.uri": str(tmp_path / "a")}))
    fresh = run(cfg_from(**base))
    tuned = run(
        cfg_from(
            **base, **{"model.init.random": None, "model.init.checkpoint": {"uri": str(tmp_path / "a")}}
        ),
        gather_weights=True,
    )
    assert tuned.resumed_from is None  # weights only, not a resume: step 1 again
    assert tuned.steps[0] == 1 and tuned.losses[0] < fresh.losses[0] - 0.1
    assert tuned.losses[0] == pytest.approx(trained.losses[-1], abs=0.5)


def test_core_imports_with_only_torch() -> None:
    """The GPU machine has torch but no pydantic, ray, boto3 or prometheus-client."""
    import subprocess
    import sys

    blocked = ("pydantic", "ray", "boto3", "botocore", "prometheus_client", "yaml", "safetensors")
    code = (
        f"import sys\nfor m in {blocked!r}: sys.modules[m] = None\n"
        "import llmtrain.runtime.model, llmtrain.runtime.train, llmtrain.runtime.checkpoint\n"
        "import llmtrain.runtime.evaluate, llmtrain.runtime.metrics, llmtrain.runtime.synthetic\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_busy_metrics_port_warns_and_training_goes_on() -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.warns(RuntimeWarning, match=r"spec\.metrics\.port"):
            res = run(cfg_from(**{"metrics.enabled": True, "metrics.port": port}))
    assert res.metrics_port is None and res.final_step == 4


def test_compiled_loss_equals_eager_in_value_and_gradient() -> None:
    """spec.training.compile also compiles the loss (fused CE): same value and gradient as eager."""
    assert build_loss(False) is token_loss_sum
    fused = build_loss(True)
    assert hasattr(fused, "_torchdynamo_orig_callable")
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 16, 96, generator=gen, dtype=torch.bfloat16)
    targets = torch.randint(0, 96, (2, 16), generator=gen)
    eager_in, fused_in = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    eager, got = token_loss_sum(eager_in, targets), fused(fused_in, targets)
    eager.backward()
    got.backward()
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-4)
    assert eager_in.grad is not None and fused_in.grad is not None
    torch.testing.assert_close(fused_in.grad, eager_in.grad, rtol=1e-2, atol=1e-3)
    # train() with compile on: same losses as eager within fp32 tolerance.
    compiled = run(cfg_from(**{"training.compile": True, "training.duration.maxSteps": 2}))
    plain = run(cfg_from(**{"training.duration.maxSteps": 2}))
    assert compiled.losses == pytest.approx(plain.losses, rel=1e-5)


def test_checkpoint_when_asked_at_the_next_log_step(tmp_path: Path) -> None:
    """RunContext.checkpoint_requested (a suspend's "checkpoint now") is polled at log steps
    only, and the checkpoint is taken at that step, outside the everySteps schedule."""
    over = {
        "training.duration.maxSteps": 9,
        "training.logEverySteps": 2,
        "checkpoint.uri": str(tmp_path),
        "checkpoint.everySteps": 100,
    }
    ask = AskOnCall(2)  # the second log step: step 4
    result = run(cfg_from(**over), checkpoint_requested=ask)
    assert [Path(u).name for u in result.checkpoints] == ["step_00000004", "step_00000009"]
    assert ask.calls == 5  # steps 2, 4, 6, 8 and the final 9
    plain = run(cfg_from(**{**over, "checkpoint.uri": str(tmp_path / "none")}))
    assert [Path(u).name for u in plain.checkpoints] == ["step_00000009"]
    assert plain.losses == result.losses  # a checkpoint changes nothing in the run


def test_report_only_at_validation_and_checkpoint_steps(tmp_path: Path) -> None:
    """ctx.report (Ray Train: ray.train.report, ~blocking) is called at validation and
    checkpoint steps only; RunContext.deterministic holds for the run and is undone after."""
    reports: list[dict[str, Any]] = []
    deterministic: list[bool] = []

    def report(metrics: dict[str, Any]) -> None:
        reports.append(metrics)
        deterministic.append(torch.are_deterministic_algorithms_enabled())

    over = {
        "training.duration.maxSteps": 7,
        "training.logEverySteps": 1,
        "validation.everySteps": 3,
        "checkpoint.uri": str(tmp_path),
        "checkpoint.everySteps": 2,
    }
    assert not torch.are_deterministic_algorithms_enabled()
    run(cfg_from(**over), report=report, deterministic=True)
    assert [r["step"] for r in reports] == [2, 3, 4, 6, 7]
    assert [("val_loss" in r, "checkpoint_uri" in r) for r in reports] == [
        (False, True), (True, False), (False, True), (True, True), (True, True),
    ]  # fmt: skip
    assert deterministic == [True] * 5
    assert not torch.are_deterministic_algorithms_enabled()


def test_metrics_port_is_offset_by_the_local_rank() -> None:
    """Several workers on one host: local rank r serves /metrics on spec.metrics.port + r."""
    port = _free_port()
    res = run(cfg_from(**{"metrics.enabled": True, "metrics.port": port - 1}), local_rank=1)
    assert res.metrics_port == port


def test_dropped_remainder_is_reported(caplog: pytest.LogCaptureFixture) -> None:
    """Windows that do not fill a step are dropped per epoch, and the run says how many."""
    cfg = cfg_from(**{"training.duration.maxSteps": 1})
    mb = cfg.train.micro_batch_size
    assert mb >= 2
    loader = functools.partial(SyntheticLoader, vocab_size=60, windows=5 * mb - 1)
    with caplog.at_level("WARNING", logger="llmtrain.runtime.train"):
        res = train(cfg, loader, ctx=RunContext(metrics_addr="127.0.0.1"))
    assert res.dropped_windows == mb - 1
    assert any(f"{mb - 1} of each epoch's training windows" in r.getMessage() for r in caplog.records)
    assert run(cfg).dropped_windows == 32 % mb
