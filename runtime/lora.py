"""LoRA (``spec.training.lora``): low-rank adapters on a frozen base, and their export and load.

Training: each targeted projection (``attention.wq`` … ``feed_forward.w3``) becomes a
:class:`LoraLinear`, ``y = x·Wᵀ + (alpha/r)·dropout(x)·Aᵀ·Bᵀ`` with ``A`` (r × in) and ``B``
(out × r); every other parameter is frozen. The optimizer (``build_optimizer`` takes the
parameters that require grad), gradient clipping (only parameters with a gradient) and the
checkpoints (``state_dict_options``: frozen parameters left out) then cover the adapters only; the
base is re-derived from ``spec.model.init``, which the checkpoint marker records (``lora.base``).

Hand-written rather than ``peft.inject_adapter_in_model``: PEFT renames each wrapped base weight
to ``….base_layer.weight`` and initialises its adapters when it wraps. Our model is built on the
meta device, sharded (FSDP2 ``fully_shard`` per block), then materialised by ``to_empty`` + a
seeded init that would discard PEFT's init, and every path that loads weights (``init.checkpoint``,
``init.pretrained``, export, resume) speaks the base names. :class:`LoraLinear` *is* an
``nn.Linear`` with two extra parameters, so ``….weight`` keeps its name and shard, and the
adapters are two more parameters of the same FSDP unit (FSDP2 shards per parameter; frozen ones
get no gradient and no reduce-scatter). PEFT's *format* is what the adapter export writes
(``adapter_config.json`` + ``adapter_model.safetensors``, PEFT's key names and init: A
Kaiming-uniform, B zero), and the tests load it with ``peft.PeftModel`` on the base.

Export (:func:`export_checkpoint`, :func:`export_for_job`): a LoRA checkpoint becomes either the
merged model (``W + (alpha/r)·B·A``, the usual Llama export) or the adapter beside a pointer to
its base (``llmtrain-adapter.json``: the base's kind and pinned URI). :func:`load_model` loads
either kind of export for ``llmtrain generate``/``serve``, merging an adapter into its base.
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from llmtrain.runtime.export import (
    EXPORT_FORMAT,
    GENERATION_CONFIG_NAME,
    SPECIAL_TOKENS_NAME,
    TOKENIZER_CONFIG_NAME,
    TOKENIZER_NAME,
    CheckpointRef,
    ExportError,
    TokenizerFiles,
    _json,
    export_model,
    generation_config,
    hf_name_map,
    read_checkpoint_weights,
    resolve_checkpoint,
    tokenizer_config,
    tokenizer_for_job,
)
from llmtrain.runtime.export import export_checkpoint as export_full_checkpoint
from llmtrain.runtime.publish import Backoff, ExportWriter
from torch import Tensor, nn

from llmtrain.api.config import ModelConfig, RuntimeConfig, TrainConfig
from llmtrain.api.s3 import S3Options

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_BASE_NAME = "llmtrain-adapter.json"  # the base's kind and pinned URI, our settings
_PEFT_PREFIX = "base_model.model."  # PeftModel → LlamaForCausalLM


@dataclass(frozen=True)
class LoraSettings:
    rank: int
    alpha: float
    targets: tuple[str, ...]
    dropout: float = 0.0

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def from_train(cls, t: TrainConfig) -> LoraSettings | None:
        if t.lora_rank <= 0:
            return None
        return cls(t.lora_rank, t.lora_alpha, tuple(t.lora_targets), t.lora_dropout)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> LoraSettings:
        return cls(
            int(raw["rank"]), float(raw["alpha"]), tuple(raw["targets"]), float(raw.get("dropout", 0.0))
        )


class LoraLinear(nn.Linear):
    """A bias-free ``nn.Linear`` (its ``weight`` frozen) plus a trainable rank-r update."""

    def __init__(self, in_features: int, out_features: int, s: LoraSettings) -> None:
        super().__init__(in_features, out_features, bias=False)
        self.lora_A = nn.Parameter(torch.empty(s.rank, in_features))
        self.lora_B = nn.Parameter(torch.empty(out_features, s.rank))
        self.scaling = s.scaling
        self.lora_dropout = nn.Dropout(s.dropout) if s.dropout > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        # Two thin matmuls (x·Aᵀ is tokens × r) beside the base one; never W + B·A in training,
        # which would materialise an out × in update per step.
        update = F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B)
        return F.linear(x, self.weight) + update * self.scaling


def apply_lora(model: nn.Module, s: LoraSettings) -> None:
    """Swap the targeted projections of every block for :class:`LoraLinear` (on any device, the
    meta device included) and freeze everything but the adapters. Call before ``fully_shard``."""
    layers = getattr(model, "layers", None)
    if layers is None:
        raise TypeError("apply_lora needs the GPT model (with .layers)")
    for block in layers:
        for target in s.targets:
            parent_name, _, leaf = target.rpartition(".")
            parent = block.get_submodule(parent_name)
            old = getattr(parent, leaf)
            if not isinstance(old, nn.Linear) or old.bias is not None:
                raise TypeError(f"LoRA target {target} is not a bias-free nn.Linear")
            with torch.device(old.weight.device):
                new = LoraLinear(old.in_features, old.out_features, s)
            new.weight = old.weight
            setattr(parent, leaf, new)
    for name, param in model.named_parameters():
        param.requires_grad_(is_adapter(name))


def is_adapter(name: str) -> bool:
    return name.endswith((".lora_A", ".lora_B"))


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoraLinear) for m in model.modules())


@torch.no_grad()
def init_adapters(model: nn.Module, seed: int) -> None:
    """PEFT's init, seeded per name (the same at any world size): A ~ U(±1/√in) (Kaiming-uniform,
    a=√5), B = 0, so the adapted model starts as the base. Each rank keeps its shard."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    for name, param in model.named_parameters():
        if not is_adapter(name):
            continue
        full = torch.zeros(param.shape, dtype=torch.float32, device=param.device)
        if name.endswith("lora_A"):
            gen = torch.Generator(device=param.device)
            gen.manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
            bound = 1.0 / math.sqrt(param.shape[1])
            full.uniform_(-bound, bound, generator=gen)
        if isinstance(param, DTensor):
            param.copy_(distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None))
        else:
            param.copy_(full)


def trainable_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def expected_trainable(cfg: ModelConfig, s: LoraSettings) -> int:
    """r·(in + out) per targeted projection per layer."""
    q, kv, d, f = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.d_model, cfg.ffn_hidden_size
    shapes = {  # (in, out)
        "attention.wq": (d, q),
        "attention.wk": (d, kv),
        "attention.wv": (d, kv),
        "attention.wo": (q, d),
        "feed_forward.w1": (d, f),
        "feed_forward.w3": (d, f),
        "feed_forward.w2": (f, d),
    }
    return cfg.n_layers * sum(s.rank * sum(shapes[t]) for t in s.targets)


def state_dict_options(model: nn.Module) -> Any:
    """DCP state-dict options for a checkpoint: with adapters, the frozen base stays out (it is
    re-derived from spec.model.init) and loading fills the adapters alone."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    if not has_lora(model):
        return None
    return StateDictOptions(ignore_frozen_params=True, strict=False)


def checkpoint_meta(cfg: RuntimeConfig, base_uri: str | None) -> dict[str, Any]:
    """What a LoRA checkpoint's marker records so that export needs nothing else: the settings
    and the base (``base_uri``: the pinned init the run loaded)."""
    s = LoraSettings.from_train(cfg.train)
    if s is None:
        return {}
    base = {"kind": cfg.train.init_kind, "uri": base_uri or cfg.train.init_uri}
    return {"lora": {**asdict(s), "targets": list(s.targets), "base": base}}


# -------------------------------------------------------------------- weights and names


def merge(base: Mapping[str, Tensor], adapters: Mapping[str, Tensor], s: LoraSettings) -> dict[str, Tensor]:
    """Full base weights (our names) + adapters (``….lora_A``/``….lora_B``) → merged weights."""
    out = {k: v for k, v in base.items() if not is_adapter(k)}
    for name, a in adapters.items():
        if not name.endswith(".lora_A"):
            continue
        stem = name.removesuffix(".lora_A")
        b = adapters[f"{stem}.lora_B"]
        w = out[f"{stem}.weight"]
        out[f"{stem}.weight"] = (w.float() + s.scaling * (b.float() @ a.float())).to(w.dtype)
    return out


def merged_state(weights: Mapping[str, Tensor], s: LoraSettings) -> dict[str, Tensor]:
    """A LoRA model's own full state dict (base and adapters together) → merged base names."""
    return merge(weights, {k: v for k, v in weights.items() if is_adapter(k)}, s)


def peft_names(cfg: ModelConfig, s: LoraSettings) -> dict[str, str]:
    """Our adapter names → PEFT's (``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``)."""
    hf = hf_name_map(cfg)
    out = {}
    for i in range(cfg.n_layers):
        for target in s.targets:
            stem = f"layers.{i}.{target}"
            hf_stem = hf[f"{stem}.weight"].removesuffix(".weight")
            for ab in ("lora_A", "lora_B"):
                out[f"{stem}.{ab}"] = f"{_PEFT_PREFIX}{hf_stem}.{ab}.weight"
    return out


def peft_config(cfg: ModelConfig, s: LoraSettings, base_uri: str) -> dict[str, Any]:
    """``adapter_config.json`` as ``peft.LoraConfig.save_pretrained`` writes it (its fields we use)."""
    hf = hf_name_map(cfg)
    modules = sorted({hf[f"layers.0.{t}.weight"].rsplit(".", 2)[-2] for t in s.targets})
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_uri,
        "r": s.rank,
        "lora_alpha": s.alpha,
        "lora_dropout": s.dropout,
        "target_modules": modules,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
    }


# ----------------------------------------------------------------------------- bases


def base_weights(kind: str, uri: str, s3: S3Options | None = None) -> tuple[ModelConfig, dict[str, Tensor]]:
    """The frozen base a LoRA run trained on: its config and full weights (our names)."""
    if kind == "pretrained":
        from llmtrain.runtime.hf_import import from_hf_state_dict, model_config_from_hf, read_pretrained

        pre = read_pretrained(uri, s3)
        cfg = model_config_from_hf(pre.config, uri=pre.uri)
        return cfg, from_hf_state_dict(pre.tensors, cfg, uri=pre.uri)
    if kind == "checkpoint":
        from llmtrain.runtime.export import model_config_for_checkpoint

        ref = resolve_checkpoint(uri, s3)
        if "lora" in ref.marker:
            raise ExportError(f"{ref.uri} is a LoRA checkpoint: a base must hold full weights")
        weights = read_checkpoint_weights(ref, s3)
        return model_config_for_checkpoint(ref, weights), weights
    raise ExportError(f"a LoRA base must be spec.model.init.pretrained or .checkpoint, not {kind!r}")


def pin_base(kind: str, uri: str, s3: S3Options | None = None) -> str:
    """The base's exact version: an export's published version, a lineage's newest checkpoint."""
    if kind == "pretrained":
        from llmtrain.runtime.publish import resolve_export

        return resolve_export(uri, s3).uri
    if kind == "checkpoint":
        return resolve_checkpoint(uri, s3).uri
    return uri


# ---------------------------------------------------------------------------- export


def export_lora(
    ref: CheckpointRef,
    adapters: Mapping[str, Tensor],
    out_uri: str,
    tokenizer: TokenizerFiles,
    *,
    mode: str = "merged",
    dtype: str = "float32",
    s3: S3Options | None = None,
    backoff: Backoff | None = None,
) -> ModelConfig:
    """A LoRA checkpoint (adapters only) → a merged Llama export or a PEFT adapter export."""
    raw = ref.marker["lora"]
    s = LoraSettings.from_dict(raw)
    base = raw["base"]
    cfg, weights = base_weights(base["kind"], base["uri"], s3)
    names = peft_names(cfg, s)
    missing = sorted(set(names) - set(adapters))
    if missing:
        raise ExportError(f"{ref.uri} lacks {len(missing)} adapter tensors, e.g. {missing[:3]}")
    if mode == "merged":
        export_model(
            merge(weights, adapters, s), cfg, out_uri, tokenizer, dtype=dtype, s3=s3, backoff=backoff
        )
        return cfg
    if mode != "adapter":
        raise ExportError(f"spec.export.lora {mode!r} is not one of merged, adapter")
    from safetensors.torch import save

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    tensors = {names[k]: adapters[k].detach().to("cpu", torch_dtype).contiguous() for k in names}
    files = {
        ADAPTER_WEIGHTS_NAME: save(tensors, metadata={"format": "pt"}),
        ADAPTER_CONFIG_NAME: _json(peft_config(cfg, s, base["uri"])),
        ADAPTER_BASE_NAME: _json({"base": base, "lora": raw, "model": asdict(cfg)}),
        TOKENIZER_NAME: tokenizer.json_bytes,
        TOKENIZER_CONFIG_NAME: _json(tokenizer_config(tokenizer, cfg.context_length)),
        SPECIAL_TOKENS_NAME: _json({"eos_token": tokenizer.eot_token}),
        GENERATION_CONFIG_NAME: _json(generation_config(tokenizer, cfg.vocab_size)),
    }
    writer = ExportWriter(out_uri, s3, backoff)
    try:
        for key, data in files.items():
            writer.put(key, data)
        writer.publish()
    except BaseException:
        writer.abandon()
        raise
    return cfg


def export_checkpoint(
    checkpoint_uri: str,
    out_uri: str,
    tokenizer: TokenizerFiles,
    *,
    job: Any = None,
    fmt: str = EXPORT_FORMAT,
    dtype: str = "float32",
    s3: S3Options | None = None,
    backoff: Backoff | None = None,
    lora_mode: str | None = None,
) -> tuple[CheckpointRef, ModelConfig]:
    """:func:`llmtrain.runtime.export.export_checkpoint` for any checkpoint: a LoRA one (its
    marker has ``lora``) is exported per ``lora_mode`` (default: the job's spec.export.lora,
    else merged); any other goes to the full export unchanged."""
    retry = backoff or Backoff()
    ref = retry.run(lambda: resolve_checkpoint(checkpoint_uri, s3), f"reading checkpoint {checkpoint_uri}")
    if "lora" not in ref.marker:
        return export_full_checkpoint(
            ref.uri, out_uri, tokenizer, job=job, fmt=fmt, dtype=dtype, s3=s3, backoff=retry
        )
    if fmt != EXPORT_FORMAT:
        raise ExportError(f"spec.export.format {fmt!r} is not supported: use {EXPORT_FORMAT!r}")
    if lora_mode is None:
        export = getattr(job, "export", None)
        lora_mode = str(getattr(getattr(export, "lora", None), "value", "merged"))
    adapters = retry.run(lambda: read_checkpoint_weights(ref, s3), f"reading checkpoint {ref.uri}")
    cfg = export_lora(ref, adapters, out_uri, tokenizer, mode=lora_mode, dtype=dtype, s3=s3, backoff=retry)
    return ref, cfg


def export_for_job(spec: Any, checkpoint_uri: str, *, s3: S3Options | None = None) -> str | None:
    """The end-of-run export ``spec.export`` asks for: the newest complete checkpoint under
    ``checkpoint_uri`` (LoRA or full) → ``spec.export.uri``, with the tokenizer of
    ``spec.data.outputUri`` and the job's chat template. None when ``spec.export`` is unset."""
    if spec.export is None:
        return None
    fmt = getattr(spec.export.format, "value", spec.export.format)
    tokenizer = tokenizer_for_job(spec, s3)  # the job's chat template too
    export_checkpoint(checkpoint_uri, spec.export.uri, tokenizer, job=spec, fmt=fmt, s3=s3)
    return str(spec.export.uri)


# ------------------------------------------------------------------------------ load


def load_model(uri: str, *, device: str | torch.device = "cpu", s3: S3Options | None = None) -> Any:
    """A :class:`GPT` for ``llmtrain generate``/``serve`` from an export: a full Llama directory
    as :func:`~llmtrain.runtime.hf_import.load_pretrained_model` loads it, or an adapter export
    merged into its base (once, on load: serving then costs what the base costs)."""
    from llmtrain.runtime.hf_import import copy_full_weights, load_pretrained_model
    from llmtrain.runtime.model import GPT
    from llmtrain.runtime.publish import resolve_export
    from safetensors.torch import load

    export = resolve_export(uri, s3)
    if not export.has(ADAPTER_CONFIG_NAME):
        return load_pretrained_model(export.uri, device=device, s3=s3)
    info = json.loads(export.read(ADAPTER_BASE_NAME))
    s = LoraSettings.from_dict(info["lora"])
    cfg, weights = base_weights(info["base"]["kind"], info["base"]["uri"], s3)
    tensors = load(export.read(ADAPTER_WEIGHTS_NAME))
    ours = {k: tensors[v] for k, v in peft_names(cfg, s).items() if v in tensors}
    if len(ours) != 2 * cfg.n_layers * len(s.targets):
        raise ExportError(f"{export.uri}/{ADAPTER_WEIGHTS_NAME} lacks adapter tensors for {list(s.targets)}")
    with torch.device("meta"):
        model = GPT(cfg)
    model.materialize(device)
    copy_full_weights(model, merge(weights, ours, s))
    model.eval()
    return model
