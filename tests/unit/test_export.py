"""Export/import against Hugging Face transformers' LlamaForCausalLM (fp32, atol 1e-4).

The configuration is pinned so that each wrong mapping fails: heads 4 with kvHeads 2, ropeTheta
50000, 48 positions compared (position 0 is blind to RoPE errors), random non-zero weights
everywhere (norms included, so swapped norms show), tied and untied, a padded vocabulary.
"""

from __future__ import annotations

import json
import os
import sysconfig
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import pytest
import torch
from llmtrain.runtime import export as export_mod
from llmtrain.runtime.export import (
    ExportError,
    TokenizerFiles,
    expected_shapes,
    export_model,
    hf_name_map,
    to_hf_state_dict,
)
from llmtrain.runtime.hf_import import (
    ModelImportError,
    check_compatible,
    from_hf_state_dict,
    load_initial_weights,
    load_pretrained_model,
    read_pretrained,
)
from llmtrain.runtime.model import GPT
from llmtrain.runtime.publish import ExportCorrupt

from llmtrain.api.config import ModelConfig, RuntimeConfig, pad_vocab

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

ATOL = 1e-4
InitKind = Literal["random", "checkpoint", "pretrained"]
SEQ = 48
EOT = "<|endoftext|>"
SAMPLE = [
    "It is a truth universally acknowledged, that a single man in possession of a good fortune,\n"
    "must be in want of a wife.",
    "a literal <|endoftext|> inside a document stays text",
    "<|endoftext|>",
    "   three leading spaces\tand a tab, windows\r\nline endings, émigré naïve 日本語 🦙",
]


def stdlib_texts(n: int = 40) -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for path in sorted(root.glob("*.py"))[:n]:
        out.append(path.read_text(encoding="utf-8", errors="replace"))
    return out


@pytest.fixture(scope="session")
def tokenizer() -> TokenizerFiles:
    """A byte-level BPE trained by the data pipeline's own code (special token first)."""
    from llmtrain.runtime.data.tokenize import TokenizerConfig, tokenizer_json, train_bpe

    tok = train_bpe(stdlib_texts() + SAMPLE, TokenizerConfig(vocab_size=320, min_frequency=2))
    return TokenizerFiles.from_json_bytes(tokenizer_json(tok), EOT)


def model_config(tok: TokenizerFiles, *, tied: bool, **over: Any) -> ModelConfig:
    base = ModelConfig(
        vocab_size=pad_vocab(tok.vocab_size, 128),  # padded: 320 → 384
        n_layers=2,
        d_model=64,
        n_heads=4,
        n_kv_heads=2,
        context_length=64,
        ffn_hidden_size=96,
        rope_theta=50_000.0,
        norm_eps=1e-5,
        tie_embeddings=tied,
    )
    return replace(base, **over)


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Non-zero weights with distinct values everywhere, norms too (ones would hide swaps)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g)
        p.copy_(1.0 + 0.2 * noise if name.endswith("norm.weight") else 0.08 * noise)


def random_gpt(cfg: ModelConfig, seed: int = 0) -> GPT:
    model = GPT(cfg)
    randomize(model, seed)
    return model.eval()


def tokens(cfg: ModelConfig, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (2, SEQ), generator=torch.Generator().manual_seed(seed))


def hf_model(path: Path) -> Any:
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def hf_logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(path)(ids).logits


def export_gpt(model: GPT, tok: TokenizerFiles, out: Path) -> Path:
    export_model(model.state_dict(), model.cfg, str(out), tok)
    return out


# ---------------------------------------------------------------------- our → HF


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_exported_logits_equal_llama_for_causal_lm(
    tmp_path: Path, tokenizer: TokenizerFiles, tied: bool
) -> None:
    cfg = model_config(tokenizer, tied=tied)
    model = random_gpt(cfg)
    out = export_gpt(model, tokenizer, tmp_path / "hf")
    ids = tokens(cfg)
    with torch.no_grad():
        ours = model(ids)
    theirs = hf_logits(out, ids)
    assert ours.shape == theirs.shape == (2, SEQ, cfg.vocab_size)
    torch.testing.assert_close(theirs, ours, atol=ATOL, rtol=0)  # every position


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_export_files_and_conventions(tmp_path: Path, tokenizer: TokenizerFiles, tied: bool) -> None:
    from safetensors import safe_open

    cfg = model_config(tokenizer, tied=tied)
    out = export_gpt(random_gpt(cfg), tokenizer, tmp_path / "hf")
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "generation_config.json",
        "llmtrain-export.json",
        "model.safetensors",
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    manifest = json.loads((out / "llmtrain-export.json").read_text())
    assert set(manifest["files"]) == {p.name for p in out.iterdir()} - {"llmtrain-export.json"}
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["rope_parameters"] == {"rope_type": "default", "rope_theta": 50_000.0}
    assert config["rope_theta"] == 50_000.0
    assert config["vocab_size"] == 384 and tokenizer.vocab_size == 320  # padded table
    assert config["intermediate_size"] == 96 and config["num_key_value_heads"] == 2
    assert config["tie_word_embeddings"] is tied
    assert config["attention_bias"] is False and config["mlp_bias"] is False
    assert config["eos_token_id"] == tokenizer.eot_id and config["bos_token_id"] is None
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert f.metadata() == {"format": "pt"}
    assert ("lm_head.weight" in keys) is not tied
    assert len(keys) == 2 + 9 * cfg.n_layers + (0 if tied else 1)
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == tokenizer.eot_id
    assert gen["suppress_tokens"] == list(range(320, 384))  # padding rows never generated
    tcfg = json.loads((out / "tokenizer_config.json").read_text())
    assert tcfg["tokenizer_class"] == "PreTrainedTokenizerFast" and tcfg["bos_token"] is None
    assert (out / "tokenizer.json").read_bytes() == tokenizer.json_bytes


def test_negative_control_gate_up_swapped_fails(
    tmp_path: Path, tokenizer: TokenizerFiles, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Plant the bug: w1 (inside SiLU) exported as up_proj and w3 as gate_proj."""
    swapped = tuple(
        (
            ours,
            {"mlp.gate_proj.weight": "mlp.up_proj.weight", "mlp.up_proj.weight": "mlp.gate_proj.weight"}.get(
                hf, hf
            ),
        )
        for ours, hf in export_mod._LAYER_MAP
    )
    monkeypatch.setattr(export_mod, "_LAYER_MAP", swapped)
    cfg = model_config(tokenizer, tied=False)
    model = random_gpt(cfg)
    out = export_gpt(model, tokenizer, tmp_path / "bad")
    ids = tokens(cfg)
    with torch.no_grad():
        diff = (hf_logits(out, ids) - model(ids)).abs().max().item()
    assert diff > 100 * ATOL


def test_negative_control_interleaved_rope_permutation_fails(
    tmp_path: Path, tokenizer: TokenizerFiles
) -> None:
    """Our RoPE already rotates halves: applying the interleaved→halves q/k permutation breaks it,
    and only from position 1 on (position 0 is unrotated): the test must compare every position."""
    cfg = model_config(tokenizer, tied=False)
    model = random_gpt(cfg)
    sd = dict(model.state_dict())

    def permute(w: torch.Tensor, n: int) -> torch.Tensor:  # HF's convert_llama_weights_to_hf permute
        d_in = w.shape[1]
        return w.view(n, w.shape[0] // n // 2, 2, d_in).transpose(1, 2).reshape(w.shape)

    for i in range(cfg.n_layers):
        sd[f"layers.{i}.attention.wq.weight"] = permute(sd[f"layers.{i}.attention.wq.weight"], cfg.n_heads)
        sd[f"layers.{i}.attention.wk.weight"] = permute(sd[f"layers.{i}.attention.wk.weight"], cfg.n_kv_heads)
    export_model(sd, cfg, str(tmp_path / "bad"), tokenizer)
    ids = tokens(cfg)
    with torch.no_grad():
        diff = (hf_logits(tmp_path / "bad", ids) - model(ids)).abs()
    assert diff[:, 0].max() < ATOL  # position 0 cannot see it
    assert diff[:, 1:].max() > 100 * ATOL


def test_auto_tokenizer_encodes_like_the_data_pipeline(tmp_path: Path, tokenizer: TokenizerFiles) -> None:
    from llmtrain.runtime.data.tokenize import encode_documents
    from llmtrain.runtime.generate import load_text_tokenizer
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    out = export_gpt(random_gpt(model_config(tokenizer, tied=True)), tokenizer, tmp_path / "hf")
    hf_tok = AutoTokenizer.from_pretrained(out)
    ours = Tokenizer.from_str(tokenizer.json_bytes.decode())
    cli_tok = load_text_tokenizer(str(out))
    pipeline = encode_documents(ours, SAMPLE, tokenizer.eot_id)
    for text, ids in zip(SAMPLE, pipeline, strict=True):
        expected = ids[:-1].tolist()  # the pipeline appends the end-of-text id by id
        assert hf_tok.encode(text, split_special_tokens=True) == expected
        if EOT not in text:
            assert hf_tok.encode(text) == expected
            assert cli_tok.encode(text) == expected
        assert hf_tok.decode(expected) == text
    # The export leaves split_special_tokens off so that the chat template's end-of-text is the
    # id (runtime/export.py's docstring): a literal one in plain text is then the token too.
    assert tokenizer.eot_id in hf_tok.encode(SAMPLE[1]) and tokenizer.eot_id in cli_tok.encode(SAMPLE[1])
    assert hf_tok.eos_token_id == tokenizer.eot_id and hf_tok.bos_token is None


# ---------------------------------------------------------------------- HF → our


def hf_random_llama(cfg: ModelConfig, seed: int = 3) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.ffn_hidden_size,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        max_position_embeddings=cfg.context_length,
        rms_norm_eps=cfg.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        tie_word_embeddings=cfg.tie_embeddings,
    )
    model = LlamaForCausalLM(config)
    randomize(model, seed)
    return model.eval()


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_save_pretrained_llama_imports_with_identical_logits(
    tmp_path: Path, tokenizer: TokenizerFiles, tied: bool
) -> None:
    cfg = model_config(tokenizer, tied=tied)
    hf = hf_random_llama(cfg)
    hf.save_pretrained(tmp_path / "llama")
    ids = tokens(cfg)
    with torch.no_grad():
        expected = hf(ids).logits
    # As `llmtrain generate` builds it: from the directory's own config.
    standalone = load_pretrained_model(str(tmp_path / "llama"))
    assert standalone.cfg.tie_embeddings is tied and standalone.cfg.rope_theta == 50_000.0
    with torch.no_grad():
        torch.testing.assert_close(standalone(ids), expected, atol=ATOL, rtol=0)
    # As fine-tuning does: into a model built from the run's config, after its random init.
    model = GPT(cfg)
    model.init_weights()
    rc = _runtime_config(cfg, "pretrained", str(tmp_path / "llama"))
    load_initial_weights(model, rc)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(ids), expected, atol=ATOL, rtol=0)


def _runtime_config(cfg: ModelConfig, kind: InitKind, uri: str) -> RuntimeConfig:
    from llmtrain.api.config import OptimizerConfig, ScheduleConfig, TrainConfig

    train = TrainConfig(
        global_batch_size=2,
        micro_batch_size=2,
        world_size=1,
        max_steps=1,
        init_kind=kind,
        init_uri=uri,
    )
    return RuntimeConfig(model=cfg, optimizer=OptimizerConfig(), schedule=ScheduleConfig(), train=train)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_export_import_round_trip_is_identical(tmp_path: Path, tokenizer: TokenizerFiles, tied: bool) -> None:
    cfg = model_config(tokenizer, tied=tied)
    model = random_gpt(cfg)
    export_gpt(model, tokenizer, tmp_path / "hf")
    pre = read_pretrained(str(tmp_path / "hf"))
    check_compatible(pre, cfg)
    back = from_hf_state_dict(pre.tensors, cfg)
    params = dict(model.named_parameters())
    assert set(back) == set(params)
    for name, p in params.items():
        assert torch.equal(back[name], p.detach()), name


def test_hf_names_cover_every_parameter_and_shapes_match_the_model(tokenizer: TokenizerFiles) -> None:
    for tied in (False, True):
        cfg = model_config(tokenizer, tied=tied)
        model_shapes = {k: tuple(v.shape) for k, v in GPT(cfg).state_dict().items()}
        assert expected_shapes(cfg) == model_shapes
        names = hf_name_map(cfg)
        assert set(names) == {n for n, _ in GPT(cfg).named_parameters()}
        assert len(set(names.values())) == len(names)


# -------------------------------------------------------------------- bad input


def test_vocab_mismatch_names_both_shapes(tmp_path: Path, tokenizer: TokenizerFiles) -> None:
    small = model_config(tokenizer, tied=False, vocab_size=320)
    export_gpt(random_gpt(small), tokenizer, tmp_path / "hf")
    cfg = model_config(tokenizer, tied=False)
    model = GPT(cfg)
    with pytest.raises(ModelImportError) as e:
        load_initial_weights(model, _runtime_config(cfg, "pretrained", str(tmp_path / "hf")))
    msg = str(e.value)
    assert "vocab_size is 320" in msg and "gives 384" in msg and "[320, 64]" in msg and "[384, 64]" in msg


@pytest.mark.parametrize(
    ("over", "field"),
    [
        ({"n_kv_heads": 4}, "spec.model.architecture.kvHeads"),
        ({"n_layers": 3}, "spec.model.architecture.layers"),
        ({"ffn_hidden_size": 128}, "spec.model.architecture.ffnHiddenSize"),
        ({"rope_theta": 10_000.0}, "spec.model.architecture.ropeTheta"),
    ],
)
def test_architecture_mismatch_names_the_field(
    tmp_path: Path, tokenizer: TokenizerFiles, over: dict[str, Any], field: str
) -> None:
    export_gpt(random_gpt(model_config(tokenizer, tied=False)), tokenizer, tmp_path / "hf")
    pre = read_pretrained(str(tmp_path / "hf"))
    with pytest.raises(ModelImportError, match=field.replace(".", r"\.")):
        check_compatible(pre, model_config(tokenizer, tied=False, **over))


def test_untied_into_tied_is_refused_and_tied_into_untied_copies(
    tmp_path: Path, tokenizer: TokenizerFiles
) -> None:
    export_gpt(random_gpt(model_config(tokenizer, tied=False)), tokenizer, tmp_path / "untied")
    with pytest.raises(ModelImportError, match="tieEmbeddings"):
        check_compatible(read_pretrained(str(tmp_path / "untied")), model_config(tokenizer, tied=True))
    export_gpt(random_gpt(model_config(tokenizer, tied=True)), tokenizer, tmp_path / "tied")
    pre = read_pretrained(str(tmp_path / "tied"))
    back = from_hf_state_dict(pre.tensors, model_config(tokenizer, tied=False))
    assert torch.equal(back["output.weight"], back["tok_embeddings.weight"])


def test_export_refuses_wrong_shapes_format_and_untied_weights(
    tmp_path: Path, tokenizer: TokenizerFiles
) -> None:
    cfg = model_config(tokenizer, tied=False)
    sd = dict(random_gpt(cfg).state_dict())
    with pytest.raises(ExportError, match=r"spec\.export\.format"):
        export_model(sd, cfg, str(tmp_path / "a"), tokenizer, fmt="gguf")
    with pytest.raises(ExportError, match=r"\[384, 64\].*needs \[512, 64\]"):
        export_model(sd, replace(cfg, vocab_size=512), str(tmp_path / "b"), tokenizer)
    with pytest.raises(ExportError, match="tieEmbeddings"):
        to_hf_state_dict(sd, replace(cfg, tie_embeddings=True))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_import_refuses_other_architectures(tmp_path: Path, tokenizer: TokenizerFiles) -> None:
    from llmtrain.runtime.hf_import import model_config_from_hf

    cfg = model_config(tokenizer, tied=False)
    out = export_gpt(random_gpt(cfg), tokenizer, tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    for key, value, match in (
        ("model_type", "mistral", "model_type"),
        ("hidden_act", "gelu", "hidden_act"),
        ("attention_bias", True, "attention_bias"),
        ("rope_parameters", {"rope_type": "llama3", "rope_theta": 5e5}, "rope_type"),
    ):
        with pytest.raises(ModelImportError, match=match):
            model_config_from_hf({**config, key: value})
    (out / "model.safetensors").unlink()
    with pytest.raises(ExportCorrupt, match=r"model\.safetensors is in llmtrain-export\.json but missing"):
        read_pretrained(str(out))
    (out / "llmtrain-export.json").unlink()  # no longer ours: read as a save_pretrained directory
    with pytest.raises(ModelImportError, match="safetensors"):
        read_pretrained(str(out))
    with pytest.raises(ModelImportError, match=r"config\.json"):
        read_pretrained(str(tmp_path / "nothing"))


def test_bf16_export_loads_in_hf_and_imports(tmp_path: Path, tokenizer: TokenizerFiles) -> None:
    from safetensors import safe_open

    cfg = model_config(tokenizer, tied=False)
    model = random_gpt(cfg)
    export_model(model.state_dict(), cfg, str(tmp_path / "hf"), tokenizer, dtype="bfloat16")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["dtype"] == config["torch_dtype"] == "bfloat16"
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16
    pre = read_pretrained(str(tmp_path / "hf"))
    back = from_hf_state_dict(pre.tensors, cfg)
    for name, p in model.named_parameters():  # bf16 rounding only: relative error ≤ 2^-8
        assert back[name].dtype == torch.float32
        torch.testing.assert_close(back[name], p.detach(), rtol=2**-8, atol=0)
    with pytest.raises(ExportError, match="float8"):
        export_model(model.state_dict(), cfg, str(tmp_path / "x"), tokenizer, dtype="float8")


def test_sharded_save_pretrained_and_transformers_4_config_import(
    tmp_path: Path, tokenizer: TokenizerFiles
) -> None:
    from llmtrain.runtime.hf_import import model_config_from_hf

    cfg = model_config(tokenizer, tied=False)
    hf = hf_random_llama(cfg)
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    ids = tokens(cfg)
    with torch.no_grad():
        torch.testing.assert_close(
            load_pretrained_model(str(tmp_path / "sharded"))(ids), hf(ids).logits, atol=ATOL, rtol=0
        )
    # transformers 4.x wrote rope_theta at the top level and rope_scaling null.
    old = json.loads((tmp_path / "sharded" / "config.json").read_text())
    old.pop("rope_parameters", None)
    old.update(rope_theta=50_000.0, rope_scaling=None)
    assert model_config_from_hf(old).rope_theta == 50_000.0


def test_large_exports_are_sharded_like_save_pretrained(tmp_path: Path, tokenizer: TokenizerFiles) -> None:
    cfg = model_config(tokenizer, tied=True)
    model = random_gpt(cfg)
    written = export_model(model.state_dict(), cfg, str(tmp_path / "hf"), tokenizer, max_shard_bytes=40_000)
    shards = sorted(p.name for p in (tmp_path / "hf").glob("model-*.safetensors"))
    assert len(shards) > 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert not (tmp_path / "hf" / "model.safetensors").exists()
    assert written[: len(shards) + 1] == [*shards, "model.safetensors.index.json"]
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(hf_name_map(cfg).values())
    assert index["metadata"]["total_size"] == 4 * sum(p.numel() for p in model.parameters())
    ids = tokens(cfg)
    with torch.no_grad():
        ours = model(ids)
    torch.testing.assert_close(hf_logits(tmp_path / "hf", ids), ours, atol=ATOL, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(load_pretrained_model(str(tmp_path / "hf"))(ids), ours, atol=0, rtol=0)
