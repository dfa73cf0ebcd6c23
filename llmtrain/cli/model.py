"""``llmtrain export``, ``llmtrain generate`` and ``llmtrain serve``: the model leaves the system and talks.

Registered in :mod:`llmtrain.cli` as ``app.command("export")(export_cmd)``,
``app.command("generate")(generate_cmd)`` and ``app.command("serve")(serve_cmd)``. torch,
safetensors, tokenizers and FastAPI are imported inside the commands, so ``llmtrain --help`` stays fast.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import typer

from llmtrain.api.s3 import command_s3_options

# llmtrain serve's defaults, written out: the runtime's modules (torch, FastAPI) load only inside
# the command. tests/unit/test_serve_limits.py checks they equal protocol.MAX_BODY_BYTES and
# limits.CLIENT_TIMEOUT_SECONDS.
MAX_BODY_BYTES = 8 << 20
CLIENT_TIMEOUT_SECONDS = 10.0


def _fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(1)


def _device(device: str) -> Any:
    """--device: auto (cuda when available, else cpu), cpu, cuda or cuda:N, as a torch.device."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        target = torch.device(device)
    except RuntimeError as e:
        raise _fail(f"--device {device!r}: {e}") from e
    if target.type == "cuda" and not torch.cuda.is_available():
        raise _fail("--device cuda: no CUDA device is available (use --device cpu)")
    return target


def export_cmd(
    checkpoint: Annotated[
        str,
        typer.Option(
            "--checkpoint",
            help="A checkpoint lineage (spec.checkpoint.uri: newest complete step) or one step_XXXXXXXX "
            "directory; local or s3://.",
        ),
    ],
    out: Annotated[str, typer.Option("--out", help="Output directory or s3://bucket/prefix.")],
    job: Annotated[
        Path | None,
        typer.Option(
            "--job",
            exists=True,
            dir_okay=False,
            help="The LLMTrainingJob that trained it: its architecture (when the checkpoint does not "
            "record one) and its spec.data.outputUri (the tokenizer).",
        ),
    ] = None,
    tokenizer: Annotated[
        str | None,
        typer.Option(
            "--tokenizer",
            help="Data output directory (with manifest.json) or a tokenizer.json; default: "
            "spec.data.outputUri of --job.",
        ),
    ] = None,
    dtype: Annotated[
        str, typer.Option(help="Weight dtype in the file: float32, bfloat16 or float16.")
    ] = "float32",
    endpoint: Annotated[
        str | None, typer.Option(help="S3 endpoint (default: spec.storage of --job, then AWS_ENDPOINT_URL).")
    ] = None,
    lora: Annotated[
        str | None,
        typer.Option(
            "--lora",
            help="A LoRA checkpoint: merged (base + adapters as one model) or adapter (PEFT's files "
            "beside a pointer to the base); default: spec.export.lora of --job, else merged.",
        ),
    ] = None,
) -> None:
    """Export a checkpoint as a Hugging Face LlamaForCausalLM directory (safetensors + config + tokenizer)."""
    from llmtrain.runtime.export import ExportError, tokenizer_from_data
    from llmtrain.runtime.lora import export_checkpoint  # LoRA checkpoints too (spec.export.lora of --job)

    spec = None
    if job is not None:
        from llmtrain.api.job import load_job

        try:
            spec = load_job(job).spec
        except Exception as e:
            raise _fail(f"{job}: {e}") from e
    s3 = command_s3_options(endpoint, None if spec is None else spec.storage)
    source = tokenizer or (spec.data.output_uri if spec is not None else None)
    if source is None:
        raise _fail("no tokenizer: pass --tokenizer (data output directory or tokenizer.json) or --job")
    try:
        tok = tokenizer_from_data(source, s3)
        ref, cfg = export_checkpoint(checkpoint, out, tok, job=spec, dtype=dtype, s3=s3, lora_mode=lora)
    except (ExportError, FileNotFoundError, ValueError) as e:
        raise _fail(str(e)) from e
    typer.echo(
        f"exported {ref.uri} (step {ref.step}, {cfg.n_layers} layers, dModel {cfg.d_model}, "
        f"vocab {cfg.vocab_size}) to {out}"
    )


def generate_cmd(
    model: Annotated[
        str, typer.Option("--model", help="Exported or Hugging Face Llama directory (local or s3://).")
    ],
    prompt: Annotated[str, typer.Option("--prompt", help="Text to continue.")],
    max_tokens: Annotated[int, typer.Option("--max-tokens", help="New tokens at most.")] = 100,
    temperature: Annotated[float, typer.Option(help="Softmax temperature; 0 = greedy.")] = 1.0,
    top_k: Annotated[
        int | None, typer.Option("--top-k", help="Sample from the k most likely tokens.")
    ] = None,
    top_p: Annotated[
        float, typer.Option("--top-p", help="Sample from the smallest set reaching this probability.")
    ] = 1.0,
    seed: Annotated[int, typer.Option(help="Seed of the sampling.")] = 0,
    ids: Annotated[
        bool, typer.Option("--ids", help="Print prompt and new token ids as JSON, not text.")
    ] = False,
    device: Annotated[
        str, typer.Option(help="auto (cuda when available, else cpu), cpu, cuda or cuda:N.")
    ] = "auto",
    endpoint: Annotated[str | None, typer.Option(help="S3 endpoint (default: AWS_ENDPOINT_URL).")] = None,
) -> None:
    """Continue a prompt with a trained model; stops at end-of-text or --max-tokens."""
    from llmtrain.runtime.export import ExportError
    from llmtrain.runtime.generate import Sampling, generate, load_text_tokenizer
    from llmtrain.runtime.lora import load_model  # a full export, or an adapter merged into its base
    from llmtrain.runtime.publish import resolve_export

    s3 = command_s3_options(endpoint)
    target = _device(device)
    try:
        sampling = Sampling(
            max_new_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed
        )
        pinned = resolve_export(model, s3).uri  # tokenizer and weights of one published export
        tok = load_text_tokenizer(pinned, s3)
        net = load_model(pinned, device=target, s3=s3)
        prompt_ids = tok.encode(prompt)
        # Stop at end-of-text; never sample the table's padding rows (no token decodes them).
        stop = (tok.eos_id,) if tok.eos_id is not None else ()
        sampling = replace(sampling, stop_ids=stop, vocab_limit=tok.vocab_size)
        new = generate(net, prompt_ids, sampling)
    except (ExportError, ValueError) as e:
        raise _fail(str(e)) from e
    if ids:
        typer.echo(json.dumps({"prompt": prompt_ids, "new": new}))
    else:
        typer.echo(tok.decode(prompt_ids + new))


def _api_key(path: Path) -> str:
    """--api-key-file: the key is the file's content, stripped (a Secret's value, often with a newline)."""
    try:
        return path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise _fail(f"--api-key-file {path}: {e}") from e


def serve_cmd(
    model: Annotated[
        str, typer.Option("--model", help="Exported or Hugging Face Llama directory (local or s3://).")
    ],
    host: Annotated[str, typer.Option(help="Address to bind (0.0.0.0: every interface).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to bind; 0 picks a free one (printed).")] = 8000,
    device: Annotated[
        str, typer.Option(help="auto (cuda when available, else cpu), cpu, cuda or cuda:N.")
    ] = "auto",
    max_batch: Annotated[
        int, typer.Option("--max-batch", help="Sequences decoded together at most; more wait for a slot.")
    ] = 32,
    served_model_name: Annotated[
        str | None,
        typer.Option("--served-model-name", help="The model id clients send (default: --model as given)."),
    ] = None,
    threads: Annotated[
        int | None, typer.Option(help="torch threads (default on CPU: all cores but one, for the HTTP loop).")
    ] = None,
    max_waiting: Annotated[
        int | None,
        typer.Option(
            "--max-waiting",
            help="Requests waiting for a batch slot at most; more get 429 with Retry-After "
            "(default: 4 × --max-batch).",
        ),
    ] = None,
    api_key_file: Annotated[
        Path | None,
        typer.Option(
            "--api-key-file",
            dir_okay=False,
            help="Require 'Authorization: Bearer KEY', KEY this file's content (stripped); "
            "/health stays open.",
        ),
    ] = None,
    metrics_require_key: Annotated[
        bool, typer.Option("--metrics-require-key", help="/metrics too requires the API key.")
    ] = False,
    max_body_bytes: Annotated[
        int, typer.Option("--max-body-bytes", help="Largest request body; larger gets 413 unread.")
    ] = MAX_BODY_BYTES,
    client_timeout: Annotated[
        float,
        typer.Option(
            "--client-timeout",
            help="Seconds a client has to send a request's headers, to send its body, and to take "
            "each write of a stream; then the connection is cut.",
        ),
    ] = CLIENT_TIMEOUT_SECONDS,
    endpoint: Annotated[str | None, typer.Option(help="S3 endpoint (default: AWS_ENDPOINT_URL).")] = None,
) -> None:
    """Serve a trained model behind an OpenAI-compatible API (/v1/chat/completions, /v1/completions, /v1/models, /metrics)."""
    import logging

    from llmtrain.runtime.export import ExportError
    from llmtrain.runtime.serve import load_server, serve
    from llmtrain.runtime.serve.limits import Limits

    if not 0 <= port <= 65535:
        raise _fail(f"--port {port}: must be in [0, 65535]")
    if max_batch < 1:
        raise _fail(f"--max-batch {max_batch}: must be ≥ 1")
    if threads is not None and threads < 1:
        raise _fail(f"--threads {threads}: must be ≥ 1")
    if max_waiting is not None and max_waiting < 1:
        raise _fail(f"--max-waiting {max_waiting}: must be ≥ 1")
    try:
        limits = Limits(
            max_body_bytes=max_body_bytes,
            client_timeout=client_timeout,
            api_key=None if api_key_file is None else _api_key(api_key_file),
            metrics_require_key=metrics_require_key,
        )
    except ValueError as e:
        raise _fail(str(e)) from e
    if metrics_require_key and limits.api_key is None:
        raise _fail("--metrics-require-key needs --api-key-file")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    target = _device(device)
    try:
        server = load_server(
            model,
            device=target,
            s3=command_s3_options(endpoint),
            max_batch=max_batch,
            model_id=served_model_name,
            threads=threads,
            max_waiting=4 * max_batch if max_waiting is None else max_waiting,
            limits=limits,
        )
    except (ExportError, ValueError) as e:
        raise _fail(str(e)) from e
    try:
        serve(server, host, port, announce=lambda line: typer.echo(line))
    except OSError as e:  # the address is taken or not ours
        raise _fail(f"--host {host} --port {port}: {e}") from e
