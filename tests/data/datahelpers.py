"""Helpers for the data pipeline's tests: small specs, a moto S3 server on loopback, and
text with every awkward feature (non-ASCII, CRLF, leading spaces, a literal end-of-text).

Test modules put this folder on ``sys.path`` and import it as ``datahelpers``.
"""

from __future__ import annotations

import copy
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from llmtrain.api.spec import LLMTrainingJobSpec

# Documents the byte-exact round trip must survive (cleaning off, so they reach the tokenizer as is).
AWKWARD_DOCS = [
    "日本語のテキストと中文字符。",
    "emoji 🦙🚀 and a ZWJ family 👩‍👩‍👧",
    "combining marks: e\u0301 a\u0308 n\u0303 (not NFC)",
    "   three leading spaces and a tab\tinside",
    "windows\r\nline endings\r\n",
    "a literal <|endoftext|> inside a document stays text",
    "<|endoftext|>",
    "trailing spaces   \n\n\n\n\nand blank lines",
]

BASE_SPEC: dict[str, Any] = {
    "model": {"architecture": {"layers": 1, "dModel": 16, "heads": 2, "contextLength": 16}},
    "training": {
        "optimizer": {"type": "adamw", "lr": 0.001},
        "batch": {"globalBatchSize": 2, "microBatchSize": 2},
        "duration": {"maxSteps": 10},
    },
    "validation": {"batches": 1},
}


def make_spec(data: dict[str, Any], **top: Any) -> LLMTrainingJobSpec:
    """A valid spec with ``data`` and a tiny model (context 16, micro batch 2)."""
    raw = copy.deepcopy(BASE_SPEC)
    raw["data"] = data
    for k, v in top.items():
        raw[k] = v
    return LLMTrainingJobSpec.model_validate(raw)


def raw_clean() -> dict[str, Any]:
    """preprocessing that leaves text byte-for-byte as written (for round-trip tests)."""
    return {
        "normalization": "none",
        "removeControlChars": False,
        "normalizeWhitespace": False,
        "dedup": "none",
    }


def write_docs(folder: Path, docs: list[str], per_file: int = 1, name: str = "doc") -> list[Path]:
    """One text file per ``per_file`` documents, separated by a blank line (textUnit paragraph)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(0, len(docs), per_file):
        p = folder / f"{name}{i:05d}.txt"
        p.write_bytes("\n\n".join(docs[i : i + per_file]).encode("utf-8"))
        paths.append(p)
    return paths


def stdlib_sample(n: int, min_chars: int = 200) -> list[str]:
    """``n`` real Python sources (UTF-8, at least ``min_chars``), in sorted path order."""
    from llmtrain.runtime.data.collect import stdlib_files

    out = []
    for _, path in stdlib_files(include_tests=False):
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        if len(text) >= min_chars:
            out.append(text)
        if len(out) == n:
            break
    return out


# ------------------------------------------------------------------ moto S3 server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class S3Server:
    endpoint: str
    proc: subprocess.Popen[bytes]

    def client(self) -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1")

    def bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name


def moto_bin() -> str | None:
    cand = Path(sys.executable).parent / "moto_server"
    return str(cand) if cand.exists() else shutil.which("moto_server")


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """moto's standalone S3 server on 127.0.0.1 (real HTTP S3 protocol); dummy credentials."""
    exe = moto_bin()
    if exe is None:
        pytest.skip("moto_server not installed (pip install 'moto[server]')")
    port = _free_port()
    saved = {
        k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")
    }
    os.environ.update(
        {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
    )
    proc = subprocess.Popen(
        [exe, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(endpoint, timeout=1)
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("moto_server did not start") from None
            time.sleep(0.1)
    try:
        yield S3Server(endpoint, proc)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ------------------------------------------------------------------ synthetic shards

SYNTH_VOCAB = 100_000  # uint32 ids; token value = global position, so a window names itself


def make_shards(root: Path, train: list[int], validation: list[int] | None = None) -> Path:
    """A prepared-data directory whose shards hold consecutive ids (sizes in tokens)."""
    import hashlib

    import numpy as np
    from llmtrain.runtime.data import shard
    from llmtrain.runtime.store import LocalStore

    from llmtrain.api.shards import Manifest, ShardInfo, TokenizerInfo

    store = LocalStore(root)
    infos = []
    start = 0
    for split, sizes in (("train", train), ("validation", validation or [200])):
        for i, n in enumerate(sizes):
            tokens = np.arange(start, start + n, dtype=np.uint32)
            start += n
            data = shard.encode_shard(tokens, SYNTH_VOCAB, eot_id=SYNTH_VOCAB - 1)
            name = shard.shard_name(split, i)
            store.put(name, data)
            infos.append(ShardInfo(name, split, n, 0, len(data), hashlib.sha256(data).hexdigest()))  # type: ignore[arg-type]
    tok = TokenizerInfo("tokenizer.json", "0", SYNTH_VOCAB, SYNTH_VOCAB - 1, "<eot>")
    shard.write_manifest(store, Manifest("fp", tok, "uint32", infos, [], {}, 0))
    return root
