"""The ``LLMTrainingJob`` spec: the one place the schema is defined.

The CRD (``llmtrain crd``), ``llmtrain validate`` and the runtime configuration
(:mod:`llmtrain.api.config`) are all derived from these models. Field descriptions
become ``kubectl explain`` text, so they say what a field does, its unit, and its default.
"""

from __future__ import annotations

import math
import re
from enum import StrEnum
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BeforeValidator, ConfigDict, Field, WithJsonSchema, field_validator, model_validator

from llmtrain.api.base import ApiModel, CelRule, cel, exactly_one

GROUP = "llmtrain.dev"
VERSION = "v1alpha1"
KIND = "LLMTrainingJob"
PLURAL = "llmtrainingjobs"
SINGULAR = "llmtrainingjob"
SHORT_NAMES = ("ltj",)
CATEGORIES = ("llmtrain", "all")
DEFAULT_EOT = "<|endoftext|>"

QUANTITY_PATTERN = r"^[0-9]+([.][0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$"
_QUANTITY_RE = re.compile(QUANTITY_PATTERN)


def quantity_rule(field: str) -> CelRule:
    """CEL twin of the Quantity validator: int-or-string fields cannot carry a schema pattern."""
    return cel(
        f"string(self.{field}).matches('{QUANTITY_PATTERN}')",
        f"{field} must be a Kubernetes quantity such as 4, 500m or 16Gi",
        f".{field}",
    )


def _quantity(value: Any) -> str:
    if isinstance(value, bool):
        raise ValueError("expected a Kubernetes quantity such as 4, 500m or 16Gi")
    if isinstance(value, int | float):
        value = str(value)
    if not isinstance(value, str) or not _QUANTITY_RE.match(value):
        raise ValueError(f"{value!r} is not a Kubernetes quantity; write e.g. 4, 500m or 16Gi")
    return value


# Kubernetes quantities are int-or-string on the wire (cpu: 4, memory: 16Gi).
Quantity = Annotated[
    str,
    BeforeValidator(_quantity),
    WithJsonSchema({"x-kubernetes-int-or-string": True}),
]

# Bounded strings keep CEL rules within the apiserver's cost budget.
Name = Annotated[str, Field(min_length=1, max_length=253)]

# A URI field holds s3://bucket[/prefix] or a local path. The runtime opens anything not
# starting with "s3://" as a local path, so a mistyped "s3:/bucket/x" or "s3:///x" would
# silently become a directory named "s3:" on the pod's disk: a local path therefore may not
# carry a ':' before its first '/' (RFC 3986's rule for a relative reference, which would
# otherwise read as a scheme; write ./a:b), which rules out every other scheme too. RE2 and
# Rust regex (apiserver, pydantic) have no look-ahead, hence the two alternatives. The bucket
# is only required to be there: S3-compatible servers differ in the names they allow.
URI_PATTERN = r"^(s3://[^/]+(/.*)?|[^:/]*(/.*)?)$"
_URI_RE = re.compile(URI_PATTERN)


def _uri(value: Any) -> Any:
    # Before the pattern check, so the error says what to write instead of quoting the regex
    # (the CRD carries the same pattern; the apiserver quotes it).
    if isinstance(value, str) and not _URI_RE.match(value):
        raise ValueError(
            f"{value!r} is neither an s3:// URI nor a local path: write s3://bucket/prefix or a local "
            "path (./a:b if its first part has a ':')"
        )
    return value


Uri = Annotated[str, BeforeValidator(_uri), Field(min_length=1, max_length=1024, pattern=URI_PATTERN)]


# --------------------------------------------------------------------------- data


class TextFormat(StrEnum):
    text = "text"
    jsonl = "jsonl"
    parquet = "parquet"


class TextUnit(StrEnum):
    """How plain text splits into documents (JSONL/Parquet: one record = one document)."""

    file = "file"
    paragraph = "paragraph"
    line = "line"


class S3Source(ApiModel):
    """Objects under an S3 prefix (listing paginates; ``.gz`` objects are decompressed)."""

    uri: str = Field(
        min_length=1,
        max_length=1024,
        pattern=r"^s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/.*)?$",
        description="S3 prefix, s3://bucket/prefix/. Every object under it whose name ends in the "
        "format's extension (optionally .gz) is read.",
    )
    format: TextFormat = Field(TextFormat.text, description="Object format: text, jsonl or parquet.")
    field: str = Field("text", max_length=256, description="JSON key or Parquet column holding the text.")
    text_unit: TextUnit = Field(
        TextUnit.paragraph,
        description="For format text: what one document is (file, paragraph = blank-line separated, line).",
    )


class LocalSource(ApiModel):
    """Files on the local (or mounted) file system matched by a glob."""

    glob: str = Field(
        min_length=1,
        max_length=1024,
        description="Glob pattern (recursive ** allowed), e.g. /data/books/**/*.txt.",
    )
    format: TextFormat = Field(TextFormat.text, description="File format: text, jsonl or parquet.")
    field: str = Field("text", max_length=256, description="JSON key or Parquet column holding the text.")
    text_unit: TextUnit = Field(
        TextUnit.paragraph,
        description="For format text: what one document is (file, paragraph = blank-line separated, line).",
    )


class HuggingFaceSource(ApiModel):
    """A Hugging Face ``datasets`` builder over local files (offline; nothing is downloaded)."""

    builder: Literal["text", "json", "parquet"] = Field(
        description="datasets builder passed to load_dataset: text, json or parquet."
    )
    data_files: list[Annotated[str, Field(max_length=1024)]] = Field(
        min_length=1, max_length=256, description="Local files or globs passed as data_files."
    )
    split: str = Field("train", max_length=64, description="Split to read.")
    field: str = Field("text", max_length=256, description="Column holding the text.")


class PythonStdlibSource(ApiModel):
    """The ``.py`` files of the running interpreter's standard library (no site-packages)."""

    include_tests: bool = Field(False, description="Include the standard library's test/ package.")


class TaskFormat(StrEnum):
    prompt_response = "promptResponse"
    chat = "chat"


class TaskRecords(ApiModel):
    """The source's records are a fine-tuning task: each becomes one conversation, tokenized with
    the job's tokenizer and chat template, and the loss covers the assistant turns only."""

    format: TaskFormat = Field(
        description="promptResponse: one prompt and one response field per record (a single-turn "
        "chat, user then assistant); chat: a list of {role, content} messages (roles system, user, "
        "assistant; user and assistant alternate, the last turn is the assistant's)."
    )
    prompt_field: str = Field(
        "prompt", min_length=1, max_length=256, description="promptResponse: key/column of the prompt."
    )
    response_field: str = Field(
        "response", min_length=1, max_length=256, description="promptResponse: key/column of the response."
    )
    messages_field: str = Field(
        "messages", min_length=1, max_length=256, description="chat: key/column of the message list."
    )
    system: str | None = Field(
        None,
        min_length=1,
        max_length=16_384,
        description="A system message put first in every conversation that has none (unset: none).",
    )


class DataSource(ApiModel):
    """One text source. Set exactly one of s3, local, huggingface, pythonStdlib."""

    cel_rules: ClassVar[tuple[CelRule, ...]] = (
        cel(
            exactly_one("s3", "local", "huggingface", "pythonStdlib"),
            "set exactly one of s3, local, huggingface, pythonStdlib",
        ),
        cel(
            "!has(self.task) || (has(self.local) && has(self.local.format) && self.local.format != 'text') "
            "|| (has(self.s3) && has(self.s3.format) && self.s3.format != 'text') "
            "|| (has(self.huggingface) && self.huggingface.builder != 'text')",
            "task records are read from jsonl or parquet: set format jsonl or parquet (huggingface: "
            "builder json or parquet)",
            ".task",
        ),
    )

    name: str = Field(
        min_length=1,
        max_length=63,
        pattern=r"^[a-z0-9]([a-z0-9\-]*[a-z0-9])?$",
        description="Unique source name (DNS label); used in the manifest's per-source statistics.",
    )
    weight: float | None = Field(
        None,
        gt=0,
        le=1000,
        description="Mixture weight: this source's target share of training tokens, relative to the "
        "other sources' weights (normalised to sum to 1), realised by deterministic up/down-sampling. "
        "Unset on every source: natural proportions.",
    )
    s3: S3Source | None = Field(None, description="Read objects under an S3 prefix.")
    local: LocalSource | None = Field(None, description="Read local files matched by a glob.")
    huggingface: HuggingFaceSource | None = Field(None, description="Read local files with HF datasets.")
    python_stdlib: PythonStdlibSource | None = Field(
        None, description="The builtin corpus: the Python standard library's own source."
    )
    task: TaskRecords | None = Field(
        None,
        description="Fine-tuning task records (prompt/response or chat) instead of plain text: the loss "
        "covers the responses only. Set on every source and validation source, or on none.",
    )


class UnicodeNormalization(StrEnum):
    NFC = "NFC"
    NFKC = "NFKC"
    NFD = "NFD"
    NFKD = "NFKD"
    none = "none"


class DedupMode(StrEnum):
    exact = "exact"
    none = "none"


class Preprocessing(ApiModel):
    """Cleaning applied to every document before tokenization."""

    cel_rules: ClassVar[tuple[CelRule, ...]] = (
        cel(
            "!has(self.maxChars) || self.maxChars >= self.minChars",
            "maxChars must be at least minChars",
            ".maxChars",
        ),
    )

    normalization: UnicodeNormalization = Field(
        UnicodeNormalization.NFC, description="Unicode normalisation form (NFC, NFKC, NFD, NFKD or none)."
    )
    remove_control_chars: bool = Field(
        True, description="Remove control characters other than tab and newline."
    )
    normalize_whitespace: bool = Field(
        True,
        description="Turn CRLF/CR into LF, strip trailing spaces and collapse runs of 3+ blank lines.",
    )
    min_chars: int = Field(1, ge=0, le=10_000_000, description="Drop documents shorter than this.")
    max_chars: int | None = Field(
        None, ge=1, le=1_000_000_000, description="Drop documents longer than this (unset: no limit)."
    )
    dedup: DedupMode = Field(
        DedupMode.exact,
        description="exact: keep one copy of documents whose normalised text is identical, across all "
        "files and sources; none: keep duplicates.",
    )


class TokenizerTrain(ApiModel):
    """Train a byte-level BPE tokenizer on a sample of the cleaned corpus."""

    vocab_size: int = Field(ge=260, le=1_048_576, description="Vocabulary size including special tokens.")
    special_tokens: list[Annotated[str, Field(min_length=1, max_length=64)]] = Field(
        default_factory=lambda: [DEFAULT_EOT],
        max_length=64,
        description="Special tokens; the first is the end-of-text token appended to every document.",
    )
    min_frequency: int = Field(2, ge=1, le=1_000_000, description="Minimum pair frequency for a merge.")
    sample_bytes: int = Field(
        200_000_000,
        ge=1_000,
        le=100_000_000_000,
        description="Train on at most this many bytes of text, chosen by stable document key.",
    )


class TokenizerLoad(ApiModel):
    """Load an existing tokenizer.json."""

    uri: Uri = Field(description="Path or s3:// URI of a tokenizers tokenizer.json.")
    end_of_text: str = Field(
        DEFAULT_EOT, max_length=64, description="The end-of-text special token appended to every document."
    )


class TokenizerSpec(ApiModel):
    """Set exactly one of train or load."""

    cel_rules: ClassVar[tuple[CelRule, ...]] = (
        cel(exactly_one("train", "load"), "set exactly one of tokenizer.train or tokenizer.load"),
    )

    train: TokenizerTrain | None = Field(None, description="Train a byte-level BPE tokenizer.")
    load: TokenizerLoad | None = Field(None, description="Load an existing tokenizer.json.")
    chat_template: str | None = Field(
        None,
        min_length=1,
        max_length=16_384,
        description="Jinja chat template (Hugging Face tokenizer_config.json format) that turns task "
        "conversations into text; wrap what the model learns in {% generation %}…{% endgeneration %}. "
        "Unset: the imported tokenizer's (beside load.uri, then in model.init.pretrained.uri), else "
        "llmtrain's default. Written into the export's tokenizer_config.json.",
    )


class DataSpec(ApiModel):
    """Where text comes from, how it is cleaned and tokenized, and where shards go."""

    cel_rules: ClassVar[tuple[CelRule, ...]] = (
        cel(
            "self.sources.all(s, self.sources.exists_one(t, t.name == s.name))",
            "source names must be unique",
            ".sources",
        ),
        cel(
            "self.sources.all(s, has(s.weight)) || self.sources.all(s, !has(s.weight))",
            "set weight on every source or on none",
            ".sources",
        ),
        cel(
            "!has(self.validationSources) || (self.validationSources.all(v, "
            "self.validationSources.exists_one(w, w.name == v.name) && "
            "!self.sources.exists(s, s.name == v.name)))",
            "validation source names must be unique and differ from spec.data.sources' names",
            ".validationSources",
        ),
        cel(
            "!has(self.validationSources) || self.validationSources.all(v, !has(v.weight))",
            "validation sources take no weight (weights mix the training data)",
            ".validationSources",
        ),
        cel(
            "self.sources.all(s, has(s.task)) ? (!has(self.validationSources) || "
            "self.validationSources.all(v, has(v.task))) : (self.sources.all(s, !has(s.task)) && "
            "(!has(self.validationSources) || self.validationSources.all(v, !has(v.task))))",
            "set task on every source and validation source or on none (task records and plain text "
            "do not mix)",
            ".sources",
        ),
        cel(
            "self == oldSelf",
            "spec.data is immutable: create a new job to train on other data",
            reason="FieldValueForbidden",
        ),
    )

    sources: list[DataSource] = Field(min_length=1, max_length=32, description="Text sources (at least one).")
    preprocessing: Preprocessing = Field(
        default_factory=Preprocessing, description="Cleaning: normalisation, filters, dedup."
    )
    tokenizer: TokenizerSpec = Field(description="Train a BPE tokenizer or load one.")
    output_uri: Uri = Field(
        description="Where shards, tokenizer.json and manifest.json are written: s3://bucket/prefix or a "
        "local directory. Reused when it holds a manifest with the same input fingerprint."
    )
    validation_fraction: float = Field(
        0.01,
        gt=0,
        lt=0.5,
        description="Fraction of documents held out for validation, assigned by hash(document key, seed); "
        "not used when validationSources is set.",
    )
    validation_sources: list[DataSource] = Field(
        default_factory=list,
        max_length=8,
        description="The validation set, from its own sources (same kinds as sources), tokenized with the "
        "job's tokenizer and never trained on: a document also found in sources is removed from training. "
        "Unset: the hash split of validationFraction.",
    )
    shard_max_tokens: int = Field(
        100_000_000, ge=1_000, le=4_000_000_000, description="Maximum tokens per shard file."
    )
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Seed of the split, sampling and shuffles.")


# -------------------------------------------------------------------------- model


class Architecture(ApiModel):
    """Decoder-only transformer (Llama layout): RMSNorm, RoPE, SwiGLU, grouped-query attention."""

    cel_rules: ClassVar[tuple[CelRule, ...]] = (
        cel("self.dModel % self.heads == 0", "dModel must be divisible by heads", ".dModel"),
        cel(
            "!has(self.kvHeads) || self.heads % self.kvHeads == 0",
            "heads must be divisible by kvHeads",
            ".kvHeads",
        ),
        cel(
            "(self.dModel / self.heads) % 2 == 0",
            "the head dimension dModel/heads must be even for RoPE",
            ".dModel",
        ),
        cel(
            "self == oldSelf",
            "spec.model.architecture is immutable: create a new job for another architecture",
            reason="FieldValueForbidden",
        ),
    )

    layers: int = Field(ge=1, le=512, description="Number of transformer blocks.")
    d_model: int = Field(ge=8, le=65_536, description="Model (residual stream) width.")
    heads: int = Field(ge=1, le=1024, description="Attention (query) heads; dModel must be divisible by it.")
    kv_heads: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="Key/value heads for grouped-query attention; heads must be divisible by it. "
        "Unset: equal to heads (multi-head attention).",
    )
    context_length: int = Field(ge=8, le=1_048_576, description="Sequence length in tokens.")
    rope_theta: float = Field(10_000.0, gt=0, le=1e9, description="RoPE base frequency.")
    norm_eps: float = Field(1e-5, gt=0, le=0.1, description="RMSNorm epsilon.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on attention and residual outputs.")
    tie_embeddings: bool = Field(
        False, description="Share the token embedding matrix with the output projection."
    )
    ffn_hidden_size: int | None = Field(
        None,
        ge=1,
        le=1_048_576,
        description="SwiGLU hidden size. Unset: multipleOf * ceil(int(ffnDimMultiplier * int(8 * dModel / 3)) "
        "/ multipleOf), the Llama/torchtitan convention.",
    )
    multiple_of: int = Field(
        256, ge=1, le=65_536, description="Round the derived SwiGLU hidden size up to a multiple of this."
    )
    ffn_dim_multiplier: float = Field(
        1.0, gt=0, le=64, description="Scale of the derived SwiGLU hidden size before rounding."
    )
    vocab_multiple_of: int = Field(
        64,
        ge=1,
        le=4096,
        description="Pad the embedding table to a multiple of this many rows (faster matmuls).",
    )

    @property
    def resolved_kv_heads(self) -> int:
        return self.kv_heads if self.kv_heads is not None else self.heads

    @property
    def resolved_ffn_hidden_size(self) -> int:
        return resolve_ffn_hidden_size(
            self.d_model, self.ffn_hidden_size, self.multiple_of, self.ffn_dim_multiplier
        )


def resolve_ffn_hidden_size(
    d_model: int, ffn_hidden_size: int | None, multiple_of: int, ffn_dim_multiplier: float
) -> int:
    """SwiGLU hidden size: explicit, else the Llama/torchtitan rounding rule."""
    if ffn_hidden_size is not None:
        return ffn_hidden_size
    hidden = int(ffn_dim_multiplier * int(8 * d_model / 3))
    return multiple_of * math.ceil(hidden / multiple_of)


class RandomInit(ApiModel):
    """Random initialisation, identical for every world size given the seed."""

    seed: int = Field(0, ge=0, le=2**31 - 1, description="Seed of the initial weights.")
    std: float = Field(0.02, gt=0, le=1, description="Standard deviation of the normal initialisation.")


class CheckpointInit(ApiModel):
    """Start from the weights of an llmtrain checkpoint (optimizer state is not loaded)."""

    uri: Uri = Field(description="Checkpoint directory (s3:// or local) holding a completion marker.")


class PretrainedInit(ApiModel):
    """Start from an exported model or a Hugging Face Llama checkpoint in save_pretrained layout."""

    uri: Uri = Field(description="Directory (s3:// or local) with config.json and *.safetensors.")


class InitSpec(ApiModel):
    """How the weights start. Set at most one of random, checkpoint, pretrained (default random)."""

    cel_rules: ClassVar[tuple[CelRule, ...]] = (
        cel(
            "(has(self.random) ? 1 : 0) + (has(self.checkpoint) ? 1 : 0) + (has(self.pretrained) ? 1 : 0) <= 1",
            "set at most one of random, checkpoint, pretrained",
        ),
    )

    random: RandomInit | None = Field(None, description="Random initialisation (the default).")
    checkpoint: CheckpointInit | None = Field(None, description="Fine-tune from an llmtrain checkpoint.")
    pretrained: PretrainedInit | None = Field(None, description="Fine-tune from an exported/HF Llama model.")


class ModelSpec(ApiModel):
    """Architecture and initialisation of the model."""

    architecture: Architecture = Field(description="Transformer shape.")
    init: InitSpec = Field(default_factory=InitSpec, description="Initial weights (default random).")


# ----------------------------------------------------------------------- training


class OptimizerType(StrEnum):
    adamw = "adamw"
    sgd = "sgd"


class OptimizerSpec(ApiModel):
    """AdamW (weight decay on 2-D weights only) or SGD with momentum."""

    cel_rules: ClassVar[tuple[CelRule, ...]] = (
        cel(
            "self.type == 'sgd' || !has(self.nesterov) || !self.nesterov",
            "nesterov applies to sgd only",
            ".nesterov",
        ),
    )

    type: OptimizerType = Field(OptimizerType.adamw, description="adamw or sgd.")
    lr: float = Field(3e-4, gt=0, le=10, description="Peak learning rate.")
    weight_decay: float = Field(0.1, ge=0, le=10, description="Decoupled weight decay (2-D weights only).")
    beta1: float = Field(0.9, ge=0, lt=1, description="AdamW beta1.")
    beta2: float = Field(0.95, ge=0, lt=1, description="AdamW beta2.")
    eps: float = Field(1e-8, gt=0, le=1, description="AdamW epsilon.")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum.")
    nesterov: bool = Field(False, description="SGD Nesterov momentum.")


class DecaySchedule(StrEnum):
    cosine = "cosine"
    linear = "linear"
    constant = "constant"


class ScheduleSpec(ApiModel):
    """Linear warmup, then decay to minLr."""

    warmup_steps: int = Field(0, ge=0, le=100_000_000, description="Linear warmup steps from 0 to lr.")
    decay: DecaySchedule = Field(DecaySchedule.cosine, description="cosine, linear or constant after warmup.")
    min_lr: float = Field(0.0, ge=0, le=10, description="Learning rate at the end of the decay.")


class BatchSpec(ApiModel):
    """Global batch in sequences; accumulation = globalBatchSize / (microBatchSize × workers)."""

    cel_rules: ClassVar[tuple[CelRule, ...]] = (
        cel(
            "self.globalBatchSize >= self.microBatchSize",
            "globalBatchSize must be at least microBatchSize",
            ".globalBatchSize",
        ),
        cel(
            "self == oldSelf",
            "spec.training.batch is immutable: it defines the data order checkpoints resume into",
            reason="FieldValueForbidden",
        ),
    )

    global_batch_size: int = Field(ge=1, le=1_048_576, description="Sequences per optimizer step, all ranks.")
    micro_batch_size: int = Field(ge=1, le=65_536, description="Sequences per forward/backward on one rank.")


class DurationSpec(ApiModel):
    """Set exactly one of epochs, maxSteps, maxTokens."""

    cel_rules: ClassVar[tuple[CelRule, ...]] = (
        cel(exactly_one("epochs", "maxSteps", "maxTokens"), "set exactly one of epochs, maxSteps, maxTokens"),
    )

    epochs: int | None = Field(None, ge=1, le=100_000, description="Passes over the training split.")
    max_steps: int | None = Field(None, ge=1, le=1_000_000_000, description="Optimizer steps.")
    max_tokens: int | None = Field(
        None, ge=1, le=10**16, description="Training tokens (rounded up to whole steps)."
    )


class Precision(StrEnum):
    auto = "auto"
    bf16 = "bf16"
    fp32 = "fp32"


class FsdpSpec(ApiModel):
    """FSDP2 (fully_shard) settings."""

    reshard_after_forward: bool = Field(
        True, description="Free gathered parameters after forward (less memory, one more all-gather)."
    )
    activation_checkpointing: bool = Field(
        False, description="Recompute each block's activations in backward (less memory, ~33% more compute)."
    )


# LoRA targets: our projection modules (runtime/model.py), named as in the state dict.
LORA_TARGETS = (
    "attention.wq",
    "attention.wk",
    "attention.wv",
    "attention.wo",
    "feed_forward.w1",
    "feed_forward.w2",
    "feed_forward.w3",
)
LoraTarget = Literal[
    "attention.wq",
    "attention.wk",
    "attention.wv",
    "attention.wo",
    "feed_forward.w1",
    "feed_forward.w2",
    "feed_forward.w3",
]


class LoraSpec(ApiModel):
    """Low-rank adapters on a frozen base (LoRA): only the adapters train and are checkpointed."""

    rank: int = Field(8, ge=1, le=4096, description="Rank r of each adapter (A: r × in, B: out × r).")
    alpha: float = Field(
        16.0, gt=0, le=1_000_000, description="Scale: the update B·A is multiplied by alpha / rank."
    )
    targets: list[LoraTarget] = Field(
        default_factory=lambda: list[LoraTarget](["attention.wq", "attention.wv"]),
        min_length=1,
        max_length=len(LORA_TARGETS),
        description="Projections that get adapters, in every layer: " + ", ".join(LORA_TARGETS) + ".",
    )
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapter's input (training only).")

    @field_validator("targets", mode="before")
    @classmethod
    def _known_targets(cls, value: Any) -> Any:
        # Before the Literal check, so the error names the field and every choice once.
        unknown = [t for t in value if t not in LORA_TARGETS] if isinstance(value, list) else []
        if unknown:
            raise ValueError(
                f"unknown LoRA target(s) {unknown} in spec.training.lora.targets: choose from "
                + ", ".join(LORA_TARGETS)
            )
        return value


class TrainingSpec(ApiModel):
    """Optimizer, schedule, batch, duration and numerics."""

    cel_rules: ClassVar[tuple[CelRule, ...]] = (
        # The schedule decays from lr to minLr (runtime/train.py lr_at): above lr it would rise.
        cel(
            "self.schedule.minLr <= self.optimizer.lr",
            "training.schedule.minLr must be at most training.optimizer.lr: the schedule decays "
            "from the peak lr down to minLr; lower minLr or raise lr",
            ".schedule.minLr",
        ),
    )

    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec, description="Optimizer.")
    schedule: ScheduleSpec = Field(default_factory=ScheduleSpec, description="Learning-rate schedule.")
    batch: BatchSpec = Field(description="Global and micro batch size.")
    duration: DurationSpec = Field(description="How long to train.")
    precision: Precision = Field(
        Precision.auto, description="auto = bf16 mixed precision on GPU, fp32 on CPU; or bf16 / fp32."
    )
    fsdp: FsdpSpec = Field(default_factory=FsdpSpec, description="FSDP2 settings.")
    compile: bool = Field(False, description="torch.compile each transformer block.")
    grad_clip: float = Field(
        1.0, ge=0, le=1e6, description="Clip gradients to this global L2 norm; 0 disables clipping."
    )
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Seed of dropout and data order.")
    log_every_steps: int = Field(
        10, ge=1, le=1_000_000, description="Log, report progress and check for NaN every N steps."
    )
    lora: LoraSpec | None = Field(
        None,
        description="Train low-rank adapters on the frozen base of spec.model.init (pretrained or "
        "checkpoint) instead of every weight (unset: full fine-tuning).",
    )


class TaskChecker(StrEnum):
    """Named pass/fail checks of a greedy answer (runtime/task_metric.py CHECKERS, same names)."""

    exact_match = "exactMatch"  # the answer equals the reference (whitespace normalised)
    identifier = "identifier"  # the answer is the reference Python identifier, nothing else


class TaskMetricSpec(ApiModel):
    """Greedy answers to held-out task prompts, scored: exact match and the named checker."""

    records: int = Field(
        100,
        ge=1,
        le=10_000,
        description="Held-out task records decoded per validation (the first N of the task-eval set).",
    )
    max_new_tokens: int = Field(
        32, ge=1, le=4096, description="Answer length limit in tokens (decoding also stops at end-of-text)."
    )
    checker: TaskChecker = Field(
        TaskChecker.exact_match,
        description="Pass/fail per answer: exactMatch, or identifier (the answer is the reference Python "
        "identifier).",
    )


class ValidationSpec(ApiModel):
    """Held-out evaluation: loss, perplexity and next-token accuracy."""

    every_steps: int = Field(100, ge=1, le=100_000_000, description="Validate every N steps and at the end.")
    batches: int = Field(
        10, ge=1, le=1_000_000, description="Micro batches per rank: the same first windows every time."
    )
    task: TaskMetricSpec | None = Field(
        None,
        description="Also decode held-out task prompts greedily and score the answers (needs task data: "
        "spec.data.sources[].task). Unset: loss metrics only.",
    )


class CheckpointSpec(ApiModel):
    """Distributed checkpoints (torch.distributed.checkpoint) with a completion marker."""

    uri: Uri | None = Field(
        None,
        description="s3://bucket/prefix or local directory. Unset: <run dir>/checkpoints locally; "
        "required on Kubernetes.",
    )
    every_steps: int = Field(500, ge=1, le=100_000_000, description="Save every N steps and at the end.")
    keep_last: int = Field(
        3,
        ge=1,
        le=1000,
        description="Keep this many of this job's complete checkpoints (the resumed one, and any of a job taken "
        "over, are never deleted).",
    )
    take_over: bool = Field(
        False,
        description="Take over uri (and the output prefix beside it) when another job's OWNER record "
        "is there: that job must be gone (e.g. deleted and created again under the same name). This job "
        "resumes from its checkpoints but never deletes them. Unset: such a prefix fails the job "
        "(OutputPrefixInUse).",
    )
    on_disruption: bool = Field(
        True,
        description="When a node hosting the job's pods is drained (or a pod is to be evicted), the "
        "operator asks the run for a just-in-time checkpoint before the pods go (bounded by the "
        "operator's --suspend-checkpoint-seconds; a PodDisruptionBudget holds the drain until then). "
        "false: the pods go at once and the run resumes from its newest periodic checkpoint.",
    )


class ExportFormat(StrEnum):
    hf_llama_safetensors = "hf-llama-safetensors"


class LoraExport(StrEnum):
    merged = "merged"
    adapter = "adapter"


class ExportSpec(ApiModel):
    """Consolidated export at the end of the run."""

    uri: Uri = Field(description="s3://bucket/prefix or local directory for the exported model.")
    format: ExportFormat = Field(
        ExportFormat.hf_llama_safetensors,
        description="hf-llama-safetensors: LlamaForCausalLM safetensors + config + tokenizer.",
    )
    sample_prompt: str | None = Field(
        None,
        max_length=4096,
        description="Prompt of the sample `llmtrain run` prints from the export (unset: the first words "
        "of a validation document).",
    )
    lora: LoraExport = Field(
        LoraExport.merged,
        description="With training.lora: merged = base + adapters as one Llama model; adapter = PEFT's "
        "adapter_config.json + adapter_model.safetensors, pointing at the base (spec.model.init).",
    )


class SecretRef(ApiModel):
    """A Secret in the job's namespace holding S3 credentials."""

    name: Name = Field(description="Secret name.")
    access_key_id_key: str = Field(
        "AWS_ACCESS_KEY_ID", max_length=253, description="Key of the access key id in the Secret."
    )
    secret_access_key_key: str = Field(
        "AWS_SECRET_ACCESS_KEY", max_length=253, description="Key of the secret access key in the Secret."
    )


class StorageSpec(ApiModel):
    """Object storage used by data, checkpoints and export. Credentials only via secretRef."""

    endpoint: str | None = Field(
        None, max_length=1024, description="S3 endpoint URL (unset: AWS for the region)."
    )
    region: str = Field("us-east-1", max_length=64, description="S3 region.")
    secret_ref: SecretRef | None = Field(
        None,
        description="Secret with the credentials. Unset: the pod's ambient credentials (IRSA, env).",
    )


class MetricsSpec(ApiModel):
    """Prometheus metrics served by every training worker."""

    enabled: bool = Field(True, description="Serve /metrics from every worker.")
    port: int = Field(
        9400,
        ge=1024,
        le=65_000,
        description="Port of the workers' /metrics; offset by local rank when workers share a host.",
    )


# ---------------------------------------------------------------------- resources


class ComputeResources(ApiModel):
    """CPU and memory of one pod (requests equal limits)."""

    cel_rules: ClassVar[tuple[CelRule, ...]] = (quantity_rule("cpu"), quantity_rule("memory"))

    cpu: Quantity = Field("4", description="CPU cores, e.g. 8 or 500m.")
    memory: Quantity = Field("16Gi", description="Memory, e.g. 64Gi.")


class LocalObjectReference(ApiModel):
    name: Name = Field(description="Name of the referenced object.")


class SecretKeyRef(ApiModel):
    """One key of a Secret in the job's namespace."""

    name: Name = Field(description="Secret name.")
    # A Secret's own rule for its keys, so a key no Secret can hold is refused at apply.
    key: str = Field(
        min_length=1, max_length=253, pattern=r"^[-._a-zA-Z0-9]+$", description="Key within the Secret."
    )


class KeySelector(ApiModel):
    name: Name = Field(description="Name of the Secret or ConfigMap.")
    key: str = Field(min_length=1, max_length=253, description="Key within it.")


class EnvVarSource(ApiModel):
    """Where an environment variable's value comes from."""

    cel_rules: ClassVar[tuple[CelRule, ...]] = (
        cel(
            exactly_one("secretKeyRef", "configMapKeyRef"),
            "set exactly one of secretKeyRef, configMapKeyRef",
        ),
    )

    secret_key_ref: KeySelector | None = Field(None, description="A key of a Secret.")
    config_map_key_ref: KeySelector | None = Field(None, description="A key of a ConfigMap.")


SECRET_ENV_NAMES = (
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "RAY_AUTH_TOKEN",
    "WANDB_API_KEY",
)


class EnvVar(ApiModel):
    """An environment variable for every Ray container."""

    cel_rules: ClassVar[tuple[CelRule, ...]] = (
        cel("!(has(self.value) && has(self.valueFrom))", "set value or valueFrom, not both"),
        cel(
            "!has(self.value) || !(self.name in "
            + "["
            + ", ".join(f"'{n}'" for n in SECRET_ENV_NAMES)
            + "])",
            "inline secrets are not allowed: put the value in a Secret and use valueFrom.secretKeyRef",
            ".value",
        ),
    )

    name: str = Field(
        min_length=1, max_length=253, pattern=r"^[-._a-zA-Z][-._a-zA-Z0-9]*$", description="Variable name."
    )
    value: str | None = Field(None, max_length=32_768, description="Literal value (not for secrets).")
    value_from: EnvVarSource | None = Field(None, description="Value from a Secret or ConfigMap key.")


class VolumeMount(ApiModel):
    name: Name = Field(description="Name of a volume in resources.volumes.")
    mount_path: str = Field(min_length=1, max_length=4096, description="Path inside the container.")
    read_only: bool = Field(False, description="Mount read-only.")
    sub_path: str | None = Field(None, max_length=4096, description="Sub-path of the volume to mount.")


class Toleration(ApiModel):
    """A core/v1 Toleration."""

    key: str | None = Field(None, max_length=316, description="Taint key (empty with Exists: all taints).")
    operator: Literal["Exists", "Equal"] = Field("Equal", description="Exists or Equal.")
    value: str | None = Field(None, max_length=63, description="Taint value for Equal.")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        None, description="Taint effect to tolerate (unset: all)."
    )
    toleration_seconds: int | None = Field(None, ge=0, description="For NoExecute: how long to stay bound.")


class K8sObject(ApiModel):
    """Kubernetes' own object (core/v1), passed through to the pods as written."""

    model_config = ConfigDict(extra="allow")
    preserve_unknown: ClassVar[bool] = True


class Affinity(K8sObject):
    """A core/v1 Affinity (nodeAffinity, podAffinity, podAntiAffinity), passed to every Ray pod."""


class Volume(K8sObject):
    """A core/v1 Volume, added to every Ray pod."""


class ResourcesSpec(ApiModel):
    """The ephemeral Ray cluster: workers, GPUs, placement and pod settings."""

    cel_rules: ClassVar[tuple[CelRule, ...]] = (
        quantity_rule("shmSize"),
        cel(
            "self.workers == oldSelf.workers",
            "spec.resources.workers is immutable: checkpoints are laid out for the world size",
            ".workers",
            reason="FieldValueForbidden",
        ),
    )

    workers: int = Field(1, ge=1, le=1024, description="Training workers (Ray worker pods, one rank each).")
    gpus_per_worker: int = Field(0, ge=0, le=16, description="nvidia.com/gpu per worker (0: CPU training).")
    worker: ComputeResources = Field(default_factory=ComputeResources, description="Per-worker CPU/memory.")
    head: ComputeResources = Field(
        default_factory=lambda: ComputeResources(cpu="2", memory="8Gi"),
        description="Ray head CPU/memory (the head runs no training).",
    )
    image: str = Field(
        "ghcr.io/llmtrain/llmtrain:0.1.0", max_length=1024, description="Container image of every Ray pod."
    )
    image_pull_secrets: list[LocalObjectReference] = Field(
        default_factory=list, max_length=16, description="Secrets for pulling the image."
    )
    service_account_name: str | None = Field(None, max_length=253, description="Pods' service account.")
    env: list[EnvVar] = Field(default_factory=list, max_length=128, description="Environment variables.")
    volumes: list[Volume] = Field(default_factory=list, max_length=64, description="core/v1 Volumes.")
    volume_mounts: list[VolumeMount] = Field(
        default_factory=list, max_length=64, description="Mounts of those volumes in every Ray container."
    )
    pod_labels: dict[str, Annotated[str, Field(max_length=63)]] = Field(
        default_factory=dict, description="Extra labels on every Ray pod."
    )
    pod_annotations: dict[str, str] = Field(
        default_factory=dict, description="Extra annotations on every pod."
    )
    shm_size: Quantity = Field("8Gi", description="Size of the in-memory /dev/shm (Ray object store, NCCL).")
    node_selector: dict[str, str] = Field(
        default_factory=dict, description="Node labels the worker pods require, e.g. a GPU pool."
    )
    tolerations: list[Toleration] = Field(
        default_factory=list, max_length=32, description="Tolerations of the worker pods."
    )
    affinity: Affinity | None = Field(None, description="core/v1 Affinity of the worker pods.")
    priority_class_name: str | None = Field(None, max_length=253, description="PriorityClass of the pods.")
    queue_name: str | None = Field(
        None,
        max_length=63,
        description="Kueue LocalQueue: the job waits, with no pod, until Kueue admits its Workload (docs/kueue.md).",
    )


class ServeSpec(ApiModel):
    """Serve the exported model once the job has Succeeded: ``llmtrain serve`` (an
    OpenAI-compatible API) in a Deployment behind a Service, owned by the job."""

    replicas: int = Field(1, ge=0, le=64, description="Server pods (0 keeps the Service, stops serving).")
    resources: ComputeResources = Field(
        default_factory=lambda: ComputeResources(cpu="2", memory="4Gi"),
        description="Per-replica CPU/memory.",
    )
    gpus: int = Field(0, ge=0, le=16, description="nvidia.com/gpu per replica (0: CPU serving).")
    node_selector: dict[str, str] | None = Field(
        None,
        description="Node labels the server pods require (unset: resources.nodeSelector, the training pool).",
    )
    tolerations: list[Toleration] | None = Field(
        None, max_length=32, description="Tolerations of the server pods (unset: resources.tolerations)."
    )
    port: int = Field(8000, ge=1024, le=65_000, description="Port of the API on the pods and the Service.")
    allowed_namespaces: dict[str, Annotated[str, Field(max_length=63)]] | None = Field(
        None,
        description="Labels of the namespaces whose pods may call the API ({} admits every namespace; "
        "unset: the job's namespace only).",
    )
    allowed_pods: dict[str, Annotated[str, Field(max_length=63)]] | None = Field(
        None, description="Labels of the pods that may call the API (unset: every pod of those namespaces)."
    )
    api_key_secret_ref: SecretKeyRef | None = Field(
        None,
        description="A Secret key holding the API key clients must send as `Authorization: Bearer <key>` "
        "(mounted read-only into the server pods, passed as --api-key-file; unset: no key, the "
        "NetworkPolicy alone admits clients). /health stays open. A new key in the Secret is read when "
        "the pods restart (kubectl rollout restart deployment/<job>-serve).",
    )
    max_waiting: int | None = Field(
        None,
        ge=1,
        le=10_000,
        description="Requests a replica holds waiting for a batch slot; beyond them it answers 429 with "
        "Retry-After (--max-waiting; unset: the server's default).",
    )
    storage_secret_ref: SecretRef | None = Field(
        None,
        description="Secret with the server pods' S3 credentials, used instead of spec.storage.secretRef: "
        "the server only reads export.uri, so give it credentials that can only read (unset: "
        "spec.storage.secretRef's, which can also write and delete the job's checkpoints).",
    )


# ------------------------------------------------------------------------- tuning

# The spec paths a search space may set (camelCase, as written in the manifest), and
# whether each is an integer field (samples are rounded). Numbers only: the CRD schema
# needs one type per list, and the architecture beyond dropout is immutable.
TUNABLE_PATHS: dict[str, bool] = {
    "training.optimizer.lr": False,
    "training.optimizer.weightDecay": False,
    "training.optimizer.beta1": False,
    "training.optimizer.beta2": False,
    "training.optimizer.eps": False,
    "training.optimizer.momentum": False,
    "training.schedule.warmupSteps": True,
    "training.schedule.minLr": False,
    "training.batch.globalBatchSize": True,
    "training.batch.microBatchSize": True,
    "training.gradClip": False,
    "training.seed": True,
    "model.architecture.dropout": False,
}
_TUNABLE_LIST = "[" + ", ".join(f"'{p}'" for p in TUNABLE_PATHS) + "]"


class SearchAlgorithm(StrEnum):
    grid = "grid"
    random = "random"
    bayesian = "bayesian"


class TuneMetric(StrEnum):
    val_loss = "valLoss"
    val_perplexity = "valPerplexity"
    val_accuracy = "valAccuracy"
    val_task_score = "valTaskScore"


class TuneMode(StrEnum):
    min = "min"
    max = "max"


class Distribution(ApiModel):
    """One dimension of the search space. Set exactly one of choice, uniform, logUniform.

    The rules on the values live on ``tuning`` (CEL over the whole map), so the apiserver
    and ``llmtrain validate`` both name ``spec.tuning.space``; the checks below add the key."""

    choice: list[float] | None = Field(
        None, max_length=64, description="Values to choose from (grid search runs every one)."
    )
    uniform: list[float] | None = Field(
        None, min_length=2, max_length=2, description="[low, high]: uniform between them."
    )
    log_uniform: list[float] | None = Field(
        None, min_length=2, max_length=2, description="[low, high], 0 < low: uniform in log space."
    )

    @model_validator(mode="after")
    def _check(self) -> Distribution:
        given = [n for n in ("choice", "uniform", "log_uniform") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError("set exactly one of choice, uniform, logUniform")
        if self.choice is not None and not self.choice:
            raise ValueError("choice needs at least one value")
        for name, bounds in (("uniform", self.uniform), ("logUniform", self.log_uniform)):
            if bounds is not None and len(bounds) == 2:
                low, high = bounds
                if not low < high:
                    raise ValueError(f"{name} is [low, high] with low < high; got [{low:g}, {high:g}]")
                if name == "logUniform" and low <= 0:
                    raise ValueError(f"logUniform needs low > 0 (a log scale); got {low:g}")
        return self

    @property
    def continuous(self) -> bool:
        return self.choice is None


class TrialBudget(ApiModel):
    """How long each trial trains. Set exactly one of maxSteps, maxTokens."""

    cel_rules: ClassVar[tuple[CelRule, ...]] = (
        cel(exactly_one("maxSteps", "maxTokens"), "set exactly one of maxSteps, maxTokens"),
    )

    max_steps: int | None = Field(None, ge=1, le=1_000_000_000, description="Optimizer steps per trial.")
    max_tokens: int | None = Field(
        None, ge=1, le=10**16, description="Training tokens per trial (rounded up to whole steps)."
    )


class EarlyStopping(ApiModel):
    """ASHA (asynchronous successive halving): at each rung a trial whose metric is not in
    the best 1/reductionFactor of the trials that reached that step is stopped."""

    grace_period_steps: int = Field(
        1, ge=1, le=1_000_000_000, description="Steps every trial trains before it may be stopped."
    )
    reduction_factor: int = Field(
        3, ge=2, le=16, description="Keep the best 1/reductionFactor of the trials at each rung."
    )


class TuningFinal(ApiModel):
    """What happens after the search."""

    train: bool = Field(
        True,
        description="true: train the best configuration for spec.training.duration on all "
        "resources.workers and export it; false: export the best trial's own checkpoint.",
    )


class TuningSpec(ApiModel):
    """Hyperparameter search (Ray Tune) before the final training run: every trial trains
    the job's model on the prepared data with one sampled configuration."""

    cel_rules: ClassVar[tuple[CelRule, ...]] = (
        cel(
            "self.search != 'grid' || !has(self.numTrials)",
            "numTrials is for random and bayesian search: grid search runs exactly its grid",
            ".numTrials",
        ),
        cel(
            "self.search == 'grid' || has(self.numTrials)",
            "random and bayesian search need numTrials",
            ".numTrials",
        ),
        cel(
            "!has(self.initialRandomTrials) || self.search == 'bayesian'",
            "initialRandomTrials is for bayesian search",
            ".initialRandomTrials",
        ),
        cel(
            "!has(self.initialRandomTrials) || !has(self.numTrials) || "
            "self.initialRandomTrials < self.numTrials",
            "initialRandomTrials must be less than numTrials (else the search is random)",
            ".initialRandomTrials",
        ),
        cel(
            "self.space.all(k, k.startsWith('training.') || k == 'model.architecture.dropout')",
            "search space paths must be under training.* or be model.architecture.dropout "
            "(data, the architecture and resources are fixed for all trials)",
            ".space",
        ),
        cel(
            f"self.space.all(k, k in {_TUNABLE_LIST})",
            "search space paths must be one of: " + ", ".join(TUNABLE_PATHS),
            ".space",
        ),
        cel(
            "self.space.all(k, (has(self.space[k].choice) ? 1 : 0) + (has(self.space[k].uniform) ? 1 : 0)"
            " + (has(self.space[k].logUniform) ? 1 : 0) == 1)",
            "each search space entry sets exactly one of choice, uniform, logUniform",
            ".space",
        ),
        cel(
            "self.space.all(k, !has(self.space[k].choice) || size(self.space[k].choice) > 0)",
            "a choice needs at least one value",
            ".space",
        ),
        cel(
            "self.space.all(k, !has(self.space[k].uniform) || size(self.space[k].uniform) != 2 || "
            "double(self.space[k].uniform[0]) < double(self.space[k].uniform[1]))",
            "uniform is [low, high] with low < high",
            ".space",
        ),
        cel(
            "self.space.all(k, !has(self.space[k].logUniform) || size(self.space[k].logUniform) != 2 || "
            "(double(self.space[k].logUniform[0]) > 0.0 && "
            "double(self.space[k].logUniform[0]) < double(self.space[k].logUniform[1])))",
            "logUniform is [low, high] with 0 < low < high",
            ".space",
        ),
        cel(
            "self.search != 'grid' || self.space.all(k, has(self.space[k].choice))",
            "grid search needs a choice for every path: uniform and logUniform have no grid",
            ".space",
        ),
    )

    search: SearchAlgorithm = Field(
        description="grid (every combination of the choices), random, or bayesian (Optuna TPE)."
    )
    metric: TuneMetric = Field(
        TuneMetric.val_loss,
        description="What a trial is judged by: valLoss, valPerplexity, valAccuracy or valTaskScore "
        "(spec.validation.task's checker pass ratio).",
    )
    mode: TuneMode | None = Field(
        None, description="min or max. Unset: max for valAccuracy and valTaskScore, min otherwise."
    )
    num_trials: int | None = Field(
        None, ge=1, le=1000, description="Trials of a random or bayesian search (not for grid)."
    )
    initial_random_trials: int | None = Field(
        None,
        ge=1,
        le=999,
        description="Bayesian: random trials before TPE models the results (Optuna's n_startup_trials). "
        "Unset: min(10, numTrials / 2), so a small search is not all random.",
    )
    max_concurrent_trials: int = Field(
        1, ge=1, le=1024, description="Trials that run at once; × workersPerTrial ≤ resources.workers."
    )
    workers_per_trial: int = Field(1, ge=1, le=1024, description="Training workers of each trial.")
    trial_budget: TrialBudget = Field(description="How long each trial trains.")
    early_stopping: EarlyStopping | None = Field(
        None, description="ASHA early stopping of trials (unset: every trial runs its budget)."
    )
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Seed of the sampler (random and bayesian).")
    space: dict[str, Distribution] = Field(
        min_length=1,
        max_length=len(TUNABLE_PATHS),
        description="Spec path → distribution, e.g. training.optimizer.lr: {logUniform: [1e-4, 3e-3]}. "
        "Paths: " + ", ".join(TUNABLE_PATHS) + ".",
    )
    final: TuningFinal = Field(default_factory=TuningFinal, description="After the search.")

    @field_validator("space")
    @classmethod
    def _known_paths(cls, space: dict[str, Distribution]) -> dict[str, Distribution]:
        for path in space:
            if path not in TUNABLE_PATHS:
                raise ValueError(
                    f"{path!r} cannot be tuned: search space paths are " + ", ".join(TUNABLE_PATHS)
                )
        return space

    @property
    def resolved_mode(self) -> TuneMode:
        if self.mode is not None:
            return self.mode
        return (
            TuneMode.max
            if self.metric in (TuneMetric.val_accuracy, TuneMetric.val_task_score)
            else TuneMode.min
        )


# ------------------------------------------------------------------------- the job


class LLMTrainingJobSpec(ApiModel):
    """The whole workflow: data → tokenizer → shards → training → validation → checkpoints → export."""

    cel_rules: ClassVar[tuple[CelRule, ...]] = (
        cel(
            "self.training.batch.globalBatchSize % (self.training.batch.microBatchSize * self.resources.workers) == 0",
            "training.batch.globalBatchSize must be divisible by microBatchSize × resources.workers",
            ".training.batch.globalBatchSize",
        ),
        cel(
            "!has(self.training.duration.maxSteps) || "
            "self.training.schedule.warmupSteps < self.training.duration.maxSteps",
            "training.schedule.warmupSteps must be shorter than the run (maxSteps)",
            ".training.schedule.warmupSteps",
        ),
        cel(
            "!has(self.training.duration.maxTokens) || self.training.schedule.warmupSteps * "
            "self.training.batch.globalBatchSize * self.model.architecture.contextLength "
            "< self.training.duration.maxTokens",
            "training.schedule.warmupSteps must be shorter than the run (maxTokens)",
            ".training.schedule.warmupSteps",
        ),
        cel(
            "!has(self.training.lora) || (has(self.model.init) && "
            "(has(self.model.init.pretrained) || has(self.model.init.checkpoint)))",
            "training.lora trains adapters on a frozen base: set model.init.pretrained or "
            "model.init.checkpoint (a random base is not worth adapting)",
            ".training.lora",
        ),
        cel(
            "!has(self.validation) || !has(self.validation.task) || self.data.sources.all(s, has(s.task))",
            "validation.task scores answers to held-out task prompts: set data.sources[].task (task "
            "records), or remove validation.task",
            ".validation.task",
        ),
        cel(
            "!has(self.tuning) || !has(self.tuning.metric) || self.tuning.metric != 'valTaskScore' || "
            "(has(self.validation) && has(self.validation.task))",
            "tuning.metric valTaskScore needs validation.task (the task metric it reads)",
            ".tuning.metric",
        ),
        cel(
            "!has(self.serve) || has(self.export)",
            "serve needs spec.export: the server loads the exported model",
            ".serve",
        ),
        cel(
            "!has(self.tuning) || self.tuning.maxConcurrentTrials * self.tuning.workersPerTrial "
            "<= self.resources.workers",
            "tuning.maxConcurrentTrials × tuning.workersPerTrial must be at most resources.workers",
            ".tuning.maxConcurrentTrials",
        ),
    )

    data: DataSpec = Field(description="Data collection, cleaning, tokenization and sharding.")
    model: ModelSpec = Field(description="Architecture and initialisation.")
    training: TrainingSpec = Field(description="Optimizer, schedule, batch, duration, numerics.")
    validation: ValidationSpec = Field(default_factory=ValidationSpec, description="Held-out evaluation.")
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec, description="Checkpointing.")
    export: ExportSpec | None = Field(None, description="Export at the end of the run (unset: no export).")
    storage: StorageSpec = Field(default_factory=StorageSpec, description="S3 endpoint and credentials.")
    metrics: MetricsSpec = Field(default_factory=MetricsSpec, description="Prometheus metrics.")
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec, description="The Ray cluster.")
    suspend: bool = Field(
        False, description="true deletes the Ray pods and keeps status; false recreates them and resumes."
    )
    backoff_limit: int = Field(
        3, ge=0, le=1000, description="Restarts from the latest checkpoint before the job fails."
    )
    active_deadline_seconds: int | None = Field(
        None, ge=1, description="Fail the job after this long from start (time suspended not counted)."
    )
    pre_running_deadline_seconds: int | None = Field(
        None,
        ge=1,
        description="Fail the job if its pods are not all scheduled and Running within this time.",
    )
    ttl_seconds_after_finished: int | None = Field(
        None, ge=0, description="Delete the Ray cluster this long after the job finished (the CR stays)."
    )
    serve: ServeSpec | None = Field(
        None, description="Serve the exported model once the job has Succeeded (unset: no server)."
    )
    tuning: TuningSpec | None = Field(
        None,
        description="Hyperparameter search before the final training run (unset: train the spec as written).",
    )

    @property
    def gradient_accumulation(self) -> int:
        b = self.training.batch
        return b.global_batch_size // (b.micro_batch_size * self.resources.workers)
