"""What mirroring a run's progress into status costs the operator, per job per update,
and so at 1000 jobs.

Each update of a running job is one reconcile (step 8): ``GET /api/jobs/<id>`` on the
job's head, ``GET :8266/progress`` (the driver's ~2 KB RunSnapshot), the status computed
from it, and one status merge patch. Measured here over real HTTP against a stand-in for
N heads (a subprocess serving Ray's Jobs API shape and a snapshot whose step moves every
round, so every update is a real change), with the operator's own Reconciler and RayJobs
client, from 16 threads as the controller runs them.

The status PATCH itself goes to the API server and is not timed here (bench/operator_scale.py
measures the write path); its size is reported.

    .venv/bin/python -P bench/progress_poll.py --jobs 1000 --rounds 5
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT))  # tests.unit fakes (appended: operator/ must not shadow the stdlib's)

from llmtrain.operator import manifests as m  # noqa: E402
from llmtrain.operator.outcome import apply_merge_patch  # noqa: E402
from llmtrain.operator.rayjobs import RayJobs  # noqa: E402
from llmtrain.operator.reconcile import Reconciler  # noqa: E402

from llmtrain.api.progress import CheckpointEntry, DataInfo, ProgressEvent, RunSnapshot  # noqa: E402
from tests.unit.test_operator_fakes import FakeApi, job_body, set_all, views  # noqa: E402

TOKEN = "t" * 64
THREADS = 16


def _snapshot(step: int) -> str:
    snap = RunSnapshot(stage="training", submission_id="job-1", keep_last=3)
    snap.data = DataInfo("s3://bucket/jobs/job/data/manifest.json", 20_000_000_000, 40_000_000, 32000)
    for s in (1000, 2000, 3000):
        snap.add_checkpoint(CheckpointEntry(s, f"s3://bucket/jobs/job/checkpoints/step_{s:08d}", 1.8e9, 2.5))
    snap.absorb(
        ProgressEvent(
            step=step,
            total_steps=100_000,
            epoch=0,
            tokens=step * 524_288,
            train_loss=2.5 + 1 / step,
            val_loss=2.6,
            val_perplexity=13.46,
            val_accuracy=0.48,
            tokens_per_second=812_345.6,
            mfu=0.51,
            eta_seconds=86_400.0,
            time=time.time(),
        )
    )
    return snap.to_json()


def serve(port: int, ready: Any) -> None:
    """N heads in one process: every job's Jobs API and progress endpoint."""
    step = {"n": 3001}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as a real head's aiohttp server

        def do_GET(self) -> None:
            if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                return self._send(401, b"{}")
            if self.path == "/progress":
                return self._send(200, _snapshot(step["n"]).encode())
            if self.path == "/next":  # the bench moves every job's step between rounds
                step["n"] += 10
                return self._send(200, b"{}")
            return self._send(200, b'{"status": "RUNNING", "message": "Job is currently running."}')

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self._send(200, b'{"submission_id": "x"}')

        def _send(self, code: int, body: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    ready.set()
    server.serve_forever()


class Fleet:
    """N Ready jobs over one in-memory API, reconciled as the controller does."""

    def __init__(self, n: int, port: int) -> None:
        settings = m.OperatorSettings(head_host="127.0.0.1", dashboard_port=port, progress_port=port)
        self.api = FakeApi()
        self.rec = Reconciler(self.api, settings, token=lambda: TOKEN, ray=RayJobs(maxsize=THREADS))
        self.now = dt.datetime.now(dt.UTC)
        self.bodies = []
        for i in range(n):
            body = job_body(name=f"job-{i:04d}", namespace="bench")
            body["metadata"]["uid"] = f"uid-{i}"
            self.bodies.append(body)
        self.patch_bytes: list[int] = []
        self._pods: dict[str, dict[str, Any]] | None = None  # each job's pod views, once settled

    def tick(self, body: dict[str, Any]) -> None:
        name = body["metadata"]["name"]
        if self._pods is None:
            pods = {k: v for k, v in views(self.api).items() if v.job == name}
        else:
            pods = self._pods[name]
        out = self.rec.reconcile(body, pods, self.now)
        if out.status is not None:
            self.patch_bytes.append(len(json.dumps({"status": out.status})))
            apply_merge_patch(body.setdefault("status", {}), out.status)

    def settle(self) -> None:
        """Create every job's pods, mark them Running, and index them once."""
        for b in self.bodies:
            self.tick(b)
        set_all(self.api, "running")
        pods: dict[str, dict[str, Any]] = {b["metadata"]["name"]: {} for b in self.bodies}
        for k, v in views(self.api).items():
            pods[v.job][k] = v
        self._pods = pods

    def round(self, pool: ThreadPoolExecutor) -> tuple[float, float, list[float]]:
        """One reconcile of every job: (wall s, process CPU s, per-reconcile wall s)."""
        per: list[float] = []

        def one(b: dict[str, Any]) -> None:
            t = time.perf_counter()
            self.tick(b)
            per.append(time.perf_counter() - t)

        t0, c0 = time.perf_counter(), time.process_time()
        list(pool.map(one, self.bodies))
        return time.perf_counter() - t0, time.process_time() - c0, per


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--interval", type=float, default=5.0, help="the operator's resync interval")
    args = ap.parse_args()

    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    heads = ctx.Process(target=serve, args=(port, ready), daemon=True)
    heads.start()
    ready.wait(30)
    import urllib.request

    def next_step() -> None:
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/next", headers={"Authorization": f"Bearer {TOKEN}"}
        )
        urllib.request.urlopen(req, timeout=5).read()

    rows = []
    with ThreadPoolExecutor(THREADS) as pool:
        fleet = Fleet(args.jobs, port)
        fleet.settle()
        fleet.round(pool)  # submit
        fleet.round(pool)  # first poll
        fleet.patch_bytes.clear()
        results = []
        for _ in range(args.rounds):
            next_step()
            results.append(fleet.round(pool))
        rows.append(("progress (2 GETs + mirror)", results, fleet.patch_bytes))
        steps = {b["status"]["progress"]["step"] for b in fleet.bodies}
        assert len(steps) == 1 and fleet.bodies[0]["status"]["phase"] == "Training", steps
    heads.terminate()

    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    print(
        f"{dt.date.today()} · commit {head.stdout.strip()} · {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores · {args.jobs} jobs × {args.rounds} rounds, {THREADS} threads"
    )
    print(
        "| mode | CPU ms / job / update | wall ms p50 / p99 per reconcile | round wall s | status patch bytes | CPU share at 1000 jobs every 5 s |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for name, res, patches in rows:
        cpu_per = statistics.median(c for _, c, _ in res) / args.jobs
        per = sorted(x for _, _, p in res for x in p)
        wall = statistics.median(w for w, _, _ in res)
        share = cpu_per * 1000 / args.interval
        pb = f"{statistics.median(patches):.0f}" if patches else "0"
        print(
            f"| {name} | {cpu_per * 1000:.3f} | {per[len(per) // 2] * 1000:.2f} / {per[int(len(per) * 0.99)] * 1000:.2f} "
            f"| {wall:.2f} | {pb} | {share * 100:.1f} % of a core |"
        )


if __name__ == "__main__":
    main()
