"""The training run as a Ray job on the job's head: Ray's Jobs REST API and the driver's
progress endpoint, both behind the job's Ray token.

KubeRay's HTTP mode: the operator POSTs the job to the head's dashboard (port 8265) itself —
no submitter pod, no ``ray`` import — with a deterministic ``submission_id``
(``<job>-<attempt>``), so a POST repeated after an operator restart is answered "already
exists" and means "submitted". Requests are built by pure functions (unit-tested without a
head); :class:`RayJobs` sends them over one urllib3 pool made at start-up.

What goes where (the driver side is ``runtime/submitted.py`` and ``runtime/progress_server.py``)::

    POST /api/jobs/              submit the attempt (entrypoint: llmtrain driver …)
    GET  /api/jobs/<id>          PENDING | RUNNING | SUCCEEDED | FAILED | STOPPED
    GET  /api/jobs/<id>/logs     once, when the job has ended: the final snapshot + log tail
    POST /api/jobs/<id>/stop     before the pods are deleted (suspend, deadline, failure)
    GET  :8266/progress?submissionId=<id>    the running driver's RunSnapshot (every resync)
    POST :8266/checkpoint?submissionId=<id>  "checkpoint now", before a suspend deletes the pods

Both driver requests name the attempt they are for: a driver that runs another Ray job
(a head Service selecting another job's head, a stale endpoint, a shared stand-in head)
answers 409 with its own id, and a snapshot whose ``submission_id`` is not the attempt's
is refused here too (:func:`check_snapshot`): another run's progress never reaches a
job's status.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode

import urllib3
from llmtrain.operator.manifests import OperatorSettings, service_name, spec_digest

from llmtrain.api.progress import MAX_SNAPSHOT_BYTES, RESULT_PREFIX, RunSnapshot

TERMINAL = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})
# A failed driver's log can be long; the tail is what a reader (and the Failed
# condition) needs, and all the operator ever reads of it.
LOG_TAIL_BYTES = 256 * 1024
CONNECT_TIMEOUT = 3.0
READ_TIMEOUT = 10.0
SUBMIT_TIMEOUT = 60.0  # the first submission on a new head starts its job manager: slow
# The query parameter naming the attempt a driver request is for (runtime/progress_server.py).
SID_PARAM = "submissionId"


class HeadError(Exception):
    """The head did not answer usefully (connection refused, timeout, 5xx, auth)."""


class ForeignSnapshot(HeadError):
    """The driver that answered runs another Ray job than the one asked for."""

    def __init__(self, expected: str, found: str | None, source: str) -> None:
        super().__init__(
            f"the {source} snapshot is Ray job {found or '(unnamed)'}'s, not {expected}'s: ignored"
        )
        self.expected = expected
        self.found = found
        self.source = source  # "progress" (the live endpoint) or "log" (the final snapshot)


@dataclass(frozen=True)
class Head:
    """Where one job's head answers: the dashboard (Jobs API) and the driver's progress."""

    dashboard: str  # http://host:8265
    progress: str  # http://host:8266


@dataclass(frozen=True)
class Request:
    method: str
    url: str
    headers: dict[str, str]
    body: bytes | None = None


@dataclass(frozen=True)
class JobInfo:
    status: str
    message: str = ""
    exit_code: int | None = None


# ---------------------------------------------------------------------- pure functions


def submission_id(job: str, attempt: int) -> str:
    return f"{job}-{attempt}"


def entrypoint(sid: str, progress_port: int, spec_path: str, spec_sha256: str) -> str:
    return (
        f"llmtrain driver --spec {shlex.quote(spec_path)} --spec-sha256 {spec_sha256} "
        f"--submission-id {sid} --progress-port {progress_port}"
    )


def submission(
    spec_text: str, namespace: str, name: str, sid: str, progress_port: int, spec_path: str
) -> dict[str, Any]:
    """The body of ``POST /api/jobs/``. The entrypoint runs on the head (no entrypoint
    resources: the head advertises none) and reads the job from the spec ConfigMap's mount;
    the digest makes it wait out a kubelet that has not synced an updated ConfigMap yet."""
    return {
        "entrypoint": entrypoint(sid, progress_port, spec_path, spec_digest(spec_text)),
        "submission_id": sid,
        "runtime_env": {"env_vars": {"PYTHONUNBUFFERED": "1"}},
        "metadata": {"llmtrain.dev/job": name, "llmtrain.dev/namespace": namespace},
    }


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def submit_request(head: Head, token: str, body: Mapping[str, Any]) -> Request:
    return Request(
        "POST",
        f"{head.dashboard}/api/jobs/",
        {**_auth(token), "Content-Type": "application/json"},
        json.dumps(body).encode(),
    )


def status_request(head: Head, token: str, sid: str) -> Request:
    return Request("GET", f"{head.dashboard}/api/jobs/{quote(sid)}", _auth(token))


def logs_request(head: Head, token: str, sid: str) -> Request:
    return Request("GET", f"{head.dashboard}/api/jobs/{quote(sid)}/logs", _auth(token))


def stop_request(head: Head, token: str, sid: str) -> Request:
    return Request("POST", f"{head.dashboard}/api/jobs/{quote(sid)}/stop", _auth(token))


def progress_request(head: Head, token: str, sid: str) -> Request:
    return Request("GET", f"{head.progress}/progress?{urlencode({SID_PARAM: sid})}", _auth(token))


def checkpoint_request(head: Head, token: str, sid: str) -> Request:
    return Request("POST", f"{head.progress}/checkpoint?{urlencode({SID_PARAM: sid})}", _auth(token))


def check_snapshot(snap: RunSnapshot, sid: str, source: str) -> RunSnapshot:
    """``snap`` if it is the attempt ``sid``'s; else :class:`ForeignSnapshot`. A snapshot
    that names no attempt is refused too: every driver the operator submits is given one."""
    if snap.submission_id != sid:
        raise ForeignSnapshot(sid, snap.submission_id, source)
    return snap


def foreign_id(text: str) -> str | None:
    """The driver's own id from its 409 answer to a request for another attempt."""
    try:
        raw = json.loads(text)
    except ValueError:
        return None
    found = raw.get("submission_id") if isinstance(raw, dict) else None
    return found if isinstance(found, str) else None


def already_submitted(status: int, text: str) -> bool:
    """Ray's answer to a reused submission_id (HTTP 400/500 with this wording)."""
    return status in (400, 409, 500) and ("already exists" in text or "different submission_id" in text)


def parse_job_info(text: str) -> JobInfo:
    raw = json.loads(text)
    if not isinstance(raw, dict) or not isinstance(raw.get("status"), str):
        raise HeadError(f"not a Ray job: {text[:200]!r}")
    code = raw.get("driver_exit_code")
    return JobInfo(
        status=raw["status"],
        message=str(raw.get("message") or "")[:4000],
        exit_code=int(code) if isinstance(code, int) else None,
    )


def log_tail(text: str, lines: int = 20, max_chars: int = 4000) -> str:
    """The last ``lines`` lines of a log (without the final snapshot line), bounded."""
    kept = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith(RESULT_PREFIX)]
    return "\n".join(kept[-lines:])[-max_chars:]


def head_of(settings: OperatorSettings, namespace: str, name: str) -> Head:
    """A job's head: its Service's DNS name in a cluster, or ``settings.head_host`` (a
    stand-in Ray cluster on 127.0.0.1 in tests and ``make k8s-demo``)."""
    host = settings.head_host or f"{service_name(name)}.{namespace}.svc.{settings.cluster_domain}"
    return Head(f"http://{host}:{settings.dashboard_port}", f"http://{host}:{settings.progress_port}")


# ------------------------------------------------------------------------------ client


class RayJobs:
    """Sends the requests above; every failure to get an answer is a :class:`HeadError`."""

    def __init__(self, maxsize: int = 16) -> None:
        self.pool = urllib3.PoolManager(
            maxsize=maxsize,
            timeout=urllib3.Timeout(connect=CONNECT_TIMEOUT, read=READ_TIMEOUT),
            retries=False,
        )

    def _send(
        self, req: Request, *, limit: int = MAX_SNAPSHOT_BYTES, read_timeout: float = READ_TIMEOUT
    ) -> tuple[int, str]:
        try:
            resp = self.pool.request(
                req.method,
                req.url,
                headers=req.headers,
                body=req.body,
                preload_content=False,
                timeout=urllib3.Timeout(connect=CONNECT_TIMEOUT, read=read_timeout),
            )
            try:
                data = resp.read(limit + 1, decode_content=True)
            finally:
                resp.release_conn()
        except urllib3.exceptions.HTTPError as e:
            raise HeadError(f"{req.method} {req.url}: {e}") from None
        if resp.status in (401, 403):
            raise HeadError(f"{req.method} {req.url}: HTTP {resp.status}: the job's Ray token was refused")
        if resp.status >= 500 and not already_submitted(resp.status, data.decode(errors="replace")):
            raise HeadError(f"{req.method} {req.url}: HTTP {resp.status}: {data[:300]!r}")
        return resp.status, data[:limit].decode(errors="replace")

    def submit(self, head: Head, token: str, body: Mapping[str, Any]) -> bool:
        """True if this POST created the Ray job, False if it existed already."""
        status, text = self._send(submit_request(head, token, body), read_timeout=SUBMIT_TIMEOUT)
        if already_submitted(status, text):
            return False
        if status != 200:
            raise HeadError(f"submitting {body.get('submission_id')}: HTTP {status}: {text[:300]}")
        return True

    def status(self, head: Head, token: str, sid: str) -> JobInfo | None:
        """The Ray job's state, or None if the head has no such job (a new head)."""
        status, text = self._send(status_request(head, token, sid))
        if status == 404:
            return None
        if status != 200:
            raise HeadError(f"GET job {sid}: HTTP {status}: {text[:300]}")
        try:
            return parse_job_info(text)
        except ValueError as e:
            raise HeadError(f"GET job {sid}: {e}") from None

    def logs(self, head: Head, token: str, sid: str) -> str:
        status, text = self._send(logs_request(head, token, sid), limit=16 * 1024 * 1024)
        if status != 200:
            raise HeadError(f"GET logs of {sid}: HTTP {status}: {text[:300]}")
        try:
            logs = json.loads(text).get("logs", "")
        except (ValueError, AttributeError):
            raise HeadError(f"GET logs of {sid}: not JSON") from None
        return str(logs)[-LOG_TAIL_BYTES:]

    def stop(self, head: Head, token: str, sid: str) -> None:
        self._send(stop_request(head, token, sid))

    def checkpoint(self, head: Head, token: str, sid: str) -> int:
        """Ask the driver of attempt ``sid`` for a checkpoint at its next log step; the step
        it had reached. Another attempt's driver refuses (409): :class:`ForeignSnapshot`."""
        status, text = self._send(checkpoint_request(head, token, sid))
        if status == 409 and foreign_id(text) not in (None, sid):
            raise ForeignSnapshot(sid, foreign_id(text), "checkpoint")
        if status != 202:
            raise HeadError(f"POST checkpoint: HTTP {status}: {text[:300]}")
        try:
            return int(json.loads(text)["step"])
        except (ValueError, KeyError, TypeError):
            raise HeadError(f"POST checkpoint: unexpected answer {text[:200]!r}") from None

    def progress(self, head: Head, token: str, sid: str) -> RunSnapshot:
        """The snapshot of attempt ``sid``'s driver; :class:`ForeignSnapshot` when the
        driver that answers runs another Ray job (it says 409, or an older driver that
        ignores the parameter serves a snapshot naming another id)."""
        status, text = self._send(progress_request(head, token, sid))
        if status == 409:
            raise ForeignSnapshot(sid, foreign_id(text), "progress")
        if status != 200:
            raise HeadError(f"GET progress: HTTP {status}: {text[:300]}")
        try:
            snap = RunSnapshot.from_json(text)
        except ValueError as e:
            raise HeadError(f"GET progress: {e}") from None
        return check_snapshot(snap, sid, "progress")
