"""prepare on Ray Data: 1 and 8 blocks give a byte-identical manifest and identical shards,
equal to the in-process path."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from llmtrain.runtime.data.prepare import prepare_data

from llmtrain.api.shards import MANIFEST_NAME

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))
from datahelpers import AWKWARD_DOCS, make_spec, stdlib_sample, write_docs

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def ray_local(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    ray = pytest.importorskip("ray")
    tmp = tmp_path_factory.mktemp("ray")
    saved = {
        k: os.environ.get(k) for k in ("RAY_TMPDIR", "RAY_AUTH_MODE", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S")
    }
    os.environ.update(
        {"RAY_TMPDIR": str(tmp), "RAY_AUTH_MODE": "disabled", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1"}
    )
    from llmtrain.runtime.ray_local import init_local_ray

    init_local_ray(2, temp_dir=tmp)  # on loopback, never the machine's private address
    try:
        yield
    finally:
        ray.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_ray_blocks_give_byte_identical_output(ray_local: None, tmp_path: Path) -> None:
    # duplicates across files land in different blocks: dedup must still be global
    docs = [*AWKWARD_DOCS, *stdlib_sample(40), *stdlib_sample(5)]
    write_docs(tmp_path / "src", docs)
    outs = {}
    for name, kw in {
        "ray1": {"num_blocks": 1},
        "ray8": {"num_blocks": 8},
        "local": {"executor": "local"},
    }.items():
        spec = make_spec(
            {
                "sources": [
                    {"name": "d", "local": {"glob": str(tmp_path / "src" / "*.txt"), "textUnit": "file"}}
                ],
                "tokenizer": {"train": {"vocabSize": 500}},
                "outputUri": str(tmp_path / name),
                "validationFraction": 0.2,
            }
        )
        res = prepare_data(spec, **kw)  # type: ignore[arg-type]
        assert res.manifest.dropped["duplicate"] == 5
        outs[name] = tmp_path / name
    ref = (outs["ray1"] / MANIFEST_NAME).read_bytes()
    for name in ("ray8", "local"):
        assert (outs[name] / MANIFEST_NAME).read_bytes() == ref, name
        for f in sorted(p.name for p in outs["ray1"].iterdir()):
            assert (outs[name] / f).read_bytes() == (outs["ray1"] / f).read_bytes(), (name, f)
