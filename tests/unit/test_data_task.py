"""Task data (#27 items 1-2): prompt/response and chat records through ``prepare`` (local files),
bad records named in the manifest, loss-mask shards, and the loss on the answers only —
checked against an independent computation, with the exact resume of a task fine-tune."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from llmtrain.runtime import train as train_mod
from llmtrain.runtime.chat import DEFAULT_CHAT_TEMPLATE, render
from llmtrain.runtime.checkpoint import Lineage
from llmtrain.runtime.data.loader import LoaderError, ShardLoader, read_verified_mask, read_verified_shard
from llmtrain.runtime.data.prepare import prepare_data
from llmtrain.runtime.driver import _task_info
from llmtrain.runtime.evaluate import evaluate
from llmtrain.runtime.store import LocalStore
from llmtrain.runtime.synthetic import tiny_spec_dict
from llmtrain.runtime.train import RunContext, TrainResult, build_model, train
from tokenizers import Tokenizer
from typer.testing import CliRunner

from llmtrain.api.config import RuntimeConfig, runtime_config_from_spec
from llmtrain.api.progress import DataInfo
from llmtrain.api.shards import MANIFEST_NAME, TASK_EVAL_NAME, TOKENIZER_NAME, Manifest
from llmtrain.api.spec import LLMTrainingJobSpec
from llmtrain.api.status import DataStatus
from llmtrain.cli.data import app as data_app

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))
from datahelpers import make_spec

CONTEXT = 128
EOT = "<|endoftext|>"


def pr_records() -> list[Any]:
    good = [{"prompt": f"What is {i} plus {i + 1}?", "response": f"It is {2 * i + 1}."} for i in range(80)]
    bad = [
        {"prompt": "no answer here"},  # line 81: missing_field
        {"prompt": "   ", "response": "x"},  # line 82: empty_content
        {"prompt": 7, "response": "x"},  # line 83: wrong_type
        {"prompt": "long " * 200, "response": "y"},  # line 84: too_long
    ]
    return good + bad


def chat_records() -> list[dict[str, Any]]:
    good = [
        {
            "messages": [
                {"role": "user", "content": f"Spell {w}."},
                {"role": "assistant", "content": " ".join(w)},
                {"role": "user", "content": "Backwards?"},
                {"role": "assistant", "content": w[::-1]},
            ]
        }
        for w in ("cat", "dog", "bird", "fish", "lion", "wolf", "bear", "frog", "duck", "goat") * 4
    ]
    good = [
        {"messages": [{"role": "system", "content": f"Game {i}."}, *r["messages"]]}
        for i, r in enumerate(good)
    ]
    bad = [
        {
            "messages": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "x"}]
        },  # role_order
        {"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]},  # bad_role
        {"messages": [{"role": "user", "content": "only a question"}]},  # role_order (no answer)
        {"other": []},  # missing_field
    ]
    return good + bad


def task_data_spec(folder: Path, out: Path, **top: Any) -> LLMTrainingJobSpec:
    return make_spec(
        {
            "sources": [
                {
                    "name": "pr",
                    "local": {"glob": str(folder / "*.jsonl"), "format": "jsonl"},
                    "task": {"format": "promptResponse", "system": "Answer briefly."},
                },
                {
                    "name": "chat",
                    "local": {"glob": str(folder / "*.parquet"), "format": "parquet"},
                    "task": {"format": "chat"},
                },
            ],
            "tokenizer": {"train": {"vocabSize": 320}},
            "outputUri": str(out),
            "validationFraction": 0.2,
        },
        model={"architecture": {"layers": 1, "dModel": 16, "heads": 2, "contextLength": CONTEXT}},
        **top,
    )


def write_task_files(folder: Path) -> Path:
    """qa.jsonl (prompt/response) and talk.parquet (chat), each with bad records at the end."""
    lines = [json.dumps(r) for r in pr_records()] + ["{not json"]  # line 85: not_json
    (folder / "qa.jsonl").write_text("\n".join(lines) + "\n")
    pq.write_table(pa.Table.from_pylist(chat_records()), folder / "talk.parquet")
    return folder


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_task_files(tmp_path_factory.mktemp("task"))


@pytest.fixture(scope="module")
def prepared(task_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("prepared") / "out"
    prepare_data(task_data_spec(task_dir, out))
    return out


def test_bad_task_records_are_named_and_counted(task_dir: Path, tmp_path: Path) -> None:
    res = prepare_data(task_data_spec(task_dir, tmp_path / "out"))
    task = res.manifest.task
    assert task is not None
    assert task["bad_records"] == {
        "bad_role": 1,
        "empty_content": 1,
        "missing_field": 2,
        "not_json": 1,
        "role_order": 2,
        "too_long": 1,
        "wrong_type": 1,
    }
    named = {(b["source"], b["record"], b["reason"]) for b in task["bad_examples"]}
    assert {
        ("pr", "qa.jsonl line 81", "missing_field"),
        ("pr", "qa.jsonl line 82", "empty_content"),
        ("pr", "qa.jsonl line 83", "wrong_type"),
        ("pr", "qa.jsonl line 84", "too_long"),
        ("pr", "qa.jsonl line 85", "not_json"),
        ("chat", "talk.parquet row 40", "role_order"),
        ("chat", "talk.parquet row 41", "bad_role"),
        ("chat", "talk.parquet row 42", "role_order"),
        ("chat", "talk.parquet row 43", "missing_field"),
    } == named
    by_source = {s.name: s.extra["bad_records"] for s in res.manifest.sources}
    assert sum(by_source["pr"].values()) == 5 and sum(by_source["chat"].values()) == 4
    assert task["records"]["train"] + task["records"]["validation"] == 80 + 40  # no bad one trained on
    assert res.stats["task"]["bad_records"] == task["bad_records"]  # the run summary shows them
    # Reused as is: the manifest (and its list of bad records) is read back.
    again = prepare_data(task_data_spec(task_dir, tmp_path / "out"))
    assert again.reused and again.manifest.task == task
    # status.data (the run's status.json and the job's status) counts them by reason.
    data = DataInfo("m", 1, 1, 1, **_task_info(res.manifest)).status()
    assert data["taskRecords"] == 120 and data["badRecords"] == task["bad_records"]
    DataStatus.model_validate(data)
    # `llmtrain data prepare` prints the counts and names the first ones.
    spec = task_data_spec(task_dir, tmp_path / "cli").model_dump(
        mode="json", by_alias=True, exclude_none=True
    )
    job = {
        "apiVersion": "llmtrain.dev/v1alpha1",
        "kind": "LLMTrainingJob",
        "metadata": {"name": "t"},
        "spec": spec,
    }
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    out = CliRunner().invoke(data_app, ["prepare", str(tmp_path / "job.yaml")], terminal_width=200)
    assert out.exit_code == 0, out.output
    assert (
        "bad records" in out.output and "qa.jsonl line 81" in out.output and "missing_field 2" in out.output
    )


def test_masks_cover_the_answers_and_records_stay_whole(prepared: Path) -> None:
    store = LocalStore(prepared)
    m = Manifest.from_json(store.get(MANIFEST_NAME))
    tok = Tokenizer.from_file(str(prepared / TOKENIZER_NAME))
    evals = [json.loads(line) for line in (prepared / TASK_EVAL_NAME).read_text().splitlines()]
    assert m.task_eval == {"path": TASK_EVAL_NAME, "records": len(evals)} and evals
    # The template the records were rendered with lies beside them (the task metric renders with it).
    assert (prepared / m.extra["chat_template"]["path"]).read_text() == DEFAULT_CHAT_TEMPLATE
    for info in m.shards:
        ids = read_verified_shard(store, info, m)
        mask = read_verified_mask(store, info)
        assert info.mask is not None and int(mask.sum()) == info.mask.targets
        assert (ids.numel() - 1) % CONTEXT == 0  # whole blocks + one padding token
        blocks = ids[:-1].view(-1, CONTEXT)
        bmask = mask[:-1].view(-1, CONTEXT)
        assert not bmask[:, 0].any()  # a block (window) never starts inside an answer
        for row in blocks:  # every block starts with a record's first token: records never straddle
            assert tok.decode(row[:3].tolist(), skip_special_tokens=False).startswith("###")
        if info.split == "validation":
            # The validation split's masked tokens are exactly its records' assistant turns (every
            # one, earlier turns of a chat included), each with its EOT, in task-eval.jsonl's order.
            answers = tok.decode(ids[mask].tolist(), skip_special_tokens=False)
            turns = [
                [m["content"] for m in e["messages"] if m["role"] == "assistant"] + [e["reference"]]
                for e in evals
            ]
            assert answers == "".join(t + EOT for ts in turns for t in ts)
            assert any(len(ts) == 2 for ts in turns)  # a multi-turn chat is among them
            # ...and each eval line's prompt turns + reference render to a record in the shard.
            text = tok.decode(ids.tolist(), skip_special_tokens=False)
            for e in evals:
                whole = [*e["messages"], {"role": "assistant", "content": e["reference"]}]
                assert render(whole, DEFAULT_CHAT_TEMPLATE, eos_token=EOT) in text
                assert e["messages"][-1]["role"] == "user"


# ------------------------------------------------------------------ the loss on the answers


def task_cfg(prepared: Path, **over: Any) -> RuntimeConfig:
    base = {
        "model.architecture.contextLength": CONTEXT,
        "training.batch.globalBatchSize": 4,
        "training.batch.microBatchSize": 2,  # accumulation 2
        "validation.batches": 2,
    }
    spec = LLMTrainingJobSpec.model_validate(tiny_spec_dict(**{**base, **over}))
    m = Manifest.from_json(LocalStore(prepared).get(MANIFEST_NAME))
    return runtime_config_from_spec(spec, vocab_size=m.tokenizer.vocab_size)


def run_task(prepared: Path, cfg: RuntimeConfig, **ctx: Any) -> TrainResult:
    make = functools.partial(ShardLoader, str(prepared))
    return train(cfg, make, ctx=RunContext(metrics_addr="127.0.0.1", **ctx))


def independent_loss(
    model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]
) -> torch.Tensor:
    """Σ −log p(target) over the positions whose target is an answer token, / their count,
    over all the step's micro batches — by hand, in float64, no library loss."""
    total = torch.zeros((), dtype=torch.float64)
    count = 0
    for tokens, mask in batches:
        logits = model(tokens[:, :-1]).double()
        logp = logits - logits.logsumexp(-1, keepdim=True)
        for b in range(tokens.shape[0]):
            for p in range(tokens.shape[1] - 1):
                if mask[b, p + 1]:
                    total = total - logp[b, p, tokens[b, p + 1]]
                    count += 1
    assert 0 < count < sum(t[:, 1:].numel() for t, _ in batches)  # some targets are masked out
    return total / count


def first_step_batches(prepared: Path, cfg: RuntimeConfig, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader = ShardLoader(str(prepared), "train", 0, 1, cfg.train.micro_batch_size, CONTEXT, cfg.train.seed)
    it = iter(loader)
    return [next(it) for _ in range(n)]


def test_masked_loss_and_gradient_equal_an_independent_computation(
    prepared: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Step 1's loss (over 2 accumulated micro batches) and its gradient are those of the mean
    answer-token loss computed by hand; validation loss likewise. Negative control: without the
    mask (every target counted) the training loss no longer matches."""
    cfg = task_cfg(
        prepared,
        **{
            "training.duration.maxSteps": 1,
            "training.optimizer.type": "sgd",
            "training.optimizer.lr": 1.0,
            "training.optimizer.weightDecay": 0.0,
            "training.schedule.warmupSteps": 0,
            "training.schedule.decay": "constant",
            "training.gradClip": 0.0,
        },
    )
    batches = first_step_batches(prepared, cfg, cfg.train.grad_accum_steps)
    assert cfg.train.grad_accum_steps == 2 and all(isinstance(b, tuple) for b in batches)
    model = build_model(cfg, torch.device("cpu"), use_fsdp=False)  # the same seeded init
    w0 = {k: v.detach().clone() for k, v in model.state_dict().items()}
    expected = independent_loss(model, batches)
    expected.backward()
    result = run_task(prepared, cfg, gather_weights=True)
    assert result.losses[0] == pytest.approx(expected.item(), rel=1e-5)
    # SGD, lr 1, no decay, no clipping: w1 = w0 − ∇ — the step's gradient is the masked mean's.
    assert result.weights is not None
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert len(grads) > 5 and set(grads) <= set(result.weights)
    for name, g in grads.items():
        torch.testing.assert_close(w0[name] - result.weights[name], g.float(), rtol=1e-4, atol=1e-6)
    # Validation loss: the answers of the validation split's first batches, by hand.
    val_batches = [
        b
        for b in ShardLoader(str(prepared), "validation", 0, 1, 2, CONTEXT, 0)  # type: ignore[misc]
    ][:2]
    model.zero_grad()
    with torch.no_grad():
        want = independent_loss(model, val_batches)
        got = evaluate(model, iter(val_batches), 2, torch.device("cpu"))
    assert got.loss == pytest.approx(float(want), rel=1e-5)
    assert got.tokens == sum(int(m[:, 1:].sum()) for _, m in val_batches)

    # Negative control: the mask removed, the loss covers every target and differs.
    monkeypatch.setattr(train_mod, "masked_targets", lambda targets, mask: targets)
    unmasked = run_task(prepared, cfg)
    assert unmasked.losses[0] != pytest.approx(expected.item(), rel=1e-3)


def test_task_fine_tune_resumes_exactly(prepared: Path, tmp_path: Path) -> None:
    """Killed after step 3, resumed: the losses after the resume equal the uninterrupted run's."""
    lineage_dir = tmp_path / "ck"
    cfg = task_cfg(
        prepared,
        **{
            "checkpoint.uri": str(lineage_dir),
            "checkpoint.everySteps": 3,
            "checkpoint.keepLast": 5,
            "model.architecture.dropout": 0.1,
            "training.duration.maxSteps": 8,
            "training.schedule.warmupSteps": 2,
        },
    )
    whole = run_task(prepared, cfg)
    for step in (6, 8):
        Lineage(str(lineage_dir), 5).store.delete_dir(f"step_{step:08d}")
    resumed = run_task(prepared, cfg)
    assert resumed.resumed_from == 3 and resumed.steps == list(range(4, 9))
    assert resumed.losses == whole.losses[3:]  # bitwise
    assert [v["loss"] for v in resumed.validations] == [v["loss"] for v in whole.validations][
        -len(resumed.validations) :
    ]
    for step in (6, 8):
        Lineage(str(lineage_dir), 5).store.delete_dir(f"step_{step:08d}")
    moved = run_task(prepared, cfg, skip_loader_restore=True)  # negative control: other batches
    assert moved.losses != whole.losses[3:]


def test_plain_text_batches_stay_tensors(prepared: Path, tmp_path: Path) -> None:
    """No mask for plain text: the loader yields token tensors as before, and a task-data loader
    refuses another context length (its shards are laid out in blocks of the prepared one)."""
    from datahelpers import raw_clean, stdlib_sample, write_docs

    write_docs(tmp_path / "c", stdlib_sample(10))
    spec = make_spec(
        {
            "sources": [{"name": "d", "local": {"glob": str(tmp_path / "c" / "*.txt"), "textUnit": "file"}}],
            "preprocessing": raw_clean(),
            "tokenizer": {"train": {"vocabSize": 300}},
            "outputUri": str(tmp_path / "out"),
            "validationFraction": 0.2,
        }
    )
    res = prepare_data(spec)
    assert not res.manifest.masked and res.manifest.task is None and "task" not in res.stats
    assert '"mask"' not in (tmp_path / "out" / MANIFEST_NAME).read_text()
    batch = next(iter(ShardLoader(str(tmp_path / "out"), "train", 0, 1, 2, 16, 0)))
    assert isinstance(batch, torch.Tensor) and batch.shape == (2, 17)
    with pytest.raises(LoaderError, match="contextLength 128, not 32"):
        ShardLoader(str(prepared), "train", 0, 1, 2, 32, 0)


def test_task_fine_tune_of_an_imported_hf_llama_has_transformers_masked_loss(
    prepared: Path, tmp_path: Path
) -> None:
    """Init path 2 (spec.model.init.pretrained: a Hugging Face Llama directory): step 1's loss is
    the answer-token mean of transformers' own LlamaForCausalLM logits on the same batches."""
    from tests.unit.test_export import hf_random_llama

    llama = tmp_path / "llama"
    cfg = task_cfg(
        prepared,
        **{
            "training.duration.maxSteps": 1,
            "model.architecture.kvHeads": 2,
            "model.init.random": None,
            "model.init.pretrained": {"uri": str(llama)},
        },
    )
    hf = hf_random_llama(cfg.model)
    hf.save_pretrained(llama)
    batches = first_step_batches(prepared, cfg, cfg.train.grad_accum_steps)
    total, count = 0.0, 0
    with torch.no_grad():
        for tokens, mask in batches:
            logits = hf(tokens[:, :-1]).logits.double()
            targets = torch.where(mask[:, 1:], tokens[:, 1:], -100)
            total += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(),
                                                             reduction="sum", ignore_index=-100))  # fmt: skip
            count += int(mask[:, 1:].sum())
    result = run_task(prepared, cfg)
    assert result.losses[0] == pytest.approx(total / count, abs=1e-4)


def test_compiled_loss_skips_masked_targets_like_eager() -> None:
    """spec.training.compile compiles the loss too: masked targets add nothing there either."""
    from llmtrain.runtime.model import masked_targets, token_loss_sum
    from llmtrain.runtime.train import build_loss

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 16, 96, generator=gen)
    targets = torch.randint(0, 96, (2, 16), generator=gen)
    mask = torch.rand(2, 16, generator=gen) < 0.3
    masked = masked_targets(targets, mask)
    by_hand = -(logits.log_softmax(-1).gather(-1, targets[..., None])[..., 0])[mask].sum()
    eager_in, fused_in = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    eager, fused = token_loss_sum(eager_in, masked), build_loss(True)(fused_in, masked)
    torch.testing.assert_close(eager, by_hand, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused, by_hand, rtol=1e-5, atol=1e-4)
    (eager + fused).backward()
    assert eager_in.grad is not None and fused_in.grad is not None
    torch.testing.assert_close(fused_in.grad, eager_in.grad, rtol=1e-4, atol=1e-6)
    assert not eager_in.grad[~mask].any()  # no gradient from a masked position


def test_task_validation_sources_are_the_held_out_records(task_dir: Path, tmp_path: Path) -> None:
    """spec.data.validationSources with task: its records are the validation split and task-eval.jsonl."""
    spec = task_data_spec(task_dir, tmp_path / "out")
    held = tmp_path / "held"
    held.mkdir()
    (held / "h.jsonl").write_text(
        "\n".join(json.dumps({"prompt": f"Held {i}?", "response": f"h{i}"}) for i in range(30)) + "\n"
    )
    raw = spec.model_dump(mode="json", by_alias=True, exclude_none=True)
    raw["data"]["validationSources"] = [
        {
            "name": "held",
            "local": {"glob": str(held / "*.jsonl"), "format": "jsonl"},
            "task": {"format": "promptResponse"},
        }
    ]
    res = prepare_data(LLMTrainingJobSpec.model_validate(raw))
    evals = [json.loads(x) for x in (tmp_path / "out" / TASK_EVAL_NAME).read_text().splitlines()]
    assert sorted(e["reference"] for e in evals) == sorted(f"h{i}" for i in range(30))
    assert all(e["id"].startswith("held:h.jsonl line ") for e in evals)
    assert res.manifest.task is not None and res.manifest.task["records"]["validation"] == 30


def test_record_reasons_named_by_the_pure_steps(prepared: Path) -> None:
    """conversation(): field names, system, and each reason; encode_block(): a special token's text
    inside a content (it would become the token) and a record longer than the context."""
    from llmtrain.runtime.data import task

    pr = task.TaskFields("promptResponse", prompt_field="q", response_field="a", system="S.")
    assert task.conversation({"q": "Hi?", "a": "Yo."}, pr) == [
        {"role": "system", "content": "S."},
        {"role": "user", "content": "Hi?"},
        {"role": "assistant", "content": "Yo."},
    ]
    chat = task.TaskFields("chat", messages_field="turns")
    cases = {
        "missing_field": {"messages": []},
        "wrong_type": {"turns": "hello"},
        "bad_role": {"turns": [{"role": "tool", "content": "x"}]},
        "empty_content": {"turns": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}]},
        "role_order": {"turns": [{"role": "user", "content": "q"}, {"role": "system", "content": "s"}]},
    }
    for reason, record in cases.items():
        with pytest.raises(task.BadRecord) as e:
            task.conversation(record, chat)
        assert e.value.reason == reason, record
    tok_json = (prepared / TOKENIZER_NAME).read_text()
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": f"a{EOT}b"}]
    long = [{"role": "user", "content": "q " * 300}, {"role": "assistant", "content": "a"}]
    got = task.encode_block(
        [("k1", task.to_text(msgs)), ("k2", task.to_text(long))],
        tok_json,
        DEFAULT_CHAT_TEMPLATE,
        EOT,
        CONTEXT,
    )
    assert [(k, reason) for k, _, _, reason, _ in got] == [("k1", "special_token"), ("k2", "too_long")]
