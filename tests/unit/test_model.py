"""The model: shapes, cost model (params, FLOPs, MFU) and every architecture/init spec field."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from llmtrain.runtime.model import GPT, apply_rope, param_count, peak_flops
from llmtrain.runtime.synthetic import tiny_spec_dict

from llmtrain.api.config import ModelConfig, runtime_config_from_spec
from llmtrain.api.spec import LLMTrainingJobSpec

# Hand-checked configurations (see test_flops_per_token_by_hand for the arithmetic).
CFG_A = ModelConfig(
    vocab_size=64, n_layers=2, d_model=32, n_heads=4, n_kv_heads=4, context_length=16, ffn_hidden_size=96
)
CFG_B = ModelConfig(
    vocab_size=128,
    n_layers=3,
    d_model=64,
    n_heads=8,
    n_kv_heads=2,
    context_length=32,
    ffn_hidden_size=160,
    tie_embeddings=True,
)


def build(cfg: ModelConfig, **kw: bool) -> GPT:
    torch.manual_seed(123)  # init_weights must not depend on this
    model = GPT(cfg, **kw)
    model.init_weights()
    return model


def model_cfg(**overrides: object) -> ModelConfig:
    spec = LLMTrainingJobSpec.model_validate(tiny_spec_dict(**overrides))
    return runtime_config_from_spec(spec, vocab_size=60).model


def logits_of(cfg: ModelConfig, tokens: torch.Tensor) -> torch.Tensor:
    model = build(cfg).eval()
    with torch.no_grad():
        return model(tokens)


TOKENS = torch.randint(0, 60, (2, 16), generator=torch.Generator().manual_seed(0))


def test_forward_shapes_and_causality() -> None:
    model = build(CFG_A).eval()
    tokens = torch.randint(0, 64, (2, 16))
    logits = model(tokens)
    assert logits.shape == (2, 16, 64)
    changed = tokens.clone()
    changed[:, 10] = (changed[:, 10] + 1) % 64
    again = model(changed)
    torch.testing.assert_close(again[:, :10], logits[:, :10])  # the past never sees the future
    assert not torch.allclose(again[:, 10:], logits[:, 10:])


def test_param_count_closed_form() -> None:
    for cfg in (CFG_A, CFG_B, dataclasses.replace(CFG_B, tie_embeddings=False)):
        assert build(cfg).num_params() == param_count(cfg)
    # By hand, CFG_A: block = attn 4·32² + ffn 3·32·96 + 2·32 norms = 13376;
    # 2 blocks + final norm 32 + embedding 64·32 + untied head 64·32 = 30880.
    assert param_count(CFG_A) == 30880


def test_flops_per_token_by_hand() -> None:
    # CFG_A, untied: N without embedding = 30880 − 2048 = 28832; 6·N + 12·L·d·T
    # = 172992 + 12·2·32·16 = 172992 + 12288.
    assert build(CFG_A).flops_per_token() == 185280
    # CFG_B, tied, GQA (head_dim 8, 2 kv heads): block = 64·64 + 2·64·16 + 64·64 + 3·64·160 + 128
    # = 41088; N = 3·41088 + 64 + 128·64 (tied table counted once) = 131520;
    # 6·N + 12·3·64·32 = 789120 + 73728.
    assert build(CFG_B).flops_per_token() == 862848


def test_estimate_mfu_peak_table_and_cpu_null() -> None:
    model = build(CFG_A)
    f = model.flops_per_token()
    assert model.estimate_mfu(1e6, "cpu") is None
    assert model.estimate_mfu(1e6, None) is None
    assert model.estimate_mfu(1e6, "NVIDIA GeForce RTX 4090") is None  # unknown: no guessed peak
    assert model.estimate_mfu(1e6, "NVIDIA H100 80GB HBM3") == pytest.approx(f * 1e6 / 989e12)
    assert model.estimate_mfu(1e6, "NVIDIA H100 PCIe") == pytest.approx(f * 1e6 / 756e12)
    assert peak_flops("NVIDIA H100 SXM5") == 989e12
    assert peak_flops("NVIDIA H200") == 989e12
    assert peak_flops("NVIDIA A100-SXM4-80GB") == 312e12


def test_gqa_matches_repeated_kv_heads() -> None:
    """enable_gqa must equal explicitly repeating each kv head over its query-head group."""
    model = build(CFG_B).eval()
    attn, rope = model.layers[0].attention, model.rope
    x = torch.randn(2, 32, 64)
    B, T, _ = x.shape
    q = apply_rope(attn.wq(x).view(B, T, 8, 8).transpose(1, 2), rope)
    k = apply_rope(attn.wk(x).view(B, T, 2, 8).transpose(1, 2), rope).repeat_interleave(4, dim=1)
    v = attn.wv(x).view(B, T, 2, 8).transpose(1, 2).repeat_interleave(4, dim=1)
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    expected = attn.wo(y.transpose(1, 2).reshape(B, T, 64))
    torch.testing.assert_close(attn(x, rope), expected)


def test_architecture_shape_fields() -> None:
    base = model_cfg()
    model = build(base)
    assert len(model.layers) == 2  # layers
    assert model.tok_embeddings.weight.shape == (64, 32)  # dModel, vocab 60 padded to vocabMultipleOf 64
    assert model_cfg(**{"model.architecture.vocabMultipleOf": 8}).vocab_size == 64
    assert model_cfg(**{"model.architecture.vocabMultipleOf": 7}).vocab_size == 63
    assert len(build(model_cfg(**{"model.architecture.layers": 3})).layers) == 3
    wide = build(model_cfg(**{"model.architecture.dModel": 48, "model.architecture.heads": 6}))
    assert wide.layers[0].attention.wq.weight.shape == (48, 48) and wide.layers[0].attention.n_heads == 6
    gqa = build(model_cfg(**{"model.architecture.kvHeads": 2}))
    assert gqa.layers[0].attention.wk.weight.shape == (16, 32)  # 2 kv heads × head_dim 8
    ctx = build(model_cfg(**{"model.architecture.contextLength": 24}))
    assert ctx.rope.shape == (2, 24, 8) and ctx(torch.zeros(1, 24, dtype=torch.long)).shape == (1, 24, 64)
    # SwiGLU hidden size: explicit, or multipleOf·ceil(ffnDimMultiplier·int(8·d/3) / multipleOf).
    assert base.ffn_hidden_size == 96  # int(8·32/3) = 85 → 96 (multipleOf 16)
    assert model_cfg(**{"model.architecture.multipleOf": 32}).ffn_hidden_size == 96
    assert model_cfg(**{"model.architecture.multipleOf": 64}).ffn_hidden_size == 128
    assert model_cfg(**{"model.architecture.ffnDimMultiplier": 1.5}).ffn_hidden_size == 128  # 127 → 128
    explicit = build(model_cfg(**{"model.architecture.ffnHiddenSize": 40}))
    assert explicit.layers[0].feed_forward.w1.weight.shape == (40, 32)


def test_tie_embeddings_shares_the_table() -> None:
    tied = build(model_cfg(**{"model.architecture.tieEmbeddings": True}))
    assert tied.output.weight is tied.tok_embeddings.weight
    untied = build(model_cfg())
    assert untied.output.weight is not untied.tok_embeddings.weight
    assert untied.num_params() - tied.num_params() == 64 * 32


def test_rope_theta_and_norm_eps_change_logits() -> None:
    base = logits_of(model_cfg(), TOKENS)
    assert not torch.allclose(logits_of(model_cfg(**{"model.architecture.ropeTheta": 37.0}), TOKENS), base)
    assert not torch.allclose(logits_of(model_cfg(**{"model.architecture.normEps": 0.05}), TOKENS), base)
    torch.testing.assert_close(logits_of(model_cfg(), TOKENS), base)  # deterministic otherwise


def test_dropout_active_only_in_training() -> None:
    model = build(model_cfg(**{"model.architecture.dropout": 0.3}))
    model.train()
    assert not torch.allclose(model(TOKENS), model(TOKENS))
    model.eval()
    torch.testing.assert_close(model(TOKENS), model(TOKENS))
    no_dropout = build(model_cfg()).train()
    torch.testing.assert_close(no_dropout(TOKENS), no_dropout(TOKENS))


def test_init_seed_and_std() -> None:
    a = build(model_cfg())
    b = build(model_cfg())
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb), name
    other = build(model_cfg(**{"model.init.random.seed": 1}))
    assert not torch.equal(other.layers[0].attention.wq.weight, a.layers[0].attention.wq.weight)
    wide = build(model_cfg(**{"model.init.random.std": 0.2}))
    assert wide.tok_embeddings.weight.std().item() == pytest.approx(0.2, rel=0.1)
    assert a.tok_embeddings.weight.std().item() == pytest.approx(0.02, rel=0.1)
    # Residual output projections are scaled by 1/√(2·layers); norms start at one.
    assert a.layers[0].attention.wo.weight.std().item() == pytest.approx(0.02 / 2, rel=0.15)
    assert torch.equal(a.norm.weight, torch.ones(32))


def test_meta_device_build_matches_eager_build() -> None:
    eager = build(CFG_B)
    with torch.device("meta"):
        meta = GPT(CFG_B)
    meta.materialize("cpu")
    assert meta.output.weight is meta.tok_embeddings.weight  # still tied
    for (name, p), q in zip(eager.state_dict().items(), meta.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    torch.testing.assert_close(meta.rope, eager.rope)  # non-persistent buffer recomputed


def test_activation_checkpointing_recomputes_with_same_gradients() -> None:
    calls = {"n": 0}

    def count(*_: object) -> None:
        calls["n"] += 1

    grads = []
    for ac in (False, True):
        model = build(CFG_A, activation_checkpointing=ac)
        model.layers[0].register_forward_pre_hook(count)
        calls["n"] = 0
        model(TOKENS.clamp(max=63)).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        assert calls["n"] == (2 if ac else 1)  # recomputed once in backward
    for g0, g1 in zip(*grads, strict=True):
        torch.testing.assert_close(g0, g1)
