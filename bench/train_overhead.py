"""What our training loop costs over a bare PyTorch loop, and what Ray Train + FSDP2 costs (issue 7).

    .venv/bin/python bench/train_overhead.py [--steps 8] [--warmup 2] [--repeats 2] [--no-append]

One model (large enough that a CPU step takes ≥ 0.5 s), one global batch, one thread budget
(the machine's cores), the same pre-tokenized tokens, measured side by side in one run:

(a) bare     one process, ``torch.set_num_threads(cores)``: forward → cross-entropy → backward →
             clip → AdamW step → zero_grad over windows sliced from the token tensor in memory.
(b) ours     :func:`llmtrain.runtime.train.train` at world size 1, same threads, reading the same
             tokens through the real :class:`ShardLoader` (shards + manifest on disk), with
             Prometheus metrics served, a ProgressEvent every step (logEverySteps 1: the most
             host syncs and metric updates the loop can do) and the per-step loss bookkeeping.
(c) ray      :func:`llmtrain.runtime.trainer.launch`: Ray Train, 2 workers × 1 CPU, FSDP2 over
             gloo, each worker 1 thread, half the global batch per worker.

Two diagnostic rows split (c)'s cost: (d) ``bare 1 thread, half batch`` is one data-parallel
worker's compute with no communication — the ideal step of (c); (e) ``fsdp2 2 ranks`` is
``train()`` on 2 gloo ranks started by :func:`run_ranks` (what torchrun does) — (c) without Ray.

OpenMP: every variant runs with ``OMP_WAIT_POLICY=PASSIVE`` (``--omp-wait-policy``). libgomp's
default spins at each barrier before sleeping, and drops to a short spin only when its process
has more OpenMP threads than cores. On this shared, oversubscribed machine that made (a) burn
2.8× the CPU of (b) for the same work: (b)'s loader thread runs small parallel ops, so libgomp
throttled (b)'s spinning but not (a)'s — an accident of thread counts, not overhead. PASSIVE
(threads sleep at once) gives both the same footing; on a quiet machine it costs little.

(f) ``--paired``: (a) and (b) in ONE process, a step of each in turn (the bare step runs inside
train()'s per-step progress callback), ``--repeats`` processes pooled; ours/bare = Σ ours / Σ
bare over the pairs. This is the figure for the ≤ 1.05× goal: load from other processes lands
on both halves of a pair alike, where separate processes (below) scatter ±20 % on this machine.

    .venv/bin/python -P bench/train_overhead.py --paired --steps 20 --warmup 2 --repeats 3

Each variant runs in its own fresh process; the variants are interleaved ``--repeats`` times
(a b c d e a b c d e …) so that load from other processes on the shared machine hits them all
alike. Step time = median of the per-step wall times after ``--warmup`` steps (the median is
robust to a neighbour's burst); start-up (imports, model build, Ray start) is reported apart.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import functools
import json
import math
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from llmtrain.api.config import ModelConfig

ROOT = Path(__file__).resolve().parents[1]

# ≈ 7.6 M parameters; 2048 tokens per step ≈ 0.074 TFLOP (fp32): ≈ 2.4 CPU-seconds per step here.
VOCAB = 8192
MODEL = ModelConfig(
    vocab_size=VOCAB,
    n_layers=4,
    d_model=256,
    n_heads=4,
    n_kv_heads=4,
    context_length=256,
    ffn_hidden_size=768,
)
# --tiny: the same code paths in seconds, for the benchmark's own smoke test (not a measurement).
TINY_MODEL = dataclasses.replace(
    MODEL, n_layers=1, d_model=32, n_heads=2, n_kv_heads=2, context_length=32, ffn_hidden_size=64
)
GLOBAL_BATCH = 8
LR = 3e-4
TOKENS = 400_000  # ≈ 1560 windows: no variant reaches the end of an epoch
VARIANTS = ("bare", "ours", "ray", "bare1", "fsdp2")
LABELS = {
    "bare": "(a) bare PyTorch loop",
    "ours": "(b) ours: train(), world 1",
    "ray": "(c) Ray Train, 2 FSDP2 workers",
    "bare1": "(d) bare, 1 thread, half batch",
    "fsdp2": "(e) train(), 2 gloo FSDP2 ranks",
}


def use_tiny() -> None:
    global MODEL
    MODEL = TINY_MODEL


def runtime_config(world_size: int, steps: int, metrics_port: int) -> dict[str, Any]:
    """The RuntimeConfig of (b), (c), (e) as a dict: metrics on, a progress event every step,
    validation (1 batch) and no checkpoints — only after the last step, outside the timing."""
    from llmtrain.api.config import OptimizerConfig, RuntimeConfig, ScheduleConfig, TrainConfig

    train = TrainConfig(
        global_batch_size=GLOBAL_BATCH,
        micro_batch_size=GLOBAL_BATCH // world_size,
        world_size=world_size,
        max_steps=steps,
        precision="fp32",
        grad_clip=1.0,
        log_every_steps=1,
        val_every_steps=10**9,
        val_batches=1,
        metrics_enabled=True,
        metrics_port=metrics_port,
    )
    opt = OptimizerConfig(lr=LR)
    return RuntimeConfig(MODEL, opt, ScheduleConfig(decay="constant"), train).to_dict()


def free_port_block(n: int) -> int:
    """A base port with ``n`` consecutive ports free on 127.0.0.1 (metrics: base + local rank).

    Drawn below the kernel's ephemeral range: a port picked there and released could be handed
    straight to gloo's store or to Ray before the metrics server binds it.
    """
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(20_000, 30_000)
        try:
            for i in range(n):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", base + i))
            return base
        except OSError:
            continue
    raise RuntimeError("no block of free ports on 127.0.0.1")


def cpu_seconds() -> float:
    """User + system CPU seconds of this process, all its threads (OpenMP pool, loader, metrics);
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID), not os.times(), whose 10 ms ticks are too coarse."""
    return time.process_time()


# ------------------------------------------------------------------------------ data


def token_stream() -> Any:
    """The pre-tokenized corpus every variant reads: seeded ids in [0, VOCAB)."""
    import torch

    return torch.randint(0, VOCAB, (TOKENS,), generator=torch.Generator().manual_seed(0), dtype=torch.int64)


def write_shards(folder: Path) -> None:
    """The same tokens as prepared data: 2 train shards + 1 validation shard + manifest."""
    import hashlib

    from llmtrain.runtime.data import shard
    from llmtrain.runtime.store import LocalStore

    from llmtrain.api.shards import Manifest, ShardInfo, Split, TokenizerInfo

    ids = token_stream().numpy().astype("uint32")
    store = LocalStore(folder)
    half = TOKENS // 2
    parts: list[tuple[Split, int, Any]] = [
        ("train", 0, ids[:half]),
        ("train", 1, ids[half:]),
        ("validation", 0, ids[:5000]),
    ]
    infos = []
    for split, i, tokens in parts:
        data = shard.encode_shard(tokens, VOCAB, eot_id=VOCAB - 1)
        name = shard.shard_name(split, i)
        store.put(name, data)
        infos.append(ShardInfo(name, split, len(tokens), 0, len(data), hashlib.sha256(data).hexdigest()))
    tok = TokenizerInfo("tokenizer.json", "bench", VOCAB, VOCAB - 1, "<eot>")
    shard.write_manifest(store, Manifest("bench", tok, "uint16", infos, [], {}, 0))


# ---------------------------------------------------------------------------- variants


class BareLoop:
    """(a)/(d): the loop as one would write it by hand, same model class, same tokens."""

    def __init__(self, batch: int) -> None:
        import torch
        from llmtrain.runtime.model import GPT

        torch.manual_seed(0)
        self.model = GPT(MODEL)
        self.model.init_weights()
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=LR, betas=(0.9, 0.95), weight_decay=0.1
        )
        self.tokens = token_stream()
        self.batch = batch
        L = MODEL.context_length
        self.windows = torch.randperm((TOKENS - 1) // L, generator=torch.Generator().manual_seed(1))
        self.offsets = torch.arange(L + 1)
        self.done = 0
        self.model.train()

    def step(self) -> float:
        import torch
        import torch.nn.functional as F

        L, b = MODEL.context_length, self.batch
        rows = self.windows[self.done * b : (self.done + 1) * b]
        chunk = self.tokens[rows[:, None] * L + self.offsets]  # [batch, L + 1]
        logits = self.model(chunk[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.done += 1
        return loss.item()  # what any loop does to print a loss; free on CPU (no device queue)


def run_bare(steps: int, threads: int, batch: int) -> dict[str, Any]:
    import torch

    torch.set_num_threads(threads)
    loop = BareLoop(batch)
    stamps, cpu = [time.perf_counter()], [cpu_seconds()]
    for _ in range(steps):
        loop.step()
        stamps.append(time.perf_counter())
        cpu.append(cpu_seconds())
    return {"stamps": stamps, "cpu": cpu}


def run_paired(steps: int, threads: int, data: str) -> dict[str, Any]:
    """(f) ours and bare in ONE process, a step of each in turn: train() runs, and at the end of
    each of its steps (its progress event) the bare loop takes one step before train() goes on.

    Both loops then see the same machine at the same moment: a neighbour's burst lands on a
    pair, not on one side, and the ratio of the two sums is what train() adds over bare. What
    shares the process: train()'s loader prefetch thread and metrics server may run during a
    bare step (counted against bare, microseconds here); the two models evict each other's
    weights from cache (30 MB + optimizer state each: neither fits in cache anyway).
    """
    import torch
    from llmtrain.runtime.data.loader import open_loader
    from llmtrain.runtime.train import RunContext, train

    from llmtrain.api.config import RuntimeConfig
    from llmtrain.api.progress import ProgressEvent

    torch.set_num_threads(threads)
    bare = BareLoop(GLOBAL_BATCH)
    cfg = RuntimeConfig.from_dict(runtime_config(1, steps, free_port_block(1)))
    out: dict[str, list[float]] = {"ours_wall": [], "ours_cpu": [], "bare_wall": [], "bare_cpu": []}
    mark = [time.perf_counter(), cpu_seconds()]

    def on_progress(event: ProgressEvent) -> None:
        if event.stage != "training":
            return
        t0, c0 = time.perf_counter(), cpu_seconds()
        out["ours_wall"].append(t0 - mark[0])  # the first one includes train()'s set-up: warm-up
        out["ours_cpu"].append(c0 - mark[1])
        bare.step()
        t1, c1 = time.perf_counter(), cpu_seconds()
        out["bare_wall"].append(t1 - t0)
        out["bare_cpu"].append(c1 - c0)
        mark[:] = [t1, c1]

    result = train(
        cfg,
        functools.partial(open_loader, data),
        on_progress=on_progress,
        ctx=RunContext(metrics_addr="127.0.0.1"),
    )
    assert result.final_step == steps and len(out["ours_wall"]) == steps, (result.final_step, out)
    return dict(out)


def paired_summary(out: dict[str, list[float]], warmup: int) -> dict[str, float]:
    """ours/bare from the interleaved steps after the warm-up: the ratio of the sums (the
    estimate) and the quartiles of the per-pair ratios (how much single pairs scatter)."""
    pick = {k: out[k][warmup:] for k in PAIR_KEYS}
    if not pick["ours_wall"]:
        raise ValueError("no timed steps: --steps must be ≥ 1")
    summary: dict[str, float] = {"pairs": len(pick["ours_wall"])}
    for kind in ("wall", "cpu"):
        ours, bare = pick[f"ours_{kind}"], pick[f"bare_{kind}"]
        per_pair = sorted(o / b for o, b in zip(ours, bare, strict=True))
        q1, median, q3 = statistics.quantiles(per_pair, n=4) if len(per_pair) > 1 else [per_pair[0]] * 3
        summary |= {
            f"{kind}_ratio": sum(ours) / sum(bare),
            f"{kind}_pair_q1": q1,
            f"{kind}_pair_median": median,
            f"{kind}_pair_q3": q3,
            f"{kind}_ours_s": statistics.median(ours),
            f"{kind}_bare_s": statistics.median(bare),
        }
    return summary


def run_ours(steps: int, threads: int, data: str) -> dict[str, Any]:
    """(b): train() at world size 1 with the real loader, metrics and a progress event per step."""
    import torch
    from llmtrain.runtime.data.loader import open_loader
    from llmtrain.runtime.train import RunContext, train

    from llmtrain.api.config import RuntimeConfig
    from llmtrain.api.progress import ProgressEvent

    torch.set_num_threads(threads)
    cfg = RuntimeConfig.from_dict(runtime_config(1, steps, free_port_block(1)))
    stamps: list[float] = []
    cpu: list[float] = []
    losses: list[float] = []

    def on_progress(event: ProgressEvent) -> None:
        if event.stage == "training":
            stamps.append(time.perf_counter())
            cpu.append(cpu_seconds())
            losses.append(float(event.train_loss or 0.0))

    start, start_cpu = time.perf_counter(), cpu_seconds()
    result = train(
        cfg,
        functools.partial(open_loader, data),
        on_progress=on_progress,
        ctx=RunContext(metrics_addr="127.0.0.1"),
    )
    assert result.final_step == steps and len(stamps) == steps, (result.final_step, len(stamps))
    # stamps[0] is the end of step 1; the loop started right after the model build, which we
    # do not see from here: step 1 is warm-up and never timed.
    return {"stamps": [start, *stamps], "cpu": [start_cpu, *cpu], "losses": losses}


def _fsdp2_rank(cfg: dict[str, Any], data: str, events: str) -> int:
    """(e) one rank (a run_ranks target): train() on the initialised gloo group."""
    import torch
    from llmtrain.runtime.data.loader import open_loader
    from llmtrain.runtime.train import RunContext, train

    from llmtrain.api.config import RuntimeConfig

    torch.set_num_threads(1)
    result = train(
        RuntimeConfig.from_dict(cfg),
        functools.partial(open_loader, data),
        on_progress=StampSink(events),
        ctx=RunContext(metrics_addr="127.0.0.1"),
    )
    return result.final_step


class StampSink:
    """A picklable on_progress for rank 0 of (c)/(e): per training event, the wall time and the
    CPU seconds of the rank-0 process so far, as JSON lines."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __call__(self, event: Any) -> None:
        if event.stage == "training":
            with open(self.path, "a") as f:
                f.write(json.dumps({"time": time.time(), "cpu": cpu_seconds()}) + "\n")


def _event_stamps(events: Path) -> tuple[list[float], list[float]]:
    rows = [json.loads(line) for line in events.read_text().splitlines() if line]
    return [r["time"] for r in rows], [r["cpu"] for r in rows]


def run_fsdp2(steps: int, data: str, tmp: Path) -> dict[str, Any]:
    from llmtrain.runtime.synthetic import run_ranks

    events = tmp / "fsdp2-events.jsonl"
    cfg = runtime_config(2, steps, free_port_block(2))
    start = time.time()
    # OMP_NUM_THREADS: the spawned ranks size their thread pools from it at import.
    env = {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "")}
    run_ranks(2, _fsdp2_rank, cfg, data, str(events), env=env, timeout=900)
    stamps, cpu = _event_stamps(events)
    assert len(stamps) == steps, len(stamps)
    return {"stamps": [start, *stamps], "cpu": [math.nan, *cpu]}


def run_ray(steps: int, data: str, tmp: Path) -> dict[str, Any]:
    """(c): Ray Train on a local 2-CPU cluster (loopback), 2 FSDP2 workers × 1 CPU × 1 thread."""
    import ray
    from llmtrain.runtime.data.loader import open_loader
    from llmtrain.runtime.ray_local import init_local_ray
    from llmtrain.runtime.trainer import LaunchOptions, launch

    from llmtrain.api.config import RuntimeConfig

    events = tmp / "ray-events.jsonl"
    t0 = time.time()
    init_local_ray(2, temp_dir=tmp / "ray")
    ray_up = time.time()
    cfg = RuntimeConfig.from_dict(runtime_config(2, steps, free_port_block(2)))
    try:
        launch(
            cfg,
            functools.partial(open_loader, data),
            on_progress=StampSink(str(events)),
            options=LaunchOptions(
                cpus_per_worker=1,
                metrics_addr="127.0.0.1",
                storage_path=str(tmp / "ray-results"),
                env=(("OMP_NUM_THREADS", "1"), ("OMP_WAIT_POLICY", os.environ.get("OMP_WAIT_POLICY", ""))),
            ),
        )
    finally:
        ray.shutdown()
    stamps, cpu = _event_stamps(events)
    assert len(stamps) == steps, len(stamps)
    return {"stamps": [ray_up, *stamps], "cpu": [math.nan, *cpu], "ray_start_s": ray_up - t0}


def child(variant: str, steps: int, threads: int, data: str, tmp: str, tiny: bool) -> None:
    """Entry of one variant's process: prints its result as the last stdout line."""
    if tiny:
        use_tiny()
    started = time.perf_counter()
    if variant == "bare":
        out = run_bare(steps, threads, GLOBAL_BATCH)
    elif variant == "bare1":
        out = run_bare(steps, 1, GLOBAL_BATCH // 2)
    elif variant == "ours":
        out = run_ours(steps, threads, data)
    elif variant == "fsdp2":
        out = run_fsdp2(steps, data, Path(tmp))
    elif variant == "ray":
        out = run_ray(steps, data, Path(tmp))
    elif variant == "paired":
        out = run_paired(steps, threads, data)
    else:
        raise ValueError(variant)
    out["wall_s"] = time.perf_counter() - started
    print("RESULT " + json.dumps(out))


# ------------------------------------------------------------------------------ driver


def step_stats(stamps: list[float], cpu: list[float], warmup: int) -> dict[str, float]:
    """Per-step wall and CPU times after the warm-up steps (stamps[0] = loop start, stamps[i] =
    end of step i; cpu likewise, CPU seconds of the process that ran rank 0)."""
    durations = [b - a for a, b in zip(stamps[warmup:], stamps[warmup + 1 :], strict=False)]
    if not durations or warmup < 1:
        raise ValueError("no timed steps: --warmup must be ≥ 1 and --steps ≥ 1")
    cpu_steps = [b - a for a, b in zip(cpu[warmup:], cpu[warmup + 1 :], strict=False)]
    return {
        "cpu_median_s": statistics.median(cpu_steps),
        "median_s": statistics.median(durations),
        "mean_s": statistics.fmean(durations),
        "min_s": min(durations),
        "max_s": max(durations),
        "first_step_s": stamps[1] - stamps[0],
        "timed_steps": len(durations),
    }


def run_variant(variant: str, args: argparse.Namespace, data: Path, tmp: Path) -> dict[str, Any]:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        variant,
        "--steps",
        str(args.warmup + args.steps),
        "--threads",
        str(args.threads),
        "--data",
        str(data),
        "--tmp",
        str(tmp),
        *(["--tiny"] if args.tiny else []),
    ]
    # No PYTHONPATH=ROOT: the checkout's operator/ would shadow the standard library's operator.
    # OMP_WAIT_POLICY is read when libgomp loads, so it goes in through the environment.
    env = {**os.environ, "OMP_WAIT_POLICY": args.omp_wait_policy}
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=1800)
    wall = time.perf_counter() - started
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
        raise RuntimeError(f"variant {variant} failed with exit code {proc.returncode}")
    out: dict[str, Any] = json.loads(lines[-1][len("RESULT ") :])
    out.update(process_wall_s=wall, load=os.getloadavg()[0])
    if variant != "paired":  # (f) reports pairs, not one loop's stamps
        out.update(step_stats(out["stamps"], out["cpu"], args.warmup))
    return out


PAIR_KEYS = ("ours_wall", "ours_cpu", "bare_wall", "bare_cpu")


def run_paired_rounds(args: argparse.Namespace, data: Path, tmp: Path) -> tuple[dict[str, float], list[str]]:
    """(f) ``--repeats`` fresh processes; their timed pairs pooled into one summary."""
    rounds, lines = [], []
    for r in range(args.repeats):
        work = tmp / f"paired-{r}"
        work.mkdir()
        out = run_variant("paired", args, data, work)
        one = paired_summary(out, args.warmup)
        rounds.append(out)
        line = (
            f"round {r + 1}: ours/bare {one['cpu_ratio']:.3f} CPU, {one['wall_ratio']:.3f} wall over "
            f"{one['pairs']:.0f} pairs (bare {one['cpu_bare_s']:.3f} CPU-s/step), load {out['load']:.1f}"
        )
        lines.append(line)
        print("  " + line, flush=True)
    pooled = {k: [x for o in rounds for x in o[k][args.warmup :]] for k in PAIR_KEYS}
    return paired_summary(pooled, 0), lines


# Processes that share one step's work: CPU of the whole step = rank 0's × this (ranks are
# symmetric). (d) stands for the ideal data-parallel step: 2 workers, each (d)'s work.
RANKS = {"bare": 1, "ours": 1, "ray": 2, "bare1": 2, "fsdp2": 2}


def report(
    runs: dict[str, list[dict[str, Any]]], tokens_per_step: int, flops_step: float
) -> tuple[str, list[str]]:
    """The markdown table and the ratio lines. Per variant: the median over rounds of the
    per-round median step (wall and CPU); CPU ratios compare all ranks' CPU seconds per step."""
    wall = {v: statistics.median([o["median_s"] for o in rs]) for v, rs in runs.items()}
    cpu0 = {v: statistics.median([o["cpu_median_s"] for o in rs]) for v, rs in runs.items()}
    cpu = {v: cpu0[v] * RANKS[v] for v in runs}
    rows = [
        f"| {LABELS[v]} | {wall[v]:.3f} | {cpu0[v]:.3f} | {cpu[v]:.3f} | {tokens_per_step / wall[v]:,.0f} | "
        f"{flops_step / wall[v] / 1e9:.1f} | "
        + ", ".join(f"{o['median_s']:.3f} / {o['cpu_median_s']:.3f}" for o in rs)
        + f" | {statistics.median([o['process_wall_s'] for o in rs]):.1f} |"
        for v, rs in runs.items()
    ]
    table = "\n".join(
        [
            "| variant | step wall s | step CPU s, rank 0 | step CPU s, all ranks | tokens/s (wall) "
            "| GFLOP/s (wall) | per round: wall / rank-0 CPU s | process wall s |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
            *rows,
        ]
    )
    ratios = []
    pairs = [("ours", "bare"), ("ray", "bare"), ("fsdp2", "bare"), ("ray", "bare1"), ("fsdp2", "bare1")]
    pairs.append(("ray", "fsdp2"))
    for num, den in pairs:
        if num in wall and den in wall:
            name = f"{num}/{'ideal' if den == 'bare1' else den}"
            ratios.append(f"{name} = {wall[num] / wall[den]:.3f} wall, {cpu[num] / cpu[den]:.3f} CPU")
    return table, ratios


def git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def paired(
    args: argparse.Namespace,
    data: Path,
    tmp: Path,
    params: int,
    tokens_per_step: int,
    flops_step: float,
    load_start: tuple[float, float, float],
) -> None:
    """--paired: (f) only, printed and (unless --no-append) appended to bench/RESULTS.md."""
    summary, lines = run_paired_rounds(args, data, tmp)
    load_end = os.getloadavg()
    result = (
        f"ours/bare = **{summary['cpu_ratio']:.3f} CPU, {summary['wall_ratio']:.3f} wall** (ratio of sums over "
        f"{summary['pairs']:.0f} interleaved step pairs); per-pair CPU ratio quartiles {summary['cpu_pair_q1']:.3f} / "
        f"{summary['cpu_pair_median']:.3f} / {summary['cpu_pair_q3']:.3f}, wall {summary['wall_pair_q1']:.3f} / "
        f"{summary['wall_pair_median']:.3f} / {summary['wall_pair_q3']:.3f}; median step: ours "
        f"{summary['cpu_ours_s']:.3f} / bare {summary['cpu_bare_s']:.3f} CPU-s, ours {summary['wall_ours_s']:.3f} / "
        f"bare {summary['wall_bare_s']:.3f} s wall"
    )
    print()
    print(result)
    print(f"load average: {load_start[0]:.1f} at start, {load_end[0]:.1f} at end")
    if args.no_append:
        return
    section = "\n".join(
        [
            "",
            "## Training loop overhead on CPU (issue 7): ours vs bare, step-interleaved in one process",
            "",
            f"- Date: {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}. Commit: {git_commit()}. "
            "Machine: 2 cores / 24 GiB, no GPU, shared "
            f"(load average {load_start[0]:.1f} at start, {load_end[0]:.1f} at end).",
            f"- `.venv/bin/python -P bench/train_overhead.py --paired --steps {args.steps} --warmup {args.warmup} "
            f"--repeats {args.repeats}`. Model: {params / 1e6:.1f} M params, fp32, {tokens_per_step} tokens/step, "
            f"{flops_step / 1e12:.3f} TFLOP/step, {args.threads} threads, "
            f"OMP_WAIT_POLICY={args.omp_wait_policy or '(libgomp default)'}. (f): train() (world 1, ShardLoader, "
            "metrics served, a ProgressEvent every step) and the bare loop in one process, one step each in turn "
            f"({args.warmup} warm-up pairs dropped per process).",
            *([f"- {args.note}"] if args.note else []),
            *[f"- {line}" for line in lines],
            "",
            f"Pooled: {result}.",
            "",
        ]
    )
    with open(ROOT / "bench" / "RESULTS.md", "a") as f:
        f.write(section)
    print("appended to bench/RESULTS.md")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=8, help="timed steps per run (after the warm-up)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps at the start of each run")
    p.add_argument("--repeats", type=int, default=2, help="interleaved rounds of all variants")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads of (a) and (b)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset")
    p.add_argument("--no-append", action="store_true", help="do not append to bench/RESULTS.md")
    p.add_argument(
        "--omp-wait-policy",
        choices=("PASSIVE", "ACTIVE", ""),
        default="PASSIVE",
        help="OMP_WAIT_POLICY of every variant ('' = libgomp's default spin-then-sleep); see the docstring",
    )
    p.add_argument(
        "--paired",
        action="store_true",
        help="(f) only: ours and bare a step each in turn in one process, --repeats processes pooled",
    )
    p.add_argument("--tiny", action="store_true", help="a tiny model: smoke test, never appended")
    p.add_argument("--note", default="", help="a line added to the RESULTS.md section")
    p.add_argument("--child", choices=(*VARIANTS, "paired"), help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--tmp", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child, args.steps, args.threads, args.data, args.tmp, args.tiny)
        return

    if args.tiny:
        use_tiny()
        args.no_append = True
    variants = [v for v in args.variants.split(",") if v]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        p.error(f"unknown variants {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    import torch
    from llmtrain.runtime.model import GPT

    with torch.device("meta"):
        model = GPT(MODEL)
    tokens_per_step = GLOBAL_BATCH * MODEL.context_length
    params = model.num_params()
    flops_step = model.flops_per_token() * tokens_per_step
    load_start = os.getloadavg()
    print(
        f"model {params / 1e6:.1f} M params, {tokens_per_step} tokens/step, "
        f"{flops_step / 1e12:.3f} TFLOP/step; threads {args.threads}; load avg {load_start[0]:.1f}",
        flush=True,
    )
    tmp = Path(tempfile.mkdtemp(prefix="ovh-"))  # short: Ray's socket paths must stay < 108 bytes
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    try:
        data = tmp / "data"
        write_shards(data)
        if args.paired:
            paired(args, data, tmp, params, tokens_per_step, flops_step, load_start)
            return
        for r in range(args.repeats):
            for v in variants:
                work = tmp / f"{v}-{r}"
                work.mkdir()
                out = run_variant(v, args, data, work)
                runs[v].append(out)
                print(
                    f"  round {r + 1} {LABELS[v]:34s} step {out['median_s']:.3f} s wall "
                    f"(min {out['min_s']:.3f}, max {out['max_s']:.3f}), {out['cpu_median_s']:.3f} CPU s (rank 0); "
                    f"first step {out['first_step_s']:.2f} s, process {out['process_wall_s']:.1f} s, "
                    f"load {out['load']:.1f}",
                    flush=True,
                )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    load_end = os.getloadavg()

    table, ratios = report(runs, tokens_per_step, flops_step)
    print()
    print(table)
    print()
    print("ratios: " + "; ".join(ratios))
    if "ray" in runs:
        print(
            f"Ray start-up (init_local_ray): {statistics.median([o['ray_start_s'] for o in runs['ray']]):.1f} s"
        )
    print(f"load average: {load_start[0]:.1f} at start, {load_end[0]:.1f} at end")
    if args.no_append:
        return

    section = "\n".join(
        [
            "",
            "## Training loop overhead on CPU (issue 7): bare PyTorch vs train() vs Ray Train + FSDP2",
            "",
            f"- Date: {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}. Commit: {git_commit()}. "
            "Machine: 2 cores / 24 GiB, no GPU, shared with other engineers' tests while measured "
            f"(load average {load_start[0]:.1f} at start, {load_end[0]:.1f} at end).",
            f"- `.venv/bin/python bench/train_overhead.py --steps {args.steps} --warmup {args.warmup} "
            f"--repeats {args.repeats}`. Model: {params / 1e6:.1f} M params "
            f"({MODEL.n_layers} layers, d {MODEL.d_model}, ctx {MODEL.context_length}, vocab {VOCAB}), "
            f"fp32, global batch {GLOBAL_BATCH} × {MODEL.context_length} = {tokens_per_step} tokens, "
            f"{flops_step / 1e12:.3f} TFLOP/step; (a)/(b) {args.threads} threads, (c)/(e) 2 ranks × 1 thread, "
            "(d) 1 thread. Step = median per-step wall time after the warm-up (median over rounds of the "
            "per-round medians); CPU = user + system seconds per step of the process running rank 0 "
            "(all its threads), × ranks for the whole step (ranks are symmetric); variants interleaved per round; "
            f"OMP_WAIT_POLICY={args.omp_wait_policy or '(libgomp default)'} in every process.",
            *([f"- {args.note}"] if args.note else []),
            "",
            table,
            "",
            "Ratios: " + "; ".join(ratios) + ".",
            "",
        ]
    )
    with open(ROOT / "bench" / "RESULTS.md", "a") as f:
        f.write(section)
    print("appended to bench/RESULTS.md")


if __name__ == "__main__":
    main()
