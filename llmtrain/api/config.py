"""Contract (c): how the runtime receives its configuration.

The model and training core (``llmtrain.runtime.model`` / ``train``) take these plain,
frozen dataclasses, never the pydantic spec, so that core runs where pydantic is absent
(the lent GPU machine has torch but no pydantic, ray or boto3). They are derived from the
spec in exactly one function, :func:`runtime_config_from_spec`, and round-trip through
JSON (:meth:`RuntimeConfig.to_dict` / :meth:`RuntimeConfig.from_dict`) to reach Ray
workers or a bare ``torchrun``.

This module imports only the standard library.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:  # pragma: no cover - typing only; pydantic is not needed at run time
    from llmtrain.api.spec import LLMTrainingJobSpec


def pad_vocab(vocab_size: int, multiple_of: int) -> int:
    """Rows of the embedding table: the tokenizer's vocabulary rounded up."""
    return multiple_of * math.ceil(vocab_size / multiple_of)


def total_steps(
    *,
    max_steps: int | None,
    max_tokens: int | None,
    epochs: int | None,
    tokens_per_step: int,
    steps_per_epoch: int | None,
) -> int:
    """Optimizer steps of a run from its duration (exactly one of the three set): the one
    place a run's length is counted, for the final run (:meth:`TrainConfig.total_steps`, as
    rank 0 and the driver see it) and for a tuning trial's budget
    (:func:`llmtrain.api.tuning.trial_steps`). Tokens are rounded up to whole steps;
    ``steps_per_epoch`` is optimizer steps (only read for a duration in epochs)."""
    if max_steps is not None:
        return max_steps
    if max_tokens is not None:
        return math.ceil(max_tokens / tokens_per_step)
    assert epochs is not None
    if steps_per_epoch is None:
        raise ValueError("duration in epochs needs the loader's steps_per_epoch")
    return epochs * steps_per_epoch


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int  # padded embedding rows (>= tokenizer vocabulary)
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    context_length: int
    ffn_hidden_size: int  # resolved SwiGLU hidden size
    rope_theta: float = 10_000.0
    norm_eps: float = 1e-5
    dropout: float = 0.0
    tie_embeddings: bool = False
    init_std: float = 0.02
    init_seed: int = 0

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


@dataclass(frozen=True)
class OptimizerConfig:
    type: Literal["adamw", "sgd"] = "adamw"
    lr: float = 3e-4
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    momentum: float = 0.9
    nesterov: bool = False


@dataclass(frozen=True)
class ScheduleConfig:
    warmup_steps: int = 0
    decay: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr: float = 0.0


@dataclass(frozen=True)
class TrainConfig:
    global_batch_size: int  # sequences per optimizer step, all ranks
    micro_batch_size: int  # sequences per forward/backward, one rank
    world_size: int
    epochs: int | None = None  # exactly one of epochs / max_steps / max_tokens
    max_steps: int | None = None
    max_tokens: int | None = None
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    reshard_after_forward: bool = True
    activation_checkpointing: bool = False
    compile: bool = False
    grad_clip: float = 1.0  # 0 disables
    seed: int = 0
    log_every_steps: int = 10
    val_every_steps: int = 100
    val_batches: int = 10
    # spec.validation.task: greedy answers to this many held-out task records (0: no task metric).
    task_records: int = 0
    task_max_new_tokens: int = 32
    task_checker: str = "exactMatch"
    checkpoint_uri: str | None = None
    checkpoint_every_steps: int = 500
    checkpoint_keep_last: int = 3
    # The job that owns checkpoint_uri ("namespace/name/uid", llmtrain.runtime.owner): its
    # lineage deletes only what it wrote and stops if the prefix is taken over. "": unchecked.
    checkpoint_owner: str = ""
    init_kind: Literal["random", "checkpoint", "pretrained"] = "random"
    init_uri: str | None = None
    metrics_enabled: bool = True
    metrics_port: int = 9400
    # spec.storage: every worker opens its checkpoints (and init weights) there itself; the
    # environment's AWS_ENDPOINT_URL is not consulted (a run may have none, or another).
    storage_endpoint: str | None = None
    storage_region: str = "us-east-1"
    # spec.training.lora (rank 0: off): adapters on the targets, everything else frozen.
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ()
    lora_dropout: float = 0.0

    def __post_init__(self) -> None:
        # A config read back from JSON (RuntimeConfig.from_dict) carries the targets as a list.
        object.__setattr__(self, "lora_targets", tuple(dict.fromkeys(self.lora_targets)))
        per_step = self.micro_batch_size * self.world_size
        if self.global_batch_size % per_step:
            raise ValueError(
                f"global batch {self.global_batch_size} is not divisible by micro batch "
                f"{self.micro_batch_size} × world size {self.world_size} "
                "(spec.training.batch.globalBatchSize)"
            )
        if sum(x is not None for x in (self.epochs, self.max_steps, self.max_tokens)) != 1:
            raise ValueError("exactly one of epochs, max_steps, max_tokens (spec.training.duration)")

    @property
    def grad_accum_steps(self) -> int:
        """Micro batches per rank per optimizer step."""
        return self.global_batch_size // (self.micro_batch_size * self.world_size)

    def tokens_per_step(self, context_length: int) -> int:
        return self.global_batch_size * context_length

    def total_steps(self, steps_per_epoch: int | None, context_length: int) -> int:
        """Optimizer steps in the run. ``steps_per_epoch`` = micro batches per epoch per rank."""
        return total_steps(
            max_steps=self.max_steps,
            max_tokens=self.max_tokens,
            epochs=self.epochs,
            tokens_per_step=self.tokens_per_step(context_length),
            steps_per_epoch=None if steps_per_epoch is None else steps_per_epoch // self.grad_accum_steps,
        )


@dataclass(frozen=True)
class RuntimeConfig:
    model: ModelConfig
    optimizer: OptimizerConfig
    schedule: ScheduleConfig
    train: TrainConfig

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> RuntimeConfig:
        def build(kind: type, data: dict[str, Any]) -> Any:
            known = {f.name for f in fields(kind)}
            unknown = set(data) - known
            if unknown:
                raise ValueError(f"{kind.__name__}: unknown keys {sorted(unknown)}")
            return kind(**data)

        return cls(
            model=build(ModelConfig, raw["model"]),
            optimizer=build(OptimizerConfig, raw["optimizer"]),
            schedule=build(ScheduleConfig, raw["schedule"]),
            train=build(TrainConfig, raw["train"]),
        )


def runtime_config_from_spec(
    spec: LLMTrainingJobSpec,
    *,
    vocab_size: int,
    world_size: int | None = None,
    checkpoint_uri: str | None = None,
    checkpoint_owner: str = "",
) -> RuntimeConfig:
    """The one place spec fields become runtime settings.

    ``vocab_size`` is the tokenizer's (from the data manifest); the embedding table is padded
    to ``architecture.vocabMultipleOf``. ``world_size`` defaults to ``resources.workers``.
    ``checkpoint_uri`` fills in ``spec.checkpoint.uri`` when that is unset (local runs);
    ``checkpoint_owner`` is the job that claimed it (the driver's, not the spec's).
    """
    arch = spec.model.architecture
    init = spec.model.init
    model = ModelConfig(
        vocab_size=pad_vocab(vocab_size, arch.vocab_multiple_of),
        n_layers=arch.layers,
        d_model=arch.d_model,
        n_heads=arch.heads,
        n_kv_heads=arch.resolved_kv_heads,
        context_length=arch.context_length,
        ffn_hidden_size=arch.resolved_ffn_hidden_size,
        rope_theta=arch.rope_theta,
        norm_eps=arch.norm_eps,
        dropout=arch.dropout,
        tie_embeddings=arch.tie_embeddings,
        init_std=init.random.std if init.random else 0.02,
        init_seed=init.random.seed if init.random else 0,
    )
    opt = spec.training.optimizer
    optimizer = OptimizerConfig(
        type=opt.type.value,
        lr=opt.lr,
        weight_decay=opt.weight_decay,
        beta1=opt.beta1,
        beta2=opt.beta2,
        eps=opt.eps,
        momentum=opt.momentum,
        nesterov=opt.nesterov,
    )
    sch = spec.training.schedule
    schedule = ScheduleConfig(warmup_steps=sch.warmup_steps, decay=sch.decay.value, min_lr=sch.min_lr)
    t = spec.training
    init_kind: Literal["random", "checkpoint", "pretrained"]
    if init.checkpoint is not None:
        init_kind, init_uri = "checkpoint", init.checkpoint.uri
    elif init.pretrained is not None:
        init_kind, init_uri = "pretrained", init.pretrained.uri
    else:
        init_kind, init_uri = "random", None
    train = TrainConfig(
        global_batch_size=t.batch.global_batch_size,
        micro_batch_size=t.batch.micro_batch_size,
        world_size=world_size if world_size is not None else spec.resources.workers,
        epochs=t.duration.epochs,
        max_steps=t.duration.max_steps,
        max_tokens=t.duration.max_tokens,
        precision=t.precision.value,
        reshard_after_forward=t.fsdp.reshard_after_forward,
        activation_checkpointing=t.fsdp.activation_checkpointing,
        compile=t.compile,
        grad_clip=t.grad_clip,
        seed=t.seed,
        log_every_steps=t.log_every_steps,
        val_every_steps=spec.validation.every_steps,
        val_batches=spec.validation.batches,
        task_records=spec.validation.task.records if spec.validation.task else 0,
        task_max_new_tokens=spec.validation.task.max_new_tokens if spec.validation.task else 32,
        task_checker=spec.validation.task.checker.value if spec.validation.task else "exactMatch",
        checkpoint_uri=spec.checkpoint.uri or checkpoint_uri,
        checkpoint_every_steps=spec.checkpoint.every_steps,
        checkpoint_keep_last=spec.checkpoint.keep_last,
        checkpoint_owner=checkpoint_owner,
        init_kind=init_kind,
        init_uri=init_uri,
        metrics_enabled=spec.metrics.enabled,
        metrics_port=spec.metrics.port,
        storage_endpoint=spec.storage.endpoint,
        storage_region=spec.storage.region,
        **_lora_fields(spec),
    )
    return RuntimeConfig(model=model, optimizer=optimizer, schedule=schedule, train=train)


def _lora_fields(spec: LLMTrainingJobSpec) -> dict[str, Any]:
    """spec.training.lora → TrainConfig's lora_* fields (unset: full training)."""
    lora = spec.training.lora
    if lora is None:
        return {}
    return {
        "lora_rank": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_targets": tuple(lora.targets),
        "lora_dropout": lora.dropout,
    }
