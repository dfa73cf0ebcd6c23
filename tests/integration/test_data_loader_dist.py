"""Two real processes (gloo) each with its own ShardLoader, a collective per batch: no hang,
equal batch counts, disjoint windows — over a token count that does not divide evenly."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))
from datahelpers import make_shards

pytestmark = pytest.mark.timeout(180)

WORKER = r"""
import json, os, sys
from datetime import timedelta
import torch
import torch.distributed as dist
from llmtrain.runtime.data.loader import ShardLoader

rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
loader = ShardLoader(sys.argv[1], "train", rank, world, 3, 16, seed=1, prefetch_batches=2)
firsts = []
for epoch in range(2):
    for batch in loader:
        # a collective per micro batch, like a gradient all-reduce: a rank with an extra batch would hang
        t = batch.sum().float().reshape(1)
        dist.all_reduce(t)
        firsts.append([int(x) for x in batch[:, 0]])
counts = torch.tensor([len(firsts)])
dist.all_reduce(counts, op=dist.ReduceOp.MAX)
json.dump({"batches": len(firsts), "max": int(counts), "firsts": firsts,
           "steps": loader.steps_per_epoch, "dropped": loader.dropped_windows},
          open(sys.argv[2], "w"))
dist.destroy_process_group()
"""


def test_two_gloo_ranks_do_not_hang(tmp_path: Path) -> None:
    data = make_shards(tmp_path / "data", [1000, 700, 333])  # 125 windows; 125 % (2 × 3) = 5 dropped
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env_base = {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "WORLD_SIZE": "2",
        "GLOO_SOCKET_IFNAME": "lo",
    }

    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(data), str(tmp_path / f"r{r}.json")],
            env={**os.environ, **env_base, "RANK": str(r)},
        )
        for r in range(2)
    ]
    try:
        codes = [p.wait(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert codes == [0, 0]
    out = [json.loads((tmp_path / f"r{r}.json").read_text()) for r in range(2)]
    assert out[0]["steps"] == out[1]["steps"] == 20 and out[0]["dropped"] == 5
    assert out[0]["batches"] == out[1]["batches"] == out[0]["max"] == 40
    for e in range(2):
        w0 = {x for b in out[0]["firsts"][e * 20 : (e + 1) * 20] for x in b}
        w1 = {x for b in out[1]["firsts"][e * 20 : (e + 1) * 20] for x in b}
        assert not w0 & w1 and len(w0 | w1) == 120
