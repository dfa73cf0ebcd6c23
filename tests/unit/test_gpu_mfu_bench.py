"""bench/gpu_mfu.py runs on a machine that has torch and nothing else of ours.

The script runs in a subprocess whose importer refuses ray, pydantic, boto3/botocore and
prometheus_client (absent on the lent GPU machine) and the installed ``llmtrain`` packages
themselves (the GPU machine has a plain checkout, not an install): the script must build its
own ``llmtrain`` / ``llmtrain.api`` / ``llmtrain.runtime`` package objects from the checkout.
The negative controls show the wrapper really refuses those imports.
"""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu_mfu.py"

# argv: script, args... — installs the blocker, then runs the script as __main__.
WRAPPER = r"""
import importlib.abc, runpy, sys

ABSENT = {"ray", "pydantic", "pydantic_core", "boto3", "botocore", "prometheus_client"}
NOT_INSTALLED = {"llmtrain", "llmtrain.api", "llmtrain.runtime"}


class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ABSENT or name in NOT_INSTALLED:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked: absent on the GPU machine)")
        return None


sys.meta_path.insert(0, Blocker())
script, *args = sys.argv[1:]
sys.argv = [script, *args]
runpy.run_path(script, run_name="__main__")
"""


def run_blocked(script: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", WRAPPER, str(script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd="/",  # not the checkout: nothing of ours is importable from the working directory
    )


@pytest.mark.parametrize(
    "code",
    [
        "import pydantic",
        "import ray",
        "import boto3",
        "import llmtrain.api.config",  # the installed package, without the script's bootstrap
    ],
)
def test_wrapper_blocks_what_the_gpu_machine_lacks(tmp_path: Path, code: str) -> None:
    """Negative control: under the wrapper these imports fail, so a script that needed them would."""
    probe = tmp_path / "probe.py"
    probe.write_text(code + "\n")
    proc = run_blocked(probe, timeout=60)
    assert proc.returncode != 0
    assert "blocked: absent on the GPU machine" in proc.stderr


def expected_cost(n_layers: int, d: int, ctx: int, vocab: int, ffn: int) -> tuple[int, int]:
    """Parameters and 6·N + 12·L·d·T FLOPs per token of a tied, MHA, bias-free model (by hand)."""
    block = 4 * d * d + 3 * d * ffn + 2 * d
    params = vocab * d + n_layers * block + d
    return params, 6 * params + 12 * n_layers * d * ctx


def check_report(report: dict[str, Any], shapes: list[str], compiles: list[bool], steps: int) -> None:
    assert report["device"] == "cpu" and report["device_name"] == "cpu"
    assert report["peak_bf16_flops"] is None
    assert report["complete"] is True
    assert Path(report["model_file"]) == ROOT / "runtime" / "model.py"  # the checkout's, not an install
    dims = {"124m-tiny": (2, 64, 64, 512, 192, 4), "760m-tiny": (2, 128, 128, 512, 384, 2)}
    runs = report["runs"]
    assert [(r["shape"], r["compile"]) for r in runs] == [(s, c) for s in shapes for c in compiles]
    for r in runs:
        assert r["status"] == "ok", r
        layers, d, ctx, vocab, ffn, micro = dims[r["shape"]]
        params, flops = expected_cost(layers, d, ctx, vocab, ffn)
        assert r["params"] == params
        assert r["flops_per_token"] == flops
        assert r["tokens_per_step"] == micro * ctx
        assert r["timed_steps"] == steps and r["warmup_steps"] == 1
        assert r["tokens_per_s"] == pytest.approx(r["tokens_per_step"] / r["step_s"])
        assert r["tflops_per_s"] == pytest.approx(flops * r["tokens_per_s"] / 1e12)
        assert r["mfu"] is None  # no peak is known for a CPU: null, never a guess
        # Random tokens over 512 ids: the loss starts near ln(512) ≈ 6.24.
        assert math.isfinite(r["final_loss"]) and 5.5 < r["final_loss"] < 7.0


def test_cpu_tiny_eager_without_ray_pydantic_boto3(tmp_path: Path) -> None:
    """The CI form of the GPU command, eager only (inductor's C++ builds take minutes on 2 cores)."""
    out = tmp_path / "out"
    proc = run_blocked(
        SCRIPT, "--device", "cpu", "--tiny", "--steps", "2", "--compile", "off", "--out", str(out)
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    report = json.loads((out / "gpu_mfu.json").read_text())
    check_report(report, ["124m-tiny", "760m-tiny"], [False], steps=2)
    assert proc.stdout.count("tokens/s") == 2, proc.stdout  # a line per run as it finishes


@pytest.mark.slow
def test_cpu_tiny_eager_and_compiled(tmp_path: Path) -> None:
    """The exact CI command: both shapes, torch.compile off and on (inductor's CPU backend)."""
    out = tmp_path / "out"
    # A long budget: inductor builds its C++ kernels with g++ (minutes on 2 busy cores).
    args = ["--device", "cpu", "--tiny", "--steps", "2", "--budget-s", "1500"]
    proc = run_blocked(SCRIPT, *args, "--out", str(out), timeout=1700)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    report = json.loads((out / "gpu_mfu.json").read_text())
    check_report(report, ["124m-tiny", "760m-tiny"], [False, True], steps=2)


def test_cpu_tiny_fsdp_single_rank(tmp_path: Path) -> None:
    """--fsdp: FSDP2 on a 1-rank gloo group (a Ray Train worker's path)."""
    out = tmp_path / "out"
    args = ["--device", "cpu", "--tiny", "--steps", "1", "--compile", "off", "--shapes", "124m", "--fsdp"]
    proc = run_blocked(SCRIPT, *args, "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    report = json.loads((out / "gpu_mfu.json").read_text())
    check_report(report, ["124m-tiny"], [False], steps=1)
    assert all(r["fsdp"] for r in report["runs"])


def test_micro_batch_override_and_both_adamw_kernels(tmp_path: Path) -> None:
    """--micro-batch sets sequences per step for every shape; --adamw both runs each twice."""
    out = tmp_path / "out"
    args = ["--device", "cpu", "--tiny", "--steps", "1", "--compile", "off", "--shapes", "124m"]
    proc = run_blocked(SCRIPT, *args, "--micro-batch", "3", "--adamw", "both", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    runs = json.loads((out / "gpu_mfu.json").read_text())["runs"]
    assert [r["status"] for r in runs] == ["ok", "ok"]
    assert [(r["micro_batch"], r["grad_accum"], r["tokens_per_step"]) for r in runs] == [(3, 1, 3 * 64)] * 2
    # No fused AdamW on a CPU: both runs say what actually ran.
    assert [r["adamw"] for r in runs] == ["foreach", "foreach"]


def test_cuda_requested_without_a_gpu_says_so(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    proc = run_blocked(SCRIPT, "--out", str(tmp_path / "out"), timeout=120)
    assert proc.returncode == 2
    assert "--device cpu" in proc.stderr


def test_out_of_memory_halves_the_micro_batch_then_gives_up(monkeypatch: pytest.MonkeyPatch) -> None:
    """OOM → retry at half the micro batch (same tokens per step); after two halvings, status oom."""
    import importlib.util

    import torch

    spec = importlib.util.spec_from_file_location("gpu_mfu", SCRIPT)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_mfu", bench)  # dataclasses look their module up there
    spec.loader.exec_module(bench)
    tried: list[int] = []

    def fake_measure(shape: Any, *, micro_batch: int, **kw: Any) -> Any:
        tried.append(micro_batch)
        if micro_batch > limit:
            raise torch.OutOfMemoryError("CUDA out of memory (fake)")
        return bench.Run(shape.name, kw["compile"], kw["fsdp"], "ok", micro_batch=micro_batch)

    monkeypatch.setattr(bench, "measure", fake_measure)
    shape = dataclasses.replace(bench.SHAPES[1], micro_batch=8)  # 760m at micro batch 8
    kw = {"compile": True, "fsdp": False, "device": torch.device("cpu"), "adamw": "fused"}
    limit = 4
    run = bench.measure_with_retries(shape, **kw)
    assert (run.status, run.micro_batch, tried) == ("ok", 4, [8, 4])
    tried.clear()
    limit = 1
    run = bench.measure_with_retries(shape, **kw)
    assert (run.status, tried) == ("oom", [8, 4, 2])
    assert "fake" in run.error
