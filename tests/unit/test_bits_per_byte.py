"""Bits per byte on the validation split: the one loss figure comparable across tokenizers."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from llmtrain.runtime.data.loader import open_loader
from llmtrain.runtime.data.prepare import prepare_data
from llmtrain.runtime.data.tokenize import token_byte_lengths
from llmtrain.runtime.evaluate import evaluate
from llmtrain.runtime.model import GPT
from tokenizers import Tokenizer

from llmtrain.api.config import ModelConfig
from llmtrain.api.shards import TOKENIZER_NAME

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))
from datahelpers import make_spec, raw_clean, stdlib_sample, write_docs


def test_bits_per_byte_matches_an_independent_count_over_the_same_text(tmp_path: Path) -> None:
    # ASCII text: every window decodes to exactly its bytes, so the reference below can count
    # bytes by decoding, independently of token_byte_lengths.
    docs = [d.encode("ascii", "ignore").decode() for d in stdlib_sample(40)]
    write_docs(tmp_path / "src", docs)
    data = {
        "sources": [{"name": "s", "local": {"glob": str(tmp_path / "src" / "*.txt"), "textUnit": "file"}}],
        "preprocessing": raw_clean(),
        "tokenizer": {"train": {"vocabSize": 400}},
        "outputUri": str(tmp_path / "out"),
        "validationFraction": 0.3,
    }
    prepare_data(make_spec(data))
    loader = open_loader(str(tmp_path / "out"), "validation", micro_batch=2, context_length=16)
    cfg = ModelConfig(
        vocab_size=loader.vocab_size, n_layers=1, d_model=32, n_heads=2, n_kv_heads=2, context_length=16,
        ffn_hidden_size=64,
    )  # fmt: skip
    torch.manual_seed(0)
    model = GPT(cfg)
    model.init_weights(seed=0)
    n = 4
    got = evaluate(model, iter(loader), n, torch.device("cpu"), token_bytes=loader.token_bytes())

    tok = Tokenizer.from_file(str(tmp_path / "out" / TOKENIZER_NAME))
    nll, nbytes = 0.0, 0
    with torch.no_grad():
        for i, batch in enumerate(
            open_loader(str(tmp_path / "out"), "validation", micro_batch=2, context_length=16)
        ):
            if i == n:
                break
            logits = model(batch[:, :-1]).float()
            nll += F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum").item()
            for row in batch[:, 1:].tolist():
                nbytes += len(tok.decode(row, skip_special_tokens=True).encode("utf-8"))
    want = nll / math.log(2) / nbytes
    assert got.bits_per_byte == pytest.approx(want, rel=1e-6)
    assert got.bits_per_byte == pytest.approx(got.loss / math.log(2) * got.tokens / nbytes, rel=1e-9)


def test_token_byte_lengths_count_bytes_and_give_special_tokens_none(tmp_path: Path) -> None:
    from llmtrain.runtime.data.tokenize import TokenizerConfig, train_bpe

    tok = train_bpe(
        ["héllo wörld 🦙 " * 50], TokenizerConfig(vocab_size=300, special_tokens=("<|endoftext|>",))
    )
    lengths = token_byte_lengths(tok.to_str())
    for text in ("héllo", "🦙", " wörld"):
        ids = tok.encode(text).ids
        assert sum(lengths[i] for i in ids) == len(text.encode("utf-8"))
    assert lengths[tok.token_to_id("<|endoftext|>")] == 0
