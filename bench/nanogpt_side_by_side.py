"""Quality per second on one core: nanoGPT's CPU "baby GPT" recipe and ours, side by side.

Issue 28, item 3. Both train on five of Jane Austen's novels (Debian's r-cran-janeaustenr,
``tests/data/janeausten.py``) and are scored on the sixth, held out whole (default
*Persuasion*), in **validation bits per byte** — the one unit that compares a character-level
model with a BPE one. They run **at the same time**, each pinned to its own core with
``taskset`` and one thread (``OMP_NUM_THREADS=1``), so the machine's load falls on both alike.

- nanoGPT: its own ``train.py`` and ``model.py`` from a fetched checkout (``--nanogpt``, a git
  directory or work tree; its code is extracted to a temporary directory, never committed),
  the README's CPU recipe verbatim (``config/train_shakespeare_char.py`` with ``--device=cpu
  --compile=False --eval_iters=20 --log_interval=1 --block_size=64 --batch_size=12
  --n_layer=4 --n_head=4 --n_embd=128 --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0``),
  on a character vocabulary built the way its ``shakespeare_char/prepare.py`` builds one. Its
  final model is scored (``--always_save_checkpoint=True``: the recipe's default keeps the
  checkpoint with the best *held-out* estimate, which would peek at the test book).
- ours: ``llmtrain run`` on a generated spec (``--steps``, ``--vocab``, ``--layers`` …), cold:
  its wall time includes tokenizer training, tokenizing, start-up, training and export.

Both final models are scored by this script with one procedure (not by either trainer's own
validation): the held-out book as one token stream, cut into non-overlapping windows of the
model's context; every predicted token's negative log-likelihood summed, divided by ln 2 and by
the UTF-8 bytes of the predicted tokens. Ours is loaded from its Hugging Face export with
``transformers`` (a client we did not write); nanoGPT's with its own ``model.py``.

    .venv/bin/python -P bench/nanogpt_side_by_side.py --nanogpt /path/to/nanoGPT [--record]

``--record`` appends the table to bench/RESULTS.md with date, commit and machine.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "data"))

NANOGPT_RECIPE = [
    "config/train_shakespeare_char.py",
    "--device=cpu",
    "--compile=False",
    "--eval_iters=20",
    "--log_interval=1",
    "--block_size=64",
    "--batch_size=12",
    "--n_layer=4",
    "--n_head=4",
    "--n_embd=128",
    "--max_iters=2000",
    "--lr_decay_iters=2000",
    "--dropout=0.0",
]


@dataclass
class Side:
    name: str
    wall_seconds: float
    bits_per_byte: float
    params: int
    tokens_scored: int
    bytes_scored: int
    detail: str


# ------------------------------------------------------------------------------ data


def clean(text: str) -> str:
    """The text both sides see: llmtrain's default cleaning done here, once, so that its
    preprocessing changes nothing and both models are scored on the very same bytes."""
    text = unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n"))
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return re.sub(r"\n{4,}", "\n\n\n", text).strip() + "\n"


def austen(held_out: str) -> tuple[dict[str, str], str]:
    import janeausten  # type: ignore[import-not-found]

    books = {name: clean(text) for name, text in janeausten.austen_books().items()}
    if held_out not in books:
        raise SystemExit(f"--held-out must be one of {sorted(books)}")
    train = {k: v for k, v in books.items() if k != held_out}
    return train, books[held_out]


def extract_nanogpt(source: Path, dest: Path) -> str:
    """nanoGPT's files into ``dest``; returns its commit (or 'work tree')."""
    git_dir = source if (source / "HEAD").is_file() and not (source / ".git").exists() else source / ".git"
    if git_dir.is_dir():
        commit = subprocess.run(
            ["git", "--git-dir", str(git_dir), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        archive = subprocess.run(
            [
                "git",
                "--git-dir",
                str(git_dir),
                "archive",
                "HEAD",
                "train.py",
                "model.py",
                "configurator.py",
                "config",
            ],
            capture_output=True,
            check=True,
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
        return commit
    for name in ("train.py", "model.py", "configurator.py"):
        shutil.copy(source / name, dest / name)
    shutil.copytree(source / "config", dest / "config")
    return "work tree"


def nanogpt_data(dest: Path, train: dict[str, str], held_out: str) -> dict[str, int]:
    """train.bin / val.bin / meta.pkl as data/shakespeare_char/prepare.py writes them."""
    chars = sorted(set("".join(train.values()) + held_out))
    stoi = {ch: i for i, ch in enumerate(chars)}
    itos = dict(enumerate(chars))
    dest.mkdir(parents=True)
    train_text = "\n\n".join(train[k] for k in sorted(train))
    np.array([stoi[c] for c in train_text], dtype=np.uint16).tofile(dest / "train.bin")
    np.array([stoi[c] for c in held_out], dtype=np.uint16).tofile(dest / "val.bin")
    with open(dest / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": len(chars), "itos": itos, "stoi": stoi}, f)
    return stoi


# ------------------------------------------------------------------------------ runs


def pinned_env(core: int) -> tuple[list[str], dict[str, str]]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return ["taskset", "-c", str(core)], env


def our_spec(work: Path, args: argparse.Namespace) -> Path:
    spec = f"""\
apiVersion: llmtrain.dev/v1alpha1
kind: LLMTrainingJob
metadata:
  name: austen-side-by-side
spec:
  data:
    sources:
      - name: austen
        local: {{glob: "{work}/ours/train/*.txt", format: text, textUnit: file}}
    validationSources:
      - name: heldout
        local: {{glob: "{work}/ours/val/*.txt", format: text, textUnit: file}}
    tokenizer:
      train: {{vocabSize: {args.vocab}}}
    outputUri: {work}/ours/run/data
  model:
    architecture:
      layers: {args.layers}
      dModel: {args.d_model}
      heads: {args.heads}
      contextLength: {args.context}
  training:
    optimizer: {{type: adamw, lr: {args.lr}, weightDecay: 0.1}}
    schedule: {{warmupSteps: {max(1, args.steps // 20)}, decay: cosine, minLr: {args.lr / 10}}}
    batch: {{globalBatchSize: {args.batch}, microBatchSize: {args.batch}}}
    duration: {{maxSteps: {args.steps}}}
    logEverySteps: 50
  validation:
    everySteps: {args.steps}
    batches: 2
  checkpoint:
    uri: {work}/ours/run/checkpoints
    everySteps: {args.steps}
  export:
    uri: {work}/ours/run/model
  resources:
    workers: 1
"""
    path = work / "ours" / "job.yaml"
    path.write_text(spec)
    return path


def start_nanogpt(nano: Path, core: int, iters: int) -> subprocess.Popen[bytes]:
    prefix, env = pinned_env(core)
    cmd = [
        *prefix,
        sys.executable,
        "train.py",
        *NANOGPT_RECIPE,
        *(
            []
            if iters == 2000
            else [f"--max_iters={iters}", f"--lr_decay_iters={iters}", f"--eval_interval={iters}"]
        ),
        "--dataset=austen_char",
        "--out_dir=out",
        "--always_save_checkpoint=True",
    ]
    return subprocess.Popen(
        cmd, cwd=nano, env=env, stdout=open(nano / "train.log", "wb"), stderr=subprocess.STDOUT
    )


def start_ours(spec: Path, core: int) -> subprocess.Popen[bytes]:
    prefix, env = pinned_env(core)
    llmtrain = Path(sys.executable).parent / "llmtrain"
    cmd = [*prefix, str(llmtrain), "run", str(spec), "--run-dir", str(spec.parent / "run"), "--cpus", "1"]
    log = open(spec.parent / "run.log", "wb")
    return subprocess.Popen(cmd, cwd=spec.parent, env=env, stdout=log, stderr=subprocess.STDOUT)


def set_up(
    work: Path, nano: Path, args: argparse.Namespace, train: dict[str, str], held_out: str
) -> tuple[str, dict[str, int], Path]:
    """nanoGPT's code and char data, our text files and spec, under ``work``."""
    nano.mkdir(parents=True)
    nano_commit = extract_nanogpt(args.nanogpt, nano)
    stoi = nanogpt_data(nano / "data" / "austen_char", train, held_out)
    for sub in ("train", "val"):
        (work / "ours" / sub).mkdir(parents=True)
    for name, text in train.items():
        (work / "ours" / "train" / f"{name}.txt").write_text(text)
    (work / "ours" / "val" / f"{args.held_out}.txt").write_text(held_out)
    return nano_commit, stoi, our_spec(work, args)


def train_both(nano: Path, spec: Path, nano_core: int, our_core: int, iters: int) -> dict[str, float]:
    """Start both at once, each on its own core; wall seconds of each from the common start."""
    t0 = time.perf_counter()
    procs = {"nanoGPT": start_nanogpt(nano, nano_core, iters), "llmtrain": start_ours(spec, our_core)}
    walls: dict[str, float] = {}
    while len(walls) < len(procs):
        for name, p in procs.items():
            if name not in walls and p.poll() is not None:
                walls[name] = time.perf_counter() - t0
                if p.returncode != 0:
                    log = nano / "train.log" if name == "nanoGPT" else spec.parent / "run.log"
                    print(log.read_text()[-3000:])
                    raise SystemExit(f"{name} failed ({p.returncode}); log {log}")
                print(f"{name} finished in {walls[name]:.1f} s", flush=True)
        time.sleep(0.5)
    return walls


# ------------------------------------------------------------------------------ scoring


def score_stream(forward: Any, ids: list[int], pos_bytes: list[int], context: int) -> tuple[float, int, int]:
    """Σ NLL (nats) over non-overlapping windows of ``context`` predictions, the tokens and
    the UTF-8 bytes scored (``pos_bytes[i]``: the bytes of the text ``ids[i]`` stands for).
    ``forward(x) -> logits`` over a [B, T] tensor of ids."""
    import torch
    import torch.nn.functional as F

    starts = list(range(0, len(ids) - 1, context))
    nll, tokens, nbytes = 0.0, 0, 0
    with torch.no_grad():
        # Full windows in batches of 32 (one forward each); the short last window alone.
        for i in range(0, len(starts), 32):
            group = [ids[s : s + context + 1] for s in starts[i : i + 32]]
            full = [w for w in group if len(w) == context + 1]
            for batch in ([full] if full else []) + [
                [w] for w in group if len(w) != context + 1 and len(w) > 1
            ]:
                x = torch.tensor([w[:-1] for w in batch])
                y = torch.tensor([w[1:] for w in batch])
                logits = forward(x).float()
                nll += F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
                tokens += y.numel()
        for s in starts:
            nbytes += sum(pos_bytes[s + 1 : s + context + 1])
    return nll, tokens, nbytes


def score_nanogpt(nano: Path, held_out: str, stoi: dict[str, int]) -> tuple[float, int, int, int]:
    import torch

    sys.path.insert(0, str(nano))
    from model import GPT, GPTConfig  # type: ignore[import-not-found]  # nanoGPT's, extracted

    ckpt = torch.load(nano / "out" / "ckpt.pt", map_location="cpu", weights_only=False)
    model = GPT(GPTConfig(**ckpt["model_args"]))
    model.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()})
    model.eval()

    def forward(x: Any) -> Any:
        logits, _ = model(x, targets=x)  # with targets, nanoGPT returns every position's logits
        return logits

    ids = [stoi[c] for c in held_out]
    pos_bytes = [len(c.encode("utf-8")) for c in held_out]
    nll, tokens, nbytes = score_stream(forward, ids, pos_bytes, ckpt["model_args"]["block_size"])
    return nll, tokens, nbytes, int(model.get_num_params())


def score_ours(export: Path, held_out: str) -> tuple[float, int, int, int]:
    from tokenizers import Tokenizer
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(export.resolve()))
    model.eval()
    enc = Tokenizer.from_file(str(export / "tokenizer.json")).encode(held_out)
    # A token's bytes: the part of its character span no earlier token covered (byte-level BPE
    # can split one multi-byte character over two tokens that report the same span).
    pos_bytes, covered = [], 0
    for a, b in enc.offsets:
        pos_bytes.append(len(held_out[max(a, covered) : b].encode("utf-8")))
        covered = max(covered, b)
    if sum(pos_bytes) != len(held_out.encode("utf-8")):
        raise SystemExit("token offsets do not tile the held-out text; bits per byte would be wrong")

    def forward(x: Any) -> Any:
        return model(x).logits

    nll, tokens, nbytes = score_stream(forward, enc.ids, pos_bytes, int(model.config.max_position_embeddings))
    return nll, tokens, nbytes, sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------ main


def stamp() -> tuple[str, str]:
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
    ).stdout.strip()
    return date, commit


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nanogpt", type=Path, required=True, help="nanoGPT checkout (git dir or work tree)")
    ap.add_argument("--held-out", default="persuasion")
    ap.add_argument("--steps", type=int, default=460)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=0.003)
    ap.add_argument(
        "--nanogpt-iters", type=int, default=2000, help="2000 is the recipe; less for a smoke run"
    )
    ap.add_argument("--cores", default="0,1", help="nanoGPT's core, ours")
    ap.add_argument(
        "--keep", type=Path, default=None, help="work directory to keep (default: a temporary one)"
    )
    ap.add_argument("--score-only", action="store_true", help="score the models a --keep directory holds")
    ap.add_argument("--record", action="store_true", help="append the table to bench/RESULTS.md")
    args = ap.parse_args()

    nano_core, our_core = (int(c) for c in args.cores.split(","))
    work = Path(args.keep or tempfile.mkdtemp(prefix="nanogpt-sbs-"))
    train, held_out = austen(args.held_out)
    nano = work / "nanogpt"
    if args.score_only:
        stoi = pickle.loads((nano / "data" / "austen_char" / "meta.pkl").read_bytes())["stoi"]
        spec = work / "ours" / "job.yaml"
        nano_commit, walls = json.loads((work / "walls.json").read_text())
    else:
        nano_commit, stoi, spec = set_up(work, nano, args, train, held_out)
        print(
            f"work dir {work}; nanoGPT {nano_commit} on core {nano_core}, ours on core {our_core}", flush=True
        )
        walls = train_both(nano, spec, nano_core, our_core, args.nanogpt_iters)
        (work / "walls.json").write_text(json.dumps([nano_commit, walls]))

    n_nll, n_tok, n_bytes, n_params = score_nanogpt(nano, held_out, stoi)
    o_nll, o_tok, o_bytes, o_params = score_ours(spec.parent / "run" / "model", held_out)
    sides = [
        Side(
            "nanoGPT baby GPT (char)",
            walls["nanoGPT"],
            n_nll / math.log(2) / n_bytes,
            n_params,
            n_tok,
            n_bytes,
            f"4×128, ctx 64, batch 12, {args.nanogpt_iters} iters",
        ),
        Side(
            "llmtrain",
            walls["llmtrain"],
            o_nll / math.log(2) / o_bytes,
            o_params,
            o_tok,
            o_bytes,
            f"{args.layers}×{args.d_model}, BPE {args.vocab}, ctx {args.context}, batch {args.batch}, "
            f"{args.steps} steps",
        ),
    ]
    ratio = sides[1].bits_per_byte / sides[0].bits_per_byte
    rows = [
        "| run | recipe | params | wall (s) | held-out tokens | held-out bits/byte |",
        "|---|---|---:|---:|---:|---:|",
        *(
            f"| {s.name} | {s.detail} | {s.params:,} | {s.wall_seconds:.0f} | {s.tokens_scored:,} | "
            f"{s.bits_per_byte:.4f} |"
            for s in sides
        ),
    ]
    table = "\n".join(rows)
    summary = (
        f"ours / nanoGPT bits per byte: **{ratio:.3f}** (goal ≤ 0.80); wall ours / nanoGPT: "
        f"{sides[1].wall_seconds / sides[0].wall_seconds:.2f}"
    )
    print(table)
    print(summary)
    if args.record:
        date, commit = stamp()
        load = os.getloadavg()
        section = (
            f"\n## nanoGPT side by side on one core each (issue 28, item 3) — {date}, commit {commit}\n\n"
            f"`bench/nanogpt_side_by_side.py` on {platform.node() or 'this machine'} ({os.cpu_count()} cores, "
            f"load before {load[0]:.2f}); nanoGPT {nano_commit}, held-out book: {args.held_out} "
            f"({len(held_out.encode()):,} bytes), trained on the other five; both scored by the bench.\n\n"
            f"{table}\n\n{summary}\n"
        )
        with open(ROOT / "bench" / "RESULTS.md", "a") as f:
            f.write(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
