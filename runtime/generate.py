"""Autoregressive sampling: temperature, top-k, top-p, max tokens, seed; greedy at temperature 0.

The order of the logit transforms is Hugging Face's (temperature → top-k → top-p), so a
seeded run here and ``generate(do_sample=True)`` there differ only in the random stream,
and greedy decoding matches token for token (``tests/unit/test_generate.py``).

With our :class:`~llmtrain.runtime.model.GPT`, decoding keeps a :class:`KVCache`: the prompt
is encoded once, then each new token costs one position. Once the sequence outgrows
contextLength the window slides, every position's RoPE angle changes, and each step re-encodes
the newest contextLength tokens (as any other model passed in is run on every step).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from llmtrain.runtime.model import GPT, KVCache
from torch import Tensor, nn

from llmtrain.api.s3 import S3Options


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 100
    temperature: float = 1.0  # 0: greedy (argmax), seed and top-k/top-p ignored
    top_k: int | None = None  # keep the k most likely tokens
    top_p: float = 1.0  # keep the smallest set whose probability reaches top_p
    seed: int = 0
    stop_ids: tuple[int, ...] = ()  # generation ends after emitting one of these (end-of-text)
    vocab_limit: int | None = None  # ids ≥ this (padding rows of the table) are never sampled

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"max tokens must be ≥ 0, got {self.max_new_tokens} (--max-tokens)")
        if self.temperature < 0:
            raise ValueError(f"temperature must be ≥ 0, got {self.temperature} (--temperature)")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top-k must be ≥ 1, got {self.top_k} (--top-k)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top-p must be in (0, 1], got {self.top_p} (--top-p)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def filter_logits(logits: Tensor, top_k: int | None, top_p: float) -> Tensor:
    """Set to -inf every logit outside the top-k and outside the top-p nucleus ([V] or [B, V])."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens before it already reach top_p: the most likely one stays.
        drop_sorted = probs.cumsum(dim=-1) - probs >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def next_token(logits: Tensor, s: Sampling, generator: torch.Generator | None) -> int:
    """One token id from the last position's logits [V]."""
    logits = logits.float()
    if s.vocab_limit is not None and s.vocab_limit < logits.shape[-1]:
        logits[s.vocab_limit :] = float("-inf")
    if s.greedy:
        return int(logits.argmax())
    logits = filter_logits(logits / s.temperature, s.top_k, s.top_p)
    return int(torch.multinomial(logits.softmax(-1), 1, generator=generator))


@torch.no_grad()
def generate(model: nn.Module, prompt: list[int], s: Sampling) -> list[int]:
    """The new token ids after ``prompt`` (a stop id, if reached, is the last one returned).

    The model sees at most its contextLength newest tokens (RoPE tables end there).
    """
    if not prompt:
        raise ValueError("the prompt encodes to no tokens; generation needs at least one (--prompt)")
    context: int = model.cfg.context_length  # type: ignore[assignment,union-attr]
    device = next(model.parameters()).device
    generator = None if s.greedy else torch.Generator(device=device).manual_seed(s.seed)
    was_training = model.training
    model.eval()
    ids = torch.tensor([prompt], dtype=torch.long, device=device)
    kv = KVCache(len(model.layers), context) if isinstance(model, GPT) else None
    out: list[int] = []
    try:
        if s.max_new_tokens:
            window = ids[:, -context:]
            logits = (model(window) if kv is None else model(window, kv=kv))[0, -1]
        for _ in range(s.max_new_tokens):
            token = next_token(logits, s, generator)  # host sync: the loop needs the id to stop
            out.append(token)
            if token in s.stop_ids or len(out) == s.max_new_tokens:
                break
            new = torch.tensor([[token]], device=device)
            ids = torch.cat((ids, new), dim=1)
            if kv is not None and kv.length < context:
                logits = model(new, kv=kv)[0, -1]
            else:  # no cache, or the window slides: every position moves, re-encode it
                kv = None
                logits = model(ids[:, -context:])[0, -1]
    finally:
        model.train(was_training)
    return out


# ---------------------------------------------------------------------------- text


@dataclass(frozen=True)
class TextTokenizer:
    """An exported directory's tokenizer, encoding as ``AutoTokenizer.from_pretrained(dir)`` does."""

    tokenizer: object  # tokenizers.Tokenizer
    split_special_tokens: bool
    eos_id: int | None
    vocab_size: int

    def encode(self, text: str) -> list[int]:
        tok = self.tokenizer
        tok.encode_special_tokens = self.split_special_tokens  # type: ignore[attr-defined]
        return list(tok.encode(text, add_special_tokens=True).ids)  # type: ignore[attr-defined]

    def decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))  # type: ignore[attr-defined]


def load_text_tokenizer(uri: str, s3: S3Options | None = None) -> TextTokenizer:
    """tokenizer.json (+ tokenizer_config.json, generation_config.json) of a model directory."""
    import json

    from llmtrain.runtime.export import (
        GENERATION_CONFIG_NAME,
        TOKENIZER_CONFIG_NAME,
        TOKENIZER_NAME,
        ExportError,
    )
    from llmtrain.runtime.publish import resolve_export
    from tokenizers import Tokenizer

    # Only a published export, its files checked against its manifest (pass the URI that
    # resolve_export returned to read the weights of the same export).
    export = resolve_export(uri, s3)
    if not export.has(TOKENIZER_NAME):
        raise ExportError(
            f"{uri} has no {TOKENIZER_NAME}: --model must be a directory written by llmtrain export"
        )
    tok = Tokenizer.from_str(export.read(TOKENIZER_NAME).decode("utf-8"))
    config = json.loads(export.read(TOKENIZER_CONFIG_NAME)) if export.has(TOKENIZER_CONFIG_NAME) else {}
    gen = json.loads(export.read(GENERATION_CONFIG_NAME)) if export.has(GENERATION_CONFIG_NAME) else {}
    eos = gen.get("eos_token_id")
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    if eos is None and config.get("eos_token"):
        eos = tok.token_to_id(
            config["eos_token"] if isinstance(config["eos_token"], str) else config["eos_token"]["content"]
        )
    return TextTokenizer(
        tokenizer=tok,
        split_special_tokens=bool(config.get("split_special_tokens", False)),
        eos_id=None if eos is None else int(eos),
        vocab_size=int(max(tok.get_vocab(with_added_tokens=True).values()) + 1),
    )
