"""Export to the Hugging Face Llama layout (``LlamaForCausalLM``): safetensors + config + tokenizer.

What a directory written here holds (local or ``s3://bucket/prefix``; each export is a new
version, verified, then published whole — layout and readers in :mod:`llmtrain.runtime.publish`)::

    model.safetensors         consolidated weights, HF names, one file (or shards + index)
    config.json               LlamaConfig (rope written twice: rope_parameters and rope_theta)
    generation_config.json    eos = our end-of-text id, no BOS
    tokenizer.json            the data pipeline's tokenizer, byte for byte
    tokenizer_config.json     PreTrainedTokenizerFast, no BOS/EOS added, special tokens split
    special_tokens_map.json
    llmtrain-export.json      every file's size and sha256 (readers check them)

Conventions, each pinned by a test in ``tests/unit/test_export.py``:

* RoPE: :func:`llmtrain.runtime.model.apply_rope` rotates halves (dimension i pairs with
  i + d/2), exactly as HF Llama does, so q/k rows are copied unpermuted.
* SwiGLU: ``w1`` is inside SiLU → ``gate_proj``; ``w3`` → ``up_proj``; ``w2`` → ``down_proj``.
* Tied embeddings: ``tie_word_embeddings`` and no ``lm_head.weight`` in the file.
* Padded vocabulary: ``vocab_size`` is the embedding table's rows, not the tokenizer's.
* Tokenizer: ``tokenizer_config.json`` carries the job's chat template
  (:func:`llmtrain.runtime.chat.resolve_chat_template`), so ``apply_chat_template`` renders
  and tokenizes conversations as training did (``tests/unit/test_chat_export.py``). That
  needs ``split_special_tokens`` off: the template writes the end-of-text token as text and it
  must become the id. So a literal ``<|endoftext|>`` in plain text is the token to
  ``AutoTokenizer`` (as for every HF tokenizer), while the data pipeline keeps it as text
  (``encode_special_tokens``); ``tokenizer.encode(text, split_special_tokens=True)`` gives the
  pipeline's ids exactly. Chat records holding it are refused (:class:`~llmtrain.runtime.chat.ChatError`).

Offline: :func:`export_checkpoint` reads any llmtrain checkpoint (a lineage root or one
``step_XXXXXXXX`` directory) into one process with ``torch.distributed.checkpoint`` — no
process group — whatever world size wrote it.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
from llmtrain.runtime.chat import DEFAULT_CHAT_TEMPLATE, resolve_chat_template
from llmtrain.runtime.publish import Backoff, ExportError, ExportWriter
from torch import Tensor

from llmtrain.api.config import ModelConfig
from llmtrain.api.s3 import S3Options

EXPORT_FORMAT = "hf-llama-safetensors"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"
GENERATION_CONFIG_NAME = "generation_config.json"
TOKENIZER_NAME = "tokenizer.json"
TOKENIZER_CONFIG_NAME = "tokenizer_config.json"
SPECIAL_TOKENS_NAME = "special_tokens_map.json"

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Our parameter name → Hugging Face Llama name. Per-layer entries use {i}.
_LAYER_MAP: tuple[tuple[str, str], ...] = (
    ("attention_norm.weight", "input_layernorm.weight"),
    ("attention.wq.weight", "self_attn.q_proj.weight"),
    ("attention.wk.weight", "self_attn.k_proj.weight"),
    ("attention.wv.weight", "self_attn.v_proj.weight"),
    ("attention.wo.weight", "self_attn.o_proj.weight"),
    ("ffn_norm.weight", "post_attention_layernorm.weight"),
    ("feed_forward.w1.weight", "mlp.gate_proj.weight"),  # inside SiLU
    ("feed_forward.w3.weight", "mlp.up_proj.weight"),
    ("feed_forward.w2.weight", "mlp.down_proj.weight"),
)
_TOP_MAP: tuple[tuple[str, str], ...] = (
    ("tok_embeddings.weight", "model.embed_tokens.weight"),
    ("norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
)


def hf_name_map(cfg: ModelConfig) -> dict[str, str]:
    """Every parameter of :class:`~llmtrain.runtime.model.GPT` → its ``LlamaForCausalLM`` name.

    With tied embeddings ``output.weight`` is absent: HF ties ``lm_head`` to the embedding.
    """
    names = {ours: hf for ours, hf in _TOP_MAP if not (cfg.tie_embeddings and ours == "output.weight")}
    for i in range(cfg.n_layers):
        for ours, hf in _LAYER_MAP:
            names[f"layers.{i}.{ours}"] = f"model.layers.{i}.{hf}"
    return names


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Shapes of :class:`~llmtrain.runtime.model.GPT`'s state dict for ``cfg`` (tied: both keys).

    Closed form, not a meta-device model: building one costs seconds of first-use imports on a
    CLI call. ``tests/unit/test_export.py`` checks it against the model's own state dict.
    """
    d, v, f = cfg.d_model, cfg.vocab_size, cfg.ffn_hidden_size
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    shapes: dict[str, tuple[int, ...]] = {"tok_embeddings.weight": (v, d)}
    for i in range(cfg.n_layers):
        layer = {
            "attention_norm.weight": (d,),
            "attention.wq.weight": (q, d),
            "attention.wk.weight": (kv, d),
            "attention.wv.weight": (kv, d),
            "attention.wo.weight": (d, q),
            "ffn_norm.weight": (d,),
            "feed_forward.w1.weight": (f, d),
            "feed_forward.w3.weight": (f, d),
            "feed_forward.w2.weight": (d, f),
        }
        shapes.update({f"layers.{i}.{name}": shape for name, shape in layer.items()})
    shapes["norm.weight"] = (d,)
    shapes["output.weight"] = (v, d)
    return shapes


def check_shapes(weights: Mapping[str, Tensor], cfg: ModelConfig, *, source: str, field_hint: str) -> None:
    """Every tensor ``cfg`` needs is present with its shape; otherwise name both shapes."""
    want = expected_shapes(cfg)
    missing = sorted(set(want) - set(weights))
    if missing:
        raise ExportError(f"{source} lacks {len(missing)} tensors the model needs, e.g. {missing[:3]}")
    for name, shape in want.items():
        got = tuple(weights[name].shape)
        if got != shape:
            raise ExportError(
                f"{name}: {source} has shape {list(got)} but the model configured by {field_hint} "
                f"needs {list(shape)} ({_describe(cfg)})"
            )


def _describe(cfg: ModelConfig) -> str:
    return (
        f"vocab {cfg.vocab_size}, layers {cfg.n_layers}, dModel {cfg.d_model}, heads {cfg.n_heads}, "
        f"kvHeads {cfg.n_kv_heads}, ffnHidden {cfg.ffn_hidden_size}, tied {cfg.tie_embeddings}"
    )


def to_hf_state_dict(
    weights: Mapping[str, Tensor], cfg: ModelConfig, dtype: torch.dtype = torch.float32
) -> dict[str, Tensor]:
    """Our full (unsharded) state dict → HF Llama tensor names, contiguous CPU tensors of ``dtype``.

    No q/k permutation: both sides rotate halves. Tied: ``output.weight`` must be the embedding.
    """
    check_shapes(weights, cfg, source="the weights", field_hint="the run's config")
    if cfg.tie_embeddings and "output.weight" in weights:
        if not torch.equal(weights["output.weight"], weights["tok_embeddings.weight"]):
            raise ExportError(
                "tieEmbeddings is set but output.weight differs from tok_embeddings.weight: "
                "the weights do not belong to a tied model (spec.model.architecture.tieEmbeddings)"
            )
    return {
        hf: weights[ours].detach().to(device="cpu", dtype=dtype).contiguous()
        for ours, hf in hf_name_map(cfg).items()
    }


# ------------------------------------------------------------------------ tokenizer


@dataclass(frozen=True)
class TokenizerFiles:
    """What the exported tokenizer needs: the ``tokenizer.json`` bytes and the end-of-text token."""

    json_bytes: bytes
    eot_token: str
    eot_id: int
    chat_template: str | None = None  # None: llmtrain.runtime.chat.DEFAULT_CHAT_TEMPLATE

    @classmethod
    def from_json_bytes(cls, data: bytes, eot_token: str = "<|endoftext|>") -> TokenizerFiles:
        from tokenizers import Tokenizer

        try:
            tok = Tokenizer.from_str(data.decode("utf-8"))
        except Exception as e:
            raise ExportError(f"not a tokenizer.json: {e}") from e
        eot = tok.token_to_id(eot_token)
        if eot is None:
            raise ExportError(
                f"end-of-text token {eot_token!r} is not in the tokenizer's vocabulary "
                "(spec.data.tokenizer.load.endOfText)"
            )
        return cls(json_bytes=data, eot_token=eot_token, eot_id=int(eot))

    @property
    def vocab_size(self) -> int:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_str(self.json_bytes.decode("utf-8"))
        return int(max(tok.get_vocab(with_added_tokens=True).values()) + 1)


def tokenizer_from_data(uri: str, s3: S3Options | None = None) -> TokenizerFiles:
    """The tokenizer beside the shards at ``uri`` (spec.data.outputUri): manifest.json names it.

    ``uri`` may also be a ``tokenizer.json`` file itself (then the EOT is ``<|endoftext|>``).
    """
    from llmtrain.runtime.store import StorageError, open_store

    from llmtrain.api.shards import MANIFEST_NAME, Manifest

    if uri.endswith(".json") and not uri.endswith(MANIFEST_NAME):
        parent, _, name = uri.rstrip("/").rpartition("/")
        return TokenizerFiles.from_json_bytes(open_store(parent or ".", s3).get(name))
    store = open_store(uri, s3)
    try:
        manifest = Manifest.from_json(store.get(MANIFEST_NAME))
    except StorageError as e:
        raise ExportError(
            f"no {MANIFEST_NAME} at {uri}: pass the data output directory (spec.data.outputUri) "
            f"or a tokenizer.json file ({e})"
        ) from e
    info = manifest.tokenizer
    files = TokenizerFiles.from_json_bytes(store.get(info.path), info.eot_token)
    if files.eot_id != info.eot_id:
        raise ExportError(
            f"{uri}: manifest says end-of-text {info.eot_token!r} is id {info.eot_id}, "
            f"the tokenizer says {files.eot_id}"
        )
    return files


# --------------------------------------------------------------------------- config


def hf_config(cfg: ModelConfig, tok: TokenizerFiles, dtype: str = "float32") -> dict[str, Any]:
    """``config.json`` of ``LlamaForCausalLM`` for our model."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,  # padded table rows; ids past the tokenizer's are never produced
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.ffn_hidden_size,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.context_length,
        "rms_norm_eps": cfg.norm_eps,
        # transformers >= 5 reads rope_parameters; 4.x reads rope_theta (and rope_scaling).
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": cfg.init_std,
        "pretraining_tp": 1,
        "use_cache": True,
        "bos_token_id": None,
        "eos_token_id": tok.eot_id,
        "pad_token_id": None,
        "dtype": dtype,
        "torch_dtype": dtype,  # transformers 4.x name of the same field
    }


def generation_config(tok: TokenizerFiles, vocab_rows: int) -> dict[str, Any]:
    """Stop at end-of-text; never emit the padding rows of the table (no token decodes them)."""
    config: dict[str, Any] = {"eos_token_id": tok.eot_id, "bos_token_id": None, "pad_token_id": tok.eot_id}
    padding = list(range(tok.vocab_size, vocab_rows))
    if padding:
        config["suppress_tokens"] = padding
    return config


def tokenizer_config(tok: TokenizerFiles, context_length: int) -> dict[str, Any]:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": tok.eot_token,
        "bos_token": None,
        "unk_token": None,
        "pad_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        # False: the chat template writes "<|endoftext|>" as text and apply_chat_template must
        # encode it as the id training used (see the module docstring for plain text).
        "split_special_tokens": False,
        "chat_template": tok.chat_template or DEFAULT_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "model_max_length": context_length,
    }


# --------------------------------------------------------------------------- export


def _json(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


MAX_SHARD_BYTES = 5 * 2**30  # Hugging Face's default max_shard_size ("5GB")


def export_model(
    weights: Mapping[str, Tensor],
    cfg: ModelConfig,
    out_uri: str,
    tokenizer: TokenizerFiles,
    *,
    fmt: str = EXPORT_FORMAT,
    dtype: str = "float32",
    s3: S3Options | None = None,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    backoff: Backoff | None = None,
) -> list[str]:
    """Write the full state dict ``weights`` (our names) as a ``LlamaForCausalLM`` directory.

    ``out_uri``: a local directory or ``s3://bucket/prefix`` (spec.export.uri); ``s3`` an
    optional :class:`~llmtrain.api.s3.S3Options` (None: the environment's). The files go into a
    new version, each verified, and the version is published last
    (:mod:`llmtrain.runtime.publish`): a reader sees the previous export or this one, whole;
    a failure leaves the previous one published. A failed write is retried per ``backoff``.
    Above ``max_shard_bytes`` the weights are split as ``save_pretrained`` does
    (``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``); only one
    shard's bytes are held in memory at a time. Returns the written keys.
    """
    if fmt != EXPORT_FORMAT:
        raise ExportError(f"spec.export.format {fmt!r} is not supported: use {EXPORT_FORMAT!r}")
    if dtype not in _DTYPES:
        raise ExportError(f"export dtype {dtype!r} is not one of {sorted(_DTYPES)}")
    if tokenizer.eot_id >= cfg.vocab_size:
        raise ExportError(
            f"end-of-text id {tokenizer.eot_id} is outside the model's vocabulary of {cfg.vocab_size} rows"
        )
    hf = to_hf_state_dict(weights, cfg, _DTYPES[dtype])
    writer = ExportWriter(out_uri, s3, backoff)
    try:
        written = _write_weights(writer, hf, max_shard_bytes)
        files = {
            TOKENIZER_NAME: tokenizer.json_bytes,
            TOKENIZER_CONFIG_NAME: _json(tokenizer_config(tokenizer, cfg.context_length)),
            SPECIAL_TOKENS_NAME: _json({"eos_token": tokenizer.eot_token}),
            GENERATION_CONFIG_NAME: _json(generation_config(tokenizer, cfg.vocab_size)),
            CONFIG_NAME: _json(hf_config(cfg, tokenizer, dtype)),
        }
        for key, data in files.items():
            writer.put(key, data)
        writer.publish()
    except BaseException:
        writer.abandon()
        raise
    return written + list(files)


def _write_weights(writer: ExportWriter, hf: Mapping[str, Tensor], max_shard_bytes: int) -> list[str]:
    """One ``model.safetensors``, or shards and their index as ``save_pretrained`` names them."""
    from safetensors.torch import save

    shards = _split(hf, max_shard_bytes)
    if len(shards) == 1:
        writer.put(WEIGHTS_NAME, save(dict(hf), metadata={"format": "pt"}))
        return [WEIGHTS_NAME]
    written, weight_map = [], {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        writer.put(name, save(shard, metadata={"format": "pt"}))
        weight_map.update(dict.fromkeys(shard, name))
        written.append(name)
    total = sum(t.numel() * t.element_size() for t in hf.values())
    writer.put(WEIGHTS_INDEX_NAME, _json({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return [*written, WEIGHTS_INDEX_NAME]


def _split(tensors: Mapping[str, Tensor], max_bytes: int) -> list[dict[str, Tensor]]:
    """Consecutive groups of at most ``max_bytes`` (a larger tensor gets a shard of its own)."""
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += n
    return shards


# ----------------------------------------------------------------- from checkpoints

_STEP_RE = re.compile(r"^step_(\d{8,})$")


@dataclass(frozen=True)
class CheckpointRef:
    root: str  # the lineage (spec.checkpoint.uri)
    step: int
    marker: dict[str, Any]

    @property
    def uri(self) -> str:
        return f"{self.root}/step_{self.step:08d}"


def resolve_checkpoint(uri: str, s3: S3Options | None = None) -> CheckpointRef:
    """A lineage root (→ its newest *complete* checkpoint) or one ``step_XXXXXXXX`` directory.

    Read-only: unlike ``Lineage.latest`` this never deletes incomplete checkpoints, because the
    lineage may belong to a run that is saving right now. ``s3``: spec.storage's ``S3Options``
    (None: the environment's).
    """
    from llmtrain.runtime.checkpoint import Lineage

    trimmed = uri.rstrip("/")
    parent, _, name = trimmed.rpartition("/")
    m = _STEP_RE.match(name)
    if m is not None:
        lineage = Lineage(parent or ".", keep_last=1, s3=s3)
        step = int(m.group(1))
        if step not in lineage.complete_steps():
            raise ExportError(
                f"{uri} is not a complete checkpoint (no COMPLETE marker): it is missing or a save "
                "was interrupted; pass the lineage root to use the newest complete one"
            )
    else:
        lineage = Lineage(trimmed, keep_last=1, s3=s3)
        steps = lineage.complete_steps()
        if not steps:
            raise ExportError(f"{uri} holds no complete checkpoint (no step_*/COMPLETE)")
        step = steps[-1]
    info = lineage.info(step)
    return CheckpointRef(root=lineage.store.uri, step=step, marker=info.meta)


def read_checkpoint_weights(ref: CheckpointRef, s3: S3Options | None = None) -> dict[str, Tensor]:
    """The model tensors of a checkpoint, full and on the CPU, in one process (no process group).

    DCP reshards on load: the template holds full-size tensors, so shards written by any
    number of ranks are assembled into them; only the files holding model tensors are read.
    """
    import warnings

    from llmtrain.runtime.checkpoint import METADATA, CheckpointInfo, Lineage, open_lineage_store, verify_file
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    store = open_lineage_store(ref.root, s3)
    staging = Path(tempfile.mkdtemp(prefix="llmtrain-export-meta-"))
    try:
        store.get_file(f"step_{ref.step:08d}/{METADATA}", staging / METADATA)
        # Checked before unpickling: a corrupt file is named, not a pickle error.
        verify_file(staging / METADATA, ref.marker.get("files"), f"{ref.uri}/{METADATA}")
        metadata = FileSystemReader(staging).read_metadata()
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    template: dict[str, Tensor] = {}
    for key, meta in metadata.state_dict_metadata.items():
        if key.startswith("model.") and isinstance(meta, TensorStorageMetadata):
            template[key.removeprefix("model.")] = torch.empty(meta.size, dtype=meta.properties.dtype)
    if not template:
        raise ExportError(f"{ref.uri} holds no model tensors (keys 'model.*')")
    info = CheckpointInfo(
        step=ref.step, uri=ref.uri, world_size=int(ref.marker.get("world_size", 1)), meta=ref.marker
    )
    with warnings.catch_warnings():
        # "assuming the intent is to load in a single process": yes, that is the point.
        warnings.filterwarnings("ignore", message=".*single process.*")
        Lineage(ref.root, keep_last=1, s3=s3).load(info, {"model": template})
    return template


def model_config_for_checkpoint(
    ref: CheckpointRef, weights: Mapping[str, Tensor], job: Any = None
) -> ModelConfig:
    """The architecture of a checkpoint: from its marker (``model``), else from a job spec.

    With a spec the vocabulary is the checkpoint's table rows (already padded), so no data
    manifest is needed; every tensor is then checked against the spec's shapes.
    """
    raw = ref.marker.get("model")
    if isinstance(raw, dict):
        known = {f.name for f in fields(ModelConfig)}
        cfg = ModelConfig(**{k: v for k, v in raw.items() if k in known})
        hint = f"the checkpoint's own config ({ref.uri}/COMPLETE)"
    elif job is not None:
        from llmtrain.api.config import runtime_config_from_spec

        if "tok_embeddings.weight" not in weights:
            raise ExportError(f"{ref.uri} has no tok_embeddings.weight")
        rows = int(weights["tok_embeddings.weight"].shape[0])
        cfg = runtime_config_from_spec(job, vocab_size=rows, world_size=1).model
        if cfg.vocab_size != rows:
            raise ExportError(
                f"tok_embeddings.weight has {rows} rows, not a multiple of "
                f"spec.model.architecture.vocabMultipleOf ({cfg.vocab_size} after padding)"
            )
        hint = "spec.model.architecture"
    else:
        raise ExportError(
            f"{ref.uri}/COMPLETE records no model config: pass the job (--job job.yaml) whose "
            "spec.model.architecture trained it"
        )
    check_shapes(weights, cfg, source=f"checkpoint {ref.uri}", field_hint=hint)
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
) -> tuple[CheckpointRef, ModelConfig]:
    """``llmtrain export``: checkpoint (any world size) → HF Llama directory at ``out_uri``.

    An S3 outage while the checkpoint is read or the export written is retried here, in place,
    per ``backoff`` (:class:`~llmtrain.runtime.publish.Backoff`), before the export fails.
    """
    if fmt != EXPORT_FORMAT:  # before reading any weights
        raise ExportError(f"spec.export.format {fmt!r} is not supported: use {EXPORT_FORMAT!r}")
    retry = backoff or Backoff()

    def read() -> tuple[CheckpointRef, dict[str, Tensor]]:
        # The checkpoint is read from the same storage (spec.storage) the export is written to.
        ref = resolve_checkpoint(checkpoint_uri, s3)
        return ref, read_checkpoint_weights(ref, s3)

    ref, weights = retry.run(read, f"reading checkpoint {checkpoint_uri}")
    cfg = model_config_for_checkpoint(ref, weights, job)
    export_model(weights, cfg, out_uri, tokenizer, fmt=fmt, dtype=dtype, s3=s3, backoff=retry)
    return ref, cfg


def tokenizer_for_job(spec: Any, s3: S3Options | None = None) -> TokenizerFiles:
    """The tokenizer a job's export carries: the data's, with the job's chat template."""
    return replace(
        tokenizer_from_data(spec.data.output_uri, s3), chat_template=resolve_chat_template(spec, s3)
    )


def model_config_dict(cfg: ModelConfig) -> dict[str, Any]:
    """What a checkpoint marker should record so that export needs nothing else."""
    return asdict(cfg)
