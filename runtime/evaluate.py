"""Held-out evaluation: token-weighted loss, perplexity and next-token accuracy across ranks.

Every call reads the same first ``batches`` micro batches of the validation split (a fresh
loader at epoch 0), so successive validation losses are comparable. Sums, not means, are
all-reduced: loss = Σ token losses / Σ tokens over every rank. Task data (batches of
``(tokens, loss mask)``) counts only the masked-in targets — the answers — in loss, accuracy,
tokens and bytes, as training does.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import islice
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class ValResult:
    loss: float
    perplexity: float
    accuracy: float
    tokens: int
    # Σ bits / Σ UTF-8 bytes of the predicted tokens: comparable across tokenizers (None when
    # the loader cannot say how many bytes each token stands for).
    bits_per_byte: float | None = None


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[Tensor | tuple[Tensor, Tensor]],
    n_batches: int,
    device: torch.device,
    autocast: contextlib.AbstractContextManager[object] | None = None,
    token_bytes: list[int] | None = None,
) -> ValResult:
    was_training = model.training
    model.eval()
    # [Σ loss, Σ correct, Σ tokens, Σ bytes] on device; one all-reduce and one host sync per
    # validation.
    totals = torch.zeros(4, dtype=torch.float64, device=device)
    nbytes = torch.tensor(token_bytes, dtype=torch.float64, device=device) if token_bytes else None
    try:
        for raw in islice(batches, n_batches):
            batch, keep = _split(raw, device)
            inputs, targets = batch[:, :-1], batch[:, 1:]
            with autocast or contextlib.nullcontext():
                logits = model(inputs)
            logits = logits.float().flatten(0, 1)
            flat = targets.flatten()
            if keep is None:  # plain text: every target
                totals[0] += F.cross_entropy(logits, flat, reduction="sum").double()
                totals[1] += (logits.argmax(-1) == flat).sum().double()
                totals[2] += flat.numel()
                if nbytes is not None:
                    totals[3] += nbytes[flat].sum()
            else:  # task data: the answers' targets only
                keep = keep[:, 1:].flatten()
                losses = F.cross_entropy(logits, flat, reduction="none")
                totals[0] += losses[keep].sum().double()
                totals[1] += (logits.argmax(-1) == flat)[keep].sum().double()
                totals[2] += keep.sum().double()
                if nbytes is not None:
                    totals[3] += nbytes[flat[keep]].sum()
    finally:
        model.train(was_training)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(totals)
    loss_sum, correct, tokens, nbytes_sum = totals.tolist()
    if tokens == 0:
        raise ValueError("the validation split yielded no batches (spec.validation.batches, spec.data)")
    loss = loss_sum / tokens
    return ValResult(
        loss=loss,
        perplexity=math.exp(loss) if loss < 700 else math.inf,
        accuracy=correct / tokens,
        tokens=int(tokens),
        bits_per_byte=loss_sum / math.log(2) / nbytes_sum if nbytes_sum > 0 else None,
    )


def _split(raw: Any, device: torch.device) -> tuple[Tensor, Tensor | None]:
    """A loader's batch on ``device``: tokens, and the loss mask for task data (else None)."""
    if isinstance(raw, tuple):
        return raw[0].to(device, non_blocking=True), raw[1].to(device, non_blocking=True).bool()
    return raw.to(device, non_blocking=True), None
