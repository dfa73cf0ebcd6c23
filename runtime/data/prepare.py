"""The data stage: collect → clean → dedup → tokenize → split → mix → shard → manifest.

:func:`prepare_data` is what ``llmtrain data prepare`` and ``llmtrain run`` call.
:func:`prepare` reads top to bottom, one function per step:

    _reusable_output        the same inputs already prepared here? reuse them
    _collect_clean          plan every source's files, read + clean them in blocks
    _dedup                  validation copies out of training, global exact dedup
    _tokenizer              load it, or train BPE on a stable-key sample
    _encode                 token ids per document, in blocks
    _split, _mix            train/validation; the mixture's copies (runtime/data/mixture.py)
    _check_validation_size  enough validation windows, before anything is written
    _write_shards           both splits and the tokenizer
    _manifest               last: readers trust nothing without it

It is deterministic: every decision is a function of stable document keys and the seed, never of
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

import contextlib
import hashlib
import json
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from llmtrain.runtime.chat import CHAT_TEMPLATE_FILE
from llmtrain.runtime.data import clean as cleanmod
from llmtrain.runtime.data import collect, shard, task, task_steps, tokenize
from llmtrain.runtime.data.blocks import CleanedDoc, Executor, encode_block, parallel_map, read_clean_block
from llmtrain.runtime.data.mixture import copy_key, mixture_copies, split_of
from llmtrain.runtime.store import StorageError, Store, open_store, split_s3_uri

from llmtrain.api.s3 import S3Options
from llmtrain.api.shards import (
    MANIFEST_NAME,
    TASK_EVAL_NAME,
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
    # Task records (spec.data.sources[].task): the chat template they are rendered with.
    chat_template: str | None = None

    @property
    def is_task(self) -> bool:
        return any(s.task is not None for s in self.sources)

    @classmethod
    def from_spec(cls, spec: LLMTrainingJobSpec, s3: S3Options | None = None) -> PrepareConfig:
        d = spec.data
        opts = s3 or S3Options.from_spec(spec.storage)
        template = _chat_template(spec, opts)
        return cls(
            sources=tuple(collect.SourceConfig.from_spec(s, i) for i, s in enumerate(d.sources)),
            clean=cleanmod.CleanConfig.from_spec(d.preprocessing),
            tokenizer=tokenize.TokenizerConfig.from_spec(d.tokenizer),
            output_uri=d.output_uri,
            validation_fraction=d.validation_fraction,
            shard_max_tokens=d.shard_max_tokens,
            seed=d.seed,
            s3=opts,
            fingerprint=fingerprint(spec, template),
            context_length=spec.model.architecture.context_length,
            val_windows_needed=spec.validation.batches
            * spec.training.batch.micro_batch_size
            * spec.resources.workers,
            validation_sources=tuple(
                collect.SourceConfig.from_spec(s, i, "validationSources")
                for i, s in enumerate(d.validation_sources)
            ),
            chat_template=template,
        )

    @property
    def validation_set(self) -> str:
        """Which text the validation metrics measure, in words (summary, status, metrics)."""
        if self.validation_sources:
            return "validationSources: " + ", ".join(s.name for s in self.validation_sources)
        return f"hash split: {self.validation_fraction:g} of sources"


def _chat_template(spec: LLMTrainingJobSpec, s3: S3Options) -> str | None:
    """Task data's chat template (spec → imported tokenizer → default); None for plain text."""
    if not any(s.task is not None for s in [*spec.data.sources, *spec.data.validation_sources]):
        return None
    from llmtrain.runtime.chat import ChatError, resolve_chat_template

    try:
        return resolve_chat_template(spec, s3)
    except ChatError as e:
        raise PrepareError(f"spec.data.tokenizer.chatTemplate: {e}") from e


def fingerprint(spec: LLMTrainingJobSpec, chat_template: str | None = None) -> str:
    """Hash of what determines the output: spec.data minus outputUri, plus the pipeline version
    and, for the pythonStdlib corpus, the interpreter version; for task data also the context
    length (the shards are laid out in blocks of it) and the chat template."""
    data = spec.data.model_dump(mode="json", by_alias=True, exclude={"output_uri"})
    # Fields added later that are unset leave the hash of existing data as it was.
    for src in [*data["sources"], *data["validationSources"]]:
        if src.get("task") is None:
            src.pop("task", None)
    if data["tokenizer"].get("chatTemplate") is None:
        data["tokenizer"].pop("chatTemplate", None)
    extra: dict[str, Any] = {"pipeline": PIPELINE_VERSION}
    if chat_template is not None:
        extra["context_length"] = spec.model.architecture.context_length
        extra["chat_template"] = hashlib.sha256(chat_template.encode("utf-8")).hexdigest()
    if any(s.python_stdlib is not None for s in [*spec.data.sources, *spec.data.validation_sources]):
        extra["python"] = collect.python_version()
    blob = json.dumps({"data": data, **extra}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


# ------------------------------------------------------------------ driver steps


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
            data = open_store(f"s3://{bucket}", s3).get(key)
        else:
            with open(uri, "rb") as f:
                data = f.read()
    except (OSError, StorageError) as e:
        raise PrepareError(f"spec.data.tokenizer.load.uri: cannot read {uri}: {e}") from e
    return tokenize.load_tokenizer_bytes(data, cfg)


_OWN_FILES = (MANIFEST_NAME, TOKENIZER_NAME, TASK_EVAL_NAME, CHAT_TEMPLATE_FILE)


def _is_own(name: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    return base in _OWN_FILES or base.endswith((".bin", ".bin.part", ".json.part", ".mask", ".mask.part"))


def _check_output(out: Store, cfg: PrepareConfig, overwrite: bool) -> Manifest | None:
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
    """The data stage as named steps, in order; each returns what the next ones read."""
    say = log or (lambda _m: None)
    if num_blocks is not None and executor == "auto":
        executor = "ray"
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    out = open_store(cfg.output_uri, cfg.s3)
    reusable = _reusable_output(out, cfg, overwrite)
    if reusable is not None:
        say(f"reusing {out.describe(MANIFEST_NAME)} (same input fingerprint)")
        return PrepareResult(out.describe(MANIFEST_NAME), reusable, True, _summary(reusable), 0.0)

    corpus = _collect_clean(cfg, executor, num_blocks, say)
    timings["collect_clean_s"] = time.perf_counter() - t0  # from t0: the output check counts too
    _dedup(corpus, cfg, say)
    with _timed(timings, "tokenizer_s"):
        tok = _tokenizer(corpus, cfg, say)
    with _timed(timings, "encode_s"):
        encoded = (
            _encode_task(corpus, cfg, tok, executor, num_blocks)
            if cfg.is_task
            else _encode(corpus, tok, executor, num_blocks)
        )
    split = _split(corpus, cfg)
    mix = _mix(corpus, cfg, split, encoded)
    _check_validation_size(corpus, cfg, mix, encoded)
    with _timed(timings, "write_s"):
        written = _write_shards(out, cfg, tok, mix, encoded, corpus)
    manifest = _manifest(corpus, cfg, tok, mix, encoded, written)
    if corpus.bad:
        say(task_steps.bad_line(corpus.bad))
    uri = shard.write_manifest(out, manifest)
    timings["total_s"] = time.perf_counter() - t0
    stats = _summary(manifest)
    stats.update(timings)
    stats["etags"] = {w.info.path: w.etag for w in written if w.etag}
    say(f"wrote {uri}")
    return PrepareResult(uri, manifest, False, stats, timings["total_s"])


@contextlib.contextmanager
def _timed(timings: dict[str, float], name: str) -> Iterator[None]:
    t = time.perf_counter()
    yield
    timings[name] = time.perf_counter() - t


@dataclass
class _Corpus:
    """The cleaned documents by key and what each source lost on the way (collect → dedup)."""

    docs: dict[str, CleanedDoc]
    dropped: dict[str, int]  # drop step → documents, over all sources
    units: dict[str, list[tuple[str, str]]]  # source → [(file/object ident, raw sha256)]
    drops: dict[str, dict[str, int]]  # source → drop step → documents
    val_names: set[str]  # the spec.data.validationSources, by name
    keys: list[str] = field(default_factory=list)  # sorted document keys, set by _dedup
    in_validation: int = 0  # training documents removed as copies of validation ones
    # Task records (runtime/data/task.py): loss masks by key, and the records refused, named.
    masks: dict[str, np.ndarray] = field(default_factory=dict)
    bad: list[dict[str, str]] = field(default_factory=list)

    def count(self, source: str, keys: list[str]) -> int:
        return sum(1 for k in keys if self.docs[k].source == source)


@dataclass(frozen=True)
class _Tokenizer:
    json: bytes
    vocab: int
    eot: int
    dtype: str


@dataclass(frozen=True)
class _Mixture:
    by_source: dict[str, list[tuple[str, int]]]  # source → natural [(train key, tokens)]
    weights: dict[str, float] | None  # None: no source has a weight, natural mix
    copies: dict[str, list[tuple[str, int]]]  # source → [(train key, copies)]
    train_stream: list[tuple[str, str]]  # (order key, document key), in shard order
    val_keys: list[str]


def _reusable_output(out: Store, cfg: PrepareConfig, overwrite: bool) -> Manifest | None:
    try:
        return _check_output(out, cfg, overwrite)
    except StorageError as e:  # missing bucket, no credentials: name the spec field too
        raise PrepareError(f"spec.data.outputUri: {e}") from e


def _collect_clean(
    cfg: PrepareConfig, executor: Executor, num_blocks: int | None, say: Callable[[str], None]
) -> _Corpus:
    """Plan every source's files/objects, then read + clean them in parallel blocks."""
    all_sources = cfg.sources + cfg.validation_sources
    units: list[collect.WorkUnit] = []
    for src in all_sources:
        units.extend(collect.plan_source(src, cfg.s3))
    say(f"collect: {len(units)} files/objects from {len(all_sources)} sources")
    results = parallel_map(
        lambda block: read_clean_block(block, cfg.clean, cfg.s3),
        [u.to_dict() for u in units],
        executor=executor,
        num_blocks=num_blocks,
    )
    corpus = _Corpus(
        docs={},
        dropped=dict.fromkeys(cleanmod.DROP_STEPS, 0),
        units=defaultdict(list),
        drops={s.name: dict.fromkeys(cleanmod.DROP_STEPS, 0) for s in all_sources},
        val_names={s.name for s in cfg.validation_sources},
    )
    for _, source, ident, raw_sha, drops, unit_docs, bad in results:
        corpus.bad.extend(bad)
        corpus.units[source].append((ident, raw_sha))
        for k, v in drops.items():
            corpus.dropped[k] += v
            corpus.drops[source][k] += v
        for d in unit_docs:
            corpus.docs[d.key] = d
    return corpus


def _dedup(corpus: _Corpus, cfg: PrepareConfig, say: Callable[[str], None]) -> None:
    """Validation copies out of training, then global exact dedup; every source keeps a document."""
    docs = corpus.docs
    # A validation document is never trained on: its exact copies leave the training sources.
    corpus.in_validation = _remove_validation_copies(docs, corpus.val_names)
    if corpus.in_validation:
        say(
            f"{corpus.in_validation} training documents also in spec.data.validationSources: "
            "removed from training"
        )
    # Smallest key wins, whatever the block layout.
    keep, dup = cleanmod.dedup_keep(((d.key, d.digest) for d in docs.values()), cfg.clean)
    corpus.dropped["duplicate"] = dup
    for k in [k for k in docs if k not in keep]:
        corpus.drops[docs[k].source]["duplicate"] += 1
        del docs[k]
    corpus.keys = sorted(docs)
    _check_sources_left(corpus, cfg)


def _check_sources_left(corpus: _Corpus, cfg: PrepareConfig) -> None:
    for src in cfg.sources + cfg.validation_sources:
        if not corpus.count(src.name, corpus.keys):
            bad = _bad_counts(corpus.bad, src.name)
            raise PrepareError(
                f"{src.spec_path}: source {src.name!r} has no documents left after cleaning "
                f"(dropped: {corpus.drops[src.name]}"
                + (f"; bad task records: {bad}, e.g. {_first_bad(corpus.bad, src.name)}" if bad else "")
                + "); check the source or spec.data.preprocessing"
                + (f" / spec.data.{src.field_name}[{src.index}].task" if bad else "")
            )


def _bad_counts(bad: list[dict[str, str]], source: str) -> dict[str, int]:
    counts: dict[str, int] = defaultdict(int)
    for b in bad:
        if b["source"] == source:
            counts[b["reason"]] += 1
    return dict(sorted(counts.items()))


def _first_bad(bad: list[dict[str, str]], source: str) -> str:
    first = min((b for b in bad if b["source"] == source), key=lambda b: b["record"])
    return f"{first['record']}: {first['reason']} ({first['detail']})"


def _tokenizer(corpus: _Corpus, cfg: PrepareConfig, say: Callable[[str], None]) -> _Tokenizer:
    """Load the tokenizer, or train BPE on a stable-key sample of the training documents."""
    if cfg.tokenizer.load_uri is not None:
        tok = _load_tokenizer(cfg.tokenizer, cfg.s3)
    else:
        # Validation sources stay out of the tokenizer's training too.
        text = task.contents if cfg.is_task else (lambda t: t)
        sample = tokenize.choose_sample(
            (
                (k, text(corpus.docs[k].text))
                for k in corpus.keys
                if corpus.docs[k].source not in corpus.val_names
            ),
            cfg.seed,
            cfg.tokenizer.sample_bytes,
        )
        say(f"tokenizer: training BPE vocab {cfg.tokenizer.vocab_size} on {len(sample)} documents")
        tok = tokenize.train_bpe(sample, cfg.tokenizer)
    vocab = tokenize.vocab_size(tok)
    eot = tokenize.eot_id(tok, cfg.tokenizer.eot_token)
    try:
        dtype = dtype_for_vocab(vocab)
    except ShardFormatError as e:
        raise PrepareError(f"spec.data.tokenizer: {e}") from e
    return _Tokenizer(tokenize.tokenizer_json(tok), vocab, eot, dtype)


def _encode(
    corpus: _Corpus, tok: _Tokenizer, executor: Executor, num_blocks: int | None
) -> dict[str, np.ndarray]:
    """Every document's token ids (end-of-text appended), in parallel blocks; by key."""
    tok_str = tok.json.decode("utf-8")
    return dict(
        parallel_map(
            lambda block: encode_block(block, tok_str, tok.eot),
            [(k, corpus.docs[k].text) for k in corpus.keys],
            executor=executor,
            num_blocks=num_blocks,
        )
    )


def _encode_task(
    corpus: _Corpus, cfg: PrepareConfig, tok: _Tokenizer, executor: Executor, num_blocks: int | None
) -> dict[str, np.ndarray]:
    """Task records through the chat template: ids by key (masks into ``corpus.masks``); a record
    that cannot be trained on (too long, template failure) leaves the corpus, named in ``bad``."""
    assert cfg.chat_template is not None and cfg.context_length is not None
    ids, corpus.masks, refused = task_steps.encode(
        [(k, corpus.docs[k].text) for k in corpus.keys], tok.json, cfg.chat_template,
        cfg.tokenizer.eot_token, cfg.context_length, executor, num_blocks,
    )  # fmt: skip
    for key, (reason, detail) in refused.items():
        doc = corpus.docs.pop(key)
        corpus.bad.append(task.bad_entry(doc.source, doc.ref, reason, detail))
    corpus.keys = [k for k in corpus.keys if k in corpus.docs]
    _check_sources_left(corpus, cfg)
    return ids


def _split(corpus: _Corpus, cfg: PrepareConfig) -> dict[str, str]:
    """train/validation per key: by source when validationSources is set, else by hash(key,
    seed); neither split is ever empty."""
    keys = corpus.keys
    if corpus.val_names:
        split = {k: "validation" if corpus.docs[k].source in corpus.val_names else "train" for k in keys}
    else:
        split = {k: split_of(k, cfg.seed, cfg.validation_fraction) for k in keys}
    if len(keys) < 2:
        raise PrepareError(
            f"spec.data.sources: only {len(keys)} document after cleaning; a train and a "
            "validation split need at least 2 (use a finer textUnit, e.g. paragraph)"
        )
    if not any(v == "validation" for v in split.values()):
        split[min(keys, key=lambda k: hashlib.sha256(f"v{cfg.seed}{k}".encode()).digest())] = "validation"
    if not any(v == "train" for v in split.values()):
        split[min(keys, key=lambda k: hashlib.sha256(f"t{cfg.seed}{k}".encode()).digest())] = "train"
    return split


def _mix(
    corpus: _Corpus, cfg: PrepareConfig, split: dict[str, str], encoded: dict[str, np.ndarray]
) -> _Mixture:
    """Mixture sampling of the training documents and the order they are written in."""
    by_source: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for k in corpus.keys:
        if split[k] == "train":
            by_source[corpus.docs[k].source].append((k, int(encoded[k].size)))
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
    val_keys = [k for k in corpus.keys if split[k] == "validation"]
    return _Mixture(by_source, weights, copies, train_stream, val_keys)


def _check_validation_size(
    corpus: _Corpus, cfg: PrepareConfig, mix: _Mixture, encoded: dict[str, np.ndarray]
) -> None:
    """Is validation big enough for spec.validation.batches? Checked before anything is written."""
    if cfg.context_length is None or cfg.val_windows_needed is None:
        return
    val_tokens = sum(int(encoded[k].size) for k in mix.val_keys)
    if cfg.is_task:  # whole records in blocks: a window per block
        have = task_steps.count_blocks((int(encoded[k].size) for k in mix.val_keys), cfg.context_length)
    else:
        have = _windows(val_tokens, cfg.shard_max_tokens, cfg.context_length)
    if have >= cfg.val_windows_needed:
        return
    val_names = corpus.val_names
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


def _write_shards(
    out: Store,
    cfg: PrepareConfig,
    tok: _Tokenizer,
    mix: _Mixture,
    encoded: dict[str, np.ndarray],
    corpus: _Corpus,
) -> list[shard.WrittenShard]:
    """Both splits' shards and the tokenizer; the manifest is written last, by the caller."""
    if cfg.is_task:
        return _write_task_shards(out, cfg, tok, mix, encoded, corpus)
    written = shard.write_split(out, "train", (encoded[k] for _, k in mix.train_stream), vocab_size=tok.vocab,
                                eot_id=tok.eot, max_tokens=cfg.shard_max_tokens)  # fmt: skip
    written += shard.write_split(out, "validation", (encoded[k] for k in mix.val_keys), vocab_size=tok.vocab,
                                 eot_id=tok.eot, max_tokens=cfg.shard_max_tokens)  # fmt: skip
    out.put(TOKENIZER_NAME, tok.json)
    return written


def _write_task_shards(
    out: Store,
    cfg: PrepareConfig,
    tok: _Tokenizer,
    mix: _Mixture,
    encoded: dict[str, np.ndarray],
    corpus: _Corpus,
) -> list[shard.WrittenShard]:
    """Task data: token + loss-mask shards of packed whole records, the held-out prompts
    (task-eval.jsonl), the chat template they were rendered with (chat_template.jinja: the task
    metric renders its prompts with it) and the tokenizer."""
    assert cfg.context_length is not None and cfg.chat_template is not None
    kw: dict[str, Any] = {"vocab_size": tok.vocab, "eot_id": tok.eot, "max_tokens": cfg.shard_max_tokens,
                          "context_length": cfg.context_length}  # fmt: skip
    pairs = lambda keys: ((encoded[k], corpus.masks[k]) for k in keys)  # noqa: E731
    written = task_steps.write_split(out, "train", pairs(k for _, k in mix.train_stream), **kw)
    written += task_steps.write_split(out, "validation", pairs(mix.val_keys), **kw)
    task_steps.write_eval(out, [(_record_id(corpus.docs[k]), corpus.docs[k].text) for k in mix.val_keys])
    out.put(CHAT_TEMPLATE_FILE, cfg.chat_template.encode("utf-8"))
    out.put(TOKENIZER_NAME, tok.json)
    return written


def _record_id(doc: CleanedDoc) -> str:
    return f"{doc.source}:{doc.ref}"


def _task_extra(
    corpus: _Corpus, cfg: PrepareConfig, mix: _Mixture, written: list[shard.WrittenShard]
) -> dict[str, Any]:
    assert cfg.chat_template is not None and cfg.context_length is not None
    return {
        "task": task_steps.summary(
            corpus.bad,
            formats={s.name: s.task_format for s in cfg.sources + cfg.validation_sources},
            context_length=cfg.context_length,
            template=cfg.chat_template,
            records={"train": len(corpus.keys) - len(mix.val_keys), "validation": len(mix.val_keys)},
            shards=[w.info for w in written],
        ),
        "task_eval": {"path": TASK_EVAL_NAME, "records": len(mix.val_keys)},
        "chat_template": {"path": CHAT_TEMPLATE_FILE},
    }


def _manifest(
    corpus: _Corpus,
    cfg: PrepareConfig,
    tok: _Tokenizer,
    mix: _Mixture,
    encoded: dict[str, np.ndarray],
    written: list[shard.WrittenShard],
) -> Manifest:
    val_keys = mix.val_keys
    return Manifest(
        fingerprint=cfg.fingerprint,
        tokenizer=TokenizerInfo(
            path=TOKENIZER_NAME,
            sha256=hashlib.sha256(tok.json).hexdigest(),
            vocab_size=tok.vocab,
            eot_id=tok.eot,
            eot_token=cfg.tokenizer.eot_token,
        ),
        dtype=tok.dtype,
        shards=[w.info for w in written],
        sources=_source_stats(corpus, cfg, mix, encoded),
        dropped=corpus.dropped,
        seed=cfg.seed,
        extra={
            "pipeline": PIPELINE_VERSION,
            "documents": {"train": len(corpus.keys) - len(val_keys), "validation": len(val_keys)},
            "train_documents_after_mixture": len(mix.train_stream),
            "validation_fraction": cfg.validation_fraction,
            "validation_set": cfg.validation_set,
            "removed_from_training_in_validation": corpus.in_validation,
            "shard_max_tokens": cfg.shard_max_tokens,
            **(_task_extra(corpus, cfg, mix, written) if cfg.is_task else {}),
        },
    )


def _source_stats(
    corpus: _Corpus, cfg: PrepareConfig, mix: _Mixture, encoded: dict[str, np.ndarray]
) -> list[SourceStats]:
    """Per source: documents, training tokens after the mixture, target vs realised fraction."""
    train_tokens_by_source: dict[str, int] = defaultdict(int)
    for s, lst in mix.copies.items():
        train_tokens_by_source[s] = sum(int(encoded[k].size) * n for k, n in lst)
    total_train = sum(train_tokens_by_source.values())
    weights = mix.weights
    wsum = sum(weights.values()) if weights else 0.0
    sources = []
    for src in cfg.sources + cfg.validation_sources:
        idents = sorted(corpus.units[src.name])
        extra: dict[str, Any] = {
            "kind": src.kind,
            "files": len(idents),
            "content_sha256": hashlib.sha256("\n".join(f"{i} {h}" for i, h in idents).encode()).hexdigest(),
            "dropped": corpus.drops[src.name],
            "validation_documents": corpus.count(src.name, mix.val_keys),
            "natural_train_tokens": sum(n for _, n in mix.by_source.get(src.name, [])),
        }
        if src.is_validation:
            extra["split"] = "validation"
        if src.task is not None:
            extra["bad_records"] = _bad_counts(corpus.bad, src.name)
        if src.kind == "pythonStdlib":
            extra["python_version"] = collect.python_version()
            extra["include_tests"] = src.include_tests
        sources.append(
            SourceStats(
                name=src.name,
                documents=corpus.count(src.name, corpus.keys),
                tokens=train_tokens_by_source[src.name],
                target_fraction=(weights[src.name] / wsum) if weights else None,
                realised_fraction=round(train_tokens_by_source.get(src.name, 0) / total_train, 6),
                extra=extra,
            )
        )
    return sources


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
    task_info = m.task
    task_part: dict[str, Any] = {}
    if task_info is not None:
        task_part["task"] = {
            "records": task_info["records"],
            "bad_records": task_info["bad_records"],
            "bad_examples": task_info["bad_examples"][:5],
            "target_tokens": task_info["target_tokens"],
            "task_eval": m.task_eval,
        }
    return {
        **task_part,
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
