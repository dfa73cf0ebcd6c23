"""Bayesian (Optuna TPE) against random search on the real tiny model (issue 15).

    .venv/bin/python -P bench/tune.py [--seeds 0 1 2] [--trials 6] [--no-append]

The search of ``examples/tune-quickstart.yaml`` (its model, data, space, trial budget and
ASHA), run once per seed with ``search: bayesian`` and once with ``search: random``, through
the driver's own tuning stage on a local Ray of 2 CPUs (data prepared once, then reused).
Reported per seed: the best validation loss after all trials and after each trial, and the
search's wall time. Without ``--no-append`` the table is appended to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def best_so_far(records: list[Any], mode: str) -> list[float]:
    """Best metric after trial 1, 2, …, in trial order (stopped trials count at their rung)."""
    out: list[float] = []
    best: float | None = None
    for r in sorted(records, key=lambda r: r.number):
        if r.metric is not None and (best is None or (r.metric < best if mode == "min" else r.metric > best)):
            best = r.metric
        out.append(best if best is not None else float("nan"))
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--no-append", action="store_true")
    args = parser.parse_args()
    if args.trials > 10:
        parser.error("--trials at most 10: the status table (the best 10) must hold every trial")

    from llmtrain.runtime.driver import launch_options, prepare_data
    from llmtrain.runtime.ray_local import init_local_ray
    from llmtrain.runtime.run import with_absolute_paths
    from llmtrain.runtime.stage import Place, Reporter
    from llmtrain.runtime.tune import tune_stage

    from llmtrain.api.job import LLMTrainingJob, read_manifests

    (doc,) = [
        d
        for d in read_manifests(ROOT / "examples" / "tune-quickstart.yaml")
        if d.get("kind") == "LLMTrainingJob"
    ]
    work = Path(tempfile.mkdtemp(prefix="llmtrain-bench-tune-"))
    doc["spec"]["data"]["outputUri"] = str(ROOT / "runs" / "tune-quickstart" / "data")  # reused when there
    doc["spec"]["tuning"]["numTrials"] = args.trials
    doc["spec"]["tuning"]["initialRandomTrials"] = args.trials // 2
    base = with_absolute_paths(LLMTrainingJob.model_validate(doc))
    report = Reporter()
    data_uri, storage, _ = prepare_data(base, report)
    assert report.snapshot.data is not None
    vocab = report.snapshot.data.vocab_size
    init_local_ray(2, temp_dir=tempfile.mkdtemp(prefix="ray-"))

    rows: list[tuple[int, str, float, list[float], float]] = []
    for seed in args.seeds:
        for search in ("random", "bayesian"):
            d: dict[str, Any] = base.model_dump(by_alias=True, exclude_none=True, mode="json")
            d["spec"]["tuning"]["search"] = search
            d["spec"]["tuning"]["seed"] = seed
            if search == "random":
                d["spec"]["tuning"].pop("initialRandomTrials", None)
            job = LLMTrainingJob.model_validate(d)
            out = work / f"{search}-{seed}"
            place = Place(
                run_dir=out / "run", output_prefix=str(out), connect=lambda: None, cpus_per_worker=2
            )
            t0 = time.perf_counter()
            searched = Reporter()
            outcome = tune_stage(
                job, data_uri, storage, vocab, place, searched, launch_options(job, place, "tune")
            )
            seconds = time.perf_counter() - t0
            assert searched.snapshot.tuning is not None  # ≤ 10 trials: the table holds them all
            curve = best_so_far(searched.snapshot.tuning.trials, "min")
            best = float(outcome.best.metric or float("nan"))
            rows.append((seed, search, best, curve, seconds))
            print(
                f"seed {seed} {search}: best val loss {best:.4f} in {seconds:.0f} s; after each trial {curve}"
            )

    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    lines = [
        "",
        f"## Hyperparameter tuning (issue 15): TPE against random search — {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC, commit {commit}",
        "",
        f"`bench/tune.py`: the search of `examples/tune-quickstart.yaml` ({args.trials} trials of 60 steps, "
        f"ASHA grace 20 / factor 3, TPE with {args.trials // 2} start-up trials), same seeds, same data, "
        "2 shared CPU cores. Best validation loss (nats/token) after all trials, and after each trial.",
        "",
        "| seed | search | best val loss | best after trial 1…n | search wall time |",
        "|---:|---|---:|---|---:|",
    ]
    for seed, search, best, curve, seconds in rows:
        lines.append(
            f"| {seed} | {search} | {best:.4f} | {' → '.join(f'{v:.3f}' for v in curve)} | {seconds:.0f} s |"
        )
    table = "\n".join(lines) + "\n"
    print(table)
    if not args.no_append:
        with open(ROOT / "bench" / "RESULTS.md", "a") as f:
            f.write(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
