"""The task metric (runtime/task_metric.py): greedy answers to held-out prompts, scored.

* On a tiny random model the answers equal an independent greedy loop (full forward per
  token, no KV cache), and exact-match / checker counts equal counts made here by hand.
* Negative control: a checker that passes everything makes the count test fail.
* Under FSDP2 (2 gloo ranks) rank 0 decodes on gathered weights: the same score as one process.
* From a data directory (tokenizer, chat template, task-eval.jsonl) as training's validation reads it.
* The result reaches status.metrics (ProgressEvent.status_patch) and Prometheus.
* The spec: checker names equal the runtime's registry; rules on validation.task and valTaskScore.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from llmtrain.runtime import task_metric as tm
from llmtrain.runtime.export import TokenizerFiles
from llmtrain.runtime.lora import LoraSettings, apply_lora
from llmtrain.runtime.model import GPT

from llmtrain.api.config import ModelConfig, TrainConfig
from llmtrain.api.progress import ProgressEvent
from tests.unit.test_export import model_config, random_gpt, tokenizer  # noqa: F401

VOCAB_LIMIT = 300  # ids ≥ this are padding rows: never produced


def tiny() -> tuple[GPT, ModelConfig]:
    cfg = ModelConfig(
        vocab_size=320, n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, context_length=48, ffn_hidden_size=64
    )
    return random_gpt(cfg, seed=3), cfg


def naive_greedy(model: GPT, prompt: list[int], max_new: int, stop: int) -> list[int]:
    """Independent of generate(): the whole sequence through the model for every new token."""
    ids = list(prompt)
    out: list[int] = []
    with torch.no_grad():
        for _ in range(max_new):
            logits = model(torch.tensor([ids]))[0, -1].clone()
            logits[VOCAB_LIMIT:] = float("-inf")
            token = int(logits.argmax())
            if token == stop:
                break
            out.append(token)
            ids.append(token)
    return out


def as_text(ids: list[int]) -> str:
    return " ".join(f"t{i}" for i in ids)


def examples(model: GPT, stop: int) -> tuple[list[tm.TaskExample], list[str]]:
    """12 prompts; references: the true greedy answer for even ones (padded with whitespace,
    which exact match normalises away), a wrong answer for odd ones."""
    gen = torch.Generator().manual_seed(7)
    out, answers = [], []
    for i in range(12):
        prompt = torch.randint(0, VOCAB_LIMIT, (5 + i,), generator=gen).tolist()
        answer = as_text(naive_greedy(model, prompt, 6, stop))
        answers.append(answer)
        reference = f"  {answer}\n" if i % 2 == 0 else answer + " t0"
        out.append(tm.TaskExample(str(i), prompt, reference))
    return out, answers


def run_metric(model: GPT, exs: list[tm.TaskExample], checker: str, stop: int) -> tm.TaskScore:
    return tm.evaluate_task(
        model,
        exs,
        checker_name=checker,
        max_new_tokens=6,
        stop_ids=(stop,),
        vocab_limit=VOCAB_LIMIT,
        decode_text=lambda ids: as_text(ids),
        device=torch.device("cpu"),
    )


@tm.checker("testEvenId")
def _even_id(output: str, reference: str) -> bool:
    """A test checker: passes when the answer's first token id is even."""
    return bool(output.split()) and int(output.split()[0][1:]) % 2 == 0


def test_answers_equal_an_independent_greedy_loop_and_counts_match() -> None:
    model, _ = tiny()
    stop = 17
    exs, answers = examples(model, stop)
    decoded = tm.decode(
        model, exs, max_new_tokens=6, stop_ids=(stop,), vocab_limit=VOCAB_LIMIT, decode_text=as_text
    )
    assert decoded == answers
    s = run_metric(model, exs, "testEvenId", stop)
    assert (s.records, s.exact) == (12, 6)  # the even records, by construction
    assert s.passed == sum(_even_id(a, "") for a in answers)
    assert s.exact_match == 0.5 and s.score == s.passed / 12
    assert s.describe().startswith("task exact match 0.50 (6/12), testEvenId ")


def test_negative_control_a_checker_that_passes_everything_is_caught() -> None:
    model, _ = tiny()
    exs, answers = examples(model, 17)
    expected = sum(_even_id(a, "") for a in answers)
    assert 0 < expected < 12  # the control can fail only if the real count is not "all"
    saved = tm.CHECKERS["testEvenId"]
    tm.CHECKERS["testEvenId"] = lambda o, r: True
    try:
        assert run_metric(model, exs, "testEvenId", 17).passed != expected
    finally:
        tm.CHECKERS["testEvenId"] = saved


def test_checkers() -> None:
    assert tm.exact_match(" get  value\n", "get value")
    assert not tm.exact_match("get_value", "get value")
    assert tm.identifier("get_lineno", "get_lineno")
    assert tm.identifier(" get_lineno()\n", "get_lineno")
    assert not tm.identifier("get_lineno(self)", "get_lineno")
    assert not tm.identifier("get lineno", "get lineno")  # not an identifier, even if equal
    assert not tm.identifier("def", "def")  # a keyword is no function name
    with pytest.raises(ValueError, match=r"spec\.validation\.task\.checker"):
        tm.score(["a"], ["a"], "nope")


def test_spec_checker_names_are_the_runtime_registry() -> None:
    from llmtrain.api.spec import TaskChecker

    assert {c.value for c in TaskChecker} == set(tm.CHECKERS) - {"testEvenId"}


# -------------------------------------------------------------------------- FSDP2


def _fsdp_worker(rank: int, world: int, port: int, state: dict[str, Any], out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = []
        for lora in (None, LORA):  # full weights; adapters on a frozen base (merged for decoding)
            model, _ = tiny()
            if lora is not None:
                apply_lora(model, lora)
            model.load_state_dict(state if lora is None else lora_state(state))
            mesh = init_device_mesh("cpu", (world,))
            for block in model.layers:
                fully_shard(block, mesh=mesh)
            fully_shard(model, mesh=mesh)
            exs, _ = examples(tiny_reference(state), 17)
            s = run_metric_sharded(model, exs, lora)
            results.append([s.records, s.exact, s.passed])
        Path(out, f"rank{rank}.json").write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


def tiny_reference(state: dict[str, Any]) -> GPT:
    model, _ = tiny()
    model.load_state_dict(state)
    return model


LORA = LoraSettings(rank=2, alpha=4.0, targets=("attention.wq", "feed_forward.w2"))


def lora_state(state: dict[str, Any]) -> dict[str, Any]:
    """The base weights plus adapters whose update (B·A) is not zero: decoding without merging
    them would answer differently."""
    model, _ = tiny()
    apply_lora(model, LORA)
    out = dict(state)
    gen = torch.Generator().manual_seed(5)
    for name, p in model.named_parameters():
        if name.endswith((".lora_A", ".lora_B")):
            out[name] = torch.randn(p.shape, generator=gen) * 0.5
    return out


def run_metric_sharded(
    model: torch.nn.Module, exs: list[tm.TaskExample], lora: LoraSettings | None
) -> tm.TaskScore:
    return tm.evaluate_task(
        model,
        exs,
        checker_name="testEvenId",
        max_new_tokens=6,
        stop_ids=(17,),
        vocab_limit=VOCAB_LIMIT,
        decode_text=as_text,
        device=torch.device("cpu"),
        sharded=True,
        lora=lora,
    )


def test_fsdp2_rank0_decodes_on_gathered_weights_and_every_rank_gets_the_score(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    model, _ = tiny()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    exs, _ = examples(model, 17)
    alone = run_metric(model, exs, "testEvenId", 17)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    adapted, _ = tiny()
    apply_lora(adapted, LORA)
    adapted.load_state_dict(lora_state(state))
    with_lora = run_metric(adapted.eval(), exs, "testEvenId", 17)
    assert (with_lora.exact, with_lora.passed) != (alone.exact, alone.passed)  # the adapters matter
    mp.spawn(_fsdp_worker, args=(2, port, state, str(tmp_path)), nprocs=2, join=True)
    expected = [[s.records, s.exact, s.passed] for s in (alone, with_lora)]
    for rank in (0, 1):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == expected


# ------------------------------------------------------------- from a data directory


def test_task_score_reads_records_tokenizer_and_template_beside_the_shards(
    tmp_path: Path,
    tokenizer: TokenizerFiles,  # noqa: F811
) -> None:
    from llmtrain.runtime.chat import DEFAULT_CHAT_TEMPLATE, encode_prompt
    from llmtrain.runtime.store import LocalStore
    from tokenizers import Tokenizer

    cfg = model_config(tokenizer, tied=False)
    model = random_gpt(cfg, seed=11)
    (tmp_path / "tokenizer.json").write_bytes(tokenizer.json_bytes)
    tok = Tokenizer.from_str(tokenizer.json_bytes.decode())
    records = [
        {"id": f"r{i}", "messages": [{"role": "user", "content": f"Name {i}?"}], "reference": f"name{i}"}
        for i in range(5)
    ]
    # The reference of r0 is the model's own greedy answer: exactly one exact match.
    ids = encode_prompt(tok, records[0]["messages"], DEFAULT_CHAT_TEMPLATE, eos_token=tokenizer.eot_token)
    first = naive_greedy_eot(model, ids, 8, tokenizer.eot_id, tokenizer.vocab_size)
    records[0]["reference"] = tok.decode(first, skip_special_tokens=True)
    (tmp_path / tm.TASK_EVAL_NAME).write_text("".join(json.dumps(r) + "\n" for r in records))
    info = SimpleNamespace(
        path="tokenizer.json",
        eot_token=tokenizer.eot_token,
        eot_id=tokenizer.eot_id,
        vocab_size=tokenizer.vocab_size,
    )
    loader = SimpleNamespace(storage=LocalStore(tmp_path), manifest=SimpleNamespace(tokenizer=info))
    t = TrainConfig(
        global_batch_size=1,
        micro_batch_size=1,
        world_size=1,
        max_steps=1,
        task_records=4,
        task_max_new_tokens=8,
    )
    s = tm.task_score(model, loader, t, torch.device("cpu"), torch.float32, sharded=False)
    assert (s.records, s.exact, s.checker) == (4, 1, "exactMatch")  # records capped at 4
    # The data was rendered with another template (its sha256 in the manifest): refused, not guessed.
    loader.manifest.task = {"chat_template_sha256": "0" * 64}
    with pytest.raises(ValueError, match="chat template"):
        tm.task_score(model, loader, t, torch.device("cpu"), torch.float32, sharded=False)
    (tmp_path / tm.TASK_EVAL_NAME).unlink()
    with pytest.raises(ValueError, match=r"spec.validation.task: .*task-eval.jsonl does not exist"):
        tm.task_score(model, loader, t, torch.device("cpu"), torch.float32, sharded=False)


def naive_greedy_eot(model: GPT, prompt: list[int], max_new: int, stop: int, limit: int) -> list[int]:
    ids, out = list(prompt), []
    with torch.no_grad():
        for _ in range(max_new):
            logits = model(torch.tensor([ids]))[0, -1].clone()
            logits[limit:] = float("-inf")
            token = int(logits.argmax())
            if token == stop:
                break
            out.append(token)
            ids.append(token)
    return out


# -------------------------------------------------------- status, Prometheus, spec


def test_the_task_metric_reaches_status_metrics_and_prometheus() -> None:
    from llmtrain.runtime.metrics import MetricLabels, TrainMetrics

    e = ProgressEvent(
        step=10, val_loss=1.0, val_task_exact_match=0.12, val_task_score=0.15, val_task_records=300
    )
    metrics = e.status_patch()["metrics"]
    assert metrics["valTaskExactMatch"] == 0.12 and metrics["valTaskScore"] == 0.15
    m = TrainMetrics(MetricLabels("ns", "j", 0))
    samples = {s.name: s for f in m.registry.collect() for s in f.samples}
    assert "llmtrain_val_task_score_ratio" not in samples  # no task: no series, not a 0
    m.task(exact_match=0.12, score=0.15, checker="identifier")
    samples = {s.name: s for f in m.registry.collect() for s in f.samples}
    assert samples["llmtrain_val_task_exact_match_ratio"].value == 0.12
    assert samples["llmtrain_val_task_score_ratio"].value == 0.15
    assert samples["llmtrain_val_task_score_ratio"].labels["checker"] == "identifier"


def _job(**spec_over: Any) -> dict[str, Any]:
    from tests.manifests import base

    doc = base()
    doc["spec"].update(spec_over)
    return doc


def test_spec_rules_on_the_task_metric() -> None:
    from llmtrain.api.validate import validate_object

    task = {"records": 10, "maxNewTokens": 8, "checker": "identifier"}
    plain = _job(validation={"everySteps": 10, "task": task})  # plain-text sources
    assert "spec.validation.task" in [p.path for p in validate_object(plain)]
    tuned = _job(
        tuning={
            "search": "random",
            "metric": "valTaskScore",
            "numTrials": 2,
            "trialBudget": {"maxSteps": 2},
            "space": {"training.optimizer.lr": {"logUniform": [1e-4, 1e-2]}},
        }
    )
    assert "spec.tuning.metric" in [p.path for p in validate_object(tuned)]
    from llmtrain.api.spec import TuningSpec

    mode = TuningSpec.model_validate(tuned["spec"]["tuning"]).resolved_mode
    assert mode == "max"
