"""Tokenizer training/loading, special tokens, shard dtypes and the documented header."""

from __future__ import annotations

import hashlib
import random
import struct
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from llmtrain.runtime.data import shard, tokenize
from llmtrain.runtime.data.loader import read_verified_shard
from llmtrain.runtime.data.tokenize import TokenizerConfig, TokenizerError
from llmtrain.runtime.store import LocalStore
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from llmtrain.api.shards import (
    HEADER_SIZE,
    Manifest,
    ShardFormatError,
    ShardInfo,
    TokenizerInfo,
    dtype_for_vocab,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))
from datahelpers import stdlib_sample

CORPUS = stdlib_sample(20)


def _train(**kw: Any) -> Any:
    return tokenize.train_bpe(CORPUS, TokenizerConfig(**{"vocab_size": 400, **kw}))


def test_vocab_size() -> None:
    """spec.data.tokenizer.train.vocabSize"""
    assert tokenize.vocab_size(_train(vocab_size=300)) == 300
    assert tokenize.vocab_size(_train(vocab_size=400)) == 400
    with pytest.raises(TokenizerError, match="vocabSize"):
        _train(vocab_size=200)


def test_special_tokens_first_is_eot() -> None:
    """spec.data.tokenizer.train.specialTokens"""
    tok = _train(special_tokens=("<|end|>", "<|pad|>"))
    cfg = TokenizerConfig(vocab_size=400, special_tokens=("<|end|>", "<|pad|>"))
    assert cfg.eot_token == "<|end|>"
    assert tok.token_to_id("<|end|>") == 0 and tok.token_to_id("<|pad|>") == 1
    assert tok.token_to_id("<|endoftext|>") is None


def test_min_frequency_limits_merges() -> None:
    """spec.data.tokenizer.train.minFrequency: pairs rarer than this are never merged."""
    loose = tokenize.vocab_size(_train(vocab_size=3000, min_frequency=2))
    strict = tokenize.vocab_size(_train(vocab_size=3000, min_frequency=200))
    assert strict < loose == 3000


def test_sample_bytes_bounds_the_training_sample() -> None:
    """spec.data.tokenizer.train.sampleBytes"""
    docs = [(f"k{i:04d}", "x" * 100) for i in range(100)]
    assert len(tokenize.choose_sample(docs, 0, 1_000)) == 10
    assert len(tokenize.choose_sample(docs, 0, 10**9)) == 100
    # chosen by seeded stable key, not by arrival order
    shuffled = docs[:]
    random.Random(1).shuffle(shuffled)
    assert tokenize.choose_sample(docs, 0, 1_000) == tokenize.choose_sample(shuffled, 0, 1_000)
    keyed = [(k, k) for k, _ in docs]
    assert tokenize.choose_sample(keyed, 0, 50) != tokenize.choose_sample(keyed, 1, 50)


def test_training_is_deterministic() -> None:
    a = tokenize.tokenizer_json(_train())
    b = tokenize.tokenizer_json(_train())
    assert hashlib.sha256(a).digest() == hashlib.sha256(b).digest()


def test_literal_eot_inside_a_document_stays_text() -> None:
    tok = _train()
    eot = tokenize.eot_id(tok, "<|endoftext|>")
    (ids,) = tokenize.encode_documents(tok, ["before <|endoftext|> after"], eot)
    assert list(ids).count(eot) == 1 and ids[-1] == eot
    assert tok.decode(ids[:-1].tolist()) == "before <|endoftext|> after"
    assert tok.encode_special_tokens is False  # the saved tokenizer is left as it was


def test_load_tokenizer_and_end_of_text(tmp_path: Path) -> None:
    """spec.data.tokenizer.load.uri / load.endOfText"""
    data = tokenize.tokenizer_json(_train(special_tokens=("<|end|>",)))
    cfg = TokenizerConfig(load_uri=str(tmp_path / "t.json"), end_of_text="<|end|>")
    tok = tokenize.load_tokenizer_bytes(data, cfg)
    assert cfg.eot_token == "<|end|>" and tokenize.eot_id(tok, cfg.eot_token) == 0
    with pytest.raises(TokenizerError, match=r"load\.endOfText"):
        tokenize.load_tokenizer_bytes(data, TokenizerConfig(load_uri="t.json", end_of_text="<|endoftext|>"))
    with pytest.raises(TokenizerError, match=r"load\.uri"):
        tokenize.load_tokenizer_bytes(b"{not json", cfg)


def _big_vocab_tokenizer() -> Any:
    """Byte-level BPE with 40 257 ids: 4-letter words become single ids, most ≥ 32768."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab["<|endoftext|>"] = len(vocab)
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [
        chr(c) for c in range(ord("A"), ord("Z") + 1)
    ]
    merges = [(a, b) for a in letters for b in letters]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    pairs = [a + b for a, b in merges]
    level2 = [(x, y) for x in pairs[:200] for y in pairs[:186]]
    for x, y in level2:
        vocab[x + y] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges + level2))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>"])
    return tok, [x + y for x, y in level2]


def test_vocab_above_32768_round_trips(tmp_path: Path) -> None:
    tok, words = _big_vocab_tokenizer()
    vocab = tokenize.vocab_size(tok)
    assert 40_000 < vocab <= 65_536 and dtype_for_vocab(vocab) == "uint16"
    rng = random.Random(0)
    docs = [" ".join(rng.choice(words) for _ in range(50)) for _ in range(20)]
    eot = tokenize.eot_id(tok, "<|endoftext|>")
    arrays = tokenize.encode_documents(tok, docs, eot)
    assert max(int(a.max()) for a in arrays) >= 32768  # would turn negative if read as int16
    store = LocalStore(tmp_path)
    (written,) = shard.write_split(store, "train", arrays, vocab_size=vocab, eot_id=eot, max_tokens=10**6)
    manifest = _manifest(written.info, vocab, eot, "uint16")
    ids = read_verified_shard(store, written.info, manifest).tolist()
    decoded: list[str] = []
    cur: list[int] = []
    for i in ids:
        if i == eot:
            decoded.append(tok.decode(cur))
            cur = []
        else:
            cur.append(i)
    assert decoded == docs


def _manifest(info: Any, vocab: int, eot: int, dtype: str) -> Manifest:
    return Manifest(
        fingerprint="f",
        tokenizer=TokenizerInfo("tokenizer.json", "0", vocab, eot, "<|endoftext|>"),
        dtype=dtype,
        shards=[info],
        sources=[],
        dropped={},
        seed=0,
    )


@pytest.mark.parametrize(("vocab", "dtype", "itemsize"), [(65_536, "uint16", 2), (65_537, "uint32", 4)])
def test_dtype_boundary_and_documented_header(tmp_path: Path, vocab: int, dtype: str, itemsize: int) -> None:
    tokens = np.array([0, 1, vocab - 1, 7, vocab - 2], dtype=np.uint32)
    data = shard.encode_shard(tokens, vocab, eot_id=7)
    assert len(data) == HEADER_SIZE + itemsize * tokens.size
    # parse with struct from the layout documented in llmtrain/api/shards.py, not via ShardHeader
    magic, version, code, vsize, eot, count = struct.unpack_from("<8sIIIIQ", data, 0)
    assert (magic, version, vsize, eot, count) == (b"LLMTSHRD", 1, vocab, 7, 5)
    assert code == {"uint16": 1, "uint32": 2}[dtype]
    assert data[32:HEADER_SIZE] == b"\0" * (HEADER_SIZE - 32)
    body = struct.unpack_from("<" + ("H" if itemsize == 2 else "I") * 5, data, HEADER_SIZE)
    assert list(body) == tokens.tolist()
    store = LocalStore(tmp_path)
    (w,) = shard.write_split(store, "train", [tokens], vocab_size=vocab, eot_id=7, max_tokens=100)
    assert read_verified_shard(store, w.info, _manifest(w.info, vocab, 7, dtype)).tolist() == tokens.tolist()


def test_id_outside_vocab_is_rejected() -> None:
    with pytest.raises(ValueError, match="vocab size"):
        shard.encode_shard(np.array([65_536], dtype=np.uint32), 65_536, 0)


def test_truncated_and_corrupt_shards_are_caught(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    tokens = np.arange(100, dtype=np.uint32)
    (w,) = shard.write_split(store, "train", [tokens], vocab_size=1000, eot_id=99, max_tokens=1000)
    m = _manifest(w.info, 1000, 99, "uint16")
    path = tmp_path / w.info.path
    data = path.read_bytes()
    path.write_bytes(data[:-2])
    with pytest.raises(ShardFormatError, match="truncated"):
        read_verified_shard(store, w.info, m)
    flipped = bytearray(data)
    flipped[-1] ^= 1
    path.write_bytes(bytes(flipped))
    with pytest.raises(ShardFormatError, match=r"train-00000\.bin: sha256"):
        read_verified_shard(store, w.info, m)


def test_shard_whose_vocab_is_too_large_for_its_dtype_is_rejected(tmp_path: Path) -> None:
    """Bad input "vocab too large for the dtype": a uint16 shard claiming vocab 70000 (forged with
    struct, since ShardHeader.pack refuses it) is rejected by the reader, naming the object."""
    tokens = np.arange(10, dtype="<u2")
    head = struct.pack("<8sIIIIQ", b"LLMTSHRD", 1, 1, 70_000, 0, tokens.size)
    data = head + b"\0" * (HEADER_SIZE - len(head)) + tokens.tobytes()
    (tmp_path / "train-00000.bin").write_bytes(data)
    info = ShardInfo("train-00000.bin", "train", tokens.size, 1, len(data), hashlib.sha256(data).hexdigest())
    with pytest.raises(
        ShardFormatError, match=r"train-00000\.bin: vocab size 70000.*uint16.*spec\.data\.tokenizer"
    ):
        read_verified_shard(LocalStore(tmp_path), info, _manifest(info, 70_000, 0, "uint16"))


def test_tokenizer_config_from_spec_maps_every_field() -> None:
    """spec.data.tokenizer.train.* and spec.data.tokenizer.load.* reach the tokenizer stage."""
    from llmtrain.api.spec import TokenizerSpec

    train = TokenizerSpec.model_validate(
        {
            "train": {
                "vocabSize": 1234,
                "specialTokens": ["<|e|>", "<|p|>"],
                "minFrequency": 5,
                "sampleBytes": 4321,
            }
        }
    )
    assert TokenizerConfig.from_spec(train) == TokenizerConfig(1234, ("<|e|>", "<|p|>"), 5, 4321)
    assert TokenizerConfig.from_spec(train).eot_token == "<|e|>"
    load = TokenizerSpec.model_validate({"load": {"uri": "s3://b/t.json", "endOfText": "</s>"}})
    cfg = TokenizerConfig.from_spec(load)
    assert (cfg.load_uri, cfg.eot_token) == ("s3://b/t.json", "</s>")
