"""The driver's RunChannel actor lives on the driver's node: on Kubernetes the head runs no
tasks (``--num-cpus=0``), so an unpinned actor lands on a worker node, and the loss of that
worker pod killed the channel and the whole Ray job (found on the real node, issue 23: the
Ray job failed with ``ActorDiedError: class_name: _Channel … its node has died`` where Ray
Train would have restarted the worker group).

A two-node Ray cluster on loopback shaped like a job's: a head with no CPUs where the driver
runs, one worker node with a CPU (two ``ray start`` on 127.0.0.1). Negative control (by hand,
2026-12-07): with the channel unpinned (``ray.remote(num_cpus=0)(_Channel).remote(...)``),
the actor's node was the worker's and the test failed.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

from tests.raystandin import free_port  # noqa: E402

pytestmark = pytest.mark.ray

DRIVER = textwrap.dedent(
    """
    import sys, ray
    ray.init(address=sys.argv[1])
    from llmtrain.runtime.channel import RunChannel
    here = ray.get_runtime_context().get_node_id()
    workers = [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU")]
    channel = RunChannel()
    node = ray.get(channel.actor.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id()))
    print(node == here, node in workers, len(workers))
    """
)


def test_the_run_channel_lives_on_the_drivers_node(tmp_path: Path) -> None:
    ray_tmp = tempfile.mkdtemp(prefix="ray-")  # short: unix socket paths must stay < 108 bytes
    ray = str(Path(sys.executable).parent / "ray")
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    # Set by llmtrain.runtime.ray_local (imported by earlier tests) for one-node local Ray; a
    # second node refuses to join under it. Every address here is given as 127.0.0.1.
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
    port = free_port()
    common = ["--node-ip-address=127.0.0.1", "--disable-usage-stats"]
    head = [ray, "start", "--head", f"--port={port}", "--num-cpus=0", "--include-dashboard=false"]
    head += [f"--temp-dir={ray_tmp}", f"--ray-client-server-port={free_port()}", *common]
    worker = [ray, "start", f"--address=127.0.0.1:{port}", "--num-cpus=1", *common]
    try:
        for cmd in (head, worker):
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
            assert r.returncode == 0, r.stderr[-2000:]
        proc = subprocess.run(
            [sys.executable, "-c", DRIVER, f"127.0.0.1:{port}"],
            capture_output=True,
            text=True,
            timeout=180,
            cwd=tmp_path,
            env=env,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stdout.strip().splitlines()[-1] == "True False 1", proc.stdout
    finally:
        # This cluster's processes only (`ray stop` would stop every Ray on the machine).
        out = subprocess.run(["pgrep", "-f", ray_tmp], capture_output=True, text=True).stdout.split()
        for pid in out:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(ray_tmp, ignore_errors=True)
