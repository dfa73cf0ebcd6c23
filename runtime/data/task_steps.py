"""The data stage's steps for task records (runtime/data/task.py): encode with the chat template,
count and write packed token + loss-mask shards, and the held-out prompts for the task metric.

Kept apart from :mod:`prepare` (which calls these when ``spec.data.sources[].task`` is set) so
the plain-text path reads as before; everything here is driver side except
:func:`task.encode_block`, which runs in the parallel map.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterable
from typing import Any

import numpy as np
from llmtrain.runtime.data import shard, task
from llmtrain.runtime.data.blocks import Executor, parallel_map
from llmtrain.runtime.store import Store

from llmtrain.api.shards import TASK_EVAL_NAME, MaskInfo, ShardInfo, Split, mask_name, pack_mask


def encode(
    items: list[tuple[str, str]],
    tok_json: bytes,
    template: str,
    eos_token: str,
    context_length: int,
    executor: Executor,
    num_blocks: int | None,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, tuple[str, str]]]:
    """Ids and masks by key, and the records that cannot be trained on: key → (reason, detail)."""
    tok_str = tok_json.decode("utf-8")
    got = parallel_map(
        lambda block: task.encode_block(block, tok_str, template, eos_token, context_length),
        items,
        executor=executor,
        num_blocks=num_blocks,
    )
    ids: dict[str, np.ndarray] = {}
    masks: dict[str, np.ndarray] = {}
    bad: dict[str, tuple[str, str]] = {}
    for key, i, m, reason, detail in got:
        if i is None:
            bad[key] = (reason, detail)
        else:
            ids[key], masks[key] = i, m
    return ids, masks, bad


def count_blocks(sizes: Iterable[int], context_length: int) -> int:
    """Blocks (= loader windows) that :func:`task.pack_blocks` makes of records of these sizes."""
    blocks = used = 0
    for n in sizes:
        if blocks == 0 or used + n > context_length:
            blocks, used = blocks + 1, 0
        used += n
    return blocks


def write_split(
    out: Store,
    split: Split,
    records: Iterable[tuple[np.ndarray, np.ndarray]],
    *,
    vocab_size: int,
    eot_id: int,
    max_tokens: int,
    context_length: int,
) -> list[shard.WrittenShard]:
    """One split's token shards and their loss-mask shards (``<split>-00000.bin`` / ``.mask``)."""
    written = []
    blocks = task.pack_blocks(records, context_length, eot_id)
    for i, group in enumerate(task.shard_groups(blocks, max_tokens, context_length)):
        tokens, mask = task.join_blocks(group, eot_id)
        data = shard.encode_shard(tokens, vocab_size, eot_id)
        name = shard.shard_name(split, i)
        etag = out.put(name, data)
        mdata = pack_mask(mask.tobytes())
        out.put(mask_name(name), mdata)
        info = ShardInfo(
            path=name,
            split=split,
            tokens=int(tokens.size),
            documents=sum(b.records for b in group),
            bytes=len(data),
            sha256=hashlib.sha256(data).hexdigest(),
            mask=MaskInfo(
                path=mask_name(name),
                bytes=len(mdata),
                sha256=hashlib.sha256(mdata).hexdigest(),
                targets=int(mask.sum()),
            ),
        )
        written.append(shard.WrittenShard(info, etag))
    return written


def write_eval(out: Store, records: list[tuple[str, str]]) -> dict[str, Any]:
    """``task-eval.jsonl``: one held-out record per line, ``{"id", "messages", "reference"}`` —
    the prompt turns and the final answer (the task metric's input); its manifest entry."""
    lines = [
        json.dumps(task.eval_line(rid, text), ensure_ascii=False, sort_keys=True) for rid, text in records
    ]
    data = ("\n".join(lines) + "\n").encode("utf-8") if lines else b""
    out.put(TASK_EVAL_NAME, data)
    return {"path": TASK_EVAL_NAME, "records": len(lines), "sha256": hashlib.sha256(data).hexdigest()}


def summary(
    bad: list[dict[str, str]],
    *,
    formats: dict[str, str],
    context_length: int,
    template: str,
    records: dict[str, int],
    shards: list[ShardInfo],
) -> dict[str, Any]:
    """The manifest's ``extra.task``: what was trained on, what was refused and why (named)."""
    named = sorted(bad, key=lambda b: (b["source"], b["record"], b["reason"]))
    tokens = sum(s.tokens for s in shards)
    targets = sum(s.mask.targets for s in shards if s.mask is not None)
    return {
        "formats": formats,
        "context_length": context_length,
        "chat_template_sha256": hashlib.sha256(template.encode("utf-8")).hexdigest(),
        "packing": task.PACKING,
        "records": records,
        "bad_records": dict(sorted(Counter(b["reason"] for b in bad).items())),
        "bad_examples": named[: task.BAD_EXAMPLES],
        "target_tokens": targets,
        "target_fraction": round(targets / tokens, 6) if tokens else 0.0,
    }


def bad_line(bad: list[dict[str, str]]) -> str:
    """One log line: how many records were refused, why, and the first of them."""
    counts = Counter(b["reason"] for b in bad)
    first = min(bad, key=lambda b: (b["source"], b["record"]))
    return (
        f"task: {len(bad)} bad records not trained on ("
        + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
        + f"), e.g. {first['source']}: {first['record']}: {first['reason']} ({first['detail']}); "
        f"the first {task.BAD_EXAMPLES} are named in manifest.json extra.task.bad_examples"
    )
