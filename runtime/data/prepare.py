"""The data stage: collect → clean → dedup → tokenize → split → mix → shard → manifest.

:func:`prepare_data` is what ``llmtrain data prepare`` and ``llmtrain run`` call. It is
deterministic: every decision is a function of stable document keys and the seed, never of
arrival order, so 1 or 8 Ray blocks give a byte-identical manifest and identical shards.

Parallelism: the two heavy maps (read+clean, encode) run on Ray Data when a Ray cluster is
up (or ``executor="ray"`` / ``num_blocks`` is given), else in this process — on a 2-core
laptop Ray's start-up costs more than it saves, and ``tokenizers`` already encodes on all
cores from Rust. The driver does the global steps: dedup across all blocks, tokenizer
training, the split, mixture sampling and ordering by key.

Skip/overwrite: the output prefix is reused when its manifest has the same input fingerprint
(sources, cleaning, tokenizer config, split, shard size, seed); a non-empty prefix with a
different fingerprint (or files that are not ours) is an error unless ``overwrite=True``.
Errors name the spec field and leave no manifest behind.
"""

from __future__ import annotations

import hashlib
import json
import math
import pickle
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from llmtrain.runtime.data import clean as cleanmod
from llmtrain.runtime.data import collect, shard, tokenize
from llmtrain.runtime.data.storage import S3Options, Storage, StorageError, open_storage, split_s3_uri

from llmtrain.api.shards import (
    MANIFEST_NAME,
    TOKENIZER_NAME,
    Manifest,
    ShardFormatError,
    SourceStats,
    TokenizerInfo,
    dtype_for_vocab,
)

if TYPE_CHECKING:
    from llmtrain.api.spec import LLMTrainingJobSpec

PIPELINE_VERSION = "llmtrain-data/1"
Executor = Literal["auto", "local", "ray"]


class PrepareError(ValueError):
    """The data stage cannot run as specified; the message names the spec field and the fix."""


@dataclass
class PrepareResult:
    manifest_uri: str
    manifest: Manifest
    reused: bool
    stats: dict[str, Any] = field(default_factory=dict)  # documents, tokens, seconds per stage
    seconds: float = 0.0


@dataclass(frozen=True)
class PrepareConfig:
    """Everything the data stage reads from the spec, in plain form."""

    sources: tuple[collect.SourceConfig, ...]
    clean: cleanmod.CleanConfig
    tokenizer: tokenize.TokenizerConfig
    output_uri: str
    validation_fraction: float
    shard_max_tokens: int
    seed: int
    s3: S3Options
    fingerprint: str
    # For the "validation split too small" check (None: skip it).
    context_length: int | None = None
    val_windows_needed: int | None = None
    # spec.data.validationSources: the validation set (no hash split) when not empty.
    validation_sources: tuple[collect.SourceConfig, ...] = ()

    @classmethod
    def from_spec(cls, spec: LLMTrainingJobSpec, s3: S3Options | None = None) -> PrepareConfig:
        d = spec.data
        opts = s3 or S3Options.from_spec(spec.storage)
        return cls(
            sources=tuple(collect.SourceConfig.from_spec(s, i) for i, s in enumerate(d.sources)),
            clean=cleanmod.CleanConfig.from_spec(d.preprocessing),
            tokenizer=tokenize.TokenizerConfig.from_spec(d.tokenizer),
            output_uri=d.output_uri,
            validation_fraction=d.validation_fraction,
            shard_max_tokens=d.shard_max_tokens,
            seed=d.seed,
            s3=opts,
            fingerprint=fingerprint(spec),
            context_length=spec.model.architecture.context_length,
            val_windows_needed=spec.validation.batches
            * spec.training.batch.micro_batch_size
            * spec.resources.workers,
            validation_sources=tuple(
                collect.SourceConfig.from_spec(s, i, "validationSources")
                for i, s in enumerate(d.validation_sources)
            ),
        )

    @property
    def validation_set(self) -> str:
        """Which text the validation metrics measure, in words (summary, status, metrics)."""
        if self.validation_sources:
            return "validationSources: " + ", ".join(s.name for s in self.validation_sources)
        return f"hash split: {self.validation_fraction:g} of sources"


def fingerprint(spec: LLMTrainingJobSpec) -> str:
    """Hash of what determines the output: spec.data minus outputUri, plus the pipeline version
    and, for the pythonStdlib corpus, the interpreter version."""
    data = spec.data.model_dump(mode="json", by_alias=True, exclude={"output_uri"})
    extra: dict[str, Any] = {"pipeline": PIPELINE_VERSION}
    if any(s.python_stdlib is not None for s in [*spec.data.sources, *spec.data.validation_sources]):
        extra["python"] = collect.python_version()
    blob = json.dumps({"data": data, **extra}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


# ------------------------------------------------------------------ parallel map


def _ray_map(fn: Callable[[list[Any]], list[Any]], items: list[Any], num_blocks: int) -> list[Any]:
    """Run ``fn`` over ``num_blocks`` blocks of ``items`` on Ray Data; results in any order.

    Each block's result travels as one pickled blob: documents and variable-length token
    arrays do not fit Ray Data's columnar batches without per-row conversion cost.
    """
    import ray
    import ray.data

    if not ray.is_initialized():
        from llmtrain.runtime.ray_local import init_local_ray

        init_local_ray()  # on loopback, never the machine's private address
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ds = ray.data.from_items([{"item": pickle.dumps(x)} for x in items], override_num_blocks=num_blocks)

    def run_block(batch: dict[str, Any]) -> dict[str, Any]:
        res = fn([pickle.loads(b) for b in batch["item"]])
        return {"payload": np.array([pickle.dumps(res)], dtype=object)}

    out: list[Any] = []
    for row in ds.map_batches(run_block, batch_size=None, batch_format="numpy").iter_rows():
        out.extend(pickle.loads(row["payload"]))
    return out


def parallel_map(
    fn: Callable[[list[Any]], list[Any]],
    items: list[Any],
    *,
    executor: Executor = "auto",
    num_blocks: int | None = None,
) -> list[Any]:
    """``fn`` maps a block (list) of items to a list of results. Order of results is NOT kept:
    callers sort by stable key."""
    if not items:
        return []
    use_ray = executor == "ray"
    if executor == "auto":
        try:
            import ray

            use_ray = ray.is_initialized()
        except ImportError:
            use_ray = False
    blocks = max(1, min(num_blocks or 1, len(items)))
    if use_ray:
        if num_blocks is None:
            import ray

            blocks = max(1, min(int(ray.cluster_resources().get("CPU", 1)), len(items)))
        return _ray_map(fn, items, blocks)
    out: list[Any] = []
    size = math.ceil(len(items) / blocks)
    # Last block first: like Ray Data, arrival order is not item order, so any step that
    # leans on arrival order shows up as a difference between 1 and N blocks in the tests.
    for i in reversed(range(0, len(items), size)):
        out.extend(fn(items[i : i + size]))
    return out


# ------------------------------------------------------------------ block functions


@dataclass
class CleanedDoc:
    key: str
    source: str
    text: str
    digest: str  # content hash for dedup


def _read_clean_block(units: list[dict[str, Any]], cfg: cleanmod.CleanConfig, s3: S3Options) -> list[Any]:
    """Worker side: read units, split into documents, clean. Returns docs and per-unit stats."""
    out: list[Any] = []
    parsed = [collect.WorkUnit.from_dict(u) for u in units]
    # Object reads are latency-bound (one GET each): overlap them; the cleaning below is cheap.
    with ThreadPoolExecutor(
        max_workers=8 if any(u.location.startswith("s3://") for u in parsed) else 1
    ) as pool:
        read = list(pool.map(lambda u: collect.read_unit(u, s3), parsed))
    for unit, got in zip(parsed, read, strict=True):
        drops: dict[str, int] = defaultdict(int)
        drops["undecodable"] += got.undecodable
        docs = []
        for key, text in got.docs:
            cleaned, reason = cleanmod.clean_document(text, cfg)
            if cleaned is None:
                drops[str(reason)] += 1
                continue
            docs.append(CleanedDoc(key, unit.source.name, cleaned, cleanmod.content_hash(cleaned)))
        out.append(("unit", unit.source.name, unit.ident, got.raw_sha256, dict(drops), docs))
    return out


def _encode_block(items: list[tuple[str, str]], tok_json: str, eot: int) -> list[tuple[str, np.ndarray]]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tok_json)
    keys = [k for k, _ in items]
    arrays = tokenize.encode_documents(tok, [t for _, t in items], eot)
    return list(zip(keys, arrays, strict=True))


# ------------------------------------------------------------------ driver steps


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


def _windows(tokens: int, max_tokens: int, context_length: int) -> int:
    """Windows of context_length + 1 the loader will cut from a split of ``tokens``."""
    full, rest = divmod(tokens, max_tokens)
    per = lambda n: max(0, (n - 1) // context_length)  # noqa: E731
    return full * per(max_tokens) + per(rest)


def _load_tokenizer(cfg: tokenize.TokenizerConfig, s3: S3Options) -> Any:
    assert cfg.load_uri is not None
    uri = cfg.load_uri
    try:
        if uri.startswith("s3://"):
            bucket, key = split_s3_uri(uri)
            data = open_storage(f"s3://{bucket}", s3).get(key)
        else:
            with open(uri, "rb") as f:
                data = f.read()
    except (OSError, StorageError) as e:
        raise PrepareError(f"spec.data.tokenizer.load.uri: cannot read {uri}: {e}") from e
    return tokenize.load_tokenizer_bytes(data, cfg)


_OWN_FILES = (MANIFEST_NAME, TOKENIZER_NAME)


def _is_own(name: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    return base in _OWN_FILES or base.endswith((".bin", ".bin.part", ".json.part"))


def _check_output(out: Storage, cfg: PrepareConfig, overwrite: bool) -> Manifest | None:
    """Returns the reusable manifest, or None after clearing the way for a fresh run."""
    existing = out.list_keys()
    if not existing:
        return None
    if MANIFEST_NAME in existing and not overwrite:
        try:
            old = Manifest.from_json(out.get(MANIFEST_NAME))
        except ShardFormatError as e:
            raise PrepareError(
                f"spec.data.outputUri: {out.describe(MANIFEST_NAME)} is unreadable ({e}); "
                "pass --overwrite or choose another outputUri"
            ) from e
        if old.fingerprint == cfg.fingerprint:
            return old
        raise PrepareError(
            f"spec.data.outputUri: {out.uri} already holds data prepared from other inputs "
            f"(fingerprint {old.fingerprint[:12]}… ≠ {cfg.fingerprint[:12]}…); pass --overwrite to "
            "replace it or choose another outputUri"
        )
    foreign = [k for k in existing if not _is_own(k)]
    if foreign and not overwrite:
        raise PrepareError(
            f"spec.data.outputUri: {out.uri} is not empty ({len(foreign)} files that are not shards, "
            f"e.g. {foreign[0]}); pass --overwrite or choose an empty outputUri"
        )
    # The manifest goes first: from here on no reader trusts the old shards.
    if MANIFEST_NAME in existing:
        out.delete([MANIFEST_NAME])
    # Only our own files go: --overwrite replaces prepared data, it never deletes a user's files.
    out.delete([k for k in existing if k != MANIFEST_NAME and _is_own(k)])
    return None


def prepare_data(
    spec: LLMTrainingJobSpec,
    *,
    overwrite: bool = False,
    num_blocks: int | None = None,
    executor: Executor = "auto",
    s3: S3Options | None = None,
    log: Callable[[str], None] | None = None,
) -> PrepareResult:
    """Run the data stage for ``spec`` (see the module doc). ``s3`` overrides the options from
    ``spec.storage`` (tests use it for a small multipart threshold)."""
    return prepare(PrepareConfig.from_spec(spec, s3), overwrite=overwrite, num_blocks=num_blocks,
                   executor=executor, log=log)  # fmt: skip


def prepare(
    cfg: PrepareConfig,
    *,
    overwrite: bool = False,
    num_blocks: int | None = None,
    executor: Executor = "auto",
    log: Callable[[str], None] | None = None,
) -> PrepareResult:
    say = log or (lambda _m: None)
    if num_blocks is not None and executor == "auto":
        executor = "ray"
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    out = open_storage(cfg.output_uri, cfg.s3)
    try:
        reusable = _check_output(out, cfg, overwrite)
    except StorageError as e:  # missing bucket, no credentials: name the spec field too
        raise PrepareError(f"spec.data.outputUri: {e}") from e
    if reusable is not None:
        say(f"reusing {out.describe(MANIFEST_NAME)} (same input fingerprint)")
        return PrepareResult(out.describe(MANIFEST_NAME), reusable, True, _summary(reusable), 0.0)

    # 1. collect + clean (parallel)
    all_sources = cfg.sources + cfg.validation_sources
    units: list[collect.WorkUnit] = []
    for src in all_sources:
        units.extend(collect.plan_source(src, cfg.s3))
    say(f"collect: {len(units)} files/objects from {len(all_sources)} sources")
    results = parallel_map(
        lambda block: _read_clean_block(block, cfg.clean, cfg.s3),
        [u.to_dict() for u in units],
        executor=executor,
        num_blocks=num_blocks,
    )
    timings["collect_clean_s"] = time.perf_counter() - t0

    dropped = dict.fromkeys(cleanmod.DROP_STEPS, 0)
    per_source_units: dict[str, list[tuple[str, str]]] = defaultdict(list)
    per_source_drops: dict[str, dict[str, int]] = {
        s.name: dict.fromkeys(cleanmod.DROP_STEPS, 0) for s in all_sources
    }
    docs: dict[str, CleanedDoc] = {}
    for _, source, ident, raw_sha, drops, unit_docs in results:
        per_source_units[source].append((ident, raw_sha))
        for k, v in drops.items():
            dropped[k] += v
            per_source_drops[source][k] += v
        for d in unit_docs:
            docs[d.key] = d

    # 2a. a validation document is never trained on: its exact copies leave the training sources
    val_names = {s.name for s in cfg.validation_sources}
    in_validation = _remove_validation_copies(docs, val_names)
    if in_validation:
        say(f"{in_validation} training documents also in spec.data.validationSources: removed from training")

    # 2b. global exact dedup: smallest key wins, whatever the block layout
    keep, dup = cleanmod.dedup_keep(((d.key, d.digest) for d in docs.values()), cfg.clean)
    dropped["duplicate"] = dup
    for k in [k for k in docs if k not in keep]:
        per_source_drops[docs[k].source]["duplicate"] += 1
        del docs[k]
    ordered_keys = sorted(docs)
    for src in all_sources:
        if not any(docs[k].source == src.name for k in ordered_keys):
            raise PrepareError(
                f"{src.spec_path}: source {src.name!r} has no documents left after cleaning "
                f"(dropped: {per_source_drops[src.name]}); check the source or spec.data.preprocessing"
            )

    # 3. tokenizer: train on a stable-key sample, or load
    t1 = time.perf_counter()
    if cfg.tokenizer.load_uri is not None:
        tok = _load_tokenizer(cfg.tokenizer, cfg.s3)
    else:
        # Validation sources stay out of the tokenizer's training too.
        sample = tokenize.choose_sample(
            ((k, docs[k].text) for k in ordered_keys if docs[k].source not in val_names),
            cfg.seed,
            cfg.tokenizer.sample_bytes,
        )
        say(f"tokenizer: training BPE vocab {cfg.tokenizer.vocab_size} on {len(sample)} documents")
        tok = tokenize.train_bpe(sample, cfg.tokenizer)
    tok_bytes = tokenize.tokenizer_json(tok)
    vocab = tokenize.vocab_size(tok)
    eot_token = cfg.tokenizer.eot_token
    eot = tokenize.eot_id(tok, eot_token)
    try:
        dtype = dtype_for_vocab(vocab)
    except ShardFormatError as e:
        raise PrepareError(f"spec.data.tokenizer: {e}") from e
    timings["tokenizer_s"] = time.perf_counter() - t1

    # 4. encode (parallel)
    t2 = time.perf_counter()
    tok_str = tok_bytes.decode("utf-8")
    encoded = dict(
        parallel_map(
            lambda block: _encode_block(block, tok_str, eot),
            [(k, docs[k].text) for k in ordered_keys],
            executor=executor,
            num_blocks=num_blocks,
        )
    )
    timings["encode_s"] = time.perf_counter() - t2

    # 5. split: by source when validationSources is set, else by hash(key, seed); never empty
    if val_names:
        split = {k: "validation" if docs[k].source in val_names else "train" for k in ordered_keys}
    else:
        split = {k: split_of(k, cfg.seed, cfg.validation_fraction) for k in ordered_keys}
    if len(ordered_keys) < 2:
        raise PrepareError(
            f"spec.data.sources: only {len(ordered_keys)} document after cleaning; a train and a "
            "validation split need at least 2 (use a finer textUnit, e.g. paragraph)"
        )
    if not any(v == "validation" for v in split.values()):
        split[min(ordered_keys, key=lambda k: hashlib.sha256(f"v{cfg.seed}{k}".encode()).digest())] = (
            "validation"
        )
    if not any(v == "train" for v in split.values()):
        split[min(ordered_keys, key=lambda k: hashlib.sha256(f"t{cfg.seed}{k}".encode()).digest())] = "train"

    # 6. mixture sampling of the training documents
    by_source: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for k in ordered_keys:
        if split[k] == "train":
            by_source[docs[k].source].append((k, int(encoded[k].size)))
    for src in cfg.sources:
        if not by_source.get(src.name):
            raise PrepareError(
                f"{src.spec_path}: source {src.name!r} has no training documents (all went to "
                "validation); lower spec.data.validationFraction or add data"
            )
    weights = None
    if all(s.weight is not None for s in cfg.sources):
        weights = {s.name: float(s.weight or 0) for s in cfg.sources}
    copies = mixture_copies(by_source, weights, cfg.seed)
    train_stream = sorted((copy_key(k, c), k) for s in copies.values() for k, n in s for c in range(n))
    val_keys = [k for k in ordered_keys if split[k] == "validation"]

    # 7. validation big enough for spec.validation.batches? (checked before anything is written)
    val_tokens = sum(int(encoded[k].size) for k in val_keys)
    if cfg.context_length is not None and cfg.val_windows_needed is not None:
        have = _windows(val_tokens, cfg.shard_max_tokens, cfg.context_length)
        if have < cfg.val_windows_needed:
            what = (
                "spec.data.validationSources"
                if val_names
                else f"spec.data.validationFraction {cfg.validation_fraction}"
            )
            fix = "add validation data" if val_names else "raise validationFraction, add data"
            raise PrepareError(
                f"{what}: the validation split has "
                f"{val_tokens} tokens = {have} windows of contextLength {cfg.context_length} + 1, but "
                f"spec.validation.batches × microBatchSize × workers needs {cfg.val_windows_needed}; "
                f"{fix} or lower spec.validation.batches"
            )

    # 8. shards, tokenizer, and the manifest last
    t3 = time.perf_counter()
    written = shard.write_split(out, "train", (encoded[k] for _, k in train_stream), vocab_size=vocab,
                                eot_id=eot, max_tokens=cfg.shard_max_tokens)  # fmt: skip
    written += shard.write_split(out, "validation", (encoded[k] for k in val_keys), vocab_size=vocab,
                                 eot_id=eot, max_tokens=cfg.shard_max_tokens)  # fmt: skip
    out.put(TOKENIZER_NAME, tok_bytes)
    timings["write_s"] = time.perf_counter() - t3

    train_tokens_by_source: dict[str, int] = defaultdict(int)
    for s, lst in copies.items():
        train_tokens_by_source[s] = sum(int(encoded[k].size) * n for k, n in lst)
    total_train = sum(train_tokens_by_source.values())
    wsum = sum(weights.values()) if weights else 0.0
    sources = []
    for src in all_sources:
        idents = sorted(per_source_units[src.name])
        extra: dict[str, Any] = {
            "kind": src.kind,
            "files": len(idents),
            "content_sha256": hashlib.sha256("\n".join(f"{i} {h}" for i, h in idents).encode()).hexdigest(),
            "dropped": per_source_drops[src.name],
            "validation_documents": sum(1 for k in val_keys if docs[k].source == src.name),
            "natural_train_tokens": sum(n for _, n in by_source.get(src.name, [])),
        }
        if src.is_validation:
            extra["split"] = "validation"
        if src.kind == "pythonStdlib":
            extra["python_version"] = collect.python_version()
            extra["include_tests"] = src.include_tests
        sources.append(
            SourceStats(
                name=src.name,
                documents=sum(1 for k in ordered_keys if docs[k].source == src.name),
                tokens=train_tokens_by_source[src.name],
                target_fraction=(weights[src.name] / wsum) if weights else None,
                realised_fraction=round(train_tokens_by_source.get(src.name, 0) / total_train, 6),
                extra=extra,
            )
        )
    manifest = Manifest(
        fingerprint=cfg.fingerprint,
        tokenizer=TokenizerInfo(
            path=TOKENIZER_NAME,
            sha256=hashlib.sha256(tok_bytes).hexdigest(),
            vocab_size=vocab,
            eot_id=eot,
            eot_token=eot_token,
        ),
        dtype=dtype,
        shards=[w.info for w in written],
        sources=sources,
        dropped=dropped,
        seed=cfg.seed,
        extra={
            "pipeline": PIPELINE_VERSION,
            "documents": {"train": len(ordered_keys) - len(val_keys), "validation": len(val_keys)},
            "train_documents_after_mixture": len(train_stream),
            "validation_fraction": cfg.validation_fraction,
            "validation_set": cfg.validation_set,
            "removed_from_training_in_validation": in_validation,
            "shard_max_tokens": cfg.shard_max_tokens,
        },
    )
    uri = shard.write_manifest(out, manifest)
    timings["total_s"] = time.perf_counter() - t0
    stats = _summary(manifest)
    stats.update(timings)
    stats["etags"] = {w.info.path: w.etag for w in written if w.etag}
    say(f"wrote {uri}")
    return PrepareResult(uri, manifest, False, stats, timings["total_s"])


def _remove_validation_copies(docs: dict[str, CleanedDoc], val_names: set[str]) -> int:
    """Drop, in place, every training document whose cleaned text is also a validation
    document (exact dedup across the splits); how many went."""
    if not val_names:
        return 0
    val_digests = {d.digest for d in docs.values() if d.source in val_names}
    gone = [k for k, d in docs.items() if d.source not in val_names and d.digest in val_digests]
    for k in gone:
        del docs[k]
    return len(gone)


def _summary(m: Manifest) -> dict[str, Any]:
    return {
        "train_tokens": m.split_tokens("train"),
        "validation_tokens": m.split_tokens("validation"),
        "train_shards": len(m.split_shards("train")),
        "validation_shards": len(m.split_shards("validation")),
        "vocab_size": m.tokenizer.vocab_size,
        "dtype": m.dtype,
        "dropped": dict(m.dropped),
        "sources": {
            s.name: {
                "documents": s.documents,
                "tokens": s.tokens,
                "target": s.target_fraction,
                "realised": s.realised_fraction,
            }
            for s in m.sources
        },
    }
