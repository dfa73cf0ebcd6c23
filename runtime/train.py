"""The per-worker training function: one plain function for Ray Train, ``torchrun`` and tests.

``train(cfg, make_loader)`` runs on every rank of an initialised process group (or alone, in a
process without one, as a plain single-device model). ``_train`` reads top to bottom, one small
function per piece:

    _setup    device, model (meta → fully_shard → to_empty → seeded init), optimizer, schedule
    _resume   the newest complete checkpoint, if any
    loop:
      _step        micro batches → forward/backward (grad sync on the last only) → clip → step
      _log_window  close the log window (one all-reduce, one host sync)
      _validate    loss, perplexity, accuracy on the validation split
      _checkpoint  periodic, final, or asked for (a suspend)
      _report      validation/checkpoint results to the launcher

Host syncs happen only at log, validation and checkpoint steps: per-step losses and gradient
norms stay on the device until the next log step, where they are all-reduced in one call,
checked for non-finite values and reported.

Imports only torch, the standard library and the torch-free ``llmtrain.api`` contracts.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import pickle
import resource
import signal
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast

import torch
import torch.distributed as dist
from llmtrain.runtime.model import GPT, masked_targets, token_loss_sum
from torch import Tensor, nn

from llmtrain.api.config import OptimizerConfig, RuntimeConfig, ScheduleConfig
from llmtrain.api.loader import TokenLoader, rank_key
from llmtrain.api.progress import ProgressEvent

_log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from llmtrain.runtime.checkpoint import Lineage
    from llmtrain.runtime.metrics import TrainMetrics
    from torch.distributed.fsdp import FSDPModule

# Test-only fault hooks (read once per run). KILL: SIGKILL this worker when it is about to
# compute step N (on LLMTRAIN_FAULT_RANK, default the last rank). NAN: make step N's loss NaN.
# With LLMTRAIN_FAULT_SENTINEL=path a hook fires only while that file does not exist (it is
# created just before firing), so a restarted worker does not fail again.
FAULT_KILL = "LLMTRAIN_FAULT_KILL_AT_STEP"
FAULT_NAN = "LLMTRAIN_FAULT_NAN_AT_STEP"
FAULT_RANK = "LLMTRAIN_FAULT_RANK"
FAULT_SENTINEL = "LLMTRAIN_FAULT_SENTINEL"


class NonFiniteError(RuntimeError):
    """Loss or gradient norm became NaN/inf; no checkpoint was written from that state."""


class LoaderFactory(Protocol):
    def __call__(
        self, *, split: str, rank: int, world_size: int, micro_batch: int, context_length: int, seed: int
    ) -> TokenLoader: ...


@dataclass
class RunContext:
    """Where this worker runs, beyond the config: labels, reporting, and test switches."""

    namespace: str = "default"
    job: str = "local"
    metrics_addr: str = "0.0.0.0"  # tests pass 127.0.0.1
    local_rank: int | None = None  # metrics port offset and CUDA device; default LOCAL_RANK or rank
    use_fsdp: bool | None = None  # None: FSDP2 whenever a process group is initialised
    # Called on every rank at validation and checkpoint steps (Ray Train: ray.train.report).
    report: Callable[[dict[str, Any]], None] | None = None
    # Polled on rank 0 at each log step: True asks for a checkpoint now (the driver's answer
    # to an operator that suspends the job). All ranks learn it from the log step's all-reduce.
    checkpoint_requested: Callable[[], bool] | None = None
    # Test switches (negative controls of the exact-resume test).
    skip_rng_restore: bool = False
    skip_loader_restore: bool = False
    # torch.use_deterministic_algorithms(True) for the run, restored after (the exact-resume
    # tests: a bitwise match must not rest on a kernel that merely happened to be stable).
    deterministic: bool = False
    # Gather the full (unsharded) weights into TrainResult.weights at the end (tests, export).
    gather_weights: bool = False
    # Start-up marks so far (unix seconds, llmtrain.api.progress.STARTUP_MARKS), e.g. the
    # launcher's; rank 0 adds its own and sends them with its first step's progress event.
    startup: dict[str, float] = field(default_factory=dict)


@dataclass
class TrainResult:
    steps: list[int] = field(default_factory=list)  # steps run by this process (replays included)
    losses: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    validations: list[dict[str, float | None]] = field(default_factory=list)
    checkpoints: list[str] = field(default_factory=list)
    resumed_from: int | None = None
    final_step: int = 0
    total_steps: int = 0
    best_val_loss: float | None = None
    metrics_port: int | None = None
    weights: dict[str, Tensor] | None = None
    dropped_windows: int = 0  # per epoch, all ranks: the remainder that does not fill a step


# ----------------------------------------------------------------------------- pieces


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """auto: bf16 on GPU, fp32 on CPU."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[precision]


def lr_at(step: int, opt: OptimizerConfig, sched: ScheduleConfig, total_steps: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup, then decay to minLr."""
    if step < sched.warmup_steps:
        return opt.lr * (step + 1) / (sched.warmup_steps + 1)
    if sched.decay == "constant":
        return opt.lr
    progress = min(1.0, (step - sched.warmup_steps) / max(1, total_steps - sched.warmup_steps))
    if sched.decay == "linear":
        return opt.lr - (opt.lr - sched.min_lr) * progress
    return sched.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (opt.lr - sched.min_lr)


def build_optimizer(
    model: nn.Module, opt: OptimizerConfig, *, fused: bool | None = None
) -> torch.optim.Optimizer:
    """AdamW or SGD; weight decay on 2-D weights (matmuls, embedding) only, never on norms.

    ``fused``: AdamW's fused kernel; None chooses it when every parameter is on a GPU, or
    every parameter is a plain CPU tensor (bench/gpu_mfu.py passes False to measure the
    unfused implementation beside it).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": opt.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    if opt.type == "adamw":
        # On GPU the fused kernel updates every tensor in one pass over its 16 bytes/param of
        # fp32 state; the foreach default reads and writes that state once per elementwise op
        # (bench/gpu_mfu.py measures both). Fused works on FSDP2's DTensor shards.
        if fused is None:
            fused = bool(params) and (all(p.device.type == "cuda" for p in params) or _plain_cpu(params))
        return torch.optim.AdamW(
            groups, lr=opt.lr, betas=(opt.beta1, opt.beta2), eps=opt.eps, fused=fused or None
        )
    if opt.type == "sgd":
        return torch.optim.SGD(groups, lr=opt.lr, momentum=opt.momentum, nesterov=opt.nesterov)
    raise ValueError(f"unknown optimizer {opt.type!r} (spec.training.optimizer.type: adamw or sgd)")


def _plain_cpu(params: list[nn.Parameter]) -> bool:
    """Every parameter an unsharded CPU tensor. On CPU torch's AdamW default is its per-tensor
    loop (a dozen elementwise ops per parameter, each a pass over memory and a thread-pool
    barrier): the fused CPU kernel steps the quickstart's model about 5x faster
    (bench/step_profile.py). FSDP2's CPU DTensor shards keep the loop."""
    from torch.distributed.tensor import DTensor

    return all(p.device.type == "cpu" and not isinstance(p, DTensor) for p in params)


def build_model(cfg: RuntimeConfig, device: torch.device, use_fsdp: bool) -> GPT:
    """Meta-device build → (compile) → FSDP2 per block and root → materialise + seeded init."""
    t = cfg.train
    with torch.device("meta"):
        model = GPT(cfg.model, activation_checkpointing=t.activation_checkpointing)
    lora = _lora_settings(cfg)
    if lora is not None:
        from llmtrain.runtime.lora import apply_lora

        apply_lora(model, lora)  # before fully_shard: adapters join their block's FSDP unit
    if t.compile:
        for block in model.layers:
            # Compile the block's forward only: FSDP's pre/post-forward hooks (all-gather,
            # reshard) stay outside the graph, and state-dict keys stay free of "_orig_mod".
            block.forward = torch.compile(block.forward)
    if use_fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        dtype = resolve_precision(t.precision, device)
        mp = MixedPrecisionPolicy(
            param_dtype=dtype if dtype != torch.float32 else None, reduce_dtype=torch.float32
        )
        for block in model.layers:
            fully_shard(block, mesh=mesh, reshard_after_forward=t.reshard_after_forward, mp_policy=mp)
        # Root unit: embedding, final norm and head (tied or not, in the same unit).
        fully_shard(model, mesh=mesh, reshard_after_forward=t.reshard_after_forward, mp_policy=mp)
    model.materialize(device)
    if lora is not None:
        from llmtrain.runtime.lora import init_adapters

        init_adapters(model, t.seed)
    return model


def _lora_settings(cfg: RuntimeConfig) -> Any:
    """spec.training.lora's settings (None: full training); a LoRA run needs a base to adapt."""
    if cfg.train.lora_rank <= 0:
        return None
    from llmtrain.runtime.lora import LoraSettings

    lora = LoraSettings.from_train(cfg.train)
    if cfg.train.init_kind == "random":
        raise ValueError(
            "spec.training.lora adapts a frozen base: set spec.model.init.pretrained or .checkpoint"
        )
    return lora


def build_loss(compile: bool) -> Callable[[Tensor, Tensor], Tensor]:
    """The step's loss, Σ token cross-entropies (:func:`token_loss_sum`), compiled with the blocks.

    Hidden cost when eager: the fp32 upcast, log-softmax, gather and their backward each
    materialise a [tokens, vocab] tensor — at micro batch 12 × 2048 tokens and vocab 50304 that
    is ~5 GB apiece, ~45 GB of memory traffic per step (13 ms of a 285 ms step on an H100).
    Compiled, Inductor fuses them into one read of the bf16 logits forward and one
    read + write backward, and the fp32 copies never exist (bench/RESULTS.md, GPU MFU).
    ``dynamic=False``: the training shape never changes, so one static graph.
    """
    if not compile:
        return token_loss_sum
    return cast(Callable[[Tensor, Tensor], Tensor], torch.compile(token_loss_sum, dynamic=False))


def clip_grad_norm(model: nn.Module, max_norm: float) -> Tensor:
    """Global L2 norm of all (sharded) gradients, clipped to ``max_norm`` (0: measure only).

    Stays on the device: the norm of DTensor gradients is completed with one all-reduce,
    and clipping multiplies by min(1, max/norm) without reading it on the host.
    """
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(list(model.parameters()), max_norm, norm)
    return norm


def gather_full_weights(model: nn.Module) -> dict[str, Tensor]:
    """Full fp32 weights on the CPU of every rank (a collective per parameter under FSDP)."""
    from torch.distributed.tensor import DTensor

    out = {}
    for name, value in model.state_dict().items():
        full = value.full_tensor() if isinstance(value, DTensor) else value
        out[name] = full.detach().float().cpu().clone()
    return out


def peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


class _Faults:
    def __init__(self, rank: int, world_size: int) -> None:
        self.kill_at = int(os.environ.get(FAULT_KILL, "0"))
        self.nan_at = int(os.environ.get(FAULT_NAN, "0"))
        self.on_rank = rank == int(os.environ.get(FAULT_RANK, str(world_size - 1)))
        self.sentinel = os.environ.get(FAULT_SENTINEL)

    def _fire(self) -> bool:
        if self.sentinel is None:
            return True
        if Path(self.sentinel).exists():
            return False
        Path(self.sentinel).touch()
        return True

    def before_step(self, step: int) -> None:
        if self.kill_at == step and self.on_rank and self._fire():
            os.kill(os.getpid(), signal.SIGKILL)

    def nan(self, step: int) -> bool:
        # All ranks poison the loss (no sentinel check per rank): the fault is in the data path.
        return self.nan_at == step


# ------------------------------------------------------------------------------ train


def train(
    cfg: RuntimeConfig,
    make_loader: LoaderFactory,
    *,
    on_progress: Callable[[ProgressEvent], None] | None = None,
    ctx: RunContext | None = None,
) -> TrainResult:
    ctx = ctx or RunContext()
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    if ctx.deterministic:
        # cuBLAS needs a fixed workspace for deterministic matmuls (read when it starts).
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    try:
        return _train(cfg, make_loader, on_progress, ctx)
    finally:
        torch.use_deterministic_algorithms(was_deterministic)


def _train(
    cfg: RuntimeConfig,
    make_loader: LoaderFactory,
    on_progress: Callable[[ProgressEvent], None] | None,
    ctx: RunContext,
) -> TrainResult:
    t = cfg.train
    run = _setup(cfg, make_loader, on_progress, ctx)
    _resume(run)
    run.startup["resume"] = time.time()
    window = _Window()
    run.model.train()
    first = run.step + 1
    try:
        if run.step >= run.total_steps > 0 and ctx.report is not None:
            # Resumed from the checkpoint at its last step (the run was killed between that
            # save and its end): nothing to train, but the launcher still hears where the run
            # stands — a tuning trial resumed here would otherwise count as stopped at step 0.
            _report(run, window, _validate(run, window))
        while run.step < run.total_steps:
            run.faults.before_step(run.step + 1)
            _step(run, window)
            step, final = run.step, run.step == run.total_steps
            if step == first and ctx.startup:  # the launcher measures the time to the first step
                run.emit(startup={**run.startup, "step": time.time()})
            if step % t.log_every_steps == 0 or final:
                _log_window(run, window)
            report: dict[str, Any] = {}
            if step % t.val_every_steps == 0 or final:
                report |= _validate(run, window)
            if run.lineage is not None and (
                step % t.checkpoint_every_steps == 0 or final or window.checkpoint_requested
            ):
                report |= _checkpoint(run, window)
            if report:
                _report(run, window, report)
        _log_window(run, window)
    finally:
        if run.metrics is not None:
            run.metrics.close()
    result = run.result
    result.final_step = run.step
    if ctx.gather_weights:
        result.weights = gather_full_weights(run.model)
    result.best_val_loss = run.best_val if math.isfinite(run.best_val) else None
    return result


# ------------------------------------------------------------------ the loop's pieces


@dataclass
class _Run:
    """What the loop's pieces read, built once by :func:`_setup`; ``step``, ``tokens`` and
    ``best_val`` are the progress a checkpoint saves and :func:`_resume` restores."""

    cfg: RuntimeConfig
    ctx: RunContext
    rank: int
    world_size: int
    distributed: bool
    use_fsdp: bool
    device: torch.device
    device_name: str
    autocast: contextlib.AbstractContextManager[object]
    model: GPT
    loss_fn: Callable[[Tensor, Tensor], Tensor]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    make: Callable[[str], TokenLoader]  # a loader of this rank's share of a split
    loader: TokenLoader  # the training split
    total_steps: int
    tokens_per_step: int  # all ranks
    result: TrainResult
    lineage: Lineage | None
    metrics: TrainMetrics | None
    faults: _Faults
    on_progress: Callable[[ProgressEvent], None] | None
    startup: dict[str, float]  # start-up marks (unix seconds) up to the loop
    step: int = 0
    tokens: int = 0
    best_val: float = math.inf
    batches: Iterator[Tensor] | None = None
    base_uri: str | None = None  # the init version loaded (a LoRA checkpoint names it as its base)

    def next_batch(self) -> Tensor | tuple[Tensor, Tensor]:
        """The next micro batch: tokens, or (tokens, loss mask) for task data."""
        if self.batches is None:
            self.batches = iter(self.loader)
        try:
            return next(self.batches)
        except StopIteration:  # epoch over: a fresh iter() starts the next, in its own order
            self.batches = iter(self.loader)
            return next(self.batches)

    def emit(self, **fields: Any) -> None:
        """A progress event from rank 0 (the others hold the same values)."""
        if self.rank == 0 and self.on_progress is not None:
            self.on_progress(
                ProgressEvent(
                    step=self.step,
                    total_steps=self.total_steps,
                    epoch=self.loader.epoch,
                    tokens=self.tokens,
                    time=time.time(),
                    **fields,
                )
            )


@dataclass
class _Window:
    """The log window: per-step losses and gradient norms wait on the device until the next
    log step (no per-step host sync); tokens/s and MFU measure the steps in it."""

    steps: list[int] = field(default_factory=list)
    losses: list[Tensor] = field(default_factory=list)
    norms: list[Tensor] = field(default_factory=list)
    # Task data: each step's loss targets over all ranks (the losses' divisor); empty for plain text.
    targets: list[Tensor] = field(default_factory=list)
    start: float = field(default_factory=time.perf_counter)
    data_wait: float = 0.0  # seconds spent waiting for batches
    last_loss: float | None = None
    # Someone asked for a checkpoint now (a suspend): the same answer on every rank, from
    # the all-reduce of the log step.
    checkpoint_requested: bool = False

    def restart(self) -> None:
        self.steps.clear()
        self.losses.clear()
        self.norms.clear()
        self.targets.clear()
        self.start, self.data_wait = time.perf_counter(), 0.0


def _setup(
    cfg: RuntimeConfig,
    make_loader: LoaderFactory,
    on_progress: Callable[[ProgressEvent], None] | None,
    ctx: RunContext,
) -> _Run:
    """Device, model (meta → FSDP2 → seeded init), optimizer, schedule, training loader, metrics."""
    t, m = cfg.train, cfg.model
    distributed = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank() if distributed else 0
    world_size = dist.get_world_size() if distributed else 1
    if world_size != t.world_size:
        raise ValueError(
            f"the job is configured for {t.world_size} workers but runs on {world_size} "
            "(spec.resources.workers)"
        )
    local_rank = ctx.local_rank if ctx.local_rank is not None else int(os.environ.get("LOCAL_RANK", rank))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    use_fsdp = distributed if ctx.use_fsdp is None else ctx.use_fsdp
    if use_fsdp and not distributed:
        raise ValueError("FSDP needs an initialised process group")
    dtype = resolve_precision(t.precision, device)
    # Without FSDP the mixed precision is autocast's; with FSDP it is the MixedPrecisionPolicy.
    autocast: contextlib.AbstractContextManager[object] = (
        torch.autocast(device.type, dtype=dtype)
        if dtype != torch.float32 and not use_fsdp
        else contextlib.nullcontext()
    )

    # Per-rank dropout stream; restored exactly from checkpoints.
    torch.manual_seed(t.seed * 100_003 + rank)

    startup = dict(ctx.startup)
    model = build_model(cfg, device, use_fsdp)
    base_uri: str | None = None
    if t.init_kind != "random":
        # spec.model.init.checkpoint / pretrained: weights only; a resume overrides them.
        from llmtrain.runtime.hf_import import load_initial_weights

        base_uri = load_initial_weights(model, cfg)
    optimizer = build_optimizer(model, cfg.optimizer)  # over the trainable (LoRA: adapter) params
    startup["model"] = time.time()

    def make(split: str) -> TokenLoader:
        return make_loader(
            split=split,
            rank=rank,
            world_size=world_size,
            micro_batch=t.micro_batch_size,
            context_length=m.context_length,
            seed=t.seed,
        )

    loader = make("train")
    startup["loader"] = time.time()
    if loader.steps_per_epoch < t.grad_accum_steps:
        raise ValueError(
            f"an epoch has {loader.steps_per_epoch} micro batches per rank, fewer than the "
            f"{t.grad_accum_steps} one optimizer step needs: lower spec.training.batch.globalBatchSize "
            "or add data"
        )
    total_steps = t.total_steps(loader.steps_per_epoch, m.context_length)
    # Every rank yields exactly steps_per_epoch batches (no rank waits alone in a collective):
    # the windows that do not fill a step are left out of each epoch, and said so here.
    dropped = loader.dropped_windows
    if dropped and rank == 0:
        _log.warning(
            "%d of each epoch's training windows do not fill a step across %d ranks × micro batch %d "
            "and are dropped per epoch",
            dropped,
            world_size,
            t.micro_batch_size,
        )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_at(s, cfg.optimizer, cfg.schedule, total_steps) / cfg.optimizer.lr
    )
    result = TrainResult(total_steps=total_steps, dropped_windows=dropped)
    lineage = None
    if t.checkpoint_uri:
        from llmtrain.runtime.checkpoint import Lineage

        from llmtrain.api.s3 import S3Options

        lineage = Lineage(
            t.checkpoint_uri, t.checkpoint_keep_last, S3Options.from_train(t), owner=t.checkpoint_owner
        )
    return _Run(
        cfg=cfg,
        ctx=ctx,
        rank=rank,
        world_size=world_size,
        distributed=distributed,
        use_fsdp=use_fsdp,
        device=device,
        device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        autocast=autocast,
        model=model,
        loss_fn=build_loss(t.compile),
        optimizer=optimizer,
        scheduler=scheduler,
        make=make,
        loader=loader,
        total_steps=total_steps,
        tokens_per_step=t.tokens_per_step(m.context_length),
        result=result,
        lineage=lineage,
        metrics=_serve_metrics(cfg, ctx, rank, local_rank, result),
        faults=_Faults(rank, world_size),
        on_progress=on_progress,
        startup=startup,
        base_uri=base_uri,
    )


def _serve_metrics(
    cfg: RuntimeConfig, ctx: RunContext, rank: int, local_rank: int, result: TrainResult
) -> TrainMetrics | None:
    """This rank's /metrics on metricsPort + local rank; a busy port costs the metrics, not the run."""
    t = cfg.train
    if not t.metrics_enabled:
        return None
    from llmtrain.runtime.metrics import MetricLabels, TrainMetrics

    metrics = TrainMetrics(MetricLabels(ctx.namespace, ctx.job, rank))
    port = t.metrics_port + local_rank
    try:
        result.metrics_port = metrics.serve(port, ctx.metrics_addr)
    except OSError as e:
        warnings.warn(
            f"rank {rank}: cannot serve /metrics on {ctx.metrics_addr}:{port} ({e}); training goes on "
            "without it (spec.metrics.port)",
            RuntimeWarning,
            stacklevel=1,
        )
    return metrics


def _resume(run: _Run) -> None:
    """Model, optimizer, schedule, loader position and RNG from the newest complete checkpoint."""
    if run.lineage is None:
        return
    info = run.lineage.latest()
    if info is None:
        return
    ctx = run.ctx
    state = _state_dict(run.model, run.optimizer, run.loader, run.rank, placeholders=info.world_size)
    run.lineage.load(info, state)
    trained = pickle.loads(state["train"])
    _set_model_optim(run.model, run.optimizer, state)
    run.scheduler.load_state_dict(trained["scheduler"])
    run.step, run.tokens, run.best_val = trained["step"], trained["tokens"], trained["best_val"]
    per_rank = {k: pickle.loads(v) for k, v in state["per_rank"].items()}
    if not ctx.skip_loader_restore:
        merged: dict[str, Any] = {}
        for saved in per_rank.values():
            merged.update(saved["loader"])
        run.loader.load_state_dict(merged)
    mine = per_rank.get(rank_key(run.rank))
    if not ctx.skip_rng_restore and mine is not None and info.world_size == run.world_size:
        torch.set_rng_state(mine["rng_cpu"])
        if run.device.type == "cuda" and mine.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(mine["rng_cuda"], run.device)
    run.lineage.protected = info.step
    run.result.resumed_from = info.step


def _step(run: _Run, window: _Window) -> None:
    """One optimizer step: forward/backward over its micro batches, clip, step."""
    t = run.cfg.train
    accum = t.grad_accum_steps
    # Plain text: every target counts, the same number on every rank (loader contract).
    denominator: Tensor | float = run.tokens_per_step / run.world_size
    loss_sum = torch.zeros((), device=run.device)
    pending = [_next_micro_batch(run, window)]
    if isinstance(pending[0], tuple):
        # Task data: the loss is a mean over the step's answer tokens on every rank, a count only
        # known once all its micro batches are read: read them first, count, then backward.
        pending += [_next_micro_batch(run, window) for _ in range(accum - 1)]
        count = _count_targets(run, pending)  # type: ignore[arg-type]
        window.targets.append(count)
        denominator = count / run.world_size
    for micro in range(accum):
        raw = pending[micro] if micro < len(pending) else _next_micro_batch(run, window)
        # From pageable memory this copy waits for the GPU to drain its queue (a host sync per
        # micro batch). Pinning each batch measured no faster on an H200 at GPT-2-small shape
        # (bench/RESULTS.md), so batches stay pageable.
        if isinstance(raw, tuple):
            batch = raw[0].to(run.device, non_blocking=True)
            mask = raw[1].to(run.device, non_blocking=True)
            inputs, targets = batch[:, :-1], masked_targets(batch[:, 1:], mask[:, 1:])
        else:
            batch = raw.to(run.device, non_blocking=True)
            inputs, targets = batch[:, :-1], batch[:, 1:]
        if run.use_fsdp:
            # Reduce-scatter gradients only after the last micro batch.
            cast("FSDPModule", run.model).set_requires_gradient_sync(micro == accum - 1)
        with run.autocast:
            logits = run.model(inputs)
        loss = run.loss_fn(logits, targets)
        if run.faults.nan(run.step + 1):
            loss = loss * float("nan")
        # Token mean over the whole step, not a mean of per-rank means: gradients sum over micro
        # batches, and FSDP's reduce-scatter averages over ranks, so dividing by this rank's
        # share of the step's (target) tokens yields ∇(Σ token losses / Σ tokens).
        (loss / denominator).backward()
        loss_sum += loss.detach()
    norm = clip_grad_norm(run.model, t.grad_clip)
    run.result.lrs.append(float(run.scheduler.get_last_lr()[0]))
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    run.tokens += run.tokens_per_step
    window.steps.append(run.step)
    window.losses.append(loss_sum)
    window.norms.append(norm)


def _next_micro_batch(run: _Run, window: _Window) -> Tensor | tuple[Tensor, Tensor]:
    waited = time.perf_counter()
    raw = run.next_batch()
    window.data_wait += time.perf_counter() - waited
    return raw


def _count_targets(run: _Run, micro_batches: list[tuple[Tensor, Tensor]]) -> Tensor:
    """Σ loss targets (mask 1) of one step's micro batches over all ranks, on the device.

    Counted on the host from the loader's CPU masks (no device work); its copy to the device is
    a host sync like each batch's copy (pageable memory), and the all-reduce a collective every
    rank joins once per step. The count stays on the device as the loss's divisor.
    """
    local = sum(int(mask[:, 1:].sum()) for _, mask in micro_batches)
    count = torch.tensor(local, dtype=torch.int64, device=run.device)
    if run.distributed:
        dist.all_reduce(count)
    return count.clamp_min(1).float()  # a step of padding alone (never packed) would divide by 0


def _log_window(run: _Run, window: _Window) -> None:
    """Close the log window: one all-reduce and one host sync for its steps, stop on NaN/inf,
    record, report metrics and a progress event.

    The all-reduce also carries rank 0's answer to "was a checkpoint asked for?" (a Ray actor
    call on rank 0, once per log step), so every rank decides the same at the same step.
    """
    if not window.steps:
        return
    asked = run.rank == 0 and run.ctx.checkpoint_requested is not None and run.ctx.checkpoint_requested()
    reduced = torch.stack([*window.losses, torch.tensor(float(asked), device=run.device)])
    if run.distributed:
        dist.all_reduce(reduced)  # Σ token losses over ranks (each a sum over its micro batches)
    # Task data: Σ losses / Σ answer tokens of each step (both over all ranks).
    divisor = torch.stack(window.targets) if window.targets else run.tokens_per_step
    values = (reduced[:-1] / divisor).tolist()  # host sync
    window.checkpoint_requested = window.checkpoint_requested or bool(reduced[-1].item() > 0)
    norms = torch.stack(window.norms).tolist()
    for s, loss, norm in zip(window.steps, values, norms, strict=True):
        if not (math.isfinite(loss) and math.isfinite(norm)):
            raise NonFiniteError(
                f"non-finite {'loss' if not math.isfinite(loss) else 'gradient norm'} at step {s} "
                f"(loss {loss}, grad norm {norm}); the newest checkpoint predates it. Lower "
                "spec.training.optimizer.lr, raise warmupSteps or set spec.training.gradClip"
            )
    result = run.result
    result.steps += window.steps
    result.losses += values
    result.grad_norms += norms
    steps = len(window.steps)
    seconds = time.perf_counter() - window.start
    tps = steps * run.tokens_per_step / seconds if seconds > 0 else 0.0
    mfu = run.model.estimate_mfu(tps / run.world_size, run.device_name)
    window.last_loss = values[-1]
    if run.metrics is not None:
        run.metrics.log_window(
            loss=values[-1],
            steps=steps,
            tokens=steps * run.tokens_per_step,
            seconds=seconds,
            data_wait_seconds=window.data_wait,
            mfu=mfu,
            peak_memory_bytes=peak_memory(run.device),
            device=run.device_name,
            step=run.step,
            epoch=run.loader.epoch,
        )
    run.emit(
        train_loss=values[-1],
        tokens_per_second=tps,
        mfu=mfu,
        eta_seconds=(run.total_steps - run.step) * seconds / steps,
    )
    window.restart()


def _validate(run: _Run, window: _Window) -> dict[str, Any]:
    """Loss, perplexity and accuracy on the validation split (the same batches every time)."""
    from llmtrain.runtime.evaluate import evaluate

    _log_window(run, window)
    loader = run.make("validation")
    # A shard loader knows the bytes behind each token id (bits per byte); test loaders do not.
    token_bytes = loader.token_bytes() if hasattr(loader, "token_bytes") else None
    val = evaluate(run.model, iter(loader), run.cfg.train.val_batches, run.device, run.autocast, token_bytes)
    run.best_val = min(run.best_val, val.loss)
    task: dict[str, Any] = {}
    if run.cfg.train.task_records:  # spec.validation.task: greedy answers to held-out prompts, scored
        from llmtrain.runtime.task_metric import task_score

        dtype = resolve_precision(run.cfg.train.precision, run.device)
        scored = task_score(run.model, loader, run.cfg.train, run.device, dtype, sharded=run.use_fsdp)
        task = {"val_task_exact_match": scored.exact_match, "val_task_score": scored.score}
        task |= {"val_task_records": scored.records, "val_task_checker": scored.checker}
        if run.metrics is not None:
            run.metrics.task(exact_match=scored.exact_match, score=scored.score, checker=scored.checker)
    run.result.validations.append(
        {
            "step": run.step,
            "loss": val.loss,
            "perplexity": val.perplexity,
            "accuracy": val.accuracy,
            "bits_per_byte": val.bits_per_byte,
            **{k.removeprefix("val_"): v for k, v in task.items()},
        }
    )
    if run.metrics is not None:
        run.metrics.validation(
            loss=val.loss,
            perplexity=val.perplexity,
            bits_per_byte=val.bits_per_byte,
            validation_set=getattr(getattr(loader, "manifest", None), "validation_set", None),
        )
    run.emit(
        stage="validation",
        train_loss=window.last_loss,
        val_loss=val.loss,
        val_perplexity=val.perplexity,
        val_accuracy=val.accuracy,
        val_bits_per_byte=val.bits_per_byte,
        **task,
    )
    return {"val_loss": val.loss, "val_perplexity": val.perplexity, "val_accuracy": val.accuracy, **task}


def _checkpoint(run: _Run, window: _Window) -> dict[str, Any]:
    """Save the run to the lineage; never from a non-finite state (:func:`_log_window` checks first)."""
    assert run.lineage is not None
    _log_window(run, window)
    train_state = {
        "step": run.step,
        "tokens": run.tokens,
        "best_val": run.best_val,
        "scheduler": run.scheduler.state_dict(),
    }
    state = _state_dict(run.model, run.optimizer, run.loader, run.rank, train_state=train_state)
    # The architecture travels with the weights: `llmtrain export --checkpoint` then needs
    # no job spec to rebuild the model.
    meta = {"tokens": run.tokens, "epoch": run.loader.epoch, "model": asdict(run.cfg.model)}
    if run.cfg.train.lora_rank:
        from llmtrain.runtime.lora import checkpoint_meta

        meta |= checkpoint_meta(run.cfg, run.base_uri)  # adapters only: export re-derives the base
    uri = run.lineage.save(run.step, state, meta)
    window.checkpoint_requested = False
    run.result.checkpoints.append(uri)
    run.emit(stage="checkpoint", checkpoint_uri=uri, checkpoint_step=run.step)
    return {"checkpoint_uri": uri, "checkpoint_step": run.step}


def _report(run: _Run, window: _Window, report: dict[str, Any]) -> None:
    """Validation/checkpoint results to the launcher (Ray Train: ``ray.train.report``)."""
    if run.ctx.report is not None:
        run.ctx.report(
            {"step": run.step, "epoch": run.loader.epoch, "train_loss": window.last_loss, **report}
        )
    # Validating, saving and reporting are not training time: the next window starts now
    # (tokens/s and MFU measure the training steps alone).
    window.start = time.perf_counter()


# ------------------------------------------------------------------ checkpoint state


def _state_dict(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: TokenLoader,
    rank: int,
    *,
    train_state: dict[str, Any] | None = None,
    placeholders: int | None = None,
) -> dict[str, Any]:
    """What a checkpoint holds. Per-rank state sits under rank-specific keys: DCP keeps one
    copy of equal non-tensor keys across ranks. With ``placeholders`` (the saved world size)
    it is a load template asking for every saved rank's entry (the loader may need them all).
    """
    from llmtrain.runtime.lora import state_dict_options
    from torch.distributed.checkpoint.state_dict import get_state_dict

    # With LoRA the frozen base stays out: a checkpoint holds the adapters and their optimizer state.
    model_sd, optim_sd = get_state_dict(model, optimizer, options=state_dict_options(model))
    state: dict[str, Any] = {"model": model_sd, "optim": optim_sd}
    if placeholders is not None:
        state["train"] = b""
        state["per_rank"] = {rank_key(r): b"" for r in range(placeholders)}
        return state
    rng_cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() else None
    mine = {"loader": loader.state_dict(), "rng_cpu": torch.get_rng_state(), "rng_cuda": rng_cuda}
    state["train"] = pickle.dumps(train_state)
    state["per_rank"] = {rank_key(rank): pickle.dumps(mine)}
    return state


def _set_model_optim(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    from llmtrain.runtime.lora import state_dict_options
    from torch.distributed.checkpoint.state_dict import set_state_dict

    set_state_dict(
        model,
        optimizer,
        model_state_dict=state["model"],
        optim_state_dict=state["optim"],
        options=state_dict_options(model),
    )
