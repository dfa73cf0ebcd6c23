"""``llmtrain driver --spec FILE``: the job's spec as mounted from its ConfigMap, waited for
until it is the spec the job was submitted with."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

from llmtrain.api.job import LLMTrainingJob
from llmtrain.api.job import load_job as parse


def load_job(path: str, sha256: str | None = None, wait_seconds: float = 180.0) -> LLMTrainingJob:
    """The job from ``--spec FILE``: on the cluster the spec ConfigMap's mount.

    With ``sha256`` (what the operator submits) the file must hold exactly the spec the job
    was submitted with: a kubelet syncs an updated ConfigMap into running pods lazily (up to
    about a minute), so a stale copy is waited out rather than trained on.
    """
    if sha256:
        deadline = time.monotonic() + wait_seconds
        seen = "no file"
        while True:
            try:
                seen = hashlib.sha256(Path(path).read_bytes()).hexdigest()
            except FileNotFoundError:
                seen = "no file"
            if seen == sha256:
                break
            if time.monotonic() > deadline:
                raise ValueError(
                    f"--spec {path}: still not the submitted spec after {wait_seconds:.0f} s "
                    f"(sha256 {seen[:12]}, submitted {sha256[:12]}): is the job's spec ConfigMap "
                    "mounted on the head, and up to date?"
                )
            time.sleep(1.0)
    return parse(path)
