"""Tokens/s and MFU of our model and training step on one GPU (issue 7) — one ready command.

    python3 bench/gpu_mfu.py --out /tmp/mfu                     # on the lent GPU machine, ≤ 6 min
    python3 bench/gpu_mfu.py --out /tmp/mfu --device cpu --tiny --steps 2   # CI smoke run

Runs from a plain checkout where only torch (+ Triton) is installed — no pydantic, ray, boto3 or
prometheus-client, and llmtrain not installed: :func:`bootstrap` makes the checkout's
``llmtrain/`` importable as ``llmtrain`` and ``runtime/`` as ``llmtrain.runtime`` without running
any package ``__init__`` and without putting the checkout root on ``sys.path`` (its ``operator/``
would shadow the standard library's).

Measured, in this order (the 760M compiled run is the goal: ≥ 50 % MFU on one H100):

    124m  GPT-2 small shape: 12 layers, d 768, 12 heads, ctx 1024, vocab 50304, tied (≈124 M)
    760m  24 layers, d 1536, 12 heads, ctx 2048, vocab 50304, tied (≈756 M), micro batch 12

each with ``torch.compile`` of every block off and on, bf16 autocast (``train()``'s single-device
path) or, with ``--fsdp``, FSDP2 on a 1-rank group with its bf16 MixedPrecisionPolicy (the
path a Ray Train worker takes). The step is ours: ``build_model`` / ``build_optimizer`` /
``clip_grad_norm`` / ``token_loss_sum`` from ``llmtrain.runtime.train`` and ``.model``, over
random token batches already on the device (no loader: this measures the model and step).
Each run is time-boxed: warm-up steps (compilation happens there), then up to ``--steps``
timed steps or until its share of ``--budget-s`` is spent. MFU is the model's own
``estimate_mfu`` (6·N + 12·L·d·T FLOPs per token against the device's dense bf16 peak).

A line is printed as each run finishes, and ``--out/gpu_mfu.json`` is rewritten after each run
(with the device name), so a run cut short still leaves what it measured.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import socket
import sys
import threading
import time
import types
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def bootstrap(root: Path = ROOT) -> None:
    """Make ``llmtrain.api.*`` and ``llmtrain.runtime.*`` importable from the checkout at ``root``.

    The three package objects are built by hand with ``__path__`` pointing into the checkout
    (``llmtrain.runtime`` is ``runtime/``, as pyproject.toml maps it), so their ``__init__``
    files never run and nothing else of the project is imported; submodules then load through
    the ordinary path finder. An already imported ``llmtrain`` is replaced only if it is not
    this checkout's.
    """
    packages = {
        "llmtrain": root / "llmtrain",
        "llmtrain.api": root / "llmtrain" / "api",
        "llmtrain.runtime": root / "runtime",
    }
    for name, path in packages.items():
        existing = sys.modules.get(name)
        if existing is not None and str(path) in list(getattr(existing, "__path__", [])):
            continue
        module = types.ModuleType(name, f"{name} from {path} (bench/gpu_mfu.py bootstrap)")
        module.__path__ = [str(path)]
        module.__file__ = str(path / "__init__.py")
        module.__package__ = name
        sys.modules[name] = module
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(sys.modules[parent], child, module)


# ------------------------------------------------------------------------------ configs


@dataclass(frozen=True)
class Shape:
    name: str
    n_layers: int
    d_model: int
    n_heads: int
    context_length: int
    vocab_size: int
    ffn_hidden_size: int  # SwiGLU hidden: 8/3·d rounded up to a multiple of 256
    micro_batch: int  # sequences per forward/backward; tokens/step = micro · ctx


SHAPES = (
    Shape("124m", 12, 768, 12, 1024, 50304, 2048, 16),
    # 12 heads of 128 (Llama's head size; the flash kernel's best tile): 51.8 % MFU on an H100
    # against 50.3 % with 16 heads of 96, same FLOPs. Micro batch 12: 24,576 tokens per step,
    # 43.7 GiB peak with the compiled loss (bench/RESULTS.md).
    Shape("760m", 24, 1536, 12, 2048, 50304, 4096, 12),
)
# --tiny: the same code paths in seconds on a CPU (CI).
TINY_SHAPES = (
    Shape("124m-tiny", 2, 64, 4, 64, 512, 192, 4),
    Shape("760m-tiny", 2, 128, 4, 128, 512, 384, 2),
)


@dataclass
class Run:
    """One measured configuration, as written to the JSON file."""

    shape: str
    compile: bool
    fsdp: bool
    status: str  # ok | oom | error | skipped
    adamw: str = "fused"  # fused | foreach (on CPU: torch's default, reported as foreach)
    loss: str = "compiled"  # compiled (train()'s build_loss with compile on) | eager
    n_heads: int = 0
    params: int = 0
    flops_per_token: int = 0
    micro_batch: int = 0
    grad_accum: int = 1
    tokens_per_step: int = 0
    warmup_steps: int = 0
    warmup_s: float = 0.0  # includes compilation
    timed_steps: int = 0
    timed_s: float = 0.0
    step_s: float | None = None
    tokens_per_s: float | None = None
    mfu: float | None = None
    tflops_per_s: float | None = None
    peak_memory_gib: float | None = None
    final_loss: float | None = None
    error: str | None = None


# --------------------------------------------------------------------------------- run


def measure(
    shape: Shape,
    *,
    compile: bool,
    fsdp: bool,
    device: Any,
    device_name: str,
    warmup: int,
    steps: int,
    box_s: float,
    micro_batch: int,
    adamw: str,
    loss: str = "compiled",
) -> Run:
    """Build the model as ``train()`` does, warm up, then time up to ``steps`` optimizer steps."""
    import torch
    from llmtrain.runtime.train import build_loss, build_model, build_optimizer, clip_grad_norm

    from llmtrain.api.config import ModelConfig, OptimizerConfig, RuntimeConfig, ScheduleConfig, TrainConfig

    accum = max(1, shape.micro_batch // micro_batch)
    model_cfg = ModelConfig(
        vocab_size=shape.vocab_size,
        n_layers=shape.n_layers,
        d_model=shape.d_model,
        n_heads=shape.n_heads,
        n_kv_heads=shape.n_heads,
        context_length=shape.context_length,
        ffn_hidden_size=shape.ffn_hidden_size,
        tie_embeddings=True,
    )
    train_cfg = TrainConfig(
        global_batch_size=micro_batch * accum,
        micro_batch_size=micro_batch,
        world_size=1,
        max_steps=warmup + steps,
        precision="bf16",
        compile=compile,
        metrics_enabled=False,
    )
    cfg = RuntimeConfig(model_cfg, OptimizerConfig(lr=3e-4), ScheduleConfig(decay="constant"), train_cfg)
    model = build_model(cfg, device, use_fsdp=fsdp)
    fused = adamw == "fused" and device.type == "cuda"
    run = Run(
        shape.name,
        compile,
        fsdp,
        "ok",
        "fused" if fused else "foreach",
        loss="compiled" if compile and loss == "compiled" else "eager",
        n_heads=shape.n_heads,
        micro_batch=micro_batch,
        grad_accum=accum,
    )
    loss_fn = build_loss(run.loss == "compiled")
    optimizer = build_optimizer(model, cfg.optimizer, fused=fused)
    run.adamw = "fused" if optimizer.defaults.get("fused") else "foreach"  # what really runs
    run.params = model.num_params()
    run.flops_per_token = model.flops_per_token()
    tokens_per_step = micro_batch * accum * shape.context_length
    run.tokens_per_step = tokens_per_step
    # Without FSDP, train() mixes precision with autocast; with FSDP, the MixedPrecisionPolicy does.
    autocast: contextlib.AbstractContextManager[object] = (
        contextlib.nullcontext() if fsdp else torch.autocast(device.type, dtype=torch.bfloat16)
    )
    gen = torch.Generator(device=device).manual_seed(0)
    batches = [
        torch.randint(shape.vocab_size, (micro_batch, shape.context_length + 1), device=device, generator=gen)
        for _ in range(4)
    ]

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def step(i: int) -> torch.Tensor:
        """One optimizer step of train()'s loop: micro batches → clip → AdamW; loss stays on device."""
        loss_sum = torch.zeros((), device=device)
        for micro in range(accum):
            batch = batches[(i * accum + micro) % len(batches)]
            if fsdp:
                model.set_requires_gradient_sync(micro == accum - 1)
            with autocast:
                logits = model(batch[:, :-1])
            loss = loss_fn(logits, batch[:, 1:])
            (loss / tokens_per_step).backward()
            loss_sum += loss.detach()
        clip_grad_norm(model, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss_sum

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model.train()
    started = time.perf_counter()
    for i in range(warmup):
        step(i)
    sync()
    run.warmup_steps, run.warmup_s = warmup, time.perf_counter() - started
    # Timed: no host sync inside (the CPU queues ahead, as in train()); the box is checked on the
    # host clock, which runs at most a few queued steps ahead of the device.
    deadline = started + box_s
    t0 = time.perf_counter()
    loss = None
    done = 0
    while done < steps and (done < 2 or time.perf_counter() < deadline):
        loss = step(warmup + done)
        done += 1
    sync()
    run.timed_steps, run.timed_s = done, time.perf_counter() - t0
    run.step_s = run.timed_s / done
    run.tokens_per_s = tokens_per_step / run.step_s
    run.tflops_per_s = run.flops_per_token * run.tokens_per_s / 1e12
    run.mfu = model.estimate_mfu(run.tokens_per_s, device_name)
    run.final_loss = float(loss.item()) / tokens_per_step if loss is not None else None
    if device.type == "cuda":
        run.peak_memory_gib = torch.cuda.max_memory_allocated(device) / 2**30
    return run


def measure_with_retries(shape: Shape, **kw: Any) -> Run:
    """On out-of-memory, halve the micro batch (same tokens per step, by accumulation), twice."""
    import torch

    micro = shape.micro_batch
    while True:
        oom: str | None = None
        try:
            return measure(shape, micro_batch=micro, **kw)
        except torch.OutOfMemoryError as e:
            oom = str(e)[:500]
        except Exception as e:  # one failing configuration must not cost the others
            error = f"{type(e).__name__}: {e}"[:2000]
            failed = Run(
                shape.name, kw["compile"], kw["fsdp"], "error", kw["adamw"], micro_batch=micro, error=error
            )
        # Out of the except block: its traceback, whose frames hold the model and optimizer, is gone.
        release(kw["device"])
        if oom is None:
            return failed
        if micro <= max(1, shape.micro_batch // 4):
            return Run(
                shape.name, kw["compile"], kw["fsdp"], "oom", kw["adamw"], micro_batch=micro, error=oom
            )
        micro //= 2
        print(f"  {shape.name}: out of memory, retrying with micro batch {micro}", flush=True)


def describe(run: Run) -> str:
    """The line printed when a run finishes."""
    mode = ("compiled" if run.compile else "eager") + ("" if run.adamw == "fused" else f" {run.adamw}")
    if run.compile and run.loss == "eager":
        mode += " eager-loss"
    if run.n_heads:
        mode += f" h{run.n_heads}"
    if run.status != "ok" or run.step_s is None or run.tokens_per_s is None or run.tflops_per_s is None:
        return f"{run.shape:10s} {mode:8s} {run.status}: {run.error}"
    mfu = f"{100 * run.mfu:.1f} %" if run.mfu is not None else "n/a"
    mem = f", peak {run.peak_memory_gib:.1f} GiB" if run.peak_memory_gib is not None else ""
    return (
        f"{run.shape:10s} {mode:8s} {run.tokens_per_s:>12,.0f} tokens/s  MFU {mfu:>7s}  "
        f"{run.tflops_per_s:.1f} TFLOP/s  step {run.step_s * 1e3:.1f} ms × {run.timed_steps} "
        f"(warm-up {run.warmup_s:.1f} s, micro {run.micro_batch}×{run.grad_accum}{mem}, "
        f"loss {run.final_loss:.3f})"
    )


def release(device: Any) -> None:
    """Free the previous run's model, optimizer and compiled graphs before the next."""
    import torch

    gc.collect()
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def init_single_rank_group(device: Any) -> None:
    """A 1-rank process group on loopback (what Ray Train gives a 1-worker job), for --fsdp."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group(
        "nccl" if device.type == "cuda" else "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=0,
        world_size=1,
        device_id=device if device.type == "cuda" else None,
    )


# ------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="directory for gpu_mfu.json (created)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny shapes (CI on CPU)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per run (fewer if the box runs out)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps (default 3 on cuda, 1 on cpu)")
    p.add_argument("--compile", choices=("both", "off", "on"), default="both")
    p.add_argument("--shapes", default=None, help="comma-separated subset of 124m,760m")
    p.add_argument("--fsdp", action="store_true", help="FSDP2 on a 1-rank group instead of autocast")
    p.add_argument(
        "--micro-batch",
        type=int,
        default=None,
        help="sequences per step for every shape (default: the shape's)",
    )
    p.add_argument(
        "--adamw",
        choices=("fused", "foreach", "both"),
        default="fused",
        help="AdamW kernel on cuda (train()'s default is fused); both = each run twice, side by side",
    )
    p.add_argument(
        "--loss",
        choices=("compiled", "eager", "both"),
        default="compiled",
        help="with compile on: the loss compiled too (train()'s build_loss) or eager; both = side by side",
    )
    p.add_argument(
        "--heads", type=int, default=None, help="attention heads for every shape (default: the shape's)"
    )
    p.add_argument("--budget-s", type=float, default=330.0, help="wall budget of all runs together")
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error("--steps must be ≥ 1")
    if args.heads is not None and args.heads < 1:
        p.error("--heads must be ≥ 1")
    if args.micro_batch is not None and args.micro_batch < 1:
        p.error("--micro-batch must be ≥ 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    out_file = out_dir / "gpu_mfu.json"
    bootstrap()

    import llmtrain.runtime.model as model_module
    import torch
    from llmtrain.runtime.model import peak_flops

    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device visible: run with --device cpu (with --tiny for a smoke run)", file=sys.stderr)
        return 2
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # fp32 matmuls outside autocast (none in the hot path) may use TF32 tensor cores.
    torch.set_float32_matmul_precision("high")
    warmup = args.warmup if args.warmup is not None else (3 if device.type == "cuda" else 1)
    shapes: tuple[Shape, ...] = TINY_SHAPES if args.tiny else SHAPES
    if args.shapes:
        wanted = [s.strip() for s in args.shapes.split(",") if s.strip()]
        known = {s.name.removesuffix("-tiny") for s in shapes}
        if set(wanted) - known:
            print(
                f"--shapes: unknown {sorted(set(wanted) - known)}; choose from {sorted(known)}",
                file=sys.stderr,
            )
            return 2
        shapes = tuple(s for s in shapes if s.name.removesuffix("-tiny") in wanted)
    if args.micro_batch is not None:
        # More sequences per optimizer step (tokens/step grow): the optimizer's and the
        # per-step launch costs are spread over more tokens.
        shapes = tuple(replace(s, micro_batch=args.micro_batch) for s in shapes)
    if args.heads is not None:
        shapes = tuple(replace(s, n_heads=args.heads) for s in shapes)
    compiles = {"both": (False, True), "off": (False,), "on": (True,)}[args.compile]
    impls = ("fused", "foreach") if args.adamw == "both" else (args.adamw,)
    losses = ("eager", "compiled") if args.loss == "both" else (args.loss,)
    # The loss is compiled only with the blocks: an eager run measures one loss mode.
    plan = [
        (s, c, a, lo) for s in shapes for c in compiles for a in impls for lo in (losses if c else ("eager",))
    ]
    if args.fsdp:
        init_single_rank_group(device)

    report: dict[str, Any] = {
        "device": args.device,
        "device_name": device_name,
        "peak_bf16_flops": peak_flops(device_name),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "host": platform.node(),
        "model_file": model_module.__file__,
        "argv": sys.argv[1:],
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "complete": False,
        "runs": [],
    }

    def write() -> None:
        report["elapsed_s"] = round(time.perf_counter() - started, 2)
        tmp = out_file.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(report, indent=2) + "\n")
        os.replace(tmp, out_file)

    # A watchdog: a hung compile must not outlive the budget by much; what was measured stays.
    def watchdog() -> None:
        time.sleep(args.budget_s + 30)
        report["watchdog"] = f"killed after {args.budget_s + 30:.0f} s"
        write()
        print(f"budget exceeded by 30 s: wrote {out_file} and exiting", file=sys.stderr, flush=True)
        os._exit(3)

    threading.Thread(target=watchdog, daemon=True).start()
    write()
    print(
        f"{device_name} · torch {torch.__version__} · peak bf16 {report['peak_bf16_flops'] or 'unknown'} FLOP/s "
        f"· {len(plan)} runs in ≤ {args.budget_s:.0f} s",
        flush=True,
    )
    for i, (shape, compile, adamw, loss) in enumerate(plan):
        remaining = args.budget_s - (time.perf_counter() - started)
        box = remaining / (len(plan) - i)
        if remaining <= 0:
            report["runs"].append(
                asdict(Run(shape.name, compile, args.fsdp, "skipped", adamw, error="budget spent"))
            )
            write()
            continue
        report["in_progress"] = {
            "shape": shape.name,
            "compile": compile,
            "adamw": adamw,
            "loss": loss,
            "since_s": round(time.perf_counter() - started, 1),
        }
        write()
        run = measure_with_retries(
            shape,
            compile=compile,
            fsdp=args.fsdp,
            device=device,
            device_name=device_name,
            warmup=warmup,
            steps=args.steps,
            box_s=box,
            adamw=adamw,
            loss=loss,
        )
        release(device)
        report["runs"].append(asdict(run))
        write()
        print(describe(run), flush=True)
    report["complete"] = True
    report.pop("in_progress", None)
    write()
    print(f"wrote {out_file} ({time.perf_counter() - started:.0f} s)", flush=True)
    return 0 if all(r["status"] == "ok" for r in report["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
