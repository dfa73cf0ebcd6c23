"""Task fine-tuning, offline (#27 item 6): the quickstart model before and after fine-tuning
on the stdlib task, full and LoRA, with wall time, trainable parameters and checkpoint size.

    make quickstart                       # runs/quickstart/model (once)
    .venv/bin/python -P bench/finetune_task.py [--write-results]

Steps: ``llmtrain data stdlib-task`` → ``llmtrain data prepare examples/finetune-task.yaml``
→ the quickstart export scored on the held-out prompts (no training: the "before",
:func:`llmtrain.runtime.task_metric.score_export`, the code a run's validation uses) →
``llmtrain run`` of examples/finetune-task.yaml and examples/finetune-task-lora.yaml (each
from scratch: its run directory is removed first) → each run's summary.json (the task metric
of its last validation) and its newest checkpoint's bytes on disk.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LLMTRAIN = ROOT / ".venv" / "bin" / "llmtrain"
EXAMPLES = {
    "full": ROOT / "examples" / "finetune-task.yaml",
    "lora": ROOT / "examples" / "finetune-task-lora.yaml",
}
BASE = ROOT / "runs" / "quickstart" / "model"
TASK_DIR = ROOT / "runs" / "stdlib-task"
DATA = ROOT / "runs" / "finetune-task" / "data"


def sh(*args: str) -> str:
    r = subprocess.run(args, cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r.stdout


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def params(kind: str) -> tuple[int, int]:
    """(trainable, total) parameters of the example's model."""
    import torch
    from llmtrain.runtime.lora import apply_lora, trainable_params
    from llmtrain.runtime.model import GPT

    from llmtrain.api.config import runtime_config_from_spec
    from llmtrain.api.job import load_job
    from llmtrain.api.shards import MANIFEST_NAME, Manifest

    job = load_job(str(EXAMPLES[kind]))
    vocab = Manifest.from_json((DATA / MANIFEST_NAME).read_bytes()).tokenizer.vocab_size
    cfg = runtime_config_from_spec(job.spec, vocab_size=vocab)
    with torch.device("meta"):
        model = GPT(cfg.model)
    total = sum(p.numel() for p in model.parameters())
    if cfg.train.lora_rank:
        from llmtrain.runtime.lora import LoraSettings

        settings = LoraSettings.from_train(cfg.train)
        assert settings is not None
        apply_lora(model, settings)
        return trainable_params(model), total
    return total, total


def task_settings() -> tuple[int, int, str]:
    from llmtrain.api.job import load_job

    task = load_job(str(EXAMPLES["full"])).spec.validation.task
    assert task is not None
    return task.records, task.max_new_tokens, task.checker.value


def start(kind: str) -> tuple[subprocess.Popen[str], float]:
    """``llmtrain run`` of one example from scratch (its checkpoints and export removed)."""
    from llmtrain.api.job import load_job

    run_dir = ROOT / "runs" / load_job(str(EXAMPLES[kind])).metadata.name
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    shutil.rmtree(run_dir / "model", ignore_errors=True)
    for leftover in ("summary.json", "events.jsonl", "status.json"):
        (run_dir / leftover).unlink(missing_ok=True)
    log = (ROOT / "runs" / f"bench-{kind}.log").open("w")
    proc = subprocess.Popen(
        [str(LLMTRAIN), "run", str(EXAMPLES[kind])], cwd=ROOT, stdout=log, stderr=log, text=True
    )
    return proc, time.perf_counter()


def wait_for_data(proc: subprocess.Popen[str], t0: float) -> None:
    """Until the full run's data stage has written the manifest (or the run ended)."""
    while not (DATA / "manifest.json").exists() and proc.poll() is None:
        time.sleep(2)


def finish(kind: str, proc: subprocess.Popen[str], t0: float) -> dict[str, object]:
    from llmtrain.api.job import load_job

    if proc.wait() != 0:
        raise SystemExit(f"llmtrain run {EXAMPLES[kind]} failed: see runs/bench-{kind}.log")
    wall = time.perf_counter() - t0
    run_dir = ROOT / "runs" / load_job(str(EXAMPLES[kind])).metadata.name
    summary = json.loads((run_dir / "summary.json").read_text())
    ckpt = Path(summary["checkpoint_uri"])
    trainable, total = params(kind)
    return {
        "kind": kind,
        "wall_s": wall,
        "training_s": summary["stage_seconds"].get("training"),
        "steps": summary["steps"],
        "val_loss": summary["val_loss"],
        "exact": summary["val_task_exact_match"],
        "score": summary["val_task_score"],
        "records": summary["val_task_records"],
        "checker": summary["val_task_checker"],
        "trainable": trainable,
        "total": total,
        "checkpoint_bytes": dir_bytes(ckpt),
        "export_bytes": dir_bytes(Path(summary["export_uri"]).resolve()),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--write-results", action="store_true", help="append the table to bench/RESULTS.md")
    ap.add_argument(
        "--parallel", action="store_true", help="run the full and LoRA fine-tunes at the same time"
    )
    args = ap.parse_args()
    if not (BASE / "config.json").exists():
        raise SystemExit(f"{BASE} is missing: run `make quickstart` first")
    sh(str(LLMTRAIN), "data", "stdlib-task", "--out", str(TASK_DIR))
    # The full run prepares the data (the LoRA run reuses it): from scratch, so a task set or
    # chat template that changed since the last bench run is prepared again.
    shutil.rmtree(DATA, ignore_errors=True)

    from llmtrain.runtime.task_metric import TaskScore, score_export

    records, max_new, checker = task_settings()

    def score_before() -> tuple[TaskScore, float]:
        t0 = time.perf_counter()
        before = score_export(
            str(BASE), str(DATA), records=records, max_new_tokens=max_new, checker_name=checker
        )
        seconds = time.perf_counter() - t0
        print(f"before (quickstart export, no training): {before.describe()}  [{seconds:.0f} s]", flush=True)
        return before, seconds

    results = []
    if args.parallel:  # both runs at once, the "before" scored meanwhile: a busy machine's shares
        started = {"full": start("full")}
        wait_for_data(*started["full"])
        started["lora"] = start("lora")
        before, before_s = score_before()
        results = [finish(kind, *started[kind]) for kind in ("full", "lora")]
    else:
        results.append(finish("full", *start("full")))
        before, before_s = score_before()
        results.append(finish("lora", *start("lora")))
    for r in results:
        print(json.dumps(r), flush=True)

    from llmtrain.api.progress import task_metric_line

    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    commit = sh("git", "rev-parse", "--short", "HEAD").strip()
    lines = [
        f"## Task fine-tuning (issue 27 item 6): `bench/finetune_task.py` — {date}, commit {commit}",
        "",
        "The quickstart model (runs/quickstart/model) fine-tuned to name a stdlib function from its "
        "docstring and arguments (`llmtrain data stdlib-task`: 3,000 training records, held-out "
        f"prompts from other source files; greedy, {max_new} new tokens at most, first {records} "
        "held-out records). Machine: 2 CPU cores shared with other sessions' work (wall times are "
        "loose)"
        + (
            "; the two fine-tunes and the scoring of the base ran at the same time." if args.parallel else "."
        ),
        "",
        "| model | task metric (held-out) | val loss | steps | wall (run) | trainable params | checkpoint |",
        "|---|---|---|---|---|---|---|",
        f"| quickstart export, no training | {before.describe()} | – | 0 | {before_s:.0f} s (scoring) | – | – |",
    ]
    for r in results:
        line = task_metric_line(float(r["exact"]), float(r["score"]), int(r["records"]), str(r["checker"]))
        lines.append(
            f"| {r['kind']} fine-tune | {line} | {float(r['val_loss']):.3f} | {r['steps']} | "
            f"{float(r['wall_s']):.0f} s (training {float(r['training_s']):.0f} s) | "
            f"{int(r['trainable']):,} of {int(r['total']):,} | {int(r['checkpoint_bytes']) / 2**20:.2f} MiB |"
        )
    full, lora = results
    lines += [
        "",
        f"LoRA trains {int(lora['trainable']) / int(full['trainable']):.1%} of the parameters; its checkpoint "
        f"(adapters + their optimizer state) is {int(lora['checkpoint_bytes']) / int(full['checkpoint_bytes']):.1%} "
        "of the full fine-tune's (weights + AdamW state). Both exports are merged Llama models "
        f"({int(full['export_bytes']) / 2**20:.1f} / {int(lora['export_bytes']) / 2**20:.1f} MiB).",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.write_results:
        with (ROOT / "bench" / "RESULTS.md").open("a") as f:
            f.write("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
