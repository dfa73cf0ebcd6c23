"""The driver's HTTP endpoint for the operator: the run's snapshot (``GET /progress``) and
"checkpoint now" (``POST /checkpoint``), behind the job's Ray token."""

from __future__ import annotations

import hmac
import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from llmtrain.runtime.stage import Reporter

PROGRESS_PATH = "/progress"
CHECKPOINT_PATH = "/checkpoint"
log = logging.getLogger(__name__)

SID_PARAM = "submissionId"  # the attempt a request is for (llmtrain.operator.rayjobs.SID_PARAM)


class ProgressServer:
    """``GET /progress`` → the run's snapshot as JSON, for the operator, behind the job's
    Ray token (``Authorization: Bearer``; 401 without it, 403 with another).
    ``POST /checkpoint`` → 202 and rank 0 checkpoints at its next log step (409 when no
    training runs); the operator asks before it suspends the job.
    Both name the attempt they are for (``?submissionId=<id>``): a request for another one
    is answered 409 with this driver's own id, so an operator that reached the wrong driver
    (a head Service selecting another job's head, a stale endpoint) writes none of its
    progress into its job's status and makes no other run checkpoint.

    The operator pulls (KubeRay's way for job state) rather than the driver pushing: the
    operator makes every connection, so no endpoint of the control plane is reachable from
    pods that run user code, the poll rate is the operator's to bound, and a lost read loses
    nothing (each answer is the whole snapshot). One GET of ~2 KB per job per resync.
    The standard library's threaded server: one path, one header, no framework needed.
    """

    # A client that connects and then sends nothing (or half a request) held its thread and
    # socket for ever; the operator's own requests take milliseconds.
    SOCKET_TIMEOUT_SECONDS = 10.0

    def __init__(
        self,
        report: Reporter,
        token: str,
        host: str,
        port: int,
        *,
        timeout: float | None = SOCKET_TIMEOUT_SECONDS,
    ) -> None:
        reporter, expected, socket_timeout = report, f"Bearer {token}".encode(), timeout

        class Handler(BaseHTTPRequestHandler):
            # StreamRequestHandler sets it on each accepted socket: a read that waits longer
            # ends that connection (and its thread), not the server.
            timeout = socket_timeout

            def do_GET(self) -> None:
                if self._authorized(PROGRESS_PATH) and self._ours():
                    self._send(200, reporter.json().encode())

            def do_POST(self) -> None:
                if not (self._authorized(CHECKPOINT_PATH) and self._ours()):
                    return
                ask = reporter.ask_checkpoint
                if ask is None:
                    self._send(409, b'{"error":"no training runs: nothing to checkpoint"}')
                    return
                ask()
                with reporter.lock:
                    step = reporter.snapshot.progress.step if reporter.snapshot.progress else 0
                self._send(202, json.dumps({"requested": True, "step": step}).encode())

            def _ours(self) -> bool:
                """The request names this driver's attempt, or none (an older operator)."""
                asked = parse_qs(urlsplit(self.path).query).get(SID_PARAM)
                own = reporter.snapshot.submission_id
                if asked is None or asked[-1] == own:
                    return True
                body = {"error": f"this driver runs Ray job {own}, not {asked[-1]}", "submission_id": own}
                self._send(409, json.dumps(body).encode())
                return False

            def _authorized(self, path: str) -> bool:
                given = (self.headers.get("Authorization") or "").encode()
                if urlsplit(self.path).path != path:
                    self._send(404, b'{"error":"not found"}')
                elif not given:
                    self._send(401, b'{"error":"missing token"}')
                elif not hmac.compare_digest(given, expected):
                    self._send(403, b'{"error":"wrong token"}')
                else:
                    return True
                return False

            def _send(self, code: int, body: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # one line per poll: none
                pass

        self.server = _Server((host, port), Handler)
        self.port = int(self.server.server_address[1])
        self.thread = threading.Thread(target=self.server.serve_forever, name="progress", daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class _Server(ThreadingHTTPServer):
    allow_reuse_address = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client gone mid-answer (a timed-out poll, a closed connection): the default
        # prints a traceback into the driver's log, which the operator reads as the run's.
        log.debug("progress request from %s failed", client_address, exc_info=True)
