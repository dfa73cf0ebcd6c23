"""Start (or join) the local Ray cluster that ``llmtrain run``, ``llmtrain data prepare`` and
the tests use.

Ray binds to the machine's primary address by default — a private-range IP that nothing
here may connect to. A local cluster is pinned to loopback instead, keeps its session files
and logs under a directory we choose (not /tmp/ray), disables the dashboard (seconds of
start-up on 2 cores), and keeps its log noise out of the user's terminal.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

LOOPBACK = "127.0.0.1"

# Set before Ray is imported: they are read at import time, by the raylet and by the workers
# it spawns.
LOCAL_ENV = {
    # Ray replaces 127.0.0.1 with the machine's "reachable" address unless clustering is
    # off (its setting for single-machine Windows/macOS): this keeps every Ray socket,
    # GCS, raylet and worker, on loopback.
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    # A local, single-user cluster on loopback; the Kubernetes path uses token auth.
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    # Each ray.train.report otherwise blocks ~1.5 s waiting for the next health check.
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1",
}


def init_local_ray(
    num_cpus: int | None = None,
    *,
    temp_dir: str | Path | None = None,
    log_to_driver: bool = False,
    extra_env: dict[str, str] | None = None,
) -> Any:
    """``ray.init`` on loopback, or nothing if this process is already connected."""
    env = {**LOCAL_ENV, **(extra_env or {})}
    os.environ.update(env)
    import ray
    from ray._private import ray_constants

    if ray.is_initialized():
        return ray.get_runtime_context()
    # The constant is read when ray is imported; this process may have imported it already.
    # (Processes Ray spawns inherit the environment variable set above.)
    ray_constants.ENABLE_RAY_CLUSTER = False
    # Short: Ray's unix socket paths under it must stay below 108 bytes.
    tmp = Path(temp_dir or os.environ.get("RAY_TMPDIR") or Path(tempfile.gettempdir()) / "llmtrain-ray")
    tmp.mkdir(parents=True, exist_ok=True)
    os.environ["RAY_TMPDIR"] = str(tmp)
    return ray.init(
        num_cpus=num_cpus if num_cpus is not None else os.cpu_count(),
        include_dashboard=False,
        log_to_driver=log_to_driver,
        _node_ip_address=LOOPBACK,
        _temp_dir=str(tmp),
        runtime_env={"env_vars": env},
        configure_logging=True,
        logging_level=logging.WARNING,
        # Ray starts one idle worker process per CPU for the first driver; actors (all that
        # Ray Train and we start) get processes of their own, so on 2 cores those idle ones
        # only take CPU from the start-up that matters (bench/startup.py).
        _system_config={"prestart_worker_first_driver": False},
    )


def session_logs_dir() -> Path | None:
    """The logs directory of the Ray session this process is connected to (raylet, GCS and
    every worker's stdout/stderr), or None when not connected or Ray no longer says."""
    from ray._private import worker

    node = getattr(worker, "_global_node", None)
    if node is None:
        return None
    try:
        return Path(node.get_logs_dir_path())
    except AttributeError:  # pragma: no cover - a private API of Ray's
        return None
