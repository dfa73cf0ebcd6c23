"""Why a run stopped: :class:`DriverError` (a :class:`RunFailure` the launchers report),
and the reading of a Ray Train exception's cause chain (:func:`classify`, :func:`causes`)."""

from __future__ import annotations

from llmtrain.runtime.redaction import redact, secret_values

from llmtrain.api.progress import RunFailure
from llmtrain.api.status import Reason


class DriverError(RuntimeError):
    """The run stopped; :attr:`failure` says why and whether another attempt could help."""

    def __init__(self, failure: RunFailure) -> None:
        super().__init__(failure.message)
        self.failure = failure


def classify(error: BaseException, *, has_checkpoint: bool) -> RunFailure:
    """Why training failed, from the exception Ray Train raised (the worker's error is in
    its cause chain or its ``worker_failures``)."""
    from llmtrain.runtime.data.loader import LoaderError
    from llmtrain.runtime.owner import PrefixInUseError
    from llmtrain.runtime.train import NonFiniteError
    from llmtrain.runtime.trainer import InsufficientResourcesError

    for e in causes(error):
        if isinstance(e, PrefixInUseError):  # taken over while this job ran: its record stays
            return RunFailure(Reason.OutputPrefixInUse.value, str(e), permanent=True)
        if isinstance(e, NonFiniteError):
            # From a checkpoint another attempt may get past it (data order, a restart);
            # without one it would only repeat.
            return RunFailure(Reason.NonFiniteLoss.value, str(e), permanent=not has_checkpoint)
        if isinstance(e, LoaderError | ValueError):  # bad shards, a spec the data cannot train
            return RunFailure(Reason.DataError.value, str(e), permanent=True)
        if isinstance(e, InsufficientResourcesError):
            return RunFailure(Reason.InsufficientResources.value, str(e), permanent=False)
    return RunFailure(Reason.RunFailed.value, f"training failed: {error}", permanent=False)


def causes(error: BaseException) -> list[BaseException]:
    """``error`` and what caused it, breadth first: ``__cause__``, ``__context__`` and Ray
    Train's ``worker_failures`` (bounded: a cycle or a huge chain ends the walk)."""
    out: list[BaseException] = []
    todo = [error]
    while todo and len(out) < 50:
        e = todo.pop(0)
        if e in out:
            continue
        out.append(e)
        todo += [c for c in (e.__cause__, e.__context__) if c is not None]
        todo += [
            c for c in (getattr(e, "worker_failures", None) or {}).values() if isinstance(c, BaseException)
        ]
    return out


def short_error(error: BaseException) -> str:
    """The innermost error's message (Ray wraps a worker's in a page of traceback), with the
    pod's secrets masked: a tuning trial's becomes status.tuning and a TrialFailed Event."""
    chain = causes(error)
    msg = str(chain[-1]) if chain else str(error)
    short = msg.strip().splitlines()[-1][:500] if msg.strip() else type(error).__name__
    return redact(short, secret_values())
