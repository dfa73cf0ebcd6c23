"""LoRA against full fine-tuning at the quickstart's shape, on CPU (issue 27 item 4).

    .venv/bin/python -P bench/lora.py [--steps 6] [--warmup 2] [--repeats 2] [--append]

The quickstart architecture (4 layers, dModel 192, 6 heads / 3 kv heads, context 256, vocabulary
4096, global batch 16) with synthetic tokens. For full fine-tuning and for LoRA (rank 8, alpha 16;
the default targets wq, wv, and all seven projections), side by side in one process:

* trainable parameters (what the optimizer holds),
* optimizer state bytes (AdamW's exp_avg + exp_avg_sq + step, after one step),
* checkpoint bytes: a real :func:`llmtrain.runtime.train.train` run writing its lineage (the
  LoRA runs start from the full run's checkpoint, ``spec.model.init.checkpoint``),
* step time: forward → loss → backward → clip → AdamW step on one batch, median over
  ``--steps`` after ``--warmup``, the variants interleaved ``--repeats`` times so that load from
  other processes on a shared machine lands on all of them alike.

``--append`` adds the table to bench/RESULTS.md with date, commit and machine.
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from llmtrain.runtime.synthetic import SyntheticLoader, tiny_spec_dict
from llmtrain.runtime.train import RunContext, build_model, build_optimizer, clip_grad_norm, train

from llmtrain.api.config import RuntimeConfig, runtime_config_from_spec
from llmtrain.api.spec import LLMTrainingJobSpec

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 4096
SHAPE = {
    "model.architecture": {
        "layers": 4,
        "dModel": 192,
        "heads": 6,
        "kvHeads": 3,
        "contextLength": 256,
        "ropeTheta": 10000,
    },
    "training.batch": {"globalBatchSize": 16, "microBatchSize": 16},
    "training.optimizer.lr": 0.002,
}
ALL = [
    "attention.wq",
    "attention.wk",
    "attention.wv",
    "attention.wo",
    "feed_forward.w1",
    "feed_forward.w2",
    "feed_forward.w3",
]
VARIANTS: dict[str, dict[str, Any] | None] = {
    "full fine-tuning": None,
    "LoRA r8 wq,wv (default)": {"rank": 8, "alpha": 16},
    "LoRA r8 all 7 projections": {"rank": 8, "alpha": 16, "targets": ALL},
}


def config(lora: dict[str, Any] | None, base: Path | None, ckpt: Path | None, steps: int) -> RuntimeConfig:
    over: dict[str, Any] = {**SHAPE, "training.duration.maxSteps": steps}
    if lora is not None:
        assert base is not None
        over |= {
            "training.lora": lora,
            "model.init.random": None,
            "model.init.checkpoint": {"uri": str(base)},
        }
    if ckpt is not None:
        over["checkpoint.uri"] = str(ckpt)
    spec = LLMTrainingJobSpec.model_validate(tiny_spec_dict(**over))
    return runtime_config_from_spec(spec, vocab_size=VOCAB)


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def optimizer_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(
        v.numel() * v.element_size()
        for state in opt.state.values()
        for v in state.values()
        if torch.is_tensor(v)
    )


def measure(cfg: RuntimeConfig, steps: int, warmup: int) -> tuple[int, int, list[float]]:
    """(trainable params, optimizer state bytes, step seconds) for one variant."""
    model = build_model(cfg, torch.device("cpu"), False)
    if cfg.train.lora_rank:
        from llmtrain.runtime.hf_import import load_initial_weights

        load_initial_weights(model, cfg)
    model.train()
    opt = build_optimizer(model, cfg.optimizer)
    batch = torch.randint(0, VOCAB, (16, 257), generator=torch.Generator().manual_seed(0))
    inputs, targets = batch[:, :-1], batch[:, 1:]
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        logits = model(inputs)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        loss.backward()
        clip_grad_norm(model, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, optimizer_bytes(opt), times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--append", action="store_true")
    args = ap.parse_args()
    loader = functools.partial(SyntheticLoader, vocab_size=VOCAB, windows=64)
    work = Path(tempfile.mkdtemp(prefix="bench-lora-"))
    rows: dict[str, dict[str, Any]] = {}
    base = work / "full"
    for i, (name, lora) in enumerate(VARIANTS.items()):
        ckpt = base if lora is None else work / f"lora{i}"
        train(config(lora, base, ckpt, 2), loader, ctx=RunContext(metrics_addr="127.0.0.1"))
        step = max(int(p.name.split("_")[1]) for p in ckpt.glob("step_*"))
        rows[name] = {"checkpoint": dir_bytes(ckpt / f"step_{step:08d}"), "times": []}
    for _ in range(args.repeats):
        for name, lora in VARIANTS.items():
            trainable, opt_bytes, times = measure(config(lora, base, None, 2), args.steps, args.warmup)
            rows[name] |= {"trainable": trainable, "optimizer": opt_bytes}
            rows[name]["times"] += times
    full = rows["full fine-tuning"]
    lines = [
        "| variant | trainable params | optimizer state | checkpoint (one step dir) | step time (median) |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, r in rows.items():
        med = statistics.median(r["times"])
        lines.append(
            f"| {name} | {r['trainable']:,} ({r['trainable'] / full['trainable']:.2%}) "
            f"| {r['optimizer'] / 2**20:.2f} MiB ({r['optimizer'] / full['optimizer']:.2%}) "
            f"| {r['checkpoint'] / 2**20:.2f} MiB ({r['checkpoint'] / full['checkpoint']:.2%}) "
            f"| {med * 1000:.0f} ms ({med / statistics.median(full['times']):.2f}×) |"
        )
    table = "\n".join(lines)
    print(table)
    if args.append:
        date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
        ).stdout.strip()
        machine = f"{os.cpu_count()} cores ({platform.machine()}), CPU only, torch {torch.__version__}"
        section = (
            "\n\n## LoRA against full fine-tuning (issue 27 item 4): `bench/lora.py`\n\n"
            f"- Date: {date}. Commit: {commit}. Machine: {machine}; shared with other agents.\n"
            f"- `.venv/bin/python -P bench/lora.py --steps {args.steps} --warmup {args.warmup} "
            f"--repeats {args.repeats} --append`: the quickstart shape (4 × 192, context 256, vocabulary "
            "4096, batch 16), fp32; LoRA runs start from the full run's checkpoint. Checkpoint = one "
            "`step_*` directory of a real `train()` lineage (LoRA: adapters + their AdamW state + the "
            "loader/RNG state; the base is re-derived from spec.model.init).\n\n" + table + "\n"
        )
        with (ROOT / "bench" / "RESULTS.md").open("a") as f:
            f.write(section)


if __name__ == "__main__":
    main()
