"""LoRA (spec.training.lora, spec.export.lora): adapters on a frozen base, their checkpoints,
exact resume, and both exports against transformers and peft."""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from llmtrain.runtime import lora as lora_mod
from llmtrain.runtime.checkpoint import Lineage
from llmtrain.runtime.export import (
    TokenizerFiles,
    export_checkpoint,
    read_checkpoint_weights,
    resolve_checkpoint,
)
from llmtrain.runtime.lora import LoraSettings, expected_trainable, load_model, merged_state, trainable_params
from llmtrain.runtime.synthetic import SyntheticLoader, tiny_spec_dict
from llmtrain.runtime.train import RunContext, TrainResult, build_model, train
from pydantic import ValidationError

from llmtrain.api.config import RuntimeConfig, runtime_config_from_spec
from llmtrain.api.spec import LLMTrainingJobSpec
from tests.unit.test_export import EOT, SAMPLE, stdlib_texts

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

VOCAB = 320  # the test_export tokenizer's vocabulary: exports of these runs load its tokenizer
LOADER = functools.partial(SyntheticLoader, vocab_size=VOCAB, windows=32)
LORA = {"rank": 4, "alpha": 8.0, "targets": ["attention.wq", "attention.wv", "feed_forward.w2"]}


def cfg_from(**overrides: Any) -> RuntimeConfig:
    spec = LLMTrainingJobSpec.model_validate(tiny_spec_dict(**overrides))
    return runtime_config_from_spec(spec, vocab_size=VOCAB)


def run(cfg: RuntimeConfig, **ctx: Any) -> TrainResult:
    return train(cfg, LOADER, ctx=RunContext(metrics_addr="127.0.0.1", **ctx))


def lora_cfg(base: Path, ckpt: Path | None, lora: dict[str, Any] = LORA, **over: Any) -> RuntimeConfig:
    return cfg_from(
        **{
            "model.init.random": None,
            "model.init.checkpoint": {"uri": str(base)},
            "training.lora": lora,
            "training.optimizer.lr": 0.01,
            **({"checkpoint.uri": str(ckpt)} if ckpt else {}),
            **over,
        }
    )


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A briefly trained full model: the frozen base of every LoRA run here."""
    root = tmp_path_factory.mktemp("base")
    run(cfg_from(**{"checkpoint.uri": str(root), "training.duration.maxSteps": 3}))
    return root


@pytest.fixture(scope="module")
def tok() -> TokenizerFiles:
    """test_export's tokenizer (vocabulary 320): the data pipeline's BPE on stdlib text."""
    from llmtrain.runtime.data.tokenize import TokenizerConfig, tokenizer_json, train_bpe

    bpe = train_bpe(stdlib_texts() + SAMPLE, TokenizerConfig(vocab_size=VOCAB, min_frequency=2))
    return TokenizerFiles.from_json_bytes(tokenizer_json(bpe), EOT)


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# ------------------------------------------------------------------------------ spec


def test_spec_validates_rank_alpha_targets_dropout() -> None:
    ok = LLMTrainingJobSpec.model_validate(
        tiny_spec_dict(
            **{"training.lora": {"rank": 2}, "model.init.random": None, "model.init.pretrained": {"uri": "m"}}
        )
    )
    assert ok.training.lora is not None and ok.training.lora.targets == ["attention.wq", "attention.wv"]
    for bad, says in [
        ({"rank": 0}, "rank"),
        ({"alpha": 0}, "alpha"),
        ({"dropout": 1.0}, "dropout"),
        ({"targets": []}, "targets"),
        ({"targets": ["q_proj"]}, "choose from attention.wq, attention.wk"),
    ]:
        with pytest.raises(ValidationError, match=says):
            LLMTrainingJobSpec.model_validate(tiny_spec_dict(**{"training.lora": bad}))
    # The runtime refuses a random base too (the CEL rule says it on the apiserver).
    with pytest.raises(ValueError, match=r"spec\.model\.init\.pretrained or \.checkpoint"):
        build_model(cfg_from(**{"training.lora": LORA}), torch.device("cpu"), False)


# -------------------------------------------------------------------------- training


def test_trainable_params_are_the_adapters_by_the_formula(base: Path) -> None:
    cfg = lora_cfg(base, None)
    model = build_model(cfg, torch.device("cpu"), False)
    m = cfg.model
    d, q, kv, f, r = m.d_model, m.n_heads * m.head_dim, m.n_kv_heads * m.head_dim, m.ffn_hidden_size, 4
    formula = m.n_layers * r * ((d + q) + (d + kv) + (f + d))  # wq, wv, w2: r·(in + out) each
    assert trainable_params(model) == formula == expected_trainable(m, LoraSettings.from_train(cfg.train))  # type: ignore[arg-type]
    assert formula < sum(p.numel() for p in model.parameters()) / 10
    # The adapted model starts as the base: B = 0.
    assert all(torch.count_nonzero(p) == 0 for n, p in model.named_parameters() if n.endswith("lora_B"))


def test_only_adapters_change_and_the_base_stays_bitwise(base: Path, tmp_path: Path) -> None:
    cfg = lora_cfg(base, tmp_path / "lora", **{"training.duration.maxSteps": 4})
    result = run(cfg, gather_weights=True)
    assert result.weights is not None
    before = read_checkpoint_weights(resolve_checkpoint(str(base)))
    changed = [n for n, w in result.weights.items() if n in before and not torch.equal(w, before[n])]
    assert changed == []  # negative control: apply_lora without freezing makes this fail
    adapters = {n: w for n, w in result.weights.items() if lora_mod.is_adapter(n)}
    assert len(adapters) == 2 * 2 * 3 and all(torch.count_nonzero(w) > 0 for w in adapters.values())


def test_lora_checkpoint_is_small_and_resumes_exactly(base: Path, tmp_path: Path) -> None:
    """Checkpoints hold adapters + their optimizer state; a resume equals the uninterrupted run."""
    over = {
        "training.duration.maxSteps": 8,
        "checkpoint.everySteps": 3,
        "checkpoint.keepLast": 5,
        "training.batch.microBatchSize": 1,  # accumulation 4
        "training.schedule.warmupSteps": 2,
    }
    dropout = {**LORA, "dropout": 0.1}
    cfg = lora_cfg(base, tmp_path / "lora", dropout, **over)
    whole = run(cfg)
    lineage = Lineage(str(tmp_path / "lora"), 5)
    lora_bytes = dir_bytes(tmp_path / "lora" / "step_00000003")
    full_bytes = dir_bytes(base / "step_00000003")
    assert lora_bytes * 3 < full_bytes, (lora_bytes, full_bytes)
    marker = lineage.info(3).meta
    assert marker["lora"]["rank"] == 4 and marker["lora"]["base"] == {
        "kind": "checkpoint",
        "uri": f"{base}/step_00000003",
    }
    for step in (6, 8):
        lineage.store.delete_dir(f"step_{step:08d}")
    resumed = run(cfg)
    assert resumed.resumed_from == 3 and resumed.steps == list(range(4, 9))
    assert resumed.losses == whole.losses[3:]  # bitwise
    for step in (6, 8):
        lineage.store.delete_dir(f"step_{step:08d}")
    no_rng = run(cfg, skip_rng_restore=True)  # negative control: adapter dropout masks differ
    assert no_rng.losses[0] != whole.losses[3]


# ---------------------------------------------------------------------------- export


@pytest.fixture(scope="module")
def lora_run(base: Path, tmp_path_factory: pytest.TempPathFactory, tok: TokenizerFiles) -> dict[str, Any]:
    """A LoRA run on an exported (HF Llama) base: init.pretrained, as users fine-tune."""
    root = tmp_path_factory.mktemp("lora-export")
    export_checkpoint(str(base), str(root / "base"), tok)
    cfg = cfg_from(
        **{
            "model.init.random": None,
            "model.init.pretrained": {"uri": str(root / "base")},
            "training.lora": {**LORA, "targets": ["attention.wq", "attention.wk", "feed_forward.w1"]},
            "training.optimizer.lr": 0.02,
            "training.duration.maxSteps": 4,
            "checkpoint.uri": str(root / "ckpt"),
        }
    )
    result = run(cfg, gather_weights=True)
    return {"root": root, "cfg": cfg, "result": result}


def test_merged_export_loads_in_transformers_and_equals_llmtrain_generate(
    lora_run: dict[str, Any],
    tok: TokenizerFiles,
) -> None:
    """`llmtrain generate` (the command) on the merged export, and on the adapter export merged on
    load, gives transformers' greedy tokens on the merged export."""
    import typer
    from llmtrain.runtime.generate import load_text_tokenizer
    from transformers import LlamaForCausalLM
    from typer.testing import CliRunner

    from llmtrain.cli.model import generate_cmd

    root, cfg = lora_run["root"], lora_run["cfg"]
    lora_mod.export_checkpoint(str(root / "ckpt"), str(root / "merged"), tok, lora_mode="merged")
    lora_mod.export_checkpoint(str(root / "ckpt"), str(root / "adapter-gen"), tok, lora_mode="adapter")
    ours = load_model(str(root / "merged"))
    s = LoraSettings.from_train(cfg.train)
    assert s is not None
    trained = merged_state(lora_run["result"].weights, s)
    assert all(torch.allclose(ours.state_dict()[k], v, atol=1e-6) for k, v in trained.items())
    hf = LlamaForCausalLM.from_pretrained(root / "merged", dtype=torch.float32).eval()
    prompt = "def add(a, b):"
    text_tok = load_text_tokenizer(str(root / "merged"))
    ids = text_tok.encode(prompt)
    with torch.no_grad():
        out = hf.generate(
            torch.tensor([ids]),
            do_sample=False,
            max_new_tokens=12,
            suppress_tokens=list(range(text_tok.vocab_size, cfg.model.vocab_size)),  # padding rows
        )
    expected = out[0, len(ids) :].tolist()
    app = typer.Typer()
    app.command("generate")(generate_cmd)
    app.command("export")(lambda: None)  # a second command: typer then keeps subcommand names
    for model in ("merged", "adapter-gen"):
        args = ["generate", "--model", str(root / model), "--prompt", prompt, "--temperature", "0"]
        r = CliRunner().invoke(app, [*args, "--max-tokens", "12", "--ids"])
        assert r.exit_code == 0, r.output
        assert json.loads(r.output) == {"prompt": ids, "new": expected}, model


def test_adapter_export_loads_with_peft_on_its_base_and_equals_merged(
    lora_run: dict[str, Any],
    tok: TokenizerFiles,
) -> None:
    from llmtrain.runtime.publish import resolve_export
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    root = lora_run["root"]
    lora_mod.export_checkpoint(str(root / "ckpt"), str(root / "adapter"), tok, lora_mode="adapter")
    lora_mod.export_checkpoint(str(root / "ckpt"), str(root / "merged2"), tok, lora_mode="merged")
    adapter_dir = Path(resolve_export(str(root / "adapter")).uri)
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == resolve_export(str(root / "base")).uri
    assert sorted(config["target_modules"]) == ["gate_proj", "k_proj", "q_proj"]
    assert dir_bytes(adapter_dir) * 5 < dir_bytes(Path(resolve_export(str(root / "merged2")).uri))

    base = LlamaForCausalLM.from_pretrained(config["base_model_name_or_path"], dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    merged = LlamaForCausalLM.from_pretrained(root / "merged2", dtype=torch.float32).eval()
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = peft_model(ids).logits, merged(ids).logits
        plain = LlamaForCausalLM.from_pretrained(config["base_model_name_or_path"], dtype=torch.float32)(
            ids
        ).logits
    assert torch.allclose(a, b, atol=1e-4)
    assert not torch.allclose(a, plain, atol=1e-3)  # the adapter does something
    # llmtrain generate/serve load the adapter export merged into its base.
    ours = load_model(str(root / "adapter"))
    with torch.no_grad():
        assert torch.allclose(ours(ids)[..., : b.shape[-1]], b, atol=1e-4)


def test_spec_export_lora_picks_adapter_or_merged(
    lora_run: dict[str, Any],
    tok: TokenizerFiles,
) -> None:
    """spec.export.lora, through the end-of-run export the driver calls."""
    from llmtrain.runtime.publish import resolve_export

    root = lora_run["root"]
    (root / "tokenizer.json").write_bytes(tok.json_bytes)
    for mode, has in [("adapter", "adapter_config.json"), ("merged", "model.safetensors")]:
        spec = LLMTrainingJobSpec.model_validate(
            tiny_spec_dict(
                **{
                    "data.outputUri": str(root / "tokenizer.json"),
                    "export": {"uri": str(root / f"spec-{mode}"), "lora": mode},
                }
            )
        )
        assert lora_mod.export_for_job(spec, str(root / "ckpt")) == str(root / f"spec-{mode}")
        published = resolve_export(str(root / f"spec-{mode}"))
        assert published.has(has) and not published.has(
            {"adapter": "model.safetensors"}.get(mode, "adapter_config.json")
        )


def test_lora_linear_is_the_base_plus_the_scaled_low_rank_update() -> None:
    """y = x·Wᵀ + (alpha/r)·x·Aᵀ·Bᵀ: alpha and rank set the update's scale (PEFT's convention)."""
    torch.manual_seed(0)
    s = LoraSettings(rank=2, alpha=6.0, targets=("attention.wq",))
    layer = lora_mod.LoraLinear(8, 5, s)
    for p in layer.parameters():
        torch.nn.init.normal_(p)
    x = torch.randn(3, 8)
    want = x @ layer.weight.T + 3.0 * (x @ layer.lora_A.T @ layer.lora_B.T)
    assert torch.allclose(layer(x), want, atol=1e-5)
    merged = lora_mod.merge(
        {"l.weight": layer.weight}, {"l.lora_A": layer.lora_A, "l.lora_B": layer.lora_B}, s
    )
    assert torch.allclose(x @ merged["l.weight"].T, want, atol=1e-5)


def test_lora_under_fsdp2_equals_one_process_and_resumes(base: Path, tmp_path: Path) -> None:
    """2 gloo ranks, FSDP2 (frozen base + adapters in each block's unit): the losses and adapters
    of one process, the base untouched; its sharded adapter checkpoint resumes exactly."""
    from llmtrain.runtime.synthetic import run_ranks, train_worker

    over = {"training.duration.maxSteps": 4, "checkpoint.everySteps": 2, "checkpoint.keepLast": 5}
    single = train_worker(lora_cfg(base, None, **over).to_dict(), LOADER.keywords, {"gather_weights": True})
    two = lora_cfg(base, tmp_path / "fsdp", **over, **{"resources.workers": 2})
    loader = dict(LOADER.keywords)
    fsdp = run_ranks(2, train_worker, two.to_dict(), loader, {"gather_weights": True})[0]
    assert fsdp.losses == pytest.approx(single.losses, rel=1e-5, abs=0)
    for name, w in single.weights.items():
        torch.testing.assert_close(fsdp.weights[name], w, rtol=1e-5, atol=2e-6, msg=name)
    before = read_checkpoint_weights(resolve_checkpoint(str(base)))
    assert all(torch.equal(fsdp.weights[n], w) for n, w in before.items())
    Lineage(str(tmp_path / "fsdp"), 5).store.delete_dir("step_00000004")
    resumed = run_ranks(2, train_worker, two.to_dict(), loader, {})[0]
    assert resumed.resumed_from == 2 and resumed.losses == fsdp.losses[2:]


def test_export_command_lora_flag_writes_the_adapter(lora_run: dict[str, Any], tok: TokenizerFiles) -> None:
    """`llmtrain export --lora adapter` on a LoRA checkpoint; without it, merged."""
    import typer
    from llmtrain.runtime.publish import resolve_export
    from typer.testing import CliRunner

    from llmtrain.cli.model import export_cmd

    root = lora_run["root"]
    (root / "tok.json").write_bytes(tok.json_bytes)
    app = typer.Typer()
    app.command("export")(export_cmd)
    app.command("generate")(lambda: None)  # a second command: typer then keeps subcommand names
    for flag, has in [(["--lora", "adapter"], "adapter_config.json"), ([], "model.safetensors")]:
        out = root / f"cli-{has}"
        args = [
            "export",
            "--checkpoint",
            str(root / "ckpt"),
            "--out",
            str(out),
            "--tokenizer",
            str(root / "tok.json"),
        ]
        r = CliRunner().invoke(app, [*args, *flag])
        assert r.exit_code == 0, r.output
        assert resolve_export(str(out)).has(has)
    bad = CliRunner().invoke(app, [*args, "--lora", "both"])
    assert bad.exit_code != 0 and "merged, adapter" in bad.output
