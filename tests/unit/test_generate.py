"""Sampling (temperature, top-k, top-p, max tokens, seed), greedy decoding against HF generate,
and the ``llmtrain generate`` / ``llmtrain export`` commands."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
import typer
from llmtrain.runtime.export import TokenizerFiles
from llmtrain.runtime.generate import Sampling, filter_logits, generate, load_text_tokenizer
from llmtrain.runtime.hf_import import load_pretrained_model
from torch import Tensor, nn
from typer.testing import CliRunner

from llmtrain.api.config import ModelConfig
from llmtrain.cli.model import export_cmd, generate_cmd
from tests.unit.test_export import export_gpt, hf_model, model_config, random_gpt, tokenizer  # noqa: F401

os.environ.setdefault("HF_HUB_OFFLINE", "1")
PROMPT = "It is a truth universally acknowledged, that"


def cli() -> typer.Typer:
    """The two commands as llmtrain.cli registers them."""
    app = typer.Typer()
    app.command("export")(export_cmd)
    app.command("generate")(generate_cmd)
    return app


# -------------------------------------------------------------- against transformers


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_greedy_20_tokens_equal_hf_generate(tmp_path: Path, tokenizer: TokenizerFiles, tied: bool) -> None:  # noqa: F811
    cfg = model_config(tokenizer, tied=tied)
    out = export_gpt(random_gpt(cfg, seed=5), tokenizer, tmp_path / "hf")
    tok = load_text_tokenizer(str(out))
    ids = tok.encode(PROMPT)
    hf = hf_model(out)
    with torch.no_grad():
        expected = hf.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=20)[
            0, len(ids) :
        ].tolist()
    assert len(expected) == 20  # no end-of-text within 20: the comparison covers all of them
    # Library call, on the model `llmtrain generate` builds from the directory.
    model = load_pretrained_model(str(out))
    s = Sampling(max_new_tokens=20, temperature=0, stop_ids=(tokenizer.eot_id,), vocab_limit=tok.vocab_size)
    assert generate(model, ids, s) == expected
    # The command line.
    r = CliRunner().invoke(
        cli(),
        [
            "generate",
            "--model",
            str(out),
            "--prompt",
            PROMPT,
            "--temperature",
            "0",
            "--max-tokens",
            "20",
            "--ids",
        ],
    )
    assert r.exit_code == 0, r.output
    assert json.loads(r.output) == {"prompt": ids, "new": expected}
    text = CliRunner().invoke(
        cli(),
        ["generate", "--model", str(out), "--prompt", PROMPT, "--temperature", "0", "--max-tokens", "20"],
    )
    assert text.exit_code == 0 and text.output.startswith(PROMPT)


@pytest.mark.parametrize(
    ("top_k", "top_p"), [(1, 1.0), (5, 1.0), (None, 0.5), (None, 0.9), (7, 0.8), (None, 1.0)]
)
def test_filters_equal_hf_warpers(top_k: int | None, top_p: float) -> None:
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0)) * 3
    expected = logits.clone()
    if top_k is not None:
        expected = TopKLogitsWarper(top_k)(None, expected)
    if top_p < 1:
        expected = TopPLogitsWarper(top_p)(None, expected)
    ours = filter_logits(logits, top_k, top_p)
    assert torch.equal(ours.isinf(), expected.isinf())
    kept = ~ours.isinf()
    assert torch.equal(ours[kept], logits[kept])
    if top_k is not None:
        assert (kept.sum(-1) <= top_k).all()


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    logits = torch.tensor([0.5, 0.3, 0.2]).log()
    assert (~filter_logits(logits, None, 0.5).isinf()).tolist() == [True, False, False]
    assert (~filter_logits(logits, None, 0.6).isinf()).tolist() == [True, True, False]
    assert (~filter_logits(logits, None, 0.81).isinf()).tolist() == [True, True, True]
    assert (~filter_logits(logits, 2, 1.0).isinf()).tolist() == [True, True, False]


# ------------------------------------------------------------------- a scripted model


class Scripted(nn.Module):
    """Logits fixed per call: a categorical distribution, independent of the input."""

    def __init__(self, probs: list[float], context_length: int = 8) -> None:
        super().__init__()
        self.cfg = ModelConfig(
            vocab_size=len(probs),
            n_layers=1,
            d_model=2,
            n_heads=1,
            n_kv_heads=1,
            context_length=context_length,
            ffn_hidden_size=2,
        )
        self.logits = nn.Parameter(torch.tensor(probs).log(), requires_grad=False)
        self.seen: list[int] = []

    def forward(self, ids: Tensor) -> Tensor:
        self.seen.append(ids.shape[1])
        return self.logits.expand(ids.shape[0], ids.shape[1], -1)


def test_seed_temperature_and_frequencies() -> None:
    model = Scripted([0.1, 0.2, 0.3, 0.4])
    s = Sampling(max_new_tokens=2000, temperature=1.0, seed=7)
    a = generate(model, [0], s)
    assert a == generate(model, [0], s)  # same seed, same tokens
    assert a != generate(model, [0], Sampling(max_new_tokens=2000, temperature=1.0, seed=8))
    freq = torch.bincount(torch.tensor(a), minlength=4).float() / len(a)
    torch.testing.assert_close(freq, torch.tensor([0.1, 0.2, 0.3, 0.4]), atol=0.04, rtol=0)
    # temperature sharpens: p^(1/T) normalised; T=0.5 → [1, 4, 9, 16]/30
    cold = generate(model, [0], Sampling(max_new_tokens=2000, temperature=0.5, seed=7))
    freq = torch.bincount(torch.tensor(cold), minlength=4).float() / len(cold)
    torch.testing.assert_close(freq, torch.tensor([1.0, 4.0, 9.0, 16.0]) / 30, atol=0.04, rtol=0)
    # greedy ignores the seed
    assert generate(model, [0], Sampling(max_new_tokens=5, temperature=0, seed=1)) == [3] * 5
    assert generate(model, [0], Sampling(max_new_tokens=5, temperature=0, seed=2)) == [3] * 5


def test_top_k_top_p_restrict_the_samples() -> None:
    model = Scripted([0.1, 0.2, 0.3, 0.4])
    k2 = set(generate(model, [0], Sampling(max_new_tokens=300, top_k=2, seed=0)))
    assert k2 == {2, 3}
    p = set(generate(model, [0], Sampling(max_new_tokens=300, top_p=0.65, seed=0)))
    assert p == {2, 3}  # 0.4 + 0.3 ≥ 0.65
    assert set(generate(model, [0], Sampling(max_new_tokens=300, top_p=0.3, seed=0))) == {3}


def test_max_tokens_stop_ids_vocab_limit_and_context_window() -> None:
    model = Scripted([0.1, 0.2, 0.3, 0.4], context_length=8)
    assert generate(model, [1, 2], Sampling(max_new_tokens=0)) == []
    assert len(generate(model, [1], Sampling(max_new_tokens=17, temperature=0))) == 17
    assert model.seen[-1] == 8  # the window never exceeds contextLength
    assert generate(model, [1], Sampling(max_new_tokens=10, temperature=0, stop_ids=(3,))) == [3]
    # The padding rows (ids ≥ vocab_limit) are never produced, even when most likely.
    limited = generate(model, [1], Sampling(max_new_tokens=200, vocab_limit=3, seed=0))
    assert set(limited) == {0, 1, 2}
    assert generate(model, [1], Sampling(max_new_tokens=3, temperature=0, vocab_limit=3)) == [2, 2, 2]


def test_real_model_handles_prompts_longer_than_its_context(tokenizer: TokenizerFiles) -> None:  # noqa: F811
    model = random_gpt(model_config(tokenizer, tied=True, context_length=16))
    out = generate(model, list(range(40)), Sampling(max_new_tokens=5, temperature=0.7, top_k=10, seed=0))
    assert len(out) == 5


class Uncached(nn.Module):
    """The same GPT, seen by generate() as any other model: every step re-encodes the window."""

    def __init__(self, gpt: nn.Module) -> None:
        super().__init__()
        self.gpt, self.cfg = gpt, gpt.cfg

    def forward(self, ids: Tensor) -> Tensor:
        return self.gpt(ids)


def test_kv_cache_decodes_exactly_what_the_full_window_does(tokenizer: TokenizerFiles) -> None:  # noqa: F811
    """Cached decoding = re-encoding the window: logits per step, and tokens across the slide."""
    from llmtrain.runtime.model import KVCache

    cfg = model_config(tokenizer, tied=False, context_length=16)  # GQA: 4 query, 2 kv heads
    gpt = random_gpt(cfg)
    seq = torch.randint(0, cfg.vocab_size, (1, 16), generator=torch.Generator().manual_seed(3))
    kv = KVCache(cfg.n_layers, cfg.context_length)
    with torch.no_grad():
        steps = [gpt(seq[:, :5], kv=kv)[0, -1]] + [gpt(seq[:, t : t + 1], kv=kv)[0, -1] for t in range(5, 16)]
        full = gpt(seq)[0, 4:]
    torch.testing.assert_close(torch.stack(steps), full, atol=1e-5, rtol=1e-5)
    assert kv.length == 16
    with pytest.raises(ValueError, match="exceed contextLength"):
        gpt(seq[:, :1], kv=kv)
    started = KVCache(cfg.n_layers, cfg.context_length)
    with torch.no_grad():
        gpt(seq[:, :3], kv=started)
        with pytest.raises(ValueError, match="one token per call"):
            gpt(seq[:, 3:5], kv=started)
    # Prompt 5 + 30 new tokens crosses contextLength 16: the cache hands over to the sliding window.
    for s in (
        Sampling(max_new_tokens=30, temperature=0),
        Sampling(max_new_tokens=30, temperature=0.9, seed=4),
    ):
        assert generate(gpt, seq[0, :5].tolist(), s) == generate(Uncached(gpt), seq[0, :5].tolist(), s)


@pytest.mark.parametrize(
    ("kwargs", "flag"),
    [
        ({"temperature": -0.1}, "--temperature"),
        ({"top_k": 0}, "--top-k"),
        ({"top_p": 0.0}, "--top-p"),
        ({"top_p": 1.5}, "--top-p"),
        ({"max_new_tokens": -1}, "--max-tokens"),
    ],
)
def test_bad_sampling_settings_name_the_flag(kwargs: dict[str, Any], flag: str) -> None:
    with pytest.raises(ValueError, match=flag):
        Sampling(**kwargs)


def test_empty_prompt_and_cli_errors(tmp_path: Path, tokenizer: TokenizerFiles) -> None:  # noqa: F811
    with pytest.raises(ValueError, match="--prompt"):
        generate(Scripted([0.5, 0.5]), [], Sampling())
    r = CliRunner().invoke(cli(), ["generate", "--model", str(tmp_path / "none"), "--prompt", "x"])
    assert r.exit_code == 1 and "tokenizer.json" in r.output
    out = export_gpt(random_gpt(model_config(tokenizer, tied=True)), tokenizer, tmp_path / "hf")
    r = CliRunner().invoke(cli(), ["generate", "--model", str(out), "--prompt", "x", "--top-p", "2"])
    assert r.exit_code == 1 and "--top-p" in r.output
    r = CliRunner().invoke(cli(), ["generate", "--model", str(out), "--prompt", "x", "--device", "gpu7"])
    assert r.exit_code == 1 and "--device" in r.output
    if not torch.cuda.is_available():
        r = CliRunner().invoke(cli(), ["generate", "--model", str(out), "--prompt", "x", "--device", "cuda"])
        assert r.exit_code == 1 and "no CUDA device" in r.output
