"""Import a ``LlamaForCausalLM`` directory (our export or HF ``save_pretrained``) and fine-tune init.

* :func:`read_pretrained` reads ``config.json`` and the safetensors (one file or an index of
  shards) from a local directory or ``s3://bucket/prefix``.
* :func:`model_config_from_hf` turns a Llama config into our :class:`ModelConfig`
  (``llmtrain generate`` builds its model from it); unsupported variants are refused.
* :func:`from_hf_state_dict` is the inverse of :func:`llmtrain.runtime.export.to_hf_state_dict`.
* :func:`load_initial_weights` is what the train loop calls after ``init_weights`` for
  ``spec.model.init.pretrained`` / ``spec.model.init.checkpoint``; it fills a plain or an
  FSDP2-sharded model in place (each rank keeps its shard of each full tensor).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
from llmtrain.runtime.export import (
    CONFIG_NAME,
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
    ExportError,
    expected_shapes,
    hf_name_map,
)
from torch import Tensor, nn

from llmtrain.api.config import ModelConfig, RuntimeConfig
from llmtrain.api.s3 import S3Options

# Parameter names of LoRA adapters (runtime/lora.py, which imports this module): a base has none.
_ADAPTERS = (".lora_A", ".lora_B")


class ModelImportError(ExportError):
    """A pretrained model does not fit the configured architecture; the message names both."""


@dataclass(frozen=True)
class Pretrained:
    uri: str
    config: dict[str, Any]  # config.json as written
    tensors: dict[str, Tensor]  # HF names


def read_pretrained(uri: str, s3: S3Options | None = None) -> Pretrained:
    """``config.json`` + safetensors of a Llama directory (local or s3://).

    An llmtrain export is read from its published version only, each file checked against
    its manifest (:func:`~llmtrain.runtime.publish.resolve_export`); a ``save_pretrained``
    directory as it is.
    """
    from llmtrain.runtime.publish import resolve_export
    from llmtrain.runtime.store import StorageError
    from safetensors.torch import load

    export = resolve_export(uri, s3)
    try:
        config = json.loads(export.read(CONFIG_NAME))
    except StorageError as e:
        raise ModelImportError(
            f"{uri} has no {CONFIG_NAME}: spec.model.init.pretrained.uri must be an exported or "
            f"save_pretrained directory ({e})"
        ) from e
    if export.has(WEIGHTS_INDEX_NAME):
        index = json.loads(export.read(WEIGHTS_INDEX_NAME))
        files = sorted(set(index["weight_map"].values()))
    elif export.has(WEIGHTS_NAME):
        files = [WEIGHTS_NAME]
    else:
        raise ModelImportError(
            f"{uri} has neither {WEIGHTS_NAME} nor {WEIGHTS_INDEX_NAME}: only safetensors are read "
            "(re-save with save_pretrained(..., safe_serialization=True))"
        )
    tensors: dict[str, Tensor] = {}
    for name in files:
        tensors.update(load(export.read(name)))
    return Pretrained(uri=export.uri, config=config, tensors=tensors)


def model_config_from_hf(config: Mapping[str, Any], *, uri: str = "the pretrained model") -> ModelConfig:
    """Our config for a Llama ``config.json``; refuse what our model does not compute."""
    model_type = config.get("model_type")
    if model_type != "llama":
        raise ModelImportError(f"{uri}: model_type {model_type!r} is not 'llama' (LlamaForCausalLM only)")
    if config.get("hidden_act", "silu") != "silu":
        raise ModelImportError(f"{uri}: hidden_act {config['hidden_act']!r}; our SwiGLU uses silu")
    for flag in ("attention_bias", "mlp_bias"):
        if config.get(flag):
            raise ModelImportError(f"{uri}: {flag} is true; our model has no biases")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ModelImportError(f"{uri}: rope_type {rope_type!r} is not supported (plain RoPE only)")
    theta = rope.get("rope_theta", config.get("rope_theta", 10_000.0))
    d_model, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or d_model // heads)
    if head_dim * heads != d_model:
        raise ModelImportError(
            f"{uri}: head_dim {head_dim} × heads {heads} ≠ hidden_size {d_model}; our model needs "
            "dModel = heads × head size"
        )
    return ModelConfig(
        vocab_size=int(config["vocab_size"]),
        n_layers=int(config["num_hidden_layers"]),
        d_model=d_model,
        n_heads=heads,
        n_kv_heads=int(config.get("num_key_value_heads") or heads),
        context_length=int(config.get("max_position_embeddings", 2048)),
        ffn_hidden_size=int(config["intermediate_size"]),
        rope_theta=float(theta),
        norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        init_std=float(config.get("initializer_range", 0.02)),
    )


def check_compatible(pre: Pretrained, cfg: ModelConfig) -> None:
    """The pretrained architecture equals the configured one; else name the field and both values."""
    theirs = model_config_from_hf(pre.config, uri=pre.uri)
    checks = (
        ("vocab_size", "vocab_size", "model.vocab (tokenizer vocabulary padded to vocabMultipleOf)"),
        ("n_layers", "num_hidden_layers", "spec.model.architecture.layers"),
        ("d_model", "hidden_size", "spec.model.architecture.dModel"),
        ("n_heads", "num_attention_heads", "spec.model.architecture.heads"),
        ("n_kv_heads", "num_key_value_heads", "spec.model.architecture.kvHeads"),
        ("ffn_hidden_size", "intermediate_size", "spec.model.architecture.ffnHiddenSize"),
        ("rope_theta", "rope_theta", "spec.model.architecture.ropeTheta"),
        ("norm_eps", "rms_norm_eps", "spec.model.architecture.normEps"),
    )
    ours_shapes = expected_shapes(cfg)
    for ours, hf, field in checks:
        a, b = getattr(cfg, ours), getattr(theirs, ours)
        if a != b:
            shape = ""
            if ours == "vocab_size":
                shape = (
                    f": embedding {list(pre.tensors['model.embed_tokens.weight'].shape)} in the file vs "
                    f"{list(ours_shapes['tok_embeddings.weight'])} in the model"
                    if "model.embed_tokens.weight" in pre.tensors
                    else ""
                )
            raise ModelImportError(
                f"{pre.uri}: {hf} is {b} but {field} gives {a}{shape}; the architecture must match to "
                "load the weights"
            )
    if cfg.tie_embeddings and not theirs.tie_embeddings:
        raise ModelImportError(
            f"{pre.uri} has an untied lm_head but spec.model.architecture.tieEmbeddings is true: "
            "set tieEmbeddings false to fine-tune it"
        )


def from_hf_state_dict(
    tensors: Mapping[str, Tensor], cfg: ModelConfig, *, uri: str = ""
) -> dict[str, Tensor]:
    """HF Llama names → ours (full tensors, fp32). ``output.weight`` is the embedding when tied.

    A tied checkpoint loaded into an untied model starts its head as a copy of the embedding.
    """
    src = f"{uri}: " if uri else ""
    untied_view = replace(cfg, tie_embeddings=False)
    names = hf_name_map(untied_view)
    shapes = expected_shapes(untied_view)
    out: dict[str, Tensor] = {}
    for ours, hf in names.items():
        if hf not in tensors and ours == "output.weight":
            hf = "model.embed_tokens.weight"  # tied in the file (no lm_head.weight)
        if hf not in tensors:
            raise ModelImportError(f"{src}tensor {hf} is missing (needed for our {ours})")
        t = tensors[hf]
        if tuple(t.shape) != shapes[ours]:
            raise ModelImportError(
                f"{src}{hf} has shape {list(t.shape)} but our {ours} is {list(shapes[ours])} "
                f"for the configured model"
            )
        out[ours] = t.detach().to(torch.float32)
    if cfg.tie_embeddings:
        del out["output.weight"]  # the same parameter as tok_embeddings in our model
    return out


def load_pretrained_model(
    uri: str, *, device: str | torch.device = "cpu", s3: S3Options | None = None
) -> Any:
    """A :class:`GPT` built from a Llama directory's own config (for ``llmtrain generate``)."""
    from llmtrain.runtime.model import GPT

    pre = read_pretrained(uri, s3)
    cfg = model_config_from_hf(pre.config, uri=pre.uri)
    with torch.device("meta"):
        model = GPT(cfg)
    model.materialize(device)
    copy_full_weights(model, from_hf_state_dict(pre.tensors, cfg, uri=pre.uri))
    model.eval()
    return model


@torch.no_grad()
def copy_full_weights(model: nn.Module, weights: Mapping[str, Tensor]) -> None:
    """Copy full tensors into a plain or FSDP2-sharded model (each rank keeps its own chunk)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    for name, param in model.named_parameters():  # tied weights appear once
        if name not in weights and name.endswith(_ADAPTERS):
            continue  # LoRA adapters (runtime/lora.py) start from their own init, not the base
        full = weights[name].to(device=param.device, dtype=param.dtype)
        if isinstance(param, DTensor):
            # src_data_rank=None: every rank read the same file; no scatter, keep the local chunk.
            param.copy_(distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None))
        else:
            param.copy_(full)


def load_initial_weights(model: nn.Module, cfg: RuntimeConfig) -> str | None:
    """Fill ``model`` per ``spec.model.init`` (train.init_kind / init_uri); random: already done.

    Call on every rank after the model is materialised and before the run's own resume: a run
    that resumes from its own checkpoint then overwrites these weights, as it should. Returns
    the exact version loaded (an export's published version, a checkpoint's step directory):
    a LoRA run records it as its base. LoRA adapters in ``model`` keep their own init.
    """
    kind, uri = cfg.train.init_kind, cfg.train.init_uri
    if kind == "random":
        return None
    s3 = S3Options.from_train(cfg.train)  # spec.storage, not the worker's environment
    if not uri:
        raise ModelImportError(f"spec.model.init.{kind}.uri is empty")
    if kind == "pretrained":
        pinned = _pinned_on_rank0(uri, s3)
        pre = read_pretrained(pinned, s3)
        check_compatible(pre, cfg.model)
        copy_full_weights(model, from_hf_state_dict(pre.tensors, cfg.model, uri=pre.uri))
        return pre.uri
    elif kind == "checkpoint":
        return _load_checkpoint_weights(model, cfg.model, uri, s3)
    else:
        raise ModelImportError(
            f"unknown init kind {kind!r} (spec.model.init: random, checkpoint or pretrained)"
        )


def _pinned_on_rank0(uri: str, s3: S3Options | None) -> str:
    """The published version rank 0 resolves, for every rank: a publish while ranks resolve
    cannot give them the weights of two exports."""
    import torch.distributed as dist
    from llmtrain.runtime.publish import resolve_export

    if not (dist.is_available() and dist.is_initialized()):
        return uri
    picked: list[Any] = [resolve_export(uri, s3).uri if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(picked, src=0)
    return str(picked[0])


def _load_checkpoint_weights(
    model: nn.Module, cfg: ModelConfig, uri: str, s3: S3Options | None = None
) -> str:
    """Weights only (no optimizer, step or data position) from another run's checkpoint.

    Rank 0 picks the checkpoint and broadcasts it, so a lineage that completes a save while
    ranks look cannot split them. DCP then reshards from any saved world size.
    """
    import torch.distributed as dist
    from llmtrain.runtime.checkpoint import CheckpointInfo, Lineage
    from llmtrain.runtime.export import resolve_checkpoint
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        set_model_state_dict,
    )

    distributed = dist.is_available() and dist.is_initialized()
    picked: list[Any] = [None]
    if not distributed or dist.get_rank() == 0:
        try:
            ref = resolve_checkpoint(uri, s3)
            picked[0] = (ref.root, ref.step, ref.marker, None)
        except ExportError as e:
            picked[0] = (None, None, None, f"spec.model.init.checkpoint.uri: {e}")
    if distributed:
        dist.broadcast_object_list(picked, src=0)
    root, step, marker, error = picked[0]
    if error is not None:
        raise ModelImportError(error)
    _check_checkpoint_shapes(root, step, cfg, s3)
    has_adapters = any(name.endswith(_ADAPTERS) for name, _ in model.named_parameters())
    # The base's tensors only: LoRA adapters (runtime/lora.py) are not in a base checkpoint.
    state = {"model": {k: v for k, v in get_model_state_dict(model).items() if not k.endswith(_ADAPTERS)}}
    info = CheckpointInfo(
        step=step, uri=f"{root}/step_{step:08d}", world_size=marker["world_size"], meta=marker
    )
    with warnings.catch_warnings():
        # Without a process group DCP warns that it assumes a single process: it is one.
        warnings.filterwarnings("ignore", message=".*single process.*")
        Lineage(root, keep_last=1, s3=s3).load(info, state)
    set_model_state_dict(model, state["model"], options=StateDictOptions(strict=not has_adapters))
    return info.uri


def _check_checkpoint_shapes(root: str, step: int, cfg: ModelConfig, s3: S3Options | None = None) -> None:
    """DCP's own size-mismatch error names no spec field: compare shapes first."""
    import shutil
    import tempfile
    from pathlib import Path

    from llmtrain.runtime.checkpoint import METADATA, Lineage, verify_file
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    lineage = Lineage(root, keep_last=1, s3=s3)
    staging = Path(tempfile.mkdtemp(prefix="llmtrain-init-meta-"))
    try:
        lineage.store.get_file(f"step_{step:08d}/{METADATA}", staging / METADATA)
        # Checked before it is unpickled: a corrupt file is named, not an UnpicklingError.
        expected = lineage.info(step).meta.get("files")
        verify_file(staging / METADATA, expected, f"{lineage.uri_of(step)}/{METADATA}")
        metadata = FileSystemReader(staging).read_metadata()
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    saved = {
        k.removeprefix("model."): tuple(m.size)
        for k, m in metadata.state_dict_metadata.items()
        if k.startswith("model.") and isinstance(m, TensorStorageMetadata)
    }
    for name, shape in expected_shapes(cfg).items():
        if name not in saved:
            raise ModelImportError(
                f"checkpoint {root}/step_{step:08d} has no {name} (spec.model.init.checkpoint.uri)"
            )
        if saved[name] != shape:
            raise ModelImportError(
                f"checkpoint {root}/step_{step:08d}: {name} has shape {list(saved[name])} but "
                f"spec.model.architecture gives {list(shape)}; the architecture must match "
                "(spec.model.init.checkpoint.uri)"
            )
