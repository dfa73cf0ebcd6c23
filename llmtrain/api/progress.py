"""Contract (d): ``ProgressEvent``, what a training run reports and where it lands in status.

Emitted by rank 0 at log, validation and checkpoint steps; consumed by ``llmtrain run``'s
display and by the operator, which writes :meth:`ProgressEvent.status_patch` into
``LLMTrainingJob.status``. Standard library only.

Mapping to status (``STATUS_FIELDS``)::

    step               -> status.progress.step
    total_steps        -> status.progress.totalSteps       (and percent = step/total·100)
    epoch              -> status.progress.epoch
    tokens             -> status.progress.tokensSeen
    eta_seconds        -> status.progress.eta              (preformatted, format_eta)
    train_loss         -> status.metrics.trainLoss
    val_loss           -> status.metrics.valLoss
    val_perplexity     -> status.metrics.valPerplexity
    val_accuracy       -> status.metrics.valAccuracy
    tokens_per_second  -> status.metrics.tokensPerSecond
    mfu                -> status.metrics.mfu
    checkpoint_uri     -> status.checkpoint.latestUri       (with checkpoint_step -> latestStep)
    checkpoint_step    -> status.checkpoint.latestStep

Fields left ``None`` are not written, so a log-step event never erases the last
validation loss.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

Stage = Literal["data", "training", "validation", "checkpoint", "export", "done"]

STATUS_FIELDS: dict[str, str] = {
    "step": "progress.step",
    "total_steps": "progress.totalSteps",
    "epoch": "progress.epoch",
    "tokens": "progress.tokensSeen",
    "eta_seconds": "progress.eta",
    "train_loss": "metrics.trainLoss",
    "val_loss": "metrics.valLoss",
    "val_perplexity": "metrics.valPerplexity",
    "val_accuracy": "metrics.valAccuracy",
    "tokens_per_second": "metrics.tokensPerSecond",
    "mfu": "metrics.mfu",
    "checkpoint_uri": "checkpoint.latestUri",
    "checkpoint_step": "checkpoint.latestStep",
}


def format_eta(seconds: float | None) -> str | None:
    """Compact ETA for a printer column: 45s, 12m05s, 3h07m, 2d04h."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return None
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    m, s = divmod(s, 60)
    if m < 60:
        return f"{m}m{s:02d}s"
    h, m = divmod(m, 60)
    if h < 24:
        return f"{h}h{m:02d}m"
    d, h = divmod(h, 24)
    return f"{d}d{h:02d}h"


def _finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


@dataclass(frozen=True)
class ProgressEvent:
    step: int
    total_steps: int | None = None
    epoch: int = 0
    tokens: int = 0
    stage: Stage = "training"
    train_loss: float | None = None
    val_loss: float | None = None
    val_perplexity: float | None = None
    val_accuracy: float | None = None
    tokens_per_second: float | None = None
    mfu: float | None = None
    eta_seconds: float | None = None
    checkpoint_uri: str | None = None
    checkpoint_step: int | None = None
    time: float | None = None  # unix seconds when emitted

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ProgressEvent:
        raw = json.loads(text)
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known})

    @property
    def percent(self) -> float | None:
        if not self.total_steps:
            return None
        return round(min(100.0, 100.0 * self.step / self.total_steps), 1)

    def status_patch(self) -> dict[str, Any]:
        """A merge patch for ``status`` (camelCase), omitting unknown values."""
        progress: dict[str, Any] = {"step": self.step, "epoch": self.epoch, "tokensSeen": self.tokens}
        if self.total_steps is not None:
            progress["totalSteps"] = self.total_steps
            progress["percent"] = self.percent
        eta = format_eta(self.eta_seconds)
        if eta is not None:
            progress["eta"] = eta
        metrics: dict[str, Any] = {}
        for name in ("train_loss", "val_loss", "val_perplexity", "val_accuracy", "tokens_per_second", "mfu"):
            value = _finite(getattr(self, name))
            if value is not None:
                metrics[STATUS_FIELDS[name].split(".", 1)[1]] = round(value, 4)
        patch: dict[str, Any] = {"progress": progress}
        if metrics:
            patch["metrics"] = metrics
        if self.checkpoint_uri is not None:
            patch["checkpoint"] = {"latestUri": self.checkpoint_uri, "latestStep": self.checkpoint_step}
        return patch
