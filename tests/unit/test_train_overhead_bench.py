"""bench/train_overhead.py: its statistics, and a smoke run of every variant on a tiny model."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "train_overhead.py"
TINY = [sys.executable, str(SCRIPT), "--tiny", "--steps", "2", "--warmup", "1", "--repeats", "1"]


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("train_overhead", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_step_stats_skip_warmup_and_take_medians(bench: ModuleType) -> None:
    # Loop start at 0; step 1 (warm-up, 10 s) is never timed; then 1, 3, 2 s.
    stamps = [0.0, 10.0, 11.0, 14.0, 16.0]
    cpu = [0.0, 20.0, 22.0, 28.0, 32.0]
    s = bench.step_stats(stamps, cpu, warmup=1)
    assert s["timed_steps"] == 3
    assert s["median_s"] == 2.0 and s["min_s"] == 1.0 and s["max_s"] == 3.0
    assert s["cpu_median_s"] == 4.0
    assert s["first_step_s"] == 10.0
    with pytest.raises(ValueError, match="warmup"):
        bench.step_stats(stamps, cpu, warmup=0)
    with pytest.raises(ValueError, match="no timed steps"):
        bench.step_stats(stamps[:2], cpu[:2], warmup=1)


def test_report_ratios(bench: ModuleType) -> None:
    def run(wall: float, cpu: float) -> dict[str, float]:
        return {"median_s": wall, "cpu_median_s": cpu, "process_wall_s": 30.0}

    runs = {
        "bare": [run(1.0, 2.0), run(1.2, 2.2)],
        "ours": [run(1.05, 2.1), run(1.25, 2.3)],
        "ray": [run(1.5, 1.2)],
        "bare1": [run(1.0, 1.0)],
    }
    table, ratios = bench.report(runs, tokens_per_step=2048, flops_step=1e11)
    assert "| (b) ours: train(), world 1 | 1.150 | 2.200 | 2.200 | 1,781 |" in table
    assert "| (c) Ray Train, 2 FSDP2 workers | 1.500 | 1.200 | 2.400 |" in table  # 2 ranks
    assert "ours/bare = 1.045 wall, 1.048 CPU" in ratios
    assert "ray/bare = 1.364 wall, 1.143 CPU" in ratios  # all ranks' CPU: 2 × 1.2 vs 2.1
    assert "ray/ideal = 1.500 wall, 1.200 CPU" in ratios  # ideal: 2 workers × (d)
    assert not any(r.startswith("fsdp2") for r in ratios)


@pytest.mark.slow
def test_smoke_all_variants_but_ray_tiny() -> None:
    """Every non-Ray variant end to end on the tiny model: processes, loader, stamps, table."""
    proc = subprocess.run(
        [*TINY, "--variants", "bare,ours,bare1,fsdp2"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    out = proc.stdout
    for label in ("(a) bare PyTorch loop", "(b) ours", "(d) bare, 1 thread", "(e) train(), 2 gloo"):
        assert f"| {label}" in out, out
    assert "ours/bare = " in out and "fsdp2/ideal = " in out
    assert "appended" not in out  # --tiny never writes RESULTS.md


@pytest.mark.slow
@pytest.mark.ray
def test_smoke_ray_variant_tiny() -> None:
    proc = subprocess.run(
        [*TINY, "--variants", "bare,ray"],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "| (c) Ray Train, 2 FSDP2 workers" in proc.stdout
    assert "ray/bare = " in proc.stdout and "Ray start-up" in proc.stdout


def test_paired_summary_drops_warmup_and_divides_sums(bench: ModuleType) -> None:
    """(f): the estimate is Σ ours / Σ bare over the pairs after the warm-up, not a mean of ratios."""
    out = {
        "ours_wall": [9.0, 1.0, 3.0],  # pair 1 (train()'s set-up) is warm-up
        "bare_wall": [1.0, 2.0, 2.0],
        "ours_cpu": [9.0, 2.0, 2.0],
        "bare_cpu": [1.0, 1.0, 3.0],
        "load": 1.0,  # other keys of a child's result are ignored
    }
    s = bench.paired_summary(out, warmup=1)
    assert s["pairs"] == 2
    assert s["wall_ratio"] == pytest.approx(4.0 / 4.0)
    assert s["cpu_ratio"] == pytest.approx(4.0 / 4.0)
    # The per-pair ratios scatter (0.5 and 1.5 in wall) although the sums agree; quartiles by
    # statistics.quantiles' default (exclusive) method.
    assert (s["wall_pair_q1"], s["wall_pair_median"], s["wall_pair_q3"]) == pytest.approx((0.25, 1.0, 1.75))
    assert s["cpu_ours_s"] == 2.0 and s["cpu_bare_s"] == 2.0
    with pytest.raises(ValueError, match="no timed steps"):
        bench.paired_summary(out, warmup=3)


@pytest.mark.slow
def test_smoke_paired_tiny() -> None:
    """--paired: train() and the bare loop a step each in turn in one process."""
    proc = subprocess.run([*TINY, "--paired"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "round 1: ours/bare " in proc.stdout and "over 2 pairs" in proc.stdout
    assert "ours/bare = **" in proc.stdout
    assert "appended" not in proc.stdout  # --tiny never writes RESULTS.md
