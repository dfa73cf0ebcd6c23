"""bench/operator_scale.py still measures: both modes, two jobs, on the session control plane."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]


def test_operator_scale_bench_measures_both_modes(cluster: Any, namespace: str) -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    import operator_scale

    operator_scale.fresh_crd(cluster.cp)
    results = [
        operator_scale.measure(cluster.cp, mode, 2, 1, f"{namespace}-{mode}", timeout=120, pool=None)
        for mode in ("direct", "operator")
    ]
    for r in results:
        assert r["jobs"] == 2 and r["pods"] == 4
        assert 0 < r["p50_s"] <= r["p99_s"] <= r["all_running_s"]
    assert results[0]["operator_peak_rss_mb"] is None
    assert results[1]["operator_peak_rss_mb"] > 30  # read from the live operator process
    text = operator_scale.markdown(results, 1)
    assert "| 2 | 4 | operator |" in text and "direct's (goal" in text
    assert results[1]["created_jobs_per_s"] > 0
