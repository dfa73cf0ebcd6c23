"""Secrets never leak: the driver's log masks the pod's S3 credentials and Ray token at any
level, and the operator never copies the job's Ray token from the driver's log into status
or Events. End to end (every place a user could read, after a run and a failed run, at
DEBUG): tests/integration/test_operator_run.py::_assert_no_secret_leaked."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from llmtrain.runtime import redaction, submitted

from llmtrain.api.progress import RESULT_PREFIX, RunFailure, RunSnapshot
from llmtrain.api.status import ConditionType, Phase
from tests.unit.test_operator_run import TOKEN, running

KEY_ID = "AKIACANARYK3Y1D7Q2ZX"
SECRET = "canary/S3cr3t+9f3c1e7a5b2d4c6e8f0a1b3c5d7e9f"


def test_the_jobs_ray_token_in_the_drivers_log_never_reaches_status_or_events() -> None:
    h = running(backoffLimit=3)
    h.tick(1)
    failed = RunSnapshot(
        stage="failed", submission_id="demo-1", failure=RunFailure("DataError", "data: no objects", True)
    )
    log = f"RAY_AUTH_TOKEN={TOKEN}\nheaders: Authorization: Bearer {TOKEN}\n{RESULT_PREFIX}{failed.to_json()}"
    h.ray.end("demo-1", "FAILED", log)
    h.tick(5)
    assert h.status["phase"] == Phase.Failed
    msg = h.cond(ConditionType.Failed)["message"]
    assert "Bearer <redacted>" in msg  # the tail is still there, masked
    written = repr(h.status) + repr([o.events for o in h.outs])
    assert TOKEN not in written


@pytest.fixture
def root_logger(monkeypatch: pytest.MonkeyPatch) -> Iterator[io.StringIO]:
    """The root logger as ``llmtrain driver`` sets it up (basicConfig at INFO), into a buffer."""
    for k, v in (
        ("AWS_ACCESS_KEY_ID", KEY_ID),
        ("AWS_SECRET_ACCESS_KEY", SECRET),
        ("RAY_AUTH_TOKEN", TOKEN),
        ("AWS_SESSION_TOKEN", "short"),  # under 8 characters: not masked (ordinary words)
        (redaction.LOG_LEVEL_ENV, "debug"),
    ):
        monkeypatch.setenv(k, v)
    root = logging.getLogger()
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    old_handlers, old_level = root.handlers[:], root.level
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    yield buf
    root.handlers[:] = old_handlers
    root.setLevel(old_level)


def test_the_drivers_log_masks_the_pods_secrets_at_debug(root_logger: io.StringIO) -> None:
    redaction.configure_logging()
    redaction.configure_logging()  # idempotent: one filter per handler
    root = logging.getLogger()
    assert root.level == logging.DEBUG
    assert sum(isinstance(f, redaction.RedactSecrets) for f in root.handlers[0].filters) == 1
    # What botocore logs at DEBUG for each request: the Authorization header names the key id.
    logging.getLogger("botocore.endpoint").debug(
        "Sending http request: %s", {"Authorization": f"AWS4-HMAC-SHA256 Credential={KEY_ID}/20261205/s3"}
    )
    logging.getLogger("x").info(f"env: {SECRET} {TOKEN} short")
    try:
        raise RuntimeError(f"signed with {SECRET}")
    except RuntimeError:
        logging.getLogger("x").exception("failed")
    out = root_logger.getvalue()
    assert "Credential=<redacted>/20261205" in out and "short" in out
    assert "RuntimeError: signed with <redacted>" in out
    for s in (KEY_ID, SECRET, TOKEN):
        assert s not in out


def test_a_failed_runs_message_is_masked_before_it_reaches_status(
    root_logger: io.StringIO,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The failure's message rides in the final snapshot into the Failed condition and an Event."""
    from llmtrain.api.job import LLMTrainingJob
    from tests.unit.test_operator_fakes import job_body

    def drive(*_: object) -> None:
        raise RuntimeError(f"S3 said no to {KEY_ID}:{SECRET}")

    monkeypatch.setattr(submitted, "drive", drive)
    monkeypatch.setenv("LLMTRAIN_RUN_DIR", str(tmp_path))
    body = job_body(checkpoint={"uri": "s3://bucket/x/checkpoints"})
    job = LLMTrainingJob.model_validate(body)
    assert (
        submitted.run_submitted(job, submission_id=None, progress_host="127.0.0.1", progress_port=None) == 1
    )
    out = capsys.readouterr()
    result = next(line for line in out.out.splitlines() if line.startswith(RESULT_PREFIX))
    assert "S3 said no to <redacted>:<redacted>" in result
    for s in (KEY_ID, SECRET):
        assert s not in out.out + out.err + root_logger.getvalue()
