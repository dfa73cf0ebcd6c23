"""Time to the first step of ``llmtrain run`` (issue 14): where the seconds go, before and after.

    .venv/bin/python -P bench/startup.py [--runs 3] [--steps 3] [--label after] [--pythonpath DIR]
                                         [--launch process,ray]

The quickstart (examples/quickstart.yaml: the 4 × 192 model on the Python standard library's
source) shortened to ``--steps`` steps, one progress event per step, run as a user runs it:
``llmtrain run job.yaml`` in a fresh process, on a fresh local Ray cluster each time.

- **cold**: nothing prepared (the run tokenizes the stdlib first), no checkpoint.
- **prepared**: the data already prepared, no checkpoint (the issue's ≤ 15 s case); ``--runs``
  times, interleaved with nothing else of ours.
- **finished rerun**: the same command once more after a prepared run finished: nothing to train.

``--launch process,ray`` measures both launch paths of a one-worker run side by side, each
case interleaved: ``process`` (the default since issue 28: ``train()`` in the CLI's own
process) and ``ray`` (``LLMTRAIN_LAUNCH=ray``: a local Ray cluster and Ray Train's worker).

Two clocks, so that code without the start-up breakdown can be measured too (``--pythonpath``
puts another checkout first on the path, e.g. the commit before the change):
- *external*: from the bench's ``Popen`` to the ``time`` of the first training event in
  ``<run dir>/events.jsonl`` (rank 0 sends it after step 1's log window: one host sync later
  than the step itself).
- *breakdown*: the run's own ``summary.json`` ``startup`` (process start → first step, by phase;
  llmtrain.api.progress.STARTUP_MARKS), when the code under test writes one.

Prints one markdown row per run; the medians go to bench/RESULTS.md by hand, with date, commit
and machine. Run it on a quiet machine: every phase is CPU-bound on 2 cores (``nice -n -15`` if
other work must share it).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]


def job_file(tmp: Path, steps: int) -> Path:
    doc = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())
    spec = doc["spec"]
    spec["data"]["outputUri"] = str(tmp / "data")
    spec["training"]["duration"] = {"maxSteps": steps}
    spec["training"]["schedule"]["warmupSteps"] = 1
    spec["training"]["logEverySteps"] = 1
    spec["validation"]["everySteps"] = steps
    spec["checkpoint"] = {"uri": str(tmp / "checkpoints"), "everySteps": steps, "keepLast": 1}
    spec["export"] = {"uri": str(tmp / "model")}
    path = tmp / "job.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def run_once(
    job: Path, tmp: Path, pythonpath: str | None, launch: str = "process", fresh: bool = True
) -> dict[str, Any]:
    """One ``llmtrain run``; its external time to the first step and its own breakdown.
    ``fresh=False``: the same run directory again (a rerun is the same job: the run directory
    holds the owner id its checkpoint prefix was claimed with)."""
    run_dir = tmp / "run"
    if fresh:
        shutil.rmtree(run_dir, ignore_errors=True)
    env = {**os.environ, "RAY_TMPDIR": tempfile.mkdtemp(prefix="ray-"), "COLUMNS": "200"}
    env["LLMTRAIN_LAUNCH"] = launch
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    launched = time.time()
    proc = subprocess.run(
        [
            sys.executable,
            "-P",
            "-m",
            "llmtrain.cli",
            "run",
            str(job),
            "--run-dir",
            str(run_dir),
            "--cpus",
            "2",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp,
        timeout=900,
    )
    wall = time.time() - launched
    if proc.returncode != 0:
        raise SystemExit(f"llmtrain run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    first = None
    events = run_dir / "events.jsonl"
    for line in events.read_text().splitlines() if events.exists() else []:
        event = json.loads(line)
        if (
            event.get("stage") == "training"
            and event.get("step", 0) >= 1
            and event.get("time", 0) >= launched
        ):
            first = event["time"] - launched
            break
    summary = json.loads((run_dir / "summary.json").read_text())
    startup = summary.get("startup") or {}
    return {
        "external": first,
        "breakdown": startup,
        "total": sum(startup.values()) if startup else None,
        "wall": wall,
        "data": "reused" if summary.get("data_reused") else "prepared",
    }


def row(label: str, r: dict[str, Any]) -> str:
    parts = ", ".join(f"{k} {v:.1f}" for k, v in r["breakdown"].items()) or "–"
    ext = f"{r['external']:.1f}" if r["external"] is not None else "–"
    total = f"{r['total']:.1f}" if r["total"] is not None else "–"
    return f"| {label} | {r['data']} | {ext} | {total} | {r['wall']:.1f} | {parts} |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3, help="prepared-data runs")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--label", default="after", help="names this code in the rows (before/after)")
    ap.add_argument("--pythonpath", help="PYTHONPATH for the runs: another checkout's packages first")
    ap.add_argument("--launch", default="process", help="launch paths, comma-separated: process, ray")
    args = ap.parse_args()
    launches = [x.strip() for x in args.launch.split(",") if x.strip()]

    tmp = Path(tempfile.mkdtemp(prefix="llmtrain-startup-"))
    job = job_file(tmp, args.steps)
    print(
        "| run | data | external: launch → first step event (s) | breakdown total (s) | wall (s) | breakdown (s) |"
    )
    print("|---|---|---:|---:|---:|---|")

    def label(launch: str) -> str:
        return f"{args.label} {launch}" if len(launches) > 1 else args.label

    for launch in launches:  # each path cold: nothing prepared, no checkpoint
        shutil.rmtree(tmp / "data", ignore_errors=True)
        shutil.rmtree(tmp / "checkpoints", ignore_errors=True)
        print(row(f"{label(launch)} cold", run_once(job, tmp, args.pythonpath, launch)), flush=True)
    results: dict[str, list[dict[str, Any]]] = {launch: [] for launch in launches}
    for i in range(args.runs):
        for launch in launches:  # interleaved: the machine's load drifts alike for both
            shutil.rmtree(tmp / "checkpoints", ignore_errors=True)
            r = run_once(job, tmp, args.pythonpath, launch)
            results[launch].append(r)
            print(row(f"{label(launch)} prepared #{i + 1}", r), flush=True)
    reruns = {launch: run_once(job, tmp, args.pythonpath, launch, fresh=False) for launch in launches}
    for launch in launches:
        print(row(f"{label(launch)} finished rerun", reruns[launch]), flush=True)

    print()
    for launch in launches:
        runs = results[launch]
        ext = [r["external"] for r in runs if r["external"] is not None]
        tot = [r["total"] for r in runs if r["total"] is not None]
        print(
            f"{label(launch)}: prepared data, median of {len(runs)}: external {statistics.median(ext):.1f} s"
            + (f", breakdown total {statistics.median(tot):.1f} s" if tot else "")
            + ("; by phase (median): " if tot else "")
            + ", ".join(
                f"{phase} {statistics.median(r['breakdown'].get(phase, 0.0) for r in runs):.1f}"
                for phase in (runs[0]["breakdown"] if tot else {})
            )
            + f"; finished rerun wall {reruns[launch]['wall']:.1f} s"
        )
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
