"""An output prefix has one owner (issue 26 item 2), through the launchers: two jobs whose
``spec.checkpoint.uri`` is one local directory.

Job A trains (``llmtrain run``). Job B, another job on A's prefix, fails at once with
OutputPrefixInUse naming the prefix and A, through ``llmtrain run`` and through the driver as
the operator launches it (``llmtrain driver``: the final snapshot the operator reads), and
A's checkpoints are untouched. Negative controls: A's own rerun resumes (the same owner), and
B with ``spec.checkpoint.takeOver: true`` goes on from A's checkpoint and deletes none of them.
"""

from __future__ import annotations

import json
import sysconfig
import tempfile
from pathlib import Path
from typing import Any

import pytest

from llmtrain.api.job import LLMTrainingJob
from llmtrain.api.progress import snapshot_from_log

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]


def job(
    name: str, shared: Path, tmp: Path, *, take_over: bool = False, uid: str | None = None
) -> LLMTrainingJob:
    from llmtrain.runtime.synthetic import tiny_spec_dict

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    meta: dict[str, Any] = {"name": name}
    if uid is not None:
        meta["uid"] = uid
    spec = tiny_spec_dict(
        **{
            "data.sources": [
                {"name": "json", "local": {"glob": str(stdlib / "json" / "*.py"), "textUnit": "file"}}
            ],
            "data.outputUri": str(tmp / "data"),
            "data.validationFraction": 0.2,
            "training.duration.maxSteps": 2,
            "validation": {"everySteps": 2, "batches": 1},
            "checkpoint": {"uri": str(shared), "everySteps": 1, "keepLast": 1, "takeOver": take_over},
            "export": {"uri": str(tmp / f"model-{name}"), "samplePrompt": "import"},
        }
    )
    return LLMTrainingJob.model_validate(
        {"apiVersion": "llmtrain.dev/v1alpha1", "kind": "LLMTrainingJob", "metadata": meta, "spec": spec}
    )


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def short_ray_tmp(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RAY_TMPDIR", tempfile.mkdtemp(prefix="ray-"))  # unix socket paths < 108 bytes
    monkeypatch.setenv("LLMTRAIN_RUN_DIR", str(tmp_path / "runs" / "b-driver"))  # `llmtrain driver`'s


def test_two_jobs_on_one_prefix(
    tmp_path: Path, short_ray_tmp: None, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("ray")
    from llmtrain.runtime.owner import OWNER
    from llmtrain.runtime.run import RunError, RunOptions, run_job
    from llmtrain.runtime.submitted import run_submitted

    shared = tmp_path / "shared" / "ckpt"
    a = run_job(job("job-a", shared, tmp_path), RunOptions(run_dir=tmp_path / "runs" / "a", num_cpus=2))
    assert a.steps == 2 and a.checkpoint_uri == f"{shared}/step_00000002"
    owner = json.loads((shared / OWNER).read_text())
    assert (owner["namespace"], owner["name"]) == ("default", "job-a") and owner["uid"].startswith("local-")
    # The training workers' lineage signs what it writes (what its pruning may delete).
    marker = json.loads((shared / "step_00000002" / "COMPLETE").read_text())
    assert marker["owner"] == f"default/job-a/{owner['uid']}"
    before = files(shared)

    # B through `llmtrain run`: refused before anything is written.
    with pytest.raises(RunError) as refused:
        run_job(job("job-b", shared, tmp_path), RunOptions(run_dir=tmp_path / "runs" / "b", num_cpus=2))
    msg = str(refused.value)
    print("llmtrain run, job B:", msg)
    assert refused.value.reason == "OutputPrefixInUse"
    assert msg.startswith(
        f"OutputPrefixInUse: output prefix {shared} belongs to LLMTrainingJob default/job-a (uid {owner['uid']})"
    )
    assert files(shared) == before and not (tmp_path / "model-job-b").exists()

    # B as the operator launches it (its uid from the spec ConfigMap): the final snapshot says
    # OutputPrefixInUse, permanent (exit code 2: the operator does not retry).
    capsys.readouterr()
    code = run_submitted(
        job("job-b", shared, tmp_path, uid="bbbbbbbb-0000-4000-8000-000000000002"),
        submission_id=None,
        progress_host="127.0.0.1",
        progress_port=None,
    )
    out = capsys.readouterr().out
    snap = snapshot_from_log(out)  # what the operator reads from the driver's log
    assert snap is not None and code == 2 and snap.failure is not None and snap.failure.permanent
    print("llmtrain driver, job B:", snap.failure.reason, snap.failure.message)
    assert snap.failure.reason == "OutputPrefixInUse"
    assert f"output prefix {shared} belongs to LLMTrainingJob default/job-a" in snap.failure.message
    assert "uid bbbbbbbb-0000-4000-8000-000000000002" in snap.failure.message
    assert files(shared) == before

    # Negative control 1: A's own rerun is the same owner and resumes (nothing left to train).
    again = run_job(job("job-a", shared, tmp_path), RunOptions(run_dir=tmp_path / "runs" / "a", num_cpus=2))
    assert again.resumed_from == 2 and again.steps == 2
    assert files(shared) == before

    # Negative control 2: B taking the prefix over goes on from A's checkpoint and deletes none of A's.
    taken = run_job(
        job("job-b", shared, tmp_path, take_over=True),
        RunOptions(run_dir=tmp_path / "runs" / "b", num_cpus=2),
    )
    assert taken.resumed_from == 2 and taken.export_uri == str(tmp_path / "model-job-b")
    record = json.loads((shared / OWNER).read_text())
    assert record["name"] == "job-b" and [p["name"] for p in record["previous"]] == ["job-a"]
    assert {k: v for k, v in files(shared).items() if k != OWNER} == {
        k: v for k, v in before.items() if k != OWNER
    }
    # ...and A, back, is refused in its turn.
    with pytest.raises(
        RunError, match=r"OutputPrefixInUse: output prefix .* belongs to LLMTrainingJob default/job-b"
    ):
        run_job(job("job-a", shared, tmp_path), RunOptions(run_dir=tmp_path / "runs" / "a", num_cpus=2))
