"""The task metric beside validation loss: greedy answers to held-out prompts, scored.

Each held-out record (``task-eval.jsonl`` beside the data shards: ``{"id", "messages",
"reference"}``) is rendered with the job's chat template and a generation prompt, decoded
greedily by :func:`llmtrain.runtime.generate.generate` (the KV-cache decoder; it takes one
sequence, so records are decoded one after another) until the end-of-text id or
``spec.validation.task.maxNewTokens``, and scored two ways:

* exact match: the answer equals the reference after whitespace normalisation;
* the named checker (``spec.validation.task.checker``): pass/fail per record.

**Adding a checker**: write ``def name(output: str, reference: str) -> bool`` below, decorate
it with ``@checker("camelCaseName")``, and add the same name to
``llmtrain.api.spec.TaskChecker`` (the spec cannot import this module; ``test_task_metric``
fails when the two lists differ).

**Under FSDP2** only rank 0 decodes, on a full copy of the weights: every rank takes part in
gathering the full state dict (one all-gather per parameter, kept on rank 0's CPU alone), rank
0 builds a plain model on its device from it and decodes, and the score reaches the other ranks
in one broadcast. The cost: a second full copy of the weights in rank 0's device memory while
it decodes, and the other ranks idle meanwhile. Decoding on all ranks in lockstep would need
every rank to run the same number of forward calls (each one an FSDP all-gather), which a
greedy decode stopping at end-of-text cannot promise without a second decoder.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import keyword
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from llmtrain.runtime.chat import encode_prompt
from llmtrain.runtime.generate import Sampling, generate
from llmtrain.runtime.lora import LoraSettings, merged_state
from llmtrain.runtime.model import GPT
from torch import nn

from llmtrain.api.config import ModelConfig, TrainConfig
from llmtrain.api.progress import task_metric_line

TASK_EVAL_NAME = "task-eval.jsonl"

Checker = Callable[[str, str], bool]  # (model output, reference) → pass
CHECKERS: dict[str, Checker] = {}


def checker(name: str) -> Callable[[Checker], Checker]:
    def register(fn: Checker) -> Checker:
        CHECKERS[name] = fn
        return fn

    return register


def normalize(text: str) -> str:
    """Whitespace runs become one space; ends stripped."""
    return " ".join(text.split())


@checker("exactMatch")
def exact_match(output: str, reference: str) -> bool:
    return normalize(output) == normalize(reference)


@checker("identifier")
def identifier(output: str, reference: str) -> bool:
    """The answer is the reference Python identifier (a trailing ``()`` allowed), nothing else."""
    answer = output.strip().removesuffix("()")
    return answer.isidentifier() and not keyword.iskeyword(answer) and answer == reference.strip()


@dataclass(frozen=True)
class TaskExample:
    id: str
    prompt_ids: list[int]
    reference: str


@dataclass(frozen=True)
class TaskScore:
    records: int
    exact: int  # exact matches
    passed: int  # the checker's passes
    checker: str

    @property
    def exact_match(self) -> float:
        return self.exact / self.records if self.records else 0.0

    @property
    def score(self) -> float:
        """The checker's pass ratio (the tuning metric valTaskScore)."""
        return self.passed / self.records if self.records else 0.0

    def describe(self) -> str:
        return task_metric_line(self.exact_match, self.score, self.records, self.checker)


def score(outputs: Sequence[str], references: Sequence[str], checker_name: str) -> TaskScore:
    if checker_name not in CHECKERS:
        raise ValueError(
            f"unknown task checker {checker_name!r} (spec.validation.task.checker): one of {sorted(CHECKERS)}"
        )
    check = CHECKERS[checker_name]
    pairs = list(zip(outputs, references, strict=True))
    return TaskScore(
        records=len(pairs),
        exact=sum(exact_match(o, r) for o, r in pairs),
        passed=sum(check(o, r) for o, r in pairs),
        checker=checker_name,
    )


def read_examples(
    lines: Iterable[str], encode_prompt: Callable[[list[dict[str, str]]], list[int]], limit: int
) -> list[TaskExample]:
    """The first ``limit`` records of a task-eval.jsonl, their prompts encoded for generation."""
    out: list[TaskExample] = []
    for n, line in enumerate(lines, 1):
        if len(out) == limit:
            break
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
            messages, reference = raw["messages"], raw["reference"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{TASK_EVAL_NAME} line {n}: not a task record ({e})") from e
        out.append(TaskExample(str(raw.get("id", n)), encode_prompt(messages), str(reference)))
    return out


@torch.no_grad()
def decode(
    model: nn.Module,
    examples: Sequence[TaskExample],
    *,
    max_new_tokens: int,
    stop_ids: tuple[int, ...],
    vocab_limit: int | None,
    decode_text: Callable[[list[int]], str],
    autocast: contextlib.AbstractContextManager[object] | None = None,
) -> list[str]:
    """Greedy answers, one record at a time (one host sync per new token, as in generate)."""
    s = Sampling(max_new_tokens=max_new_tokens, temperature=0.0, stop_ids=stop_ids, vocab_limit=vocab_limit)
    context: int = model.cfg.context_length  # type: ignore[assignment,union-attr]
    answers = []
    for ex in examples:
        # Keep room for the answer: a prompt longer than the context keeps its newest tokens.
        prompt = ex.prompt_ids[-max(1, context - max_new_tokens) :]
        with autocast or contextlib.nullcontext():
            ids = generate(model, prompt, s)
        if ids and ids[-1] in stop_ids:
            ids = ids[:-1]
        answers.append(decode_text(ids))
    return answers


def _full_copy(model: nn.Module, device: torch.device, lora: LoraSettings | None) -> GPT | None:
    """Rank 0: a plain GPT holding the sharded model's full weights (LoRA adapters merged in);
    other ranks: None. A collective: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    gathered = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() != 0:
        return None
    full = {k: v for k, v in gathered.items() if isinstance(v, torch.Tensor)}
    if lora is not None:
        full = merged_state(full, lora)
    cfg: ModelConfig = model.cfg  # type: ignore[assignment]
    with torch.device(device):
        copy = GPT(cfg)
    copy.load_state_dict(full)
    return copy.eval()


def evaluate_task(
    model: nn.Module,
    examples: Sequence[TaskExample],
    *,
    checker_name: str,
    max_new_tokens: int,
    stop_ids: tuple[int, ...],
    vocab_limit: int | None,
    decode_text: Callable[[list[int]], str],
    device: torch.device,
    autocast: contextlib.AbstractContextManager[object] | None = None,
    sharded: bool = False,
    lora: LoraSettings | None = None,
) -> TaskScore:
    """Decode and score on this process, or (``sharded``: FSDP2) on rank 0 from a full copy
    (``lora``: the run's adapters, merged into it), the score then broadcast: every rank
    returns the same score."""
    distributed = dist.is_available() and dist.is_initialized()

    def run(on: nn.Module) -> TaskScore:
        outputs = decode(
            on,
            examples,
            max_new_tokens=max_new_tokens,
            stop_ids=stop_ids,
            vocab_limit=vocab_limit,
            decode_text=decode_text,
            autocast=autocast,
        )
        return score(outputs, [e.reference for e in examples], checker_name)

    if not distributed:
        return run(model)
    result: list[TaskScore | None] = [None]
    if sharded:
        copy = _full_copy(model, device, lora)
        if copy is not None:
            result[0] = run(copy)
            del copy
    elif dist.get_rank() == 0:  # replicated weights: rank 0 alone decodes
        result[0] = run(model)
    dist.broadcast_object_list(result, src=0)
    assert result[0] is not None
    return result[0]


def task_score(
    model: nn.Module,
    loader: object,
    t: TrainConfig,
    device: torch.device,
    dtype: torch.dtype,
    *,
    sharded: bool,
) -> TaskScore:
    """The task metric of a training run's validation: the records, tokenizer and chat template
    beside the validation loader's shards (a :class:`~llmtrain.runtime.data.loader.ShardLoader`)."""
    store, manifest = getattr(loader, "storage", None), getattr(loader, "manifest", None)
    if store is None or manifest is None:
        raise ValueError("spec.validation.task needs prepared data (a shard loader with a manifest)")
    return score_prepared(
        model,
        store,
        manifest,
        records=t.task_records,
        max_new_tokens=t.task_max_new_tokens,
        checker_name=t.task_checker,
        device=device,
        dtype=dtype,
        sharded=sharded,
        lora=LoraSettings.from_train(t),
    )


def score_prepared(
    model: nn.Module,
    store: Any,
    manifest: Any,
    *,
    records: int,
    max_new_tokens: int,
    checker_name: str,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    sharded: bool = False,
    lora: LoraSettings | None = None,
) -> TaskScore:
    """The task metric of ``model`` on prepared task data (``store``: its prefix, ``manifest``
    its manifest): the first ``records`` of its task-eval set."""
    from tokenizers import Tokenizer

    listed = getattr(manifest, "task_eval", None)  # the manifest names the file (task data only)
    name = str(listed["path"]) if listed else TASK_EVAL_NAME
    if not store.exists(name):
        raise ValueError(
            f"spec.validation.task: {store.describe(name)} does not exist: the task metric needs "
            "task data (spec.data.sources[].task) with held-out records"
        )
    info = manifest.tokenizer
    tok = Tokenizer.from_str(store.get(info.path).decode("utf-8"))
    template = task_chat_template(store, manifest)
    lines = store.get(name).decode("utf-8").splitlines()
    examples = read_examples(
        lines, lambda m: encode_prompt(tok, m, template, eos_token=info.eot_token), records
    )
    return evaluate_task(
        model,
        examples,
        checker_name=checker_name,
        max_new_tokens=max_new_tokens,
        stop_ids=(info.eot_id,),
        vocab_limit=info.vocab_size,
        decode_text=lambda ids: str(tok.decode(ids, skip_special_tokens=True)),
        device=device,
        autocast=torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else None,
        sharded=sharded,
        lora=lora,
    )


def score_export(
    model_uri: str, data_uri: str, *, records: int, max_new_tokens: int, checker_name: str
) -> TaskScore:
    """An exported model (a Llama directory, or an adapter export on its base) scored on
    prepared task data, as a run's validation scores it: e.g. the base before fine-tuning."""
    from llmtrain.runtime.lora import load_model
    from llmtrain.runtime.store import open_store

    from llmtrain.api.shards import MANIFEST_NAME, Manifest

    store = open_store(data_uri)
    manifest = Manifest.from_json(store.get(MANIFEST_NAME))
    return score_prepared(
        load_model(model_uri),
        store,
        manifest,
        records=records,
        max_new_tokens=max_new_tokens,
        checker_name=checker_name,
        device=torch.device("cpu"),
    )


def task_chat_template(store: Any, manifest: Any) -> str:
    """The chat template the task data was tokenized with: the manifest records its sha256
    (``extra.task.chat_template_sha256``); the text is the manifest's own copy, a
    ``chat_template.jinja`` beside the shards, or the default template, whichever has that hash."""
    from llmtrain.runtime.chat import CHAT_TEMPLATE_FILE, DEFAULT_CHAT_TEMPLATE

    task = getattr(manifest, "task", None) or {}
    want = task.get("chat_template_sha256")
    candidates = [task.get("chat_template")]
    if store.exists(CHAT_TEMPLATE_FILE):
        candidates.append(store.get(CHAT_TEMPLATE_FILE).decode("utf-8"))
    candidates.append(DEFAULT_CHAT_TEMPLATE)
    for text in candidates:
        if isinstance(text, str) and (
            want is None or hashlib.sha256(text.encode("utf-8")).hexdigest() == want
        ):
            return text
    raise ValueError(
        f"spec.validation.task: the task data was rendered with a chat template (sha256 {want}) whose text "
        f"is not beside the shards ({store.describe(CHAT_TEMPLATE_FILE)}): prepare the data again"
    )
