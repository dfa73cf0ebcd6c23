"""The per-worker training function: one plain function for Ray Train, ``torchrun`` and tests.

``train(cfg, make_loader)`` runs on every rank of an initialised process group (or alone, in a
process without one, as a plain single-device model). It reads top to bottom:

    build (meta → fully_shard → to_empty → seeded init) → optimizer, schedule → resume
    loop: micro batches → forward/backward (grad sync on the last only) → clip → step
          → log (one host sync) → validate → checkpoint

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
from llmtrain.runtime.model import GPT, token_loss_sum
from torch import Tensor, nn

from llmtrain.api.config import OptimizerConfig, RuntimeConfig, ScheduleConfig
from llmtrain.api.loader import TokenLoader, rank_key
from llmtrain.api.progress import ProgressEvent

_log = logging.getLogger(__name__)

if TYPE_CHECKING:
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
    # Test switches (negative controls of the exact-resume test).
    skip_rng_restore: bool = False
    skip_loader_restore: bool = False
    # torch.use_deterministic_algorithms(True) for the run, restored after (the exact-resume
    # tests: a bitwise match must not rest on a kernel that merely happened to be stable).
    deterministic: bool = False
    # Gather the full (unsharded) weights into TrainResult.weights at the end (tests, export).
    gather_weights: bool = False


@dataclass
class TrainResult:
    steps: list[int] = field(default_factory=list)  # steps run by this process (replays included)
    losses: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    validations: list[dict[str, float]] = field(default_factory=list)
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

    ``fused``: AdamW's fused kernel; None chooses it exactly when every parameter is on a GPU
    (bench/gpu_mfu.py passes False to measure the foreach implementation beside it).
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
            fused = bool(params) and all(p.device.type == "cuda" for p in params)
        return torch.optim.AdamW(
            groups, lr=opt.lr, betas=(opt.beta1, opt.beta2), eps=opt.eps, fused=fused or None
        )
    if opt.type == "sgd":
        return torch.optim.SGD(groups, lr=opt.lr, momentum=opt.momentum, nesterov=opt.nesterov)
    raise ValueError(f"unknown optimizer {opt.type!r} (spec.training.optimizer.type: adamw or sgd)")


def build_model(cfg: RuntimeConfig, device: torch.device, use_fsdp: bool) -> GPT:
    """Meta-device build → (compile) → FSDP2 per block and root → materialise + seeded init."""
    t = cfg.train
    with torch.device("meta"):
        model = GPT(cfg.model, activation_checkpointing=t.activation_checkpointing)
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
    return model


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
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
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

    model = build_model(cfg, device, use_fsdp)
    loss_fn = build_loss(t.compile)
    if t.init_kind != "random":
        # spec.model.init.checkpoint / pretrained: weights only; a resume below overrides them.
        from llmtrain.runtime.hf_import import load_initial_weights

        load_initial_weights(model, cfg)
    optimizer = build_optimizer(model, cfg.optimizer)

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
    accum = t.grad_accum_steps
    if loader.steps_per_epoch < accum:
        raise ValueError(
            f"an epoch has {loader.steps_per_epoch} micro batches per rank, fewer than the {accum} one "
            "optimizer step needs: lower spec.training.batch.globalBatchSize or add data"
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
    tokens_per_step = t.tokens_per_step(m.context_length)
    tokens_per_rank_step = tokens_per_step / world_size  # equal on every rank (loader contract)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_at(s, cfg.optimizer, cfg.schedule, total_steps) / cfg.optimizer.lr
    )
    result = TrainResult(total_steps=total_steps, dropped_windows=dropped)
    step, tokens_seen, best_val = 0, 0, math.inf

    # ----------------------------------------------------------------- resume
    lineage = None
    if t.checkpoint_uri:
        from llmtrain.runtime.checkpoint import Lineage

        lineage = Lineage(t.checkpoint_uri, t.checkpoint_keep_last)
        info = lineage.latest()
        if info is not None:
            state = _state_dict(model, optimizer, scheduler, loader, rank, placeholders=info.world_size)
            lineage.load(info, state)
            trained = pickle.loads(state["train"])
            _set_model_optim(model, optimizer, state)
            scheduler.load_state_dict(trained["scheduler"])
            step, tokens_seen, best_val = trained["step"], trained["tokens"], trained["best_val"]
            per_rank = {k: pickle.loads(v) for k, v in state["per_rank"].items()}
            if not ctx.skip_loader_restore:
                merged: dict[str, Any] = {}
                for saved in per_rank.values():
                    merged.update(saved["loader"])
                loader.load_state_dict(merged)
            mine = per_rank.get(rank_key(rank))
            if not ctx.skip_rng_restore and mine is not None and info.world_size == world_size:
                torch.set_rng_state(mine["rng_cpu"])
                if device.type == "cuda" and mine.get("rng_cuda") is not None:
                    torch.cuda.set_rng_state(mine["rng_cuda"], device)
            lineage.protected = info.step
            result.resumed_from = info.step

    metrics = None
    if t.metrics_enabled:
        from llmtrain.runtime.metrics import MetricLabels, TrainMetrics

        metrics = TrainMetrics(MetricLabels(ctx.namespace, ctx.job, rank))
        port = t.metrics_port + local_rank
        try:
            result.metrics_port = metrics.serve(port, ctx.metrics_addr)
        except OSError as e:  # a busy port must not cost the training run
            warnings.warn(
                f"rank {rank}: cannot serve /metrics on {ctx.metrics_addr}:{port} ({e}); training goes on "
                "without it (spec.metrics.port)",
                RuntimeWarning,
                stacklevel=1,
            )

    faults = _Faults(rank, world_size)

    def emit(event: ProgressEvent) -> None:
        if rank == 0 and on_progress is not None:
            on_progress(event)

    batches: Iterator[Tensor] = iter(loader)

    def next_batch() -> Tensor:
        nonlocal batches
        try:
            return next(batches)
        except StopIteration:  # epoch over: a fresh iter() starts the next, in its own order
            batches = iter(loader)
            return next(batches)

    # Per-step values wait on the device until the next log step (no per-step host sync).
    pending_steps: list[int] = []
    pending_loss: list[Tensor] = []
    pending_norm: list[Tensor] = []
    window_start, window_wait, window_steps = time.perf_counter(), 0.0, 0
    last_loss: float | None = None

    def flush() -> None:
        """One all-reduce + host sync for the steps since the last flush; stop on NaN/inf."""
        nonlocal window_start, window_wait, window_steps, last_loss
        if not pending_steps:
            return
        losses = torch.stack(pending_loss)
        if distributed:
            dist.all_reduce(losses)  # Σ token losses over ranks (each a sum over its micro batches)
        values = (losses / tokens_per_step).tolist()  # host sync
        norms = torch.stack(pending_norm).tolist()
        for s, loss, norm in zip(pending_steps, values, norms, strict=True):
            if not (math.isfinite(loss) and math.isfinite(norm)):
                raise NonFiniteError(
                    f"non-finite {'loss' if not math.isfinite(loss) else 'gradient norm'} at step {s} "
                    f"(loss {loss}, grad norm {norm}); the newest checkpoint predates it. Lower "
                    "spec.training.optimizer.lr, raise warmupSteps or set spec.training.gradClip"
                )
        result.steps += pending_steps
        result.losses += values
        result.grad_norms += norms
        seconds = time.perf_counter() - window_start
        tps = window_steps * tokens_per_step / seconds if seconds > 0 else 0.0
        mfu = model.estimate_mfu(tps / world_size, device_name)
        last_loss = values[-1]
        if metrics is not None:
            metrics.log_window(
                loss=values[-1],
                steps=window_steps,
                tokens=window_steps * tokens_per_step,
                seconds=seconds,
                data_wait_seconds=window_wait,
                mfu=mfu,
                peak_memory_bytes=peak_memory(device),
                device=device_name,
                step=step,
                epoch=loader.epoch,
            )
        remaining = (total_steps - step) * seconds / max(1, window_steps)
        emit(
            ProgressEvent(
                step=step,
                total_steps=total_steps,
                epoch=loader.epoch,
                tokens=tokens_seen,
                train_loss=values[-1],
                tokens_per_second=tps,
                mfu=mfu,
                eta_seconds=remaining,
                time=time.time(),
            )
        )
        pending_steps.clear()
        pending_loss.clear()
        pending_norm.clear()
        window_start, window_wait, window_steps = time.perf_counter(), 0.0, 0

    model.train()
    try:
        while step < total_steps:
            faults.before_step(step + 1)
            # ---- forward/backward over the micro batches of one optimizer step
            loss_sum = torch.zeros((), device=device)
            for micro in range(accum):
                waited = time.perf_counter()
                # From pageable memory this copy waits for the GPU to drain its queue (a host
                # sync per micro batch). Pinning each batch measured no faster on an H200 at
                # GPT-2-small shape (bench/RESULTS.md), so batches stay pageable.
                batch = next_batch().to(device, non_blocking=True)
                window_wait += time.perf_counter() - waited
                if use_fsdp:
                    # Reduce-scatter gradients only after the last micro batch.
                    cast("FSDPModule", model).set_requires_gradient_sync(micro == accum - 1)
                inputs, targets = batch[:, :-1], batch[:, 1:]
                with autocast:
                    logits = model(inputs)
                loss = loss_fn(logits, targets)
                if faults.nan(step + 1):
                    loss = loss * float("nan")
                # Token mean over the whole step, not a mean of per-rank means: gradients sum over
                # micro batches, and FSDP's reduce-scatter averages over ranks, so dividing by
                # this rank's share of the step's tokens yields ∇(Σ token losses / Σ tokens).
                (loss / tokens_per_rank_step).backward()
                loss_sum += loss.detach()
            # ---- clip, step
            norm = clip_grad_norm(model, t.grad_clip)
            result.lrs.append(float(scheduler.get_last_lr()[0]))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens_seen += tokens_per_step
            window_steps += 1
            pending_steps.append(step)
            pending_loss.append(loss_sum)
            pending_norm.append(norm)

            # ---- log
            final = step == total_steps
            if step % t.log_every_steps == 0 or final:
                flush()
            report: dict[str, Any] = {}
            # ---- validate
            if step % t.val_every_steps == 0 or final:
                flush()
                from llmtrain.runtime.validate import evaluate

                val = evaluate(model, iter(make("validation")), t.val_batches, device, autocast)
                best_val = min(best_val, val.loss)
                result.validations.append(
                    {"step": step, "loss": val.loss, "perplexity": val.perplexity, "accuracy": val.accuracy}
                )
                if metrics is not None:
                    metrics.validation(loss=val.loss, perplexity=val.perplexity)
                emit(
                    ProgressEvent(
                        step=step,
                        total_steps=total_steps,
                        epoch=loader.epoch,
                        tokens=tokens_seen,
                        stage="validation",
                        train_loss=last_loss,
                        val_loss=val.loss,
                        val_perplexity=val.perplexity,
                        val_accuracy=val.accuracy,
                        time=time.time(),
                    )
                )
                report.update(val_loss=val.loss, val_perplexity=val.perplexity, val_accuracy=val.accuracy)
            # ---- checkpoint (never from a non-finite state: flush() checks first)
            if lineage is not None and (step % t.checkpoint_every_steps == 0 or final):
                flush()
                train_state = {
                    "step": step,
                    "tokens": tokens_seen,
                    "best_val": best_val,
                    "scheduler": scheduler.state_dict(),
                }
                state = _state_dict(model, optimizer, scheduler, loader, rank, train_state=train_state)
                # The architecture travels with the weights: `llmtrain export --checkpoint`
                # then needs no job spec to rebuild the model.
                meta = {"tokens": tokens_seen, "epoch": loader.epoch, "model": asdict(cfg.model)}
                uri = lineage.save(step, state, meta)
                result.checkpoints.append(uri)
                emit(
                    ProgressEvent(
                        step=step,
                        total_steps=total_steps,
                        epoch=loader.epoch,
                        tokens=tokens_seen,
                        stage="checkpoint",
                        checkpoint_uri=uri,
                        checkpoint_step=step,
                        time=time.time(),
                    )
                )
                report.update(checkpoint_uri=uri, checkpoint_step=step)
            if report and ctx.report is not None:
                ctx.report({"step": step, "epoch": loader.epoch, "train_loss": last_loss, **report})
            if report:
                # flush() emptied the window; validation, saving and reporting are not training
                # time, so it starts now (tokens/s and MFU measure the training steps alone).
                window_start = time.perf_counter()
        flush()
    finally:
        if metrics is not None:
            metrics.close()
    result.final_step = step
    if ctx.gather_weights:
        result.weights = gather_full_weights(model)
    result.best_val_loss = best_val if math.isfinite(best_val) else None
    return result


# ------------------------------------------------------------------ checkpoint state


def _state_dict(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
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
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
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
    from torch.distributed.checkpoint.state_dict import set_state_dict

    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
