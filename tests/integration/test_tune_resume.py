"""An interrupted search resumes: the driver is SIGKILLed after three finished trials of a
four-point grid, and the rerun restores Tune's experiment and runs only what had not finished."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(600)]

FINISHED = re.compile(r"^llmtrain tune: trial (\d+) (completed|stopped|failed)")

DRIVER = """
import json, sys
from pathlib import Path
import yaml
from llmtrain.api.job import LLMTrainingJob
from llmtrain.runtime import driver
from llmtrain.runtime.ray_local import init_local_ray

job = LLMTrainingJob.model_validate(yaml.safe_load(Path(sys.argv[1]).read_text()))
out = Path(sys.argv[2])
init_local_ray(2, temp_dir=sys.argv[3])
place = driver.Place(run_dir=out / "run", output_prefix=str(out / "out"), connect=lambda: None, cpus_per_worker=2)
result = driver.drive(job, place, driver.Reporter())
print("RESULT " + json.dumps(result.snapshot.tuning.status()), flush=True)
"""


def job_doc(tmp: Path) -> dict[str, Any]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return {
        "apiVersion": "llmtrain.dev/v1alpha1",
        "kind": "LLMTrainingJob",
        "metadata": {"name": "resume"},
        "spec": {
            "data": {
                "sources": [
                    {"name": "json", "local": {"glob": str(stdlib / "json" / "*.py"), "textUnit": "file"}}
                ],
                "tokenizer": {"train": {"vocabSize": 300}},
                "outputUri": str(tmp / "data"),
                "validationFraction": 0.2,
            },
            "model": {"architecture": {"layers": 1, "dModel": 32, "heads": 2, "contextLength": 32}},
            "training": {
                "schedule": {"warmupSteps": 1},
                "batch": {"globalBatchSize": 8, "microBatchSize": 8},
                "duration": {"maxSteps": 4},
                "logEverySteps": 2,
            },
            "validation": {"everySteps": 4, "batches": 2},
            "checkpoint": {"uri": str(tmp / "ckpt"), "everySteps": 4},
            "export": {"uri": str(tmp / "model")},
            "metrics": {"enabled": False},
            "tuning": {
                "search": "grid",
                "trialBudget": {"maxSteps": 4},
                "space": {"training.optimizer.lr": {"choice": [1e-3, 2e-3, 3e-3, 4e-3]}},
            },
        },
    }


def start(job: Path, tmp: Path) -> tuple[subprocess.Popen[str], str]:
    ray_tmp = tempfile.mkdtemp(prefix="ray-")  # short: unix socket paths must stay < 108 bytes
    proc = subprocess.Popen(
        [sys.executable, "-P", "-c", DRIVER, str(job), str(tmp), ray_tmp],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: the kill takes its Ray with it
    )
    return proc, ray_tmp


def kill_leftovers(ray_tmp: str) -> None:
    """SIGKILL whatever of that Ray cluster outlived the process group (by pid)."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if ray_tmp in cmdline:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_a_killed_search_resumes_without_rerunning_finished_trials(tmp_path: Path) -> None:
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(job_doc(tmp_path)))

    first, ray_tmp = start(job, tmp_path)
    finished: list[int] = []
    log: list[str] = []
    try:
        assert first.stdout is not None
        for line in first.stdout:
            log.append(line)
            m = FINISHED.match(line)
            if m:
                finished.append(int(m.group(1)))
            if len(finished) == 3:
                time.sleep(3)  # the experiment's state is saved within a second of a trial's end
                break
        assert len(finished) == 3, "".join(log[-30:])
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
        kill_leftovers(ray_tmp)

    second, ray_tmp = start(job, tmp_path)
    try:
        out, _ = second.communicate(timeout=400)
    finally:
        kill_leftovers(ray_tmp)
    assert second.returncode == 0, out[-4000:]
    rerun = [int(m.group(1)) for m in map(FINISHED.match, out.splitlines()) if m]
    assert rerun and not set(rerun) & set(finished), (finished, rerun)
    (result,) = [
        json.loads(line[len("RESULT ") :]) for line in out.splitlines() if line.startswith("RESULT ")
    ]
    assert result["planned"] == 4 and result["completed"] == 4, (result, out[-4000:])
    assert sorted(t["number"] for t in result["trials"]) == [1, 2, 3, 4]
    assert (tmp_path / "model" / "config.json").exists()
