"""The data stage's parallel maps: a block runner (this process or Ray Data) and the two
worker-side block functions it runs, read+clean and encode.

Kept apart from :mod:`prepare` (the driver side) because everything here may run in a Ray
worker: it must stay picklable and import nothing the driver alone needs.
"""

from __future__ import annotations

import math
import pickle
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from llmtrain.runtime.data import clean as cleanmod
from llmtrain.runtime.data import collect, task, tokenize

from llmtrain.api.s3 import S3Options

Executor = Literal["auto", "local", "ray"]


# ------------------------------------------------------------------ parallel map


def _ray_map(fn: Callable[[list[Any]], list[Any]], items: list[Any], num_blocks: int) -> list[Any]:
    """Run ``fn`` over ``num_blocks`` blocks of ``items`` on Ray Data; results in any order.

    Each block's result travels as one pickled blob: documents and variable-length token
    arrays do not fit Ray Data's columnar batches without per-row conversion cost.
    """
    import ray
    import ray.data

    if not ray.is_initialized():
        from llmtrain.runtime.ray_local import init_local_ray

        init_local_ray()  # on loopback, never the machine's private address
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ds = ray.data.from_items([{"item": pickle.dumps(x)} for x in items], override_num_blocks=num_blocks)

    def run_block(batch: dict[str, Any]) -> dict[str, Any]:
        res = fn([pickle.loads(b) for b in batch["item"]])
        return {"payload": np.array([pickle.dumps(res)], dtype=object)}

    out: list[Any] = []
    for row in ds.map_batches(run_block, batch_size=None, batch_format="numpy").iter_rows():
        out.extend(pickle.loads(row["payload"]))
    return out


def parallel_map(
    fn: Callable[[list[Any]], list[Any]],
    items: list[Any],
    *,
    executor: Executor = "auto",
    num_blocks: int | None = None,
) -> list[Any]:
    """``fn`` maps a block (list) of items to a list of results. Order of results is NOT kept:
    callers sort by stable key."""
    if not items:
        return []
    use_ray = executor == "ray"
    if executor == "auto":
        try:
            import ray

            use_ray = ray.is_initialized()
        except ImportError:
            use_ray = False
    blocks = max(1, min(num_blocks or 1, len(items)))
    if use_ray:
        if num_blocks is None:
            import ray

            blocks = max(1, min(int(ray.cluster_resources().get("CPU", 1)), len(items)))
        return _ray_map(fn, items, blocks)
    out: list[Any] = []
    size = math.ceil(len(items) / blocks)
    # Last block first: like Ray Data, arrival order is not item order, so any step that
    # leans on arrival order shows up as a difference between 1 and N blocks in the tests.
    for i in reversed(range(0, len(items), size)):
        out.extend(fn(items[i : i + size]))
    return out


# ------------------------------------------------------------------ block functions


@dataclass
class CleanedDoc:
    key: str
    source: str
    text: str  # task sources: the conversation as canonical JSON (runtime/data/task.py)
    digest: str  # content hash for dedup
    ref: str = ""  # task sources: the record's name (file and line/row) for the manifest


def read_clean_block(units: list[dict[str, Any]], cfg: cleanmod.CleanConfig, s3: S3Options) -> list[Any]:
    """Worker side: read units, split into documents, clean. Returns docs and per-unit stats."""
    out: list[Any] = []
    parsed = [collect.WorkUnit.from_dict(u) for u in units]
    # Object reads are latency-bound (one GET each): overlap them; the cleaning below is cheap.
    with ThreadPoolExecutor(
        max_workers=8 if any(u.location.startswith("s3://") for u in parsed) else 1
    ) as pool:
        read = list(pool.map(lambda u: collect.read_unit(u, s3), parsed))
    for unit, got in zip(parsed, read, strict=True):
        drops: dict[str, int] = defaultdict(int)
        drops["undecodable"] += got.undecodable
        docs = []
        bad = list(got.bad)
        for i, (key, text) in enumerate(got.docs):
            if got.refs:  # a task record: clean each message's content, keep the conversation
                cleaned, reason, bad_record = _clean_record(text, cfg)
                if bad_record is not None:
                    bad.append(task.bad_entry(unit.source.name, got.refs[i], bad_record.reason,
                                              bad_record.detail))  # fmt: skip
                    continue
            else:
                cleaned, reason = cleanmod.clean_document(text, cfg)
            if cleaned is None:
                drops[str(reason)] += 1
                continue
            ref = got.refs[i] if got.refs else ""
            docs.append(CleanedDoc(key, unit.source.name, cleaned, cleanmod.content_hash(cleaned), ref))
        out.append(("unit", unit.source.name, unit.ident, got.raw_sha256, dict(drops), docs, bad))
    return out


def _clean_record(
    text: str, cfg: cleanmod.CleanConfig
) -> tuple[str | None, str | None, task.BadRecord | None]:
    """A conversation with each content cleaned; the length filters apply to the contents joined.
    A content that cleaning empties makes a bad record (empty_content), not a silent drop."""
    msgs = [{**m, "content": cleanmod.clean_text(m["content"], cfg)} for m in task.from_text(text)]
    try:
        task.check_order(msgs)
    except task.BadRecord as e:
        return None, None, e
    reason = cleanmod.drop_reason("\n\n".join(m["content"] for m in msgs), cfg)
    return (None, reason, None) if reason else (task.to_text(msgs), None, None)


def encode_block(items: list[tuple[str, str]], tok_json: str, eot: int) -> list[tuple[str, np.ndarray]]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tok_json)
    keys = [k for k, _ in items]
    arrays = tokenize.encode_documents(tok, [t for _, t in items], eot)
    return list(zip(keys, arrays, strict=True))
