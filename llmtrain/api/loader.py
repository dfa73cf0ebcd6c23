"""Contract (b): the loader protocol between the data pipeline and the training loop.

A loader belongs to one rank. Iterating it yields the rest of the *current* epoch as
int64 tensors of shape ``[micro_batch, context_length + 1]`` (inputs are ``[:, :-1]``,
targets ``[:, 1:]``); a fresh ``iter()`` after exhaustion starts the next epoch, whose
order is a deterministic shuffle of the seed and the epoch number.

Invariants the training loop relies on:

* ``steps_per_epoch`` (micro batches per epoch on this rank) is **equal on every rank**,
  so no rank ever waits alone in a collective; windows that do not divide evenly are
  dropped and reported as ``dropped_windows``.
* ``state_dict()`` counts batches *yielded to the training loop*, not prefetched. It is
  keyed per rank — ``{"rank_<r>": {...}}`` — because torch.distributed.checkpoint merges
  equal non-tensor keys across ranks; ``load_state_dict`` reads its own rank's entry.
* Loading a state saved at another world size either continues from exactly the same
  global position or raises :class:`LoaderResumeError` naming ``spec.resources.workers``.

Standard library only: the protocol is satisfied structurally (no import needed).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol, runtime_checkable


class LoaderResumeError(RuntimeError):
    """A saved loader state cannot be continued exactly (names spec.resources.workers)."""


def rank_key(rank: int) -> str:
    return f"rank_{rank}"


@runtime_checkable
class TokenLoader(Protocol):
    rank: int
    world_size: int
    micro_batch: int
    context_length: int
    dropped_windows: int  # windows of each epoch (all ranks) left out: they do not fill a step

    @property
    def steps_per_epoch(self) -> int:
        """Micro batches per epoch on this rank; identical on every rank."""
        ...

    @property
    def epoch(self) -> int:
        """Epoch the next yielded batch belongs to."""
        ...

    def __iter__(self) -> Iterator[Any]:
        """Yield the rest of the current epoch: int64 tensors [micro_batch, context_length + 1]."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """{"rank_<r>": {...}} counting batches yielded to the caller."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from a state_dict() (possibly holding other ranks' keys too)."""
        ...
