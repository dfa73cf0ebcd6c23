"""The batching engine: one thread owns the model and decodes every running sequence together.

Design: *continuous batching* (Orca's iteration-level scheduling). Each iteration the engine
admits waiting sequences (up to ``--max-batch`` active), encodes each new prompt alone into its
own :class:`~llmtrain.runtime.model.KVCache` (the exact call ``generate`` makes, which also
yields its first token) and copies that cache in as the last row of the batch's
:class:`~llmtrain.runtime.model.BatchKVCache` (one buffer per layer, a row per sequence). It then
runs **one** forward pass over every row's newest token: the weights are read once for all rows,
which is where decoding's time goes, and one attention call covers all rows, a boolean mask
hiding the positions past each row's own length. Masked keys weigh exactly 0, so a row's tokens
are its single-stream tokens; only float rounding differs (≈1e-7: the batched GEMMs, a softmax
over a zero-padded row), which changes a greedy token only at an exact near-tie. A lone row needs
no mask and is ``generate``'s call bit for bit. Sequences leave the batch the step they finish,
are cancelled, or their client goes away (the last row moves into the freed one); new ones join
between steps, so nobody waits for the longest request of a batch. Greedy rows are sampled by
one argmax over the batch.

Prompts are encoded alone (no chunked prefill): a long prompt delays the running rows by one
prompt's forward, fine at our context lengths. The engine thread shares the GIL with the HTTP
loop, so its per-token Python is kept small: text is decoded incrementally
(:class:`~llmtrain.runtime.serve.text.TextStream`) and each sequence's events go out through the
``emit`` callback its request gave (the app batches them into one wake-up of its loop per step).

Isolation: a failure that belongs to one sequence (its prefill, its sampling, its text) fails
that sequence only; the others go on exactly as if it had never been submitted (a row that fails
in its prefill never joins the batch; one that fails later leaves it as a finished row does).
Only a failure of the shared batched forward fails every running row.

Admission is bounded: at most ``max_waiting`` requests (groups of sequences submitted together)
wait for a slot; :meth:`Engine.submit` refuses more, and a cancelled waiter leaves the queue at
once, so clients that gave up never hold the bound.

Knows nothing of HTTP or of the OpenAI protocol: sequences in, :class:`Event` s out.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from llmtrain.runtime.generate import Sampling, next_token
from llmtrain.runtime.model import GPT, BatchKVCache, KVCache
from llmtrain.runtime.serve.metrics import EngineStats
from llmtrain.runtime.serve.text import TextStream

log = logging.getLogger("llmtrain.serve")


@dataclass(frozen=True)
class Event:
    """What the engine tells a request about one of its sequences."""

    index: int  # the choice
    text: str  # new final text (may be empty)
    finish_reason: str | None = None  # "stop" | "length" once finished
    completion_tokens: int = 0
    error: str | None = None


@dataclass(eq=False)
class Sequence:
    """One choice being generated: its prompt, sampling, cache and where its events go."""

    index: int
    prompt: list[int]
    sampling: Sampling
    text: TextStream
    emit: Callable[[Event], None]  # thread-safe: called from the engine thread
    generator: torch.Generator | None = None
    last: int = -1
    generated: int = 0
    finished: bool = False
    cancelled: bool = False  # set by the HTTP side (client gone); the engine drops it next step
    waiting: _Waiting | None = None  # its request's place in the queue, while it waits


@dataclass(eq=False)
class _Waiting:
    """One submitted request's sequences not yet admitted: the request waits while any does."""

    left: int


class Engine:
    """Continuous batching over one :class:`GPT` in a thread of its own (see the module docstring)."""

    def __init__(
        self,
        model: GPT,
        *,
        max_batch: int = 32,
        max_waiting: int | None = None,
        observe_batch: Callable[[int, float], None] | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max batch must be ≥ 1, got {max_batch} (--max-batch)")
        if max_waiting is not None and max_waiting < 0:
            raise ValueError(f"max waiting must be ≥ 0, got {max_waiting} (--max-waiting)")
        self.model = model
        self.max_batch = max_batch
        self.max_waiting = max_waiting  # requests; None: unbounded
        self._waiting_requests = 0
        self.device = next(model.parameters()).device
        self.stats = EngineStats()
        self._observe_batch = observe_batch
        self._waiting: collections.deque[Sequence] = collections.deque()
        self._active: list[Sequence] = []  # _active[i] is row i of _batch
        self._batch = self._new_batch()
        self._cv = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="llmtrain-serve-engine", daemon=True)

    # -- the HTTP side

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread.ident is not None:  # started
            self._thread.join(timeout=30)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def active_count(self) -> int:
        return len(self._active)

    @property
    def waiting_count(self) -> int:
        return len(self._waiting)

    @property
    def waiting_requests(self) -> int:
        return self._waiting_requests

    def submit(self, seqs: list[Sequence]) -> bool:
        """Queue one request's sequences; False (nothing queued) when ``max_waiting`` requests
        already wait. A request counts as waiting until its last sequence is admitted."""
        with self._cv:
            if self.max_waiting is not None and self._waiting_requests >= self.max_waiting:
                return False
            if seqs:
                ticket = _Waiting(len(seqs))
                for s in seqs:
                    s.waiting = ticket
                self._waiting_requests += 1
                self._waiting.extend(seqs)
            self._cv.notify_all()
            return True

    def cancel(self, seqs: Iterable[Sequence]) -> None:
        """Drop sequences whose client went away: a waiting one leaves the queue now (its
        request stops counting against ``max_waiting``), a running one's slot frees next step."""
        with self._cv:
            for s in seqs:
                if s.finished or s.cancelled:
                    continue
                s.cancelled = True
                if s.waiting is not None:
                    self._waiting.remove(s)
                    self._unqueue(s)
                    s.finished = True
                    self.stats.cancelled += 1
            self._cv.notify_all()

    def _unqueue(self, s: Sequence) -> None:
        """``s`` left the waiting queue (under the lock)."""
        ticket, s.waiting = s.waiting, None
        if ticket is not None:
            ticket.left -= 1
            if ticket.left == 0:
                self._waiting_requests -= 1

    # -- the engine thread

    def _new_batch(self) -> BatchKVCache:
        return BatchKVCache(len(self.model.layers), self.model.cfg.context_length)

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._stopping and not self._waiting and not self._active:
                    self._cv.wait()
                if self._stopping:
                    return
                admitted: list[Sequence] = []
                while self._waiting and len(self._active) + len(admitted) < self.max_batch:
                    s = self._waiting.popleft()
                    self._unqueue(s)
                    admitted.append(s)
            try:
                with torch.no_grad():
                    self._step(admitted)
            except Exception as e:  # the shared forward failed (a bug, out of memory): every row
                log.exception("engine step failed")
                for s in [*self._active, *admitted]:
                    if not s.finished:
                        s.finished = True
                        s.emit(Event(s.index, "", error=f"generation failed: {type(e).__name__}: {e}"))
                self._active, self._batch = [], self._new_batch()

    def _step(self, admitted: list[Sequence]) -> None:
        # New prompts, each alone: exactly generate()'s prefill; it yields their first token.
        # Its cache then joins the batch as the last row.
        for s in admitted:
            try:
                kv = KVCache(len(self.model.layers), self.model.cfg.context_length)
                logits = self.model(torch.tensor([s.prompt], device=self.device), kv=kv)[0, -1]
            except Exception as e:  # this prompt's own forward: it fails alone
                self._fail(s, e)
                continue
            self._take([s], logits[None])
            if not s.finished:
                self._batch.add(kv)
                self._active.append(s)
        for s in self._active:
            if s.cancelled and not s.finished:
                s.finished = True
                self.stats.cancelled += 1
        self._drop_finished()
        rows = self._active
        if rows:
            # One forward for every running sequence: each row's newest token at its own position.
            t0 = time.perf_counter()
            tokens = torch.tensor([[s.last] for s in rows], device=self.device)
            self._take(rows, self.model(tokens, kv=self._batch)[:, -1])
            self.stats.steps += 1
            self.stats.max_rows = max(self.stats.max_rows, len(rows))
            if self._observe_batch is not None:
                self._observe_batch(len(rows), time.perf_counter() - t0)
        self.stats.generated(len(rows) + len(admitted), time.monotonic())
        self._drop_finished()  # frees their rows now, not when the next request arrives

    def _drop_finished(self) -> None:
        """Remove finished rows from the batch, mirroring its moves (last row → freed row)."""
        for i in range(len(self._active) - 1, -1, -1):  # from the end: the last row is never a leaver
            if self._active[i].finished:
                self._batch.remove(i)
                self._active[i] = self._active[-1]
                self._active.pop()

    def _take(self, rows: list[Sequence], logits: torch.Tensor) -> None:
        """Sample each row's next token from its logits [B, V] and tell its request. A row whose
        sampling or text fails is failed alone (finished: it leaves the batch this step)."""
        for s, token in zip(rows, self._sample(rows, logits), strict=True):
            try:
                if isinstance(token, Exception):
                    raise token
                self._emit(s, token)
            except Exception as e:
                self._fail(s, e)

    def _fail(self, s: Sequence, e: Exception) -> None:
        log.warning("sequence %d failed: %s: %s", s.index, type(e).__name__, e)
        s.finished = True
        s.emit(Event(s.index, "", error=f"generation failed: {type(e).__name__}: {e}"))

    @staticmethod
    def _sample(rows: list[Sequence], logits: torch.Tensor) -> list[int | Exception]:
        """``next_token`` per row; greedy rows sharing one vocabulary bound take one argmax over
        the batch and one host sync (the same ids: argmax over the allowed ids = argmax after
        masking the others to -inf, first index on ties)."""
        greedy = [i for i, s in enumerate(rows) if s.sampling.greedy]
        limits = {rows[i].sampling.vocab_limit for i in greedy}
        tokens: list[int | Exception] = [-1] * len(rows)
        if len(limits) == 1:
            limit = limits.pop()
            sub = logits if len(greedy) == len(rows) else logits[greedy]
            if limit is not None:
                sub = sub[:, :limit]
            for i, t in zip(greedy, sub.argmax(-1).tolist(), strict=True):
                tokens[i] = t
        for i, s in enumerate(rows):
            if tokens[i] == -1:
                try:  # e.g. a temperature so small that the probabilities overflow to NaN
                    tokens[i] = next_token(logits[i], s.sampling, s.generator)
                except Exception as e:  # that row's failure, returned so the others go on
                    tokens[i] = e
        return tokens

    def _emit(self, s: Sequence, token: int) -> None:
        """Record ``s``'s new token and tell its request what text became final."""
        s.last = token
        s.generated += 1
        text = s.text.feed(token)
        ended = token in s.sampling.stop_ids or s.generated >= s.sampling.max_new_tokens
        if ended:
            text += s.text.finish()  # what was held back (may still reach a stop string)
        reason = None
        if s.text.stopped or token in s.sampling.stop_ids:
            reason = "stop"
        elif ended:
            reason = "length"
        if reason is not None:
            s.finished = True  # its row leaves the batch at the end of this step
        if text or reason is not None or s.generated == 1:  # the first token: time to first token
            s.emit(Event(s.index, text, reason, s.generated))
