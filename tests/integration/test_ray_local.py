"""The local Ray cluster stays on loopback (nothing may connect to the machine's private address)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.ray

CODE = textwrap.dedent(
    """
    import sys, ray
    from llmtrain.runtime.ray_local import init_local_ray
    init_local_ray(1, temp_dir=sys.argv[1])

    @ray.remote
    def where():
        import os, ray
        return ray.util.get_node_ip_address(), os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S")

    print(ray.get(where.remote()), [n["NodeManagerAddress"] for n in ray.nodes()])
    from llmtrain.runtime.ray_local import session_logs_dir
    print(session_logs_dir())
    ray.shutdown()
    """
)


def test_local_ray_binds_loopback(tmp_path: Path) -> None:
    ray_tmp = tempfile.mkdtemp(prefix="ray-")  # short: unix socket paths must stay < 108 bytes
    proc = subprocess.run(
        [sys.executable, "-c", CODE, ray_tmp], capture_output=True, text=True, timeout=180, cwd=tmp_path
    )
    shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    where, logs = proc.stdout.strip().splitlines()
    assert where == "('127.0.0.1', '0.1') ['127.0.0.1']"
    # The session's logs live under the temp dir we chose (llmtrain run links them).
    assert logs.startswith(ray_tmp) and logs.endswith("/logs"), logs
