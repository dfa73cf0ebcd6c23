"""Where a CPU training step of the quickstart goes (issue 28): matmuls, the rest of forward and
backward, the optimizer, the data, Python.

    .venv/bin/python -P bench/step_profile.py [--steps 6] [--threads 2] [--job examples/quickstart.yaml]

Builds the job's model and optimizer exactly as ``train()`` does (``build_model``,
``build_optimizer``), feeds it random token windows of the job's shape (the loader's cost is
measured apart: one ``next()`` of a real ``ShardLoader`` is microseconds beside a step, but
this bench needs no prepared data), and runs ``--steps`` steps under ``torch.profiler`` after
two warm-up steps. Prints the step's wall time split by phase (``record_function`` ranges)
and the top operators by self CPU time, then times the optimizer step with AdamW's
per-tensor loop (torch's default on CPU) and its ``fused`` CPU kernel side by side. Results go to bench/RESULTS.md by hand
(date, commit, machine, load).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch
import yaml
from llmtrain.runtime.model import token_loss_sum
from llmtrain.runtime.train import build_model, build_optimizer, clip_grad_norm
from torch.profiler import ProfilerActivity, profile, record_function

from llmtrain.api.config import RuntimeConfig, runtime_config_from_spec
from llmtrain.api.defaults import as_applied
from llmtrain.api.job import LLMTrainingJob

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("data", "forward", "loss", "backward", "clip", "optimizer", "zero_grad")


def config(job_path: Path) -> RuntimeConfig:
    job = LLMTrainingJob.model_validate(as_applied(yaml.safe_load(job_path.read_text())))
    vocab = job.spec.data.tokenizer.train.vocab_size if job.spec.data.tokenizer.train else 4096
    return runtime_config_from_spec(job.spec, vocab_size=vocab)


def step(
    model: torch.nn.Module, opt: torch.optim.Optimizer, cfg: RuntimeConfig, gen: torch.Generator
) -> None:
    t, m = cfg.train, cfg.model
    with record_function("data"):
        batch = torch.randint(0, m.vocab_size, (t.micro_batch_size, m.context_length + 1), generator=gen)
    with record_function("forward"):
        logits = model(batch[:, :-1])
    with record_function("loss"):
        loss = token_loss_sum(logits, batch[:, 1:]) / batch[:, 1:].numel()
    with record_function("backward"):
        loss.backward()
    with record_function("clip"):
        clip_grad_norm(model, t.grad_clip)
    with record_function("optimizer"):
        opt.step()
    with record_function("zero_grad"):
        opt.zero_grad(set_to_none=True)


def optimizer_seconds(cfg: RuntimeConfig, fused: bool, steps: int) -> float:
    """Median wall seconds of AdamW's step alone (gradients set once, reused)."""
    model = build_model(cfg, torch.device("cpu"), use_fsdp=False)
    opt = build_optimizer(model, cfg.optimizer, fused=fused)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    times = []
    for _ in range(steps + 2):
        t0 = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[2:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--job", type=Path, default=ROOT / "examples" / "quickstart.yaml")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--unfused", action="store_true", help="profile with AdamW's per-tensor loop")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = config(args.job)
    model = build_model(cfg, torch.device("cpu"), use_fsdp=False)
    opt = build_optimizer(model, cfg.optimizer, fused=not args.unfused)
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):  # warm-up: first-call allocations and lazy imports stay out of the profile
        step(model, opt, cfg, gen)
    walls = []
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            t0 = time.perf_counter()
            step(model, opt, cfg, gen)
            walls.append(time.perf_counter() - t0)
    events = {e.key: e for e in prof.key_averages()}
    wall = statistics.median(walls)
    print(
        f"load {os.getloadavg()[0]:.1f}; threads {args.threads}; {args.steps} steps; step wall median {wall:.3f} s"
    )
    print(
        f"tokens/step {cfg.train.micro_batch_size * cfg.model.context_length}; params {model.num_params():,}"
    )
    print("| phase | ms/step | share |\n|---|---:|---:|")
    total = 0.0
    for phase in PHASES:
        ms = events[phase].cpu_time_total / 1e3 / args.steps if phase in events else 0.0
        total += ms
        print(f"| {phase} | {ms:.1f} | {ms / (wall * 1e3):.0%} |")
    print(
        f"| between phases (Python, profiler) | {wall * 1e3 - total:.1f} | {1 - total / (wall * 1e3):.0%} |"
    )
    ops = sorted(
        (e for e in prof.key_averages() if e.key not in PHASES and not e.key.startswith("ProfilerStep")),
        key=lambda e: e.self_cpu_time_total,
        reverse=True,
    )
    print("\n| operator (self CPU) | ms/step | share of step |\n|---|---:|---:|")
    for e in ops[:12]:
        ms = e.self_cpu_time_total / 1e3 / args.steps
        print(f"| {e.key} | {ms:.1f} | {ms / (wall * 1e3):.0%} |")
    matmul = sum(
        e.self_cpu_time_total
        for e in ops
        if e.key in ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul")
    )
    print(f"\nmatmuls (aten::mm/addmm/bmm): {matmul / 1e3 / args.steps:.1f} ms/step")
    loop = optimizer_seconds(cfg, fused=False, steps=args.steps)
    fused = optimizer_seconds(cfg, fused=True, steps=args.steps)
    print(
        f"AdamW step alone: per-tensor loop {loop * 1e3:.1f} ms, fused {fused * 1e3:.1f} ms "
        f"(fused/loop {fused / loop:.2f})"
    )


if __name__ == "__main__":
    main()
