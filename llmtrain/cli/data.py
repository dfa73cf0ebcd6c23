"""``llmtrain data …``: run the data stage alone, and look inside its output.

Heavy imports (tokenizers, torch, ray, boto3) happen inside the commands, so mounting this
app on the main CLI keeps ``llmtrain --help`` light.
"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

app = typer.Typer(help="Prepare token shards from spec.data, and inspect them.", no_args_is_help=True)


@app.command()
def prepare(
    job_yaml: Annotated[str, typer.Argument(help="File holding one LLMTrainingJob.")],
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an output prefix prepared from other inputs.")
    ] = False,
    blocks: Annotated[
        int | None, typer.Option("--blocks", min=1, help="Ray Data blocks (default: in-process, no Ray).")
    ] = None,
) -> None:
    """Collect, clean, tokenize and shard spec.data into spec.data.outputUri (skipped when it
    already holds a manifest with the same input fingerprint)."""
    from llmtrain.api.job import load_job
    from llmtrain.runtime.data.collect import SourceError
    from llmtrain.runtime.data.prepare import PrepareError, prepare_data
    from llmtrain.runtime.data.tokenize import TokenizerError
    from llmtrain.runtime.store import StorageError

    console = Console()
    err = Console(stderr=True)
    try:
        job = load_job(job_yaml)
        result = prepare_data(
            job.spec,
            overwrite=overwrite,
            num_blocks=blocks,
            log=lambda m: err.print(f"[dim]{escape(m)}[/dim]"),
        )
    except (PrepareError, SourceError, StorageError, TokenizerError, ValueError, OSError) as e:
        err.print(f"[red]error:[/red] {escape(str(e))}")
        raise typer.Exit(1) from e
    m = result.manifest
    table = Table(
        title=f"{result.manifest_uri}" + (" (reused: same input fingerprint)" if result.reused else "")
    )
    for col in ("source", "documents", "train tokens", "target", "realised"):
        table.add_column(col, justify="left" if col == "source" else "right")
    for s in m.sources:
        target = "natural" if s.target_fraction is None else f"{s.target_fraction:.3f}"
        table.add_row(s.name, f"{s.documents:,}", f"{s.tokens:,}", target, f"{s.realised_fraction:.3f}")
    console.print(table)
    summary = Table(show_header=False)
    summary.add_row("train", f"{m.split_tokens('train'):,} tokens in {len(m.split_shards('train'))} shards")
    summary.add_row(
        "validation", f"{m.split_tokens('validation'):,} tokens in {len(m.split_shards('validation'))} shards"
    )
    summary.add_row(
        "tokenizer", f"vocab {m.tokenizer.vocab_size:,}, eot {m.tokenizer.eot_token!r} = {m.tokenizer.eot_id}"
    )
    summary.add_row("dtype", m.dtype)
    summary.add_row("dropped", ", ".join(f"{k} {v:,}" for k, v in sorted(m.dropped.items())))
    if m.task is not None:  # task records: what was trained on and what was refused, named
        summary.add_row("task records", ", ".join(f"{k} {v:,}" for k, v in m.task["records"].items()))
        bad = m.task["bad_records"]
        summary.add_row("bad records", ", ".join(f"{k} {v:,}" for k, v in bad.items()) or "none")
        for b in m.task["bad_examples"][:5]:
            summary.add_row("", escape(f"{b['source']}: {b['record']}: {b['reason']} ({b['detail']})"))
    summary.add_row("fingerprint", m.fingerprint[:16])
    if not result.reused:
        summary.add_row("time", f"{result.seconds:.1f} s")
    console.print(summary)


@app.command()
def inspect(
    uri: Annotated[str, typer.Argument(help="Output prefix (directory or s3://) holding manifest.json.")],
    windows: Annotated[int, typer.Option("--windows", min=1, help="Windows to decode.")] = 2,
    context: Annotated[int, typer.Option("--context", min=1, help="Tokens per window.")] = 64,
    split: Annotated[str, typer.Option("--split", help="train or validation.")] = "validation",
    endpoint: Annotated[str | None, typer.Option("--endpoint", help="S3 endpoint URL.")] = None,
) -> None:
    """Verify the first shard of a split and decode its first windows."""
    from tokenizers import Tokenizer

    from llmtrain.api.s3 import command_s3_options
    from llmtrain.api.shards import MANIFEST_NAME, Manifest, ShardFormatError
    from llmtrain.runtime.data.loader import read_verified_shard
    from llmtrain.runtime.store import StorageError, open_store

    console = Console()
    err = Console(stderr=True)
    try:
        store = open_store(uri, command_s3_options(endpoint))
        manifest = Manifest.from_json(store.get(MANIFEST_NAME))
        shards = manifest.split_shards(split)  # type: ignore[arg-type]
        if not shards:
            raise ShardFormatError(f"{uri}: the manifest lists no {split} shards")
        tokens = read_verified_shard(store, shards[0], manifest)
        tok = Tokenizer.from_str(store.get(manifest.tokenizer.path).decode("utf-8"))
    except (StorageError, ShardFormatError, ValueError) as e:
        err.print(f"[red]error:[/red] {escape(str(e))}")
        raise typer.Exit(1) from e
    console.print(
        f"{store.describe(shards[0].path)}: {shards[0].tokens:,} tokens ({manifest.dtype}), "
        f"{shards[0].documents:,} documents, sha256 ok"
    )
    for i in range(windows):
        ids = tokens[i * context : (i + 1) * context].tolist()
        if not ids:
            break
        text = tok.decode(ids, skip_special_tokens=False)
        console.rule(f"window {i} (tokens {i * context}–{i * context + len(ids) - 1})")
        console.print(text, markup=False, highlight=False)


@app.command("stdlib-task")
def stdlib_task(
    out: Annotated[str, typer.Option("--out", help="Directory for train.jsonl and heldout.jsonl.")],
    train_records: Annotated[int, typer.Option("--train-records", min=1, help="Training records.")] = 3000,
    heldout_records: Annotated[
        int, typer.Option("--heldout-records", min=1, help="Held-out records (from held-out files).")
    ] = 300,
    heldout_percent: Annotated[
        int, typer.Option("--heldout-percent", min=1, max=99, help="Share of source files held out.")
    ] = 10,
    kind: Annotated[
        str,
        typer.Option(
            "--kind",
            help="docstring: name the function from its docstring and arguments (inferred); "
            "definition: from its def line and docstring (read off).",
        ),
    ] = "docstring",
) -> None:
    """Build the offline task dataset of examples/finetune-task.yaml: a stdlib function's
    docstring and arguments as the prompt, its name as the answer, split by source file."""
    from pathlib import Path

    from llmtrain.runtime.data.stdlib_task import build, write

    try:
        split = build(
            train_records=train_records,
            heldout_records=heldout_records,
            heldout_percent=heldout_percent,
            kind=kind,
        )
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    train_path, heldout_path = write(split, Path(out))
    Console().print(
        f"{train_path}: {len(split.train):,} records from {split.files_train} files\n"
        f"{heldout_path}: {len(split.heldout):,} records from {split.files_heldout} held-out files "
        f"({split.dropped_duplicates} dropped: prompt also in training)"
    )
