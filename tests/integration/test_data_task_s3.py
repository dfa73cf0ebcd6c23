# ruff: noqa: F811  (pytest fixtures imported from tests/data/datahelpers.py are redefined as arguments)
"""Task records (#27 item 1) from S3 (moto's standalone server, real HTTP) and from a Hugging Face
``datasets`` source: prompt/response JSONL (one object gzipped) and chat Parquet to token +
loss-mask shards on S3, the bad records named, task-eval.jsonl beside the manifest, and the
loader streaming (tokens, mask) back from S3."""

from __future__ import annotations

import gzip
import io
import json
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from llmtrain.runtime.data.loader import ShardLoader
from llmtrain.runtime.data.prepare import prepare_data
from llmtrain.runtime.store import S3Store
from tokenizers import Tokenizer

from llmtrain.api.s3 import S3Options
from llmtrain.api.shards import MANIFEST_NAME, TASK_EVAL_NAME, TOKENIZER_NAME, Manifest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))
from datahelpers import S3Server, make_spec, s3_server  # noqa: F401

pytestmark = pytest.mark.timeout(300)
CONTEXT = 96


def test_prompt_response_and_chat_records_through_s3_and_huggingface(
    s3_server: S3Server, tmp_path: Path
) -> None:
    b = s3_server.bucket("tasks")
    s3_server.bucket("prepared")
    client = s3_server.client()
    qa = [{"q": f"Double {i}?", "a": str(2 * i)} for i in range(40)]
    lines = [json.dumps(r) for r in qa[:20]]
    client.put_object(Bucket=b, Key="qa/part-0.jsonl", Body="\n".join(lines).encode())
    bad_lines = [json.dumps(r) for r in qa[20:]] + [json.dumps({"q": "no answer"})]
    client.put_object(Bucket=b, Key="qa/part-1.jsonl.gz", Body=gzip.compress("\n".join(bad_lines).encode()))
    chats = [
        {"turns": [{"role": "user", "content": f"Echo {w}"}, {"role": "assistant", "content": w}]}
        for w in ("red", "green", "blue", "cyan", "pink", "gold", "grey", "teal") * 3
    ]
    chats.append({"turns": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]})
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(chats), buf)
    client.put_object(Bucket=b, Key="chat/c.parquet", Body=buf.getvalue())
    hf = tmp_path / "hf.jsonl"
    hf.write_text(
        "\n".join(json.dumps({"prompt": f"Name {i}", "response": f"n{i}"}) for i in range(20)) + "\n"
    )
    spec = make_spec(
        {
            "sources": [
                {
                    "name": "qa",
                    "s3": {"uri": "s3://tasks/qa/", "format": "jsonl"},
                    "task": {"format": "promptResponse", "promptField": "q", "responseField": "a"},
                },
                {
                    "name": "chat",
                    "s3": {"uri": "s3://tasks/chat/", "format": "parquet"},
                    "task": {"format": "chat", "messagesField": "turns", "system": "Echo."},
                },
                {
                    "name": "hf",
                    "huggingface": {"builder": "json", "dataFiles": [str(hf)]},
                    "task": {"format": "promptResponse"},
                },
            ],
            "tokenizer": {"train": {"vocabSize": 320}},
            "outputUri": "s3://prepared/task",
            "validationFraction": 0.25,
        },
        model={"architecture": {"layers": 1, "dModel": 16, "heads": 2, "contextLength": CONTEXT}},
        storage={"endpoint": s3_server.endpoint, "region": "us-east-1"},
    )
    res = prepare_data(spec)
    opts = S3Options(endpoint=s3_server.endpoint)
    store = S3Store("s3://prepared/task", opts)
    m = Manifest.from_json(store.get(MANIFEST_NAME))
    assert m.task is not None and m.task["records"]["train"] + m.task["records"]["validation"] == 40 + 8 + 20
    assert m.dropped["duplicate"] == 16  # the chats' copies: exact dedup of whole conversations
    assert m.task["bad_records"] == {"missing_field": 1, "role_order": 1}
    assert {(e["source"], e["record"]) for e in m.task["bad_examples"]} == {
        ("qa", "qa/part-1.jsonl.gz line 21"),
        ("chat", "chat/c.parquet row 24"),
    }
    assert res.manifest_uri == "s3://prepared/task/manifest.json"
    keys = {o["Key"] for o in client.list_objects_v2(Bucket="prepared")["Contents"]}
    assert {"task/train-00000.mask", "task/validation-00000.mask", f"task/{TASK_EVAL_NAME}"} <= keys
    evals = [json.loads(x) for x in store.get(TASK_EVAL_NAME).decode().splitlines()]
    assert len(evals) == m.task_eval["records"] == m.task["records"]["validation"]  # type: ignore[index]
    by_source = {e["id"].split(":")[0] for e in evals}
    assert by_source == {"qa", "chat", "hf"}
    for e in evals:
        if e["id"].startswith("chat:"):
            assert e["messages"][0] == {"role": "system", "content": "Echo."}  # task.system
            assert e["messages"][1]["content"] == f"Echo {e['reference']}"
    # The loader streams tokens and masks back from S3; the masked tokens are answers + EOT.
    tok = Tokenizer.from_str(store.get(TOKENIZER_NAME).decode())
    ld = ShardLoader("s3://prepared/task", "validation", 0, 1, 1, CONTEXT, 0, opts)
    answers = ""
    for tokens, mask in ld:
        assert tokens.shape == mask.shape == (1, CONTEXT + 1) and mask.dtype == torch.bool
        answers += tok.decode(tokens[0, :-1][mask[0, :-1]].tolist(), skip_special_tokens=False)
    assert answers == "".join(e["reference"] + "<|endoftext|>" for e in evals)
