"""The split and the mixture of the data stage: which documents validate, and how many
times each training document is written.

Pure functions of stable document keys and the seed (never of arrival order), so the
output is the same whatever the block layout; :mod:`llmtrain.runtime.data.prepare` calls
them from its split and mix steps.
"""

from __future__ import annotations

import hashlib


def split_of(key: str, seed: int, fraction: float) -> str:
    """train/validation by hash(key, seed): stable under any reordering or re-blocking."""
    h = int(hashlib.sha256(f"split\0{seed}\0{key}".encode()).hexdigest()[:16], 16)
    return "validation" if h / 2**64 < fraction else "train"


def _mix_order(seed: int, key: str) -> str:
    return hashlib.sha256(f"mix\0{seed}\0{key}".encode()).hexdigest()


def copy_key(key: str, copy: int) -> str:
    """Order key of the n-th copy of an upsampled document (copy 0 is the document itself)."""
    return key if copy == 0 else hashlib.sha256(f"{key}#{copy}".encode()).hexdigest()[:32]


def mixture_copies(
    docs_by_source: dict[str, list[tuple[str, int]]],
    weights: dict[str, float] | None,
    seed: int,
) -> dict[str, list[tuple[str, int]]]:
    """Deterministic up/down-sampling of training documents to the target token fractions.

    ``docs_by_source``: source → [(key, tokens)]. Returns source → [(key, copies)] (copies ≥ 1,
    omitted when 0). Keeps the total near the natural total; source s gets ``w_s · total``
    tokens: every document ⌊r⌋ times (r = target / natural), then a seeded-hash-ordered subset
    once more, each included while its midpoint lies inside the remaining quota — so each
    source lands within half a document of its target.
    """
    if weights is None:
        return {s: [(k, 1) for k, _ in docs] for s, docs in docs_by_source.items()}
    total = sum(n for docs in docs_by_source.values() for _, n in docs)
    wsum = sum(weights.values())
    out: dict[str, list[tuple[str, int]]] = {}
    for s, docs in docs_by_source.items():
        natural = sum(n for _, n in docs)
        target = total * weights[s] / wsum
        full = int(target // natural)
        remaining = target - full * natural
        ordered = sorted(docs, key=lambda kv: _mix_order(seed, kv[0]))
        chosen: list[tuple[str, int]] = []
        acc = 0.0
        for k, n in ordered:
            extra = 1 if acc + n / 2 <= remaining else 0
            acc += n * extra
            if full + extra:
                chosen.append((k, full + extra))
        out[s] = chosen
    return out
